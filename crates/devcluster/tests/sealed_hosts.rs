//! `bulkhead up --sealed-hosts`: every host of the dev cluster is the sealed host image booted
//! under QEMU (TCG) with OVMF and its own swtpm, and the control plane attests each one's whole
//! boot chain against the image manifest.
//!
//! One cluster, three sealed hosts booted at once (TCG boots are slow, so the cases share them):
//! host-1 runs the image as built; host-2 runs the same image rebuilt with `lockdown=none` for
//! `lockdown=confidentiality` on its command line (`--sealed-boot-image 2=...`), while the
//! control plane expects the first image's manifest for both; host-3 runs the good image on a
//! TPM made by a rogue manufacturer (`--sealed-rogue-tpm 3`: its EK certificate chains to a CA
//! the control plane does not trust). Checked through the real `bulkhead-devcluster up`
//! process and the control plane's operator API (mTLS, operator certificate): host-1 is polled
//! (its DescribeHost answer is stored), its AK is certified by its TPM's EK (the credential
//! round through its controller and agent) and its boot chain is attested (PCRs 4, 9, 11, 12,
//! 23); host-2 answers its polls too but is refused with `boot_pcr_mismatch` naming PCRs 4, 9
//! and 11 (not 12, not 23) and a `host_attestation_failed` alert; host-3 is refused before any
//! PCR is looked at (`ek_bad_signature`: its EK certificate names a CA of the trusted name that
//! did not sign it) with its own alert, and no EK is recorded for it; a TCP connect scan of all 65535 ports of host-1's address from the orchestrator finds
//! only the controller's mTLS port; RunInstances finds no capacity (sealed hosts offer no cores
//! here: no nested virtualization, their controllers run the detached backend). Stopping the cluster (SIGTERM) removes its namespaces.
//!
//! Needs root, qemu-system-x86_64, OVMF, swtpm, the host kernel in its cache (`make
//! host-image`) and the release binaries (`make build`); skips loudly otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_devcluster::sealed;
use bulkhead_mtls::HttpsClient;
use bulkhead_tokens::pki::ServerIdentity;
use serde_json::Value;

/// The workspace's release binaries (`make test` builds them before the tests run).
fn bins() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `up` process; SIGTERM (its clean stop) on drop, then SIGKILL if it lingers.
struct Up(Child);
impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) on our own child's pid with SIGTERM.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn host<'a>(hosts: &'a Value, id: &str) -> &'a Value {
    hosts
        .as_array()
        .and_then(|a| a.iter().find(|h| h["host_id"] == id))
        .unwrap_or(&Value::Null)
}

#[test]
fn sealed_hosts_are_attested_by_their_boot_chain_and_a_differing_image_is_refused() {
    let b = bins();
    if let Some(why) = sealed::missing_resource() {
        bulkhead_testkit::skip_or_fail(&format!("sealed hosts: {why}"));
        return;
    }
    for bin in [
        "bulkhead-controller",
        "bulkhead-host-agent",
        "bulkhead-init",
    ] {
        if !b.join(bin).is_file() {
            bulkhead_testkit::skip_or_fail(&format!(
                "sealed hosts: no release {bin} (cargo build --release --workspace --bins)"
            ));
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    let bad = tmp.path().join("bad");
    if !sealed::build_image(&repo(), &good, None).unwrap() {
        bulkhead_testkit::skip_or_fail(
            "sealed hosts: the host kernel is not built (`make host-image`)",
        );
        return;
    }
    let cmdline = std::fs::read_to_string(good.join("cmdline")).unwrap();
    let tampered = cmdline.replace("lockdown=confidentiality", "lockdown=none");
    assert_ne!(cmdline, tampered, "the image's command line names lockdown");
    assert!(sealed::build_image(&repo(), &bad, Some(&tampered)).unwrap());

    let dir = tmp.path().join("cluster");
    std::fs::create_dir_all(&dir).unwrap();
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead-devcluster"))
        .arg("up")
        .arg("--dir")
        .arg(&dir)
        .args(["--hosts", "3", "--sealed-hosts", "--host-image"])
        .arg(&good)
        .arg("--sealed-boot-image")
        .arg(format!("2={}", bad.display()))
        .args(["--sealed-rogue-tpm", "3"])
        .arg("--bins")
        .arg(&b)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(tmp.path().join("up.log")).unwrap())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let up = Up(child);
    // Everything `up` prints, until its ready line (or its end, on failure).
    let mut printed = String::new();
    let mut reader = BufReader::new(out);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            panic!(
                "`up --sealed-hosts` ended before it was ready:\n{printed}\n{}",
                std::fs::read_to_string(tmp.path().join("up.log")).unwrap_or_default()
            );
        }
        printed.push_str(&line);
        if line.contains("\"event\":\"ready\"") {
            break;
        }
    }
    let up_secs = t0.elapsed().as_secs_f64();
    std::thread::spawn(move || {
        let mut sink = String::new();
        while reader.read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    });
    assert!(printed.contains("sealed host    host-1"), "{printed}");
    // `up` itself waits for the control plane's verdicts and prints them.
    assert!(
        printed.contains("boot chain     host-1: attested"),
        "{printed}"
    );
    assert!(
        printed.contains("boot chain     host-2: REFUSED (boot_pcr_mismatch"),
        "{printed}"
    );
    assert!(
        printed.contains("boot chain     host-3: REFUSED (ek_"),
        "{printed}"
    );
    let info: Value =
        serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).unwrap()).unwrap();
    let operator = info["operator"].as_str().unwrap().to_string();
    let addr1 = info["hosts"][0]["addr"].as_str().unwrap().to_string();
    assert!(
        addr1.ends_with(&format!(":{}", sealed::MTLS_PORT)),
        "{addr1}"
    );

    // --- the operator view: host-1 polled and attested, host-2 polled and refused ----------
    let ca = dir.join("ca");
    let op = HttpsClient::pinned(
        &ca.join("ca.pem"),
        Some((&ca.join("operator.pem"), &ca.join("operator.key"))),
        ServerIdentity::control_plane(),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let get = |path: &str| -> Value {
        let r = rt
            .block_on(op.request(&operator, "GET", path, &[], Vec::new()))
            .unwrap();
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        serde_json::from_slice(&r.body).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let hosts = loop {
        let v = get("/v1/operator/hosts");
        let settled = |id: &str| {
            let h = host(&v, id);
            !h["status"].is_null() && h["boot_attestation"]["state"] != "pending"
        };
        if settled("host-1") && settled("host-2") && settled("host-3") {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "hosts not polled and attested within 120 s: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let attested_secs = t0.elapsed().as_secs_f64();
    let h1 = host(&hosts, "host-1");
    let h2 = host(&hosts, "host-2");
    assert_eq!(h1["boot_attestation"]["state"], "attested", "{hosts:#}");
    assert_eq!(
        h1["boot_attestation"]["pcrs_verified"],
        serde_json::json!([4, 9, 11, 12, 23])
    );
    assert_eq!(h1["cores"], 0, "no instances on a sealed host here");
    // The AK was enrolled only after its TPM's EK certificate verified and the credential came
    // back: the EK's fingerprint is on record.
    assert_eq!(
        h1["boot_attestation"]["ek"].as_str().map(str::len),
        Some(64),
        "{hosts:#}"
    );
    // --- host-3: a TPM of another manufacturer: its AK is never enrolled ----------------
    let h3 = host(&hosts, "host-3");
    assert_eq!(h3["boot_attestation"]["state"], "refused", "{hosts:#}");
    let code3 = h3["boot_attestation"]["code"].as_str().unwrap_or("");
    assert!(
        code3 == "ek_bad_signature" || code3 == "ek_untrusted_issuer",
        "host-3 refused with {code3}: {hosts:#}"
    );
    assert!(h3["boot_attestation"]["ek"].is_null(), "{hosts:#}");
    assert!(!h3["status"].is_null(), "{hosts:#}");
    assert_eq!(h2["boot_attestation"]["state"], "refused", "{hosts:#}");
    assert_eq!(h2["boot_attestation"]["code"], "boot_pcr_mismatch");
    let differing: Vec<u64> = h2["boot_attestation"]["pcrs_differing"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(differing, vec![4, 9, 11], "{hosts:#}");
    // Both answered DescribeHost: the refusal is the boot chain's, not an unreachable host.
    assert!(!h2["status"].is_null(), "{hosts:#}");
    let alerts = get("/v1/operator/alerts");
    let raised = alerts["alerts"].as_array().unwrap().iter().any(|a| {
        a.to_string().contains("host_attestation_failed") && a.to_string().contains("host-2")
    });
    assert!(
        raised,
        "no host_attestation_failed alert for host-2: {alerts:#}"
    );
    let raised3 = alerts["alerts"].as_array().unwrap().iter().any(|a| {
        a.to_string().contains("host_attestation_failed") && a.to_string().contains("host-3")
    });
    assert!(
        raised3,
        "no host_attestation_failed alert for host-3: {alerts:#}"
    );
    let wrong = alerts["alerts"].as_array().unwrap().iter().any(|a| {
        a.to_string().contains("host_attestation_failed") && a.to_string().contains("host-1")
    });
    assert!(!wrong, "host-1 alerted: {alerts:#}");

    // --- no instance is placed on a sealed host here (0 cores: detached backend) ---------
    let creds = tmp.path().join("acme.json");
    let made = Command::new(b.join("bulkhead-control"))
        .arg("create-customer")
        .arg("--config")
        .arg(dir.join("control.toml"))
        .args(["--tenant", "acme", "--out"])
        .arg(&creds)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(made.success());
    let run = Command::new(b.join("bulkhead-control"))
        .arg("call")
        .arg("--endpoint")
        .arg(info["control"].as_str().unwrap())
        .arg("--ca")
        .arg(ca.join("ca.pem"))
        .arg("--credentials")
        .arg(&creds)
        .args(["RunInstances", r#"{"ImageId":"img-1"}"#])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&run.stdout);
    assert!(!run.status.success(), "an instance was placed: {answer}");
    assert!(answer.contains("insufficient_capacity"), "{answer}");

    // --- from the orchestrator's network: only the controller's mTLS port ----------------
    let ip: std::net::Ipv4Addr = addr1.rsplit_once(':').unwrap().0.parse().unwrap();
    let t = Instant::now();
    let (open, silent) = sealed::tcp_scan(ip, 3);
    let scan_secs = t.elapsed().as_secs_f64();
    assert_eq!(open, vec![sealed::MTLS_PORT], "open TCP ports of {ip}");
    assert!(
        silent.is_empty(),
        "TCP ports that never answered: {silent:?}"
    );

    // --- stop: the namespaces go with the cluster -----------------------------------------
    let ns: Vec<String> = info["netns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["ns"].as_str().unwrap().to_string())
        .collect();
    drop(up);
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    for n in &ns {
        assert!(!listed.contains(n.as_str()), "{n} left behind");
    }
    eprintln!(
        "sealed hosts: `up` ready {up_secs:.1} s after start (image builds excluded: three hosts booted at once under TCG), all verdicts {attested_secs:.1} s; {}; TCP scan {scan_secs:.1} s",
        printed
            .lines()
            .filter(|l| l.contains("sealed host    ") || l.contains("boot chain     "))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("; ")
    );
}
