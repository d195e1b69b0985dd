//! Hot-plug latency, Bulkhead vs QEMU, in one run (`make bench`; `cargo bench -p
//! bulkhead-hypervisor --bench hotplug`). Prints a markdown section on stdout.
//!
//! Both hypervisors boot the same kernel and initramfs (128 MiB, 1 vCPU, `-accel kvm` for QEMU)
//! with the same guest script: wait for a `vd*` block device, print `HP-UP`, wait for it to go,
//! print `HP-GONE`, again. Both plug the same kind of disk: a qemu-storage-daemon
//! vhost-user-blk export. Each cycle measures, from the host's command, the time until the
//! guest's console says the disk is there, and then gone:
//!
//! * Bulkhead: `AttachBlock` / `DetachBlock` on the private channel (PCIe native hot-plug into a
//!   root port, `pciehp` in the guest);
//! * QEMU: `q35` with one `pcie-root-port` (native hot-plug; ACPI hot-plug off, since the guest
//!   has no ACPI), QMP `device_add vhost-user-blk-pci` / `device_del`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_channel::{Command as Cmd, DeviceId, Reply};
use bulkhead_hypervisor_client::{Hypervisor, VmSpec};
use common::*;

const CYCLES: usize = 5;
const TIMEOUT: Duration = Duration::from_secs(300);

fn script() -> String {
    "while :;do d=;for x in /sys/block/vd*;do [ -e $x ]&&d=$x;done;\
     [ -n \"$d\" ]&&{ echo HP-UP;while [ -e $d ];do :;done;echo HP-GONE;};done\n"
        .to_string()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Console text so far, and how many times `needle` occurs after BULKHEAD-GUEST-READY (the
/// kernel may echo the command line, which holds the script).
fn count_after_ready(console: &str, needle: &str) -> usize {
    console
        .split_once("BULKHEAD-GUEST-READY")
        .map_or(0, |(_, after)| after.matches(needle).count())
}

struct BulkheadVm {
    hv: Hypervisor,
    seen: String,
    cursor: u64,
}

impl BulkheadVm {
    fn poll(&mut self) {
        match self.hv.call(
            Cmd::ReadConsole {
                cursor: self.cursor,
                max: 16384,
            },
            None,
        ) {
            Ok(Reply::Console { data, next, .. }) => {
                self.seen.push_str(&String::from_utf8_lossy(&data));
                self.cursor = next;
            }
            other => panic!("read console: {other:?}"),
        }
    }

    fn wait_count(&mut self, needle: &str, n: usize) {
        let deadline = Instant::now() + TIMEOUT;
        while count_after_ready(&self.seen, needle) < n {
            assert!(Instant::now() < deadline, "Bulkhead: no {needle} #{n}");
            std::thread::sleep(Duration::from_millis(5));
            self.poll();
        }
    }
}

fn bulkhead(kernel: &Path, initrd: &Path) -> (Vec<f64>, Vec<f64>) {
    let disks = [
        QsdDisk::new("bench hotplug", 8, 1).expect("qsd"),
        QsdDisk::new("bench hotplug", 8, 1).expect("qsd"),
    ];
    let spec = VmSpec {
        binary: hypervisor(),
        kernel: kernel.to_path_buf(),
        initrd: Some(initrd.to_path_buf()),
        cmdline: format!("{GUEST_ARGS} {}", run_arg(&script())),
        memory_mib: 128,
        vcpus: 1,
        pin: vec![],
        run_as: None,
    };
    let mut vm = BulkheadVm {
        hv: Hypervisor::spawn(&spec).expect("spawn"),
        seen: String::new(),
        cursor: 0,
    };
    vm.hv.call(Cmd::Start, None).expect("start");
    let deadline = Instant::now() + TIMEOUT;
    while !vm.seen.contains("BULKHEAD-GUEST-READY") {
        assert!(Instant::now() < deadline, "Bulkhead guest did not boot");
        std::thread::sleep(Duration::from_millis(100));
        vm.poll();
    }
    let (mut up, mut gone) = (Vec::new(), Vec::new());
    for i in 0..CYCLES {
        let disk = disks.get(i % 2).expect("disk");
        let id = DeviceId::new(&format!("bench-{i}")).expect("id");
        let stream = disk.connect();
        let t0 = Instant::now();
        vm.hv
            .call(
                Cmd::AttachBlock {
                    id: id.clone(),
                    read_only: false,
                },
                Some(stream.as_raw_fd()),
            )
            .expect("attach");
        drop(stream);
        vm.wait_count("HP-UP", i + 1);
        up.push(t0.elapsed().as_secs_f64() * 1e3);
        let t1 = Instant::now();
        vm.hv.call(Cmd::DetachBlock { id }, None).expect("detach");
        vm.wait_count("HP-GONE", i + 1);
        gone.push(t1.elapsed().as_secs_f64() * 1e3);
    }
    let _ = vm.hv.shutdown();
    (up, gone)
}

struct Qemu {
    child: Child,
    console: std::path::PathBuf,
    qmp: BufReader<UnixStream>,
    _dir: tempfile::TempDir,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    fn wait_count(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + TIMEOUT;
        while count_after_ready(&self.console(), needle) < n {
            assert!(Instant::now() < deadline, "QEMU: no {needle} #{n}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends one QMP command; returns its answer (events before it are returned in `events`).
    fn qmp(&mut self, cmd: serde_json::Value, events: &mut Vec<String>) -> serde_json::Value {
        let s = self.qmp.get_mut();
        s.write_all(format!("{cmd}\n").as_bytes())
            .expect("qmp write");
        loop {
            let mut line = String::new();
            self.qmp.read_line(&mut line).expect("qmp read");
            let v: serde_json::Value = serde_json::from_str(&line).expect("qmp json");
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
            if let Some(e) = v["event"].as_str() {
                events.push(format!(
                    "{e}:{}",
                    v["data"]["device"].as_str().unwrap_or("")
                ));
            }
        }
    }

    /// Waits for `name` (`EVENT:device`).
    fn wait_event(&mut self, name: &str, events: &mut Vec<String>) {
        while !events.iter().any(|e| e == name) {
            let mut line = String::new();
            self.qmp.read_line(&mut line).expect("qmp read");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(e) = v["event"].as_str() {
                events.push(format!(
                    "{e}:{}",
                    v["data"]["device"].as_str().unwrap_or("")
                ));
            }
        }
        events.retain(|e| e != name);
    }
}

fn qemu(kernel: &Path, initrd: &Path) -> (Vec<f64>, Vec<f64>) {
    let disk = QsdDisk::new("bench hotplug qemu", 8, 1).expect("qsd");
    let dir = tempfile::tempdir().expect("tempdir");
    let console = dir.path().join("console.log");
    let qmp_path = dir.path().join("qmp.sock");
    let child = Command::new("qemu-system-x86_64")
        .args(["-M", "q35", "-accel", "kvm", "-m", "128", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .args([
            "-global",
            "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
        ])
        .args(["-object", "memory-backend-memfd,id=mem,size=128M,share=on"])
        .args(["-machine", "memory-backend=mem"])
        .args(["-device", "pcie-root-port,id=rp1,chassis=1,slot=1"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        // Without ACPI the guest must be told the ports are its own to drive.
        .arg(format!(
            "{GUEST_ARGS} pcie_ports=native {}",
            run_arg(&script())
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        if let Ok(s) = UnixStream::connect(&qmp_path) {
            break s;
        }
        assert!(Instant::now() < deadline, "no QMP socket");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut q = Qemu {
        child,
        console,
        qmp: BufReader::new(s),
        _dir: dir,
    };
    let mut greeting = String::new();
    q.qmp.read_line(&mut greeting).expect("qmp greeting");
    let mut ev = Vec::new();
    q.qmp(serde_json::json!({"execute": "qmp_capabilities"}), &mut ev);
    let deadline = Instant::now() + TIMEOUT;
    while !q.console().contains("BULKHEAD-GUEST-READY") {
        assert!(Instant::now() < deadline, "QEMU guest did not boot");
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = q.qmp(
        serde_json::json!({"execute": "chardev-add", "arguments": {"id": "vub", "backend": {
            "type": "socket", "data": {"addr": {"type": "unix", "data": {
                "path": disk.sock.display().to_string()}}, "server": false}}}}),
        &mut ev,
    );
    assert!(r.get("return").is_some(), "{r}");
    let (mut up, mut gone) = (Vec::new(), Vec::new());
    for i in 0..CYCLES {
        let t0 = Instant::now();
        let r = q.qmp(
            serde_json::json!({"execute": "device_add", "arguments": {
                "driver": "vhost-user-blk-pci", "chardev": "vub", "id": "disk", "bus": "rp1",
                "num-queues": 1}}),
            &mut ev,
        );
        assert!(r.get("return").is_some(), "{r}");
        q.wait_count("HP-UP", i + 1);
        up.push(t0.elapsed().as_secs_f64() * 1e3);
        let t1 = Instant::now();
        let r = q.qmp(
            serde_json::json!({"execute": "device_del", "arguments": {"id": "disk"}}),
            &mut ev,
        );
        assert!(r.get("return").is_some(), "{r}");
        q.wait_count("HP-GONE", i + 1);
        gone.push(t1.elapsed().as_secs_f64() * 1e3);
        // The id is free for the next device_add once QEMU has finalised the removal.
        q.wait_event("DEVICE_DELETED:disk", &mut ev);
    }
    (up, gone)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    println!("## Hot-plug: Bulkhead vs QEMU q35\n");
    let Some((kernel, initrd)) = guest_or_skip("hotplug bench") else {
        println!("Not measured: no /dev/kvm or no test guest (make guest).\n");
        return;
    };
    if which("qemu-system-x86_64").is_none() || which("qemu-storage-daemon").is_none() {
        println!("Not measured: qemu-system-x86_64 or qemu-storage-daemon absent.\n");
        return;
    }
    let (b_up, b_gone) = bulkhead(&kernel, &initrd);
    let (q_up, q_gone) = qemu(&kernel, &initrd);
    println!(
        "Command: `cargo bench -p bulkhead-hypervisor --bench hotplug` (in `make bench`). Same \
         kernel, initramfs, 128 MiB, 1 vCPU; the disk is a qemu-storage-daemon vhost-user-blk \
         export for both; {CYCLES} plug/unplug cycles in one boot each, medians. From the host's \
         command to the guest's console saying the disk appeared (`AttachBlock` on the channel vs \
         QMP `device_add` into a `pcie-root-port`), and disappeared (`DetachBlock` vs \
         `device_del`). QEMU's root port has an attention button, so its unplug includes \
         `pciehp`'s 5 s button-press grace period; Bulkhead's slot is surprise-removal capable \
         and has none.\n"
    );
    println!("| metric | Bulkhead | QEMU q35 | ratio (Bulkhead/QEMU) |");
    println!("|---|---:|---:|---:|");
    for (name, b, q) in [
        (
            "hot-plug → disk visible in the guest (ms)",
            median(b_up),
            median(q_up),
        ),
        (
            "hot-unplug → disk gone in the guest (ms)",
            median(b_gone),
            median(q_gone),
        ),
    ] {
        println!("| {name} | {b:.0} | {q:.0} | {:.2}× |", b / q);
    }
    println!();
}
