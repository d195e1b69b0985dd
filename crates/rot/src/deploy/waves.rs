//! The wave engine ([`run_waves`]), one copy for every kind of host: the simulated hosts of
//! [`super::deploy`] and the controllers of real hosts (`bulkhead deploy --cluster`).

use bulkhead_audit::{Decision, EntryKind};

use super::{DeployAudit, DeployError};

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

/// Whether a host whose update failed had moved to the release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// It failed before it changed anything: nothing to roll back.
    No,
    /// It had moved (and failed a later check): rolled back with the others.
    Yes,
    /// Nobody knows: the request that moves it got no answer (a transport error), so it may
    /// have moved. Rolled back like a moved host (a roll-back of a host that did not move must
    /// leave it as it is) and audited `host_outcome_unknown`.
    Unknown,
}

impl Moved {
    /// Whether the engine rolls the host back.
    pub fn may_have(self) -> bool {
        !matches!(self, Moved::No)
    }
}

/// Why one host's update failed: the audit code, and whether the host had moved to the release
/// (changed anything) before it failed, so that it is rolled back with the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFailure {
    pub code: String,
    pub moved: Moved,
}

impl HostFailure {
    /// A failure before the host changed anything.
    pub fn before(code: String) -> Self {
        HostFailure {
            code,
            moved: Moved::No,
        }
    }

    /// A failure after the host moved to the new release.
    pub fn after(code: String) -> Self {
        HostFailure {
            code,
            moved: Moved::Yes,
        }
    }
}

/// A host that could not be rolled back: its name and the roll-back's code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackFailure {
    pub host: String,
    pub code: String,
}

/// One host as the wave engine ([`run_waves`]) drives it. `C` is the deploy's shared context
/// (the verifier of the new measurements, the client that reaches the host, ...). Implemented
/// for simulated in-process hosts (any [`super::DeployTarget`]) and for the controllers of real
/// hosts by `bulkhead deploy --cluster`.
pub trait WaveHost<C: ?Sized> {
    fn name(&self) -> &str;
    /// Moves the host to the release and checks it: healthy, and attesting with the release's
    /// measurements. `Err` says whether the host had moved.
    fn update(&mut self, cx: &mut C) -> Result<(), HostFailure>;
    /// Back to the release it ran before this deploy; `Err` carries the audit code. Also called
    /// on a host whose update's outcome is unknown ([`Moved::Unknown`]): on a host that did not
    /// move it must leave the host on its release.
    fn roll_back(&mut self, cx: &mut C) -> Result<(), String>;
    /// Every wave passed: the release becomes the host's committed floor.
    fn commit(&mut self, cx: &mut C) -> Result<(), String>;
}

/// Why the waves stopped before every host moved.
enum Stop {
    /// A host failed its update (its failure already audited).
    Failed {
        wave: usize,
        host: String,
        code: String,
    },
    /// An audit write failed: nothing more is written.
    Audit,
}

/// The wave engine, one copy for every kind of host: the hosts in waves of [`plan_waves`]
/// sizes, each host updated in turn; on the first failure the deploy stops, **every host that
/// moved or may have moved** (earlier hosts of this deploy, the failing one if it had moved or
/// its outcome is unknown) is rolled back, last moved first, later hosts are never touched, and
/// nothing is committed; once every wave passed every host commits. Every step is audited
/// before the next one runs; a failed audit write stops the deploy too (fail closed) and the
/// moved hosts are still rolled back, unaudited (logged with `tracing`, and named in
/// [`DeployError::AuditFailedRolledBack`]). Returns the waves' host names.
pub fn run_waves<C: ?Sized, H: WaveHost<C>>(
    hosts: &mut [H],
    cx: &mut C,
    audit: &DeployAudit<'_>,
) -> Result<Vec<Vec<String>>, DeployError> {
    let all: Vec<String> = hosts.iter().map(|h| format!("host:{}", h.name())).collect();
    let mut moved: Vec<usize> = Vec::new();
    let waves = match move_in_waves(hosts, cx, audit, &mut moved) {
        Ok(waves) => waves,
        Err(Stop::Failed { wave, host, code }) => {
            let r = roll_back_moved(hosts, &moved, cx, Some(audit));
            let audited = r.audited
                && audit
                    .write(
                        EntryKind::Outcome,
                        "Deploy",
                        all,
                        Decision::None,
                        &format!("rolled_back_wave_{wave}"),
                    )
                    .is_ok();
            if !audited {
                return Err(DeployError::AuditFailedRolledBack {
                    rolled_back: r.rolled_back,
                    not_rolled_back: r.not_rolled_back,
                });
            }
            return Err(DeployError::WaveFailed {
                wave,
                host,
                code,
                rolled_back: r.rolled_back.len(),
            });
        }
        Err(Stop::Audit) => {
            tracing::error!(
                hosts = moved.len(),
                "audit write failed mid-deploy; rolling back the moved hosts, unaudited"
            );
            let r = roll_back_moved(hosts, &moved, cx, None);
            return Err(DeployError::AuditFailedRolledBack {
                rolled_back: r.rolled_back,
                not_rolled_back: r.not_rolled_back,
            });
        }
    };
    for h in hosts.iter_mut() {
        let name = h.name().to_string();
        if let Err(code) = h.commit(cx) {
            audit.write(
                EntryKind::Alert,
                "Commit",
                host_res(&name),
                Decision::None,
                &code,
            )?;
            return Err(DeployError::CommitFailed { host: name, code });
        }
    }
    audit.write(EntryKind::Outcome, "Deploy", all, Decision::None, "ok")?;
    Ok(waves)
}

fn host_res(name: &str) -> Vec<String> {
    vec![format!("host:{name}")]
}

/// Updates the hosts wave by wave until one fails; `moved` collects (in order) the indices of
/// the hosts that moved or may have moved.
fn move_in_waves<C: ?Sized, H: WaveHost<C>>(
    hosts: &mut [H],
    cx: &mut C,
    audit: &DeployAudit<'_>,
    moved: &mut Vec<usize>,
) -> Result<Vec<Vec<String>>, Stop> {
    let write = |kind, op: &str, res, code: &str| {
        audit
            .write(kind, op, res, Decision::None, code)
            .map_err(|_| Stop::Audit)
    };
    let mut waves: Vec<Vec<String>> = Vec::new();
    let mut start = 0usize;
    for (wave_no, size) in plan_waves(hosts.len()).iter().enumerate() {
        let wave = wave_no + 1;
        let end = start + size;
        let names: Vec<String> = hosts
            .iter()
            .skip(start)
            .take(*size)
            .map(|h| h.name().to_string())
            .collect();
        let res = names.iter().map(|n| format!("host:{n}")).collect();
        write(
            EntryKind::Outcome,
            &format!("DeployWave{wave}"),
            res,
            "wave_started",
        )?;
        tracing::info!(wave, hosts = names.len(), "wave started");
        for i in start..end {
            let Some(h) = hosts.get_mut(i) else { break };
            match h.update(cx) {
                Ok(()) => {
                    moved.push(i);
                    write(EntryKind::Outcome, "DeployHost", host_res(h.name()), "ok")?;
                }
                Err(f) => {
                    let host = h.name().to_string();
                    tracing::error!(wave, host = %host, code = %f.code, moved = ?f.moved, "wave failed; rolling back");
                    if f.moved.may_have() {
                        moved.push(i);
                    }
                    write(EntryKind::Alert, "DeployHost", host_res(&host), &f.code)?;
                    if f.moved == Moved::Unknown {
                        write(
                            EntryKind::Alert,
                            "DeployHost",
                            host_res(&host),
                            "host_outcome_unknown",
                        )?;
                    }
                    return Err(Stop::Failed {
                        wave,
                        host,
                        code: f.code,
                    });
                }
            }
        }
        waves.push(names);
        start = end;
    }
    Ok(waves)
}

/// What a roll-back did.
struct RolledBack {
    rolled_back: Vec<String>,
    not_rolled_back: Vec<RollbackFailure>,
    /// Every roll-back was audited (false: an audit write failed, or there was no audit).
    audited: bool,
}

/// Rolls back the hosts at `moved` (indices, in the order they moved), last first, every one of
/// them even when an audit write fails: each roll-back is audited while the audit log takes
/// records, then only logged.
fn roll_back_moved<C: ?Sized, H: WaveHost<C>>(
    hosts: &mut [H],
    moved: &[usize],
    cx: &mut C,
    mut audit: Option<&DeployAudit<'_>>,
) -> RolledBack {
    let mut out = RolledBack {
        rolled_back: Vec::new(),
        not_rolled_back: Vec::new(),
        audited: audit.is_some(),
    };
    for i in moved.iter().rev() {
        let Some(h) = hosts.get_mut(*i) else { continue };
        let host = h.name().to_string();
        let (kind, code) = match h.roll_back(cx) {
            Ok(()) => {
                tracing::info!(host = %host, "rolled back");
                out.rolled_back.push(host.clone());
                (EntryKind::Outcome, "ok".to_string())
            }
            Err(code) => {
                tracing::error!(host = %host, code = %code, "roll-back failed");
                out.not_rolled_back.push(RollbackFailure {
                    host: host.clone(),
                    code: code.clone(),
                });
                (EntryKind::Alert, code)
            }
        };
        if let Some(a) = audit {
            if a.write(kind, "Rollback", host_res(&host), Decision::None, &code)
                .is_err()
            {
                tracing::error!(host = %host, "audit write failed; the rest of the roll-back goes unaudited");
                out.audited = false;
                audit = None;
            }
        }
    }
    out
}

#[cfg(test)]
#[path = "waves_tests.rs"]
mod tests;
