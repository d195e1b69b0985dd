//! The launcher re-verifies every release binary it starts against the trust root it read at
//! start, and executes the descriptor it hashed, not the path.

#![allow(clippy::unwrap_used)]

use super::*;
use bulkhead_rot::measure::EventKind;
use bulkhead_rot::release::{Manifest, ReleaseKey, SignedRelease, TrustRoot};
use bulkhead_rot::supervise::SIGNED_RELEASE_FILE;
use bulkhead_rot::tpm::MeasurePcr;
use std::io::Write as _;

struct Host {
    keys: Vec<ReleaseKey>,
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let keys: Vec<ReleaseKey> = (0..3).map(|_| ReleaseKey::generate().unwrap()).collect();
        let root = TrustRoot::new(2, keys.iter().map(|k| k.public()).collect()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("release-root.json"),
            serde_json::to_vec(&root).unwrap(),
        )
        .unwrap();
        Host { keys, dir }
    }

    fn cfg(&self, with_root: bool) -> LauncherConfig {
        let d = self.dir.path();
        LauncherConfig {
            hypervisor_bin: "/bin/false".into(),
            blockcard_bin: "/bin/false".into(),
            host_cpus: Vec::new(),
            guest_dir: d.join("guest"),
            volume_dir: d.join("volumes"),
            run_dir: d.join("run"),
            host_key: None,
            netcard_bin: None,
            card_tls: None,
            release_dir: Some(d.join("releases")),
            release_root: with_root.then(|| d.join("release-root.json")),
            release_environment: None,
        }
    }

    /// Installs release `v` whose artefact `name` is a copy of `src`, signed by `signers`.
    fn install(&self, v: u64, name: &str, src: &str, signers: &[usize]) -> PathBuf {
        let d = release_path(&self.dir.path().join("releases"), v);
        std::fs::create_dir_all(&d).unwrap();
        let file = d.join(name);
        std::fs::copy(src, &file).unwrap();
        let m = Manifest::from_files(
            v,
            bulkhead_rot::measure::Environment::parse("dev").unwrap(),
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
}

fn refusal<T>(r: Result<T, LaunchRefusal>) -> Option<LaunchRefusal> {
    r.err()
}

#[test]
fn a_verified_release_binary_runs_from_its_checked_descriptor() {
    let h = Host::new();
    let hv = h.install(2, RELEASE_HYPERVISOR, "/bin/true", &[0, 2]);
    let st = LauncherState::new(h.cfg(true));
    let exe = st.binary(BinaryRole::Hypervisor, Some(2)).unwrap();
    assert_eq!(exe.shown, hv);
    assert!(
        exe.run.starts_with("/proc/self/fd/"),
        "{exe:?}",
        exe = exe.run
    );
    // Another file renamed onto the path after the check: what runs is still the checked one.
    let swap = h.dir.path().join("swap");
    std::fs::copy("/bin/false", &swap).unwrap();
    std::fs::rename(&swap, &hv).unwrap();
    assert!(
        run_self_test(&exe.run),
        "the checked /bin/true copy exits 0"
    );
    // Asked again, the swapped file is refused.
    assert_eq!(
        refusal(st.binary(BinaryRole::Hypervisor, Some(2))),
        Some(LaunchRefusal::ReleaseBinaryUnverified)
    );
}

#[test]
fn tampered_symlinked_unsigned_or_rootless_release_binaries_are_refused() {
    let h = Host::new();
    let unverified = Some(LaunchRefusal::ReleaseBinaryUnverified);
    let st = LauncherState::new(h.cfg(true));

    // Tampered after install: the block card a SpawnCard names is not started.
    let card = h.install(2, RELEASE_BLOCKCARD, "/bin/true", &[0, 1]);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&card)
        .unwrap()
        .write_all(b"tail")
        .unwrap();
    assert_eq!(
        refusal(st.binary(BinaryRole::BlockCard, Some(2))),
        unverified
    );
    let mut st = st;
    std::fs::create_dir_all(h.dir.path().join("volumes")).unwrap();
    let (reply, fd) = st.handle(LaunchRequest::SpawnCard {
        backing: Some(h.dir.path().join("volumes/disk")),
        network: None,
        read_only: false,
        queues: 1,
        run_as: None,
        release: Some(2),
    });
    assert!(fd.is_none());
    assert!(
        matches!(
            reply,
            LaunchReply::Refused {
                code: LaunchRefusal::ReleaseBinaryUnverified
            }
        ),
        "{reply:?}"
    );
    assert!(st.children.is_empty(), "nothing started");

    // A symlink to a file that would hash right.
    let hv = h.install(3, RELEASE_HYPERVISOR, "/bin/true", &[0, 1]);
    let real = h.dir.path().join("real");
    std::fs::rename(&hv, &real).unwrap();
    std::os::unix::fs::symlink(&real, &hv).unwrap();
    assert_eq!(
        refusal(st.binary(BinaryRole::Hypervisor, Some(3))),
        unverified
    );

    // Unsigned, or one signature of the two needed.
    h.install(4, RELEASE_NETCARD, "/bin/true", &[]);
    assert_eq!(
        refusal(st.release_binary(RELEASE_NETCARD, Some(4))),
        unverified
    );
    h.install(5, RELEASE_NETCARD, "/bin/true", &[2]);
    assert_eq!(
        refusal(st.release_binary(RELEASE_NETCARD, Some(5))),
        unverified
    );
    // A good release, but a name it does not carry.
    h.install(6, RELEASE_NETCARD, "/bin/true", &[1, 2]);
    assert!(st.release_binary(RELEASE_NETCARD, Some(6)).is_ok());
    assert_eq!(
        refusal(st.binary(BinaryRole::Hypervisor, Some(6))),
        unverified
    );
    // Not installed at all.
    assert_eq!(
        refusal(st.binary(BinaryRole::Hypervisor, Some(9))),
        Some(LaunchRefusal::NoSuchRelease)
    );

    // A launcher started without a trust root starts no release binary, good or not.
    let rootless = LauncherState::new(h.cfg(false));
    assert_eq!(
        refusal(rootless.release_binary(RELEASE_NETCARD, Some(6))),
        unverified
    );
    // The configured binaries are not release binaries.
    assert!(rootless.binary(BinaryRole::Hypervisor, None).is_ok());
}
