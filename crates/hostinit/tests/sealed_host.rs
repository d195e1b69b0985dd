//! A sealed host boots and has no way in: the image (UKI) boots under OVMF with a per-host
//! swtpm, PID 1 comes up with its hardening read back and lockdown at confidentiality, the
//! controller starts, a scan of all 65535 TCP ports from the host network finds only the
//! controller's mTLS port, a scan of all 65535 UDP ports finds nothing open, and bytes typed on
//! the serial console produce no prompt, no echo and run nothing.
//!
//! One boot (QEMU TCG, ~1-2 min here). Needs root, qemu-system-x86_64, OVMF (package ovmf),
//! swtpm, the host kernel in its cache (`make host-image`) and the release binaries.

mod common;

use std::time::{Duration, Instant};

use common::{HostNet, SealedHost, MTLS_PORT};

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("BULKHEAD_KEEP_TEST_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn sealed_host_boots_with_no_way_in() {
    if let Some(why) = common::missing_resource() {
        bulkhead_testkit::skip_or_fail(&why);
        return;
    }
    let tmp = std::env::temp_dir().join(format!("bulkhead-sealed-{}", std::process::id()));
    let _keep = TempDir(tmp.clone());
    std::fs::create_dir_all(&tmp).expect("tmp");
    if let Err(why) = common::build_image(&tmp.join("image"), None) {
        bulkhead_testkit::skip_or_fail(&why);
        return;
    }
    let net = HostNet::new("a");
    common::config_disk(&tmp.join("pki"), "host-1", &net, &tmp.join("config.img"));
    let mut host = SealedHost::boot(
        &tmp.join("host-1"),
        &tmp.join("image/bulkhead-host.efi"),
        &tmp.join("config.img"),
        &net,
        None,
    );

    // --- the kernel and PID 1 come up, hardened, and start the controller -----------------
    let t_init = host.wait_for("BULKHEAD-HOST-INIT pid 1 up", Duration::from_secs(300));
    host.wait_for("BULKHEAD-HOST-CONTROLLER started", Duration::from_secs(120));
    let t_ready = host.wait_for("\"event\":\"ready\"", Duration::from_secs(120));
    let boot_log = host.console_text();
    assert!(
        boot_log.contains("lockdown: none integrity [confidentiality]"),
        "lockdown is not at confidentiality:\n{boot_log}"
    );
    assert!(boot_log.contains("BULKHEAD-HOST-SYSCTL"), "{boot_log}");
    assert!(boot_log.contains("measured into PCR 23"), "{boot_log}");
    assert!(!boot_log.contains("BULKHEAD-HOST-HALT"), "{boot_log}");
    assert!(
        boot_log.contains("absent: /dev/mem /dev/kmem /dev/port /proc/kcore /proc/modules"),
        "{boot_log}"
    );
    assert!(
        boot_log.contains("; present: []"),
        "an interface a sealed host must not have:\n{boot_log}"
    );

    // --- from the host network: only the mTLS port, on TCP; nothing on UDP ----------------
    let ip = net.host_ip;
    let t = Instant::now();
    let (open, silent) = net.within(|| common::tcp_scan(ip, 3));
    let tcp_secs = t.elapsed().as_secs_f64();
    assert_eq!(open, vec![MTLS_PORT], "open TCP ports");
    assert!(
        silent.is_empty(),
        "TCP ports that never answered (open or filtered): {silent:?}"
    );
    let t = Instant::now();
    let (udp_silent, udp_data) = net.within(|| common::udp_scan(ip, 4));
    let udp_secs = t.elapsed().as_secs_f64();
    assert!(udp_data.is_empty(), "UDP ports that answered: {udp_data:?}");
    assert!(
        udp_silent.is_empty(),
        "UDP ports not refused (open or filtered): {udp_silent:?}"
    );

    // --- the serial console: nothing typed is read, echoed or run --------------------------
    let before = host.console_len();
    for line in [
        &b"\r\n\r\n"[..],
        b"root\r\n",
        b"/bin/sh\r\n",
        b"echo BULKHEAD-PWNED-$((6*7))\r\n",
        b"\x03\x04\x1a\r\n",
        b"\x1bOP\x1b[A\r\n",
    ] {
        host.type_on_console(line);
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(3));
    let after = host.console_text();
    let typed_reply = after.get(before..).unwrap_or("").to_string();
    for bad in [
        "PWNED", "42", "login", "root", "/bin/sh", "#", "$ ", "Password",
    ] {
        assert!(
            !typed_reply.contains(bad),
            "console answered typed input ({bad:?}): {typed_reply:?}"
        );
    }
    assert!(
        !after.contains("login:"),
        "a login prompt on the console:\n{after}"
    );
    assert!(!host.exited(), "the host stopped after console input");
    // The controller still serves after all of it.
    let still = net.within(|| {
        std::net::TcpStream::connect_timeout(&(ip, MTLS_PORT).into(), Duration::from_secs(5))
            .is_ok()
    });
    assert!(still, "the mTLS port stopped answering");

    eprintln!(
        "sealed host: PID 1 up {:.1} s after QEMU start, controller ready {:.1} s; TCP scan {tcp_secs:.1} s, UDP scan {udp_secs:.1} s; console bytes after typing: {}",
        t_init.as_secs_f64(),
        t_ready.as_secs_f64(),
        typed_reply.len()
    );
}
