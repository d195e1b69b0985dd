//! `bulkhead up` as its hosts' controller supervisor: a controller that exits with
//! [`EXIT_APPLY_RELEASE`] (DeployRelease recorded a release carrying a controller) is started
//! again from the binary [`HostReleases::choose`] picks — the active release's controller when
//! the release verifies here (2-of-3 signatures against the host's pinned trust root, no
//! version below what this supervisor started before, the file's SHA-384 the manifest's), else
//! the original binary. A release's controller that does not become ready is replaced by the
//! original binary, loudly. A restart after a kill -9 ([`Cluster::restart_host`]) picks the same
//! way, so it does not silently downgrade the controller.

use std::process::Command;

use bulkhead_controller::config::Config;
use bulkhead_controller::supervisor::{start_args, HostReleases, EXIT_APPLY_RELEASE};

use super::{spawn_ready, Cluster, ClusterError, HostLaunch};

/// What [`Cluster::supervise_hosts`] did for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerRestarted {
    pub host: String,
    /// The release whose controller now runs (`None`: the original binary).
    pub release: Option<u64>,
    pub pid: u32,
}

impl Cluster {
    /// Starts the controllers of hosts whose controller exited with [`EXIT_APPLY_RELEASE`];
    /// call it periodically. Other exits are left alone (a test kills controllers on purpose
    /// and restarts them with [`Cluster::restart_host`]).
    pub fn supervise_hosts(&mut self) -> Vec<ControllerRestarted> {
        let mut due = Vec::new();
        for (name, child) in self.children.iter_mut() {
            if !self.launches.iter().any(|l| l.name == *name) {
                continue;
            }
            if let Ok(Some(st)) = child.try_wait() {
                if st.code() == Some(EXIT_APPLY_RELEASE) {
                    due.push(name.clone());
                }
            }
        }
        let mut out = Vec::new();
        for name in due {
            tracing::info!(host = %name, "controller exited to apply a release");
            match self.start_host_controller(&name, &[]) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::error!(host = %name, error = %e, "the host's controller could not be started again");
                    eprintln!(
                        "bulkhead up: {name}: the controller could not be started again: {e}"
                    );
                }
            }
        }
        out
    }

    /// (Re)starts host `name`'s controller from the binary its supervisor picks, with the
    /// same configuration and arguments; falls back to the original binary when a release's
    /// controller does not become ready.
    pub(super) fn start_host_controller(
        &mut self,
        name: &str,
        env: &[(&str, &str)],
    ) -> Result<ControllerRestarted, ClusterError> {
        let launch = self
            .launches
            .iter()
            .find(|l| l.name == name)
            .cloned()
            .ok_or(ClusterError::BadHosts)?;
        self.children.retain(|(n, _)| n != name);
        let logs = self.dir.join("logs");
        let choice = Config::load(&launch.config)
            .ok()
            .and_then(|cfg| HostReleases::from_config(&cfg).ok())
            .map(|h| h.choose(&launch.bin, launch.controller_floor));
        let started = match choice.as_ref().filter(|c| c.release.is_some()) {
            Some(c) => {
                let mut cmd = launch.command_of(&c.binary);
                cmd.args(start_args(c, &launch.bin))
                    .envs(env.iter().copied());
                match spawn_ready(name, &mut cmd, &logs) {
                    Ok((child, _)) => Some((child, c.release)),
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
        let (child, release) = match started {
            Some(s) => s,
            None => {
                let mut cmd = launch.command();
                cmd.envs(env.iter().copied());
                (spawn_ready(name, &mut cmd, &logs)?.0, None)
            }
        };
        if let (Some(v), Some(l)) = (release, self.launches.iter_mut().find(|l| l.name == name)) {
            l.controller_floor = l.controller_floor.max(v);
        }
        let pid = child.id();
        self.children.push((name.to_string(), child));
        Ok(ControllerRestarted {
            host: name.to_string(),
            release,
            pid,
        })
    }
}

impl HostLaunch {
    /// This host's controller command with `bin` as the program (the original binary or a
    /// release's controller).
    pub(super) fn command_of(&self, bin: &std::path::Path) -> Command {
        let mut c = match &self.net {
            Some(x) => super::netns::command_in(x, bin),
            None => Command::new(bin),
        };
        c.arg("--config").arg(&self.config).args(&self.args);
        c
    }
}
