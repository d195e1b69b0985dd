//! Real KVM boots of the test guest: one and two vCPUs, a script run inside the guest, and
//! a disk served over vhost-user by qemu-storage-daemon (an independent backend).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn boots_one_vcpu_and_runs_a_script() {
    let Some(_) = guest_or_skip("boots_one_vcpu_and_runs_a_script") else {
        return;
    };
    // Builtins and noexec applets only: every exec costs seconds on this machine's KVM.
    let script = "n=0; while read -r l; do case \"$l\" in processor*) n=$((n+1));; esac; done </proc/cpuinfo; echo cpus=$n\n\
                  for d in /sys/bus/virtio/devices/*; do read -r id <$d/device; echo devid:$id; done\n\
                  read -r r </sys/class/misc/hw_random/rng_current; echo rngdev:$r\n\
                  echo marker-$((6*7))\n";
    let (code, out, err) = run_guest(
        &["--vcpus", "1", "--memory-mib", "128"],
        Some(script),
        BOOT_TIMEOUT,
    );
    assert!(
        out.contains("BULKHEAD-GUEST-READY"),
        "no ready marker.\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(out.contains("marker-42"), "script did not run:\n{out}");
    assert!(out.contains("cpus=1"), "{out}");
    // virtio-rng (device id 4) is present and hands out non-zero bytes.
    assert!(out.contains("devid:0x0004"), "{out}");
    // The guest's hw_random core picked the virtio-rng device.
    assert!(out.contains("rngdev:virtio_rng"), "{out}");
    assert!(out.contains("BULKHEAD-RUN-EXIT=0"), "{out}");
    assert_eq!(code, Some(0), "guest did not power off cleanly:\n{err}");
}

/// A vCPU that cannot be pinned where it was told (a CPU this host does not have) stops the VM
/// at once with a VMM error: it never runs the guest on its parent's CPUs instead.
#[test]
fn a_vcpu_that_cannot_be_pinned_stops_the_vm() {
    let Some(_) = guest_or_skip("a_vcpu_that_cannot_be_pinned_stops_the_vm") else {
        return;
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // CPU 1023 fits a cpu_set_t but is offline here (EINVAL); 4096 does not fit at all.
    for bad in ["1023", "4096"] {
        assert!(
            cpus < 1023,
            "this test needs a host with fewer than 1023 CPUs"
        );
        let started = std::time::Instant::now();
        let (code, out, err) = run_guest(
            &["--vcpus", "1", "--memory-mib", "64", "--pin", bad],
            Some("echo should-not-run\n"),
            Duration::from_secs(120),
        );
        assert_eq!(code, Some(3), "pin {bad}: stdout:\n{out}\nstderr:\n{err}");
        assert!(err.contains("VmmError"), "pin {bad}: {err}");
        assert!(
            err.contains("cannot pin the vCPU thread"),
            "pin {bad}: {err}"
        );
        assert!(
            !out.contains("BULKHEAD-GUEST-READY"),
            "pin {bad}: the guest ran:\n{out}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{:?}",
            started.elapsed()
        );
    }
}

/// Two vCPUs: the VMM creates both vCPU threads and pins them, the MP table describes both CPUs,
/// the second CPU comes up through the in-kernel LAPIC (INIT/SIPI), and user space sees two.
#[test]
fn two_vcpus_are_set_up_pinned_and_started() {
    use bulkhead_hypervisor_client::{Command, Hypervisor, Reply, VmSpec, VmState};
    let Some((kernel, initrd)) = guest_or_skip("two_vcpus_are_set_up_pinned_and_started") else {
        return;
    };
    let _serial = BOOT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let pin = vec![0, (cpus > 1) as usize];
    let spec = VmSpec {
        binary: hypervisor(),
        kernel,
        initrd: Some(initrd),
        // Not `quiet`: the SMP bring-up messages are what this test reads.
        cmdline: format!(
            "{} {}",
            GUEST_ARGS.replace(" quiet", ""),
            run_arg("n=0; while read -r l; do case \"$l\" in processor*) n=$((n+1));; esac; done </proc/cpuinfo; echo cpus=$n\n\
                     m=0; for q in /sys/block/vda/mq/*; do m=$((m+1)); done; echo mq=$m\n")
        ),
        memory_mib: 128,
        vcpus: 2,
        pin: pin.clone(),
        run_as: None,
    };
    let mut hv = Hypervisor::spawn(&spec).expect("spawn");
    let pid = hv.pid();
    // A disk whose backend serves two queues: with two vCPUs the guest gets one queue each.
    let disk = QsdDisk::new("two_vcpus (multi-queue disk)", 4, 2);
    if let Some(d) = &disk {
        let stream = d.connect();
        let id = bulkhead_channel::DeviceId::new("mq").expect("id");
        hv.call(
            Command::AttachBlock {
                id,
                read_only: false,
            },
            Some(std::os::fd::AsRawFd::as_raw_fd(&stream)),
        )
        .expect("attach a two-queue disk");
    }
    assert_eq!(
        hv.call(Command::Start, None).expect("start"),
        Reply::Done {
            state: VmState::Running
        }
    );
    // Two vCPU threads, each pinned where asked.
    // Threads name themselves when they start running: poll briefly.
    let vcpu_tasks = || -> Vec<(String, String)> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("tasks")
            .filter_map(|e| {
                let p = e.ok()?.path();
                let comm = std::fs::read_to_string(p.join("comm"))
                    .ok()?
                    .trim()
                    .to_string();
                let status = std::fs::read_to_string(p.join("status")).ok()?;
                let allowed = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
                    .trim()
                    .to_string();
                Some((comm, allowed))
            })
            .filter(|(c, _)| c.starts_with("vcpu"))
            .collect()
    };
    // A vCPU thread pins itself as its first act, before its filter and its first KVM_RUN; a
    // read just after the thread appears can see it unpinned, so wait for both to settle.
    let pinned = |t: &[(String, String)]| {
        t.len() == 2
            && t.iter().all(|(comm, allowed)| {
                comm.trim_start_matches("vcpu")
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| pin.get(i))
                    .is_some_and(|c| allowed == &c.to_string())
            })
    };
    let mut tasks = vcpu_tasks();
    for _ in 0..100 {
        if pinned(&tasks) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        tasks = vcpu_tasks();
    }
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    for (comm, allowed) in &tasks {
        let i: usize = comm.trim_start_matches("vcpu").parse().expect("vcpu index");
        assert_eq!(allowed, &pin[i].to_string(), "{comm} not pinned: {tasks:?}");
    }
    let mut cursor = 0;
    let mut text = String::new();
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    while std::time::Instant::now() < deadline {
        if let Ok(Reply::Console { data, next, .. }) =
            hv.call(Command::ReadConsole { cursor, max: 16384 }, None)
        {
            cursor = next;
            text.push_str(&String::from_utf8_lossy(&data));
        }
        if text.contains("BULKHEAD-RUN-EXIT=") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = hv.shutdown();
    assert!(
        text.contains("Allowing 2 CPUs"),
        "MP table did not describe two CPUs:\n{text}"
    );
    assert!(
        text.contains("Brought up 1 node, 2 CPUs"),
        "the second vCPU never started:\n{text}"
    );
    assert!(
        text.contains("cpus=2"),
        "user space does not see two CPUs:\n{text}"
    );
    if disk.is_some() {
        assert!(
            text.contains("mq=2"),
            "the disk does not have one queue per vCPU:\n{text}"
        );
    }
    assert!(text.contains("BULKHEAD-RUN-EXIT=0"), "{text}");
}

#[test]
fn disk_over_vhost_user_from_qemu_storage_daemon() {
    let Some(_) = guest_or_skip("disk_over_vhost_user_from_qemu_storage_daemon") else {
        return;
    };
    let Some(disk) = QsdDisk::new("disk_over_vhost_user_from_qemu_storage_daemon", 8, 1) else {
        return;
    };
    let script = "read -r n </sys/block/vda/size; echo sectors:$n\n\
                  echo BULKHEAD-DISK-MARKER-7f3a >/m\n\
                  dd if=/m of=/dev/vda bs=512 seek=100 count=1 conv=sync,fsync 2>/dev/null\n\
                  dd if=/dev/vda of=/r bs=512 skip=100 count=1 2>/dev/null\n\
                  read -r l </r; echo readback:$l\n";
    let (code, out, err) = run_guest(
        &[
            "--vcpus",
            "1",
            "--memory-mib",
            "128",
            "--block",
            disk.sock.to_str().expect("path"),
        ],
        Some(script),
        BOOT_TIMEOUT,
    );
    assert!(
        out.contains("sectors:16384"),
        "guest did not see an 8 MiB disk:\n{out}\n{err}"
    );
    assert!(out.contains("readback:BULKHEAD-DISK-MARKER-7f3a"), "{out}");
    assert_eq!(code, Some(0), "{err}");
    let data = std::fs::read(&disk.img).expect("read image");
    let at = &data[100 * 512..100 * 512 + 26];
    assert_eq!(
        at, b"BULKHEAD-DISK-MARKER-7f3a\n",
        "data written in the guest is not in the backing file"
    );
}

#[test]
fn bad_inputs_get_clear_errors() {
    let hv = hypervisor();
    let dir = tempfile::tempdir().expect("tempdir");
    let not_kernel = dir.path().join("not-a-kernel");
    std::fs::write(&not_kernel, b"this is not a kernel").expect("write");
    let run = |args: &[&str]| {
        let out = Command::new(&hv)
            .arg("run")
            .args(args)
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--kernel", not_kernel.to_str().expect("p")]);
    if std::fs::metadata("/dev/kvm").is_ok() {
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("not a bootable kernel"), "{err}");
        let (code, err) = run(&[
            "--kernel",
            not_kernel.to_str().expect("p"),
            "--memory-mib",
            "4",
        ]);
        assert_eq!(code, Some(2));
        assert!(err.contains("memory size 4 MiB"), "{err}");
        let (code, err) = run(&["--kernel", "/nonexistent/vmlinux"]);
        assert_eq!(code, Some(2));
        assert!(err.contains("cannot read kernel"), "{err}");
        let (code, err) = run(&["--kernel", not_kernel.to_str().expect("p"), "--vcpus", "0"]);
        assert_eq!(code, Some(2));
        assert!(err.contains("vCPU count 0"), "{err}");
    } else {
        assert!(err.contains("/dev/kvm"), "{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}
