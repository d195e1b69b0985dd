//! PCIe native hot-plug of a vhost-user disk into a running guest, and its removal, driven over
//! the private channel the way the controller drives it. The backend is qemu-storage-daemon;
//! the guest's stock `pciehp` and `virtio_pci` drivers must see the disk appear, use it, and see
//! it disappear.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use bulkhead_channel::{Command, CommandError, DeviceId, OpStatus, Reply, VmState};
use bulkhead_hypervisor_client::{ClientError, Hypervisor, VmSpec};
use common::*;

const STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// Reads the console until `needle` appears after BULKHEAD-GUEST-READY (or the timeout).
fn wait_console(hv: &mut Hypervisor, seen: &mut String, cursor: &mut u64, needle: &str) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    // Only what the guest printed after init started counts: the kernel echoes its command
    // line (which holds the script) when not `quiet`.
    let after_ready = |s: &str| {
        s.split_once("BULKHEAD-GUEST-READY")
            .is_some_and(|(_, after)| after.contains(needle))
    };
    while !after_ready(seen) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {needle:?}; console so far:\n{seen}"
        );
        match hv.call(
            Command::ReadConsole {
                cursor: *cursor,
                max: 16384,
            },
            None,
        ) {
            Ok(Reply::Console { data, next, .. }) => {
                seen.push_str(&String::from_utf8_lossy(&data));
                *cursor = next;
            }
            other => panic!("read console: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Hot-unplugs `id` and checks the running guest's driver let the device go.
fn assert_detached_by_guest(hv: &mut Hypervisor, id: &DeviceId, what: &str) {
    let r = hv
        .call(Command::DetachBlock { id: id.clone() }, None)
        .expect("detach");
    assert_eq!(
        r,
        Reply::Device {
            state: VmState::Running,
            guest_acknowledged: true
        },
        "{what}"
    );
}

fn attach(hv: &mut Hypervisor, disk: &QsdDisk, id: &DeviceId) -> Reply {
    let stream = disk.connect();
    let r = hv.call(
        Command::AttachBlock {
            id: id.clone(),
            read_only: false,
        },
        Some(stream.as_raw_fd()),
    );
    drop(stream);
    r.expect("attach")
}

fn block_devices(hv: &mut Hypervisor) -> u32 {
    match hv.call(Command::Stats, None).expect("stats") {
        Reply::Stats { stats, .. } => stats.block_devices,
        other => panic!("{other:?}"),
    }
}

/// The guest still runs, every disk is gone from the VM, and it shuts down cleanly.
fn assert_running_without_disks_then_shut_down(mut hv: Hypervisor) {
    match hv.call(Command::Stats, None).expect("stats") {
        Reply::Stats { stats, state } => {
            assert_eq!(state, VmState::Running);
            assert_eq!(stats.block_devices, 0);
        }
        other => panic!("{other:?}"),
    }
    hv.shutdown().expect("shutdown");
}

#[test]
fn hotplug_and_unplug_a_disk_in_a_running_guest() {
    let Some((kernel, initrd)) = guest_or_skip("hotplug_and_unplug_a_disk_in_a_running_guest")
    else {
        return;
    };
    let Some(disk) = QsdDisk::new("hotplug_and_unplug_a_disk", 8, 1) else {
        return;
    };
    // The guest waits for a disk, writes a marker and waits for it to go. Shell builtins only:
    // every exec costs seconds here.
    let script = "echo hp-waiting\n\
        while [ ! -e /sys/block/vda ]; do :; done\n\
        read -r n </sys/block/vda/size; echo hp-sectors:$n\n\
        echo BULKHEAD-HOTPLUG-MARKER-51c2 >/m\n\
        dd if=/m of=/dev/vda bs=512 seek=8 count=1 conv=sync,fsync 2>/dev/null\n\
        echo hp-written\n\
        while [ -e /sys/block/vda ]; do :; done\n\
        echo hp-gone\n\
        while :; do read -r x </proc/uptime; done\n";
    let spec = VmSpec {
        binary: hypervisor(),
        kernel,
        initrd: Some(initrd),
        // Not `quiet`: pciehp's slot messages show what the guest saw when a step fails.
        cmdline: format!("{} {}", GUEST_ARGS.replace(" quiet", ""), run_arg(script)),
        memory_mib: 128,
        vcpus: 1,
        pin: vec![],
        run_as: None,
    };
    let mut hv = Hypervisor::spawn(&spec).expect("spawn");
    let (mut seen, mut cursor) = (String::new(), 0u64);
    hv.call(Command::Start, None).expect("start");
    wait_console(&mut hv, &mut seen, &mut cursor, "hp-waiting");
    assert_eq!(block_devices(&mut hv), 0);

    // Hot-plug: the guest's driver binds before the hypervisor answers.
    let id = DeviceId::new("vol-hot").expect("id");
    let r = attach(&mut hv, &disk, &id);
    assert_eq!(
        r,
        Reply::Device {
            state: VmState::Running,
            guest_acknowledged: true
        },
        "console:\n{seen}"
    );
    assert_eq!(block_devices(&mut hv), 1);
    wait_console(&mut hv, &mut seen, &mut cursor, "hp-written");
    assert!(seen.contains("hp-sectors:16384"), "{seen}");
    let data = std::fs::read(&disk.img).expect("read image");
    assert_eq!(
        &data[8 * 512..8 * 512 + 29],
        b"BULKHEAD-HOTPLUG-MARKER-51c2\n",
        "data written to the hot-plugged disk is not in the backing file"
    );

    // Hot-unplug, driven the asynchronous way: the hypervisor accepts the detach at once and
    // keeps serving the channel while the guest's driver lets the card go. Pausing the guest
    // right after the detach was accepted holds the operation pending for as long as we like
    // (a paused guest cannot release the card), so what follows does not race the guest.
    let chan = hv.channel();
    let op = chan
        .submit(Command::DetachBlock { id: id.clone() }, None)
        .expect("detach accepted");
    chan.call(Command::Pause, None)
        .expect("pause during the detach");
    let waiting_since = Instant::now();
    let mut answered = 0u32;
    while waiting_since.elapsed() < Duration::from_secs(2) {
        let asked = Instant::now();
        match chan
            .call(Command::Stats, None)
            .expect("stats during the detach")
        {
            Reply::Stats { state, stats } => {
                assert_eq!(state, VmState::Paused);
                assert_eq!(stats.block_devices, 1, "the pulled card is still held");
            }
            other => panic!("{other:?}"),
        }
        match chan
            .call(Command::ReadConsole { cursor: 0, max: 64 }, None)
            .expect("console during the detach")
        {
            Reply::Console { data, .. } => assert!(!data.is_empty()),
            other => panic!("{other:?}"),
        }
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "Stats and ReadConsole took {:?} while a detach waited",
            asked.elapsed()
        );
        assert_eq!(
            chan.op_status(op).expect("op status"),
            OpStatus::Pending,
            "the detach must still wait for the (paused) guest"
        );
        answered += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(answered >= 5, "only {answered} rounds answered in 2 s");
    // While the detach is in flight: the same device is busy, an unknown operation is refused,
    // and a reused request id is refused, each with its own typed error.
    assert!(matches!(
        chan.exchange(Command::DetachBlock { id: id.clone() }, None),
        Err(ClientError::Refused(CommandError::DeviceBusy))
    ));
    assert!(matches!(
        chan.op_status(op + 1_000_000),
        Err(ClientError::Refused(CommandError::NoSuchOp))
    ));
    // Resumed, the guest releases the card and the operation completes, once.
    chan.call(Command::Resume, None).expect("resume");
    assert_eq!(
        chan.wait_op(op).expect("detach completes"),
        Reply::Device {
            state: VmState::Running,
            guest_acknowledged: true
        },
        "console:\n{seen}"
    );
    assert!(matches!(
        chan.op_status(op),
        Err(ClientError::Refused(CommandError::NoSuchOp))
    ));
    wait_console(&mut hv, &mut seen, &mut cursor, "hp-gone");
    assert_eq!(block_devices(&mut hv), 0);
    assert!(matches!(
        hv.call(Command::DetachBlock { id: id.clone() }, None),
        Err(ClientError::Refused(CommandError::NoSuchDevice))
    ));

    // Shutdown is served while a hot-plug waits: plug the disk again, start unplugging it, and
    // end the VM while the (paused) guest still holds the card.
    assert_eq!(
        attach(&mut hv, &disk, &id),
        Reply::Device {
            state: VmState::Running,
            guest_acknowledged: true
        }
    );
    let op = hv
        .channel()
        .submit(Command::DetachBlock { id: id.clone() }, None)
        .expect("detach accepted");
    hv.call(Command::Pause, None)
        .expect("pause during the detach");
    assert_eq!(
        hv.channel().op_status(op).expect("op status"),
        OpStatus::Pending
    );
    let asked = Instant::now();
    hv.shutdown().expect("shutdown while a detach waits");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        asked.elapsed()
    );
}

/// Plugs a disk into a running guest, has the guest write to it, unplugs it, and does it again
/// `PLUGS` times in one boot, alternating between two backends; with 4 slots taken in turn the
/// last plug reuses the first slot. Regression test for a re-plugged card that the guest never
/// enumerated: the driver of the card pulled before it was still in `vp_reset()` polling the
/// device status, which read all ones once the hypervisor had taken the card out, so the
/// guest's teardown never finished and held the PCI rescan/remove lock that the next slot's
/// `pciehp_configure_device()` waits for.
#[test]
fn replug_disks_into_a_running_guest() {
    const PLUGS: u32 = 5;
    let Some((kernel, initrd)) = guest_or_skip("replug_disks_into_a_running_guest") else {
        return;
    };
    let (Some(disk_a), Some(disk_b)) = (
        QsdDisk::new("replug_disks_a", 8, 1),
        QsdDisk::new("replug_disks_b", 8, 1),
    ) else {
        return;
    };
    // For each plug: wait (bounded) for a virtio disk, write marker $i at sector 8+$i, wait for
    // it to go. If no disk shows up, print what the guest sees (PCI functions, interrupts, and
    // blocked tasks through sysrq-w) before failing. Shell builtins only, compact: the command
    // line holds 2048 bytes.
    let script = format!(
        "vd(){{ d=;for x in /sys/block/vd*;do [ -e \"$x\" ]&&d=${{x##*/}};done;}}\n\
        up(){{ read -r u x </proc/uptime;u=${{u%.*}};}}\n\
        diag(){{ for f in /sys/bus/pci/devices/*;do read -r v <$f/vendor;echo pci:${{f##*/}}:$v;done\n\
        while read -r l;do echo irq:$l;done </proc/interrupts\n\
        echo w >/proc/sysrq-trigger;echo hp-diag-end;}}\n\
        i=1;while [ $i -le {PLUGS} ];do\n\
        echo hp-waiting:$i.;up;t=$((u+150));vd\n\
        while [ -z $d ];do up;[ $u -ge $t ]&&{{ echo hp-timeout:$i.;diag;exit 1;}};vd;done\n\
        read -r n </sys/block/$d/size;echo hp-disk:$i:$d:$n.\n\
        echo BULKHEAD-REPLUG-MARKER-$i >/m\n\
        dd if=/m of=/dev/$d bs=512 seek=$((8+i)) count=1 conv=sync,fsync 2>/dev/null\n\
        echo hp-written:$i.\n\
        while [ -e /sys/block/$d ];do :;done\n\
        echo hp-gone:$i.;i=$((i+1));done\n\
        while :;do read -r x </proc/uptime;done\n"
    );
    let cmdline = format!("{} {}", GUEST_ARGS.replace(" quiet", ""), run_arg(&script));
    assert!(
        cmdline.len() < 2048,
        "command line too long: {}",
        cmdline.len()
    );
    let spec = VmSpec {
        binary: hypervisor(),
        kernel,
        initrd: Some(initrd),
        cmdline,
        memory_mib: 128,
        vcpus: 1,
        pin: vec![],
        run_as: None,
    };
    let mut hv = Hypervisor::spawn(&spec).expect("spawn");
    let (mut seen, mut cursor) = (String::new(), 0u64);
    hv.call(Command::Start, None).expect("start");
    for i in 1..=PLUGS {
        wait_console(&mut hv, &mut seen, &mut cursor, &format!("hp-waiting:{i}."));
        let started = Instant::now();
        let disk = if i % 2 == 1 { &disk_a } else { &disk_b };
        let id = DeviceId::new(&format!("vol-replug-{i}")).expect("id");
        let r = attach(&mut hv, disk, &id);
        if r != (Reply::Device {
            state: VmState::Running,
            guest_acknowledged: true,
        }) {
            // Let the guest give up and print what it sees (sysrq-w output comes before the
            // end marker).
            wait_console(&mut hv, &mut seen, &mut cursor, "hp-diag-end");
            panic!("plug {i}: the guest did not bind the card ({r:?}); console:\n{seen}");
        }
        assert_eq!(block_devices(&mut hv), 1);
        wait_console(&mut hv, &mut seen, &mut cursor, &format!("hp-written:{i}."));
        let line = seen
            .split_once(&format!("hp-disk:{i}:"))
            .and_then(|(_, rest)| rest.lines().next())
            .unwrap_or_default();
        assert!(line.ends_with(":16384."), "plug {i}: {line:?}\n{seen}");
        let data = std::fs::read(&disk.img).expect("read image");
        let at = usize::try_from(8 + i).expect("sector") * 512;
        let marker = format!("BULKHEAD-REPLUG-MARKER-{i}\n");
        assert_eq!(
            &data[at..at + marker.len()],
            marker.as_bytes(),
            "plug {i}: the marker is not in the backing file"
        );
        assert_detached_by_guest(&mut hv, &id, &format!("unplug {i}"));
        wait_console(&mut hv, &mut seen, &mut cursor, &format!("hp-gone:{i}."));
        assert_eq!(block_devices(&mut hv), 0);
        eprintln!("plug/unplug {i} took {:?}", started.elapsed());
    }
    assert_running_without_disks_then_shut_down(hv);
}
