//! Live update: the running VM moves to a new `bulkhead-hypervisor` process on the same host.
//!
//! KVM ties a VM file descriptor to the process that created it, so the new process builds
//! its own VM around the *same* guest memory (the memfd, passed over SCM_RIGHTS, never copied)
//! and the old one hands it the machine state ([`state::MachineState`]), as QEMU's CPR does.
//! The protocol and its failure rules are in [`wire`]; reading and setting the state in
//! [`machine`]. The new process builds its VM, memory slots and vCPUs *before* the old one
//! pauses the guest, so the pause is only: stop the vCPUs, read the state, send it, parse and
//! set it, start the vCPUs.
//!
//! What is handed over: vCPU registers, special registers, xsave, XCRs, debug registers,
//! every MSR KVM lists, LAPIC, pending events and MP state; kvm-clock, PIT, both PICs and the
//! IOAPIC; the UART and the console ring; PCI configuration space of the host bridge and the
//! root ports (hot-plug slot state included); the virtio-mmio devices' registers and queue
//! positions; the MSI routes; and every vhost-user card (block or net) in a hot-plug slot.
//!
//! A card is handed over so that it notices nothing: guest memory is the same memfd, so its
//! mappings stay valid, and its vhost-user connection and each queue's kick and call eventfd
//! go to the new process over SCM_RIGHTS (`CardFds`, after the state). The new process
//! registers the same eventfds as ioeventfds and irqfds in its own VM and sends the card
//! nothing: no SET_OWNER, no RESET, no SET_VRING_*, and no SET_MEM_TABLE either — the card
//! maps the memfd itself, and the addresses the vrings were given are in the table it already
//! has (the old process's user addresses are only a translation key inside the card). The
//! vhost crate's own bookkeeping of the connection (which features were offered and sent) is
//! brought up to date — GET_FEATURES, and SET_FEATURES of the card's unchanged features — only
//! at the next request sequence the guest causes (a reset, an unplug; see
//! `devices::vhost_user`). A card that cannot be handed over now (being pulled, its backend
//! dead or its rings being stopped) makes the update fail with
//! [`LiveUpdateFailure::UnsupportedDevice`]; the guest runs on here.

pub mod machine;
pub mod state;
pub mod wire;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bulkhead_channel::{LiveUpdateFailure, StateRefusal, VmState};

use crate::vm::{Vm, VmConfig};
use crate::Error;
use machine::CaptureError;
use state::MachineState;
use wire::{Hello, Msg, WireError, HANDOVER_VERSION};

/// How long the old process waits for the new one to build its VM (memory slots take ~60 ms
/// at 16 GiB here; a loaded host is slower). The guest runs meanwhile.
pub const READY_WAIT: Duration = Duration::from_secs(10);
/// How long the old process, with the guest paused, waits for the new one to set the state.
pub const RESTORE_WAIT: Duration = Duration::from_secs(3);
/// How long the old process waits for the new one to report its vCPUs started (the guest is
/// the new one's by then: this only bounds the wait for the measurement).
const RUNNING_WAIT: Duration = Duration::from_secs(2);
/// How long the new process waits for the old one's hello, its state and its go.
const HELLO_WAIT: Duration = Duration::from_secs(30);
const STATE_WAIT: Duration = Duration::from_secs(10);
const GO_WAIT: Duration = Duration::from_secs(5);

/// Why the new process gave up a hand-over (the guest stays with the old process).
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("hand-over socket: {0}")]
    Wire(#[from] WireError),
    #[error("the first message was not a hello carrying the guest memory")]
    NoHello,
    #[error("refused the hand-over: {0:?}")]
    Refused(StateRefusal),
    #[error("the old hypervisor did not send its go")]
    NoGo,
}

/// CLOCK_MONOTONIC in nanoseconds (one clock for both processes on one host).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `ts`, a valid timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn failure(e: WireError) -> LiveUpdateFailure {
    match e {
        WireError::Gone => LiveUpdateFailure::PeerGone,
        WireError::Timeout => LiveUpdateFailure::PeerTimeout,
        WireError::Protocol(_) => LiveUpdateFailure::Protocol,
        WireError::Io(_) => LiveUpdateFailure::PeerGone,
    }
}

/// Waits for `want` from the new process; a refusal or anything else is a failure.
fn expect(sock: &UnixStream, want: &Msg, deadline: Instant) -> Result<Msg, LiveUpdateFailure> {
    match wire::recv(sock, deadline).map_err(failure)? {
        (Msg::Refused(r), _) => Err(LiveUpdateFailure::Refused(r)),
        (m, None) if std::mem::discriminant(&m) == std::mem::discriminant(want) => Ok(m),
        _ => Err(LiveUpdateFailure::Protocol),
    }
}

/// The old process's side: hands the VM over on `sock`. `Ok(pause_us)` once the new process
/// runs the guest (this process must then exit without touching it); on `Err` the guest is
/// still this process's, resumed if it was running, and the new process never ran it.
pub fn hand_over(vm: &Vm, sock: &UnixStream) -> Result<u64, LiveUpdateFailure> {
    let config = vm.config();
    let hello = Msg::Hello(Hello {
        version: HANDOVER_VERSION,
        memory_mib: config.memory_mib,
        vcpus: config.vcpus,
        threads_per_core: config.threads_per_core.max(1),
        pin: config
            .pin
            .iter()
            .flatten()
            .filter_map(|c| u32::try_from(*c).ok())
            .collect(),
    });
    wire::send(sock, &hello, Some(vm.memfd())).map_err(failure)?;
    expect(sock, &Msg::Ready, Instant::now() + READY_WAIT)?;

    let running = vm.state() == VmState::Running;
    let paused_at_ns = monotonic_ns();
    // A single vCPU reads its state on the wake-up that parks it. With several, each reads
    // its own only once all are parked (a vCPU still running could otherwise send an IPI to
    // one whose LAPIC was already read, and the interrupt would be lost): `Vm::capture`.
    let at_park = config.vcpus == 1;
    if at_park {
        vm.request_capture();
    }
    if running && vm.pause().is_err() {
        return Err(LiveUpdateFailure::Capture);
    }
    let stopped_ns = monotonic_ns();
    let resume = |why: LiveUpdateFailure| {
        if running {
            let _ = vm.resume();
        }
        tracing::warn!(?why, "live update failed: the guest runs on here");
        why
    };
    let (st, card_fds) = match vm.capture(paused_at_ns, running, at_park) {
        Ok(s) => s,
        Err(CaptureError::Cards) => return Err(resume(LiveUpdateFailure::UnsupportedDevice)),
        Err(CaptureError::Kvm(e)) => {
            tracing::warn!(error = %e, "reading the machine state failed");
            return Err(resume(LiveUpdateFailure::Capture));
        }
    };
    // The cards' interrupt eventfds can drive one VM's irqfd only: let go of them for the new
    // process (bound again, and signalled once, if the hand-over fails).
    if !card_fds.is_empty() {
        if let Err(e) = vm.release_card_calls() {
            tracing::warn!(error = %e, "unbinding the cards' interrupts failed");
            return Err(resume(LiveUpdateFailure::Capture));
        }
    }
    let resume = |why: LiveUpdateFailure| {
        if !card_fds.is_empty() {
            vm.rebind_card_calls();
        }
        resume(why)
    };
    let captured_ns = monotonic_ns();
    let stopped_us = stopped_ns.saturating_sub(paused_at_ns) / 1000;
    wire::send(sock, &Msg::State(st.encode()), None).map_err(|e| resume(failure(e)))?;
    for fds in &card_fds {
        let count = u16::try_from(fds.len()).map_err(|_| resume(LiveUpdateFailure::Protocol))?;
        wire::send_fds(sock, &Msg::CardFds { count }, fds).map_err(|e| resume(failure(e)))?;
    }
    expect(sock, &Msg::Restored, Instant::now() + RESTORE_WAIT).map_err(resume)?;
    // The point of no return: once `Go` is sent the guest is the new process's.
    wire::send(sock, &Msg::Go, None).map_err(|e| resume(failure(e)))?;
    let started = match wire::recv(sock, Instant::now() + RUNNING_WAIT) {
        Ok((Msg::Running { started_at_ns }, _)) => started_at_ns,
        other => {
            tracing::warn!(
                ?other,
                "the new hypervisor did not report its vCPUs started"
            );
            monotonic_ns()
        }
    };
    let pause_us = started.saturating_sub(paused_at_ns) / 1000;
    tracing::info!(
        pause_us,
        stopped_us,
        capture_us = captured_ns.saturating_sub(stopped_ns) / 1000,
        cards = card_fds.len(),
        "live update: the guest runs in the new hypervisor"
    );
    Ok(pause_us)
}

/// The new process's side, up to the guest running in it: receives the memory and the shape,
/// builds the VM, restores the state, starts the vCPUs on the old one's go. `Err` means the
/// guest never ran here (the old process keeps it) and this process should exit.
pub fn incoming(sock: &UnixStream, run_as: Option<(u32, u32)>) -> Result<Vm, Error> {
    let gone = |e: WireError| Error::Incoming(IncomingError::Wire(e));
    let (hello, memfd) = match wire::recv(sock, Instant::now() + HELLO_WAIT).map_err(gone)? {
        (Msg::Hello(h), Some(f)) => (h, f),
        _ => return Err(IncomingError::NoHello.into()),
    };
    let refuse = |why: StateRefusal| {
        let _ = wire::send(sock, &Msg::Refused(why), None);
        Error::Incoming(IncomingError::Refused(why))
    };
    if hello.version != HANDOVER_VERSION {
        return Err(refuse(StateRefusal::UnknownVersion));
    }
    let config = VmConfig {
        kernel: Default::default(),
        initrd: None,
        cmdline: String::new(),
        memory_mib: hello.memory_mib,
        vcpus: hello.vcpus,
        threads_per_core: hello.threads_per_core,
        echo_console: false,
        pin: (!hello.pin.is_empty()).then(|| {
            hello
                .pin
                .iter()
                .filter_map(|c| usize::try_from(*c).ok())
                .collect()
        }),
    };
    let mut vm = Vm::incoming(config, memfd).map_err(|e| {
        tracing::warn!(error = %e, "building the VM around the handed-over memory failed");
        refuse(StateRefusal::Build)
    })?;
    crate::sandbox::harden_process(run_as)?;
    wire::send(sock, &Msg::Ready, None).map_err(gone)?;

    let blob = match wire::recv(sock, Instant::now() + STATE_WAIT).map_err(gone)? {
        (Msg::State(b), None) => b,
        _ => return Err(refuse(StateRefusal::Malformed)),
    };
    let received_ns = monotonic_ns();
    let st = MachineState::parse(&blob).map_err(|e| {
        tracing::warn!(error = %e, "refused the handed-over state");
        refuse(e.refusal())
    })?;
    let mut card_fds = Vec::with_capacity(st.cards.len());
    for card in &st.cards {
        let files = wire::recv_card_fds(sock, Instant::now() + STATE_WAIT).map_err(|e| {
            tracing::warn!(error = %e, device = %card.id, "the card's fds did not arrive");
            refuse(StateRefusal::Malformed)
        })?;
        if files.len() != card.fd_count() {
            return Err(refuse(StateRefusal::Malformed));
        }
        card_fds.push(files);
    }
    let c = &st.config;
    if (c.memory_mib, c.vcpus, c.threads_per_core)
        != (hello.memory_mib, hello.vcpus, hello.threads_per_core)
    {
        return Err(refuse(StateRefusal::Mismatch));
    }
    if let Err(e) = vm.restore(&st, card_fds) {
        tracing::warn!(error = %e, "restoring the handed-over state failed");
        // Tear the VM down first: it may hold the cards' interrupt eventfds, which the old
        // process binds again once it hears of the refusal.
        drop(vm);
        return Err(refuse(StateRefusal::Restore));
    }
    let restored_ns = monotonic_ns();
    wire::send(sock, &Msg::Restored, None).map_err(gone)?;
    match wire::recv(sock, Instant::now() + GO_WAIT).map_err(gone)? {
        (Msg::Go, None) => {}
        _ => return Err(IncomingError::NoGo.into()),
    }
    vm.start_restored(st.running)?;
    let started_at_ns = monotonic_ns();
    let _ = wire::send(sock, &Msg::Running { started_at_ns }, None);
    let since_pause = |t: u64| t.saturating_sub(st.paused_at_ns) / 1000;
    tracing::info!(
        pause_us = since_pause(started_at_ns),
        state_received_us = since_pause(received_ns),
        restored_us = since_pause(restored_ns),
        state_bytes = blob.len(),
        running = st.running,
        cards = st.cards.len(),
        "live update: the guest runs here"
    );
    Ok(vm)
}

/// Takes ownership of the inherited hand-over socket.
pub fn handover_from_fd(fd: i32) -> std::io::Result<UnixStream> {
    crate::server::channel_from_fd(fd)
}
