//! `bulkhead-rot`: the host's root of trust and change management (Nitro Security Chip, secure
//! boot and deployment in the Nitro design; claim 7).
//!
//! - [`swtpm`]: a software TPM harness for tests, benchmarks and `--dev` hosts.
//! - [`tpm`]: the TPM 2.0 operations Bulkhead needs (tss-esapi): PCR extend/read, AK, seal, quote.
//! - [`measure`]: measured start and its JSON-lines event log, replayable by a verifier.
//! - [`identity`]: the host identity (an X25519 host key in `bulkhead-sealing`'s format) sealed to
//!   the PCR value; [`identity::HostHealth`] says whether the host may take customer work and why.
//! - [`agent`]: the host's attestation agent (quotes over verifier nonces on a unix socket).
//! - [`boot`]: the sealed host image's boot chain (PCRs 4/9/11/12 + 23), checked against exact
//!   expected values with a refusal naming the PCR.
//! - [`attest`]: quotes with verifier nonces; the [`attest::Verifier`] used by the control plane
//!   and the KMS (nonce one-time use, enrolled AK, environment, PCR = signed release's value).
//! - [`policy`]: the attestation policy file (trust root, releases, enrolments) both verifiers
//!   load into an [`attest::Verifier`] ([`policy::load_verifier`]).
//! - [`endorsement`]: the AK proven to live in a TPM whose EK chains to a trusted manufacturer
//!   (EK certificate chain + TPM2_MakeCredential/ActivateCredential).
//! - [`release`]: threshold-signed release manifests (2-of-3 Ed25519, TUF-like, small).
//! - [`deploy`]: the deployment service (waves, health + attestation, automatic rollback, audit,
//!   deployer token).
//!
//! See `docs/rot.md` for formats, PCR choice and what production must change.

pub mod agent;
pub mod attest;
pub mod boot;
pub mod deploy;
pub mod endorsement;
pub mod host;
pub mod identity;
pub mod measure;
pub mod policy;
pub mod release;
pub mod supervise;
pub mod swtpm;
pub mod tpm;

use std::path::PathBuf;

/// Everything that can go wrong in the root of trust. Matchable; the variants of the nested
/// enums are the refusals callers act on.
#[derive(Debug, thiserror::Error)]
pub enum RotError {
    #[error("swtpm binary not found on PATH")]
    SwtpmMissing,
    #[error("swtpm: {0}")]
    Swtpm(#[source] std::io::Error),
    #[error("swtpm did not start: {0}")]
    SwtpmStart(&'static str),
    #[error("TPM: {0}")]
    Tpm(#[source] tss_esapi::Error),
    #[error("TPM refused to unseal (PCR policy not satisfied: something measured changed): {0}")]
    UnsealRefused(#[source] tss_esapi::Error),
    #[error("PCR {0} is not a valid PCR index (0..=23)")]
    BadPcr(u8),
    #[error("PCR {pcr} was not zero before measured start (already measured, or tampered)")]
    PcrNotFresh { pcr: u8 },
    #[error("PCR value read back does not match the event log's replay")]
    LogMismatch,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    EventLog(#[from] measure::EventLogError),
    #[error(transparent)]
    Release(#[from] release::ReleaseError),
    #[error(transparent)]
    Attest(#[from] attest::AttestError),
    #[error(transparent)]
    Deploy(#[from] deploy::DeployError),
    #[error("host key: {0}")]
    Sealing(#[from] bulkhead_sealing::SealingError),
}

impl RotError {
    /// A stable code for CLIs and audit records.
    pub fn code(&self) -> &'static str {
        match self {
            RotError::Release(e) => e.code(),
            RotError::Attest(e) => e.code(),
            RotError::Deploy(e) => e.code(),
            RotError::UnsealRefused(_) => "unseal_refused",
            RotError::SwtpmMissing | RotError::Swtpm(_) | RotError::SwtpmStart(_) => "swtpm",
            RotError::Tpm(_) => "tpm_error",
            RotError::EventLog(_) => "bad_event_log",
            RotError::Io { .. } => "io_error",
            _ => "rot_error",
        }
    }

    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> RotError + '_ {
        move |source| RotError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Seconds since the Unix epoch.
pub use bulkhead_tokens::clock::unix_now;

impl From<bulkhead_rot_proto::MalformedKey> for RotError {
    fn from(_: bulkhead_rot_proto::MalformedKey) -> Self {
        RotError::Malformed("attestation key")
    }
}
