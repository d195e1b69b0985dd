//! DeployRelease's last step for a release that carries `bulkhead-controller`: the binary is
//! installed (measured, in the release's directory) but **not applied**. The controller's
//! filter traps every exec (no argument rule can pin `execveat` to one file, see
//! [`crate::reexec`]), so the step is audited `controller_restart_unsupported` and the running
//! controller serves on; the release's controller runs when the host's supervisor starts it.
//! [`Controller::restart_into`] (re-exec into the installed binary, same pid, hand-over of the
//! listener, keeper and agent connections) is kept for an exec that can be pinned to one file
//! and is not reached.

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
    /// it stays installed and is not applied (this controller's filter traps every exec): the
    /// step is audited `controller_restart_unsupported` and the answer's `controller_restart`
    /// is `None`. Never queues a restart.
    pub(super) async fn schedule_controller_restart(
        &self,
        record: &crate::record::ReleaseRecord,
        v: u64,
    ) -> Option<u64> {
        if record
            .artefacts
            .iter()
            .any(|a| a.name == RELEASE_CONTROLLER)
        {
            let code = ReexecError::Unsupported.code();
            tracing::warn!(
                version = v,
                "the release's controller is installed, not applied: this controller cannot exec"
            );
            self.audit_step("controller-restart", v, None, code).await;
        }
        None
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
