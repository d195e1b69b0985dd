//! Attestation policy of the KMS: which hosts are enrolled (their attestation key and host key,
//! from the provisioning ceremony) and which signed releases' measurements are acceptable.
//!
//! `bulkhead-kms --attest-config FILE` (dev: `STATE_DIR/attest.json` when present) turns it on:
//! from then on `DecryptForHost` needs the host's fresh quote over a nonce from `Challenge`
//! (see `bulkhead_rot::attest::Verifier` for the checks, in order), and the volume key is sealed
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

use std::path::{Path, PathBuf};

use bulkhead_rot::attest::{Enrollment, Verifier};
use bulkhead_rot::measure::Environment;
use bulkhead_rot::release::{verify_release, ReleasePolicy, SignedRelease, TrustRoot};
use bulkhead_rot::tpm::MeasurePcr;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestConfig {
    pub environment: String,
    pub pcr: u8,
    pub trust_root: PathBuf,
    pub releases: Vec<PathBuf>,
    pub enrollments: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AttestConfigError {
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: not the expected JSON: {1}")]
    Syntax(PathBuf, serde_json::Error),
    #[error("{0}: {1}")]
    Rot(PathBuf, bulkhead_rot::RotError),
    #[error("{0}: release refused: {1}")]
    Release(PathBuf, bulkhead_rot::release::ReleaseError),
    #[error("{0}: enrolment is for host {1}, already enrolled")]
    DuplicateHost(PathBuf, String),
}

fn read(p: &Path) -> Result<Vec<u8>, AttestConfigError> {
    std::fs::read(p).map_err(|e| AttestConfigError::Read(p.to_path_buf(), e))
}

/// Reads the configuration and everything it names; returns the verifier the KMS runs.
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
    Ok(v)
}
