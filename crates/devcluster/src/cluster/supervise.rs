//! `bulkhead up` as its hosts' controller supervisor. A host's controller runs `--supervised`;
//! whenever it exits it is started again from the binary [`HostReleases::choose`] picks — the
//! active release's controller when the release verifies here (2-of-3 signatures against the
//! trust root read once when the host was created, no version below the host's floor, the
//! file's SHA-384 the manifest's), else the original binary. Exit status
//! [`EXIT_APPLY_RELEASE`] (DeployRelease recorded a release carrying a controller) is started
//! again at once; any other exit after a backoff (1 s doubling to 30 s, reset once a
//! controller has run a minute). The floor (`floor`, a file in the cluster directory written
//! only here) is raised when a release's controller became ready and is read on every start,
//! including `bulkhead up`'s own start-up, so neither a restart of `bulkhead up` nor a forged
//! host record downgrades the controller. A controller that does not print its ready line
//! within [`READY_DEADLINE`] is killed and the original binary started; when that fails too
//! the host is retried with backoff.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_controller::config::Config;
use bulkhead_controller::supervisor::{start_args, HostReleases, EXIT_APPLY_RELEASE};
use serde_json::Value;

use super::floor::{raise_floor, read_floor};
use super::{spawn_ready_within, Cluster, ClusterError, HostLaunch};

/// How long a (re)started controller has to print its ready line.
pub const READY_DEADLINE: Duration = Duration::from_secs(30);
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A controller that ran this long resets its host's backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// A host's restart bookkeeping.
#[derive(Debug, Clone, Default)]
pub(super) struct RestartState {
    /// Consecutive failed starts or early exits.
    failures: u32,
    /// When the host's controller is due to be started (`None`: it runs, or is not due).
    due: Option<Instant>,
    /// When the running controller became ready.
    started: Option<Instant>,
    /// The ready deadline ([`READY_DEADLINE`] unless a test shortens it).
    deadline: Option<Duration>,
}

impl RestartState {
    fn fail(&mut self, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let shift = self.failures.saturating_sub(1).min(5);
        let wait = (BACKOFF_START * (1u32 << shift)).min(BACKOFF_MAX);
        self.due = Some(now + wait);
        self.started = None;
        wait
    }
}

/// What the supervisor checks host `host`'s releases against, from its configuration `cfg`
/// as `bulkhead up` wrote it (read here once, before the controller first runs).
pub(super) fn host_releases(host: &str, cfg: &Path) -> Option<HostReleases> {
    let c = match Config::load(cfg) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(host, error = %e, "controller configuration unreadable: only the original controller is started");
            return None;
        }
    };
    match HostReleases::from_config(&c) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::info!(host, error = %e, "no release controller is started for this host");
            None
        }
    }
}

/// What [`Cluster::supervise_hosts`] did for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerRestarted {
    pub host: String,
    /// The release whose controller now runs (`None`: the original binary).
    pub release: Option<u64>,
    pub pid: u32,
}

impl Cluster {
    /// Starts again the controllers of hosts whose controller exited: at once after
    /// [`EXIT_APPLY_RELEASE`], after a backoff otherwise; call it periodically. (Tests that
    /// kill controllers on purpose and restart them with [`Cluster::restart_host`] do not call
    /// it.)
    pub fn supervise_hosts(&mut self) -> Vec<ControllerRestarted> {
        let now = Instant::now();
        for l in self.launches.iter_mut() {
            let Some(i) = self.children.iter().position(|(n, _)| *n == l.name) else {
                if l.restart.due.is_none() {
                    l.restart.fail(now);
                }
                continue;
            };
            let st = match self.children[i].1.try_wait() {
                Ok(Some(st)) => st,
                Ok(None) | Err(_) => {
                    if l.restart.started.is_some_and(|t| now - t >= HEALTHY_AFTER) {
                        l.restart.failures = 0;
                    }
                    continue;
                }
            };
            self.children.remove(i);
            if st.code() == Some(EXIT_APPLY_RELEASE) {
                tracing::info!(host = %l.name, "controller exited to apply a release");
                l.restart.due = Some(now);
                l.restart.started = None;
            } else {
                let wait = l.restart.fail(now);
                tracing::error!(host = %l.name, status = %st, wait_s = wait.as_secs_f64(), "THE CONTROLLER EXITED: starting it again after the backoff");
                eprintln!(
                    "bulkhead up: {}: the controller exited ({st}); starting it again in {} s",
                    l.name,
                    wait.as_secs_f64()
                );
            }
        }
        let due: Vec<String> = self
            .launches
            .iter()
            .filter(|l| l.restart.due.is_some_and(|t| t <= now))
            .map(|l| l.name.clone())
            .collect();
        let mut out = Vec::new();
        for name in due {
            match self.start_host_controller(&name, &[]) {
                Ok((r, _)) => out.push(r),
                Err(e) => {
                    let wait = self
                        .launches
                        .iter_mut()
                        .find(|l| l.name == name)
                        .map(|l| l.restart.fail(Instant::now()))
                        .unwrap_or(BACKOFF_MAX);
                    tracing::error!(host = %name, error = %e, "the host's controller could not be started again");
                    eprintln!(
                        "bulkhead up: {name}: the controller could not be started again ({e}); retrying in {} s",
                        wait.as_secs_f64()
                    );
                }
            }
        }
        out
    }

    /// (Re)starts host `name`'s controller from the binary its supervisor picks against the
    /// host's floor, with the same configuration and arguments; falls back to the original
    /// binary when a release's controller does not become ready within [`READY_DEADLINE`].
    /// Returns the controller's ready line too.
    pub(super) fn start_host_controller(
        &mut self,
        name: &str,
        env: &[(&str, &str)],
    ) -> Result<(ControllerRestarted, Value), ClusterError> {
        let launch = self
            .launches
            .iter()
            .find(|l| l.name == name)
            .cloned()
            .ok_or(ClusterError::BadHosts)?;
        // A controller of this host that still runs is stopped first (two would share the
        // host's address and state).
        for (_, c) in self.children.iter_mut().filter(|(n, _)| n == name) {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.retain(|(n, _)| n != name);
        let logs = self.dir.join("logs");
        let deadline = Some(launch.restart.deadline.unwrap_or(READY_DEADLINE));
        let choice = match read_floor(&launch.floor_file) {
            Ok(floor) => launch
                .releases
                .as_ref()
                .map(|h| h.choose(&launch.bin, floor)),
            Err(e) => {
                tracing::error!(host = %name, error = %e, "THE SUPERVISOR'S FLOOR FILE IS UNREADABLE: starting the original controller (repair or remove the file)");
                eprintln!("bulkhead up: {name}: {e}; starting the original controller");
                None
            }
        };
        let started = match choice.as_ref().filter(|c| c.release.is_some()) {
            Some(c) => {
                let mut cmd = launch.command_of(&c.binary);
                cmd.args(start_args(c, &launch.bin))
                    .envs(env.iter().copied());
                match spawn_ready_within(name, &mut cmd, &logs, deadline) {
                    Ok((child, v)) => Some((child, v, c.release)),
                    Err(e) => {
                        tracing::error!(host = %name, release = ?c.release, error = %e, "THE RELEASE'S CONTROLLER DID NOT BECOME READY: starting the original binary");
                        eprintln!(
                            "bulkhead up: {name}: release {:?}'s controller did not become ready ({e}); starting the original binary {}",
                            c.release,
                            launch.bin.display()
                        );
                        None
                    }
                }
            }
            None => None,
        };
        let (child, v, release) = match started {
            Some(s) => s,
            None => {
                let mut cmd = launch.command();
                cmd.envs(env.iter().copied());
                let (c, v) = spawn_ready_within(name, &mut cmd, &logs, deadline)?;
                (c, v, None)
            }
        };
        if let Some(v) = release {
            if let Err(e) = raise_floor(&launch.floor_file, v) {
                tracing::error!(host = %name, release = v, error = %e, "THE SUPERVISOR'S FLOOR COULD NOT BE RAISED");
                eprintln!("bulkhead up: {name}: the floor could not be raised to {v}: {e}");
            }
        }
        if let Some(l) = self.launches.iter_mut().find(|l| l.name == name) {
            l.restart.due = None;
            l.restart.started = Some(Instant::now());
        }
        let pid = child.id();
        self.children.push((name.to_string(), child));
        Ok((
            ControllerRestarted {
                host: name.to_string(),
                release,
                pid,
            },
            v,
        ))
    }
}

impl HostLaunch {
    /// This host's controller command with `bin` as the program (the original binary or a
    /// release's controller).
    pub(super) fn command_of(&self, bin: &Path) -> Command {
        let mut c = match &self.net {
            Some(x) => super::netns::command_in(x, bin),
            None => Command::new(bin),
        };
        c.arg("--config").arg(&self.config).args(&self.args);
        c
    }
}

#[cfg(test)]
#[path = "supervise_tests.rs"]
mod tests;
