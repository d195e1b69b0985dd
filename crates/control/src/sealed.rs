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
//!
//! The attestation key a quote is checked under is enrolled only once it is **certified by the
//! TPM's endorsement key** ([`bulkhead_rot::endorsement`]): the configured AK (what the host
//! printed at boot) is a claim until the host's evidence carries an EK certificate that chains
//! to a trusted manufacturer CA (`ek_roots`, `ek_intermediates`) and the host's TPM activates
//! a credential made here for that EK and that AK's name (a second round through the host's
//! controller, the credential relayed to the agent). A TPM of another manufacturer
//! (`ek_untrusted_issuer` / `ek_bad_signature`), no EK certificate (`no_ek_certificate`) or an
//! AK that is not in the EK's TPM (`ak_not_in_ek_tpm`) is refused like a boot-chain mismatch:
//! `host_attestation_failed`, no work. The certification is redone whenever it is not on record
//! for this host (a new control plane process, or after any refusal).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bulkhead_controller_proto::{calls, AttestRequest};
use bulkhead_rot::boot::{verify_boot, BootChainError, ExpectedPcrs, BOOT_PCRS};
use bulkhead_rot::endorsement::{challenge_boot_ak, EkTrust, EndorsementError};
use bulkhead_rot::tpm::AkPublic;
use bulkhead_rot_proto::{BootEvidence, CredentialChallenge, HostEvidence};
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
    /// The attestation key to enrol for this host (uncompressed SEC1 P-256 point, hex):
    /// enrolled only after the host's TPM proves it holds it under a certified EK.
    pub ak: String,
    /// PEM files of the TPM manufacturer root CAs trusted for EK certificates.
    #[serde(default)]
    pub ek_roots: Vec<PathBuf>,
    /// PEM files of intermediate CAs a chain may go through (not anchors).
    #[serde(default)]
    pub ek_intermediates: Vec<PathBuf>,
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
    #[error("EK trust anchors: {0}")]
    EkTrust(EndorsementError),
}

/// What a sealed host must prove: that its TPM holds the AK under an EK certified by a trusted
/// manufacturer, and every boot PCR's exact value.
#[derive(Debug, Clone)]
pub struct SealedPolicy {
    pub ak: AkPublic,
    pub expected: ExpectedPcrs,
    pub ek_trust: EkTrust,
}

impl SealedPolicy {
    pub fn load(c: &SealedHostConfig) -> Result<SealedPolicy, SealedConfigError> {
        let trust = EkTrust::from_pem_files(&c.ek_roots, &c.ek_intermediates)
            .map_err(SealedConfigError::EkTrust)?;
        let m = &c.image_manifest;
        let bytes = std::fs::read(m).map_err(|e| SealedConfigError::Read(m.clone(), e))?;
        Self::from_parts(m, &bytes, &c.config_sha256, &c.ak, trust)
    }

    fn from_parts(
        path: &Path,
        manifest: &[u8],
        config_sha256: &str,
        ak: &str,
        ek_trust: EkTrust,
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
        Ok(SealedPolicy {
            ak,
            expected,
            ek_trust,
        })
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
    /// Hosts whose configured AK this process certified against their TPM's EK, with the EK's
    /// fingerprint.
    pub endorsed: std::sync::Mutex<HashMap<String, String>>,
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
        let outcome: Result<(), (ControlError, Vec<u8>)> = async {
            let endorsed = lock(&self.sealed.endorsed).contains_key(&host.host_id);
            let (nonce, ev) = if endorsed {
                let nonce = random_nonce().map_err(|e| (e, Vec::new()))?;
                (nonce, self.boot_evidence(host, &nonce, None).await?)
            } else {
                self.endorse_sealed(host, policy).await?
            };
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
                lock(&self.sealed.endorsed).remove(&host.host_id);
                self.record_verdict(&host.host_id, Some(e.code()), pcrs);
                Err(e)
            }
        }
    }

    /// One quote from sealed host `host` over `nonce` (its TPM activating `credential` first,
    /// if given), relayed by its controller; only boot evidence naming this host is taken.
    async fn boot_evidence(
        &self,
        host: &HostRow,
        nonce: &[u8; 32],
        credential: Option<CredentialChallenge>,
    ) -> Result<BootEvidence, (ControlError, Vec<u8>)> {
        let call = calls::AttestHost(AttestRequest {
            nonce: hex::encode(nonce),
            instance_id: None,
            credential,
        });
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
        Ok(ev)
    }

    /// Certifies the configured AK of sealed host `host` against its TPM's EK (see the module):
    /// first round, the EK certificate from its evidence checked against the trusted
    /// manufacturer CAs and a credential made for that EK and the AK; second round, the host's
    /// TPM must activate it. Returns the second round's nonce and evidence (its boot chain is
    /// then checked under the now-endorsed AK).
    async fn endorse_sealed(
        &self,
        host: &HostRow,
        policy: &SealedPolicy,
    ) -> Result<([u8; 32], BootEvidence), (ControlError, Vec<u8>)> {
        let refused = |e: EndorsementError| {
            tracing::warn!(host = %host.host_id, error = %e, "sealed host's attestation key not endorsed: not enrolled");
            (ControlError::Host(e.code()), Vec::new())
        };
        let first = random_nonce().map_err(|e| (e, Vec::new()))?;
        let ev = self.boot_evidence(host, &first, None).await?;
        let (challenge, check) =
            challenge_boot_ak(&ev, &policy.ak, &policy.ek_trust, crate::service::now())
                .map_err(refused)?;
        let nonce = random_nonce().map_err(|e| (e, Vec::new()))?;
        let ev = self.boot_evidence(host, &nonce, Some(challenge)).await?;
        let ek = check.finish_boot(&ev).map_err(refused)?;
        tracing::info!(host = %host.host_id, ek = %ek.fingerprint(), ak = %policy.ak.key_id(), "sealed host's attestation key certified by its TPM's endorsement key");
        lock(&self.sealed.endorsed).insert(host.host_id.clone(), ek.fingerprint());
        Ok((nonce, ev))
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
                "ek": lock(&self.sealed.endorsed).get(host_id),
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
        let t = EkTrust::default;
        let ok = SealedPolicy::from_parts(p, &manifest(&[4, 9, 11, 12]), &d, &ak, t());
        let ok = ok.map(|x| x.expected.0.keys().copied().collect::<Vec<_>>());
        assert_eq!(ok.ok(), Some(BOOT_PCRS.to_vec()));
        assert!(matches!(
            SealedPolicy::from_parts(p, &manifest(&[4, 9, 11]), &d, &ak, t()),
            Err(SealedConfigError::Incomplete(_, 12))
        ));
        assert!(matches!(
            SealedPolicy::from_parts(p, &manifest(&[4, 9, 11, 12]), "cd", &ak, t()),
            Err(SealedConfigError::ConfigDigest)
        ));
        assert!(matches!(
            SealedPolicy::from_parts(p, &manifest(&[4, 9, 11, 12]), &d, "04ab", t()),
            Err(SealedConfigError::Ak)
        ));
        assert!(matches!(
            SealedPolicy::from_parts(p, b"{}", &d, &ak, t()),
            Err(SealedConfigError::Manifest(..))
        ));
        // No trusted manufacturer CA: the control plane does not start.
        let c = SealedHostConfig {
            image_manifest: PathBuf::from("/nonexistent/manifest.json"),
            config_sha256: d.clone(),
            ak: ak.clone(),
            ek_roots: Vec::new(),
            ek_intermediates: Vec::new(),
        };
        assert!(matches!(
            SealedPolicy::load(&c),
            Err(SealedConfigError::EkTrust(EndorsementError::NoTrustAnchors))
        ));
    }
}
