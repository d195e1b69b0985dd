//! The storage node on the rbd engine, against a real Ceph cluster (`scripts/with-ceph.sh`
//! exports `BULKHEAD_CEPH_CONF`, `_POOL`, `_ID`, `_KEYRING`): write/read through the node,
//! the image holds exactly what the host wrote, fencing, kill -9 and restart, delete removes
//! the image. Without a cluster: `skip_or_fail` (a failure under `BULKHEAD_REQUIRE_ALL=1`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::process::Command;

use harness::*;

const MIB: u64 = 1 << 20;

struct Ceph {
    conf: String,
    pool: String,
    id: String,
    keyring: String,
}

fn ceph() -> Option<Ceph> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        var("BULKHEAD_CEPH_CONF"),
        var("BULKHEAD_CEPH_POOL"),
        var("BULKHEAD_CEPH_ID"),
        var("BULKHEAD_CEPH_KEYRING"),
    ) {
        (Some(conf), Some(pool), Some(id), Some(keyring)) => Some(Ceph {
            conf,
            pool,
            id,
            keyring,
        }),
        _ => None,
    }
}

impl Ceph {
    fn rbd(&self, args: &[&str]) -> std::process::Output {
        Command::new("rbd")
            .args([
                "--conf",
                &self.conf,
                "--id",
                &self.id,
                "--keyring",
                &self.keyring,
            ])
            .args(args)
            .output()
            .unwrap()
    }

    /// The image's bytes, read by Ceph's own tool.
    fn image(&self, name: &str) -> Vec<u8> {
        let out = self.rbd(&[
            "export",
            "--no-progress",
            &format!("{}/{name}", self.pool),
            "-",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn exists(&self, name: &str) -> bool {
        self.rbd(&["info", &format!("{}/{name}", self.pool)])
            .status
            .success()
    }
}

#[test]
fn rbd_engine_write_read_fence_restart_delete() {
    let Some(c) = ceph() else {
        bulkhead_testkit::skip_or_fail(
            "BULKHEAD_CEPH_CONF/_POOL/_ID/_KEYRING unset: run under scripts/with-ceph.sh",
        );
        return;
    };
    if !have_qemu() {
        bulkhead_testkit::skip_or_fail("qemu-storage-daemon and qemu-io are not installed");
        return;
    }
    let pki = Pki::new();
    let state = tempfile::tempdir().unwrap();
    let opts = NodeOpts {
        args: vec!["--engine".into(), "rbd".into()],
    };
    let mut node = StorageNode::start(&pki, state.path(), opts);
    let cp = pki.control_client("control");
    let id = format!("vol-c{}", std::process::id());
    let v = create(&node, &cp, &id, 8 * MIB);
    assert_eq!(v.volume.engine, bulkhead_storage_proto::Engine::Rbd);
    assert!(c.exists(&id), "no RBD image after CreateVolume");
    assert!(
        !node.volume_file(&id).exists(),
        "the rbd engine made a file"
    );
    grant(&node, &cp, &id, "host-1", 1);

    let h1 = pki.qemu_creds(&pki.ca, "host-1");
    let mut live = LiveClient::open(&node, &h1, &id);
    // FUA writes: acknowledged only once durable in Ceph (through librbd's cache).
    let out = live.run("write -f -P 0xc3 0 64k", &["wrote", "failed", "can't open"]);
    assert!(out.contains("wrote 65536/65536"), "{out}");
    let out = live.run("write -f -P 0x3c 4M 4k", &["wrote", "failed"]);
    assert!(out.contains("wrote 4096/4096"), "{out}");
    // The node never transforms data: the image holds what the host wrote.
    let img = c.image(&id);
    assert_eq!(img.len() as u64, 8 * MIB);
    assert!(img[..65536].iter().all(|&b| b == 0xc3));
    assert!(img[4 << 20..(4 << 20) + 4096].iter().all(|&b| b == 0x3c));
    assert!(img[65536..69632].iter().all(|&b| b == 0));

    // Fencing.
    let g = grant(&node, &cp, &id, "host-2", 2);
    assert_eq!(g.cut_connections, 1);
    let out = live.run("write -P 0x13 128k 4k", &["wrote", "failed", "error"]);
    assert!(
        !out.contains("wrote 4096/4096"),
        "host-1 wrote after the fence:\n{out}"
    );
    drop(live);
    let (ok, out) = qemu_io(&node, &h1, &id, &["read 0 4k"]);
    assert!(!ok, "host-1 reconnected after the fence:\n{out}");
    node.wait_audit(&[
        "\"caller\":\"host-1\"",
        &format!("volume:{id}"),
        "not_granted",
    ]);
    let h2 = pki.qemu_creds(&pki.ca, "host-2");
    let (ok, out) = qemu_io(
        &node,
        &h2,
        &id,
        &[
            "read -P 0xc3 0 64k",
            "read -P 0 128k 4k",
            "write -P 0x22 1M 4k",
        ],
    );
    assert!(ok, "{out}");

    // kill -9 of the node and its engine; the grant and the data are there after.
    node.restart(&pki);
    let (ok, out) = qemu_io(
        &node,
        &h2,
        &id,
        &["read -P 0x22 1M 4k", "read -P 0x3c 4M 4k"],
    );
    assert!(ok, "{out}");
    let (ok, _) = qemu_io(&node, &h1, &id, &["read 0 4k"]);
    assert!(!ok, "the fenced host opened the volume after a restart");

    // Delete removes the image.
    let d = delete(&node, &cp, &id);
    assert!(d.deleted);
    assert!(
        !c.exists(&id),
        "the RBD image is still there after DeleteVolume"
    );
    assert!(list(&node, &cp).volumes.is_empty());
}
