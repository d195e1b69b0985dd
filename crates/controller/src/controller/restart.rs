//! DeployRelease's last step for a release that carries `bulkhead-controller`: the controller
//! exits so that its supervisor starts the release's controller.
//!
//! The controller's filter traps every exec (no argument rule can pin `execveat` to one file),
//! so it never starts a program itself. Once the release is installed, applied to the
//! hypervisors and cards and recorded as active, the deploy is answered with
//! `controller_restart: N`; after [`ANSWER_GRACE`] the controller takes the deploy lock, makes
//! `DeployRelease:controller-restart ok` durable (and with it every record queued before it)
//! and the process exits with [`EXIT_APPLY_RELEASE`]. Keepers, hypervisors, cards and guests
//! run on, as after a kill -9. The supervisor (outside the filter) verifies the active release
//! itself and starts its controller, or the original binary
//! ([`bulkhead_rot::supervise::pick_controller`]); the new process adopts every instance and
//! audits `DeployRelease:controller-applied`.

use std::time::Duration;

use super::Controller;

use bulkhead_rot::supervise::{EXIT_APPLY_RELEASE, RELEASE_CONTROLLER};

/// How long the controller waits after DeployRelease answered before it exits, so the answer
/// reaches the caller before the process (and its connections) go.
pub const ANSWER_GRACE: Duration = Duration::from_millis(500);

impl Controller {
    /// This controller exits for its supervisor (it runs `--supervised`) when a deploy records
    /// a release carrying a controller: `requests` receives that release's version (the receiver runs
    /// [`Controller::prepare_release_exit`] and exits).
    pub fn with_restart(mut self, requests: tokio::sync::mpsc::UnboundedSender<u64>) -> Self {
        self.restart = Some(requests);
        self
    }

    /// This process runs release `version`'s controller binary (its supervisor started it).
    pub fn with_controller_release(mut self, version: Option<u64>) -> Self {
        self.controller_release = version;
        self
    }

    /// Called by DeployRelease once release `v` is active: if the release carries a controller
    /// and this controller has a supervisor queue, the exit is queued and `Some(v)` answered.
    pub(super) async fn schedule_controller_restart(
        &self,
        record: &crate::record::ReleaseRecord,
        v: u64,
    ) -> Option<u64> {
        if !record.carries(RELEASE_CONTROLLER) {
            return None;
        }
        match &self.restart {
            Some(tx) if tx.send(v).is_ok() => Some(v),
            _ => {
                tracing::warn!(
                    version = v,
                    "the release's controller is installed; this controller is not supervised (no --supervised) and serves on"
                );
                self.audit_step(
                    "controller-restart",
                    v,
                    None,
                    "controller_restart_unsupervised",
                )
                .await;
                None
            }
        }
    }

    /// Runs on the restart task, after the DeployRelease answer: waits [`ANSWER_GRACE`], takes
    /// the deploy lock (held until the process exits: no deploy starts) and makes
    /// `DeployRelease:controller-restart ok` durable. Returns the deploy lock's guard when the
    /// caller is to exit with [`EXIT_APPLY_RELEASE`] now; `None` (the audit log unavailable)
    /// leaves this controller serving.
    pub async fn prepare_release_exit(&self, v: u64) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        tokio::time::sleep(ANSWER_GRACE).await;
        let one = self.deploying.lock().await;
        match self
            .audit_lifecycle_about(
                "DeployRelease:controller-restart",
                vec![format!("release:v{v}")],
                "ok",
            )
            .await
        {
            Ok(_) => {
                tracing::info!(
                    version = v,
                    code = EXIT_APPLY_RELEASE,
                    "exiting: the supervisor starts the release's controller"
                );
                Some(one)
            }
            Err(e) => {
                tracing::error!(error = %e, "audit unavailable: the controller does not exit for its release");
                None
            }
        }
    }
}
