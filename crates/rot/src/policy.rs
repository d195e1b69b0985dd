//! The attestation policy file read by the services that verify hosts (the KMS, the control
//! plane): which hosts are enrolled (their attestation key and host key, from the provisioning
//! ceremony) and which signed releases' measurements are acceptable. [`load_verifier`] turns it
//! into the [`Verifier`] they run.
//!
//! `bulkhead-kms --attest-config FILE` (dev: `STATE_DIR/attest.json` when present) turns it on:
//! from then on `DecryptForHost` needs the host's fresh quote over a nonce from `Challenge`
//! (see `crate::attest::Verifier` for the checks, in order), and the volume key is sealed
//! to the host key of the attested enrolment.
//!
//! ```json
//! { "environment": "dev", "pcr": 23, "trust_root": "trust-root.json",
//!   "releases": ["releases/v1.json"], "enrollments": ["enrollments/host-1.json"] }
//! ```
//!
//! Relative paths are relative to the file. Every release must carry the trust root's threshold
//! of signatures and be for this environment; expiry is not checked here (an ageing release
//! must not stop a fleet: the deployment service checks it when the release is rolled out).
//!
//! Sealed hosts (issue 17) are listed under `"sealed"`, one file each ([`SealedEnrollmentFile`]:
//! the host, its environment, its EK-certified AK, the host image's `manifest.json`, its
//! configuration disk's SHA-256 and its host key). Such a host gets a key only with boot
//! evidence whose every boot PCR is exactly what that manifest and disk give
//! (`crate::attest::Verifier::verify_boot_for_instance`, which runs
//! `crate::boot::verify_boot`).

use std::path::{Path, PathBuf};

use crate::attest::{Enrollment, SealedEnrollment, Verifier};
use crate::boot::ExpectedPcrs;
use crate::measure::Environment;
use crate::release::{verify_release, ReleasePolicy, SignedRelease, TrustRoot};
use crate::tpm::{AkPublic, MeasurePcr};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestConfig {
    pub environment: String,
    pub pcr: u8,
    pub trust_root: PathBuf,
    pub releases: Vec<PathBuf>,
    pub enrollments: Vec<PathBuf>,
    /// Sealed hosts' enrolments ([`SealedEnrollmentFile`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sealed: Vec<PathBuf>,
}

/// One sealed host's enrolment at the KMS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedEnrollmentFile {
    pub host: String,
    pub environment: String,
    /// Its attestation key (uncompressed P-256 point, hex), certified against its TPM's EK
    /// before it was enrolled.
    pub ak: String,
    /// The host image's `manifest.json` (its `expected_pcrs`), relative to this file.
    pub image_manifest: PathBuf,
    /// SHA-256 of the host's configuration disk, hex (PCR 23).
    pub config_sha256: String,
    /// The 38-byte host public key file, hex.
    pub host_public: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AttestConfigError {
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: not the expected JSON: {1}")]
    Syntax(PathBuf, serde_json::Error),
    #[error("{0}: {1}")]
    Rot(PathBuf, crate::RotError),
    #[error("{0}: release refused: {1}")]
    Release(PathBuf, crate::release::ReleaseError),
    #[error("{0}: enrolment is for host {1}, already enrolled")]
    DuplicateHost(PathBuf, String),
    #[error("{0}: config_sha256 is not 64 hex digits")]
    ConfigDigest(PathBuf),
    #[error("{0}: boot expectations: {1}")]
    Boot(PathBuf, crate::boot::BootChainError),
}

fn read(p: &Path) -> Result<Vec<u8>, AttestConfigError> {
    std::fs::read(p).map_err(|e| AttestConfigError::Read(p.to_path_buf(), e))
}

/// Reads the configuration and everything it names; returns the verifier the KMS (and the
/// control plane) runs.
pub fn load_verifier(path: &Path) -> Result<Verifier, AttestConfigError> {
    let base = path.parent().unwrap_or(Path::new("."));
    let at = |p: &PathBuf| base.join(p);
    let cfg: AttestConfig = serde_json::from_slice(&read(path)?)
        .map_err(|e| AttestConfigError::Syntax(path.to_path_buf(), e))?;
    let rot = |e| AttestConfigError::Rot(path.to_path_buf(), e);
    let env = Environment::parse(&cfg.environment).map_err(rot)?;
    let pcr = MeasurePcr::new(cfg.pcr).map_err(rot)?;
    let tr = at(&cfg.trust_root);
    let root = TrustRoot::parse(&read(&tr)?).map_err(|e| AttestConfigError::Rot(tr.clone(), e))?;
    let mut v = Verifier::new(env.clone(), pcr);
    for r in &cfg.releases {
        let p = at(r);
        let signed = SignedRelease::parse(&read(&p)?)
            .map_err(|e| AttestConfigError::Release(p.clone(), e))?;
        let m = verify_release(
            &signed,
            &ReleasePolicy {
                root: &root,
                environment: &env,
                current_version: 0,
                now: 0,
            },
        )
        .map_err(|e| AttestConfigError::Release(p.clone(), e))?;
        tracing::info!(version = m.version, pcr = %m.expected_pcr, "release accepted for attestation");
        v.accept_release(&m);
    }
    for e in &cfg.enrollments {
        let p = at(e);
        let en: Enrollment = serde_json::from_slice(&read(&p)?)
            .map_err(|err| AttestConfigError::Syntax(p.clone(), err))?;
        if v.enrollment(&en.host).is_some() {
            return Err(AttestConfigError::DuplicateHost(p, en.host));
        }
        tracing::info!(host = %en.host, environment = %en.environment, "host enrolled");
        v.enroll(en);
    }
    for e in &cfg.sealed {
        let p = at(e);
        let en: SealedEnrollmentFile = serde_json::from_slice(&read(&p)?)
            .map_err(|err| AttestConfigError::Syntax(p.clone(), err))?;
        if v.is_enrolled(&en.host) {
            return Err(AttestConfigError::DuplicateHost(p, en.host));
        }
        let digest: [u8; 32] = hex::decode(&en.config_sha256)
            .ok()
            .and_then(|d| d.try_into().ok())
            .ok_or_else(|| AttestConfigError::ConfigDigest(p.clone()))?;
        let manifest = p
            .parent()
            .unwrap_or(Path::new("."))
            .join(&en.image_manifest);
        let expected = ExpectedPcrs::for_host(&read(&manifest)?, &digest)
            .map_err(|err| AttestConfigError::Boot(manifest.clone(), err))?;
        let environment = Environment::parse(&en.environment).map_err(rot)?;
        tracing::info!(host = %en.host, environment = %en.environment, "sealed host enrolled");
        v.enroll_sealed(SealedEnrollment {
            host: en.host,
            environment,
            ak: AkPublic(en.ak.to_ascii_lowercase()),
            expected,
            host_public: en.host_public,
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A policy directory: a trust root, one sealed enrolment, its image manifest.
    fn policy(dir: &Path, manifest: &str, config_sha256: &str) -> PathBuf {
        let key = crate::release::ReleaseKey::generate().unwrap();
        let root = TrustRoot::new(1, vec![key.public()]).unwrap();
        std::fs::write(dir.join("root.json"), serde_json::to_vec(&root).unwrap()).unwrap();
        std::fs::write(dir.join("manifest.json"), manifest).unwrap();
        let sealed = SealedEnrollmentFile {
            host: "host-1".into(),
            environment: "dev".into(),
            ak: format!("04{}", "AB".repeat(64)),
            image_manifest: "manifest.json".into(),
            config_sha256: config_sha256.into(),
            host_public: "00".into(),
        };
        std::fs::write(
            dir.join("sealed-1.json"),
            serde_json::to_vec(&sealed).unwrap(),
        )
        .unwrap();
        let cfg = AttestConfig {
            environment: "dev".into(),
            pcr: 23,
            trust_root: "root.json".into(),
            releases: Vec::new(),
            enrollments: Vec::new(),
            sealed: vec!["sealed-1.json".into()],
        };
        let p = dir.join("attest.json");
        std::fs::write(&p, serde_json::to_vec(&cfg).unwrap()).unwrap();
        p
    }

    #[test]
    fn sealed_enrolments_load_with_every_boot_pcr_or_not_at_all() {
        let z = "00".repeat(32);
        let full = format!(r#"{{"expected_pcrs":{{"4":"{z}","9":"{z}","11":"{z}","12":"{z}"}}}}"#);
        let dir = tempfile::tempdir().unwrap();
        let v = load_verifier(&policy(dir.path(), &full, &"cd".repeat(32))).unwrap();
        assert!(v.is_enrolled("host-1"));
        assert!(
            v.enrollment("host-1").is_none(),
            "not a host of host processes"
        );
        // A manifest without PCR 11: the KMS does not start (it would accept any PCR 11).
        let partial = format!(r#"{{"expected_pcrs":{{"4":"{z}","9":"{z}","12":"{z}"}}}}"#);
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_verifier(&policy(dir.path(), &partial, &"cd".repeat(32))),
            Err(AttestConfigError::Boot(
                _,
                crate::boot::BootChainError::NoExpectation(11)
            ))
        ));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_verifier(&policy(dir.path(), &full, "cd")),
            Err(AttestConfigError::ConfigDigest(_))
        ));
    }
}
