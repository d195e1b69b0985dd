//! The real backend, end to end: the real controller binary (dev mode, `--backend host`) starts
//! real `bulkhead-hypervisor` and `bulkhead-blockcard` processes through its launcher and boots
//! the real test guest (`target/guest`) under /dev/kvm. Everything goes through the mTLS API with
//! tokens, exactly as a customer would drive it.
//!
//! Needs `/dev/kvm`, `target/guest/{vmlinux,initramfs.cpio}` (`make guest`) and the release
//! binaries of the hypervisor and the block card next to the controller's. Without /dev/kvm or the
//! guest each test prints `*** SKIPPED` and returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bulkhead_blockcard::xts::{CryptoSectorSize, XtsCipher};
use bulkhead_sealing::{seal_volume_key, HostKey};
use bulkhead_tokens::Operation;
use common::*;

/// 32 bytes, written by the guest at byte offset 4096 of /dev/vda (sector 8).
const MARKER: &str = "BHMARK-5e1f0c9a7d3b2e4f6a8c0b1d3";
const MARKER_OFFSET: usize = 4096;

const CUSTOMER_OPS: &[Operation] = &[
    Operation::CreateInstance,
    Operation::DescribeInstance,
    Operation::StartInstance,
    Operation::StopInstance,
    Operation::TerminateInstance,
    Operation::AttachVolume,
    Operation::DetachVolume,
    Operation::GetConsole,
];

/// Whether this machine can run the boot tests; prints the loud skip line if not.
fn can_boot(test: &str) -> bool {
    can_boot_with(test, &["bulkhead-hypervisor", "bulkhead-blockcard"])
}

/// `BULKHEAD_TEST_HYPERVISOR_BIN` overrides the hypervisor next to the controller (to try a
/// hypervisor build from elsewhere).
fn start_host_daemon(dir: &Path) -> Daemon {
    let guest = guest_dir();
    let mut args = vec![
        "--backend".to_string(),
        "host".to_string(),
        "--guest-dir".to_string(),
        guest.to_str().unwrap().to_string(),
    ];
    if let Some(h) = std::env::var_os("BULKHEAD_TEST_HYPERVISOR_BIN") {
        args.push("--hypervisor-bin".into());
        args.push(h.into_string().unwrap());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start_with(dir, &args)
}

fn sealed_b64(host: &HostKey, volume: &str, key: &[u8; 64]) -> String {
    let blob = seal_volume_key(host.public(), volume, key).unwrap();
    base64::engine::general_purpose::STANDARD.encode(blob)
}

struct Api<'a> {
    d: &'a Daemon,
    c: Client,
}

impl Api<'_> {
    fn call(&self, method: &str, path: &str, body: &str) -> Resp {
        // A fresh token per call: the boot test outlives a token's lifetime.
        let t = self.d.mint("customer", HOST, CUSTOMER_OPS, MIN10);
        self.c
            .request(method, path, Some(&t), body.as_bytes())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn ok(&self, method: &str, path: &str, body: &str) -> Resp {
        let r = self.call(method, path, body);
        assert!(
            r.status == 200 || r.status == 201,
            "{method} {path}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        r
    }
}

/// The backing file holds no plaintext marker, and the sector the guest wrote it to decrypts
/// to the marker with `key` (AES-256-XTS, 512-byte sectors, tweak = sector number).
fn assert_marker_encrypted(backing: &Path, key: &[u8; 64]) {
    let data = std::fs::read(backing).unwrap();
    assert!(
        !data.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "marker found in plaintext in {}",
        backing.display()
    );
    let mut sector = data[MARKER_OFFSET..MARKER_OFFSET + 512].to_vec();
    assert!(sector.iter().any(|b| *b != 0), "nothing was written");
    XtsCipher::new(key, CryptoSectorSize::S512)
        .unwrap()
        .decrypt(&mut sector, 8)
        .unwrap();
    assert_eq!(&sector[..MARKER.len()], MARKER.as_bytes());
}

/// Polls the instance's console until `needle` shows up (bounded by the boot timeout).
fn wait_console(api: &Api<'_>, id: &str, needle: &str) {
    let started = Instant::now();
    loop {
        let r = api.ok("GET", &format!("/v1/instances/{id}/console"), "");
        let out = r.json["output"].as_str().unwrap_or("").to_string();
        if out.contains(needle) {
            return;
        }
        assert!(
            started.elapsed() < boot_timeout(),
            "no {needle:?} after {:?}; console so far:\n{out}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The pid of the live block card serving `volume` (found by its backing file argument).
fn card_pid(volume: &str) -> Option<i32> {
    let needle = format!("{volume}.img");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let zombie = stat.rsplit(')').next()?.trim_start().starts_with('Z');
        (cmd.contains("bulkhead-blockcard") && cmd.contains(&needle) && !zombie).then_some(pid)
    })
}

fn describe_backend(d: &Daemon) -> String {
    let t = d.mint("operator", HOST, &[Operation::DescribeHost], MIN10);
    let r = d
        .client("operator")
        .request("GET", "/v1/host", Some(&t), b"")
        .unwrap();
    assert_eq!(r.status, 200);
    r.json["backend"].as_str().unwrap_or("").to_string()
}

fn card_sockets(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("run"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                // The keeper's own socket and pid file stay while it runs.
                .filter(|f| !f.starts_with("keeper.") && f != "controller.lock")
                .collect()
        })
        .unwrap_or_default()
}

/// One boot: create → attach an encrypted volume (sealed key) → start → the guest writes a
/// marker to /dev/vda through the real card and reads it back → terminate → the backing file
/// holds only ciphertext, which decrypts (AES-256-XTS, sector tweak) to the marker.
#[test]
fn boots_a_guest_with_an_encrypted_volume() {
    if !can_boot("boots_a_guest_with_an_encrypted_volume") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Create the dev state first so host.key sits next to it.
    bulkhead_tokens::statedir::StateDir::new(dir.path())
        .ensure_dev(HOST)
        .unwrap();
    let host = host_key(dir.path());
    let d = start_host_daemon(dir.path());
    assert_eq!(describe_backend(&d), "host");
    let api = Api {
        d: &d,
        c: d.client("customer"),
    };

    let script = format!(
        "read -r n </sys/block/vda/size; echo vda-sectors=$n\n\
         printf %s {MARKER} | dd of=/dev/vda bs=32 seek=128 conv=fsync 2>/dev/null\n\
         echo 3 >/proc/sys/vm/drop_caches\n\
         R=$(dd if=/dev/vda bs=32 skip=128 count=1 2>/dev/null)\n\
         echo readback=$R\n\
         [ \"$R\" = {MARKER} ]\n"
    );
    let create = serde_json::json!({
        "instance_id": "i-boot",
        "image": "test-guest",
        "vcpus": 1,
        "memory_mib": 128,
        "user_data": script,
    })
    .to_string();
    let r = api.ok("POST", "/v1/instances", &create);
    assert_eq!(r.json["state"], "created");

    let key = volume_key(7);
    let blob = sealed_b64(&host, "vol-boot", &key);
    let attach = serde_json::json!({"volume_id": "vol-boot", "sealed_key": blob}).to_string();
    api.ok("POST", "/v1/instances/i-boot/volumes", &attach);
    let r = api.ok("GET", "/v1/instances/i-boot", "");
    assert_eq!(r.json["volumes"], serde_json::json!(["vol-boot"]));
    assert_eq!(
        card_sockets(dir.path()).len(),
        2,
        "one card: control + vhost socket"
    );

    let started = Instant::now();
    api.ok("POST", "/v1/instances/i-boot/start", "");
    let console = loop {
        let r = api.ok("GET", "/v1/instances/i-boot/console", "");
        let out = r.json["output"].as_str().unwrap_or("").to_string();
        if out.contains("BULKHEAD-RUN-EXIT=") {
            break out;
        }
        // Fail fast if the VM is no longer running (hypervisor died, guest reset early).
        let st = api.ok("GET", "/v1/instances/i-boot", "");
        if st.json["state"] != "running" {
            let r = api.ok("GET", "/v1/instances/i-boot/console", "");
            let out = r.json["output"].as_str().unwrap_or("").to_string();
            if out.contains("BULKHEAD-RUN-EXIT=") {
                break out;
            }
            panic!(
                "instance is {} before the script finished ({:?}); console:\n{out}",
                st.json["state"],
                started.elapsed()
            );
        }
        assert!(
            started.elapsed() < boot_timeout(),
            "no BULKHEAD-RUN-EXIT after {:?}; console so far:\n{out}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_secs(3));
    };
    eprintln!(
        "guest finished its script after {:?}; console:\n{console}",
        started.elapsed()
    );
    assert!(console.contains("BULKHEAD-GUEST-READY"), "{console}");
    assert!(console.contains("vda-sectors=131072"), "{console}");
    assert!(console.contains(&format!("readback={MARKER}")), "{console}");
    assert!(console.contains("BULKHEAD-RUN-EXIT=0"), "{console}");

    api.ok("POST", "/v1/instances/i-boot/terminate", "");
    let r = api.ok("GET", "/v1/instances/i-boot", "");
    assert_eq!(r.json["state"], "terminated");
    assert_eq!(r.json["volumes"], serde_json::json!([]));
    assert!(
        card_sockets(dir.path()).is_empty(),
        "card sockets left behind: {:?}",
        card_sockets(dir.path())
    );

    // The backing file: no plaintext marker anywhere, ciphertext where the guest wrote it, and
    // that ciphertext decrypts with the volume key (AES-256-XTS, tweak = sector number).
    assert_marker_encrypted(&dir.path().join("volumes/vol-boot.img"), &key);

    // The sealed blob never reached the audit log (only a digest of the body did).
    let log = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    assert!(!log.contains(&blob));
    let attach_rec = d
        .audit()
        .into_iter()
        .find(|r| r["entry"]["op"] == "AttachVolume" && r["entry"]["kind"] == "outcome")
        .expect("attach outcome audited");
    assert_eq!(attach_rec["entry"]["code"], "ok");
}

/// A refused key changes nothing; a volume attached before boot is there at boot; a second
/// volume is hot-plugged into the running guest (which writes to it through the card) and the
/// first is hot-unplugged (its card zeroizes the key and exits); the operator plane is still
/// refused with the real backend.
#[test]
fn hot_attach_and_detach_on_a_running_instance() {
    if !can_boot("hot_attach_and_detach_on_a_running_instance") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    bulkhead_tokens::statedir::StateDir::new(dir.path())
        .ensure_dev(HOST)
        .unwrap();
    let host = host_key(dir.path());
    let d = start_host_daemon(dir.path());
    assert_eq!(describe_backend(&d), "host");
    let api = Api {
        d: &d,
        c: d.client("customer"),
    };
    // The guest waits for the hot-plugged disk (vdb), writes a marker to it, then waits for
    // the boot disk (vda) to be pulled.
    let script = format!(
        "while [ ! -e /sys/block/vdb ]; do :; done\n\
         printf %s {MARKER} | dd of=/dev/vdb bs=32 seek=128 conv=fsync 2>/dev/null\n\
         echo hot-written\n\
         while [ -e /sys/block/vda ]; do :; done\n\
         echo vda-gone\n\
         while [ -e /sys/block/vdb ]; do :; done\n\
         echo vdb-gone\n\
         d=; while [ -z \"$d\" ]; do for x in /sys/block/vd*; do [ -e \"$x\" ] && d=${{x##*/}}; done; done\n\
         r=$(dd if=/dev/$d bs=32 skip=128 count=1 2>/dev/null)\n\
         [ \"$r\" = {MARKER} ] && echo reattached-$((40+2))\n"
    );
    let create = serde_json::json!({
        "instance_id": "i-hp",
        "image": "test-guest",
        "vcpus": 1,
        "memory_mib": 128,
        "user_data": script,
    })
    .to_string();
    api.ok("POST", "/v1/instances", &create);

    // Unknown image: typed error.
    let r = api.call(
        "POST",
        "/v1/instances",
        r#"{"instance_id":"i-x","image":"ubuntu","vcpus":1,"memory_mib":128}"#,
    );
    assert_eq!((r.status, r.code()), (404, "no_such_image"));

    // A blob sealed for another volume: the real card refuses it; nothing stays attached.
    let wrong = sealed_b64(&host, "vol-other", &volume_key(1));
    let body = serde_json::json!({"volume_id": "vol-a", "sealed_key": wrong}).to_string();
    let r = api.call("POST", "/v1/instances/i-hp/volumes", &body);
    assert_eq!(
        (r.status, r.code()),
        (400, "volume_key_refused"),
        "{:?}",
        r.json
    );
    let r = api.ok("GET", "/v1/instances/i-hp", "");
    assert_eq!(r.json["volumes"], serde_json::json!([]));
    assert!(card_sockets(dir.path()).is_empty());

    // The right blob attaches before boot.
    let good = sealed_b64(&host, "vol-a", &volume_key(2));
    let body = serde_json::json!({"volume_id": "vol-a", "sealed_key": good}).to_string();
    api.ok("POST", "/v1/instances/i-hp/volumes", &body);
    assert_eq!(card_sockets(dir.path()).len(), 2);
    // Before the first start a volume also detaches: DetachBlock + card Detach (key zeroized,
    // card exits and is reaped), then it attaches again.
    api.ok("DELETE", "/v1/instances/i-hp/volumes/vol-a", "");
    let r = api.ok("GET", "/v1/instances/i-hp", "");
    assert_eq!(r.json["volumes"], serde_json::json!([]));
    assert!(card_sockets(dir.path()).is_empty());
    api.ok("POST", "/v1/instances/i-hp/volumes", &body);
    api.ok("POST", "/v1/instances/i-hp/start", "");
    let r = api.ok("GET", "/v1/instances/i-hp", "");
    assert_eq!(r.json["state"], "running");

    // Once the guest is up, hot-plug a second volume into it: the call returns once the
    // guest's driver has the disk, and the guest writes through the card.
    wait_console(&api, "i-hp", "BULKHEAD-GUEST-READY");
    let key_b = volume_key(3);
    let late = sealed_b64(&host, "vol-b", &key_b);
    let body = serde_json::json!({"volume_id": "vol-b", "sealed_key": late}).to_string();
    api.ok("POST", "/v1/instances/i-hp/volumes", &body);
    let r = api.ok("GET", "/v1/instances/i-hp", "");
    assert_eq!(r.json["volumes"], serde_json::json!(["vol-a", "vol-b"]));
    assert_eq!(card_sockets(dir.path()).len(), 4);
    wait_console(&api, "i-hp", "hot-written");

    // Hot-unplug the boot volume: the guest sees vda go, the card leaves.
    api.ok("DELETE", "/v1/instances/i-hp/volumes/vol-a", "");
    let r = api.ok("GET", "/v1/instances/i-hp", "");
    assert_eq!(r.json["volumes"], serde_json::json!(["vol-b"]));
    assert_eq!(r.json["state"], "running");
    assert_eq!(card_sockets(dir.path()).len(), 2);
    wait_console(&api, "i-hp", "vda-gone");
    assert!(d.audit().iter().any(|x| x["entry"]["op"] == "DetachVolume"
        && x["entry"]["kind"] == "outcome"
        && x["entry"]["code"] == "ok"));

    // What the guest wrote to the hot-plugged disk is ciphertext under vol-b's key.
    assert_marker_encrypted(&dir.path().join("volumes/vol-b.img"), &key_b);

    // The card serving vol-b dies of SIGSYS, as it would when its seccomp filter kills it. The
    // system converges: the detach still succeeds (the hypervisor pulls the disk, the guest lets
    // it go, the dead card is reaped, the volume is free), what the guest wrote before the crash
    // is on disk under vol-b's key (checked above), and the volume attaches again to the same
    // running guest, which reads it back. The death is a `sandbox_kill` alert, audited.
    let pid = card_pid("vol-b").expect("vol-b's card is running");
    // SAFETY: kill(2) with a pid we just found and a constant signal.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSYS) }, 0);
    api.ok("DELETE", "/v1/instances/i-hp/volumes/vol-b", "");
    wait_console(&api, "i-hp", "vdb-gone");
    assert!(
        card_pid("vol-b").is_none(),
        "the crashed card was not reaped"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !d.audit().iter().any(|x| {
        x["entry"]["kind"] == "alert"
            && x["entry"]["op"] == "sandbox_kill"
            && x["entry"]["caller"] == format!("card-{pid}")
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "no sandbox_kill alert for the card"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = api.ok("GET", "/v1/instances/i-hp", "");
    assert_eq!(r.json["volumes"], serde_json::json!([]));
    api.ok("POST", "/v1/instances/i-hp/volumes", &body);
    wait_console(&api, "i-hp", "reattached-42");
    api.ok("DELETE", "/v1/instances/i-hp/volumes/vol-b", "");

    // An operator's token still cannot reach any customer-plane operation.
    let t = d.mint("operator", HOST, &[Operation::DescribeHost], MIN10);
    let op = d.client("operator");
    for (m, p, b) in [
        ("GET", "/v1/instances/i-hp/console", ""),
        ("POST", "/v1/instances/i-hp/terminate", ""),
        ("POST", "/v1/instances/i-hp/volumes", body.as_str()),
    ] {
        let r = op.request(m, p, Some(&t), b.as_bytes()).unwrap();
        assert_denied_and_audited(&d, &r, "plane_violation");
    }

    api.ok("POST", "/v1/instances/i-hp/terminate", "");
    let r = api.ok("GET", "/v1/instances/i-hp", "");
    assert_eq!(r.json["state"], "terminated");
    assert!(card_sockets(dir.path()).is_empty());
}
