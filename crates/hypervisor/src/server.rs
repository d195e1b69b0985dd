//! The private command channel, served on the main thread.
//!
//! The channel is one end of a `SOCK_SEQPACKET` socketpair inherited from the parent: one
//! packet is one frame, and an fd (for `AttachBlock`/`AttachNet`/`ReconnectNet`) rides on the same packet. Every packet is
//! parsed by [`Request::parse_frame`]; anything invalid gets a typed error and changes nothing.
//!
//! The loop never waits for the guest. Attaches and detaches (block and net) do their immediate part and
//! answer `Accepted`; what is left (the guest's driver binding or releasing the card) is held in
//! an [`OpTable`] and looked at every [`OP_TICK`] while any is pending, between commands, and
//! reported through `OpStatus` (the protocol is described in `bulkhead_channel`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use std::time::{Duration, Instant};

use bulkhead_channel::{
    BackendFailure, Command, CommandError, DecodeError, LiveUpdateFailure, OpStatus, OpTable,
    Reply, Request, Response, VmState, HEADER_LEN, MAX_FRAME, VERSION,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::devices::vhost_user::ConnectError;
use crate::vm::{DeviceKind, Ended, Hotplug, HotplugWait, Vm};
use crate::Error;

/// How often pending hot-plug operations are looked at.
pub const OP_TICK: Duration = Duration::from_millis(20);

/// The long operations in flight.
type Ops = OpTable<HotplugWait>;

/// What the loop should do after a command.
enum Next {
    Continue,
    Exit,
    /// The VM was handed over to a new process (live update): exit without touching it.
    HandedOver,
}

/// Serves commands until `Shutdown` or until the parent closes its end.
pub fn serve(vm: &mut Vm, channel: UnixStream) {
    let mut buf = vec![0u8; HEADER_LEN + MAX_FRAME as usize + 1];
    let mut ops = Ops::default();
    loop {
        let mut fds = [
            libc::pollfd {
                fd: channel.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: vm.exit_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout = if ops.any_pending() {
            i32::try_from(OP_TICK.as_millis()).unwrap_or(20)
        } else {
            -1
        };
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if ops.any_pending() {
            let now = Instant::now();
            ops.advance(|_, w| vm.poll_hotplug(w, now).map(|e| op_status(vm, e)));
        }
        if rc < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        if fds[1].revents & libc::POLLIN != 0 {
            // The guest stopped by itself: keep serving (console stays readable) until told.
            let mut b = [0u8; 8];
            // SAFETY: reading 8 bytes from our own eventfd into a valid buffer.
            unsafe { libc::read(vm.exit_fd(), b.as_mut_ptr().cast(), 8) };
            tracing::info!(reason = ?vm.exit_reason(), "guest stopped");
        }
        if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0 {
            continue;
        }
        let (n, file) = match channel.recv_with_fd(&mut buf) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "channel receive failed");
                break;
            }
        };
        if n == 0 {
            tracing::info!("parent closed the channel: shutting down");
            break;
        }
        let fd: Option<OwnedFd> = file.map(OwnedFd::from);
        let (resp, next) = handle(vm, &mut ops, buf.get(..n).unwrap_or(&[]), fd);
        if let Err(e) = std::io::Write::write_all(&mut &channel, &resp.encode()) {
            tracing::warn!(error = %e, "channel send failed");
            break;
        }
        match next {
            Next::Continue => {}
            Next::Exit => break,
            Next::HandedOver => {
                // The vCPUs are parked and the guest is the new process's: stopping the
                // threads here touches neither guest memory nor the guest's devices.
                vm.shutdown();
                return;
            }
        }
    }
    vm.shutdown();
}

fn respond(id: u64, result: Result<Reply, CommandError>) -> Response {
    Response {
        version: VERSION,
        id,
        result,
    }
}

/// The channel's error for a hypervisor error: one kind each, so the controller learns what
/// failed. Errors that can only mean a fault inside the hypervisor are `Internal` (and logged).
fn command_error(e: &Error) -> CommandError {
    match e {
        Error::DeviceExists => CommandError::DeviceExists,
        Error::NoSuchDevice => CommandError::NoSuchDevice,
        Error::NoFreeSlot => CommandError::NoFreeSlot,
        Error::WrongState(s) => CommandError::WrongState(*s),
        Error::OutOfMsiRoutes | Error::RoutingTableFull => CommandError::OutOfInterruptRoutes,
        Error::VhostUser(ConnectError::Handshake(_)) => {
            CommandError::Backend(BackendFailure::Handshake)
        }
        Error::VhostUser(
            ConnectError::NotModern | ConnectError::NoConfig | ConnectError::MissingFeature(_),
        ) => CommandError::Backend(BackendFailure::FeatureMismatch),
        Error::VhostUser(ConnectError::Config(_) | ConnectError::InvalidConfig(_)) => {
            CommandError::Backend(BackendFailure::Config)
        }
        Error::VhostUser(ConnectError::Unresponsive) => {
            CommandError::Backend(BackendFailure::Unresponsive)
        }
        Error::BackendFailed(f) => CommandError::Backend(*f),
        Error::WrongDeviceKind => CommandError::WrongDeviceKind,
        Error::DeviceBusy => CommandError::DeviceBusy,
        Error::Replace(f) => CommandError::Backend(*f),
        other => {
            tracing::warn!(error = %other, "command failed inside the hypervisor");
            CommandError::Internal
        }
    }
}

/// The finished operation's status: `Failed` when the card's backend died during it.
fn op_status(vm: &Vm, e: Ended) -> OpStatus {
    match e.failure {
        Some(failure) => OpStatus::Failed {
            state: vm.state(),
            failure,
        },
        None => OpStatus::Done {
            state: vm.state(),
            guest_acknowledged: e.acknowledged,
        },
    }
}

/// Records a started hot-plug operation under request id `op` and answers `Accepted`.
fn accept(
    ops: &mut Ops,
    vm: &Vm,
    op: u64,
    device: bulkhead_channel::DeviceId,
    h: Hotplug,
) -> Reply {
    let outcome = match h {
        Hotplug::Done(e) => Ok(op_status(vm, e)),
        Hotplug::Waiting(w) => Err(w),
    };
    ops.insert(op, device, outcome);
    Reply::Accepted { op }
}

fn handle(vm: &mut Vm, ops: &mut Ops, frame: &[u8], fd: Option<OwnedFd>) -> (Response, Next) {
    if frame.len() > HEADER_LEN + MAX_FRAME as usize {
        let e = DecodeError::Oversized {
            len: u32::try_from(frame.len()).unwrap_or(u32::MAX),
            max: MAX_FRAME,
        };
        return (respond(0, Err(CommandError::Malformed(e))), Next::Continue);
    }
    let req = match Request::parse_frame(frame) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "refused a malformed command");
            return (respond(0, Err(CommandError::Malformed(e))), Next::Continue);
        }
    };
    if req.command.wants_fd() != fd.is_some() {
        return (
            respond(req.id, Err(CommandError::MissingFd)),
            Next::Continue,
        );
    }
    tracing::info!(id = req.id, command = ?req.command, "command");
    let done = |vm: &Vm| Ok(Reply::Done { state: vm.state() });
    let (result, next) = match req.command {
        Command::Start => (
            vm.start()
                .map_err(|_| CommandError::WrongState(vm.state()))
                .and_then(|_| done(vm)),
            Next::Continue,
        ),
        Command::Pause => (
            vm.pause()
                .map_err(CommandError::WrongState)
                .and_then(|_| done(vm)),
            Next::Continue,
        ),
        Command::Resume => (
            vm.resume()
                .map_err(CommandError::WrongState)
                .and_then(|_| done(vm)),
            Next::Continue,
        ),
        Command::Shutdown => {
            vm.shutdown();
            (done(vm), Next::Exit)
        }
        Command::AttachBlock { id, read_only } => (
            attach(vm, ops, req.id, id, fd, |vm, id, stream| {
                vm.begin_attach(id, stream, read_only)
            }),
            Next::Continue,
        ),
        Command::AttachNet { id } => (
            attach(vm, ops, req.id, id, fd, |vm, id, stream| {
                vm.begin_attach_net(id, stream)
            }),
            Next::Continue,
        ),
        Command::DetachBlock { id } => (
            detach(vm, ops, req.id, id, DeviceKind::Block),
            Next::Continue,
        ),
        Command::DetachNet { id } => (detach(vm, ops, req.id, id, DeviceKind::Net), Next::Continue),
        Command::ReconnectNet { id } => (
            swap_backend(vm, ops, id, fd, Vm::reconnect_net),
            Next::Continue,
        ),
        Command::ReplaceBlock { id } => (
            swap_backend(vm, ops, id, fd, Vm::replace_block),
            Next::Continue,
        ),
        Command::LiveUpdate => live_update(vm, ops, fd),
        Command::OpStatus { op } => (
            ops.status(op).map(|status| Reply::Op { op, status }),
            Next::Continue,
        ),
        Command::ReadConsole { cursor, max } => {
            let chunk = vm.console().read(cursor, usize::try_from(max).unwrap_or(0));
            (
                Ok(Reply::Console {
                    data: chunk.data,
                    next: chunk.next,
                    lost: chunk.lost,
                }),
                Next::Continue,
            )
        }
        Command::Stats => (
            Ok(Reply::Stats {
                state: vm.state(),
                stats: vm.stats(),
            }),
            Next::Continue,
        ),
    };
    (respond(req.id, result), next)
}

/// An attach (block or net): admitted by the op table, refused on a stopped VM, then `begin`
/// does the handshake and plugs the card.
fn attach(
    vm: &mut Vm,
    ops: &mut Ops,
    op: u64,
    id: bulkhead_channel::DeviceId,
    fd: Option<OwnedFd>,
    begin: impl FnOnce(&mut Vm, &str, UnixStream) -> Result<Hotplug, Error>,
) -> Result<Reply, CommandError> {
    ops.admit(op, &id)?;
    if vm.state() == VmState::Stopped {
        return Err(CommandError::WrongState(vm.state()));
    }
    let fd = fd.ok_or(CommandError::MissingFd)?;
    // SAFETY: `fd` was received through SCM_RIGHTS and is owned solely by us.
    let stream = unsafe { UnixStream::from_raw_fd(into_raw(fd)) };
    match begin(vm, id.as_str(), stream) {
        Ok(h) => Ok(accept(ops, vm, op, id, h)),
        Err(e) => Err(command_error(&e)),
    }
}

/// A device's card swapped for the one on `fd` by `swap`: a net card replaced in place
/// (`ReconnectNet`, [`Vm::reconnect_net`]) or a block card replaced by a new card process
/// (`ReplaceBlock`, card update, [`Vm::replace_block`]). Refused while an attach or detach of
/// the same device is in flight.
fn swap_backend(
    vm: &mut Vm,
    ops: &Ops,
    id: bulkhead_channel::DeviceId,
    fd: Option<OwnedFd>,
    swap: fn(&mut Vm, &str, UnixStream) -> Result<(), Error>,
) -> Result<Reply, CommandError> {
    if ops.busy(&id) {
        return Err(CommandError::DeviceBusy);
    }
    let fd = fd.ok_or(CommandError::MissingFd)?;
    // SAFETY: `fd` was received through SCM_RIGHTS and is owned solely by us.
    let stream = unsafe { UnixStream::from_raw_fd(into_raw(fd)) };
    match swap(vm, id.as_str(), stream) {
        Ok(()) => Ok(Reply::Done { state: vm.state() }),
        Err(e) => Err(command_error(&e)),
    }
}

/// A detach of a card of `kind`.
fn detach(
    vm: &mut Vm,
    ops: &mut Ops,
    op: u64,
    id: bulkhead_channel::DeviceId,
    kind: DeviceKind,
) -> Result<Reply, CommandError> {
    ops.admit(op, &id)?;
    match vm.begin_detach(id.as_str(), kind) {
        Ok(h) => Ok(accept(ops, vm, op, id, h)),
        Err(e) => Err(command_error(&e)),
    }
}

/// `LiveUpdate`: refused while a hot-plug operation is in flight or before the guest started;
/// otherwise the hand-over runs to its end (bounded by its deadlines) before the reply.
fn live_update(vm: &mut Vm, ops: &Ops, fd: Option<OwnedFd>) -> (Result<Reply, CommandError>, Next) {
    let state = vm.state();
    if !matches!(state, VmState::Running | VmState::Paused) {
        return (Err(CommandError::WrongState(state)), Next::Continue);
    }
    if ops.any_pending() {
        return (
            Err(CommandError::LiveUpdate(
                LiveUpdateFailure::OperationInFlight,
            )),
            Next::Continue,
        );
    }
    let Some(fd) = fd else {
        return (Err(CommandError::MissingFd), Next::Continue);
    };
    // SAFETY: `fd` was received through SCM_RIGHTS and is owned solely by us.
    let sock = unsafe { UnixStream::from_raw_fd(into_raw(fd)) };
    // The hand-over gives away guest memory: only to a socket this hypervisor's own parent
    // made, never to whoever else may hold the channel.
    if !made_by_parent(&sock) {
        return (
            Err(CommandError::LiveUpdate(LiveUpdateFailure::NotFromParent)),
            Next::Continue,
        );
    }
    match crate::live_update::hand_over(vm, &sock) {
        Ok(pause_us) => (Ok(Reply::Updated { pause_us }), Next::HandedOver),
        Err(f) => (Err(CommandError::LiveUpdate(f)), Next::Continue),
    }
}

/// Whether `sock` is one end of a socketpair made by this process's parent. The kernel records
/// the credentials of the process that called socketpair(2) on both ends (`SO_PEERCRED`), so a
/// process that holds the command channel but is not the parent (the launcher, which starts
/// only the measured hypervisor binary for the new side) cannot make a socket that passes.
fn made_by_parent(sock: &UnixStream) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let Ok(mut len) = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()) else {
        return false;
    };
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a `ucred` we own, and
    // updates `len`; the fd is a socket we own for the duration of the call.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast(),
            &mut len,
        )
    };
    // SAFETY: getppid has no preconditions and cannot fail.
    let parent = unsafe { libc::getppid() };
    let ok = r == 0 && cred.pid == parent && parent > 1;
    if !ok {
        tracing::warn!(
            peer = cred.pid,
            parent,
            "LiveUpdate refused: the hand-over socket was not made by this hypervisor's parent"
        );
    }
    ok
}

fn into_raw(fd: OwnedFd) -> RawFd {
    use std::os::fd::IntoRawFd;
    fd.into_raw_fd()
}

/// Takes ownership of the inherited channel fd, checking that it is a unix socket.
pub fn channel_from_fd(fd: RawFd) -> std::io::Result<UnixStream> {
    // SAFETY: fstat on an integer fd with a zeroed stat buffer we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` is valid for writes.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "channel fd is not a socket",
        ));
    }
    // SAFETY: the fd was inherited for this purpose and nothing else in the process owns it.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}
