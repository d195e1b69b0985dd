//! Live-update pause, Bulkhead vs QEMU local migration, in one run (`make bench`; `cargo bench
//! -p bulkhead-hypervisor --bench live_update`). Prints a markdown section on stdout.
//!
//! Both boot the same kernel and initramfs (128 MiB, 1 vCPU, `-accel kvm` for QEMU) with the
//! same guest script: print `C=<counter> U=<uptime>` in a tight loop. Then [`UPDATES`] times:
//!
//! * Bulkhead: `Hypervisor::live_update` — a new `bulkhead-hypervisor incoming` process takes
//!   the VM over (same memfd); the pause is the hypervisors' own measure (`Reply::Updated`).
//! * QEMU: a new `qemu-system-x86_64 -incoming defer` process on the same host with the same
//!   shared guest RAM (`memory-backend-file,share=on` in /dev/shm, plus the `x-ignore-shared`
//!   capability so RAM is not copied), `migrate` over a unix socket; the pause is QEMU's
//!   `downtime` from `query-migrate`. (QEMU 7.2 cannot hand an anonymous memfd to another
//!   process; a shared /dev/shm file is the same memory without a copy.)
//!
//! For both, the longest gap between two consecutive uptime readings the guest printed across
//! an update is the pause as the guest sees it (its uptime has 10 ms steps, and this slow guest
//! prints a line every few tens of ms, so this is an upper bound).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common.rs"]
mod common;
#[path = "shared/percentile.rs"]
mod percentile;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_channel::{Command as Cmd, Reply};
use bulkhead_hypervisor_client::{Hypervisor, VmSpec};
use common::*;
use percentile::pct;

const UPDATES: usize = 20;
const TIMEOUT: Duration = Duration::from_secs(300);
const SCRIPT: &str =
    "i=0\nwhile :; do\ni=$((i+1))\nread -r u x </proc/uptime\necho C=$i U=$u\ndone\n";

/// Pauses (ms), guest-observed gaps across updates (ms), median line step (ms).
type Run = (Vec<f64>, Vec<f64>, f64);

/// (counter, uptime in ms) of every `C=` line.
fn counts(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let (c, u) = l.strip_prefix("C=")?.split_once(" U=")?;
            let (s, cs) = u.trim().split_once('.')?;
            Some((
                c.parse().ok()?,
                s.parse::<u64>().ok()? * 1000 + cs.parse::<u64>().ok()? * 10,
            ))
        })
        .collect()
}

fn last_count(text: &str) -> u64 {
    counts(text).last().map_or(0, |c| c.0)
}

/// For each update (last counter before, first after): the longest uptime step between lines
/// in that window; and the median step over the whole run.
fn guest_gaps(text: &str, updates: &[(u64, u64)]) -> (Vec<f64>, f64) {
    let c = counts(text);
    let steps: Vec<f64> = c
        .windows(2)
        .map(|w| (w[1].1.saturating_sub(w[0].1)) as f64)
        .collect();
    let across = updates
        .iter()
        .map(|(a, b)| {
            c.windows(2)
                .filter(|w| w[0].0 >= *a && w[1].0 <= *b)
                .map(|w| w[1].1.saturating_sub(w[0].1) as f64)
                .fold(0.0, f64::max)
        })
        .collect();
    (across, pct(&steps, 50))
}

fn bulkhead(kernel: &Path, initrd: &Path) -> Run {
    let spec = VmSpec {
        binary: hypervisor(),
        kernel: kernel.to_path_buf(),
        initrd: Some(initrd.to_path_buf()),
        cmdline: format!("{GUEST_ARGS} {}", run_arg(SCRIPT)),
        memory_mib: 128,
        vcpus: 1,
        pin: Vec::new(),
        run_as: None,
    };
    let mut hv = Hypervisor::spawn(&spec).expect("spawn");
    hv.call(Cmd::Start, None).expect("start");
    let (mut text, mut cursor) = (String::new(), 0u64);
    let mut read = |hv: &mut Hypervisor, text: &mut String| loop {
        match hv.call(Cmd::ReadConsole { cursor, max: 32768 }, None) {
            Ok(Reply::Console { data, next, .. }) => {
                text.push_str(&String::from_utf8_lossy(&data));
                cursor = next;
                if data.is_empty() {
                    return;
                }
            }
            other => panic!("console: {other:?}"),
        }
    };
    let deadline = Instant::now() + TIMEOUT;
    while last_count(&text) < 20 {
        assert!(Instant::now() < deadline, "Bulkhead guest never counted");
        std::thread::sleep(Duration::from_millis(100));
        read(&mut hv, &mut text);
    }
    let (mut pauses, mut updates) = (Vec::new(), Vec::new());
    for _ in 0..UPDATES {
        read(&mut hv, &mut text);
        let before = last_count(&text);
        pauses.push(hv.live_update(&hypervisor(), None).expect("live update") as f64 / 1e3);
        while last_count(&text) < before + 2 {
            std::thread::sleep(Duration::from_millis(20));
            read(&mut hv, &mut text);
        }
        updates.push((before, last_count(&text)));
    }
    let _ = hv.shutdown();
    let (across, step) = guest_gaps(&text, &updates);
    (pauses, across, step)
}

struct Qemu {
    child: Child,
    console: PathBuf,
    qmp: BufReader<UnixStream>,
}

impl Qemu {
    fn start(args: &[String], console: PathBuf, qmp_path: &Path, incoming: bool) -> Qemu {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(args)
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64");
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            if let Ok(s) = UnixStream::connect(qmp_path) {
                break s;
            }
            assert!(Instant::now() < deadline, "no QMP socket");
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut q = Qemu {
            child,
            console,
            qmp: BufReader::new(s),
        };
        let mut greeting = String::new();
        q.qmp.read_line(&mut greeting).expect("greeting");
        q.qmp(serde_json::json!({"execute": "qmp_capabilities"}));
        q
    }

    fn qmp(&mut self, cmd: serde_json::Value) -> serde_json::Value {
        self.qmp
            .get_mut()
            .write_all(format!("{cmd}\n").as_bytes())
            .expect("qmp write");
        loop {
            let mut line = String::new();
            self.qmp.read_line(&mut line).expect("qmp read");
            let v: serde_json::Value = serde_json::from_str(&line).expect("qmp json");
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }
}

fn qemu(kernel: &Path, initrd: &Path) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let shm = PathBuf::from(format!("/dev/shm/bulkhead-bench-{}", std::process::id()));
    let args: Vec<String> = [
        "-M",
        "microvm",
        "-accel",
        "kvm",
        "-m",
        "128",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-device",
        "i8042",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "-object".into(),
        format!(
            "memory-backend-file,id=mem,size=128M,share=on,mem-path={}",
            shm.display()
        ),
        "-machine".into(),
        "memory-backend=mem".into(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        format!("{GUEST_ARGS} {}", run_arg(SCRIPT)),
    ])
    .collect();
    let mut consoles = Vec::new();
    let c0 = dir.path().join("console-0.log");
    consoles.push(c0.clone());
    let mut src = Qemu::start(&args, c0, &dir.path().join("qmp-0.sock"), false);
    let deadline = Instant::now() + TIMEOUT;
    while last_count(&src.console()) < 20 {
        assert!(Instant::now() < deadline, "QEMU guest never counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ignore_shared = serde_json::json!({"execute": "migrate-set-capabilities", "arguments": {
        "capabilities": [{"capability": "x-ignore-shared", "state": true}]}});
    let (mut downtimes, mut updates) = (Vec::new(), Vec::new());
    for i in 1..=UPDATES {
        let console = dir.path().join(format!("console-{i}.log"));
        consoles.push(console.clone());
        let mut dst = Qemu::start(
            &args,
            console,
            &dir.path().join(format!("qmp-{i}.sock")),
            true,
        );
        let uri = format!(
            "unix:{}",
            dir.path().join(format!("mig-{i}.sock")).display()
        );
        assert!(dst.qmp(ignore_shared.clone()).get("return").is_some());
        let r =
            dst.qmp(serde_json::json!({"execute": "migrate-incoming", "arguments": {"uri": uri}}));
        assert!(r.get("return").is_some(), "{r}");
        assert!(src.qmp(ignore_shared.clone()).get("return").is_some());
        let before = last_count(&src.console());
        let r = src.qmp(serde_json::json!({"execute": "migrate", "arguments": {"uri": uri}}));
        assert!(r.get("return").is_some(), "{r}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let downtime = loop {
            let s = src.qmp(serde_json::json!({"execute": "query-migrate"}));
            match s["return"]["status"].as_str() {
                Some("completed") => break s["return"]["downtime"].as_f64().unwrap_or(f64::NAN),
                Some("failed") | Some("cancelled") => panic!("QEMU migration failed: {s}"),
                _ => {}
            }
            assert!(Instant::now() < deadline, "QEMU migration did not complete");
            std::thread::sleep(Duration::from_millis(5));
        };
        downtimes.push(downtime);
        let _ = src.qmp(serde_json::json!({"execute": "quit"}));
        let _ = src.child.wait();
        let deadline = Instant::now() + Duration::from_secs(60);
        while last_count(&dst.console()) < 2 {
            assert!(
                Instant::now() < deadline,
                "the migrated QEMU guest does not count"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        updates.push((before, before + 1));
        src = dst;
    }
    let _ = src.qmp(serde_json::json!({"execute": "quit"}));
    let _ = src.child.wait();
    let _ = std::fs::remove_file(&shm);
    let text: String = consoles
        .iter()
        .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned())
        .collect::<Vec<_>>()
        .join("\n");
    // The destination's first line follows the source's last one.
    let c = counts(&text);
    let updates: Vec<(u64, u64)> = updates
        .iter()
        .map(|(a, _)| {
            (
                *a,
                c.iter()
                    .map(|x| x.0)
                    .filter(|x| x > a)
                    .min()
                    .unwrap_or(*a + 1),
            )
        })
        .collect();
    let (across, step) = guest_gaps(&text, &updates);
    (downtimes, across, step)
}

fn main() {
    println!("## Live update: Bulkhead vs QEMU local migration (shared memory)\n");
    let Some((kernel, initrd)) = guest_or_skip("live update bench") else {
        println!("Not measured: no /dev/kvm or no test guest (make guest).\n");
        return;
    };
    let (b_pause, b_gap, b_step) = bulkhead(&kernel, &initrd);
    let q = if which("qemu-system-x86_64").is_some() {
        std::panic::catch_unwind(|| qemu(&kernel, &initrd)).ok()
    } else {
        None
    };
    println!(
        "Command: `cargo bench -p bulkhead-hypervisor --bench live_update` (in `make bench`). \
         Same kernel, initramfs, 128 MiB, 1 vCPU; the guest prints a counter and its uptime in \
         a loop; {UPDATES} updates of one running guest each, p50/p99. Bulkhead: a new \
         `bulkhead-hypervisor incoming` process takes the VM over (same memfd, state over a \
         socket), pause as the hypervisors measure it (old vCPUs stopped → new vCPUs started). \
         QEMU 7.2 `-M microvm`: a new `-incoming defer` process, `memory-backend-file,share=on` \
         in /dev/shm + `x-ignore-shared` (no RAM copy), `migrate` over a unix socket, QEMU's \
         own `downtime`. Guest view: the longest step between two consecutive uptime readings \
         printed across an update (10 ms resolution; the guest prints a line every ~median \
         step, so this bounds the pause from above).\n"
    );
    println!("| metric | Bulkhead | QEMU | ratio (Bulkhead/QEMU) |");
    println!("|---|---:|---:|---:|");
    let row = |name: &str, b: f64, q: Option<f64>| match q {
        Some(q) => println!("| {name} | {b:.2} | {q:.2} | {:.2} |", b / q),
        None => println!("| {name} | {b:.2} | not measured | — |"),
    };
    let qv = |f: &dyn Fn(&Run) -> f64| q.as_ref().map(f);
    row(
        "pause, hypervisor's measure, p50 (ms)",
        pct(&b_pause, 50),
        qv(&|q| pct(&q.0, 50)),
    );
    row(
        "pause, hypervisor's measure, p99 (ms)",
        pct(&b_pause, 99),
        qv(&|q| pct(&q.0, 99)),
    );
    row(
        "longest uptime step across an update, p50 (ms)",
        pct(&b_gap, 50),
        qv(&|q| pct(&q.1, 50)),
    );
    row(
        "longest uptime step across an update, p99 (ms)",
        pct(&b_gap, 99),
        qv(&|q| pct(&q.1, 99)),
    );
    row(
        "median uptime step between lines, whole run (ms)",
        b_step,
        qv(&|q| q.2),
    );
    if q.is_none() {
        println!("\nQEMU not measured: qemu-system-x86_64 absent or its migration failed.");
    }
    println!();
}
