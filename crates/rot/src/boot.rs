//! The sealed host's boot chain (issue 17): firmware → UKI → kernel → initramfs, measured by
//! OVMF and the UKI's stub into the SHA-256 bank, plus the per-host configuration disk measured
//! by the image's PID 1 into PCR 23. A verifier demands the exact value of every PCR of the
//! image manifest — never "non-zero": some firmware paths boot without measuring and leave a
//! fixed PCR 4 — and refuses a mismatch naming the PCR. `scripts/build-host-image.sh` computes
//! the expected values of 4, 9, 11 and 12 from the image's parts by these rules.
//!
//! | PCR | measured by | what |
//! |---|---|---|
//! | 4 | firmware | boot-attempt action, separator, the UKI's Authenticode hash, then the kernel's |
//! | 9 | kernel EFI stub | its load options (UTF-16LE command line with NUL), then the initrd |
//! | 11 | UKI stub | each section's name and contents: `.linux`, `.osrel`, `.cmdline`, `.initrd` |
//! | 12 | UKI stub | a command line that *replaced* the UKI's (`-append`); zero when none did |
//! | 23 | `bulkhead-init` | SHA-256 of the configuration disk (resettable by software) |

use std::collections::BTreeMap;

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use sha2::{Digest as _, Sha256};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::structure_tags::AttestationType;
use tss_esapi::structures::{Attest, AttestInfo, PcrSelectionListBuilder, PcrSlot};
use tss_esapi::traits::UnMarshall;

use crate::tpm::AkPublic;

/// The PCRs a sealed host quotes, ascending.
pub const BOOT_PCRS: [u8; 5] = [4, 9, 11, 12, 23];
/// The PCR holding the configuration disk's measurement.
pub const CONFIG_PCR: u8 = 23;

// What a sealed host's attestation agent answers is a wire type, shared with the controller
// that relays it and the control plane that checks it.
pub use bulkhead_rot_proto::{BootEvidence, EVIDENCE_FORMAT};

/// The keys `scripts/build-host-image.sh` writes into the manifest of an image built for a
/// test: `tamper` (`BULKHEAD_HOST_TAMPER` flipped a byte) and `cmdline_override`
/// (`BULKHEAD_HOST_CMDLINE` replaced the command line).
pub const TEST_IMAGE_MARKERS: [&str; 2] = ["tamper", "cmdline_override"];

/// Exact SHA-256 PCR values a verifier demands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExpectedPcrs(pub BTreeMap<u8, [u8; 32]>);

/// Why boot evidence was refused. Codes are stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootChainError {
    #[error("the evidence is malformed")]
    Malformed,
    #[error("the quote was signed by another attestation key than the one enrolled for this host")]
    UnknownAk,
    #[error("the quote's signature does not verify under the attestation key")]
    BadSignature,
    #[error("the quote is not over this verifier's nonce (replayed or for someone else)")]
    NonceMismatch,
    #[error("the quote does not cover exactly SHA-256 PCRs 4, 9, 11, 12 and 23")]
    WrongSelection,
    #[error("the reported PCR values do not hash to the quoted PCR digest")]
    ValuesDoNotMatchQuote,
    #[error("PCR {pcr} is {got}, the image manifest says {expected}")]
    PcrMismatch {
        /// The first PCR (ascending) that differs.
        pcr: u8,
        /// Every PCR that differs.
        all: Vec<u8>,
        expected: String,
        got: String,
    },
    #[error("the image manifest has no expected value for PCR {0}")]
    NoExpectation(u8),
    /// The manifest marks its image as built for a test (`tamper`: a flipped byte;
    /// `cmdline_override`: a replaced command line): never an image to expect.
    #[error("the image manifest marks a test image ({0}): it is never an expectation")]
    TestImage(&'static str),
}

impl BootChainError {
    pub fn code(&self) -> &'static str {
        match self {
            BootChainError::Malformed => "boot_malformed",
            BootChainError::UnknownAk => "boot_unknown_ak",
            BootChainError::BadSignature => "boot_bad_signature",
            BootChainError::NonceMismatch => "boot_nonce_mismatch",
            BootChainError::WrongSelection => "boot_wrong_pcr_selection",
            BootChainError::ValuesDoNotMatchQuote => "boot_values_not_quoted",
            BootChainError::PcrMismatch { .. } => "boot_pcr_mismatch",
            BootChainError::NoExpectation(_) => "boot_no_expectation",
            BootChainError::TestImage(_) => "boot_test_image",
        }
    }
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok().and_then(|v| v.try_into().ok())
}

impl ExpectedPcrs {
    /// Reads `expected_pcrs` (`{"4": "<64 hex>", ...}`) of an image manifest (JSON). A
    /// manifest carrying a test-image marker ([`TEST_IMAGE_MARKERS`], whatever its value) is
    /// refused: a tampered image's own manifest must never become the control plane's or the
    /// KMS's expectation.
    pub fn from_manifest(manifest: &[u8]) -> Result<Self, BootChainError> {
        let v: serde_json::Value =
            serde_json::from_slice(manifest).map_err(|_| BootChainError::Malformed)?;
        if let Some(marker) = TEST_IMAGE_MARKERS.iter().find(|k| v.get(**k).is_some()) {
            return Err(BootChainError::TestImage(marker));
        }
        let obj = v
            .get("expected_pcrs")
            .and_then(|e| e.as_object())
            .ok_or(BootChainError::Malformed)?;
        let mut out = BTreeMap::new();
        for (k, val) in obj {
            let pcr: u8 = k.parse().map_err(|_| BootChainError::Malformed)?;
            let d = val
                .as_str()
                .and_then(hex32)
                .ok_or(BootChainError::Malformed)?;
            if pcr > 23 {
                return Err(BootChainError::Malformed);
            }
            out.insert(pcr, d);
        }
        Ok(ExpectedPcrs(out))
    }

    /// A sealed host's expectations: the image manifest's PCRs and PCR 23 from its
    /// configuration disk's SHA-256; every PCR of [`BOOT_PCRS`] must then have a value.
    pub fn for_host(manifest: &[u8], config_sha256: &[u8; 32]) -> Result<Self, BootChainError> {
        let e = Self::from_manifest(manifest)?.with_config(config_sha256);
        match BOOT_PCRS.iter().find(|p| !e.0.contains_key(p)) {
            Some(p) => Err(BootChainError::NoExpectation(*p)),
            None => Ok(e),
        }
    }

    /// Adds this host's PCR 23: one extend of the zero PCR with the configuration disk's digest.
    pub fn with_config(mut self, config_sha256: &[u8; 32]) -> Self {
        self.0
            .insert(CONFIG_PCR, extend_sha256(&[0; 32], config_sha256));
        self
    }
}

/// `PCR := SHA-256(PCR || digest)`.
pub fn extend_sha256(pcr: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(pcr);
    h.update(digest);
    h.finalize().into()
}

/// PCR 11 as systemd-stub 252 leaves it: for each UKI section present, in the order `.linux`,
/// `.osrel`, `.cmdline`, `.initrd`, the SHA-256 of its name with the NUL byte, then of its
/// contents, extended from zero.
pub fn uki_pcr11(sections: &[(&str, &[u8])]) -> [u8; 32] {
    let mut pcr = [0u8; 32];
    for (name, data) in sections {
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        pcr = extend_sha256(&pcr, &Sha256::digest(&n).into());
        pcr = extend_sha256(&pcr, &Sha256::digest(data).into());
    }
    pcr
}

/// Checks boot evidence against the host's enrolled AK, the nonce this verifier issued and the
/// exact expected values; every PCR in [`BOOT_PCRS`] must have an expectation.
pub fn verify_boot(
    evidence: &BootEvidence,
    enrolled_ak: &AkPublic,
    nonce: &[u8; 32],
    expected: &ExpectedPcrs,
) -> Result<(), BootChainError> {
    if evidence.format != EVIDENCE_FORMAT {
        return Err(BootChainError::Malformed);
    }
    if &evidence.ak != enrolled_ak {
        return Err(BootChainError::UnknownAk);
    }
    let attest_raw = hex::decode(&evidence.quote.attest).map_err(|_| BootChainError::Malformed)?;
    let sig = hex::decode(&evidence.quote.signature).map_err(|_| BootChainError::Malformed)?;
    let ak = enrolled_ak.sec1().map_err(|_| BootChainError::Malformed)?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &ak)
        .verify(&attest_raw, &sig)
        .map_err(|_| BootChainError::BadSignature)?;
    let attest = Attest::unmarshall(&attest_raw).map_err(|_| BootChainError::Malformed)?;
    if attest.attestation_type() != AttestationType::Quote {
        return Err(BootChainError::Malformed);
    }
    if attest.extra_data().value() != nonce {
        return Err(BootChainError::NonceMismatch);
    }
    let AttestInfo::Quote { info } = attest.attested() else {
        return Err(BootChainError::Malformed);
    };
    let slots = BOOT_PCRS
        .iter()
        .map(|&p| PcrSlot::try_from(1u32 << p).map_err(|_| BootChainError::Malformed))
        .collect::<Result<Vec<_>, _>>()?;
    let want = PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|_| BootChainError::Malformed)?;
    if info.pcr_selection() != &want {
        return Err(BootChainError::WrongSelection);
    }
    // The reported values, in selection order, must hash to the digest the TPM signed.
    if evidence.pcrs.keys().copied().collect::<Vec<_>>() != BOOT_PCRS {
        return Err(BootChainError::WrongSelection);
    }
    let mut values = Vec::with_capacity(BOOT_PCRS.len());
    let mut h = Sha256::new();
    for p in BOOT_PCRS {
        let v = evidence
            .pcrs
            .get(&p)
            .and_then(|s| hex32(s))
            .ok_or(BootChainError::Malformed)?;
        h.update(v);
        values.push((p, v));
    }
    let digest: [u8; 32] = h.finalize().into();
    if digest.as_slice() != info.pcr_digest().value() {
        return Err(BootChainError::ValuesDoNotMatchQuote);
    }
    let mut all = Vec::new();
    let mut first = None;
    for (p, got) in values {
        let want = expected.0.get(&p).ok_or(BootChainError::NoExpectation(p))?;
        if &got != want {
            all.push(p);
            if first.is_none() {
                first = Some((p, hex::encode(want), hex::encode(got)));
            }
        }
    }
    match first {
        None => Ok(()),
        Some((pcr, expected, got)) => Err(BootChainError::PcrMismatch {
            pcr,
            all,
            expected,
            got,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn manifest_expectations_parse_and_refuse() {
        let m = br#"{"expected_pcrs":{"4":"0000000000000000000000000000000000000000000000000000000000000001","12":"0000000000000000000000000000000000000000000000000000000000000000"}}"#;
        let e = ExpectedPcrs::from_manifest(m).unwrap();
        assert_eq!(e.0.len(), 2);
        assert_eq!(e.0[&4][31], 1);
        let e = e.with_config(&[7; 32]);
        assert_eq!(e.0[&23], extend_sha256(&[0; 32], &[7; 32]));
        assert_eq!(
            ExpectedPcrs::from_manifest(b"{}"),
            Err(BootChainError::Malformed)
        );
        assert_eq!(
            ExpectedPcrs::for_host(m, &[7; 32]),
            Err(BootChainError::NoExpectation(9))
        );
        let full = br#"{"expected_pcrs":{"4":"0000000000000000000000000000000000000000000000000000000000000001","9":"0000000000000000000000000000000000000000000000000000000000000001","11":"0000000000000000000000000000000000000000000000000000000000000001","12":"0000000000000000000000000000000000000000000000000000000000000000"}}"#;
        assert_eq!(
            ExpectedPcrs::for_host(full, &[7; 32]).map(|e| e.0.len()),
            Ok(5)
        );
        assert_eq!(
            ExpectedPcrs::from_manifest(br#"{"expected_pcrs":{"24":"00"}}"#),
            Err(BootChainError::Malformed)
        );
    }

    #[test]
    fn test_image_manifests_are_refused() {
        let pcrs = r#""expected_pcrs":{"4":"0000000000000000000000000000000000000000000000000000000000000001"}"#;
        let plain = format!("{{{pcrs}}}");
        assert!(ExpectedPcrs::from_manifest(plain.as_bytes()).is_ok());
        for (extra, marker) in [
            (
                r#""tamper":"kernel: bzImage byte 0x1 0x62 -> 0x42""#,
                "tamper",
            ),
            (
                r#""cmdline_override":true,"cmdline":"x""#,
                "cmdline_override",
            ),
            // Any value marks it, even one that looks like "no".
            (r#""cmdline_override":false"#, "cmdline_override"),
            (r#""tamper":null"#, "tamper"),
        ] {
            let m = format!("{{{pcrs},{extra}}}");
            let e = ExpectedPcrs::from_manifest(m.as_bytes()).unwrap_err();
            assert_eq!(e, BootChainError::TestImage(marker), "{m}");
            assert_eq!(e.code(), "boot_test_image");
            assert_eq!(
                ExpectedPcrs::for_host(m.as_bytes(), &[7; 32]),
                Err(BootChainError::TestImage(marker))
            );
        }
    }

    #[test]
    fn pcr11_changes_with_any_section_byte() {
        let a = uki_pcr11(&[
            (".linux", b"k"),
            (".osrel", b"o"),
            (".cmdline", b"c"),
            (".initrd", b"i"),
        ]);
        let b = uki_pcr11(&[
            (".linux", b"k"),
            (".osrel", b"o"),
            (".cmdline", b"C"),
            (".initrd", b"i"),
        ]);
        assert_ne!(a, b);
        assert_ne!(a, [0; 32]);
    }
}
