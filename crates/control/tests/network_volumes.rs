//! Network volumes with real guests, cards and a real storage node (issue 15): a volume written
//! by a guest on one host is read by a guest on the other; the host that holds it is killed
//! whole while its guest writes, the volume is force-detached (the storage node fences that
//! host) and attached on the surviving host, where every write the dead guest saw acknowledged
//! is there; the dead host's certificate can no longer open the volume; the storage holds only
//! ciphertext, which an independent decryptor opens with the data key; DeleteVolume crypto-erases
//! the key (the KMS refuses it to everyone) and releases the storage. Snapshots ride the same
//! boots: a snapshot of the detached volume (ciphertext only on the node), a larger volume made
//! from it that outlives the original and is read by the checker guest already running, and
//! once clone and snapshot are deleted the key family is refused to everyone.
//!
//! `file_engine_…` runs in `make test`'s workspace line; `rbd_engine_…` runs the same story on
//! a real single-node Ceph under `scripts/with-ceph.sh` (its own Makefile line).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use bulkhead_devcluster::cluster::{self, Cluster, ReplicaOptions, StartOptions, StorageEngine};
use serde_json::json;

mod common;
use common::*;

/// 32 bytes, assembled inside the guest so it exists nowhere else in plaintext.
const MARKER: &[u8; 32] = b"MOVING-VOLUME-MARKER-7731-QWERTY";
const WRITER: &str = "while [ ! -e /sys/block/vda ]; do sleep 1; done\n\
    s=MOVING-VOLUME-; s=${s}MARKER-7731-QWERTY\n\
    printf %s $s | dd of=/dev/vda bs=32 seek=128 conv=fsync 2>/dev/null && echo marker-written\n";
/// Reads the marker back, then appends numbered 16-byte counters (one per 512-byte sector from
/// sector 2049), each fsync'd before the guest prints that it was acknowledged.
const READER_COUNTER: &str = "while [ ! -e /sys/block/vda ]; do sleep 1; done\n\
    echo 3 >/proc/sys/vm/drop_caches\n\
    R=$(dd if=/dev/vda bs=32 skip=128 count=1 2>/dev/null)\n\
    echo \"read-back:$R\"\n\
    n=1\n\
    while :; do printf 'CTR%013d' $n | dd of=/dev/vda bs=512 seek=$((2048+n)) conv=fsync 2>/dev/null || break; echo acked-$n; n=$((n+1)); done\n";
/// Counts the counters present from 1 up, and reads the marker again.
const CHECKER: &str = "while [ ! -e /sys/block/vda ]; do sleep 1; done\n\
    echo 3 >/proc/sys/vm/drop_caches\n\
    n=1\n\
    while :; do v=$(dd if=/dev/vda bs=16 skip=$(( (2048+n)*32 )) count=1 2>/dev/null); [ \"$v\" = \"$(printf 'CTR%013d' $n)\" ] || break; n=$((n+1)); done\n\
    echo \"counters-present:$((n-1))-end\"\n\
    R=$(dd if=/dev/vda bs=32 skip=128 count=1 2>/dev/null)\n\
    echo \"marker-again:$R\"\n\
    while [ -e /sys/block/vda ]; do sleep 1; done\n\
    D=; while [ -z \"$D\" ]; do for d in /sys/block/vd*; do [ -e \"$d\" ] && D=/dev/${d##*/}; done; sleep 1; done\n\
    R=$(dd if=$D bs=32 skip=128 count=1 2>/dev/null)\n\
    echo \"clone-read:$R\"\n";

fn start(dir: &Path, guest: &Path, engine: StorageEngine) -> Cluster {
    let c = cluster::start_replicated(
        dir,
        &StartOptions {
            hosts: 2,
            controller_args: vec![
                "--backend".into(),
                "host".into(),
                "--guest-dir".into(),
                guest.display().to_string(),
            ],
            bins: bins(),
            record: false,
            poll_interval_ms: 500,
            database_url: None,
            attest: None,
            netns: None,
        },
        &ReplicaOptions {
            storage: Some(engine),
            ..ReplicaOptions::default()
        },
    )
    .unwrap();
    ran_fully(&c, 2);
    assert!(c.storage.is_some(), "the cluster has a storage node");
    c
}

fn run_with(a: &Customer, script: &str) -> String {
    let v = a.ok(
        "RunInstances",
        json!({"ImageId": "test-guest", "VcpuCount": 1, "UserData": script}),
    );
    v["Instances"][0]["InstanceId"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The highest `acked-N` on a console.
fn last_ack(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("acked-"))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// Kills every process in host `host`'s network namespace (controller, keeper, hypervisors,
/// cards, attestation agent): the host is gone, as if it lost power.
fn kill_host(c: &mut Cluster, host: &str) {
    c.kill9(host);
    let idx: usize = host.trim_start_matches("host-").parse().unwrap();
    if let Some(net) = c.nets.get(idx - 1) {
        for _ in 0..5 {
            let out = Command::new("ip")
                .args(["netns", "pids", &net.ns])
                .output()
                .unwrap();
            let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect();
            if pids.is_empty() {
                return;
            }
            let _ = Command::new("kill").arg("-9").args(&pids).status();
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    } else {
        // Loopback cluster: the keeper and its children are found by its pid file.
        cluster::kill_keeper(&c.dir.join(host).join("run"));
    }
}

/// `qemu-io` as host `host` (its own certificate), from inside its namespace, trying to write
/// the volume: (succeeded, output).
fn qemu_io_as(c: &Cluster, host: &str, volume: &str) -> (bool, String) {
    let ca = bulkhead_tokens::pki::CaDir::new(c.dir.join("ca"));
    let creds = c.dir.join(format!("qemu-creds-{host}"));
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::copy(ca.ca_pem(), creds.join("ca-cert.pem")).unwrap();
    std::fs::copy(ca.cert(host), creds.join("client-cert.pem")).unwrap();
    std::fs::copy(ca.key(host), creds.join("client-key.pem")).unwrap();
    let nbd: std::net::SocketAddr = c.storage.as_ref().unwrap().nbd_addr.parse().unwrap();
    let idx: usize = host.trim_start_matches("host-").parse().unwrap();
    let mut cmd = match c.nets.get(idx - 1) {
        Some(net) => {
            let mut x = Command::new("ip");
            x.args(["netns", "exec", &net.ns, "qemu-io"]);
            x
        }
        None => Command::new("qemu-io"),
    };
    let out = cmd
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            creds.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=inet,server.host={},server.port={},export={volume},tls-creds=tls0",
            nbd.ip(),
            nbd.port()
        ))
        .args(["-c", "write -P 0x66 0 4k"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = text.contains("failed") || text.contains("rror") || text.contains("can't");
    (out.status.success() && !failed, text)
}

/// The volume's bytes as the storage engine holds them.
fn stored_bytes(c: &Cluster, engine: StorageEngine, volume: &str) -> Vec<u8> {
    let node = c.storage.as_ref().unwrap();
    match engine {
        StorageEngine::File => {
            std::fs::read(node.state_dir.join("data").join(format!("{volume}.raw"))).unwrap()
        }
        StorageEngine::Rbd => {
            let out = c.dir.join(format!("{volume}.export"));
            let conf = std::env::var("BULKHEAD_CEPH_CONF").unwrap();
            let pool = std::env::var("BULKHEAD_CEPH_POOL").unwrap();
            let id = std::env::var("BULKHEAD_CEPH_ID").unwrap();
            let keyring = std::env::var("BULKHEAD_CEPH_KEYRING").unwrap();
            let st = Command::new("rbd")
                .args(["--conf", &conf, "--id", &id, "--keyring", &keyring])
                .args(["export", &format!("{pool}/{volume}")])
                .arg(&out)
                .status()
                .unwrap();
            assert!(st.success(), "rbd export of {volume}");
            std::fs::read(&out).unwrap()
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn decrypt_sector(dk: &[u8], stored: &[u8], sector: u64) -> Vec<u8> {
    let at = usize::try_from(sector * 512).unwrap();
    let mut s = stored[at..at + 512].to_vec();
    let key: [u8; 64] = dk.try_into().unwrap();
    bulkhead_blockcard::xts::XtsCipher::new(&key, bulkhead_blockcard::xts::CryptoSectorSize::S512)
        .unwrap()
        .decrypt(&mut s, sector)
        .unwrap();
    s
}

fn volume_follows_the_customer(engine: StorageEngine, test: &str) {
    let Some(guest) = guest_dir_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut c = start(dir.path(), &guest, engine);
    let a = customer(&c, "tenant-a");
    let v = volume(&a);

    // 0. The node has seen a fencing generation far above this machine's clock (a replica
    //    whose clock ran ahead, or a clock stepped back since): attaches still fence correctly,
    //    going above it.
    let node = c.storage.clone().unwrap();
    let (st, r) = post(
        &as_control_plane(&c),
        &node.control_addr,
        "/v1/Revoke",
        None,
        &json!({"volume_id": v, "generation": 1u64 << 62}),
    );
    assert_eq!(st, 200, "{r}");

    // 1. Written on one host, read on the other.
    let writer = run_with(&a, WRITER);
    a.wait_console(&writer, "BULKHEAD-GUEST-READY");
    assert_eq!(
        a.ok("AttachVolume", json!({"VolumeId": v, "InstanceId": writer}))["State"],
        "attached"
    );
    a.wait_console(&writer, "marker-written");
    let (dk, host_w) = data_key(&c, &a, &v, &writer);
    a.ok("DetachVolume", json!({"VolumeId": v}));
    let reader = run_with(&a, READER_COUNTER);
    a.wait_console(&reader, "BULKHEAD-GUEST-READY");
    a.ok("AttachVolume", json!({"VolumeId": v, "InstanceId": reader}));
    let (_, host_r) = data_key(&c, &a, &v, &reader);
    assert_ne!(host_w, host_r, "the volume moved between hosts");
    let out = a.wait_console(&reader, "read-back:");
    assert!(
        out.contains(&format!(
            "read-back:{}",
            std::str::from_utf8(MARKER).unwrap()
        )),
        "the guest on {host_r} read what the guest on {host_w} wrote:\n{out}"
    );

    // 2. The reader's host dies whole while its guest writes counters.
    let seen = a.wait_console(&reader, "acked-8");
    let acked = last_ack(&seen);
    kill_host(&mut c, &host_r);
    let (st, r) = a.call("DetachVolume", json!({"VolumeId": v}));
    assert_ne!(st, 200, "a plain detach needs the host: {r}");
    a.ok("DetachVolume", json!({"VolumeId": v, "Force": true}));
    // The dead host's identity cannot open the volume any more (the node fenced it).
    let (ok, text) = qemu_io_as(&c, &host_r, &v);
    assert!(
        !ok,
        "{host_r}'s certificate still writes the volume:\n{text}"
    );
    a.ok("TerminateInstances", json!({"InstanceIds": [writer]}));
    let checker = run_with(&a, CHECKER);
    a.wait_console(&checker, "BULKHEAD-GUEST-READY");
    a.ok(
        "AttachVolume",
        json!({"VolumeId": v, "InstanceId": checker}),
    );
    a.wait_console(&checker, "-end");
    let out = a.wait_console(&checker, "marker-again:");
    let present: u64 = out
        .split("counters-present:")
        .nth(1)
        .and_then(|t| t.split("-end").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!(
        present >= acked,
        "{acked} writes were acknowledged to the guest before its host died, {present} survived:\n{out}"
    );
    assert!(
        out.contains(&format!(
            "marker-again:{}",
            std::str::from_utf8(MARKER).unwrap()
        )),
        "{out}"
    );
    eprintln!("network volume: {acked} writes acknowledged before the host died, {present} present after the move");
    // The host the volume now lives on still opens it; the fenced one does not.
    let (_, host_c) = data_key(&c, &a, &v, &checker);
    assert_eq!(host_c, host_w);

    // 3. Only ciphertext on the storage; the data key opens it.
    a.ok("DetachVolume", json!({"VolumeId": v}));
    let stored = stored_bytes(&c, engine, &v);
    assert!(!find(&stored, MARKER), "plaintext marker on the storage");
    assert!(
        !find(&stored, b"CTR0000000000001"),
        "plaintext counter on the storage"
    );
    assert_eq!(&decrypt_sector(&dk, &stored, 8)[..32], MARKER);
    assert_eq!(
        &decrypt_sector(&dk, &stored, 2049)[..16],
        b"CTR0000000000001"
    );

    // 3b. A snapshot of the detached volume, and a larger volume made from it, in the volume's
    //     key family; the snapshot's storage holds only ciphertext, which the same key opens.
    let t_3b = std::time::Instant::now();
    let t_snap = std::time::Instant::now();
    let snap = a.ok("CreateSnapshot", json!({"VolumeId": v}));
    let sid = snap["SnapshotId"].as_str().unwrap().to_string();
    assert_eq!(snap["State"], "completed", "{snap}");
    let snap_ms = t_snap.elapsed().as_millis();
    let listed = a.ok("DescribeSnapshots", json!({"SnapshotIds": [sid]}));
    assert_eq!(listed["Snapshots"][0]["VolumeId"], v.as_str(), "{listed}");
    let size = snap["VolumeSize"].as_u64().unwrap();
    // Another tenant can neither see nor use it (refused, audited by the control plane).
    let b = customer(&c, "tenant-b");
    let (st, r) = b.call("CreateVolume", json!({"SizeGiB": size, "SnapshotId": sid}));
    assert_eq!((st, code(&r)), (404, "no_such_snapshot"), "{r}");
    let (st, r) = b.call("DescribeSnapshots", json!({"SnapshotIds": [sid]}));
    assert_eq!((st, code(&r)), (404, "no_such_snapshot"), "{r}");
    let (st, r) = b.call("DeleteSnapshot", json!({"SnapshotId": sid}));
    assert_eq!((st, code(&r)), (404, "no_such_snapshot"), "{r}");
    let control_audit = std::fs::read_to_string(c.dir.join("control/audit.log")).unwrap();
    assert!(
        control_audit.contains("no_such_snapshot"),
        "the control plane audited the refusal"
    );
    // A snapshot is never attached; a volume from it is at least its size.
    let (st, r) = a.call(
        "AttachVolume",
        json!({"VolumeId": sid, "InstanceId": checker}),
    );
    assert_ne!(st, 200, "{r}");
    let t_clone = std::time::Instant::now();
    let clone = a.ok(
        "CreateVolume",
        json!({"SizeGiB": size + 1, "SnapshotId": sid}),
    );
    let clone_ms = t_clone.elapsed().as_millis();
    let clone = clone["VolumeId"].as_str().unwrap().to_string();
    let snap_stored = stored_bytes(&c, engine, &sid);
    assert!(
        !find(&snap_stored, MARKER),
        "plaintext marker in the snapshot"
    );
    assert!(!find(&snap_stored, b"CTR0000000000001"));
    assert_eq!(&decrypt_sector(&dk, &snap_stored, 8)[..32], MARKER);
    eprintln!("snapshot: CreateSnapshot {snap_ms} ms, CreateVolume from it {clone_ms} ms");
    let added_3b = t_3b.elapsed();

    // 4. DeleteVolume: the KMS destroyed the key (refused to everyone, typed), the storage is
    //    released.
    let blob = volume_blob(&c, &v);
    a.ok("DeleteVolume", json!({"VolumeId": v}));
    let ((st, r), _) = decrypt_for_host(&c, &a, &v, &checker, &blob);
    assert_eq!((st, code(&r)), (410, "key_destroyed"), "{r}");
    if engine == StorageEngine::File {
        let node = c.storage.as_ref().unwrap();
        let f: PathBuf = node.state_dir.join("data").join(format!("{v}.raw"));
        assert!(!f.exists(), "{} still exists", f.display());
    }

    // 4b. The volume made from the snapshot outlives the original: attached to the checker
    //     guest (still running), it reads the marker, under the same data key.
    let t_4b = std::time::Instant::now();
    a.ok(
        "AttachVolume",
        json!({"VolumeId": clone, "InstanceId": checker}),
    );
    let out = a.wait_console(&checker, "clone-read:");
    assert!(
        out.contains(&format!(
            "clone-read:{}",
            std::str::from_utf8(MARKER).unwrap()
        )),
        "the volume made from the snapshot reads the marker:\n{out}"
    );
    let (dk_clone, _) = data_key(&c, &a, &clone, &checker);
    assert_eq!(dk_clone, dk, "one key family, one data key");
    a.ok("DetachVolume", json!({"VolumeId": clone}));
    // Clone and snapshot deleted: the family's secret is gone; every member's key is refused
    // (to the owner as destroyed, to another tenant at all).
    a.ok("DeleteVolume", json!({"VolumeId": clone}));
    a.ok("DeleteSnapshot", json!({"SnapshotId": sid}));
    let (st, r) = a.call("DescribeSnapshots", json!({"SnapshotIds": [sid]}));
    assert_eq!((st, code(&r)), (404, "no_such_snapshot"), "{r}");
    for id in [&v, &clone, &sid] {
        let ((st, r), _) = decrypt_for_host(&c, &a, id, &checker, &blob);
        assert_eq!((st, code(&r)), (410, "key_destroyed"), "{id}: {r}");
    }
    let ((st, r), _) = decrypt_for_host(&c, &b, &clone, &checker, &blob);
    assert_ne!(st, 200, "the clone opened for another tenant: {r}");
    if engine == StorageEngine::File {
        let data = c.storage.as_ref().unwrap().state_dir.join("data");
        for id in [&clone, &sid] {
            assert!(
                !data.join(format!("{id}.raw")).exists(),
                "{id}'s file is left"
            );
        }
    }
    eprintln!(
        "snapshot steps added {:.1} s",
        (added_3b + t_4b.elapsed()).as_secs_f64()
    );
    let audit = std::fs::read_to_string(c.storage.as_ref().unwrap().state_dir.join("audit.log"))
        .unwrap_or_default();
    assert!(
        audit.contains(&host_r),
        "the storage node audited the fenced host's refusal"
    );

    // 5. The operator of the storage node (root there) reads everything it keeps — its table,
    //    its audit log, its logs, whatever is left in its state directory — and finds neither
    //    the customer's data nor the data key; and cannot edit or drop an audit record unseen.
    c.kill9(&node.name);
    let mut files = Vec::new();
    walk(&node.state_dir, &mut files);
    files.push(c.dir.join("logs").join(format!("{}.log", node.name)));
    let needles: Vec<(&str, Vec<u8>)> = vec![
        ("marker", MARKER.to_vec()),
        ("data key", dk.clone()),
        ("data key (hex)", hex::encode(&dk).into_bytes()),
        ("counter", b"CTR0000000000001".to_vec()),
    ];
    for f in &files {
        let bytes = std::fs::read(f).unwrap_or_default();
        for (what, n) in &needles {
            assert!(!find(&bytes, n), "{what} found in {}", f.display());
        }
    }
    let log = node.state_dir.join("audit.log");
    bulkhead_audit::verify(&log).expect("the storage node's audit chain verifies");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 4, "{} audit records", lines.len());
    let tampered = c.dir.join("storage-audit-tampered.log");
    // One record dropped from the middle.
    let mut dropped = lines.clone();
    dropped.remove(lines.len() / 2);
    std::fs::write(&tampered, dropped.join("\n") + "\n").unwrap();
    assert!(
        bulkhead_audit::verify(&tampered).is_err(),
        "a dropped storage audit record went unnoticed"
    );
    // The fenced host's name rewritten in its refusal record.
    let rewritten = text.replacen(&format!("\"{host_r}\""), "\"host-9\"", 1);
    assert_ne!(rewritten, text, "the refusal names the host");
    std::fs::write(&tampered, rewritten).unwrap();
    assert!(
        bulkhead_audit::verify(&tampered).is_err(),
        "an edited storage audit record went unnoticed"
    );
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.is_file() {
            out.push(p);
        }
    }
}

#[test]
fn file_engine_volume_moves_between_hosts_survives_a_dead_host_and_is_crypto_erased() {
    volume_follows_the_customer(
        StorageEngine::File,
        "file_engine_volume_moves_between_hosts_survives_a_dead_host_and_is_crypto_erased",
    );
}

#[test]
fn rbd_engine_volume_moves_between_hosts_survives_a_dead_host_and_is_crypto_erased() {
    if std::env::var_os("BULKHEAD_CEPH_CONF").is_none() {
        bulkhead_testkit::skip_or_fail(
            "rbd_engine_volume_moves_between_hosts_survives_a_dead_host_and_is_crypto_erased: \
             no Ceph cluster (run under scripts/with-ceph.sh)",
        );
        return;
    }
    volume_follows_the_customer(
        StorageEngine::Rbd,
        "rbd_engine_volume_moves_between_hosts_survives_a_dead_host_and_is_crypto_erased",
    );
}
