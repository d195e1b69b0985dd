//! Instance storage, end to end: the real controller binary (dev mode, `--backend host`) gives
//! an instance a local ephemeral disk through a real `bulkhead-blockcard` whose key is made
//! inside the card (`Ephemeral`), and the real test guest uses it under /dev/kvm.
//!
//! One instance lives through every transition that matters: its disk is the guest's first disk
//! at boot; the backing file holds no plaintext; a restarted controller adopts the card from the
//! host record; Reboot keeps the disk (the card and its key live on); StopInstances ends the card
//! (key zeroized) and deletes the file; the Start after it gets a fresh, empty disk from a new
//! card; TerminateInstances ends that one the same way. Bad sizes are refused with a typed code
//! before anything exists.
//!
//! Needs /dev/kvm, `target/guest` (`make guest`) and the release hypervisor and block card next
//! to the controller; skips loudly (`skip_or_fail`) otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bulkhead_tokens::Operation;
use common::*;

/// 32 bytes, written by the guest at byte offset 4096 of /dev/vda (sector 8).
const MARKER: &str = "BHSTORE-9c2e7a1f5b3d0e8c6a4f2b1d";
const MARKER_OFFSET: usize = 4096;
const ID: &str = "i-store";
const GIB: u64 = 1;

const CUSTOMER_OPS: &[Operation] = &[
    Operation::CreateInstance,
    Operation::DescribeInstance,
    Operation::StartInstance,
    Operation::StopInstance,
    Operation::RebootInstance,
    Operation::TerminateInstance,
    Operation::GetConsole,
];

fn start_host_daemon(dir: &Path) -> Daemon {
    let guest = guest_dir();
    Daemon::start_with(
        dir,
        &["--backend", "host", "--guest-dir", guest.to_str().unwrap()],
    )
}

fn call(d: &Daemon, method: &str, path: &str, body: &str) -> Resp {
    let t = d.mint("customer", HOST, CUSTOMER_OPS, MIN10);
    d.client("customer")
        .request(method, path, Some(&t), body.as_bytes())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn ok(d: &Daemon, method: &str, path: &str, body: &str) -> Resp {
    let r = call(d, method, path, body);
    assert!(
        r.status == 200 || r.status == 201,
        "{method} {path}: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    r
}

/// Live (not zombie) block cards whose command line names `needle`.
fn cards_on(needle: &str) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let zombie = stat.rsplit(')').next()?.trim_start().starts_with('Z');
            (cmd.contains("bulkhead-blockcard") && cmd.contains(needle) && !zombie).then_some(pid)
        })
        .collect()
}

/// Waits until the console shows the guest's script finished its round `n` (1-based); returns
/// the console text of that round only.
fn wait_round(d: &Daemon, n: usize) -> String {
    let needle = format!("readback={MARKER}");
    let started = Instant::now();
    loop {
        let r = ok(d, "GET", &format!("/v1/instances/{ID}/console"), "");
        let out = r.json["output"].as_str().unwrap_or("").to_string();
        if out.matches(&needle).count() >= n {
            // The round's text: after the previous round's readback line.
            let from = out
                .match_indices(&needle)
                .nth(n.wrapping_sub(2))
                .filter(|_| n >= 2)
                .map(|(i, _)| i + needle.len())
                .unwrap_or(0);
            let to = out
                .match_indices(&needle)
                .nth(n - 1)
                .map(|(i, _)| i + needle.len())
                .unwrap();
            eprintln!("round {n} after {:?}", started.elapsed());
            return out[from..to].to_string();
        }
        assert!(
            !out.contains("BULKHEAD-RUN-EXIT="),
            "the script ended early (round {n}); console:\n{out}"
        );
        assert!(
            started.elapsed() < boot_timeout(),
            "round {n} not done after {:?}; console so far:\n{out}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The first MiB of the backing file: no plaintext marker, and ciphertext where the guest wrote.
fn assert_no_plaintext(backing: &Path) {
    use std::io::Read as _;
    let mut head = vec![0u8; 1 << 20];
    std::fs::File::open(backing)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert!(
        !head.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "plaintext marker in {}",
        backing.display()
    );
    assert!(
        head[MARKER_OFFSET..MARKER_OFFSET + 512]
            .iter()
            .any(|b| *b != 0),
        "nothing was written where the guest wrote its marker"
    );
}

#[test]
fn instance_storage_lives_until_stop_or_terminate() {
    if !can_boot_with(
        "instance_storage_lives_until_stop_or_terminate",
        &["bulkhead-hypervisor", "bulkhead-blockcard"],
    ) {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join(format!("volumes/instance-store/{ID}.img"));
    let needle = format!("instance-store/{ID}.img");
    let d = start_host_daemon(dir.path());

    // Bad sizes: typed refusals, audited, nothing created.
    let base = serde_json::json!({"instance_id": ID, "image": "test-guest", "vcpus": 1,
        "memory_mib": 128});
    for (v, code) in [
        (serde_json::json!(0), "bad_instance_storage"),
        (serde_json::json!(65), "bad_instance_storage"),
        (serde_json::json!(1u64 << 33), "body_invalid"),
        (serde_json::json!("1"), "body_invalid"),
    ] {
        let mut b = base.clone();
        b["instance_storage_gib"] = v.clone();
        let r = call(&d, "POST", "/v1/instances", &b.to_string());
        assert_eq!((r.status, r.code()), (400, code), "{v}");
        assert_eq!(
            call(&d, "GET", &format!("/v1/instances/{ID}"), "").code(),
            "no_such_instance"
        );
    }
    assert!(cards_on(&needle).is_empty() && !backing.exists());

    // The guest's script: is the marker already on /dev/vda? Then write it, read it back and
    // stay up (so StopInstances stops a running guest).
    let script = format!(
        "read -r n </sys/block/vda/size; echo vda-sectors=$n\n\
         R0=$(dd if=/dev/vda bs=32 skip=128 count=1 2>/dev/null)\n\
         K=0; [ \"$R0\" = {MARKER} ] && K=1; echo store-had-marker=$K\n\
         printf %s {MARKER} | dd of=/dev/vda bs=32 seek=128 conv=fsync 2>/dev/null\n\
         echo 3 >/proc/sys/vm/drop_caches\n\
         R=$(dd if=/dev/vda bs=32 skip=128 count=1 2>/dev/null)\n\
         echo readback=$R\n\
         while :; do sleep 5; done\n"
    );
    let mut b = base.clone();
    b["instance_storage_gib"] = serde_json::json!(GIB);
    b["user_data"] = serde_json::json!(script);
    let r = ok(&d, "POST", "/v1/instances", &b.to_string());
    assert_eq!(r.json["instance_storage_gib"], GIB);
    let card1 = cards_on(&needle);
    assert_eq!(card1.len(), 1, "one instance-storage card at create");
    let card1 = card1[0];
    let meta = std::fs::metadata(&backing).unwrap();
    assert_eq!(meta.len(), GIB << 30);
    {
        use std::os::unix::fs::MetadataExt as _;
        assert!(meta.blocks() * 512 < 1 << 20, "the file is sparse");
    }

    // Round 1: a fresh disk; the marker goes on it, encrypted by a key only the card holds.
    ok(&d, "POST", &format!("/v1/instances/{ID}/start"), "");
    let round = wait_round(&d, 1);
    assert!(
        round.contains(&format!("vda-sectors={}", (GIB << 30) / 512)),
        "{round}"
    );
    assert!(round.contains("store-had-marker=0"), "{round}");
    assert_no_plaintext(&backing);

    // A restarted controller adopts the card from the host record.
    let mut d = d;
    d.kill9_controller_only();
    let d = start_host_daemon(dir.path());
    assert_eq!(d.ready["adopted"]["instances"], 1, "{}", d.ready);
    assert!(alive(card1));
    let r = ok(&d, "GET", &format!("/v1/instances/{ID}"), "");
    assert_eq!(r.json["instance_storage_gib"], GIB);
    assert_eq!(r.json["state"], "running");

    // Reboot keeps the disk: same card, the marker is still there.
    ok(&d, "POST", &format!("/v1/instances/{ID}/reboot"), "");
    let round = wait_round(&d, 2);
    assert!(round.contains("store-had-marker=1"), "{round}");
    assert_eq!(cards_on(&needle), vec![card1]);

    // Stop: the card is gone (its key with it) and so is the file.
    ok(&d, "POST", &format!("/v1/instances/{ID}/stop"), "");
    assert!(
        !alive(card1),
        "instance-storage card survived StopInstances"
    );
    assert!(cards_on(&needle).is_empty());
    assert!(
        !backing.exists(),
        "instance-storage file survived StopInstances"
    );
    let r = ok(&d, "GET", &format!("/v1/instances/{ID}"), "");
    assert_eq!(r.json["state"], "stopped");
    assert_eq!(r.json["instance_storage_gib"], GIB);

    // Start after Stop: a new card, a fresh empty disk (the marker is gone).
    ok(&d, "POST", &format!("/v1/instances/{ID}/start"), "");
    let card2 = cards_on(&needle);
    assert_eq!(card2.len(), 1);
    let card2 = card2[0];
    assert_ne!(card2, card1);
    let round = wait_round(&d, 3);
    assert!(round.contains("store-had-marker=0"), "{round}");
    assert_no_plaintext(&backing);

    // Terminate: the same crypto-erase.
    ok(&d, "POST", &format!("/v1/instances/{ID}/terminate"), "");
    assert!(
        !alive(card2),
        "instance-storage card survived TerminateInstances"
    );
    assert!(cards_on(&needle).is_empty());
    assert!(
        !backing.exists(),
        "instance-storage file survived TerminateInstances"
    );
    let records = std::fs::read_to_string(dir.path().join("host-record")).unwrap();
    assert!(
        !records.contains(ID),
        "terminated instance left in the host record"
    );
    eprintln!(
        "instance_storage_lives_until_stop_or_terminate: {:?}",
        t0.elapsed()
    );
}
