//! DeployRelease: a 2-of-3 signed release installed on this host and applied under running
//! guests.
//!
//! 1. **Upload** (`PUT /v1/host/artefacts/{sha256}`): the raw bytes of one artefact. The
//!    controller recomputes the SHA-256 and refuses a mismatch, so the upload itself needs no
//!    trust; the file is kept content-addressed (fsync'd) under `release_dir/artefacts/`, with
//!    its SHA-384 (the digest a release manifest names) beside it.
//! 2. **Verify** (`POST /v1/host/releases`): [`bulkhead_rot::release::verify_release`], the one
//!    checker `bulkhead-rot` uses for its hosts, with this host's pinned [`TrustRoot`]
//!    (threshold signatures), environment, the current time (expiry) and the host's floor: the
//!    active release's version in the host record (anti-rollback).
//! 3. **Install**: every artefact of the manifest is copied from the store into a fresh
//!    directory, re-measured there by `Manifest::check_artefacts` (rot's own digest check),
//!    the signed release text kept beside them (`release.json`: the host's supervisor
//!    verifies it itself before it starts the release's controller), fsync'd, then renamed to
//!    `release_dir/v<version>/` (the directory fsync'd too).
//! 4. **Self-test**: the launcher runs `v<version>/bulkhead-hypervisor self-test`.
//! 5. **Apply**: the controller live-updates every running instance's hypervisor to the new
//!    binary (the launcher starts it, so the keeper adopts it after a controller restart); then,
//!    if the release carries `bulkhead-blockcard`, every attached volume's block card is
//!    card-updated to it (the launcher starts the new card; the old card hands it the volume
//!    state and key over a socketpair the controller makes; the hypervisor's `ReplaceBlock`;
//!    the old card exits); then, if it carries `bulkhead-netcard`, every running guest's net
//!    card is replaced in place (`host/net_update.rs`: the old card stopped with SIGTERM, the
//!    release's card started on its port with its sealed key and sequence floor, the NIC
//!    reconnected with `ReconnectNet`; a card that fails is started again on its previous
//!    binary). On the first failure the cards and hypervisors already moved are moved back to
//!    the binaries they ran before (the block card or hypervisor that failed never stopped
//!    serving).
//! 6. **Activate**: the release goes into the host record (fsync'd): new instances start its
//!    hypervisor, a restarted controller keeps using it, and its version is the new floor.
//! 7. **Controller**: if the release carries `bulkhead-controller`, the answer names
//!    `controller_restart: <version>`; after it has gone the controller audits
//!    `DeployRelease:controller-restart ok` (durable) and exits with
//!    [`bulkhead_rot::supervise::EXIT_APPLY_RELEASE`]. Its seccomp filter traps every exec (no
//!    argument rule can pin `execveat` to one file), so the host's supervisor, outside the
//!    filter, verifies the active release itself and starts its controller
//!    ([`bulkhead_rot::supervise::pick_controller`]; the original binary when it does not
//!    verify). The new controller adopts every instance as after a kill -9 and audits
//!    `DeployRelease:controller-applied ok`. See [`crate::controller`]'s `restart` module.
//!
//! Each step is audited (the controller's lifecycle records), and every refusal is typed
//! ([`DeployError::code`]). Artefacts are at most
//! [`crate::api::MAX_ARTEFACT_BYTES`]: release binaries are stripped of debug information
//! (`objcopy --strip-debug`) before they are measured and signed.

use std::path::PathBuf;

use bulkhead_rot::measure::{sha384_file, Environment};
use bulkhead_rot::release::{
    verify_release, Manifest, ReleaseError, ReleasePolicy, SignedRelease, TrustRoot,
};
use sha2::{Digest, Sha256, Sha384};

use crate::durable::{sync_dir, write_durable};
use crate::launcher::{release_path, RELEASE_HYPERVISOR};
use crate::record::{ReleaseArtefactRecord, ReleaseRecord};

/// Most artefacts kept in the upload store at once (each at most
/// [`crate::api::MAX_ARTEFACT_BYTES`]).
pub const MAX_STORED_ARTEFACTS: usize = 32;
/// The upload store under the release directory.
const ARTEFACT_DIR: &str = "artefacts";

/// Why a deploy step was refused. Codes are stable: they go into the audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeployError {
    #[error("this host takes no releases (no trust root or release directory configured)")]
    Unavailable,
    #[error("the uploaded bytes do not hash to the SHA-256 in the path")]
    ArtefactDigestMismatch,
    #[error("the artefact store is full")]
    StoreFull,
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error("the release has no {RELEASE_HYPERVISOR} binary")]
    NoHypervisor,
    #[error("release {0} is already the active release")]
    AlreadyActive(u64),
    #[error("installing the release failed")]
    Install,
    #[error("the release's hypervisor failed its self-test")]
    SelfTestFailed,
    #[error("live update of instance {instance} failed ({code}); every hypervisor was moved back")]
    LiveUpdateFailed {
        instance: String,
        code: &'static str,
    },
    #[error("card update of volume {volume} on instance {instance} failed ({code}); every card and hypervisor was moved back")]
    CardUpdateFailed {
        instance: String,
        volume: String,
        code: &'static str,
    },
    #[error("net-card update on instance {instance} failed ({code}); its card serves on its previous binary, every card and hypervisor was moved back")]
    NetCardUpdateFailed {
        instance: String,
        code: &'static str,
    },
    #[error("recording the active release failed; every hypervisor was moved back")]
    Record,
}

impl DeployError {
    pub fn code(&self) -> &'static str {
        match self {
            DeployError::Unavailable => "deploy_unavailable",
            DeployError::ArtefactDigestMismatch => "artefact_digest_mismatch",
            DeployError::StoreFull => "artefact_store_full",
            DeployError::Release(e) => e.code(),
            DeployError::NoHypervisor => "release_no_hypervisor",
            DeployError::AlreadyActive(_) => "release_already_active",
            DeployError::Install => "release_install_failed",
            DeployError::SelfTestFailed => "release_self_test_failed",
            DeployError::LiveUpdateFailed { .. } => "release_live_update_failed",
            DeployError::CardUpdateFailed { .. } => "release_card_update_failed",
            DeployError::NetCardUpdateFailed { .. } => "release_net_card_update_failed",
            DeployError::Record => "release_record_failed",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            DeployError::Unavailable => 503,
            DeployError::Release(
                ReleaseError::Unsigned | ReleaseError::TooFewSignatures { .. },
            ) => 403,
            DeployError::Release(ReleaseError::Rollback { .. }) | DeployError::AlreadyActive(_) => {
                409
            }
            DeployError::StoreFull => 507,
            DeployError::Release(_)
            | DeployError::ArtefactDigestMismatch
            | DeployError::NoHypervisor
            | DeployError::SelfTestFailed => 422,
            DeployError::Install
            | DeployError::LiveUpdateFailed { .. }
            | DeployError::CardUpdateFailed { .. }
            | DeployError::NetCardUpdateFailed { .. }
            | DeployError::Record => 500,
        }
    }
}

/// What this host trusts releases by, and where it keeps them.
#[derive(Debug, Clone)]
pub struct ReleaseStore {
    pub root: TrustRoot,
    pub environment: Environment,
    /// `artefacts/` (uploads) and `v<N>/` (installed releases); the launcher's `release_dir`.
    pub dir: PathBuf,
}

fn io_install(e: std::io::Error) -> DeployError {
    tracing::error!(error = %e, "release install I/O failed");
    DeployError::Install
}

impl ReleaseStore {
    fn artefacts(&self) -> PathBuf {
        self.dir.join(ARTEFACT_DIR)
    }

    /// Stores one uploaded artefact under its SHA-256 after checking it. Idempotent.
    pub fn store_artefact(&self, sha256: &[u8; 32], bytes: &[u8]) -> Result<u64, DeployError> {
        if Sha256::digest(bytes)[..] != sha256[..] {
            return Err(DeployError::ArtefactDigestMismatch);
        }
        let dir = self.artefacts();
        std::fs::create_dir_all(&dir).map_err(io_install)?;
        let name = hex::encode(sha256);
        let path = dir.join(&name);
        if !path.is_file() {
            let held = std::fs::read_dir(&dir)
                .map_err(io_install)?
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_str().is_some_and(|n| n.len() == 64))
                .count();
            if held >= MAX_STORED_ARTEFACTS {
                return Err(DeployError::StoreFull);
            }
            let sha384 = hex::encode(Sha384::digest(bytes));
            write_durable(
                &dir.join(format!("{name}.sha384")),
                sha384.as_bytes(),
                0o600,
            )
            .map_err(io_install)?;
            write_durable(&path, bytes, 0o600).map_err(io_install)?;
        }
        u64::try_from(bytes.len()).map_err(|_| DeployError::Install)
    }

    /// The stored file whose SHA-384 is `sha384` (hex), if any.
    fn find_by_sha384(&self, sha384: &str) -> Option<PathBuf> {
        let dir = self.artefacts();
        std::fs::read_dir(&dir)
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let n = e.file_name().to_str()?.strip_suffix(".sha384")?.to_string();
                let d = std::fs::read_to_string(e.path()).ok()?;
                (d.trim() == sha384).then(|| dir.join(n))
            })
            .next()
    }

    /// Parses and verifies a signed release against this host (see the module docs, step 2).
    pub fn verify(&self, raw: &str, floor: u64, now: u64) -> Result<Manifest, DeployError> {
        let r = SignedRelease::parse(raw.as_bytes())?;
        let m = verify_release(
            &r,
            &ReleasePolicy {
                root: &self.root,
                environment: &self.environment,
                current_version: floor,
                now,
            },
        )?;
        if !m.artefacts.iter().any(|a| a.name == RELEASE_HYPERVISOR) {
            return Err(DeployError::NoHypervisor);
        }
        Ok(m)
    }

    /// Installs the manifest's artefacts from the store into `v<version>/` (step 3). A
    /// directory left from an earlier, never activated install of the same version is
    /// replaced.
    pub fn install(&self, m: &Manifest, signed: &str) -> Result<PathBuf, DeployError> {
        use std::os::unix::fs::PermissionsExt as _;
        let fin = release_path(&self.dir, m.version);
        let tmp = self.dir.join(format!(".install-v{}", m.version));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_install)?;
        for a in &m.artefacts {
            let src =
                self.find_by_sha384(&a.sha384)
                    .ok_or_else(|| ReleaseError::ArtefactMissing {
                        name: a.name.clone(),
                    })?;
            let dst = tmp.join(&a.name);
            std::fs::copy(&src, &dst).map_err(io_install)?;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))
                .map_err(io_install)?;
            std::fs::File::open(&dst)
                .and_then(|f| f.sync_all())
                .map_err(io_install)?;
        }
        // Re-measured where it will run: rot's own check of every digest.
        m.check_artefacts(&tmp)?;
        write_durable(
            &tmp.join(bulkhead_rot::supervise::SIGNED_RELEASE_FILE),
            signed.as_bytes(),
            0o644,
        )
        .map_err(io_install)?;
        sync_dir(&tmp).map_err(io_install)?;
        if fin.exists() {
            std::fs::remove_dir_all(&fin).map_err(io_install)?;
        }
        std::fs::rename(&tmp, &fin).map_err(io_install)?;
        sync_dir(&self.dir).map_err(io_install)?;
        Ok(fin)
    }

    /// The record of an installed release (its artefacts as measured in place).
    pub fn record_of(&self, m: &Manifest) -> Result<ReleaseRecord, DeployError> {
        let dir = release_path(&self.dir, m.version);
        let mut artefacts = Vec::new();
        for a in &m.artefacts {
            let d = sha384_file(&dir.join(&a.name)).map_err(|_| DeployError::Install)?;
            artefacts.push(ReleaseArtefactRecord {
                name: a.name.clone(),
                sha384: hex::encode(d),
            });
        }
        Ok(ReleaseRecord {
            version: m.version,
            artefacts,
        })
    }
}

/// The fuzz target's fixed trust root: three release keys from fixed seeds (test only: never a
/// trust root of a real host), threshold 2.
pub fn fuzz_store() -> Option<(ReleaseStore, Vec<bulkhead_rot::release::ReleaseKey>)> {
    let keys = (1u8..=3)
        .map(|i| bulkhead_rot::release::ReleaseKey::from_secret_text(&hex::encode([i; 32])).ok())
        .collect::<Option<Vec<_>>>()?;
    let root = TrustRoot::new(2, keys.iter().map(|k| k.public()).collect()).ok()?;
    Some((
        ReleaseStore {
            root,
            environment: Environment::parse("dev").ok()?,
            dir: PathBuf::from("/nonexistent"),
        },
        keys,
    ))
}

/// The fuzz target: any bytes as a DeployRelease's release text, verified against
/// [`fuzz_store`]'s root. A typed answer, never a panic.
pub fn fuzz_verify(data: &[u8]) {
    let Some((store, _)) = fuzz_store() else {
        return;
    };
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(m) = store.verify(text, 1, 1) {
            assert!(m.version >= 1);
            assert!(m.artefacts.iter().any(|a| a.name == RELEASE_HYPERVISOR));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bulkhead_rot::measure::EventKind;
    use bulkhead_rot::release::ReleaseKey;
    use bulkhead_rot::tpm::MeasurePcr;
    use std::path::Path;

    fn store(dir: &Path) -> (ReleaseStore, Vec<ReleaseKey>) {
        let keys: Vec<ReleaseKey> = (0..3).map(|_| ReleaseKey::generate().unwrap()).collect();
        let root = TrustRoot::new(2, keys.iter().map(|k| k.public()).collect()).unwrap();
        (
            ReleaseStore {
                root,
                environment: Environment::parse("dev").unwrap(),
                dir: dir.join("releases"),
            },
            keys,
        )
    }

    #[test]
    fn writes_the_fuzz_seed() {
        let (st, keys) = fuzz_store().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let hv = tmp.path().join(RELEASE_HYPERVISOR);
        std::fs::write(&hv, b"#!/bin/sh\nexit 0\n").unwrap();
        let m = Manifest::from_files(
            2,
            Environment::parse("dev").unwrap(),
            u64::MAX,
            MeasurePcr::DEV,
            &[(EventKind::Binary, hv.as_path())],
        )
        .unwrap();
        let mut r = SignedRelease::new(&m).unwrap();
        r.sign(&keys[0]);
        r.sign(&keys[2]);
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/release_verify/signed");
        if std::env::var_os("BULKHEAD_BLESS").is_some() {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, r.to_json().unwrap()).unwrap();
        }
        let seed = std::fs::read_to_string(&p).unwrap();
        assert_eq!(st.verify(&seed, 1, 1).unwrap().version, 2);
        fuzz_verify(seed.as_bytes());
    }

    #[test]
    fn upload_verify_install() {
        let tmp = tempfile::tempdir().unwrap();
        let (s, keys) = store(tmp.path());
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let hv = src.join(RELEASE_HYPERVISOR);
        std::fs::write(&hv, b"#!/bin/sh\nexit 0\n").unwrap();
        let bytes = std::fs::read(&hv).unwrap();
        let sha: [u8; 32] = Sha256::digest(&bytes).into();
        // A wrong digest is refused; the right one stored.
        assert_eq!(
            s.store_artefact(&[0; 32], &bytes),
            Err(DeployError::ArtefactDigestMismatch)
        );
        assert_eq!(s.store_artefact(&sha, &bytes).unwrap(), 17);
        let m = Manifest::from_files(
            2,
            Environment::parse("dev").unwrap(),
            u64::MAX,
            MeasurePcr::DEV,
            &[(EventKind::Binary, hv.as_path())],
        )
        .unwrap();
        let mut r = SignedRelease::new(&m).unwrap();
        let raw = |r: &SignedRelease| r.to_json().unwrap();
        assert_eq!(
            s.verify(&raw(&r), 0, 1).unwrap_err().code(),
            "release_unsigned"
        );
        r.sign(&keys[0]);
        assert_eq!(
            s.verify(&raw(&r), 0, 1).unwrap_err().code(),
            "release_too_few_signatures"
        );
        r.sign(&keys[1]);
        let m = s.verify(&raw(&r), 0, 1).unwrap();
        assert_eq!(
            s.verify(&raw(&r), 3, 1).unwrap_err().code(),
            "release_rollback"
        );
        let signed = raw(&r);
        let dir = s.install(&m, &signed).unwrap();
        assert!(dir.join(RELEASE_HYPERVISOR).is_file());
        assert_eq!(
            std::fs::read_to_string(dir.join(bulkhead_rot::supervise::SIGNED_RELEASE_FILE))
                .unwrap(),
            signed
        );
        let rec = s.record_of(&m).unwrap();
        assert_eq!(rec.version, 2);
        assert_eq!(rec.artefacts[0].sha384, m.artefacts[0].sha384);
        // An artefact never uploaded: typed.
        std::fs::remove_dir_all(s.artefacts()).unwrap();
        assert_eq!(
            s.install(&m, &signed).unwrap_err().code(),
            "release_artefact_missing"
        );
    }
}
