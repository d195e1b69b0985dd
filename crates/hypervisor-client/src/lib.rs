//! The parent's end of the hypervisor's private channel.
//!
//! [`Hypervisor::spawn`] creates a `SOCK_SEQPACKET` socketpair, starts `bulkhead-hypervisor serve`
//! with one end inherited as `--channel-fd` (no listening socket, no path on disk), and keeps the
//! other end. [`Hypervisor::call`] sends one typed command (optionally with one fd, e.g. a
//! connected vhost-user socket) and waits for its typed response.
//!
//! Long commands (`AttachBlock`, `DetachBlock`, `AttachNet`, `DetachNet`) are accepted at once
//! by the hypervisor and finish later (see `bulkhead_channel`'s module docs). [`Channel::call`] keeps a blocking API
//! for them: it submits, then asks `OpStatus` every [`OP_POLL`] until the operation is done,
//! taking the channel only for each short exchange. A [`Channel`] is `Sync`: other threads may
//! send `Stats`, `ReadConsole`, `Pause` or `Shutdown` on the same channel meanwhile, and the
//! hypervisor answers them while the guest is still being waited for.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command as Proc, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use bulkhead_channel::{
    BackendFailure, Command, CommandError, DecodeError, DeviceId, LiveUpdateFailure, OpStatus,
    Reply, StateRefusal, VmState, VmStats,
};
use bulkhead_channel::{Request, Response, HEADER_LEN, MAX_FRAME, VERSION};

/// Why talking to a hypervisor failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("starting the hypervisor: {0}")]
    Spawn(std::io::Error),
    #[error("channel I/O: {0}")]
    Io(std::io::Error),
    #[error("the hypervisor sent a malformed response: {0}")]
    BadResponse(bulkhead_channel::DecodeError),
    #[error("response id {got} does not match request id {want}")]
    IdMismatch { got: u64, want: u64 },
    #[error("the hypervisor refused: {0}")]
    Refused(CommandError),
    #[error("the hypervisor closed the channel")]
    Closed,
    #[error("unexpected reply to {command}: {reply:?}")]
    UnexpectedReply {
        command: &'static str,
        reply: Box<Reply>,
    },
    #[error("operation {op} did not finish within {secs} s")]
    OpTimeout { op: u64, secs: u64 },
    /// A long operation finished, but the device's backend (its card) failed during it
    /// ([`OpStatus::Failed`]): after a detach the card is out all the same; after an attach
    /// it is plugged but unusable and should be detached.
    #[error("the device's backend failed during the operation: {failure:?} (VM {state:?})")]
    BackendFailed {
        state: VmState,
        failure: BackendFailure,
    },
}

/// How to start a VM.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub binary: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub pin: Vec<usize>,
    /// Drop the hypervisor to this uid:gid after set-up (when the parent runs as root).
    pub run_as: Option<(u32, u32)>,
}

/// A running hypervisor process and our end of its channel.
pub struct Hypervisor {
    child: Child,
    chan: Channel,
}

/// Our end of a hypervisor's channel, without the process handle: for a parent that receives
/// the channel fd from whoever spawned the process (the controller's launcher, over SCM_RIGHTS).
/// Shareable between threads: each exchange (one request, its response) holds the socket
/// alone, nothing longer.
pub struct Channel {
    chan: Mutex<Link>,
}

struct Link {
    sock: UnixStream,
    next_id: u64,
}

/// How long one exchange waits for its reply (the hypervisor answers every command at once;
/// only a wedged or stopped process takes longer).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often [`Channel::wait_op`] asks about a long operation.
pub const OP_POLL: Duration = Duration::from_millis(25);
/// How long [`Channel::wait_op`] waits for a long operation. The hypervisor bounds its own
/// waits (30 s attach, 45 s detach); this is a backstop well beyond them.
pub const OP_TIMEOUT: Duration = Duration::from_secs(120);

/// A CLOEXEC `SOCK_SEQPACKET` socketpair: one packet is one frame, fds ride on the same packet.
/// Shared by the hypervisor channel and the controller's launcher channel.
pub fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid two-element array; the flags create CLOEXEC sockets.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created by socketpair and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A CLOEXEC pipe: (read end, write end).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn socketpair() -> std::io::Result<(UnixStream, OwnedFd)> {
    let (ours, theirs) = seqpacket_pair()?;
    Ok((UnixStream::from(ours), theirs))
}

/// Starts `bulkhead-hypervisor serve` for `spec` and returns the process and our end of its
/// channel (CLOEXEC). The VM is created but not started. [`Hypervisor::spawn`] wraps this; a
/// launcher that hands the channel to another process uses it directly.
pub fn spawn_process(spec: &VmSpec) -> Result<(Child, OwnedFd), ClientError> {
    let (ours, theirs) = socketpair().map_err(ClientError::Spawn)?;
    let child_fd = theirs.as_raw_fd();
    // The guest command line can hold the customer's user data: it goes through a pipe, never
    // through argv (which every local user can read in /proc/PID/cmdline). It is far smaller
    // than a pipe's buffer, so writing it all before the child starts cannot block.
    let (cmdline_read, cmdline_write) = pipe().map_err(ClientError::Spawn)?;
    {
        use std::io::Write as _;
        let mut w = std::fs::File::from(cmdline_write);
        w.write_all(spec.cmdline.as_bytes())
            .map_err(ClientError::Spawn)?;
    }
    let cmdline_fd = cmdline_read.as_raw_fd();
    let mut cmd = Proc::new(&spec.binary);
    cmd.arg("serve")
        .arg("--kernel")
        .arg(&spec.kernel)
        .arg("--cmdline-fd")
        .arg(cmdline_fd.to_string())
        .arg("--memory-mib")
        .arg(spec.memory_mib.to_string())
        .arg("--vcpus")
        .arg(spec.vcpus.to_string())
        .arg("--channel-fd")
        .arg(child_fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some(i) = &spec.initrd {
        cmd.arg("--initrd").arg(i);
    }
    if !spec.pin.is_empty() {
        let list: Vec<String> = spec.pin.iter().map(usize::to_string).collect();
        cmd.arg("--pin").arg(OsString::from(list.join(",")));
    }
    if let Some((u, g)) = spec.run_as {
        cmd.arg("--run-as").arg(format!("{u}:{g}"));
    }
    // SAFETY: the closure only calls fcntl, which is async-signal-safe, to clear CLOEXEC
    // on the two fds the child must inherit.
    unsafe {
        cmd.pre_exec(move || {
            for fd in [child_fd, cmdline_fd] {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(ClientError::Spawn)?;
    drop(theirs);
    drop(cmdline_read);
    Ok((child, OwnedFd::from(ours)))
}

/// Starts `bulkhead-hypervisor incoming` (`binary`, the new release), the new process's side
/// of a live update: the process, our end of its channel (CLOEXEC), and the socket connected
/// to its hand-over end, which the *old* hypervisor must get with [`Command::LiveUpdate`].
/// The new process waits (bounded) for the old one; it exits by itself if the hand-over does
/// not happen.
pub fn spawn_incoming(
    binary: &std::path::Path,
    run_as: Option<(u32, u32)>,
) -> Result<(Child, OwnedFd, UnixStream), ClientError> {
    let (ours, theirs) = seqpacket_pair().map_err(ClientError::Spawn)?;
    let (old_end, new_end) = UnixStream::pair().map_err(ClientError::Spawn)?;
    let (cfd, hfd) = (theirs.as_raw_fd(), new_end.as_raw_fd());
    let mut cmd = Proc::new(binary);
    cmd.arg("incoming")
        .arg("--channel-fd")
        .arg(cfd.to_string())
        .arg("--handover-fd")
        .arg(hfd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some((u, g)) = run_as {
        cmd.arg("--run-as").arg(format!("{u}:{g}"));
    }
    // SAFETY: the closure only calls fcntl, which is async-signal-safe, to clear CLOEXEC on
    // the two fds the child must inherit.
    unsafe {
        cmd.pre_exec(move || {
            for fd in [cfd, hfd] {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(ClientError::Spawn)?;
    drop(theirs);
    drop(new_end);
    Ok((child, ours, old_end))
}

/// How long [`Hypervisor::live_update`] waits for the old process to exit after handing over.
const OLD_EXIT_WAIT: Duration = Duration::from_secs(10);

impl Hypervisor {
    /// Live update: moves the running VM to a new process of `binary` (see
    /// [`Command::LiveUpdate`]) and from then on drives that one; the old process exits and is
    /// reaped. Returns the pause the hypervisors measured, in microseconds. On an error the
    /// old process still runs the guest, this handle still drives it, and the new process is
    /// gone.
    pub fn live_update(
        &mut self,
        binary: &std::path::Path,
        run_as: Option<(u32, u32)>,
    ) -> Result<u64, ClientError> {
        let (mut child, ours, handover) = spawn_incoming(binary, run_as)?;
        let pause_us = match self.chan.live_update(handover) {
            Ok(p) => p,
            Err(e) => {
                // It never ran the guest: nothing of it is worth keeping.
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let chan = Channel::from_fd(ours)?;
        let mut old = std::mem::replace(&mut self.child, child);
        self.chan = chan;
        let until = Instant::now() + OLD_EXIT_WAIT;
        while matches!(old.try_wait(), Ok(None)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = old.kill();
        let _ = old.wait();
        Ok(pause_us)
    }

    /// Card update: moves block device `id` to the new card connected on `vhost` (see
    /// [`Command::ReplaceBlock`]). On an error the device still runs on its old card.
    pub fn replace_block(
        &mut self,
        id: &bulkhead_channel::DeviceId,
        vhost: &std::os::unix::net::UnixStream,
    ) -> Result<(), ClientError> {
        match self.chan.call(
            Command::ReplaceBlock { id: id.clone() },
            Some(vhost.as_raw_fd()),
        )? {
            Reply::Done { .. } => Ok(()),
            reply => Err(ClientError::UnexpectedReply {
                command: "ReplaceBlock",
                reply: Box::new(reply),
            }),
        }
    }

    /// Starts `bulkhead-hypervisor serve` for `spec`. The VM is created but not started.
    pub fn spawn(spec: &VmSpec) -> Result<Self, ClientError> {
        let (child, ours) = spawn_process(spec)?;
        Ok(Hypervisor {
            child,
            chan: Channel::from_fd(ours)?,
        })
    }

    /// The hypervisor's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `command` (with `fd` for `AttachBlock`/`AttachNet`/`ReconnectNet`) and returns
    /// the hypervisor's reply; a long command's final outcome (see [`Channel::call`]).
    pub fn call(&mut self, command: Command, fd: Option<RawFd>) -> Result<Reply, ClientError> {
        self.chan.call(command, fd)
    }

    /// Our end of the channel, shareable with other threads.
    pub fn channel(&self) -> &Channel {
        &self.chan
    }

    /// Asks the VM to shut down and reaps the process.
    pub fn shutdown(mut self) -> Result<(), ClientError> {
        let r = self.call(Command::Shutdown, None);
        let _ = self.child.wait();
        r.map(|_| ())
    }

    /// Kills the process outright (used when the channel is unusable).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Channel {
    /// Wraps our end of a hypervisor channel (a `SOCK_SEQPACKET` socket) received from elsewhere.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, ClientError> {
        let sock = UnixStream::from(fd);
        sock.set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(ClientError::Io)?;
        Ok(Channel {
            chan: Mutex::new(Link { sock, next_id: 0 }),
        })
    }

    /// Takes over a channel another parent drove before (a controller adopting a running
    /// hypervisor after a restart: the fd is a dup of the same socket end). Replies still queued
    /// for the previous owner's requests are drained, and this owner's request ids start at
    /// `first_id`, above every id the previous owner can have used (so a late reply to one of
    /// its requests is recognised and skipped, and no long operation id collides).
    pub fn adopt(fd: OwnedFd, first_id: u64) -> Result<Self, ClientError> {
        let chan = Channel::from_fd(fd)?;
        {
            let link = chan.link();
            link.sock.set_nonblocking(true).map_err(ClientError::Io)?;
            let mut buf = vec![0u8; HEADER_LEN + MAX_FRAME as usize];
            while let Ok(n) = (&link.sock).read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
            link.sock.set_nonblocking(false).map_err(ClientError::Io)?;
        }
        chan.link().next_id = first_id.saturating_sub(1);
        Ok(chan)
    }

    fn link(&self) -> MutexGuard<'_, Link> {
        self.chan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `command` (with `fd` for `AttachBlock`/`AttachNet`/`ReconnectNet`) and returns
    /// the hypervisor's reply. For a long command (an attach or detach, block or net) this is
    /// its final outcome, [`Reply::Device`]: it submits, then waits with [`Channel::wait_op`], leaving the channel
    /// free for other callers between polls.
    pub fn call(&self, command: Command, fd: Option<RawFd>) -> Result<Reply, ClientError> {
        if command.is_long() {
            let op = self.submit(command, fd)?;
            return self.wait_op(op);
        }
        self.exchange(command, fd)
    }

    /// Live update: sends [`Command::LiveUpdate`] with `handover`, the hand-over end of the new
    /// hypervisor process (closed here once the reply is in, so only the two hypervisors hold
    /// the socket), and returns the pause they measured, in microseconds. Any other reply is
    /// [`ClientError::UnexpectedReply`]. After a refusal or an unexpected reply the guest still
    /// runs in this channel's process; after an I/O error or a timeout the outcome is unknown
    /// (the hand-over may have started), and the caller must find out which process holds it.
    pub fn live_update(&self, handover: impl Into<OwnedFd>) -> Result<u64, ClientError> {
        let handover: OwnedFd = handover.into();
        let r = self.call(Command::LiveUpdate, Some(handover.as_raw_fd()));
        drop(handover);
        match r? {
            Reply::Updated { pause_us } => Ok(pause_us),
            reply => Err(ClientError::UnexpectedReply {
                command: "LiveUpdate",
                reply: Box::new(reply),
            }),
        }
    }

    /// Sends a long command and returns the id of the accepted operation (its request id).
    /// A refusal (nothing changed) is `Err(ClientError::Refused(..))`.
    pub fn submit(&self, command: Command, fd: Option<RawFd>) -> Result<u64, ClientError> {
        match self.exchange(command, fd)? {
            Reply::Accepted { op } => Ok(op),
            other => Err(ClientError::UnexpectedReply {
                command: "a long command",
                reply: Box::new(other),
            }),
        }
    }

    /// One `OpStatus` exchange: where operation `op` stands. `Done` is reported once.
    pub fn op_status(&self, op: u64) -> Result<OpStatus, ClientError> {
        match self.exchange(Command::OpStatus { op }, None)? {
            Reply::Op { op: got, status } if got == op => Ok(status),
            other => Err(ClientError::UnexpectedReply {
                command: "OpStatus",
                reply: Box::new(other),
            }),
        }
    }

    /// Polls operation `op` every [`OP_POLL`] until it is done (at most [`OP_TIMEOUT`]) and
    /// returns its outcome as a [`Reply::Device`].
    pub fn wait_op(&self, op: u64) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + OP_TIMEOUT;
        loop {
            match self.op_status(op)? {
                OpStatus::Done {
                    state,
                    guest_acknowledged,
                } => {
                    return Ok(Reply::Device {
                        state,
                        guest_acknowledged,
                    })
                }
                OpStatus::Failed { state, failure } => {
                    return Err(ClientError::BackendFailed { state, failure })
                }
                OpStatus::Pending => {}
            }
            if Instant::now() >= deadline {
                return Err(ClientError::OpTimeout {
                    op,
                    secs: OP_TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(OP_POLL);
        }
    }

    /// One request and its response, holding the socket for just that.
    pub fn exchange(&self, command: Command, fd: Option<RawFd>) -> Result<Reply, ClientError> {
        let mut link = self.link();
        link.next_id += 1;
        let id = link.next_id;
        let frame = Request {
            version: VERSION,
            id,
            command,
        }
        .encode();
        match fd {
            Some(fd) => {
                send_packet(link.sock.as_raw_fd(), &frame, Some(fd)).map_err(ClientError::Io)?
            }
            None => (&link.sock).write_all(&frame).map_err(ClientError::Io)?,
        }
        let mut buf = vec![0u8; HEADER_LEN + MAX_FRAME as usize];
        // A reply with a lower (non-zero) id answers a request of a previous owner of this
        // channel (see [`Channel::adopt`]) that was still in flight when it went away: skipped.
        let mut stale = 0;
        let resp = loop {
            let n = (&link.sock).read(&mut buf).map_err(ClientError::Io)?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            let resp = Response::parse_frame(buf.get(..n).unwrap_or(&[]))
                .map_err(ClientError::BadResponse)?;
            if resp.id != 0 && resp.id < id && stale < MAX_STALE_REPLIES {
                stale += 1;
                continue;
            }
            break resp;
        };
        drop(link);
        if resp.id != id {
            return Err(ClientError::IdMismatch {
                got: resp.id,
                want: id,
            });
        }
        resp.result.map_err(ClientError::Refused)
    }
}

/// How many stale replies (to a previous owner's requests) one exchange skips at most.
const MAX_STALE_REPLIES: u32 = 64;

/// Sends one packet on a unix socket, with at most one fd as SCM_RIGHTS (the channel's, the
/// controller's launcher's and its keeper's).
pub fn send_packet(sock: RawFd, data: &[u8], fd: Option<RawFd>) -> std::io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let fd_len = u32::try_from(std::mem::size_of::<RawFd>()).unwrap_or(4);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = usize::try_from(unsafe { libc::CMSG_SPACE(fd_len) }).unwrap_or(64);
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; all-zero is a valid initial value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: `msg_control` points at `cbuf`, which has room for one cmsg with one fd
        // (CMSG_SPACE above); the header and data pointers come from the CMSG macros.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() {
                return Err(std::io::Error::other("no room for SCM_RIGHTS"));
            }
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = usize::try_from(libc::CMSG_LEN(fd_len)).unwrap_or(0);
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: `msg` and the buffers it points to (`iov` → `data`, `cbuf`) outlive the call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn reply(id: u64) -> Vec<u8> {
        Response {
            version: VERSION,
            id,
            result: Ok(Reply::Done {
                state: VmState::Running,
            }),
        }
        .encode()
    }

    /// An adopted channel drains what was queued for the previous owner, numbers its requests
    /// from `first_id`, and skips a late reply to an older request.
    #[test]
    fn adopted_channel_skips_the_previous_owners_replies() {
        let (ours, theirs) = seqpacket_pair().unwrap();
        let peer = UnixStream::from(theirs);
        (&peer).write_all(&reply(7)).unwrap();
        let chan = Channel::adopt(ours, 1000).unwrap();
        let t = std::thread::spawn(move || {
            let mut buf = vec![0u8; HEADER_LEN + MAX_FRAME as usize];
            let n = (&peer).read(&mut buf).unwrap();
            let req = Request::parse_frame(&buf[..n]).unwrap();
            assert_eq!(req.id, 1000);
            (&peer).write_all(&reply(9)).unwrap();
            (&peer).write_all(&reply(req.id)).unwrap();
            peer
        });
        assert!(matches!(
            chan.exchange(Command::Stats, None),
            Ok(Reply::Done { .. })
        ));
        drop(t.join().unwrap());
    }
}
