//! DeployRelease's last step for a release that carries `bulkhead-controller`: after the
//! answer went out, the controller re-executes itself into the installed binary (same pid,
//! same arguments; see [`crate::reexec`]). The new image adopts every hypervisor and card as a
//! controller restarted after a kill -9 does and continues the same audit chain.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use super::Controller;
use crate::reexec::{self, Handoff, ReexecError};

/// The name of a release's controller binary (as measured in its manifest).
pub const RELEASE_CONTROLLER: &str = "bulkhead-controller";

/// How long the restart waits after DeployRelease answered, so the answer reaches the caller
/// before the process image (and its connections) go.
const ANSWER_GRACE: Duration = Duration::from_millis(500);

/// What the controller needs to re-execute itself: the listening socket it hands over, where
/// its default binaries live, and the queue its restart task reads.
#[derive(Debug, Clone)]
pub struct RestartPlan {
    pub listen_fd: RawFd,
    pub bin_dir: std::path::PathBuf,
    pub requests: tokio::sync::mpsc::UnboundedSender<u64>,
}

impl Controller {
    /// This controller re-executes itself into a release's controller as `plan` says.
    pub fn with_restart(mut self, plan: RestartPlan) -> Self {
        self.restart = Some(plan);
        self
    }

    /// This process runs release `version`'s controller binary (it was re-executed into it).
    pub fn with_controller_release(mut self, version: Option<u64>) -> Self {
        self.controller_release = version;
        self
    }

    /// Called by DeployRelease once release `v` is active: if the release carries a controller,
    /// the restart into it is queued (it runs after the answer) and `Some(v)` goes into the
    /// answer. Without a restart plan the controller is installed and recorded only (audited).
    pub(super) async fn schedule_controller_restart(
        &self,
        record: &crate::record::ReleaseRecord,
        v: u64,
    ) -> Option<u64> {
        if !record
            .artefacts
            .iter()
            .any(|a| a.name == RELEASE_CONTROLLER)
        {
            return None;
        }
        let queued = self
            .restart
            .as_ref()
            .is_some_and(|p| p.requests.send(v).is_ok());
        if !queued {
            let code = ReexecError::NoKeeper.code();
            self.audit_step("controller-restart", v, None, code).await;
            return None;
        }
        Some(v)
    }

    /// Re-executes this controller into release `v`'s installed controller. Runs on the restart
    /// task, after the DeployRelease answer. Returns only if the exec failed: the old image
    /// serves on, the failure audited (`DeployRelease:controller-restart`, typed code).
    pub async fn restart_into(self: &Arc<Self>, v: u64) {
        tokio::time::sleep(ANSWER_GRACE).await;
        let (Some(plan), Some(store)) = (self.restart.clone(), self.releases.clone()) else {
            return;
        };
        // No deploy runs while the image goes.
        let _one = self.deploying.lock().await;
        let binary = crate::launcher::release_path(&store.dir, v).join(RELEASE_CONTROLLER);
        // Durable before the exec: this record and, the writer being in order, every record
        // queued before it (the DeployRelease outcome among them).
        if let Err(e) = self
            .audit_lifecycle_about(
                "DeployRelease:controller-restart",
                vec![format!("release:v{v}")],
                "ok",
            )
            .await
        {
            tracing::error!(error = %e, "audit unavailable: the controller does not restart");
            return;
        }
        let instances = Arc::clone(&self.instances);
        let attest = Arc::clone(&self.attest);
        let failed = tokio::task::spawn_blocking(move || {
            let mut out = ReexecError::NoKeeper;
            instances.with_keeper_held(&mut |keeper| {
                let Some(keeper) = keeper else { return };
                out = attest.with_connection_held(|agent| {
                    let h = Handoff {
                        release: v,
                        listen: plan.listen_fd,
                        keeper,
                        agent,
                        bin_dir: plan.bin_dir.clone(),
                    };
                    reexec::exec_release(&binary, &h)
                });
            });
            out
        })
        .await;
        let code = match &failed {
            Ok(e) => {
                tracing::error!(error = %e, version = v, "the release's controller could not be started; this controller serves on");
                e.code()
            }
            Err(_) => "internal",
        };
        self.audit_step("controller-restart", v, None, code).await;
    }
}
