//! Endorsement: proving that an attestation key lives in a genuine TPM.
//!
//! A quote is only as good as the key that signed it. Enrolling a host's attestation key (AK)
//! on the operator's word alone lets anyone who can run a software TPM, or read a key file,
//! enrol a key that quotes whatever it likes. This module checks the AK against the TPM's
//! **endorsement key** (EK), the key the TPM's manufacturer certified at the factory:
//!
//! 1. The host presents its EK certificate (read from the TPM's NV index `0x01c00002`, the RSA
//!    2048 EK certificate of the TCG EK credential profile). [`verify_ek_certificate`] checks its
//!    chain, signature by signature, up to a manufacturer root the verifier trusts
//!    ([`EkTrust`]), with every issuer a CA and every certificate inside its validity period.
//! 2. The verifier makes a credential ([`make_credential`], TPM2_MakeCredential done in software,
//!    TPM 2.0 Part 1 §24): a fresh 32-byte secret, wrapped so that only the TPM holding that
//!    EK's private key can unwrap it, and only for an object whose **name** is the AK's (the name
//!    covers the AK's public key *and* its attributes: fixed to this TPM, restricted, signing).
//! 3. The host's TPM unwraps it with TPM2_ActivateCredential ([`crate::tpm::Tpm::activate_credential`]);
//!    the verifier accepts the AK only if the secret comes back ([`CredentialCheck::finish`]).
//!
//! A host that presents another TPM's EK certificate, an AK that is not in the EK's TPM, or an
//! EK certificate not chaining to a trusted manufacturer is refused with a typed
//! [`EndorsementError`].
//!
//! For tests and the dev cluster, [`LocalManufacturer`] plays the TPM manufacturer: it runs
//! `swtpm_setup --create-ek-cert` with `swtpm_localca` and a CA of its own, so each software TPM
//! it makes has an EK certificate chaining to that CA.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::tpm::AkPublic;

/// NV index of the RSA 2048 EK certificate (TCG EK Credential Profile).
pub const RSA_EK_CERT_NV_INDEX: u32 = 0x01c0_0002;

/// Longest chain accepted from the EK certificate to a root (leaf, intermediates, root).
const MAX_CHAIN: usize = 5;

/// Why an attestation key was not accepted as endorsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndorsementError {
    #[error("the TPM holds no EK certificate")]
    NoEkCertificate,
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("certificate {subject:?} is not issued by any trusted manufacturer CA")]
    UntrustedIssuer { subject: String },
    #[error("certificate {subject:?}: signature does not verify under its issuer's key")]
    BadSignature { subject: String },
    #[error("certificate {subject:?} issues certificates but is not a CA")]
    IssuerNotCa { subject: String },
    #[error("certificate {subject:?} is outside its validity period")]
    NotValidNow { subject: String },
    #[error("certificate chain longer than {MAX_CHAIN}")]
    ChainTooLong,
    #[error("the EK certificate does not hold an RSA 2048 key")]
    UnsupportedEkKey,
    #[error("no trusted manufacturer CA configured")]
    NoTrustAnchors,
    #[error(
        "the TPM refused to activate the credential: the AK is not in the TPM that holds this EK"
    )]
    ActivationRefused,
    #[error("the secret returned does not match the credential: the AK is not endorsed")]
    WrongSecret,
    #[error("crypto: {0}")]
    Crypto(&'static str),
    #[error("manufacturing a TPM failed: {0}")]
    Manufacture(String),
}

impl EndorsementError {
    /// A stable code for CLIs and audit records.
    pub fn code(&self) -> &'static str {
        match self {
            EndorsementError::NoEkCertificate => "no_ek_certificate",
            EndorsementError::Malformed(_) => "malformed_ek_certificate",
            EndorsementError::UntrustedIssuer { .. } => "ek_untrusted_issuer",
            EndorsementError::BadSignature { .. } => "ek_bad_signature",
            EndorsementError::IssuerNotCa { .. } => "ek_issuer_not_ca",
            EndorsementError::NotValidNow { .. } => "ek_not_valid_now",
            EndorsementError::ChainTooLong => "ek_chain_too_long",
            EndorsementError::UnsupportedEkKey => "ek_unsupported_key",
            EndorsementError::NoTrustAnchors => "ek_no_trust_anchors",
            EndorsementError::ActivationRefused => "ak_not_in_ek_tpm",
            EndorsementError::WrongSecret => "ak_not_endorsed",
            EndorsementError::Crypto(_) => "ek_crypto",
            EndorsementError::Manufacture(_) => "tpm_manufacture",
        }
    }
}

/// The manufacturer CAs a verifier trusts for EK certificates (DER), and intermediates it may
/// use to build a chain (intermediates are not anchors: a chain must end at a root).
#[derive(Debug, Clone, Default)]
pub struct EkTrust {
    roots: Vec<Vec<u8>>,
    intermediates: Vec<Vec<u8>>,
}

impl EkTrust {
    /// From PEM files: each may hold several certificates.
    pub fn from_pem_files(
        roots: &[PathBuf],
        intermediates: &[PathBuf],
    ) -> Result<Self, EndorsementError> {
        let load = |paths: &[PathBuf]| -> Result<Vec<Vec<u8>>, EndorsementError> {
            let mut out = Vec::new();
            for p in paths {
                let raw = std::fs::read(p)
                    .map_err(|_| EndorsementError::Malformed("trust anchor file (unreadable)"))?;
                out.extend(pem_certificates(&raw)?);
            }
            Ok(out)
        };
        let trust = EkTrust {
            roots: load(roots)?,
            intermediates: load(intermediates)?,
        };
        if trust.roots.is_empty() {
            return Err(EndorsementError::NoTrustAnchors);
        }
        Ok(trust)
    }
}

/// Every certificate of a PEM buffer, as DER; each one must parse.
fn pem_certificates(raw: &[u8]) -> Result<Vec<Vec<u8>>, EndorsementError> {
    let mut out = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(raw) {
        let pem = pem.map_err(|_| EndorsementError::Malformed("PEM"))?;
        if pem.label != "CERTIFICATE" {
            continue;
        }
        X509Certificate::from_der(&pem.contents)
            .map_err(|_| EndorsementError::Malformed("certificate in PEM"))?;
        out.push(pem.contents);
    }
    Ok(out)
}

/// An EK's public key as its certificate states it (RSA 2048, SubjectPublicKeyInfo DER).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkPublicKey {
    spki_der: Vec<u8>,
}

impl EkPublicKey {
    /// SHA-256 of the SubjectPublicKeyInfo, hex: a stable name for audit records.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(&self.spki_der))
    }
}

/// The certificates of `ders` that parse (anchors were checked when loaded).
fn parsed(ders: &[Vec<u8>]) -> Vec<X509Certificate<'_>> {
    ders.iter()
        .filter_map(|d| X509Certificate::from_der(d).ok().map(|(_, c)| c))
        .collect()
}

fn subject_of(c: &X509Certificate<'_>) -> String {
    c.subject().to_string()
}

/// Checks an EK certificate's chain to a trusted root at time `now` (Unix seconds) and returns
/// the EK public key it certifies.
pub fn verify_ek_certificate(
    cert_der: &[u8],
    trust: &EkTrust,
    now: u64,
) -> Result<EkPublicKey, EndorsementError> {
    if trust.roots.is_empty() {
        return Err(EndorsementError::NoTrustAnchors);
    }
    let (rest, leaf) = X509Certificate::from_der(cert_der)
        .map_err(|_| EndorsementError::Malformed("EK certificate"))?;
    if !rest.is_empty() {
        return Err(EndorsementError::Malformed(
            "EK certificate (trailing bytes)",
        ));
    }
    let now = i64::try_from(now).map_err(|_| EndorsementError::Malformed("clock"))?;
    let at = x509_parser::time::ASN1Time::from_timestamp(now)
        .map_err(|_| EndorsementError::Malformed("clock"))?;
    let roots = parsed(&trust.roots);
    let intermediates = parsed(&trust.intermediates);

    let mut current = leaf.clone();
    for _ in 0..MAX_CHAIN {
        if !current.validity().is_valid_at(at) {
            return Err(EndorsementError::NotValidNow {
                subject: subject_of(&current),
            });
        }
        // Issuers are found by name, then proven by signature: a CA of another manufacturer
        // may carry the same name (every swtpm local CA is "CN=swtpm-localca").
        let named = |c: &&X509Certificate<'_>| c.subject().as_raw() == current.issuer().as_raw();
        let mut named_any = false;
        for root in roots.iter().filter(named) {
            named_any = true;
            if check_link(&current, root, at).is_ok() {
                return ek_key_of(&leaf);
            }
        }
        let mut next = None;
        for c in intermediates.iter().filter(named) {
            named_any = true;
            if check_link(&current, c, at).is_ok() {
                next = Some(c.clone());
                break;
            }
        }
        match next {
            Some(n) => current = n,
            None if named_any => {
                // A trusted CA of that name exists, but none of them signed this.
                return Err(EndorsementError::BadSignature {
                    subject: subject_of(&current),
                });
            }
            None => {
                return Err(EndorsementError::UntrustedIssuer {
                    subject: subject_of(&current),
                })
            }
        }
    }
    Err(EndorsementError::ChainTooLong)
}

/// `child` is signed by `issuer`, and `issuer` is a CA valid at `at`.
fn check_link(
    child: &X509Certificate<'_>,
    issuer: &X509Certificate<'_>,
    at: x509_parser::time::ASN1Time,
) -> Result<(), EndorsementError> {
    if !issuer.is_ca() {
        return Err(EndorsementError::IssuerNotCa {
            subject: subject_of(issuer),
        });
    }
    if !issuer.validity().is_valid_at(at) {
        return Err(EndorsementError::NotValidNow {
            subject: subject_of(issuer),
        });
    }
    child
        .verify_signature(Some(issuer.public_key()))
        .map_err(|_| EndorsementError::BadSignature {
            subject: subject_of(child),
        })
}

fn ek_key_of(leaf: &X509Certificate<'_>) -> Result<EkPublicKey, EndorsementError> {
    let spki = leaf.public_key();
    // rsaEncryption
    if spki.algorithm.algorithm.to_id_string() != "1.2.840.113549.1.1.1" {
        return Err(EndorsementError::UnsupportedEkKey);
    }
    let key = aws_lc_rs::rsa::PublicEncryptingKey::from_der(spki.raw)
        .map_err(|_| EndorsementError::UnsupportedEkKey)?;
    if key.key_size_bits() != 2048 {
        return Err(EndorsementError::UnsupportedEkKey);
    }
    Ok(EkPublicKey {
        spki_der: spki.raw.to_vec(),
    })
}

// The credential the verifier sends to the host is a wire type (the sealed host's agent reads
// it from its request line): one definition in `bulkhead-rot-proto`.
pub use bulkhead_rot_proto::CredentialChallenge;

/// The verifier's side of one credential check: keeps the expected secret.
pub struct CredentialCheck {
    expected: Zeroizing<[u8; 32]>,
    ek: EkPublicKey,
}

impl std::fmt::Debug for CredentialCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialCheck")
            .field("ek", &self.ek.fingerprint())
            .finish_non_exhaustive()
    }
}

impl CredentialCheck {
    /// Accepts the AK when the host returned exactly the secret; returns the EK it is bound to.
    pub fn finish(self, returned: &[u8]) -> Result<EkPublicKey, EndorsementError> {
        use subtle_eq::ct_eq;
        if ct_eq(returned, self.expected.as_slice()) {
            Ok(self.ek)
        } else {
            Err(EndorsementError::WrongSecret)
        }
    }
}

/// A sealed host's attestation key, first step (the control plane runs it before it enrols the
/// AK, see `bulkhead_control::sealed`): the EK certificate the host's boot evidence carries
/// must chain to a trusted manufacturer CA; returns the credential to send to the host for `ak`
/// (the AK to be enrolled) and the check of what comes back.
pub fn challenge_boot_ak(
    evidence: &bulkhead_rot_proto::BootEvidence,
    ak: &AkPublic,
    trust: &EkTrust,
    now: u64,
) -> Result<(CredentialChallenge, CredentialCheck), EndorsementError> {
    let hex_cert = evidence
        .ek_certificate
        .as_deref()
        .ok_or(EndorsementError::NoEkCertificate)?;
    let der =
        hex::decode(hex_cert).map_err(|_| EndorsementError::Malformed("EK certificate (hex)"))?;
    let ek = verify_ek_certificate(&der, trust, now)?;
    make_credential(&ek, ak)
}

impl CredentialCheck {
    /// Second step: the boot evidence the host answered the credential with must carry exactly
    /// its secret (the host's TPM opened it, so the AK is in the TPM that holds the EK).
    pub fn finish_boot(
        self,
        evidence: &bulkhead_rot_proto::BootEvidence,
    ) -> Result<EkPublicKey, EndorsementError> {
        let secret = evidence
            .activated
            .as_deref()
            .ok_or(EndorsementError::ActivationRefused)?;
        let secret = hex::decode(secret).map_err(|_| EndorsementError::WrongSecret)?;
        self.finish(&secret)
    }
}

mod subtle_eq {
    /// Constant-time comparison (lengths are public).
    pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// The TPM name of an attestation key: `nameAlg (SHA-256) || SHA-256(TPMT_PUBLIC)`, where the
/// public area is Bulkhead's AK template with this key's point. The name binds the key *and*
/// its attributes (fixedTPM, restricted, sign).
pub fn ak_name(ak: &AkPublic) -> Result<Vec<u8>, EndorsementError> {
    let public = crate::tpm::ak_public_area(ak).map_err(|_| EndorsementError::Malformed("AK"))?;
    let mut name = vec![0x00, 0x0b]; // TPM_ALG_SHA256
    name.extend_from_slice(&Sha256::digest(&public));
    Ok(name)
}

/// TPM2_MakeCredential in software (TPM 2.0 Part 1 §24, Part 3 §12.6) for an RSA 2048 EK of
/// the default template (nameAlg SHA-256, AES-128-CFB): wraps a fresh 32-byte secret for the
/// object named `ak`.
pub fn make_credential(
    ek: &EkPublicKey,
    ak: &AkPublic,
) -> Result<(CredentialChallenge, CredentialCheck), EndorsementError> {
    let name = ak_name(ak)?;
    let mut secret = Zeroizing::new([0u8; 32]);
    let mut seed = Zeroizing::new([0u8; 32]);
    let rng = aws_lc_rs::rand::SystemRandom::new();
    aws_lc_rs::rand::SecureRandom::fill(&rng, secret.as_mut_slice())
        .map_err(|_| EndorsementError::Crypto("random"))?;
    aws_lc_rs::rand::SecureRandom::fill(&rng, seed.as_mut_slice())
        .map_err(|_| EndorsementError::Crypto("random"))?;
    let challenge = wrap_credential(ek, &name, secret.as_slice(), &seed)?;
    Ok((
        challenge,
        CredentialCheck {
            expected: secret,
            ek: ek.clone(),
        },
    ))
}

fn wrap_credential(
    ek: &EkPublicKey,
    name: &[u8],
    credential: &[u8],
    seed: &[u8; 32],
) -> Result<CredentialChallenge, EndorsementError> {
    use aws_lc_rs::cipher::{EncryptingKey, EncryptionContext, UnboundCipherKey, AES_128};
    use aws_lc_rs::iv::FixedLength;
    use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey, OAEP_SHA256_MGF1SHA256};

    // The seed, RSA-OAEP(SHA-256) encrypted to the EK with the label "IDENTITY\0".
    let key = PublicEncryptingKey::from_der(&ek.spki_der)
        .map_err(|_| EndorsementError::UnsupportedEkKey)?;
    let oaep = OaepPublicEncryptingKey::new(key).map_err(|_| EndorsementError::UnsupportedEkKey)?;
    let mut wrapped = vec![0u8; oaep.ciphertext_size()];
    let wrapped_len = oaep
        .encrypt(
            &OAEP_SHA256_MGF1SHA256,
            seed,
            &mut wrapped,
            Some(b"IDENTITY\0"),
        )
        .map_err(|_| EndorsementError::Crypto("RSA-OAEP"))?
        .len();
    wrapped.truncate(wrapped_len);

    // The credential as a TPM2B_DIGEST, AES-128-CFB encrypted (zero IV) under
    // KDFa(seed, "STORAGE", name).
    let sym = kdfa(seed, b"STORAGE", name, &[], 128)?;
    let len = u16::try_from(credential.len()).map_err(|_| EndorsementError::Crypto("length"))?;
    let mut enc_identity = Vec::with_capacity(2 + credential.len());
    enc_identity.extend_from_slice(&len.to_be_bytes());
    enc_identity.extend_from_slice(credential);
    let cipher = UnboundCipherKey::new(&AES_128, &sym)
        .and_then(EncryptingKey::cfb128)
        .map_err(|_| EndorsementError::Crypto("AES-CFB"))?;
    cipher
        .less_safe_encrypt(
            &mut enc_identity,
            EncryptionContext::Iv128(FixedLength::from([0u8; 16])),
        )
        .map_err(|_| EndorsementError::Crypto("AES-CFB"))?;

    // Outer integrity: HMAC-SHA-256 under KDFa(seed, "INTEGRITY") over encIdentity || name.
    let hmac_key = kdfa(seed, b"INTEGRITY", &[], &[], 256)?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&hmac_key)
        .map_err(|_| EndorsementError::Crypto("HMAC"))?;
    mac.update(&enc_identity);
    mac.update(name);
    let outer = mac.finalize().into_bytes();

    let mut id_object = Vec::with_capacity(2 + outer.len() + enc_identity.len());
    id_object.extend_from_slice(&[0x00, 0x20]);
    id_object.extend_from_slice(&outer);
    id_object.extend_from_slice(&enc_identity);
    Ok(CredentialChallenge {
        id_object: hex::encode(id_object),
        encrypted_secret: hex::encode(wrapped),
    })
}

/// KDFa with SHA-256 (SP 800-108 counter mode, TPM 2.0 Part 1 §11.4.10.2): `bits` bits of
/// `HMAC(key, i || label || 0 || context_u || context_v || bits)` for i = 1, 2, ...
fn kdfa(
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Result<Zeroizing<Vec<u8>>, EndorsementError> {
    let bytes = usize::try_from(bits / 8).map_err(|_| EndorsementError::Crypto("KDFa"))?;
    let mut out = Zeroizing::new(Vec::with_capacity(bytes + 32));
    let mut counter: u32 = 1;
    while out.len() < bytes {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .map_err(|_| EndorsementError::Crypto("KDFa"))?;
        mac.update(&counter.to_be_bytes());
        mac.update(label);
        if label.last() != Some(&0) {
            mac.update(&[0]);
        }
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        counter = counter
            .checked_add(1)
            .ok_or(EndorsementError::Crypto("KDFa"))?;
    }
    out.truncate(bytes);
    Ok(out)
}

/// A local TPM "manufacturer" for tests and the dev cluster: a CA of its own (made by
/// `swtpm_localca` on first use, in `dir`) that certifies the EK of every software TPM it
/// manufactures.
#[derive(Debug, Clone)]
pub struct LocalManufacturer {
    dir: PathBuf,
}

impl LocalManufacturer {
    /// Uses (or prepares) the CA directory `dir`.
    pub fn new(dir: &Path) -> Result<Self, EndorsementError> {
        let io = |_| EndorsementError::Manufacture(format!("cannot write {}", dir.display()));
        std::fs::create_dir_all(dir.join("ca")).map_err(io)?;
        let ca = dir.join("ca");
        std::fs::write(
            dir.join("localca.conf"),
            format!(
                "statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n",
                ca = ca.display()
            ),
        )
        .map_err(io)?;
        std::fs::write(
            dir.join("localca.options"),
            "--platform-manufacturer Bulkhead\n--platform-version 2.1\n--platform-model swtpm\n",
        )
        .map_err(io)?;
        std::fs::write(
            dir.join("swtpm_setup.conf"),
            format!(
                "create_certs_tool = swtpm_localca\ncreate_certs_tool_config = {d}/localca.conf\ncreate_certs_tool_options = {d}/localca.options\nactive_pcr_banks = sha256,sha384\n",
                d = dir.display()
            ),
        )
        .map_err(io)?;
        Ok(LocalManufacturer {
            dir: dir.to_path_buf(),
        })
    }

    /// Manufactures a TPM in the empty state directory `tpm_state`: new seeds, an RSA 2048 EK
    /// (and an ECC one) with certificates from this CA in NV, SHA-256 and SHA-384 PCR banks.
    pub fn manufacture(&self, tpm_state: &Path) -> Result<(), EndorsementError> {
        std::fs::create_dir_all(tpm_state)
            .map_err(|e| EndorsementError::Manufacture(format!("state dir: {e}")))?;
        let out = Command::new("swtpm_setup")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(tpm_state)
            .arg("--create-ek-cert")
            .arg("--create-platform-cert")
            .arg("--pcr-banks")
            .arg("sha256,sha384")
            .arg("--config")
            .arg(self.dir.join("swtpm_setup.conf"))
            .arg("--overwrite")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| EndorsementError::Manufacture(format!("swtpm_setup: {e}")))?;
        if !out.status.success() {
            return Err(EndorsementError::Manufacture(format!(
                "swtpm_setup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// The root CA certificate (PEM path): what a verifier trusts.
    pub fn root_cert(&self) -> PathBuf {
        self.dir.join("ca/swtpm-localca-rootca-cert.pem")
    }

    /// The issuing (intermediate) CA certificate (PEM path).
    pub fn issuer_cert(&self) -> PathBuf {
        self.dir.join("ca/issuercert.pem")
    }

    /// The trust a verifier of this manufacturer's TPMs holds (after one TPM was manufactured).
    pub fn trust(&self) -> Result<EkTrust, EndorsementError> {
        EkTrust::from_pem_files(&[self.root_cert()], &[self.issuer_cert()])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_matches_the_counter_mode_definition() {
        // 256 bits = one HMAC block; 384 bits = two, the second with counter 2.
        let one = kdfa(b"key", b"LABEL", b"u", b"v", 256).unwrap();
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"key").unwrap();
        mac.update(&1u32.to_be_bytes());
        mac.update(b"LABEL\0uv");
        mac.update(&256u32.to_be_bytes());
        assert_eq!(one.as_slice(), &mac.finalize().into_bytes()[..]);
        let two = kdfa(b"key", b"LABEL", b"u", b"v", 384).unwrap();
        assert_eq!(two.len(), 48);
        let short = kdfa(b"key", b"LABEL", b"u", b"v", 128).unwrap();
        assert_eq!(short.len(), 16);
        // The label's terminating zero is not doubled.
        assert_eq!(
            kdfa(b"k", b"STORAGE\0", b"", b"", 128).unwrap(),
            kdfa(b"k", b"STORAGE", b"", b"", 128).unwrap()
        );
    }

    #[test]
    fn garbage_certificates_are_typed_refusals() {
        let trust = EkTrust {
            roots: vec![vec![0x30, 0x00]],
            intermediates: vec![],
        };
        for bad in [&b""[..], &[0x30, 0x82, 0xff, 0xff][..], &[0u8; 64][..]] {
            assert!(matches!(
                verify_ek_certificate(bad, &trust, 1_800_000_000),
                Err(EndorsementError::Malformed(_))
            ));
        }
        assert_eq!(
            verify_ek_certificate(b"", &EkTrust::default(), 0),
            Err(EndorsementError::NoTrustAnchors)
        );
    }

    #[test]
    fn pem_with_garbage_is_refused() {
        let bad = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(pem_certificates(bad).is_err());
        assert!(pem_certificates(b"").unwrap().is_empty());
    }
}
