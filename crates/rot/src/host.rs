//! The host side: what `bulkhead-launcher` does on a host before any Bulkhead service starts.
//!
//! On-disk layout under the host's state root:
//!
//! ```text
//! state.json                 {"committed_version":N,"active_version":M}
//! trust-root.json            pinned release keys + threshold (provisioning)
//! releases/v<M>/release.json the signed release as installed
//! releases/v<M>/<artefact>   the files the launcher measures and starts
//! identity-v<M>.json         the host key sealed to release M's expected PCR value
//! eventlog.jsonl             the last measured start's event log
//! ```
//!
//! Nothing in this layout is trusted: the release is re-verified at boot, every artefact is
//! hashed and compared with the manifest before it runs, and the identity only unseals if the PCR
//! holds the signed value. The anti-rollback floor lives in the TPM, in the NV counter
//! [`FLOOR_NV_INDEX`] (raised at provisioning and at every commit; a TPM counter only goes up):
//! `state.json`'s `committed_version` is a copy, and editing it lowers nothing.

/// NV index of the anti-rollback floor (owner range; `TPM_NT_COUNTER`).
pub const FLOOR_NV_INDEX: u32 = 0x0100_b017;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulkhead_sealing::HostKey;

use crate::attest::{Enrollment, Evidence};
use crate::identity::{
    create_identity, seal_identity, unseal_identity, write_private, HealthReason, HostHealth,
    SealedIdentity,
};
use crate::measure::{measured_start, Environment, EventKind, EventLog, Measured};
use crate::release::{verify_release, Manifest, ReleasePolicy, SignedRelease, TrustRoot};
use crate::tpm::{MeasurePcr, Tpm};
use crate::RotError;

/// How long a service's `--self-test` may take.
pub const SELF_TEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Static configuration of a host.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub name: String,
    pub root: PathBuf,
    pub environment: Environment,
    pub pcr: MeasurePcr,
    /// Reset the PCR before measured start (dev PCRs only; a real host boots with zero PCRs).
    pub dev_reset_pcr: bool,
    pub trust_root: TrustRoot,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HostState {
    committed_version: u64,
    active_version: Option<u64>,
}

/// A host with its TPM.
pub struct Host {
    cfg: HostConfig,
    tpm: Tpm,
    key: Option<HostKey>,
    log: Option<EventLog>,
    health: Option<HostHealth>,
    audit: Option<bulkhead_audit::AuditLog>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("name", &self.cfg.name)
            .finish_non_exhaustive()
    }
}

impl Host {
    pub fn open(cfg: HostConfig, tcti: &str) -> Result<Self, RotError> {
        std::fs::create_dir_all(cfg.root.join("releases")).map_err(RotError::io(&cfg.root))?;
        let tpm = Tpm::open(tcti)?;
        Ok(Host {
            cfg,
            tpm,
            key: None,
            log: None,
            health: None,
            audit: None,
        })
    }

    /// Where refusals are raised as alerts (the host's audit log, pulled by the control plane).
    pub fn set_audit(&mut self, audit: bulkhead_audit::AuditLog) {
        self.audit = Some(audit);
    }

    fn raise_alerts(&self, h: &HostHealth) {
        let Some(audit) = &self.audit else { return };
        for r in &h.reasons {
            let entry = bulkhead_audit::AuditEntry {
                kind: bulkhead_audit::EntryKind::Alert,
                request_id: "-".into(),
                caller: "bulkhead-launcher".into(),
                cert_sha256: None,
                token_id: None,
                op: "MeasuredStart".into(),
                resources: vec![format!("host:{}", self.cfg.name)],
                params_sha256: h.pcr_value.clone(),
                decision: bulkhead_audit::Decision::None,
                code: r.code().into(),
            };
            if let Err(e) = audit.append_blocking(entry) {
                tracing::error!(error = %e, "could not write alert to the audit log");
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn config(&self) -> &HostConfig {
        &self.cfg
    }

    pub fn tpm(&mut self) -> &mut Tpm {
        &mut self.tpm
    }

    /// The unsealed host key, only after a healthy boot.
    pub fn host_key(&self) -> Option<&HostKey> {
        self.key.as_ref()
    }

    /// Hands the unsealed identity to the block card: writes the `bulkhead-sealing` host key
    /// file (70 bytes, mode 0600) to `path`, which should be on a tmpfs (`/run/bulkhead/`) so it
    /// never reaches a disk. Refused unless the host booted healthy.
    pub fn write_host_key(&self, path: &Path) -> Result<(), RotError> {
        let key = self.key.as_ref().ok_or(RotError::Malformed(
            "host is not healthy: no identity to hand out",
        ))?;
        let bytes = key.to_file_bytes()?;
        write_private(path, bytes.as_ref())
    }

    pub fn health(&self) -> Option<&HostHealth> {
        self.health.as_ref()
    }

    pub fn event_log(&self) -> Option<&EventLog> {
        self.log.as_ref()
    }

    fn state_path(&self) -> PathBuf {
        self.cfg.root.join("state.json")
    }

    fn state(&self) -> Result<HostState, RotError> {
        let p = self.state_path();
        match std::fs::read(&p) {
            Ok(raw) => serde_json::from_slice(&raw).map_err(|_| RotError::Malformed("host state")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HostState::default()),
            Err(e) => Err(RotError::Io { path: p, source: e }),
        }
    }

    fn set_state(&self, s: &HostState) -> Result<(), RotError> {
        let raw = serde_json::to_vec(s).map_err(|_| RotError::Malformed("host state"))?;
        write_private(&self.state_path(), &raw)
    }

    pub fn release_dir(&self, version: u64) -> PathBuf {
        self.cfg.root.join("releases").join(format!("v{version}"))
    }

    fn identity_path(&self, version: u64) -> PathBuf {
        self.cfg.root.join(format!("identity-v{version}.json"))
    }

    /// The running version (what `boot` measures), and the anti-rollback floor.
    pub fn versions(&self) -> Result<(Option<u64>, u64), RotError> {
        let s = self.state()?;
        Ok((s.active_version, s.committed_version))
    }

    fn policy(&mut self, now: u64) -> Result<(u64, u64), RotError> {
        Ok((self.floor()?, now))
    }

    /// The anti-rollback floor: the TPM's NV counter (authoritative), or the state file's copy
    /// for a host provisioned before the counter existed, whichever is higher.
    pub fn floor(&mut self) -> Result<u64, RotError> {
        let copy = self.state()?.committed_version;
        let counter = self.tpm.counter_read(FLOOR_NV_INDEX)?.unwrap_or(0);
        Ok(copy.max(counter))
    }

    /// Verifies a signed release (threshold, expiry, environment, no rollback below the committed
    /// version) and copies its artefacts from `source` into `releases/v<N>/`, checking each copy
    /// against the manifest. Does not activate it.
    pub fn install(&mut self, signed: &SignedRelease, source: &Path) -> Result<Manifest, RotError> {
        let (floor, now) = self.policy(crate::unix_now())?;
        let m = verify_release(
            signed,
            &ReleasePolicy {
                root: &self.cfg.trust_root,
                environment: &self.cfg.environment,
                current_version: floor,
                now,
            },
        )?;
        m.check_artefacts(source)?;
        let dir = self.release_dir(m.version);
        std::fs::create_dir_all(&dir).map_err(RotError::io(&dir))?;
        for a in &m.artefacts {
            let dst = dir.join(&a.name);
            std::fs::copy(source.join(&a.name), &dst).map_err(RotError::io(&dst))?;
            let mode = if a.kind == EventKind::Binary {
                0o755
            } else {
                0o644
            };
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))
                .map_err(RotError::io(&dst))?;
        }
        m.check_artefacts(&dir)?;
        let rel = dir.join("release.json");
        std::fs::write(&rel, signed.to_json()?).map_err(RotError::io(&rel))?;
        tracing::info!(host = %self.cfg.name, version = m.version, "release installed");
        Ok(m)
    }

    /// Provisioning ceremony: installs the first release, creates a fresh identity sealed to that
    /// release's expected PCR value, activates and commits it, and returns what the control plane
    /// enrols (AK, host public key, environment).
    pub fn provision(
        &mut self,
        signed: &SignedRelease,
        source: &Path,
    ) -> Result<Enrollment, RotError> {
        let m = self.install(signed, source)?;
        self.tpm.counter_define(FLOOR_NV_INDEX)?;
        let counter = self.tpm.counter_raise_to(FLOOR_NV_INDEX, m.version)?;
        if counter > m.version {
            // This TPM's counters already went past the first release (a counter starts at
            // the highest value any counter of the TPM held): its releases must be numbered
            // above that.
            return Err(crate::release::ReleaseError::Rollback {
                version: m.version,
                current: counter,
            }
            .into());
        }
        let (_key, sealed) =
            create_identity(&mut self.tpm, self.cfg.pcr, &m.expected_pcr_value()?)?;
        sealed.write(&self.identity_path(m.version))?;
        self.set_state(&HostState {
            committed_version: m.version,
            active_version: Some(m.version),
        })?;
        let trust = serde_json::to_vec_pretty(&self.cfg.trust_root)
            .map_err(|_| RotError::Malformed("trust root"))?;
        write_private(&self.cfg.root.join("trust-root.json"), &trust)?;
        Ok(Enrollment {
            host: self.cfg.name.clone(),
            environment: self.cfg.environment.clone(),
            ak: self.tpm.ak_public()?,
            host_public: sealed.host_public,
        })
    }

    /// Prepares an installed release to run next: re-seals the identity (which must be unsealed,
    /// i.e. the host booted healthy) to the new release's expected PCR value.
    pub fn stage(&mut self, version: u64) -> Result<(), RotError> {
        let rel = self.release_dir(version).join("release.json");
        let raw = std::fs::read(&rel).map_err(RotError::io(&rel))?;
        let signed = SignedRelease::parse(&raw)?;
        let m = self.verify_installed(&signed)?;
        let key = self.key.as_ref().ok_or(RotError::Malformed(
            "host not healthy: no identity to re-seal",
        ))?;
        let sealed = seal_identity(&mut self.tpm, key, self.cfg.pcr, &m.expected_pcr_value()?)?;
        sealed.write(&self.identity_path(version))?;
        let mut s = self.state()?;
        s.active_version = Some(version);
        self.set_state(&s)
    }

    /// Switches back to an installed release whose sealed identity is still on disk (rollback
    /// of an uncommitted update). Refused below the committed version.
    pub fn activate(&mut self, version: u64) -> Result<(), RotError> {
        let floor = self.floor()?;
        let mut s = self.state()?;
        if version < floor {
            return Err(crate::release::ReleaseError::Rollback {
                version,
                current: floor,
            }
            .into());
        }
        s.active_version = Some(version);
        self.set_state(&s)
    }

    /// Raises the anti-rollback floor to the active version (after the deploy passed).
    /// Also deletes the sealed identities of releases below the new floor, so the host itself
    /// can no longer start an older release with its identity. (A copy of an old sealed blob
    /// taken earlier would still unseal under that old release's PCR value; binding the policy
    /// to a TPM NV counter with `PolicyNV` closes that, see docs/rot.md.)
    pub fn commit(&mut self) -> Result<(), RotError> {
        let mut s = self.state()?;
        if let Some(v) = s.active_version {
            s.committed_version = s.committed_version.max(v);
        }
        // The TPM first: once the counter is raised, no file edit brings the floor back down.
        self.tpm.counter_define(FLOOR_NV_INDEX)?;
        self.tpm
            .counter_raise_to(FLOOR_NV_INDEX, s.committed_version)?;
        self.set_state(&s)?;
        let entries = std::fs::read_dir(&self.cfg.root).map_err(RotError::io(&self.cfg.root))?;
        for e in entries.flatten() {
            let name = e.file_name();
            let old = name
                .to_str()
                .and_then(|n| n.strip_prefix("identity-v"))
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|v| v < s.committed_version);
            if old {
                let p = e.path();
                std::fs::remove_file(&p).map_err(RotError::io(&p))?;
            }
        }
        Ok(())
    }

    fn verify_installed(&mut self, signed: &SignedRelease) -> Result<Manifest, RotError> {
        let floor = self.floor()?;
        // Expiry is checked at install, not at every boot: an ageing release must not stop a
        // fleet. Everything else is checked again.
        Ok(verify_release(
            signed,
            &ReleasePolicy {
                root: &self.cfg.trust_root,
                environment: &self.cfg.environment,
                current_version: floor,
                now: 0,
            },
        )?)
    }

    /// Measured start of the active release, then unseal, then service self-tests. Never fails:
    /// the outcome is the [`HostHealth`] verdict, also kept for [`Host::health`].
    pub fn boot(&mut self) -> HostHealth {
        self.key = None;
        self.log = None;
        let mut h = HostHealth {
            host: self.cfg.name.clone(),
            environment: self.cfg.environment.to_string(),
            accepts_customer_work: false,
            release_version: None,
            pcr_value: None,
            reasons: Vec::new(),
        };
        if let Err(r) = self.boot_inner(&mut h) {
            tracing::warn!(host = %self.cfg.name, code = r.code(), "host refuses customer work");
            h.reasons.push(r);
        }
        h.accepts_customer_work = h.reasons.is_empty() && self.key.is_some();
        if !h.accepts_customer_work {
            // A host that refuses work does not keep its identity either (e.g. it unsealed but a
            // service failed its self-test): nothing can open a volume key on it.
            self.key = None;
            self.raise_alerts(&h);
        }
        self.health = Some(h.clone());
        h
    }

    fn boot_inner(&mut self, h: &mut HostHealth) -> Result<(), HealthReason> {
        let state = self
            .state()
            .map_err(|e| HealthReason::MeasuredStartFailed {
                detail: e.to_string(),
            })?;
        let version = state.active_version.ok_or(HealthReason::NotProvisioned)?;
        h.release_version = Some(version);
        let dir = self.release_dir(version);
        let raw =
            std::fs::read(dir.join("release.json")).map_err(|e| HealthReason::ReleaseRejected {
                detail: e.to_string(),
            })?;
        let signed = SignedRelease::parse(&raw).map_err(|e| HealthReason::ReleaseRejected {
            detail: e.to_string(),
        })?;
        let m = self
            .verify_installed(&signed)
            .map_err(|e| HealthReason::ReleaseRejected {
                detail: e.to_string(),
            })?;
        // Measure exactly what will run. A mismatch is reported (an alert: someone or something
        // changed a file), and the measurement still happens so the PCR shows it.
        let artefact_err = m.check_artefacts(&dir).err();
        let items: Vec<Measured> = m
            .artefacts
            .iter()
            .map(|a| Measured {
                kind: a.kind,
                name: a.name.clone(),
                path: dir.join(&a.name),
            })
            .collect();
        let (log, value) = measured_start(
            &mut self.tpm,
            self.cfg.pcr,
            &self.cfg.environment,
            &items,
            self.cfg.dev_reset_pcr,
        )
        .map_err(|e| HealthReason::MeasuredStartFailed {
            detail: e.to_string(),
        })?;
        let log_path = self.cfg.root.join("eventlog.jsonl");
        if let Ok(text) = log.to_jsonl() {
            if let Err(e) = std::fs::write(&log_path, text) {
                tracing::warn!(error = %e, "could not write event log");
            }
        }
        self.log = Some(log);
        h.pcr_value = Some(hex::encode(value));
        if let Some(e) = artefact_err {
            tracing::error!(host = %self.cfg.name, error = %e, "ALERT: installed artefact differs from the signed release; not starting it");
            h.reasons.push(HealthReason::ArtefactMismatch {
                detail: e.to_string(),
            });
        }
        let sealed = SealedIdentity::read(&self.identity_path(version))
            .map_err(|_| HealthReason::NotProvisioned)?;
        match unseal_identity(&mut self.tpm, &sealed) {
            Ok(k) => self.key = Some(k),
            Err(e) => {
                h.reasons.push(HealthReason::UnsealFailed {
                    detail: e.to_string(),
                });
            }
        }
        let expected = m.expected_pcr.clone();
        if expected != hex::encode(value) {
            h.reasons.push(HealthReason::MeasurementMismatch {
                expected,
                actual: hex::encode(value),
            });
        }
        if h.reasons.is_empty() {
            for a in m.artefacts.iter().filter(|a| a.kind == EventKind::Binary) {
                self_test(&dir.join(&a.name)).map_err(|detail| HealthReason::ServiceUnhealthy {
                    detail: format!("{}: {detail}", a.name),
                })?;
            }
        }
        Ok(())
    }

    /// Hypervisor live update: applies a signed live-update release (see `release::LiveUpdate`)
    /// without restarting anything. The host must run the base release, healthy, with the PCR at
    /// the base value. The identity is sealed twice first — to the new release's cold-boot value
    /// (for the next restart) and to the live value `extend(base, component)` — then the new
    /// component is measured and extended as a `live-update` event, and the live identity must
    /// unseal. The hand-over of the running instances to the new binary is the hypervisor's
    /// (a later issue); this is the measurement and identity side of it.
    pub fn live_update(
        &mut self,
        signed: &SignedRelease,
        source: &Path,
    ) -> Result<Manifest, RotError> {
        let m = self.install(signed, source)?;
        let lu = m
            .live_update
            .clone()
            .ok_or(RotError::Malformed("release is not a live update"))?;
        let active = self.state()?.active_version;
        if active != Some(lu.base_version) {
            return Err(RotError::Malformed(
                "live update's base release is not the running release",
            ));
        }
        let current = self.tpm.pcr_read(self.cfg.pcr)?;
        if hex::encode(current) != lu.base_expected_pcr {
            return Err(RotError::Malformed(
                "PCR is not at the live update's base value",
            ));
        }
        let key = self.key.as_ref().ok_or(RotError::Malformed(
            "host not healthy: no identity to re-seal",
        ))?;
        let cold = seal_identity(&mut self.tpm, key, self.cfg.pcr, &m.expected_pcr_value()?)?;
        let after = crate::measure::parse_sha384(&lu.expected_pcr_after)?;
        let live = seal_identity(&mut self.tpm, key, self.cfg.pcr, &after)?;
        cold.write(&self.identity_path(m.version))?;
        let component = self.release_dir(m.version).join(&lu.component);
        let d = crate::measure::sha384_file(&component)?;
        self.tpm.pcr_extend(self.cfg.pcr, &d)?;
        if let Some(log) = self.log.as_mut() {
            log.push_live_update(&lu.component, &d);
        }
        // From here on the live identity is the one that must work.
        self.key = Some(unseal_identity(&mut self.tpm, &live)?);
        let mut s = self.state()?;
        s.active_version = Some(m.version);
        self.set_state(&s)?;
        if let Some(h) = self.health.as_mut() {
            h.release_version = Some(m.version);
            h.pcr_value = Some(lu.expected_pcr_after.clone());
        }
        tracing::info!(host = %self.cfg.name, version = m.version, component = %lu.component, "live update applied");
        Ok(m)
    }

    /// Measures a release the host's controller applied (`DeployRelease`): extends the
    /// measurement PCR with `digest` (the [`crate::measure::release_applied_digest`] of its
    /// signed manifest) as a `release-applied` event named `v<version>`. The host must have
    /// completed a measured start; the event goes after every boot event, so a verifier sees the
    /// boot release and, after it, each release applied since.
    pub fn record_release_applied(
        &mut self,
        version: u64,
        digest: &crate::tpm::Sha384Digest,
    ) -> Result<(), RotError> {
        if self.log.is_none() {
            return Err(RotError::Malformed("no measured start yet"));
        }
        self.tpm.pcr_extend(self.cfg.pcr, digest)?;
        if let Some(log) = self.log.as_mut() {
            log.push_release_applied(version, digest);
        }
        tracing::info!(host = %self.cfg.name, version, "applied release measured");
        Ok(())
    }

    /// The TPM's EK certificate (DER), for the enrolment ceremony
    /// ([`crate::endorsement`]).
    pub fn ek_certificate(&mut self) -> Result<Vec<u8>, crate::endorsement::EndorsementError> {
        self.tpm.ek_certificate()
    }

    /// Opens an enrolment credential with the TPM (proves this host's AK lives in the TPM that
    /// holds the certified EK).
    pub fn activate_credential(
        &mut self,
        challenge: &crate::endorsement::CredentialChallenge,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, crate::endorsement::EndorsementError> {
        self.tpm.activate_credential(challenge)
    }

    /// Answers a verifier's challenge: a quote over the measurement PCR with `nonce`, plus the
    /// event log of the last measured start.
    pub fn attest(&mut self, nonce: &[u8]) -> Result<Evidence, RotError> {
        let log = self
            .log
            .as_ref()
            .ok_or(RotError::Malformed("no measured start yet"))?;
        let event_log = log.to_jsonl()?;
        let quote = self.tpm.quote(self.cfg.pcr, nonce)?;
        Ok(Evidence {
            host: self.cfg.name.clone(),
            quote,
            event_log,
        })
    }

    /// Re-provisioning: clears the TPM owner hierarchy (new seeds: new SRK and AK, every old
    /// sealed identity unloadable) and forgets identities and state. The host must then be
    /// provisioned and enrolled again, in its (measured) environment.
    pub fn clear_identity(&mut self) -> Result<(), RotError> {
        self.tpm.clear_owner()?;
        self.key = None;
        let entries = std::fs::read_dir(&self.cfg.root).map_err(RotError::io(&self.cfg.root))?;
        for e in entries.flatten() {
            let name = e.file_name();
            let n = name.to_string_lossy();
            if n.starts_with("identity-v") || n == "state.json" {
                let p = e.path();
                std::fs::remove_file(&p).map_err(RotError::io(&p))?;
            }
        }
        Ok(())
    }
}

/// Runs `path --self-test`; healthy if it exits 0 within [`SELF_TEST_TIMEOUT`].
fn self_test(path: &Path) -> Result<(), String> {
    // A file just written may be briefly "text busy" if another thread forked meanwhile.
    let mut tries = 0;
    let mut child = loop {
        match std::process::Command::new(path)
            .arg("--self-test")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("cannot start: {e}")),
        }
    };
    let deadline = Instant::now() + SELF_TEST_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("self-test failed ({st})")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("self-test timed out".into());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(e.to_string()),
        }
    }
}
