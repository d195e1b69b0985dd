//! Which controller binary a host's supervisor starts.
//!
//! The controller runs under a seccomp filter that traps every exec (no argument rule can pin
//! `execveat` to one file), so it never starts a release's controller itself. DeployRelease
//! installs the release (its signed text in `v<N>/`[`SIGNED_RELEASE_FILE`], every artefact
//! measured), records it as the host's active release, audits `controller-restart` and, when it
//! was started `--supervised`, exits with [`EXIT_APPLY_RELEASE`]. The process that started the controller (its supervisor,
//! outside the filter) then calls [`pick_controller`]: it trusts nothing the old controller
//! says except which release it names as active, and verifies that release itself — the
//! threshold signatures against the pinned [`TrustRoot`], the environment, no version below the
//! supervisor's floor, the directory's version equal to the manifest's, and the SHA-384 of the
//! `bulkhead-controller` file (opened `O_NOFOLLOW`, hashed through that descriptor) equal to the
//! manifest's. Anything short of that starts the original binary (the one the host's measured
//! start named), with the reason typed.

use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use crate::measure::{sha384_read, valid_name, Environment};
use crate::release::{
    verify_release, ReleaseError, ReleasePolicy, SignedRelease, TrustRoot, MAX_RELEASE_BYTES,
};

/// A release's controller binary, as named in its manifest.
pub const RELEASE_CONTROLLER: &str = "bulkhead-controller";
/// The signed release text an installed release keeps in its directory (`v<N>/release.json`).
pub const SIGNED_RELEASE_FILE: &str = "release.json";
/// The controller's exit status after DeployRelease recorded a release carrying a controller:
/// "start me again from the active release's controller" (`EX_TEMPFAIL`; the controller exits
/// with it for nothing else — its start errors exit 2).
pub const EXIT_APPLY_RELEASE: i32 = 75;

/// Why the active release's controller is not started (the original binary is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    #[error("no release is active on this host")]
    NoActiveRelease,
    #[error("release {0}: its signed release cannot be read (missing, a symlink or too large)")]
    SignedReleaseUnreadable(u64),
    #[error("release {version}: {source}")]
    Release {
        version: u64,
        #[source]
        source: ReleaseError,
    },
    #[error("directory v{dir} holds the manifest of release {manifest}")]
    VersionMismatch { dir: u64, manifest: u64 },
    #[error("release {version} carries no {name}")]
    NoArtefact { version: u64, name: String },
    #[error("release {version}: its {name} cannot be opened (missing, a symlink or too large)")]
    ArtefactUnreadable { version: u64, name: String },
    #[error("release {version}: its {name} differs from the manifest's digest")]
    ArtefactDigestMismatch { version: u64, name: String },
}

impl PickError {
    /// Stable code (logged and audited by the supervisor's caller).
    pub fn code(&self) -> &'static str {
        match self {
            PickError::NoActiveRelease => "no_active_release",
            PickError::SignedReleaseUnreadable(_) => "signed_release_unreadable",
            PickError::Release { source, .. } => source.code(),
            PickError::VersionMismatch { .. } => "release_version_mismatch",
            // The controller's own codes (the supervisor audits them since before any other
            // artefact was checked this way).
            PickError::NoArtefact { name, .. } if name == RELEASE_CONTROLLER => {
                "release_no_controller"
            }
            PickError::ArtefactUnreadable { name, .. } if name == RELEASE_CONTROLLER => {
                "controller_unreadable"
            }
            PickError::ArtefactDigestMismatch { name, .. } if name == RELEASE_CONTROLLER => {
                "controller_digest_mismatch"
            }
            PickError::NoArtefact { .. } => "release_no_artefact",
            PickError::ArtefactUnreadable { .. } => "release_artefact_unreadable",
            PickError::ArtefactDigestMismatch { .. } => "release_artefact_digest_mismatch",
        }
    }
}

/// What the supervisor starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerChoice {
    /// The binary to start.
    pub binary: PathBuf,
    /// The release it belongs to (`None`: the original binary).
    pub release: Option<u64>,
    /// Why the active release's controller was not chosen, if one is active and it was not.
    pub refused: Option<PickError>,
}

/// What the supervisor verifies a release's controller against: the host's pinned trust root,
/// its environment, and the lowest version it accepts (the supervisor's own floor: the highest
/// release it has started a controller of, or what the host recorded).
#[derive(Debug, Clone, Copy)]
pub struct ControllerPolicy<'a> {
    pub root: &'a TrustRoot,
    pub environment: &'a Environment,
    pub floor: u64,
}

/// What any release artefact is verified against (the same three things).
pub type ArtefactPolicy<'a> = ControllerPolicy<'a>;

/// Largest release artefact [`verify_release_artefact`] hashes (a binary is far smaller).
pub const MAX_ARTEFACT_BYTES: u64 = 256 * 1024 * 1024;

/// A release artefact that verified: its path and the descriptor its bytes were hashed through
/// (opened `O_NOFOLLOW`, `O_CLOEXEC`). Execute the descriptor (`/proc/self/fd/N`,
/// `execveat(fd, "", AT_EMPTY_PATH)`), not the path: a rename onto the path after the check
/// does not change what the descriptor names.
#[derive(Debug)]
pub struct VerifiedArtefact {
    pub path: PathBuf,
    pub file: std::fs::File,
    pub version: u64,
}

/// Opens `path` for reading without following a symlink in its last component.
fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Verifies release `version` installed under `release_dir` — its signed text (`v<N>/`
/// [`SIGNED_RELEASE_FILE`]) 2-of-3 against the trust root, the environment, no version below
/// the floor, the directory's version equal to the manifest's — and the SHA-384 of its artefact
/// `name` (`v<N>/<name>`, opened `O_NOFOLLOW`, hashed through that descriptor) against the
/// manifest's. Returns the descriptor the bytes were hashed through.
pub fn verify_release_artefact(
    release_dir: &Path,
    version: u64,
    name: &str,
    p: &ArtefactPolicy<'_>,
) -> Result<VerifiedArtefact, PickError> {
    let dir = release_dir.join(format!("v{version}"));
    let mut raw = Vec::new();
    open_nofollow(&dir.join(SIGNED_RELEASE_FILE))
        .and_then(|f| {
            f.take(u64::try_from(MAX_RELEASE_BYTES).unwrap_or(u64::MAX) + 1)
                .read_to_end(&mut raw)
        })
        .map_err(|_| PickError::SignedReleaseUnreadable(version))?;
    let release = |source| PickError::Release { version, source };
    let signed = SignedRelease::parse(&raw).map_err(release)?;
    // Expiry governs whether a release may be deployed, not whether an installed, recorded
    // release may keep running: checked at time 0, so an expired active release is not
    // silently downgraded at the next restart.
    let m = verify_release(
        &signed,
        &ReleasePolicy {
            root: p.root,
            environment: p.environment,
            current_version: p.floor,
            now: 0,
        },
    )
    .map_err(release)?;
    if m.version != version {
        return Err(PickError::VersionMismatch {
            dir: version,
            manifest: m.version,
        });
    }
    let want =
        m.artefacts
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| PickError::NoArtefact {
                version,
                name: name.to_string(),
            })?;
    // Only a plain file name: never a path that leaves the release's directory.
    if !valid_name(name) {
        return Err(PickError::NoArtefact {
            version,
            name: name.to_string(),
        });
    }
    let unreadable = || PickError::ArtefactUnreadable {
        version,
        name: name.to_string(),
    };
    let path = dir.join(name);
    let f = open_nofollow(&path).map_err(|_| unreadable())?;
    if !f.metadata().map_err(|_| unreadable())?.is_file() {
        return Err(unreadable());
    }
    // Hashed through the descriptor just opened (never the path again), at most one byte past
    // the cap read.
    let (digest, total) = sha384_read(&mut (&f).take(MAX_ARTEFACT_BYTES.saturating_add(1)))
        .map_err(|_| unreadable())?;
    if total > MAX_ARTEFACT_BYTES {
        return Err(unreadable());
    }
    if hex::encode(digest) != want.sha384 {
        return Err(PickError::ArtefactDigestMismatch {
            version,
            name: name.to_string(),
        });
    }
    Ok(VerifiedArtefact {
        path,
        file: f,
        version,
    })
}

/// Verifies release `version` installed under `release_dir` and returns its controller's path
/// ([`verify_release_artefact`] for [`RELEASE_CONTROLLER`], whose refusals keep the
/// controller's codes).
pub fn verify_release_controller(
    release_dir: &Path,
    version: u64,
    p: &ControllerPolicy<'_>,
) -> Result<PathBuf, PickError> {
    verify_release_artefact(release_dir, version, RELEASE_CONTROLLER, p).map(|a| a.path)
}

/// The controller binary to start: the active release's (`active`, as the host records it)
/// when [`verify_release_controller`] accepts it, else `original`.
pub fn pick_controller(
    release_dir: &Path,
    active: Option<u64>,
    p: &ControllerPolicy<'_>,
    original: &Path,
) -> ControllerChoice {
    let refused = match active {
        None => PickError::NoActiveRelease,
        Some(v) => match verify_release_controller(release_dir, v, p) {
            Ok(binary) => {
                return ControllerChoice {
                    binary,
                    release: Some(v),
                    refused: None,
                }
            }
            Err(e) => e,
        },
    };
    ControllerChoice {
        binary: original.to_path_buf(),
        release: None,
        refused: Some(refused),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::measure::EventKind;
    use crate::release::{Manifest, ReleaseKey};
    use crate::tpm::MeasurePcr;

    struct Host {
        keys: Vec<ReleaseKey>,
        root: TrustRoot,
        env: Environment,
        dir: tempfile::TempDir,
    }

    fn host() -> Host {
        let keys: Vec<ReleaseKey> = (0..3).map(|_| ReleaseKey::generate().unwrap()).collect();
        let root = TrustRoot::new(2, keys.iter().map(|k| k.public()).collect()).unwrap();
        Host {
            keys,
            root,
            env: Environment::parse("dev").unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    impl Host {
        /// Installs release `v` (a controller file with `body`) signed by `signers`.
        fn install(&self, v: u64, body: &[u8], signers: &[usize]) -> PathBuf {
            let d = self.dir.path().join(format!("v{v}"));
            std::fs::create_dir_all(&d).unwrap();
            let ctl = d.join(RELEASE_CONTROLLER);
            std::fs::write(&ctl, body).unwrap();
            let m = Manifest::from_files(
                v,
                self.env.clone(),
                1,
                MeasurePcr::DEV,
                &[(EventKind::Binary, ctl.as_path())],
            )
            .unwrap();
            let mut r = SignedRelease::new(&m).unwrap();
            for i in signers {
                r.sign(&self.keys[*i]);
            }
            std::fs::write(d.join(SIGNED_RELEASE_FILE), r.to_json().unwrap()).unwrap();
            ctl
        }

        fn pick(&self, active: Option<u64>, floor: u64) -> ControllerChoice {
            pick_controller(
                self.dir.path(),
                active,
                &ControllerPolicy {
                    root: &self.root,
                    environment: &self.env,
                    floor,
                },
                Path::new("/original/bulkhead-controller"),
            )
        }
    }

    fn original(c: &ControllerChoice, code: &str) {
        assert_eq!(c.binary, Path::new("/original/bulkhead-controller"));
        assert_eq!(c.release, None);
        assert_eq!(c.refused.as_ref().map(PickError::code), Some(code), "{c:?}");
    }

    #[test]
    fn a_good_active_release_is_chosen_even_when_expired() {
        let h = host();
        let ctl = h.install(2, b"controller v2", &[0, 2]);
        let c = h.pick(Some(2), 1);
        assert_eq!(c.binary, ctl);
        assert_eq!(c.release, Some(2));
        assert_eq!(c.refused, None);
    }

    #[test]
    fn a_tampered_binary_starts_the_original() {
        let h = host();
        let ctl = h.install(2, b"controller v2", &[0, 1]);
        std::fs::write(&ctl, b"controller v2, edited").unwrap();
        original(&h.pick(Some(2), 0), "controller_digest_mismatch");
    }

    #[test]
    fn unsigned_or_one_of_three_starts_the_original() {
        let h = host();
        h.install(2, b"controller v2", &[]);
        original(&h.pick(Some(2), 0), "release_unsigned");
        h.install(3, b"controller v3", &[1]);
        original(&h.pick(Some(3), 0), "release_too_few_signatures");
        // Two signatures by the same key are one.
        h.install(4, b"controller v4", &[1, 1]);
        original(&h.pick(Some(4), 0), "release_too_few_signatures");
    }

    #[test]
    fn below_the_floor_or_misplaced_or_absent_starts_the_original() {
        let h = host();
        h.install(2, b"controller v2", &[0, 1]);
        original(&h.pick(Some(2), 3), "release_rollback");
        // v2's signed release copied into v5: the directory does not make it release 5.
        let v5 = h.dir.path().join("v5");
        std::fs::create_dir_all(&v5).unwrap();
        for f in [SIGNED_RELEASE_FILE, RELEASE_CONTROLLER] {
            std::fs::copy(h.dir.path().join("v2").join(f), v5.join(f)).unwrap();
        }
        original(&h.pick(Some(5), 0), "release_version_mismatch");
        original(&h.pick(None, 0), "no_active_release");
        original(&h.pick(Some(7), 0), "signed_release_unreadable");
    }

    #[test]
    fn a_symlinked_controller_or_a_release_without_one_starts_the_original() {
        let h = host();
        let ctl = h.install(2, b"controller v2", &[0, 1]);
        let elsewhere = h.dir.path().join("elsewhere");
        std::fs::rename(&ctl, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &ctl).unwrap();
        original(&h.pick(Some(2), 0), "controller_unreadable");
        // A release that carries no controller.
        let d = h.dir.path().join("v3");
        std::fs::create_dir_all(&d).unwrap();
        let hv = d.join("bulkhead-hypervisor");
        std::fs::write(&hv, b"hv").unwrap();
        let m = Manifest::from_files(
            3,
            h.env.clone(),
            1,
            MeasurePcr::DEV,
            &[(EventKind::Binary, hv.as_path())],
        )
        .unwrap();
        let mut r = SignedRelease::new(&m).unwrap();
        r.sign(&h.keys[0]);
        r.sign(&h.keys[1]);
        std::fs::write(d.join(SIGNED_RELEASE_FILE), r.to_json().unwrap()).unwrap();
        original(&h.pick(Some(3), 0), "release_no_controller");
    }

    impl Host {
        /// Installs release `v` carrying one artefact `name` with `body`, signed by `signers`.
        fn install_named(&self, v: u64, name: &str, body: &[u8], signers: &[usize]) -> PathBuf {
            let d = self.dir.path().join(format!("v{v}"));
            std::fs::create_dir_all(&d).unwrap();
            let file = d.join(name);
            std::fs::write(&file, body).unwrap();
            let m = Manifest::from_files(
                v,
                self.env.clone(),
                1,
                MeasurePcr::DEV,
                &[(EventKind::Binary, file.as_path())],
            )
            .unwrap();
            let mut r = SignedRelease::new(&m).unwrap();
            for i in signers {
                r.sign(&self.keys[*i]);
            }
            std::fs::write(d.join(SIGNED_RELEASE_FILE), r.to_json().unwrap()).unwrap();
            file
        }

        fn artefact(&self, v: u64, name: &str, floor: u64) -> Result<VerifiedArtefact, PickError> {
            verify_release_artefact(
                self.dir.path(),
                v,
                name,
                &ArtefactPolicy {
                    root: &self.root,
                    environment: &self.env,
                    floor,
                },
            )
        }
    }

    fn refused(r: Result<VerifiedArtefact, PickError>, code: &str) {
        assert_eq!(r.as_ref().err().map(PickError::code), Some(code), "{r:?}");
    }

    #[test]
    fn an_artefact_verifies_and_its_descriptor_holds_the_checked_bytes() {
        let h = host();
        let card = h.install_named(2, "bulkhead-netcard", b"net card v2", &[1, 2]);
        let a = h.artefact(2, "bulkhead-netcard", 2).unwrap();
        assert_eq!(a.path, card);
        assert_eq!(a.version, 2);
        // A file renamed onto the path after the check does not change what the fd names.
        let other = h.dir.path().join("other");
        std::fs::write(&other, b"something else").unwrap();
        std::fs::rename(&other, &card).unwrap();
        let mut got = Vec::new();
        let mut f = &a.file;
        std::io::Seek::rewind(&mut f).unwrap();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"net card v2");
        // ... and the path now refuses.
        refused(
            h.artefact(2, "bulkhead-netcard", 0),
            "release_artefact_digest_mismatch",
        );
    }

    #[test]
    fn a_tampered_symlinked_unsigned_or_absent_artefact_is_refused() {
        let h = host();
        let card = h.install_named(2, "bulkhead-blockcard", b"block card v2", &[0, 1]);
        std::fs::write(&card, b"block card v2, edited").unwrap();
        refused(
            h.artefact(2, "bulkhead-blockcard", 0),
            "release_artefact_digest_mismatch",
        );

        let card = h.install_named(3, "bulkhead-blockcard", b"block card v3", &[0, 1]);
        let elsewhere = h.dir.path().join("elsewhere");
        std::fs::rename(&card, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &card).unwrap();
        refused(
            h.artefact(3, "bulkhead-blockcard", 0),
            "release_artefact_unreadable",
        );

        h.install_named(4, "bulkhead-hypervisor", b"hv v4", &[]);
        refused(h.artefact(4, "bulkhead-hypervisor", 0), "release_unsigned");
        h.install_named(5, "bulkhead-hypervisor", b"hv v5", &[2]);
        refused(
            h.artefact(5, "bulkhead-hypervisor", 0),
            "release_too_few_signatures",
        );
        h.install_named(6, "bulkhead-hypervisor", b"hv v6", &[0, 2]);
        refused(h.artefact(6, "bulkhead-hypervisor", 7), "release_rollback");
        // Signed, but the release carries no net card; a path is never a name.
        refused(h.artefact(6, "bulkhead-netcard", 0), "release_no_artefact");
        refused(
            h.artefact(6, "../v6/bulkhead-hypervisor", 0),
            "release_no_artefact",
        );
        assert!(h.artefact(6, "bulkhead-hypervisor", 6).is_ok());
    }
}
