//! The supervisor's side of a controller update, for whatever process starts this host's
//! controller (`bulkhead up`'s cluster, a test that is the controller's parent).
//!
//! A controller started with `--supervised` that exits with [`EXIT_APPLY_RELEASE`] recorded a
//! release carrying a controller as the host's active release. What the supervisor takes from
//! where: the trust root, environment, release directory and host-record path come from
//! [`HostReleases::from_config`], which the supervisor calls **once**, before the host's
//! controller first runs (the controller's user can edit `controller.toml` and the trust-root
//! file afterwards; `bulkhead up` never reads them again). On each start
//! [`HostReleases::choose`] reads from the controller's data directory only the active
//! release's number (the host record) and the release's files, and hands them to
//! [`bulkhead_rot::supervise::pick_controller`], which verifies the release itself against the
//! pinned trust root and the supervisor's own floor (kept by the supervisor, not the
//! controller). [`start_args`] adds `--bin-dir` for a release's controller so the binaries it
//! names by default still resolve next to the original.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use bulkhead_rot::measure::Environment;
use bulkhead_rot::release::{PinnedTrust, PinnedTrustError, TrustRoot};
use bulkhead_rot::supervise::RELEASE_CONTROLLER;
pub use bulkhead_rot::supervise::{
    pick_controller, ControllerChoice, ControllerPolicy, PickError, EXIT_APPLY_RELEASE,
};

use crate::config::Config;
use crate::record::HostRecord;

/// The host record's file name, next to the audit log.
pub const HOST_RECORD_FILE: &str = "host-record";

/// Why a host's releases cannot be checked by its supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("this host pins no release trust root")]
    NoTrustRoot,
    #[error("{0}: not a release trust root")]
    TrustRoot(PathBuf),
    #[error("release_environment: want 1-32 of a-z0-9-")]
    Environment,
}

/// What a supervisor checks a host's active release against, from the host's configuration.
#[derive(Debug, Clone)]
pub struct HostReleases {
    pub record: PathBuf,
    pub release_dir: PathBuf,
    pub root: TrustRoot,
    pub environment: Environment,
}

impl HostReleases {
    /// The record, release directory, trust root and environment the controller configured by
    /// `cfg` uses (the same defaults as the controller's). A supervisor calls it once, before
    /// the controller first runs, and keeps the result: the controller can edit its
    /// configuration and the trust-root file afterwards.
    pub fn from_config(cfg: &Config) -> Result<HostReleases, SupervisorError> {
        let root_path = cfg
            .release_root
            .as_ref()
            .ok_or(SupervisorError::NoTrustRoot)?;
        let PinnedTrust { root, environment } =
            PinnedTrust::load(root_path, cfg.release_environment.as_deref()).map_err(
                |e| match e {
                    PinnedTrustError::Read { .. } | PinnedTrustError::Root(_) => {
                        SupervisorError::TrustRoot(root_path.clone())
                    }
                    PinnedTrustError::Environment => SupervisorError::Environment,
                },
            )?;
        Ok(HostReleases {
            record: cfg.audit_log.with_file_name(HOST_RECORD_FILE),
            release_dir: cfg.releases_dir(),
            root,
            environment,
        })
    }

    /// The controller to start: the active release's when it verifies (no version below
    /// `floor`, the supervisor's own: the highest release it started a controller of), else
    /// `original`. A record that cannot be read names no active release. An active release
    /// below a non-zero `floor`, or none (a downgrade: DeployRelease refuses one, so the record
    /// was written by something else), is logged as an error and release `floor`'s controller
    /// is started instead when it still verifies, else the original binary.
    pub fn choose(&self, original: &Path, floor: u64) -> ControllerChoice {
        let mut active = match HostRecord::load(&self.record) {
            Ok(r) => r.release.map(|r| r.version),
            Err(e) => {
                tracing::error!(error = %e, "host record unreadable: starting the original controller");
                None
            }
        };
        if floor > 0 && active.is_none_or(|v| v < floor) {
            tracing::error!(
                active = ?active,
                floor,
                "DOWNGRADE REFUSED: the host record names a release below the supervisor's floor; starting release {floor}'s controller if it still verifies"
            );
            active = Some(floor);
        }
        let policy = ControllerPolicy {
            root: &self.root,
            environment: &self.environment,
            floor,
        };
        let mut c = pick_controller(&self.release_dir, active, &policy, original);
        // A release that carries no controller (a hypervisor- or card-only release deployed
        // after one that did) keeps the controller last applied: the floor's, when it still
        // verifies — never the older original binary.
        let no_controller = match c.refused.as_ref() {
            Some(PickError::NoArtefact { version, name }) if name == RELEASE_CONTROLLER => {
                Some(*version)
            }
            _ => None,
        };
        if let Some(v) = no_controller {
            if floor > 0 && floor < v {
                tracing::info!(
                    active = v,
                    floor,
                    "the active release carries no controller: keeping release {floor}'s"
                );
                c = pick_controller(&self.release_dir, Some(floor), &policy, original);
            }
        }
        match (&c.release, &c.refused) {
            (Some(v), _) => {
                tracing::info!(release = v, binary = %c.binary.display(), "starting the release's controller")
            }
            (None, Some(PickError::NoActiveRelease)) => {}
            (None, Some(e)) => {
                tracing::error!(error = %e, code = e.code(), "the active release's controller does not verify: starting the original binary")
            }
            (None, None) => {}
        }
        c
    }
}

/// The extra arguments a supervisor passes to the controller it starts: for a release's
/// controller, `--bin-dir` with the original binary's directory.
pub fn start_args(choice: &ControllerChoice, original: &Path) -> Vec<OsString> {
    match (choice.release, original.parent()) {
        (Some(_), Some(dir)) => vec!["--bin-dir".into(), dir.as_os_str().to_owned()],
        _ => Vec::new(),
    }
}
