//! The supervise loop with stand-in controllers: shell scripts that print a ready line naming
//! themselves and exit with the status a test writes to a file. A release's script is signed
//! 2-of-3 like a release's controller, so the choice is the real one.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulkhead_controller::record::{HostRecord, ReleaseRecord};
use bulkhead_controller::supervisor::HostReleases;
use bulkhead_rot::measure::{Environment, EventKind};
use bulkhead_rot::release::{Manifest, ReleaseKey, SignedRelease, TrustRoot};
use bulkhead_rot::supervise::{RELEASE_CONTROLLER, SIGNED_RELEASE_FILE};
use bulkhead_rot::tpm::MeasurePcr;

use super::super::floor::{floor_path, raise_floor, read_floor};
use super::super::{Cluster, HostLaunch};
use super::RestartState;

const HOST: &str = "host-1";

/// A controller stand-in: prints `{"event":"ready","binary":LABEL}` (unless `ready` is false),
/// then exits with the status found in `<dir>/exit` once that file appears.
fn script(label: &str, dir: &Path, ready: bool) -> String {
    let exit = dir.join("exit");
    let ready = if ready {
        format!("echo '{{\"event\":\"ready\",\"binary\":\"{label}\"}}'\n")
    } else {
        String::new()
    };
    format!(
        "#!/bin/sh\n{ready}while [ ! -e {e} ]; do sleep 0.02; done\ncode=$(cat {e})\nrm -f {e}\nexit $code\n",
        e = exit.display()
    )
}

fn write_exec(p: &Path, body: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, body).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

struct Fixture {
    dir: tempfile::TempDir,
    keys: Vec<ReleaseKey>,
    releases: HostReleases,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<ReleaseKey> = (0..3).map(|_| ReleaseKey::generate().unwrap()).collect();
        let root = TrustRoot::new(2, keys.iter().map(|k| k.public()).collect()).unwrap();
        let hd = dir.path().join(HOST);
        std::fs::create_dir_all(hd.join("logs")).unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        write_exec(
            &dir.path().join("bin/bulkhead-controller"),
            &script("original", dir.path(), true),
        );
        let releases = HostReleases {
            record: hd.join("host-record"),
            release_dir: hd.join("releases"),
            root,
            environment: Environment::parse("dev").unwrap(),
        };
        Fixture {
            dir,
            keys,
            releases,
        }
    }

    /// Installs release `v` whose controller is a stand-in (signed by keys 0 and 2).
    fn install(&self, v: u64, ready: bool) {
        let body = script(&format!("v{v}"), self.dir.path(), ready);
        self.install_file(v, RELEASE_CONTROLLER, &body);
    }

    /// Installs release `v` that carries no controller (only a stand-in hypervisor).
    fn install_without_controller(&self, v: u64) {
        self.install_file(v, "bulkhead-hypervisor", "#!/bin/sh\nexit 0\n");
    }

    /// Installs release `v` carrying one executable `name` with `body`, signed by keys 0 and 2.
    fn install_file(&self, v: u64, name: &str, body: &str) {
        let d = self.releases.release_dir.join(format!("v{v}"));
        let file = d.join(name);
        write_exec(&file, body);
        let m = Manifest::from_files(
            v,
            self.releases.environment.clone(),
            1,
            MeasurePcr::DEV,
            &[(EventKind::Binary, file.as_path())],
        )
        .unwrap();
        let mut r = SignedRelease::new(&m).unwrap();
        r.sign(&self.keys[0]);
        r.sign(&self.keys[2]);
        std::fs::write(d.join(SIGNED_RELEASE_FILE), r.to_json().unwrap()).unwrap();
    }

    /// The host record names `v` as the active release.
    fn activate(&self, v: Option<u64>) {
        HostRecord {
            release: v.map(|version| ReleaseRecord {
                version,
                artefacts: Vec::new(),
            }),
            ..HostRecord::default()
        }
        .store(&self.releases.record)
        .unwrap();
    }

    fn floor_file(&self) -> PathBuf {
        floor_path(self.dir.path(), HOST)
    }

    fn cluster(&self, deadline: Duration) -> Cluster {
        let launch = HostLaunch {
            name: HOST.into(),
            bin: self.dir.path().join("bin/bulkhead-controller"),
            config: self.dir.path().join(HOST).join("controller.toml"),
            args: vec!["--supervised".into()],
            net: None,
            releases: Some(self.releases.clone()),
            floor_file: self.floor_file(),
            restart: RestartState {
                deadline: Some(deadline),
                ..RestartState::default()
            },
        };
        Cluster {
            dir: self.dir.path().to_path_buf(),
            control_addr: String::new(),
            kms_addr: String::new(),
            token_addr: String::new(),
            operator_addr: String::new(),
            host_addrs: Vec::new(),
            replica_addrs: Vec::new(),
            attested: false,
            nets: Vec::new(),
            fabric: None,
            storage: None,
            storage_link: None,
            launches: vec![launch],
            children: Vec::new(),
            sealed_vms: Vec::new(),
            sealed_ready_secs: Vec::new(),
        }
    }

    /// Makes the running stand-in exit with `code`.
    fn exit(&self, code: i32) {
        std::fs::write(self.dir.path().join("exit"), code.to_string()).unwrap();
    }
}

/// Calls `supervise_hosts` until it restarts something (within `within`): what it restarted
/// and how long it took.
fn next_restart(c: &mut Cluster, within: Duration) -> (super::ControllerRestarted, Duration) {
    let t = Instant::now();
    loop {
        let mut r = c.supervise_hosts();
        if let Some(r) = r.pop() {
            return (r, t.elapsed());
        }
        assert!(t.elapsed() < within, "no restart within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn start_up_chooses_the_active_release_and_the_floor_refuses_a_downgrade() {
    let f = Fixture::new();
    f.install(1, true);
    f.install(2, true);
    f.activate(Some(2));
    let mut c = f.cluster(Duration::from_secs(10));
    // Start-up chooses (as `bulkhead up` does): the active release's controller, floor raised.
    let (r, v) = c.start_host_controller(HOST, &[]).unwrap();
    assert_eq!((r.release, v["binary"].as_str()), (Some(2), Some("v2")));
    assert_eq!(read_floor(&f.floor_file()).unwrap(), 2);
    // Exit 75: started again at once, the same release.
    f.exit(75);
    let (r2, took) = next_restart(&mut c, Duration::from_secs(5));
    assert_eq!(r2.release, Some(2));
    assert_ne!(r2.pid, r.pid);
    assert!(took < Duration::from_millis(900), "{took:?}");
    // Any other exit: started again after the backoff (1 s).
    f.exit(3);
    let (r3, took) = next_restart(&mut c, Duration::from_secs(5));
    assert_eq!(r3.release, Some(2));
    assert!(took >= Duration::from_millis(900), "no backoff: {took:?}");
    // A record forged back to release 1, or to none: release 2's controller again.
    for forged in [Some(1), None] {
        f.activate(forged);
        f.exit(75);
        let (r, _) = next_restart(&mut c, Duration::from_secs(5));
        assert_eq!(r.release, Some(2), "downgraded to {forged:?}");
    }
    assert_eq!(read_floor(&f.floor_file()).unwrap(), 2);
    f.activate(Some(1));
    drop(c);
    // A new `bulkhead up` on the same directory: the floor file holds; start-up keeps v2.
    let mut c = f.cluster(Duration::from_secs(10));
    let (r, v) = c.start_host_controller(HOST, &[]).unwrap();
    assert_eq!((r.release, v["binary"].as_str()), (Some(2), Some("v2")));
    // Without the floor file (what a floor of 0 allows) release 1 would have been chosen.
    std::fs::remove_file(f.floor_file()).unwrap();
    let (r, _) = c.start_host_controller(HOST, &[]).unwrap();
    assert_eq!(r.release, Some(1));
}

#[test]
fn a_release_controller_that_never_gets_ready_is_killed_and_the_original_runs() {
    let f = Fixture::new();
    f.install(2, false);
    f.activate(Some(2));
    let mut c = f.cluster(Duration::from_millis(700));
    let t = Instant::now();
    let (r, v) = c.start_host_controller(HOST, &[]).unwrap();
    assert_eq!((r.release, v["binary"].as_str()), (None, Some("original")));
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(read_floor(&f.floor_file()).unwrap(), 0, "floor raised");
    // The host stays supervised: its exit starts it again.
    f.exit(75);
    let (r, _) = next_restart(&mut c, Duration::from_secs(5));
    assert_eq!(r.release, None);
}

#[test]
fn a_corrupt_floor_file_starts_the_original_and_is_left_alone() {
    let f = Fixture::new();
    f.install(2, true);
    f.activate(Some(2));
    raise_floor(&f.floor_file(), 2).unwrap();
    std::fs::write(f.floor_file(), "garbage\n").unwrap();
    let mut c = f.cluster(Duration::from_secs(10));
    let (r, _) = c.start_host_controller(HOST, &[]).unwrap();
    assert_eq!(r.release, None);
    assert_eq!(
        std::fs::read_to_string(f.floor_file()).unwrap(),
        "garbage\n"
    );
}

#[test]
fn a_release_without_a_controller_keeps_the_controller_last_applied() {
    let f = Fixture::new();
    f.install(2, true);
    f.activate(Some(2));
    let mut c = f.cluster(Duration::from_secs(10));
    let (r, _) = c.start_host_controller(HOST, &[]).unwrap();
    assert_eq!(r.release, Some(2));
    // Release 3 carries only a hypervisor: the controller stays release 2's, not the original.
    f.install_without_controller(3);
    f.activate(Some(3));
    f.exit(75);
    let (r, _) = next_restart(&mut c, Duration::from_secs(5));
    assert_eq!(r.release, Some(2), "release 3 carries no controller");
    assert_eq!(read_floor(&f.floor_file()).unwrap(), 2);
}
