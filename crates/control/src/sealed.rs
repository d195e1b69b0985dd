//! Sealed hosts (issue 17): hosts booted from the host image (`make host-image`) under
//! firmware that measures it. Such a host is attested by its whole boot chain — firmware →
//! UKI → kernel → initramfs (which holds every Bulkhead binary it runs) and its configuration
//! disk — with [`bulkhead_rot::boot::verify_boot`]: a fresh nonce from this control plane, the
//! host's quote over SHA-256 PCRs 4, 9, 11, 12 and 23 (relayed by its controller), and the
//! *exact* values the image manifest computed at build time plus PCR 23 from this host's
//! configuration disk. Nothing is recorded from a boot; one byte of another image, kernel,
//! initramfs or command line moves a PCR and the host is refused (`boot_pcr_mismatch`, alert
//! `host_attestation_failed`), gets no instances and stays refused until it attests again.
//!
//! A sealed host is attested when polled (so the operator view shows the result without any
//! placement) and again by the scheduler before it places anything there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bulkhead_controller_proto::{calls, AttestRequest};
use bulkhead_rot::boot::{verify_boot, BootChainError, ExpectedPcrs, BOOT_PCRS};
use bulkhead_rot::tpm::AkPublic;
use bulkhead_rot_proto::HostEvidence;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::repo::HostRow;
use crate::service::{lock, ControlPlane};
use crate::ControlError;

/// A sealed host's entry in the control plane's configuration (`[hosts.sealed]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedHostConfig {
    /// The host image's `manifest.json` (its `expected_pcrs`: 4, 9, 11 and 12).
    pub image_manifest: PathBuf,
    /// SHA-256 of this host's configuration disk, hex (what PID 1 extends into PCR 23).
    pub config_sha256: String,
    /// The host's enrolled attestation key (uncompressed SEC1 P-256 point, hex).
    pub ak: String,
}

/// Why a sealed host's policy could not be loaded (the control plane does not start).
#[derive(Debug, thiserror::Error)]
pub enum SealedConfigError {
    #[error("cannot read the image manifest {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("image manifest {0}: {1}")]
    Manifest(PathBuf, BootChainError),
    #[error("the image manifest {0} has no expected value for PCR {1}")]
    Incomplete(PathBuf, u8),
    #[error("config_sha256 is not 64 hex digits")]
    ConfigDigest,
    #[error("ak is not an uncompressed P-256 point in hex")]
    Ak,
}

/// What a sealed host must prove: its enrolled AK and every boot PCR's exact value.
#[derive(Debug, Clone)]
pub struct SealedPolicy {
    pub ak: AkPublic,
    pub expected: ExpectedPcrs,
}

impl SealedPolicy {
    pub fn load(c: &SealedHostConfig) -> Result<SealedPolicy, SealedConfigError> {
        let m = &c.image_manifest;
        let bytes = std::fs::read(m).map_err(|e| SealedConfigError::Read(m.clone(), e))?;
        Self::from_parts(m, &bytes, &c.config_sha256, &c.ak)
    }

    fn from_parts(
        path: &Path,
        manifest: &[u8],
        config_sha256: &str,
        ak: &str,
    ) -> Result<SealedPolicy, SealedConfigError> {
        let from_image = ExpectedPcrs::from_manifest(manifest)
            .map_err(|e| SealedConfigError::Manifest(path.to_path_buf(), e))?;
        let digest: [u8; 32] = hex::decode(config_sha256)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(SealedConfigError::ConfigDigest)?;
        let expected = from_image.with_config(&digest);
        for p in BOOT_PCRS {
            if !expected.0.contains_key(&p) {
                return Err(SealedConfigError::Incomplete(path.to_path_buf(), p));
            }
        }
        let ak = AkPublic(ak.to_ascii_lowercase());
        match ak.sec1() {
            Ok(b) if b.len() == 65 && b.first() == Some(&4) => {}
            _ => return Err(SealedConfigError::Ak),
        }
        Ok(SealedPolicy { ak, expected })
    }
}

/// How long a refused sealed host waits before polling asks it to attest again.
pub const SEALED_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// The last boot-chain verdict on a sealed host (operator view).
#[derive(Debug, Clone)]
pub(crate) struct BootVerdict {
    pub at: Instant,
    pub unix: u64,
    /// `None`: attested; otherwise the refusal's code.
    pub refused: Option<&'static str>,
    /// For a PCR mismatch: every PCR that differed.
    pub pcrs: Vec<u8>,
}

/// Sealed hosts' policies and verdicts, by host id.
#[derive(Debug, Default)]
pub(crate) struct SealedHosts {
    pub policies: HashMap<String, SealedPolicy>,
    pub verdicts: std::sync::Mutex<HashMap<String, BootVerdict>>,
}

fn random_nonce() -> Result<[u8; 32], ControlError> {
    let mut n = [0u8; 32];
    bulkhead_sealing::fill_random(&mut n).map_err(|_| ControlError::Internal)?;
    Ok(n)
}

impl ControlPlane {
    /// Treats these hosts as sealed: they are attested by their boot chain (see the module).
    pub fn with_sealed_hosts(mut self, policies: HashMap<String, SealedPolicy>) -> ControlPlane {
        self.sealed.policies = policies;
        self
    }

    pub(crate) fn is_sealed(&self, host_id: &str) -> bool {
        self.sealed.policies.contains_key(host_id)
    }

    /// One boot-chain attestation round for sealed host `host`: a fresh nonce, its quote over
    /// the boot PCRs, verified against the image manifest and its configuration disk.
    pub(crate) async fn attest_sealed(&self, host: &HostRow) -> Result<String, ControlError> {
        let Some(policy) = self.sealed.policies.get(&host.host_id) else {
            return Err(ControlError::Internal);
        };
        let nonce = random_nonce()?;
        let call = calls::AttestHost(AttestRequest {
            nonce: hex::encode(nonce),
            instance_id: None,
        });
        let outcome: Result<(), (ControlError, Vec<u8>)> = async {
            let ev = self
                .hosts
                .call(&host.host_id, &host.addr, &call)
                .await
                .map_err(|e| (e, Vec::new()))?;
            // The relayed answer must be boot evidence (the sealed image's agent answers with
            // nothing else); measured-start evidence from a host registered as sealed is refused.
            let HostEvidence::Boot(ev) = ev.0 else {
                return Err((ControlError::Host("boot_malformed"), Vec::new()));
            };
            if ev.host != host.host_id {
                return Err((ControlError::Host("evidence_for_another_host"), Vec::new()));
            }
            verify_boot(&ev, &policy.ak, &nonce, &policy.expected).map_err(|e| {
                tracing::warn!(host = %host.host_id, error = %e, "sealed host's boot evidence refused");
                let pcrs = match &e {
                    BootChainError::PcrMismatch { all, .. } => all.clone(),
                    _ => Vec::new(),
                };
                (ControlError::Host(e.code()), pcrs)
            })
        }
        .await;
        match outcome {
            Ok(()) => {
                self.record_verdict(&host.host_id, None, Vec::new());
                Ok("sealed-image".to_string())
            }
            Err((e, pcrs)) => {
                self.record_verdict(&host.host_id, Some(e.code()), pcrs);
                Err(e)
            }
        }
    }

    /// Whether polling should attest sealed host `host_id` now: never attested, or refused
    /// longer than [`SEALED_RETRY`] ago (an attested one is re-attested by
    /// [`ControlPlane::ensure_attested`] once its verdict is older than the attestation TTL).
    pub(crate) fn sealed_attestation_due(&self, host_id: &str) -> bool {
        if !self.is_sealed(host_id) {
            return false;
        }
        match lock(&self.sealed.verdicts).get(host_id) {
            None => true,
            Some(v) if v.refused.is_some() => v.at.elapsed() >= SEALED_RETRY,
            Some(_) => true,
        }
    }

    fn record_verdict(&self, host: &str, refused: Option<&'static str>, pcrs: Vec<u8>) {
        lock(&self.sealed.verdicts).insert(
            host.to_string(),
            BootVerdict {
                at: Instant::now(),
                unix: crate::service::now(),
                refused,
                pcrs,
            },
        );
    }

    /// The operator view's `boot_attestation` of a host: `null` for a host that is not sealed.
    pub(crate) fn boot_attestation_json(&self, host_id: &str) -> Value {
        if !self.is_sealed(host_id) {
            return Value::Null;
        }
        match lock(&self.sealed.verdicts).get(host_id) {
            None => json!({"sealed": true, "state": "pending"}),
            Some(v) => json!({
                "sealed": true,
                "state": if v.refused.is_none() { "attested" } else { "refused" },
                "code": v.refused,
                "pcrs_differing": v.pcrs,
                "at": v.unix,
                "pcrs_verified": BOOT_PCRS,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(pcrs: &[u8]) -> Vec<u8> {
        let m: serde_json::Map<String, Value> = pcrs
            .iter()
            .map(|p| (p.to_string(), json!("ab".repeat(32))))
            .collect();
        serde_json::to_vec(&json!({ "expected_pcrs": m })).unwrap_or_default()
    }

    #[test]
    fn a_policy_needs_every_image_pcr_a_disk_digest_and_an_ak() {
        let ak = format!("04{}", "11".repeat(64));
        let d = "cd".repeat(32);
        let p = Path::new("m.json");
        let ok = SealedPolicy::from_parts(p, &manifest(&[4, 9, 11, 12]), &d, &ak);
        let ok = ok.map(|x| x.expected.0.keys().copied().collect::<Vec<_>>());
        assert_eq!(ok.ok(), Some(BOOT_PCRS.to_vec()));
        assert!(matches!(
            SealedPolicy::from_parts(p, &manifest(&[4, 9, 11]), &d, &ak),
            Err(SealedConfigError::Incomplete(_, 12))
        ));
        assert!(matches!(
            SealedPolicy::from_parts(p, &manifest(&[4, 9, 11, 12]), "cd", &ak),
            Err(SealedConfigError::ConfigDigest)
        ));
        assert!(matches!(
            SealedPolicy::from_parts(p, &manifest(&[4, 9, 11, 12]), &d, "04ab"),
            Err(SealedConfigError::Ak)
        ));
        assert!(matches!(
            SealedPolicy::from_parts(p, b"{}", &d, &ak),
            Err(SealedConfigError::Manifest(..))
        ));
    }
}
