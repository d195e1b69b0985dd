//! The deployment service: the only path that puts software on hosts.
//!
//! [`deploy`]:
//!
//! 1. authorizes the deployer: a `bulkhead-tokens` Biscuit token, bound to the deployer's
//!    certificate, that grants `DrainHost` on the `host` resource of **every** target host (a
//!    deploy drains and restarts a host's services). Gap: the token service has no dedicated
//!    `DeployRelease` operation or `deployer` role yet (see docs/rot.md);
//! 2. verifies the release as every host will (threshold signatures, expiry, environment, no
//!    version below the fleet's committed version, artefact digests of the files to ship);
//! 3. deploys in waves: one host, then 10% (at least one), then the rest. For each host of a
//!    wave: install (the host verifies the release again), re-seal the identity to the new
//!    expected PCR value, restart (measured start + unseal + service self-tests), then a fresh
//!    attestation against the signed release's PCR value;
//! 4. if any host of a wave fails, halts, rolls exactly the hosts this deploy moved back to
//!    their previous release (whose sealed identity is still on disk): the earlier hosts and the
//!    failing one if it had moved or may have (its stage failed), last moved first; later waves
//!    are never touched;
//! 5. once every wave passed, commits (raises each host's anti-rollback floor).
//!
//! Steps 3–5 are [`run_waves`], the one wave engine, generic over [`WaveHost`]: the simulated
//! hosts here ([`DeployTarget`]) and the controllers of real hosts (`bulkhead deploy
//! --cluster`) both go through it.
//!
//! Every step is appended to the hash-chained audit log **before** the next one runs; if the
//! audit write fails the deploy stops (fail closed), and the hosts it had moved are still rolled
//! back (unaudited: logged, and named in the error).

use std::path::Path;
use std::time::{Duration, Instant};

use bulkhead_audit::{AuditEntry, AuditLog, Decision, EntryKind};
use bulkhead_tokens::token::{RequestContext, RevocationList};
use bulkhead_tokens::{Identity, Operation};
use sha2::{Digest as _, Sha256};

use crate::attest::{Evidence, Verifier};
use crate::host::Host;
use crate::identity::HostHealth;
use crate::measure::Environment;
use crate::release::{
    verify_release, Manifest, ReleaseError, ReleasePolicy, SignedRelease, TrustRoot,
};
use crate::RotError;

mod waves;
pub use waves::{plan_waves, run_waves, HostFailure, Moved, RollbackFailure, WaveHost};

/// Why a deploy stopped. Codes are stable (they are the audit codes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeployError {
    #[error("deployer is not authorized for host {host}: {code}")]
    Unauthorized { host: String, code: &'static str },
    #[error("release refused: {0}")]
    Release(ReleaseError),
    #[error("no target hosts")]
    NoHosts,
    #[error("wave {wave} failed on host {host} ({code}); {rolled_back} host(s) rolled back, later waves untouched")]
    WaveFailed {
        wave: usize,
        host: String,
        code: String,
        rolled_back: usize,
    },
    #[error("audit log write failed; deploy stopped")]
    AuditFailed,
    /// An audit write failed after hosts had moved (or may have): the deploy stopped and rolled
    /// them back all the same, unaudited.
    #[error(
        "audit log write failed; deploy stopped; rolled back: [{}]; not rolled back: [{}]",
        .rolled_back.join(", "),
        rollback_failures(.not_rolled_back)
    )]
    AuditFailedRolledBack {
        rolled_back: Vec<String>,
        not_rolled_back: Vec<RollbackFailure>,
    },
    #[error("every wave passed but host {host} did not commit ({code})")]
    CommitFailed { host: String, code: String },
}

impl DeployError {
    pub fn code(&self) -> &'static str {
        match self {
            DeployError::Unauthorized { code, .. } => code,
            DeployError::Release(e) => e.code(),
            DeployError::NoHosts => "deploy_no_hosts",
            DeployError::WaveFailed { .. } => "deploy_wave_failed",
            DeployError::AuditFailed | DeployError::AuditFailedRolledBack { .. } => "audit_failed",
            DeployError::CommitFailed { .. } => "deploy_commit_failed",
        }
    }
}

fn rollback_failures(f: &[RollbackFailure]) -> String {
    f.iter()
        .map(|r| format!("{} ({})", r.host, r.code))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the deployment service needs from a host. Implemented by [`Host`] (in-process, used by
/// simulated fleets); a remote host would implement it over the controller's API.
pub trait DeployTarget {
    fn name(&self) -> &str;
    /// (active, committed) versions.
    fn versions(&self) -> Result<(Option<u64>, u64), RotError>;
    fn health(&self) -> Option<HostHealth>;
    fn install(&mut self, r: &SignedRelease, source: &Path) -> Result<Manifest, RotError>;
    fn stage(&mut self, version: u64) -> Result<(), RotError>;
    fn activate(&mut self, version: u64) -> Result<(), RotError>;
    fn boot(&mut self) -> HostHealth;
    fn attest(&mut self, nonce: &[u8]) -> Result<Evidence, RotError>;
    fn commit(&mut self) -> Result<(), RotError>;
}

impl DeployTarget for Host {
    fn name(&self) -> &str {
        Host::name(self)
    }
    fn versions(&self) -> Result<(Option<u64>, u64), RotError> {
        Host::versions(self)
    }
    fn health(&self) -> Option<HostHealth> {
        Host::health(self).cloned()
    }
    fn install(&mut self, r: &SignedRelease, source: &Path) -> Result<Manifest, RotError> {
        Host::install(self, r, source)
    }
    fn stage(&mut self, version: u64) -> Result<(), RotError> {
        Host::stage(self, version)
    }
    fn activate(&mut self, version: u64) -> Result<(), RotError> {
        Host::activate(self, version)
    }
    fn boot(&mut self) -> HostHealth {
        Host::boot(self)
    }
    fn attest(&mut self, nonce: &[u8]) -> Result<Evidence, RotError> {
        Host::attest(self, nonce)
    }
    fn commit(&mut self) -> Result<(), RotError> {
        Host::commit(self)
    }
}

impl<T: DeployTarget + ?Sized> DeployTarget for &mut T {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn versions(&self) -> Result<(Option<u64>, u64), RotError> {
        (**self).versions()
    }
    fn health(&self) -> Option<HostHealth> {
        (**self).health()
    }
    fn install(&mut self, r: &SignedRelease, source: &Path) -> Result<Manifest, RotError> {
        (**self).install(r, source)
    }
    fn stage(&mut self, version: u64) -> Result<(), RotError> {
        (**self).stage(version)
    }
    fn activate(&mut self, version: u64) -> Result<(), RotError> {
        (**self).activate(version)
    }
    fn boot(&mut self) -> HostHealth {
        (**self).boot()
    }
    fn attest(&mut self, nonce: &[u8]) -> Result<Evidence, RotError> {
        (**self).attest(nonce)
    }
    fn commit(&mut self) -> Result<(), RotError> {
        (**self).commit()
    }
}

/// The deployer's credentials, as authenticated by mTLS.
pub struct DeployerAuth<'a> {
    pub token: &'a str,
    pub identity: &'a Identity,
    pub tokens: &'a bulkhead_tokens::Verifier,
    pub revoked: &'a RevocationList,
}

/// The service's fixed context.
pub struct Deployment<'a> {
    pub audit: &'a AuditLog,
    pub root: &'a TrustRoot,
    pub environment: Environment,
    pub verifier: &'a mut Verifier,
}

/// Outcome of a deploy that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployReport {
    pub deploy_id: String,
    pub version: u64,
    pub waves: Vec<Vec<String>>,
    pub elapsed: Duration,
}

/// Where a deploy's records go: the hash-chained [`AuditLog`] (a test stands in a log that
/// fails on cue).
pub trait AuditSink {
    /// Appends `entry`, durable when it returns `Ok`.
    fn append(&self, entry: AuditEntry) -> Result<(), bulkhead_audit::AuditError>;
}

impl AuditSink for AuditLog {
    fn append(&self, entry: AuditEntry) -> Result<(), bulkhead_audit::AuditError> {
        self.append_blocking(entry).map(|_| ())
    }
}

/// The deploy's audit trail: every record names the deploy (request id), the deployer and the
/// release (the manifest's SHA-256). Shared by the simulated and the real-host deploy.
pub struct DeployAudit<'a> {
    log: &'a dyn AuditSink,
    id: String,
    caller: String,
    cert: String,
    token_id: Option<String>,
    params: String,
}

impl<'a> DeployAudit<'a> {
    /// A new deploy (fresh random id) by `identity` of the release whose manifest text is
    /// `manifest`.
    pub fn new(
        log: &'a dyn AuditSink,
        identity: &Identity,
        manifest: &str,
    ) -> Result<DeployAudit<'a>, RotError> {
        let mut id = [0u8; 16];
        bulkhead_sealing::fill_random(&mut id)?;
        Ok(DeployAudit {
            log,
            id: hex::encode(id),
            caller: identity.name.clone(),
            cert: identity.cert_sha256.clone(),
            token_id: None,
            params: hex::encode(Sha256::digest(manifest.as_bytes())),
        })
    }

    /// The deploy's id (the `request_id` of its records).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn set_token_id(&mut self, token_id: Option<String>) {
        self.token_id = token_id;
    }

    /// Appends one record; a failed write stops the deploy (fail closed).
    pub fn write(
        &self,
        kind: EntryKind,
        op: &str,
        resources: Vec<String>,
        decision: Decision,
        code: &str,
    ) -> Result<(), DeployError> {
        let entry = AuditEntry {
            kind,
            request_id: self.id.clone(),
            caller: self.caller.clone(),
            cert_sha256: Some(self.cert.clone()),
            token_id: self.token_id.clone(),
            op: op.to_string(),
            resources,
            params_sha256: Some(self.params.clone()),
            decision,
            code: code.to_string(),
        };
        self.log.append(entry).map_err(|e| {
            tracing::error!(error = %e, "audit write failed");
            DeployError::AuditFailed
        })
    }
}

/// The simulated deploy's context: the release, where its files are, and the verifier.
struct SimContext<'a> {
    release: &'a SignedRelease,
    source: &'a Path,
    manifest: &'a Manifest,
    verifier: &'a mut Verifier,
}

/// A simulated host in a deploy: the host and the release it ran before.
struct Simulated<T> {
    host: T,
    previous: Option<u64>,
}

impl<T: DeployTarget> WaveHost<SimContext<'_>> for Simulated<T> {
    fn name(&self) -> &str {
        self.host.name()
    }

    fn update(&mut self, cx: &mut SimContext<'_>) -> Result<(), HostFailure> {
        update_one(
            &mut self.host,
            cx.release,
            cx.source,
            cx.manifest,
            cx.verifier,
        )
    }

    fn roll_back(&mut self, _cx: &mut SimContext<'_>) -> Result<(), String> {
        let Some(v) = self.previous else {
            return Err("rollback_no_previous_release".into());
        };
        self.host
            .activate(v)
            .map_err(|e| format!("rollback_failed: {e}"))?;
        let hh = self.host.boot();
        if hh.accepts_customer_work {
            Ok(())
        } else {
            Err(format!("rollback_unhealthy: {}", hh.summary()))
        }
    }

    fn commit(&mut self, _cx: &mut SimContext<'_>) -> Result<(), String> {
        self.host
            .commit()
            .map_err(|e| format!("commit_failed: {e}"))
    }
}

/// Runs one deploy; see the module documentation.
pub fn deploy<T: DeployTarget>(
    d: &mut Deployment<'_>,
    auth: &DeployerAuth<'_>,
    release: &SignedRelease,
    source: &Path,
    hosts: &mut [T],
) -> Result<DeployReport, RotError> {
    let started = Instant::now();
    let mut audit = DeployAudit::new(d.audit, auth.identity, &release.manifest)?;
    let all: Vec<String> = hosts.iter().map(|h| format!("host:{}", h.name())).collect();
    let span = tracing::info_span!("deploy", id = %audit.id, caller = %audit.caller);
    let _g = span.enter();

    if hosts.is_empty() {
        audit.write(
            EntryKind::Request,
            "Deploy",
            all,
            Decision::Deny,
            "deploy_no_hosts",
        )?;
        return Err(DeployError::NoHosts.into());
    }

    // 1. Authorization, for every target host.
    let now = crate::unix_now();
    let resources = vec!["host".to_string()];
    for h in hosts.iter() {
        let ctx = RequestContext {
            host: h.name(),
            peer: auth.identity,
            operation: Operation::DrainHost,
            resources: &resources,
            now,
        };
        match auth.tokens.authorize(auth.token, auth.revoked, &ctx) {
            Ok(claims) => audit.token_id = Some(claims.token_id),
            Err((e, claims)) => {
                audit.token_id = claims.map(|c| c.token_id);
                audit.write(EntryKind::Request, "Deploy", all, Decision::Deny, e.code())?;
                return Err(DeployError::Unauthorized {
                    host: h.name().to_string(),
                    code: e.code(),
                }
                .into());
            }
        }
    }

    // 2. The release, checked as the hosts will check it.
    let mut floor = 0;
    for h in hosts.iter() {
        floor = floor.max(h.versions()?.1);
    }
    let checked = verify_release(
        release,
        &ReleasePolicy {
            root: d.root,
            environment: &d.environment,
            current_version: floor,
            now,
        },
    )
    .and_then(|m| m.check_artefacts(source).map(|()| m));
    let m = match checked {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(code = e.code(), error = %e, "release refused");
            audit.write(EntryKind::Request, "Deploy", all, Decision::Deny, e.code())?;
            return Err(DeployError::Release(e).into());
        }
    };
    audit.write(EntryKind::Request, "Deploy", all, Decision::Allow, "ok")?;
    d.verifier.accept_release(&m);

    // 3. Waves (4. commit once all passed), by the one wave engine.
    let mut sim = Vec::with_capacity(hosts.len());
    for h in hosts.iter_mut() {
        let previous = h.versions()?.0;
        sim.push(Simulated { host: h, previous });
    }
    let mut cx = SimContext {
        release,
        source,
        manifest: &m,
        verifier: &mut *d.verifier,
    };
    let waves = match run_waves(&mut sim, &mut cx, &audit) {
        Ok(w) => w,
        Err(e) => {
            if matches!(
                e,
                DeployError::WaveFailed { .. } | DeployError::AuditFailedRolledBack { .. }
            ) {
                d.verifier.retire_release(&m);
            }
            return Err(e.into());
        }
    };
    Ok(DeployReport {
        deploy_id: audit.id,
        version: m.version,
        waves,
        elapsed: started.elapsed(),
    })
}

/// Update one simulated host; `Err` carries the audit code of the failure and whether the host
/// had moved (staged the release) before it failed. A failed `stage` may have moved it (the
/// state written, then an error; or a remote target whose answer was lost): unknown.
fn update_one<T: DeployTarget>(
    h: &mut T,
    release: &SignedRelease,
    source: &Path,
    m: &Manifest,
    verifier: &mut Verifier,
) -> Result<(), HostFailure> {
    let (before, after) = (HostFailure::before, HostFailure::after);
    let healthy = match h.health() {
        Some(hh) => hh.accepts_customer_work,
        None => h.boot().accepts_customer_work,
    };
    if !healthy {
        return Err(before("host_unhealthy_before_update".into()));
    }
    let installed = h.install(release, source).map_err(|e| {
        before(match e {
            RotError::Release(r) => r.code().to_string(),
            other => format!("install_failed: {other}"),
        })
    })?;
    h.stage(installed.version).map_err(|e| HostFailure {
        code: format!("stage_failed: {e}"),
        moved: Moved::Unknown,
    })?;
    let health = h.boot();
    if !health.accepts_customer_work {
        let code = health
            .reasons
            .first()
            .map(|r| r.code())
            .unwrap_or("unhealthy");
        return Err(after(format!("health_{code}")));
    }
    let nonce = verifier
        .challenge(h.name())
        .map_err(|e| after(format!("challenge_failed: {e}")))?;
    let ev = h
        .attest(&nonce)
        .map_err(|e| after(format!("attest_failed: {e}")))?;
    let ok = verifier
        .verify(&ev)
        .map_err(|e| after(e.code().to_string()))?;
    if ok.release_version != m.version {
        return Err(after("attest_wrong_release".into()));
    }
    Ok(())
}
