//! DeployRelease on a real host, with one running guest for every check — the issue's combined
//! test: the guest appends a counter to its encrypted disk (a sealed volume key, a block card)
//! and prints it with its boot id and uptime. A 2-of-3 signed release carrying a hypervisor, a
//! block card and a controller (each stripped of debug information, as releases are built) is
//! uploaded (content-addressed) and deployed: the guest's hypervisor is live-updated to the
//! release's binary, its block card is card-updated to the release's card (the new processes
//! run the installed files), and the release's controller is applied by its supervisor (the
//! controller exits with the dedicated code, the test — its parent — verifies the release and
//! starts the release's controller, which adopts the guest); the controller is then killed -9
//! and restarted by the supervisor (the release's controller again; it adopts both); the
//! hypervisor is live-updated three more times (a deploy rolled back, a controller dying
//! mid-update), and a second card update is interrupted by the controller
//! dying right after the move (the next one keeps the new card), and a third card update is
//! refused by the hypervisor after the hand-over (the old card, told `CancelHandOver`, serves
//! on with its key); the boot id, uptime, console counter and the decrypted disk
//! show no reboot, gap or repeat, and the guest's ext2 file system (unmounted when a second disk
//! is hot-plugged at the end) checks clean with `e2fsck -fn`. Also an unsigned release, one signed by 1 of 3,
//! a downgrade, a correctly signed release whose hypervisor fails its self-test, and an
//! operator's token are each refused, typed and audited, with the guest still counting on the
//! same hypervisor. The audit chain verifies at the end.
//!
//! Real processes throughout: the controller binary (dev mode, `--backend host`), its keeper,
//! `bulkhead-hypervisor` (then the release's copy of it), the test guest under /dev/kvm.
//! Without them, a loud skip (`make test` turns it into a failure).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bulkhead_controller::supervisor::{
    start_args, ControllerChoice, HostReleases, EXIT_APPLY_RELEASE,
};
use bulkhead_tokens::Operation;
use common::*;

const CUSTOMER_OPS: &[Operation] = &[
    Operation::CreateInstance,
    Operation::StartInstance,
    Operation::TerminateInstance,
    Operation::AttachVolume,
    Operation::GetConsole,
];

/// One complete console line of the guest's loop.
#[derive(Debug, Clone)]
struct Count {
    n: u64,
    boot: String,
    uptime: f64,
    /// What the guest read back (O_DIRECT) from the disk sector it just wrote.
    disk: Option<u64>,
}

fn customer(d: &Daemon, method: &str, path: &str, body: &str) -> Resp {
    let r = call_as(d, "customer", CUSTOMER_OPS, method, path, body.as_bytes());
    assert!(
        r.status == 200 || r.status == 201,
        "{method} {path}: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    r
}

/// Every complete `CNT=<n> BOOT=<id> UP=<uptime> DISK=<readback> END` console line.
fn counts(d: &Daemon) -> Vec<Count> {
    let out = customer(d, "GET", "/v1/instances/i-dep/console", "").json["output"]
        .as_str()
        .unwrap_or("")
        .to_string();
    out.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("CNT=")?;
            let (n, rest) = rest.split_once(" BOOT=")?;
            let (boot, rest) = rest.split_once(" UP=")?;
            let (up, rest) = rest.split_once(" DISK=")?;
            let disk = rest.strip_suffix(" END")?;
            Some(Count {
                n: n.parse().ok()?,
                boot: boot.trim().to_string(),
                uptime: up.trim().parse().ok()?,
                disk: disk.trim().parse().ok(),
            })
        })
        .collect()
}

/// The guest counted on, one step at a time, on one boot only (same boot id, uptime never
/// back), and read back from its disk every count it wrote.
fn assert_never_rebooted(c: &[Count]) {
    assert!(!c.is_empty());
    for w in c.windows(2) {
        assert_eq!(w[1].n, w[0].n + 1, "a gap or repeat in the counter: {w:?}");
        assert_eq!(
            w[1].boot, w[0].boot,
            "the boot id changed: the guest rebooted"
        );
        assert!(w[1].uptime >= w[0].uptime, "uptime went back: {w:?}");
    }
    for x in c {
        assert_eq!(x.disk, Some(x.n), "disk readback differs: {x:?}");
    }
}

/// The guest's counter, read from its disk with no card or controller: the backing file is
/// decrypted here (AES-256-XTS with the volume key, 512-byte sectors, tweak = sector number)
/// into a plaintext image under `scratch`; `e2fsck -fn` must find its ext2 file system clean
/// (the guest unmounted it), and `debugfs` dumps it: file `k` holds `k`. Returns how many
/// counts from 1 on are there, contiguously.
fn disk_log(backing: &Path, seed: u8, scratch: &Path) -> u64 {
    use bulkhead_blockcard::xts::{CryptoSectorSize, XtsCipher};
    let mut data = std::fs::read(backing).unwrap();
    let mut xts = XtsCipher::new(&volume_key(seed), CryptoSectorSize::S512).unwrap();
    for (k, sector) in data.chunks_exact_mut(512).enumerate() {
        xts.decrypt(sector, u64::try_from(k).unwrap()).unwrap();
    }
    std::fs::create_dir_all(scratch).unwrap();
    let plain = scratch.join("plain.img");
    std::fs::write(&plain, &data).unwrap();
    let fsck = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(&plain)
        .output()
        .expect("e2fsck (e2fsprogs) runs");
    assert!(
        fsck.status.success(),
        "the guest's file system does not check clean ({}):\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let out = scratch.join("files");
    std::fs::create_dir_all(&out).unwrap();
    let dump = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", out.display()))
        .arg(&plain)
        .output()
        .expect("debugfs (e2fsprogs) runs");
    assert!(dump.status.success(), "debugfs: {dump:?}");
    std::fs::remove_file(&plain).unwrap();
    let mut k = 1u64;
    while std::fs::read_to_string(out.join(k.to_string())).ok() == Some(format!("{k}\n")) {
        k += 1;
    }
    k - 1
}

/// Waits until the guest printed count `n` (each round trip writes and reads its disk: a few
/// seconds on a loaded software-KVM host); shows the console's tail if it never comes.
fn count_on(d: &Daemon, what: &str, n: u64) {
    let t = Instant::now();
    while counts(d).last().map_or(0, |c| c.n) < n {
        if t.elapsed() > Duration::from_secs(180) {
            let out = customer(d, "GET", "/v1/instances/i-dep/console", "").json["output"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let tail: String = out
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!("the guest stopped counting {what} (waiting for {n}); console tail:\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The outcome record of an allowed request (the refusal's code is there). The outcome is queued
/// behind the answer: waited for, briefly.
fn outcome_code(d: &Daemon, r: &Resp) -> String {
    let t = Instant::now();
    loop {
        let found = d
            .audit()
            .iter()
            .find(|x| {
                x["entry"]["request_id"] == r.request_id.as_str() && x["entry"]["kind"] == "outcome"
            })
            .map(|x| x["entry"]["code"].as_str().unwrap_or("").to_string());
        match found {
            Some(code) => return code,
            None if t.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            None => return String::new(),
        }
    }
}

/// The controller runs its original binary at release 2 with no controller of a release
/// applied.
fn serves_on_its_own_binary(d: &mut Daemon) {
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the controller exited"
    );
    assert_eq!(
        exe(u64::from(d.child.id())),
        PathBuf::from(controller_bin()).canonicalize().unwrap()
    );
    let h = health(d);
    assert_eq!(h["release"], 2, "{}", h);
    assert!(h["controller_release"].is_null(), "{}", h);
}

/// This host's supervisor's choice (this test is the controller's parent): the active
/// release's controller if the release verifies against the pinned trust root, else the
/// original binary.
fn supervise(dir: &Path) -> ControllerChoice {
    let cfg = bulkhead_controller::config::Config::from_state_dir(
        &bulkhead_tokens::statedir::StateDir::new(dir),
        HOST,
        "127.0.0.1:0",
    );
    HostReleases::from_config(&cfg)
        .unwrap()
        .choose(Path::new(controller_bin()), 0)
}

/// Starts the chosen controller as the supervisor does (a release's controller gets
/// `--bin-dir` with the original's directory); `Err` if it cannot be executed.
fn start_chosen(
    choice: &ControllerChoice,
    dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> std::io::Result<Daemon> {
    let more = start_args(choice, Path::new(controller_bin()));
    let more: Vec<&str> = more.iter().map(|a| a.to_str().unwrap()).collect();
    let args: Vec<&str> = extra.iter().copied().chain(more).collect();
    Daemon::try_start_bin(&choice.binary, dir, &args, env)
}

/// The keeper's live children that run the installed file `file`.
fn running(keeper: i32, file: &Path) -> Vec<u64> {
    let file = file.canonicalize().unwrap();
    children_of(keeper)
        .into_iter()
        .filter_map(|p| u64::try_from(p).ok())
        .filter(|p| alive(*p) && exe(*p) == file)
        .collect()
}

struct KeeperGuard(PathBuf);

impl Drop for KeeperGuard {
    fn drop(&mut self) {
        kill_keeper(&self.0);
    }
}

#[test]
fn deploy_release_live_updates_the_hypervisor_and_refuses_bad_releases() {
    let test = "deploy_release_live_updates_the_hypervisor_and_refuses_bad_releases";
    if !can_boot_with(test, &["bulkhead-hypervisor", "bulkhead-blockcard"]) {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // The release trust root pinned on this host: 3 release keys, any 2 sign.
    let keys = host_with_release_root(dir.path());
    let host = host_key(dir.path());
    let _guard = KeeperGuard(dir.path().join("run"));
    let guest = guest_dir().display().to_string();
    let host_args = [
        "--backend",
        "host",
        "--guest-dir",
        guest.as_str(),
        "--supervised",
    ];
    let d = Daemon::start_with(dir.path(), &host_args);

    // 0. The operator's token (no deployer role) is refused before the guest even boots.
    let bins = release_dir();
    let configured_hv = bins.join("bulkhead-hypervisor").canonicalize().unwrap();
    let configured_card = bins.join("bulkhead-blockcard").canonicalize().unwrap();
    // The release's files, copied once (a rebuild meanwhile changes nothing here) and stripped
    // of debug information before they are signed, as a release is built: the release profile
    // keeps line tables (the controller ~90 MB, over the 64 MiB artefact cap; stripped ~16 MB).
    let src = dir.path().join("release-src");
    for n in [
        "bulkhead-hypervisor",
        "bulkhead-blockcard",
        "bulkhead-controller",
    ] {
        let size = std::fs::metadata(stripped(&src, n)).unwrap().len();
        assert!(
            usize::try_from(size).unwrap() <= bulkhead_controller_proto::MAX_ARTEFACT_BYTES,
            "{n} stripped is {size} bytes"
        );
    }
    let hv = src.join("bulkhead-hypervisor");
    // The release's block card: applied by a card update.
    let card = src.join("bulkhead-blockcard");
    // The release's controller, a real copy of this controller: installed, then applied by
    // the supervisor (this test) after the controller exits with EXIT_APPLY_RELEASE.
    let ctl = src.join("bulkhead-controller");
    let good = release(2, &[&hv, &card, &ctl], &[&keys[0], &keys[2]]);
    let r = deploy(&d, "operator", &[Operation::DescribeHost], &good);
    assert_eq!(r.status, 403);
    assert_denied_and_audited(&d, &r, "deployer_only");

    // The guest formats its encrypted disk with ext2, mounts it `-o sync`, appends its counter
    // as files (file k holds k: written synchronously by the shell's `echo`, read back with
    // O_DIRECT, so each write and read reaches the card) and prints it with its boot id and
    // uptime, until a second disk appears: then it unmounts the file system, which the test
    // checks with e2fsck after decrypting the volume.
    let script = "i=0\nB=$(cat /proc/sys/kernel/random/boot_id)\n\
                  while [ ! -b /dev/vda ]; do sleep 1; done\n\
                  mke2fs /dev/vda >/dev/null 2>&1 || echo MKFS-FAILED\n\
                  mount -t ext2 -o sync /dev/vda /tmp || echo MOUNT-FAILED\n\
                  while [ ! -b /dev/vdb ]; do\n i=$((i+1))\n \
                  echo $i > /tmp/$i\n \
                  R=$(dd if=/tmp/$i bs=512 count=1 iflag=direct 2>/dev/null)\n \
                  read U X < /proc/uptime\n \
                  echo CNT=$i BOOT=$B UP=$U DISK=$R END\n sleep 1\ndone\n\
                  umount /tmp && echo BULKHEAD-UNMOUNTED\n";
    let create = serde_json::json!({
        "instance_id": "i-dep", "image": "test-guest", "vcpus": 1, "memory_mib": 128,
        "user_data": script,
    });
    customer(&d, "POST", "/v1/instances", &create.to_string());
    // The volume key, sealed to this host as the KMS seals it; the disk is there at boot.
    let sealed =
        bulkhead_sealing::seal_volume_key(host.public(), "vol-dep", &volume_key(4)).unwrap();
    let body = serde_json::json!({
        "volume_id": "vol-dep",
        "sealed_key": base64::engine::general_purpose::STANDARD.encode(sealed),
    });
    customer(&d, "POST", "/v1/instances/i-dep/volumes", &body.to_string());
    customer(&d, "POST", "/v1/instances/i-dep/start", "");
    let t_boot = Instant::now();
    while counts(&d).len() < 3 {
        let out = customer(&d, "GET", "/v1/instances/i-dep/console", "").json["output"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(
            t_boot.elapsed() < boot_timeout(),
            "timed out waiting for the counter; console:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let booted = Instant::now();
    let keeper = i32::try_from(d.ready["keeper_pid"].as_u64().unwrap()).unwrap();
    let old_pid = children_of(keeper)
        .into_iter()
        .filter_map(|p| u64::try_from(p).ok())
        .find(|p| exe(*p) == configured_hv)
        .expect("the guest's hypervisor");
    let old_card = children_of(keeper)
        .into_iter()
        .filter_map(|p| u64::try_from(p).ok())
        .find(|p| exe(*p) == configured_card)
        .expect("the volume's block card");

    // 1. A good release: uploaded, deployed, the hypervisor moved to the installed binary and
    //    the block card updated to the installed card.
    upload(&d, &[&hv, &card, &ctl]);
    let ctl_pid = d.child.id();
    let t_deploy = Instant::now();
    let r = deploy(&d, "deployer", DEPLOY_OPS, &good);
    let deploy_ms = t_deploy.elapsed().as_millis();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json["version"], 2);
    let moved = r.json["moved"].as_array().unwrap();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0]["old_pid"], old_pid);
    let new_pid = moved[0]["new_pid"].as_u64().unwrap();
    let pause_us = moved[0]["pause_us"].as_u64().unwrap();
    let installed = dir.path().join("releases/v2/bulkhead-hypervisor");
    assert_eq!(exe(new_pid), installed.canonicalize().unwrap());
    assert_eq!(
        r.json["hypervisor"].as_str().map(PathBuf::from),
        Some(installed.canonicalize().unwrap())
    );
    wait_for(
        "the old hypervisor to exit",
        Duration::from_secs(20),
        || !alive(old_pid),
    );
    // The block card was updated: the new card runs the installed file, the old one is gone
    // (it handed the volume state and key over and exited), the record names the new one.
    let cards = r.json["cards"].as_array().unwrap();
    assert_eq!(cards.len(), 1, "{cards:?}");
    assert_eq!(cards[0]["old_pid"], old_card);
    assert_eq!(cards[0]["volume_id"], "vol-dep");
    let new_card = cards[0]["new_pid"].as_u64().unwrap();
    let installed_card = dir.path().join("releases/v2/bulkhead-blockcard");
    assert_eq!(exe(new_card), installed_card.canonicalize().unwrap());
    wait_for("the old card to exit", Duration::from_secs(20), || {
        !alive(old_card)
    });
    let rec = std::fs::read_to_string(dir.path().join("host-record")).unwrap();
    assert!(rec.contains(r#""release":{"version":2"#), "{rec}");
    assert!(rec.contains(&format!(r#""card_pid":{new_card}"#)), "{rec}");
    // The release's controller is applied by the supervisor (this test, the controller's
    // parent): the answer names it, the controller audits controller-restart and exits with
    // the dedicated code; the keeper, hypervisor and card run on; the supervisor verifies
    // release 2 itself and starts its controller, which adopts the guest.
    assert_eq!(r.json["controller_restart"], 2, "{}", r.json);
    let mut d = d;
    let st = d.exits_within(Duration::from_secs(20));
    let exited_ms = t_deploy.elapsed().as_millis();
    assert_eq!(st.code(), Some(EXIT_APPLY_RELEASE), "{st:?}");
    assert_ne!(d.child.id(), 0);
    assert!(children_of(keeper).contains(&i32::try_from(new_pid).unwrap()));
    assert!(children_of(keeper).contains(&i32::try_from(new_card).unwrap()));
    let installed_ctl = dir.path().join("releases/v2/bulkhead-controller");
    let choice = supervise(dir.path());
    assert_eq!((choice.release, &choice.binary), (Some(2), &installed_ctl));
    let d = start_chosen(&choice, dir.path(), &host_args, &[]).unwrap();
    let applied_ms = t_deploy.elapsed().as_millis();
    assert_ne!(d.child.id(), ctl_pid);
    assert_eq!(
        exe(u64::from(d.child.id())),
        installed_ctl.canonicalize().unwrap()
    );
    assert_eq!(d.ready["controller_release"], 2, "{}", d.ready);
    let h = health(&d);
    assert_eq!(h["release"], 2, "{}", h);
    assert_eq!(h["controller_release"], 2, "{}", h);
    // The same hypervisor and card, still the keeper's children.
    assert!(children_of(keeper).contains(&i32::try_from(new_pid).unwrap()));
    assert!(children_of(keeper).contains(&i32::try_from(new_card).unwrap()));
    // One audit chain across both processes: the restart, the adoption, the applied release.
    let audit = d.audit();
    let at = |op: &str, res: &str| {
        audit
            .iter()
            .position(|x| {
                x["entry"]["op"] == op
                    && x["entry"]["resources"][0] == res
                    && x["entry"]["code"] == "ok"
            })
            .unwrap_or_else(|| panic!("no {op} ok for {res}"))
    };
    let restart = at("DeployRelease:controller-restart", "release:v2");
    let adopted = at("AdoptInstance", "instance:i-dep");
    let applied = at("DeployRelease:controller-applied", "release:v2");
    assert!(
        restart < adopted && adopted < applied,
        "{restart} {adopted} {applied}"
    );
    bulkhead_audit::verify(&dir.path().join("audit.log")).unwrap();
    // A second call answers: the guest counts on, same boot.
    let at = counts(&d).last().unwrap().n;
    count_on(&d, "on the new hypervisor and card", at + 2);
    assert_never_rebooted(&counts(&d));
    eprintln!(
        "controller exited {exited_ms} ms and the release's controller was ready {applied_ms} ms \
         after the deploy was sent"
    );
    eprintln!(
        "deployed v2 in {deploy_ms} ms; guest pause {pause_us} us; pid {old_pid} -> {new_pid}; \
         card {old_card} -> {new_card}: hand-over {} us, ReplaceBlock {} us",
        cards[0]["handover_us"], cards[0]["replace_us"]
    );

    // 2. The controller is killed -9 and restarted by its supervisor, which starts the active
    //    release's controller again (no silent downgrade to the original binary): it adopts
    //    the live-updated hypervisor (started by the keeper, like any hypervisor) and keeps
    //    the active release from the host record (the downgrade below is refused against
    //    that floor).
    let mut d = d;
    d.kill9_controller_only();
    // It runs with the fault hook that kills the new process of its second live update (step 5).
    let choice = supervise(dir.path());
    assert_eq!(choice.release, Some(2));
    let d = start_chosen(
        &choice,
        dir.path(),
        &host_args,
        &[("BULKHEAD_FAULT", "live_update:second:new_dies")],
    )
    .unwrap();
    assert_eq!(d.ready["controller_release"], 2, "{}", d.ready);
    assert!(children_of(keeper).contains(&i32::try_from(new_pid).unwrap()));
    assert!(children_of(keeper).contains(&i32::try_from(new_card).unwrap()));
    assert!(d.audit().iter().any(|x| x["entry"]["op"] == "AdoptInstance"
        && x["entry"]["resources"][0] == "instance:i-dep"
        && x["entry"]["code"] == "ok"));

    // 3. Refusals, each typed and audited; nothing moves.
    let unsigned = release(3, &[&hv], &[]);
    let one_of_three = release(3, &[&hv], &[&keys[1]]);
    let downgrade = release(1, &[&hv], &[&keys[0], &keys[1]]);
    let broken_dir = dir.path().join("broken");
    std::fs::create_dir_all(&broken_dir).unwrap();
    let broken = broken_dir.join("bulkhead-hypervisor");
    std::fs::write(&broken, b"#!/bin/sh\necho self-test fails >&2\nexit 1\n").unwrap();
    upload(&d, &[&broken]);
    let fails_self_test = release(4, &[&broken], &[&keys[1], &keys[2]]);
    for (what, signed, status, code) in [
        ("unsigned", &unsigned, 403, "release_unsigned"),
        ("1 of 3", &one_of_three, 403, "release_too_few_signatures"),
        ("downgrade", &downgrade, 409, "release_rollback"),
        (
            "self-test",
            &fails_self_test,
            422,
            "release_self_test_failed",
        ),
    ] {
        let r = deploy(&d, "deployer", DEPLOY_OPS, signed);
        assert_eq!(
            r.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.code(), code, "{what}");
        assert_eq!(outcome_code(&d, &r), code, "{what}: not audited");
        assert!(alive(new_pid), "{what}: the hypervisor died");
        assert!(alive(new_card), "{what}: the card died");
    }
    // The self-test ran on the installed (correctly signed) release and is its own record.
    assert!(d.audit().iter().any(|x| {
        x["entry"]["op"] == "DeployRelease:self-test"
            && x["entry"]["code"] == "release_self_test_failed"
            && x["entry"]["resources"][0] == "release:v4"
    }));
    let r = deploy(&d, "operator", &[Operation::DescribeHost], &good);
    assert_denied_and_audited(&d, &r, "deployer_only");
    let rec = std::fs::read_to_string(dir.path().join("host-record")).unwrap();
    assert!(rec.contains(r#""release":{"version":2"#), "{rec}");
    assert_eq!(exe(new_pid), installed.canonicalize().unwrap());

    // 4. A new instance starts the active release's hypervisor (this controller learnt it from
    //    the host record); it is terminated at once (its guest need not finish booting).
    let create = serde_json::json!({
        "instance_id": "i-new", "image": "test-guest", "vcpus": 1, "memory_mib": 128,
    });
    customer(&d, "POST", "/v1/instances", &create.to_string());
    customer(&d, "POST", "/v1/instances/i-new/start", "");
    let fresh: Vec<u64> = children_of(keeper)
        .into_iter()
        .filter_map(|p| u64::try_from(p).ok())
        .filter(|p| *p != new_pid && alive(*p))
        .filter(|p| exe(*p) == installed.canonicalize().unwrap())
        .collect();
    assert_eq!(fresh.len(), 1, "the new instance's hypervisor: {fresh:?}");

    // 5. A good release v3 whose live update fails on the second instance (its new process
    //    dies before the hand-over): refused, and the first instance's hypervisor, already on
    //    v3, is moved back to v2; both guests keep their hypervisors' releases, the record v2.
    let v3 = release(3, &[&hv], &[&keys[0], &keys[1]]);
    let r = deploy(&d, "deployer", DEPLOY_OPS, &v3);
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.code(), "release_live_update_failed");
    assert_eq!(outcome_code(&d, &r), "release_live_update_failed");
    let audited = |op: &str, inst: &str, ok: bool| {
        d.audit().iter().any(|x| {
            x["entry"]["op"] == op
                && x["entry"]["resources"][0] == "release:v3"
                && x["entry"]["resources"][1] == format!("instance:{inst}").as_str()
                && (x["entry"]["code"] == "ok") == ok
        })
    };
    assert!(audited("DeployRelease:live-update", "i-dep", true));
    assert!(audited("DeployRelease:live-update", "i-new", false));
    assert!(audited("DeployRelease:roll-back", "i-dep", true));
    let on_v2 = running(keeper, &installed);
    assert_eq!(on_v2.len(), 2, "both hypervisors on v2: {on_v2:?}");
    assert!(
        on_v2.contains(&fresh[0]),
        "the second instance's hypervisor moved"
    );
    assert!(
        !on_v2.contains(&new_pid),
        "the first instance's v2 process still runs"
    );
    assert!(!children_of(keeper).into_iter().any(|p| {
        u64::try_from(p).is_ok_and(|p| alive(p) && exe(p).to_string_lossy().contains("/v3/"))
    }));
    let rec = std::fs::read_to_string(dir.path().join("host-record")).unwrap();
    assert!(rec.contains(r#""release":{"version":2"#), "{rec}");
    customer(&d, "POST", "/v1/instances/i-new/terminate", "");

    // 6. A controller that dies right after a hand-over, before it records the outcome (fault
    //    hook `live_update:after_handover:exit`): the next one adopts the new process, which
    //    runs the guest (the update was recorded as in flight before the hand-over).
    let mut d = d;
    d.kill9_controller_only();
    let mut d3 = Daemon::start_env(
        dir.path(),
        &["--backend", "host", "--guest-dir", guest.as_str()],
        &[("BULKHEAD_FAULT", "live_update:after_handover:exit")],
    );
    let v4 = release(4, &[&hv], &[&keys[0], &keys[1]]);
    let body = serde_json::json!({ "release": v4 }).to_string();
    let t = d3.mint("deployer", HOST, DEPLOY_OPS, MIN10);
    let r = d3
        .client("deployer")
        .request("POST", "/v1/host/releases", Some(&t), body.as_bytes());
    assert!(r.is_err(), "the controller answered: {r:?}");
    assert_eq!(d3.child.wait().unwrap().code(), Some(70));
    d3.kill9_controller_only();
    let d = Daemon::start_with(
        dir.path(),
        &["--backend", "host", "--guest-dir", guest.as_str()],
    );
    assert!(d.audit().iter().any(|x| x["entry"]["op"] == "AdoptInstance"
        && x["entry"]["resources"][0] == "instance:i-dep"
        && x["entry"]["code"] == "live_update_completed"));
    let v4_bin = dir.path().join("releases/v4/bulkhead-hypervisor");
    let on_v4 = running(keeper, &v4_bin);
    assert_eq!(
        on_v4.len(),
        1,
        "the guest's hypervisor after adoption: {on_v4:?}"
    );
    let rec = std::fs::read_to_string(dir.path().join("host-record")).unwrap();
    assert!(
        rec.contains(&format!(r#""hypervisor_pid":{}"#, on_v4[0])),
        "{rec}"
    );
    assert!(!rec.contains("hypervisor_update"), "{rec}");

    // 6b. A live update whose answer is lost (fault hook `live_update:reply_lost`: the
    //     hypervisors completed the hand-over, the controller reads a channel error): the
    //     controller must find out which process holds the guest (the old one exits after a
    //     hand-over) and keep the new one, not reap it as after a refusal (which would kill the
    //     guest); the deploy succeeds with the guest on the release's hypervisor.
    let mut d = d;
    d.kill9_controller_only();
    let d6 = Daemon::start_env(
        dir.path(),
        &["--backend", "host", "--guest-dir", guest.as_str()],
        &[("BULKHEAD_FAULT", "live_update:reply_lost")],
    );
    let v5 = release(5, &[&hv], &[&keys[0], &keys[2]]);
    let r = deploy(&d6, "deployer", DEPLOY_OPS, &v5);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let on_v5 = running(keeper, &dir.path().join("releases/v5/bulkhead-hypervisor"));
    assert_eq!(on_v5.len(), 1, "the guest's hypervisor: {on_v5:?}");
    assert!(!alive(on_v4[0]), "the old hypervisor still runs");
    let rec = std::fs::read_to_string(dir.path().join("host-record")).unwrap();
    assert!(
        rec.contains(&format!(r#""hypervisor_pid":{}"#, on_v5[0])),
        "{rec}"
    );
    assert!(!rec.contains("hypervisor_update"), "{rec}");
    let at = counts(&d6).last().unwrap().n;
    count_on(&d6, "on the new hypervisor after a lost answer", at + 2);
    let d = d6;

    // 7. A controller that dies right after the hypervisor moved the disk to a new card, before
    //    it records the outcome (fault hook `card_update:after_replace:exit`): the next one
    //    keeps the new card (the update was recorded as in flight before `ReplaceBlock`; the
    //    old card exits once its frontend left) and audits `card_update_completed`.
    let mut d = d;
    d.kill9_controller_only();
    let mut d4 = Daemon::start_env(
        dir.path(),
        &["--backend", "host", "--guest-dir", guest.as_str()],
        &[("BULKHEAD_FAULT", "card_update:after_replace:exit")],
    );
    let v6 = release(6, &[&hv, &card], &[&keys[1], &keys[2]]);
    let body = serde_json::json!({ "release": v6 }).to_string();
    let t = d4.mint("deployer", HOST, DEPLOY_OPS, MIN10);
    let r = d4
        .client("deployer")
        .request("POST", "/v1/host/releases", Some(&t), body.as_bytes());
    assert!(r.is_err(), "the controller answered: {r:?}");
    assert_eq!(d4.child.wait().unwrap().code(), Some(70));
    d4.kill9_controller_only();
    let d = Daemon::start_with(
        dir.path(),
        &["--backend", "host", "--guest-dir", guest.as_str()],
    );
    assert!(d.audit().iter().any(|x| x["entry"]["op"] == "AdoptInstance"
        && x["entry"]["resources"][0] == "instance:i-dep"
        && x["entry"]["code"]
            .as_str()
            .is_some_and(|c| c.contains("card_update_completed"))));
    let on_v6 = running(keeper, &dir.path().join("releases/v6/bulkhead-blockcard"));
    assert_eq!(
        on_v6.len(),
        1,
        "the volume's card after adoption: {on_v6:?}"
    );
    assert!(!alive(new_card), "the v2 card still runs");
    let rec = std::fs::read_to_string(dir.path().join("host-record")).unwrap();
    assert!(
        rec.contains(&format!(r#""card_pid":{}"#, on_v6[0])),
        "{rec}"
    );
    assert!(!rec.contains("card_update"), "{rec}");
    let new_card = on_v6[0];

    // 7b. A card update whose `ReplaceBlock` the hypervisor refuses after the old card handed
    //     over (fault hook `card_update:replace_refused`): the deploy fails and is rolled back,
    //     the old card was told `CancelHandOver` (it keeps its key and would survive its
    //     frontend leaving) and the new one detached; the guest counts on on the old card.
    let mut d = d;
    d.kill9_controller_only();
    let mut d5 = Daemon::start_env(
        dir.path(),
        &["--backend", "host", "--guest-dir", guest.as_str()],
        &[("BULKHEAD_FAULT", "card_update:replace_refused")],
    );
    let v7 = release(7, &[&hv, &card], &[&keys[0], &keys[2]]);
    let r = deploy(&d5, "deployer", DEPLOY_OPS, &v7);
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.code(), "release_card_update_failed");
    assert!(alive(new_card), "the old (v6) card died");
    assert!(!children_of(keeper).into_iter().any(|p| {
        u64::try_from(p).is_ok_and(|p| alive(p) && exe(p).to_string_lossy().contains("/v7/"))
    }));
    let rec = std::fs::read_to_string(dir.path().join("host-record")).unwrap();
    assert!(rec.contains(&format!(r#""card_pid":{new_card}"#)), "{rec}");
    assert!(!rec.contains("card_update"), "{rec}");
    let at = counts(&d5).last().unwrap().n;
    count_on(&d5, "on the old card after the refused card update", at + 2);
    // The old card itself, asked directly once the controller is gone: its hand-over was
    // cancelled already (without the cancel it would still be marked to exit at its
    // frontend's next disconnect, and this cancel would be the first).
    d5.kill9_controller_only();
    let mut answered = 0;
    for e in std::fs::read_dir(dir.path().join("run")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "ctl") {
            continue;
        }
        let Ok(mut c) = std::os::unix::net::UnixStream::connect(&p) else {
            continue;
        };
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        use bulkhead_blockcard::control as proto;
        match proto::call(&mut c, &proto::ControlRequest::CancelHandOver) {
            Ok(proto::ControlResponse::Error {
                code: proto::ErrorCode::NoHandOver,
                ..
            }) => answered += 1,
            other => panic!("{}: CancelHandOver answered {other:?}", p.display()),
        }
    }
    assert_eq!(answered, 1, "one live card");
    let d = Daemon::start_with(
        dir.path(),
        &["--backend", "host", "--guest-dir", guest.as_str()],
    );
    assert!(alive(new_card), "the old (v6) card died at adoption");

    // 8. The guest kept counting on one boot the whole time.
    let at = counts(&d).last().unwrap().n;
    count_on(&d, "after the refusals", at + 2);
    let c = counts(&d);
    assert_never_rebooted(&c);
    assert_eq!(c[0].n, 1);
    assert!(alive(new_card), "the updated card died");
    eprintln!(
        "guest counted {} on one boot (boot id {}, uptime {:.1} -> {:.1} s) through the deploy \
         (hypervisor and card), a controller restart, 5 refusals, a rolled-back deploy and a \
         controller dying mid-update; {:.0?} after its boot",
        c.len(),
        c[0].boot,
        c[0].uptime,
        c[c.len() - 1].uptime,
        booted.elapsed()
    );
    for step in [
        "verified",
        "install",
        "self-test",
        "live-update",
        "card_update",
        "activate",
    ] {
        assert!(
            d.audit().iter().any(
                |x| x["entry"]["op"] == format!("DeployRelease:{step}").as_str()
                    && x["entry"]["code"] == "ok"
            ),
            "no audited {step}"
        );
    }
    assert!(d.audit().iter().any(|x| {
        x["entry"]["op"] == "DeployRelease:card_update"
            && x["entry"]["resources"][0] == "release:v2"
            && x["entry"]["resources"][1] == "instance:i-dep"
            && x["entry"]["resources"][2] == "volume:vol-dep"
            && x["entry"]["code"] == "ok"
    }));
    // The guest's stop signal: a second disk, hot-plugged; its loop ends and it unmounts its
    // file system (an ext2 left mounted has stale free counts that e2fsck reports).
    let sealed =
        bulkhead_sealing::seal_volume_key(host.public(), "vol-stop", &volume_key(5)).unwrap();
    let body = serde_json::json!({
        "volume_id": "vol-stop",
        "sealed_key": base64::engine::general_purpose::STANDARD.encode(sealed),
    });
    customer(&d, "POST", "/v1/instances/i-dep/volumes", &body.to_string());
    wait_for(
        "the guest to unmount its file system",
        boot_timeout(),
        || {
            customer(&d, "GET", "/v1/instances/i-dep/console", "").json["output"]
                .as_str()
                .is_some_and(|o| o.contains("BULKHEAD-UNMOUNTED"))
        },
    );
    let all = counts(&d);
    assert_never_rebooted(&all);
    let last = all.last().unwrap().n;
    customer(&d, "POST", "/v1/instances/i-dep/terminate", "");
    drop(d);
    // The disk, decrypted here from the backing file: a clean ext2 file system holding every
    // count from 1 on, each in its own file, up to the last one printed (nothing lost across
    // the card updates, the live updates and the controller restarts).
    let on_disk = disk_log(
        &dir.path().join("volumes/vol-dep.img"),
        4,
        &dir.path().join("fsck"),
    );
    assert_eq!(
        on_disk, last,
        "the file system holds 1..={on_disk}, the console ended at {last}"
    );
    // The volume key is in no file under the test directory (it went card to card only).
    let key = volume_key(4);
    let key_hex = hex::encode(key);
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(
                std::fs::read_dir(&p)
                    .unwrap()
                    .filter_map(|e| e.ok().map(|e| e.path())),
            );
        } else if let Ok(b) = std::fs::read(&p) {
            assert!(
                !b.windows(key.len()).any(|w| w == key)
                    && !b.windows(key_hex.len()).any(|w| w == key_hex.as_bytes()),
                "the volume key is in {}",
                p.display()
            );
        }
    }
    bulkhead_audit::verify(&dir.path().join("audit.log")).unwrap();
    eprintln!("{test}: {:.1?}", t0.elapsed());
}

/// A release whose controller cannot run here (correctly signed, so the supervisor's digest
/// check passes; not a program): the deploy answers `controller_restart: 2`, the controller
/// audits the restart and exits with the dedicated code, the supervisor (this test) verifies
/// release 2 and starts its controller, which never becomes ready, and starts the original
/// binary again: it serves at release 2 and audits that the active release's controller is not
/// the one running (`controller-applied controller_not_applied`). Then the installed file is
/// edited: the supervisor refuses it by digest and picks the original. No guest boots.
#[test]
fn a_release_controller_that_cannot_run_leaves_the_original_controller_serving() {
    let test = "a_release_controller_that_cannot_run_leaves_the_original_controller_serving";
    if !can_boot_with(test, &["bulkhead-hypervisor"]) {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let keys = host_with_release_root(dir.path());
    let _guard = KeeperGuard(dir.path().join("run"));
    let guest = guest_dir().display().to_string();
    let host_args = [
        "--backend",
        "host",
        "--guest-dir",
        guest.as_str(),
        "--supervised",
    ];
    let mut d = Daemon::start_with(dir.path(), &host_args);
    let src = dir.path().join("release-src");
    let hv = stripped(&src, "bulkhead-hypervisor");
    let ctl = src.join("bulkhead-controller");
    std::fs::write(&ctl, b"not a program\n").unwrap();
    upload(&d, &[&hv, &ctl]);
    let r = deploy(
        &d,
        "deployer",
        DEPLOY_OPS,
        &release(2, &[&hv, &ctl], &[&keys[0], &keys[1]]),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json["controller_restart"], 2, "{}", r.json);
    let st = d.exits_within(Duration::from_secs(20));
    assert_eq!(st.code(), Some(EXIT_APPLY_RELEASE), "{st:?}");
    let installed = dir.path().join("releases/v2/bulkhead-controller");
    assert_eq!(std::fs::read(&installed).unwrap(), b"not a program\n");
    // Signed and unchanged: the supervisor picks it; it does not start.
    let choice = supervise(dir.path());
    assert_eq!((choice.release, &choice.binary), (Some(2), &installed));
    let failed = start_chosen(&choice, dir.path(), &host_args, &[]);
    assert!(failed.is_err(), "a text file ran as the controller");
    // The supervisor starts the original binary again.
    let mut d = Daemon::start_with(dir.path(), &host_args);
    serves_on_its_own_binary(&mut d);
    let audit = d.audit();
    let restart = audit
        .iter()
        .position(|x| {
            x["entry"]["op"] == "DeployRelease:controller-restart"
                && x["entry"]["resources"][0] == "release:v2"
                && x["entry"]["code"] == "ok"
        })
        .expect("controller-restart ok");
    let not_applied = audit
        .iter()
        .position(|x| {
            x["entry"]["op"] == "DeployRelease:controller-applied"
                && x["entry"]["resources"][0] == "release:v2"
                && x["entry"]["code"] == "controller_not_applied"
        })
        .expect("controller-applied controller_not_applied");
    assert!(restart < not_applied);
    assert!(!audit.iter().any(|x| {
        x["entry"]["op"] == "DeployRelease:controller-applied" && x["entry"]["code"] == "ok"
    }));
    bulkhead_audit::verify(&dir.path().join("audit.log")).unwrap();
    // An installed controller edited after the deploy: refused by digest, the original chosen.
    std::fs::write(&installed, b"not a program either\n").unwrap();
    let choice = supervise(dir.path());
    assert_eq!(choice.binary, PathBuf::from(controller_bin()));
    assert_eq!(
        choice.refused.as_ref().map(|e| e.code()),
        Some("controller_digest_mismatch")
    );
    eprintln!("{test}: {:.1?}", t0.elapsed());
}
