//! The sealed host identity and the host's health verdict.
//!
//! The identity is a `bulkhead-sealing` [`HostKey`] (X25519, the key the KMS seals volume keys
//! to and the block card opens them with). Its 70-byte host key file encoding is sealed in the
//! TPM under `PolicyPCR(SHA-384:[pcr] = value)`: it unseals only while the measurement PCR holds
//! exactly the value of a signed release. If anything measured changed, the TPM refuses, the host
//! has no identity, and [`HostHealth`] says it takes no customer work, and why.

use std::path::Path;

use bulkhead_sealing::{HostKey, HostPublicKey};

use crate::tpm::{MeasurePcr, SealedBlob, Sha384Digest, Tpm};
use crate::RotError;

/// The sealed identity as stored on the host's disk (useless off this TPM and these PCRs).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedIdentity {
    pub blob: SealedBlob,
    /// The 38-byte host public key file, hex (what the KMS seals to; enrolled with the AK).
    pub host_public: String,
}

impl SealedIdentity {
    pub fn host_public(&self) -> Result<HostPublicKey, RotError> {
        let raw =
            hex::decode(&self.host_public).map_err(|_| RotError::Malformed("host public key"))?;
        Ok(HostPublicKey::from_file_bytes(&raw)?)
    }

    pub fn read(path: &Path) -> Result<Self, RotError> {
        let raw = std::fs::read(path).map_err(RotError::io(path))?;
        serde_json::from_slice(&raw).map_err(|_| RotError::Malformed("sealed identity file"))
    }

    pub fn write(&self, path: &Path) -> Result<(), RotError> {
        let text =
            serde_json::to_vec_pretty(self).map_err(|_| RotError::Malformed("sealed identity"))?;
        write_private(path, &text)
    }
}

/// Writes a file with mode 0600 via a temporary file and rename.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), RotError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(RotError::io(&tmp))?;
    f.write_all(bytes).map_err(RotError::io(&tmp))?;
    f.sync_all().map_err(RotError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(RotError::io(path))
}

/// Creates a new host key and seals it to `pcr` = `value` (the signed release's value).
pub fn create_identity(
    tpm: &mut Tpm,
    pcr: MeasurePcr,
    value: &Sha384Digest,
) -> Result<(HostKey, SealedIdentity), RotError> {
    let key = HostKey::generate()?;
    let sealed = seal_identity(tpm, &key, pcr, value)?;
    Ok((key, sealed))
}

/// Seals an existing host key to `pcr` = `value` (re-sealing before an update).
pub fn seal_identity(
    tpm: &mut Tpm,
    key: &HostKey,
    pcr: MeasurePcr,
    value: &Sha384Digest,
) -> Result<SealedIdentity, RotError> {
    let file = key.to_file_bytes()?;
    let blob = tpm.seal(pcr, value, file.as_ref())?;
    Ok(SealedIdentity {
        blob,
        host_public: hex::encode(key.public().to_file_bytes()),
    })
}

/// Unseals the host key. Fails with [`RotError::UnsealRefused`] if the PCR differs.
pub fn unseal_identity(tpm: &mut Tpm, sealed: &SealedIdentity) -> Result<HostKey, RotError> {
    let raw = tpm.unseal(&sealed.blob)?;
    let key = HostKey::from_file_bytes(&raw)?;
    if key.public() != &sealed.host_public()? {
        return Err(RotError::Malformed(
            "unsealed key does not match its public half",
        ));
    }
    Ok(key)
}

/// Why a host refuses customer work. Codes are stable.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum HealthReason {
    /// No identity has been provisioned (or it was cleared for re-provisioning).
    NotProvisioned,
    /// The installed release failed its signature/expiry/rollback check.
    ReleaseRejected { detail: String },
    /// An installed file differs from the signed manifest (dropped by hand, corrupted).
    ArtefactMismatch { detail: String },
    /// Measured start itself failed (TPM error, PCR not fresh).
    MeasuredStartFailed { detail: String },
    /// The TPM refused to unseal the identity: the PCR is not the sealed value.
    UnsealFailed { detail: String },
    /// The PCR value is not the one the installed release states.
    MeasurementMismatch { expected: String, actual: String },
    /// A service of the release failed its self-test.
    ServiceUnhealthy { detail: String },
}

impl HealthReason {
    pub fn code(&self) -> &'static str {
        match self {
            HealthReason::NotProvisioned => "not_provisioned",
            HealthReason::ReleaseRejected { .. } => "release_rejected",
            HealthReason::ArtefactMismatch { .. } => "artefact_mismatch",
            HealthReason::MeasuredStartFailed { .. } => "measured_start_failed",
            HealthReason::UnsealFailed { .. } => "unseal_failed",
            HealthReason::MeasurementMismatch { .. } => "measurement_mismatch",
            HealthReason::ServiceUnhealthy { .. } => "service_unhealthy",
        }
    }
}

/// The verdict a host's health API serves (the controller exposes it as JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostHealth {
    pub host: String,
    pub environment: String,
    /// Only `true` when the identity unsealed and nothing else is wrong.
    pub accepts_customer_work: bool,
    pub release_version: Option<u64>,
    /// The measurement PCR after measured start, hex.
    pub pcr_value: Option<String>,
    pub reasons: Vec<HealthReason>,
}

impl HostHealth {
    /// One line for logs and CLI output.
    pub fn summary(&self) -> String {
        if self.accepts_customer_work {
            let pcr = self.pcr_value.as_deref().unwrap_or("");
            format!(
                "{}: healthy, release v{}, measurement PCR {}…",
                self.host,
                self.release_version.unwrap_or(0),
                pcr.get(..16).unwrap_or(pcr)
            )
        } else {
            let why: Vec<String> = self
                .reasons
                .iter()
                .map(|r| match r {
                    HealthReason::NotProvisioned => r.code().to_string(),
                    HealthReason::ReleaseRejected { detail }
                    | HealthReason::ArtefactMismatch { detail }
                    | HealthReason::MeasuredStartFailed { detail }
                    | HealthReason::UnsealFailed { detail }
                    | HealthReason::ServiceUnhealthy { detail } => {
                        format!("{}: {detail}", r.code())
                    }
                    HealthReason::MeasurementMismatch { expected, actual } => {
                        format!("{}: expected {expected}, got {actual}", r.code())
                    }
                })
                .collect();
            format!("{}: REFUSES customer work: {}", self.host, why.join("; "))
        }
    }
}
