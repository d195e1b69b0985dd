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
//! 4. if any host of a wave fails, halts, rolls every host touched by this deploy back to its
//!    previous release (whose sealed identity is still on disk), and leaves later waves untouched;
//! 5. once every wave passed, commits (raises each host's anti-rollback floor).
//!
//! Every step is appended to the hash-chained audit log **before** the next one runs; if the
//! audit write fails the deploy stops (fail closed).

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
}

impl DeployError {
    pub fn code(&self) -> &'static str {
        match self {
            DeployError::Unauthorized { code, .. } => code,
            DeployError::Release(e) => e.code(),
            DeployError::NoHosts => "deploy_no_hosts",
            DeployError::WaveFailed { .. } => "deploy_wave_failed",
            DeployError::AuditFailed => "audit_failed",
        }
    }
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

/// Wave sizes for `n` hosts: 1, then 10% (rounded up, at least 1), then the rest.
pub fn plan_waves(n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    if n == 0 {
        return out;
    }
    out.push(1);
    let rest = n - 1;
    let second = n.div_ceil(10).max(1).min(rest);
    if second > 0 {
        out.push(second);
    }
    let third = rest - second;
    if third > 0 {
        out.push(third);
    }
    out
}

struct Auditor<'a> {
    log: &'a AuditLog,
    id: String,
    caller: String,
    cert: String,
    token_id: Option<String>,
    params: String,
}

impl Auditor<'_> {
    fn write(
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
        self.log.append_blocking(entry).map(|_| ()).map_err(|e| {
            tracing::error!(error = %e, "audit write failed");
            DeployError::AuditFailed
        })
    }
}

fn host_res(name: &str) -> Vec<String> {
    vec![format!("host:{name}")]
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
    let mut id = [0u8; 16];
    bulkhead_sealing::fill_random(&mut id)?;
    let params = hex::encode(Sha256::digest(release.manifest.as_bytes()));
    let mut audit = Auditor {
        log: d.audit,
        id: hex::encode(id),
        caller: auth.identity.name.clone(),
        cert: auth.identity.cert_sha256.clone(),
        token_id: None,
        params,
    };
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
    audit.write(
        EntryKind::Request,
        "Deploy",
        all.clone(),
        Decision::Allow,
        "ok",
    )?;
    d.verifier.accept_release(&m);

    // 3. Waves.
    let sizes = plan_waves(hosts.len());
    let mut waves: Vec<Vec<String>> = Vec::new();
    let mut prev: Vec<Option<u64>> = Vec::with_capacity(hosts.len());
    for h in hosts.iter() {
        prev.push(h.versions()?.0);
    }
    let mut start = 0usize;
    for (wave_no, size) in sizes.iter().enumerate() {
        let wave = wave_no + 1;
        let end = start + size;
        let names: Vec<String> = hosts
            .iter()
            .skip(start)
            .take(*size)
            .map(|h| h.name().to_string())
            .collect();
        audit.write(
            EntryKind::Outcome,
            &format!("DeployWave{wave}"),
            names.iter().map(|n| format!("host:{n}")).collect(),
            Decision::None,
            "wave_started",
        )?;
        tracing::info!(wave, hosts = names.len(), "wave started");
        for i in start..end {
            let Some(h) = hosts.get_mut(i) else { break };
            let result = update_one(h, release, source, &m, d.verifier);
            match result {
                Ok(()) => {
                    audit.write(
                        EntryKind::Outcome,
                        "DeployHost",
                        host_res(h.name()),
                        Decision::None,
                        "ok",
                    )?;
                }
                Err(code) => {
                    let failed = h.name().to_string();
                    tracing::error!(wave, host = %failed, code = %code, "wave failed; rolling back");
                    audit.write(
                        EntryKind::Alert,
                        "DeployHost",
                        host_res(&failed),
                        Decision::None,
                        &code,
                    )?;
                    let rolled = rollback(hosts, &prev, i + 1, &audit)?;
                    d.verifier.retire_release(&m);
                    audit.write(
                        EntryKind::Outcome,
                        "Deploy",
                        all,
                        Decision::None,
                        &format!("rolled_back_wave_{wave}"),
                    )?;
                    return Err(DeployError::WaveFailed {
                        wave,
                        host: failed,
                        code,
                        rolled_back: rolled,
                    }
                    .into());
                }
            }
        }
        waves.push(names);
        start = end;
    }

    // 4. Commit.
    for h in hosts.iter_mut() {
        h.commit()?;
    }
    audit.write(EntryKind::Outcome, "Deploy", all, Decision::None, "ok")?;
    Ok(DeployReport {
        deploy_id: audit.id,
        version: m.version,
        waves,
        elapsed: started.elapsed(),
    })
}

/// Update one host; `Err` carries the audit code of the failure.
fn update_one<T: DeployTarget>(
    h: &mut T,
    release: &SignedRelease,
    source: &Path,
    m: &Manifest,
    verifier: &mut Verifier,
) -> Result<(), String> {
    let healthy = match h.health() {
        Some(hh) => hh.accepts_customer_work,
        None => h.boot().accepts_customer_work,
    };
    if !healthy {
        return Err("host_unhealthy_before_update".into());
    }
    let installed = h.install(release, source).map_err(|e| match e {
        RotError::Release(r) => r.code().to_string(),
        other => format!("install_failed: {other}"),
    })?;
    h.stage(installed.version)
        .map_err(|e| format!("stage_failed: {e}"))?;
    let health = h.boot();
    if !health.accepts_customer_work {
        let code = health
            .reasons
            .first()
            .map(|r| r.code())
            .unwrap_or("unhealthy");
        return Err(format!("health_{code}"));
    }
    let nonce = verifier
        .challenge(h.name())
        .map_err(|e| format!("challenge_failed: {e}"))?;
    let ev = h
        .attest(&nonce)
        .map_err(|e| format!("attest_failed: {e}"))?;
    let ok = verifier.verify(&ev).map_err(|e| e.code().to_string())?;
    if ok.release_version != m.version {
        return Err("attest_wrong_release".into());
    }
    Ok(())
}

/// Rolls back hosts `0..touched` to their previous active version. Returns how many were rolled
/// back and came up healthy.
fn rollback<T: DeployTarget>(
    hosts: &mut [T],
    prev: &[Option<u64>],
    touched: usize,
    audit: &Auditor<'_>,
) -> Result<usize, DeployError> {
    let mut ok = 0;
    for (h, p) in hosts.iter_mut().zip(prev.iter()).take(touched) {
        let Some(v) = p else { continue };
        let code = match h.activate(*v) {
            Ok(()) => {
                let hh = h.boot();
                if hh.accepts_customer_work {
                    ok += 1;
                    "ok".to_string()
                } else {
                    format!("rollback_unhealthy: {}", hh.summary())
                }
            }
            Err(e) => format!("rollback_failed: {e}"),
        };
        let kind = if code == "ok" {
            EntryKind::Outcome
        } else {
            EntryKind::Alert
        };
        audit.write(kind, "Rollback", host_res(h.name()), Decision::None, &code)?;
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves() {
        assert_eq!(plan_waves(0), Vec::<usize>::new());
        assert_eq!(plan_waves(1), vec![1]);
        assert_eq!(plan_waves(2), vec![1, 1]);
        assert_eq!(plan_waves(10), vec![1, 1, 8]);
        assert_eq!(plan_waves(20), vec![1, 2, 17]);
        assert_eq!(plan_waves(100).iter().sum::<usize>(), 100);
    }
}
