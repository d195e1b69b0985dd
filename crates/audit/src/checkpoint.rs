//! Signed checkpoints: what makes the chain's *tail* tamper-evident.
//!
//! A hash chain alone proves nothing about its last records: whoever can write the file can edit
//! the last line, cut records off the end, or rewrite everything from a middle record on and
//! recompute the hashes. So every group commit ends with a checkpoint record, written in the same
//! `write` + `fdatasync` as the records it covers: it names the head (its own `prev`, the hash of
//! the last record of the batch), carries a checkpoint number that grows by one each time, and is
//! signed with the daemon's own key (the private key of its TLS identity, issued by the cluster CA
//! and — on a host — unsealed by the TPM at measured start). A record is acknowledged only once
//! its checkpoint is on disk, so in a log that nobody touched the last line is always a checkpoint.
//!
//! What a verifier holding the daemon's certificate then finds:
//! * an edited or rewritten record: the next checkpoint's signature no longer verifies;
//! * records appended by someone else, or a cut that does not end on a checkpoint: an unsealed
//!   tail;
//! * a cut that ends exactly on an earlier checkpoint: only against an anchor it kept — the head
//!   (sequence number and hash) it saw before (`bulkhead audit verify --head SEQ:HASH`; the control
//!   plane checks every pull against the last head it stored), or a checkpoint number it saw.
//!
//! Signatures are ECDSA P-256 / SHA-256 (the key type of the cluster's certificates), fixed-size
//! `r || s`, hex.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The checkpoint part of a checkpoint record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Counts the checkpoints of this log: 1, 2, 3, … with no gap.
    pub number: u64,
    /// SHA-256 (hex) of the signer's public key (uncompressed SEC1 point).
    pub signer: String,
    /// Signature over [`message`], hex.
    pub sig: String,
}

/// Why a key could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not a PKCS#8 ECDSA P-256 private key")]
    BadPrivateKey,
    #[error("not an X.509 certificate")]
    BadCertificate,
    #[error("the certificate's key is not ECDSA P-256")]
    UnsupportedKey,
    #[error("no PEM block of the expected type")]
    NoPem,
}

/// The exact bytes a checkpoint signs.
pub fn message(seq: u64, time_ms: u64, prev: &str, number: u64) -> Vec<u8> {
    format!("bulkhead-audit-checkpoint/v1\nseq={seq}\ntime_ms={time_ms}\nprev={prev}\nnumber={number}\n")
        .into_bytes()
}

fn key_id(public: &[u8]) -> String {
    hex::encode(Sha256::digest(public))
}

/// Signs checkpoints (held by the daemon that writes the log).
pub struct CheckpointSigner {
    key: EcdsaKeyPair,
    id: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl CheckpointSigner {
    /// From a PKCS#8 DER private key (ECDSA P-256).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|_| KeyError::BadPrivateKey)?;
        let id = key_id(key.public_key().as_ref());
        Ok(CheckpointSigner {
            key,
            id,
            rng: SystemRandom::new(),
        })
    }

    /// From a PEM `PRIVATE KEY` block.
    pub fn from_pkcs8_pem(pem: &[u8]) -> Result<Self, KeyError> {
        Self::from_pkcs8_der(&pem_block(pem, "PRIVATE KEY")?)
    }

    /// The matching verification key.
    pub fn verifying_key(&self) -> CheckpointKey {
        CheckpointKey {
            public: self.key.public_key().as_ref().to_vec(),
            id: self.id.clone(),
        }
    }

    /// Key id (SHA-256 of the public key, hex).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn sign(&self, msg: &[u8]) -> Option<String> {
        self.key
            .sign(&self.rng, msg)
            .ok()
            .map(|s| hex::encode(s.as_ref()))
    }
}

/// Checks checkpoints (held by whoever verifies the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointKey {
    public: Vec<u8>,
    id: String,
}

impl CheckpointKey {
    /// The key of an X.509 certificate (DER), e.g. the daemon's TLS certificate.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, KeyError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|_| KeyError::BadCertificate)?;
        let spki = cert.public_key();
        // id-ecPublicKey with the prime256v1 curve.
        let is_ec = spki.algorithm.algorithm.to_id_string() == "1.2.840.10045.2.1";
        let curve_ok = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string() == "1.2.840.10045.3.1.7")
            .unwrap_or(false);
        if !is_ec || !curve_ok {
            return Err(KeyError::UnsupportedKey);
        }
        let public = spki.subject_public_key.data.to_vec();
        Ok(CheckpointKey {
            id: key_id(&public),
            public,
        })
    }

    /// From a PEM `CERTIFICATE` block.
    pub fn from_cert_pem(pem: &[u8]) -> Result<Self, KeyError> {
        Self::from_cert_der(&pem_block(pem, "CERTIFICATE")?)
    }

    /// Key id (SHA-256 of the public key, hex).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Does `cp` sign this position of the chain?
    pub fn verify(&self, seq: u64, time_ms: u64, prev: &str, cp: &Checkpoint) -> bool {
        if cp.signer != self.id {
            return false;
        }
        let Ok(sig) = hex::decode(&cp.sig) else {
            return false;
        };
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.public)
            .verify(&message(seq, time_ms, prev, cp.number), &sig)
            .is_ok()
    }
}

/// The DER of the first PEM block labelled `label`.
fn pem_block(pem: &[u8], label: &str) -> Result<Vec<u8>, KeyError> {
    use base64::Engine as _;
    let text = std::str::from_utf8(pem).map_err(|_| KeyError::NoPem)?;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin).ok_or(KeyError::NoPem)? + begin.len();
    let stop = text[start..].find(&end).ok_or(KeyError::NoPem)? + start;
    let b64: String = text[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| KeyError::NoPem)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(crate) fn test_signer() -> CheckpointSigner {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        CheckpointSigner::from_pkcs8_der(doc.as_ref()).unwrap()
    }

    #[test]
    fn signature_binds_every_field() {
        let s = test_signer();
        let k = s.verifying_key();
        let sig = s.sign(&message(7, 100, "ab", 3)).unwrap();
        let cp = Checkpoint {
            number: 3,
            signer: s.id().to_string(),
            sig,
        };
        assert!(k.verify(7, 100, "ab", &cp));
        assert!(!k.verify(8, 100, "ab", &cp));
        assert!(!k.verify(7, 101, "ab", &cp));
        assert!(!k.verify(7, 100, "ac", &cp));
        assert!(!k.verify(
            7,
            100,
            "ab",
            &Checkpoint {
                number: 4,
                ..cp.clone()
            }
        ));
        let other = test_signer().verifying_key();
        assert!(!other.verify(7, 100, "ab", &cp));
    }

    #[test]
    fn garbage_keys_are_typed_errors() {
        assert_eq!(
            CheckpointSigner::from_pkcs8_der(b"nope").unwrap_err(),
            KeyError::BadPrivateKey
        );
        assert_eq!(
            CheckpointKey::from_cert_der(b"nope").unwrap_err(),
            KeyError::BadCertificate
        );
        assert_eq!(
            CheckpointKey::from_cert_pem(b"-----BEGIN X-----").unwrap_err(),
            KeyError::NoPem
        );
    }
}
