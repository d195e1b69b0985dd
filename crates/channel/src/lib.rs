//! The hypervisor's private command channel: the only way to control a VM.
//!
//! The hypervisor inherits one end of a unix `socketpair(2)` from its parent (the controller):
//! there is no listening socket and no path on disk. Every message is a frame:
//!
//! ```text
//! +----------------+-----------------------------------------+
//! | len: u32 (LE)  | body: postcard(Envelope), len bytes     |
//! +----------------+-----------------------------------------+
//! ```
//!
//! `len` is capped at [`MAX_FRAME`] *before* anything is buffered, the body must decode to
//! exactly one envelope with no trailing bytes, and its `version` must equal [`VERSION`].
//! File descriptors (a vhost-user socket for `AttachBlock`/`AttachNet`/`ReconnectNet`) travel beside the frame as
//! `SCM_RIGHTS` ancillary data. This crate does no I/O: it turns bytes into checked types and
//! back, so the same code runs in the hypervisor, the controller and the fuzz target.
//!
//! ## Long operations: accepted now, completed later, polled by request id
//!
//! Every exchange is one request and one response, in order: the hypervisor never sends a
//! frame nobody asked for. `AttachBlock`, `DetachBlock`, `AttachNet` and `DetachNet` on a
//! running guest must wait for the guest's driver (bind a hot-plugged card, release a pulled one: seconds on software KVM), so
//! they do not hold the channel meanwhile:
//!
//! 1. The request is checked at once (state, device id, free slot, the vhost-user handshake).
//!    A refusal comes back as `Err(CommandError::..)` and nothing changed.
//! 2. Otherwise the reply is [`Reply::Accepted`]`{ op }`, where `op` is the *request id* of
//!    the attach or detach (so request ids of long commands must be non-zero and not
//!    reused while their operation is held: [`CommandError::OpIdInUse`]).
//! 3. The client asks [`Command::OpStatus`]`{ op }` whenever it likes: the answer is
//!    [`Reply::Op`] with [`OpStatus::Pending`], or [`OpStatus::Done`] exactly once, after which
//!    the hypervisor forgets the operation (a later `OpStatus` for it is
//!    [`CommandError::NoSuchOp`]).
//! 4. Between those polls any other command is served at once: `Stats`, `ReadConsole`,
//!    `Pause`, `Shutdown` (which abandons the waits: the VM is gone), and further hot-plugs of
//!    other devices. A command for a device that has an operation in flight is refused with
//!    [`CommandError::DeviceBusy`]. At most [`MAX_OPS`] operations are held (pending or done but
//!    not yet collected); beyond that: [`CommandError::TooManyOps`].
//!
//! The hypervisor bounds every wait (the card stays plugged on an attach the guest did not bind
//! in time; a detach closes the backend connection at the deadline regardless), so every
//! accepted operation reaches `Done`. [`OpTable`] is the bookkeeping both rules above need, kept
//! here so it is tested without a VM.

use serde::{Deserialize, Serialize};

/// Protocol version carried in every envelope. Bumped on any incompatible change.
/// Version 2: long operations answered by `Accepted` + `OpStatus`, more error kinds.
/// Version 3: `AttachNet`/`DetachNet`, `VmStats::net_devices`, `CommandError::WrongDeviceKind`;
/// later additions at the end of each enum (a peer that lacks them refuses them as
/// [`DecodeError::Body`], nothing else changes): `ReconnectNet`, `LiveUpdate` with
/// `Reply::Updated` and `CommandError::LiveUpdate`, `ReplaceBlock`.
pub const VERSION: u16 = 3;
/// Largest body accepted, in bytes. Console reads are capped well below it.
pub const MAX_FRAME: u32 = 64 * 1024;
/// Largest console chunk returned by one `ReadConsole`.
pub const MAX_CONSOLE_CHUNK: u32 = 32 * 1024;
/// Longest device id (`AttachBlock`/`DetachBlock`).
pub const MAX_DEVICE_ID: usize = 32;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;
/// Most long operations the hypervisor holds at once (pending, or done and not yet collected).
pub const MAX_OPS: usize = 16;

/// A device id: 1–32 bytes of `[a-z0-9-]`, checked at the boundary.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    /// Checks `s` and wraps it.
    pub fn new(s: &str) -> Result<Self, DecodeError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_DEVICE_ID
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(DeviceId(s.to_owned()))
        } else {
            Err(DecodeError::BadDeviceId)
        }
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceId {
    type Error = DecodeError;
    fn try_from(s: String) -> Result<Self, DecodeError> {
        DeviceId::new(&s)
    }
}

impl From<DeviceId> for String {
    fn from(d: DeviceId) -> String {
        d.0
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A command from the controller to the hypervisor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Start the vCPUs of a VM that was created stopped.
    Start,
    /// Stop running the vCPUs; guest state is kept.
    Pause,
    /// Resume vCPUs after `Pause`.
    Resume,
    /// End the VM. The hypervisor exits after replying.
    Shutdown,
    /// Attach a vhost-user block device; the connected vhost-user socket travels as SCM_RIGHTS.
    /// Before `Start` the device is present at boot; on a running or paused VM it is
    /// hot-plugged.
    AttachBlock { id: DeviceId, read_only: bool },
    /// Detach a block device by id (hot-unplug on a running or paused VM).
    DetachBlock { id: DeviceId },
    /// Read console output from `cursor` (a byte offset in the console stream).
    ReadConsole { cursor: u64, max: u32 },
    /// Report counters.
    Stats,
    /// How is the long operation accepted under request id `op` doing? (See the module docs.)
    OpStatus { op: u64 },
    /// Attach a vhost-user net device (a net card); the connected vhost-user socket travels as
    /// SCM_RIGHTS. The card decides the MAC. Like `AttachBlock`: present at boot before
    /// `Start`, hot-plugged on a running or paused VM, into the same slots disks use.
    AttachNet { id: DeviceId },
    /// Detach a net device by id (hot-unplug on a running or paused VM). Refused with
    /// [`CommandError::WrongDeviceKind`] for a block device's id (and `DetachBlock` for a net
    /// device's).
    DetachNet { id: DeviceId },
    /// Replace the backend of net device `id` in place with the card whose connected
    /// vhost-user socket travels as SCM_RIGHTS (a restarted card): no reset and no hot-plug
    /// event reach the guest, its driver keeps the same NIC. The new card must offer every
    /// feature the guest acked ([`BackendFailure::FeatureMismatch`] otherwise) and show the
    /// same MAC and MTU ([`BackendFailure::IdentityMismatch`]); a refusal changes nothing.
    /// A running device's rings resume where the guest's used rings stand (buffers the dead
    /// card held are lost). Not a long operation: answered with [`Reply::Done`].
    ReconnectNet { id: DeviceId },
    /// Live update: hand the VM over to a new hypervisor process, started by the parent in
    /// `incoming` mode, whose hand-over socket (one end of a `SOCK_STREAM` socketpair, the
    /// other end inherited by the new process) travels as SCM_RIGHTS. The guest pauses only
    /// while its machine state crosses (guest memory is the same memfd, never copied). On
    /// [`Reply::Updated`] the new process runs the guest and serves its own channel, and this
    /// process exits right after replying. On [`CommandError::LiveUpdate`] nothing changed:
    /// this process still runs the guest (resumed if it was running) and the new process
    /// never ran it. Answered within seconds, not a long operation.
    LiveUpdate,
    /// Card update: move block device `id` from its running card to the new card whose
    /// connected vhost-user socket travels as SCM_RIGHTS, with no reset or hot-plug event in
    /// the guest. The new card must show the same capacity and queue count and offer every
    /// feature the guest acked ([`BackendFailure::IdentityMismatch`] /
    /// [`BackendFailure::FeatureMismatch`] otherwise: nothing changes). The old card's rings
    /// are stopped (GET_VRING_BASE, which a block card answers only once every request it
    /// took is completed), the new card resumes each at the position the old one gave, and
    /// the old connection is closed. A new card that fails to take the rings leaves the
    /// device on the old card, resumed where it stopped. Answered with [`Reply::Done`].
    ReplaceBlock { id: DeviceId },
}

impl Command {
    /// Whether this command must carry exactly one file descriptor.
    pub fn wants_fd(&self) -> bool {
        matches!(
            self,
            Command::AttachBlock { .. }
                | Command::AttachNet { .. }
                | Command::ReconnectNet { .. }
                | Command::LiveUpdate
                | Command::ReplaceBlock { .. }
        )
    }

    /// Whether this command is a long operation: answered with [`Reply::Accepted`] and
    /// completed later ([`Command::OpStatus`]).
    pub fn is_long(&self) -> bool {
        matches!(
            self,
            Command::AttachBlock { .. }
                | Command::DetachBlock { .. }
                | Command::AttachNet { .. }
                | Command::DetachNet { .. }
        )
    }

    /// The device a command names, if any.
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Command::AttachBlock { id, .. }
            | Command::DetachBlock { id }
            | Command::AttachNet { id }
            | Command::DetachNet { id }
            | Command::ReconnectNet { id }
            | Command::ReplaceBlock { id } => Some(id),
            _ => None,
        }
    }
}

/// State of the VM as the hypervisor sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Paused,
    Stopped,
}

/// Counters returned by `Stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub vcpu_exits: u64,
    pub mmio_exits: u64,
    pub pio_exits: u64,
    pub console_bytes: u64,
    pub console_dropped: u64,
    pub block_devices: u32,
    pub bad_guest_accesses: u64,
    pub net_devices: u32,
    /// Attached cards (block or net) whose backend failed for good (see
    /// [`BackendFailure::Unresponsive`]): the guest sees them as broken; detach them.
    pub failed_devices: u32,
}

/// A successful reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The command was carried out.
    Done { state: VmState },
    /// Console bytes from `cursor`; `next` is where to continue; `lost` counts bytes that fell
    /// out of the bounded ring before they were read.
    Console { data: Vec<u8>, next: u64, lost: u64 },
    /// Counters.
    Stats { state: VmState, stats: VmStats },
    /// A block or net device was attached or detached. On a running guest (hot-plug),
    /// `guest_acknowledged` says whether the guest's driver brought the device up (attach) or
    /// released it (detach) within the hypervisor's timeout; before boot it is always true for
    /// detach and false for attach (the guest has not run yet).
    Device {
        state: VmState,
        guest_acknowledged: bool,
    },
    /// A long command (an attach or detach) passed its checks and runs on; `op` (its
    /// request id) names it for [`Command::OpStatus`].
    Accepted { op: u64 },
    /// Where the long operation `op` stands.
    Op { op: u64, status: OpStatus },
    /// `LiveUpdate` done: the new process runs the guest; this one exits after replying.
    /// `pause_us` is the pause as the hypervisors measure it, from this process stopping the
    /// vCPUs to the new process starting them (CLOCK_MONOTONIC, one host).
    Updated { pause_us: u64 },
}

/// Where a long operation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpStatus {
    /// Still waiting for the guest.
    Pending,
    /// Finished; the same meaning as [`Reply::Device`]. Reported once, then forgotten.
    Done {
        state: VmState,
        guest_acknowledged: bool,
    },
    /// Finished, but the device's backend (its card) failed during it: it stopped answering
    /// within the hypervisor's bound ([`BackendFailure::Unresponsive`]) or its connection
    /// failed. The hypervisor treats that backend as dead. After a detach the card is out of
    /// the VM all the same; after an attach the card is plugged but unusable (detach it).
    /// Reported once, then forgotten.
    Failed {
        state: VmState,
        failure: BackendFailure,
    },
}

/// Why the hypervisor refused or failed a command. Stable, matchable codes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("malformed request: {0}")]
    Malformed(DecodeError),
    #[error("command not valid in state {0:?}")]
    WrongState(VmState),
    #[error("no device with that id")]
    NoSuchDevice,
    #[error("a device with that id already exists")]
    DeviceExists,
    #[error("no free device slot")]
    NoFreeSlot,
    #[error("attach-block and attach-net need exactly one fd; other commands none")]
    MissingFd,
    #[error("the vhost-user backend failed: {0:?}")]
    Backend(BackendFailure),
    #[error("the VM has no interrupt routes left for another device")]
    OutOfInterruptRoutes,
    #[error("an operation on that device is still in flight")]
    DeviceBusy,
    #[error("no long operation with that id is held")]
    NoSuchOp,
    #[error("an operation with that request id is still held")]
    OpIdInUse,
    #[error("too many long operations held")]
    TooManyOps,
    #[error("the hypervisor failed internally")]
    Internal,
    #[error(
        "the device with that id is of another kind (a disk for DetachNet, a NIC for DetachBlock)"
    )]
    WrongDeviceKind,
    #[error("live update failed, the guest runs on here: {0:?}")]
    LiveUpdate(LiveUpdateFailure),
}

/// Why a live update did not happen. In every case the old hypervisor keeps the guest (it
/// resumes it if it had paused it) and the new process never ran it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LiveUpdateFailure {
    /// The new process closed its end of the hand-over socket (it exited or was killed).
    PeerGone,
    /// The new process did not answer within the hypervisor's bound.
    PeerTimeout,
    /// The new process refused the machine state, for this reason.
    Refused(StateRefusal),
    /// The hand-over socket carried bytes that are not the hand-over protocol.
    Protocol,
    /// This hypervisor could not read the machine state from KVM.
    Capture,
    /// A device that cannot be handed over is attached (a vhost-user card: not yet).
    UnsupportedDevice,
    /// A hot-plug operation is in flight: wait for it to finish.
    OperationInFlight,
    /// The hand-over socket was not made by this hypervisor's parent (the launcher that
    /// started it and runs only the measured binaries): nothing was sent on it, guest memory
    /// least of all.
    NotFromParent,
}

/// Why a new hypervisor refused the machine state it was handed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateRefusal {
    /// The state blob ends before its header or body does.
    Truncated,
    /// The blob's magic, length or digest is wrong (bytes changed on the way).
    Corrupted,
    /// The blob is of a state format version this hypervisor cannot read.
    UnknownVersion,
    /// The digest matched but the body does not parse (a bug in the sender).
    Malformed,
    /// The state does not fit the VM described at the start of the hand-over.
    Mismatch,
    /// KVM refused restoring the state.
    Restore,
    /// Building the VM around the guest memory failed.
    Build,
}

/// Coarse vhost-user failure kinds (no free text crosses the channel). `FeatureMismatch` also
/// covers a backend that lacks a feature the device requires (a net card without
/// `VIRTIO_NET_F_MAC` or the CONFIG protocol feature); `Config` covers a configuration that
/// could not be read or is invalid (e.g. a multicast MAC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendFailure {
    Handshake,
    FeatureMismatch,
    MemoryTable,
    Vring,
    Config,
    /// The backend did not answer (or read) a request within the hypervisor's bound; the
    /// hypervisor shut its connection down and will not use it again.
    Unresponsive,
    /// A replacement card (`ReconnectNet`) shows another MAC or MTU than the one the guest
    /// sees.
    IdentityMismatch,
}

/// A request envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u16,
    pub id: u64,
    pub command: Command,
}

/// A response envelope; `id` echoes the request's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub version: u16,
    pub id: u64,
    pub result: Result<Reply, CommandError>,
}

/// Why a frame was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum DecodeError {
    #[error("frame header has {got} bytes, want 4")]
    ShortHeader { got: usize },
    #[error("frame body of {len} bytes exceeds the {max}-byte limit")]
    Oversized { len: u32, max: u32 },
    #[error("frame is truncated: header says {want} bytes, got {got}")]
    Truncated { want: u32, got: usize },
    #[error("body is not a valid message")]
    Body,
    #[error("{extra} trailing bytes after the message")]
    Trailing { extra: usize },
    #[error("protocol version {got} is not {want}")]
    Version { got: u16, want: u16 },
    #[error("device id must be 1-32 bytes of [a-z0-9-]")]
    BadDeviceId,
    #[error("console read of {max} bytes exceeds {limit}")]
    ConsoleTooLarge { max: u32, limit: u32 },
    #[error("a long operation needs a non-zero request id")]
    ZeroOpId,
}

/// Reads the body length from a 4-byte header, refusing oversized frames before any buffering.
pub fn body_len(header: &[u8]) -> Result<usize, DecodeError> {
    let h: [u8; HEADER_LEN] = header
        .get(..HEADER_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(DecodeError::ShortHeader { got: header.len() })?;
    let len = u32::from_le_bytes(h);
    if len > MAX_FRAME {
        return Err(DecodeError::Oversized {
            len,
            max: MAX_FRAME,
        });
    }
    usize::try_from(len).map_err(|_| DecodeError::Oversized {
        len,
        max: MAX_FRAME,
    })
}

fn decode_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, DecodeError> {
    let (msg, rest) = postcard::take_from_bytes::<T>(body).map_err(|_| DecodeError::Body)?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing { extra: rest.len() });
    }
    Ok(msg)
}

fn split_frame(frame: &[u8]) -> Result<&[u8], DecodeError> {
    let len = body_len(frame)?;
    let body = &frame[HEADER_LEN.min(frame.len())..];
    if body.len() != len {
        return Err(DecodeError::Truncated {
            want: u32::try_from(len).unwrap_or(u32::MAX),
            got: body.len(),
        });
    }
    Ok(body)
}

impl Request {
    /// The one parser for what crosses into the hypervisor: a whole frame (header + body) in,
    /// a checked request out.
    pub fn parse_frame(frame: &[u8]) -> Result<Request, DecodeError> {
        Request::parse_body(split_frame(frame)?)
    }

    /// Parses a body whose length was already checked with [`body_len`].
    pub fn parse_body(body: &[u8]) -> Result<Request, DecodeError> {
        let req: Request = decode_body(body)?;
        if req.version != VERSION {
            return Err(DecodeError::Version {
                got: req.version,
                want: VERSION,
            });
        }
        if let Command::ReadConsole { max, .. } = req.command {
            if max > MAX_CONSOLE_CHUNK {
                return Err(DecodeError::ConsoleTooLarge {
                    max,
                    limit: MAX_CONSOLE_CHUNK,
                });
            }
        }
        let op_zero = matches!(req.command, Command::OpStatus { op: 0 });
        if op_zero || (req.command.is_long() && req.id == 0) {
            return Err(DecodeError::ZeroOpId);
        }
        Ok(req)
    }

    /// Encodes a request as a frame.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
}

impl Response {
    /// Parses a response frame (used by the controller side).
    pub fn parse_frame(frame: &[u8]) -> Result<Response, DecodeError> {
        Response::parse_body(split_frame(frame)?)
    }

    /// Parses a response body whose length was already checked.
    pub fn parse_body(body: &[u8]) -> Result<Response, DecodeError> {
        let resp: Response = decode_body(body)?;
        if resp.version != VERSION {
            return Err(DecodeError::Version {
                got: resp.version,
                want: VERSION,
            });
        }
        Ok(resp)
    }

    /// Encodes a response as a frame.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
}

/// The hypervisor's table of long operations: which request ids are held, which device each
/// names, and each one's outcome once known. Bounded by [`MAX_OPS`]; every refusal is a
/// [`CommandError`] the caller sends back unchanged.
#[derive(Debug)]
pub struct OpTable<W> {
    ops: Vec<HeldOp<W>>,
}

#[derive(Debug)]
struct HeldOp<W> {
    op: u64,
    device: DeviceId,
    /// What the hypervisor is waiting for (`None` once done).
    wait: Option<W>,
    /// The outcome, once known (never [`OpStatus::Pending`]).
    done: Option<OpStatus>,
}

impl<W> Default for OpTable<W> {
    fn default() -> Self {
        OpTable { ops: Vec::new() }
    }
}

impl<W> OpTable<W> {
    /// Whether a new long operation `op` on `device` may start: refuses a reused id, a device
    /// with an operation in flight, and a full table. Call before doing any of the work.
    pub fn admit(&self, op: u64, device: &DeviceId) -> Result<(), CommandError> {
        if op == 0 {
            return Err(CommandError::Malformed(DecodeError::ZeroOpId));
        }
        if self.ops.iter().any(|o| o.op == op) {
            return Err(CommandError::OpIdInUse);
        }
        if self
            .ops
            .iter()
            .any(|o| o.wait.is_some() && &o.device == device)
        {
            return Err(CommandError::DeviceBusy);
        }
        if self.ops.len() >= MAX_OPS {
            return Err(CommandError::TooManyOps);
        }
        Ok(())
    }

    /// Whether an operation on `device` is still waiting.
    pub fn busy(&self, device: &DeviceId) -> bool {
        self.ops
            .iter()
            .any(|o| o.wait.is_some() && &o.device == device)
    }

    /// Records an admitted operation: still waiting on `wait`, or already finished with the
    /// given outcome.
    pub fn insert(&mut self, op: u64, device: DeviceId, outcome: Result<OpStatus, W>) {
        let (wait, done) = match outcome {
            Ok(d) => (None, Some(d)),
            Err(w) => (Some(w), None),
        };
        self.ops.push(HeldOp {
            op,
            device,
            wait,
            done,
        });
    }

    /// Whether any operation is still waiting.
    pub fn any_pending(&self) -> bool {
        self.ops.iter().any(|o| o.wait.is_some())
    }

    /// Lets `step` advance every waiting operation; `Some(outcome)` finishes it.
    pub fn advance(&mut self, mut step: impl FnMut(&DeviceId, &mut W) -> Option<OpStatus>) {
        for o in &mut self.ops {
            let Some(w) = o.wait.as_mut() else { continue };
            if let Some(d) = step(&o.device, w) {
                o.wait = None;
                o.done = Some(d);
            }
        }
    }

    /// The answer to `OpStatus { op }`: pending, or done (and then forgotten), or unknown.
    pub fn status(&mut self, op: u64) -> Result<OpStatus, CommandError> {
        let i = self
            .ops
            .iter()
            .position(|o| o.op == op)
            .ok_or(CommandError::NoSuchOp)?;
        match self.ops.get(i).and_then(|o| o.done) {
            None | Some(OpStatus::Pending) => Ok(OpStatus::Pending),
            Some(done) => {
                self.ops.remove(i);
                Ok(done)
            }
        }
    }
}

fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing our own well-formed types into a Vec cannot fail.
    let body = postcard::to_stdvec(msg).unwrap_or_default();
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(command: Command) -> Request {
        Request {
            version: VERSION,
            id: 7,
            command,
        }
    }

    /// Vectors shared with the fuzz target's seed corpus.
    pub fn vectors() -> Vec<Request> {
        vec![
            req(Command::Start),
            req(Command::Pause),
            req(Command::Resume),
            req(Command::Shutdown),
            req(Command::AttachBlock {
                id: DeviceId::new("vol-1").expect("valid id"),
                read_only: true,
            }),
            req(Command::DetachBlock {
                id: DeviceId::new("vol-1").expect("valid id"),
            }),
            req(Command::ReadConsole {
                cursor: 99,
                max: 4096,
            }),
            req(Command::Stats),
            req(Command::OpStatus { op: 7 }),
            req(Command::AttachNet {
                id: DeviceId::new("eni-1").expect("valid id"),
            }),
            req(Command::DetachNet {
                id: DeviceId::new("eni-1").expect("valid id"),
            }),
            req(Command::ReconnectNet {
                id: DeviceId::new("eni-1").expect("valid id"),
            }),
            req(Command::LiveUpdate),
        ]
    }

    #[test]
    fn round_trip_every_command() {
        for r in vectors() {
            let frame = r.encode();
            assert_eq!(Request::parse_frame(&frame), Ok(r));
        }
    }

    /// The fuzz target's seeds are frames of this version: a version bump that forgets to
    /// re-seed would leave the fuzzer starting from frames refused at the version check.
    #[test]
    fn fuzz_seeds_parse() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/seeds/channel_decode"
        );
        let Ok(entries) = std::fs::read_dir(dir) else {
            return; // not in a full checkout
        };
        let mut n = 0;
        for e in entries.flatten() {
            let frame = std::fs::read(e.path()).expect("read seed");
            let r = Request::parse_frame(&frame);
            assert!(r.is_ok(), "{}: {r:?}", e.path().display());
            n += 1;
        }
        assert!(n >= vectors().len(), "{n} seeds");
    }

    #[test]
    fn truncated_frames_are_refused() {
        let frame = req(Command::Stats).encode();
        for cut in 0..frame.len() {
            assert!(Request::parse_frame(&frame[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn oversized_header_is_refused_before_buffering() {
        let mut frame = (MAX_FRAME + 1).to_le_bytes().to_vec();
        frame.push(0);
        assert_eq!(
            Request::parse_frame(&frame),
            Err(DecodeError::Oversized {
                len: MAX_FRAME + 1,
                max: MAX_FRAME
            })
        );
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut r = req(Command::Start);
        for old in [1, VERSION + 1] {
            r.version = old;
            assert_eq!(
                Request::parse_frame(&r.encode()),
                Err(DecodeError::Version {
                    got: old,
                    want: VERSION
                })
            );
        }
    }

    #[test]
    fn unknown_command_tag_is_refused() {
        // version=1, id=0, enum tag 200 (varint: 0xc8 0x01)
        let body = [1u8, 0, 0xc8, 0x01];
        let mut frame = u32::try_from(body.len())
            .expect("small")
            .to_le_bytes()
            .to_vec();
        frame.extend_from_slice(&body);
        assert_eq!(Request::parse_frame(&frame), Err(DecodeError::Body));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let r = req(Command::Start);
        let mut body = postcard::to_stdvec(&r).expect("encode");
        body.push(0);
        assert_eq!(
            Request::parse_body(&body),
            Err(DecodeError::Trailing { extra: 1 })
        );
    }

    #[test]
    fn bad_device_ids_are_refused() {
        for bad in ["", "UPPER", "has space", "../etc", &"x".repeat(33)] {
            let body = {
                let mut v = postcard::to_stdvec(&(VERSION, 1u64)).expect("encode");
                v.push(4); // AttachBlock tag
                v.extend(postcard::to_stdvec(bad).expect("encode"));
                v.push(0);
                v
            };
            assert!(Request::parse_body(&body).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn net_commands_carry_an_fd_are_long_and_name_a_checked_device() {
        let id = DeviceId::new("eni-1").expect("valid id");
        let attach = Command::AttachNet { id: id.clone() };
        let detach = Command::DetachNet { id: id.clone() };
        assert!(attach.wants_fd() && !detach.wants_fd());
        assert!(attach.is_long() && detach.is_long());
        assert_eq!(attach.device(), Some(&id));
        assert_eq!(detach.device(), Some(&id));
        for c in [attach, detach] {
            let r = Request {
                version: VERSION,
                id: 0,
                command: c,
            };
            assert_eq!(
                Request::parse_frame(&r.encode()),
                Err(DecodeError::ZeroOpId),
                "a long command needs a non-zero id"
            );
        }
        // AttachNet (tag 9) and DetachNet (tag 10) with ids outside [a-z0-9-]{1,32}.
        for tag in [9u8, 10] {
            for bad in ["", "ETH0", "eth 0", "../x", &"n".repeat(33)] {
                let mut body = postcard::to_stdvec(&(VERSION, 1u64)).expect("encode");
                body.push(tag);
                body.extend(postcard::to_stdvec(bad).expect("encode"));
                assert_eq!(
                    Request::parse_body(&body),
                    Err(DecodeError::Body),
                    "tag {tag} id {bad:?}"
                );
            }
        }
    }

    #[test]
    fn replace_block_carries_an_fd_is_short_and_is_the_last_tag() {
        let id = DeviceId::new("vol-1").expect("valid id");
        let c = Command::ReplaceBlock { id: id.clone() };
        assert!(c.wants_fd() && !c.is_long());
        assert_eq!(c.device(), Some(&id));
        // Added at the end: ReplaceBlock is tag 13 (after LiveUpdate, 12).
        let body = postcard::to_stdvec(&req(c.clone())).expect("encode");
        let head = postcard::to_stdvec(&(VERSION, 7u64)).expect("encode");
        assert_eq!(body.get(head.len()), Some(&13u8));
        assert_eq!(Request::parse_body(&body).map(|r| r.command), Ok(c));
        // Its id is checked like every other.
        let mut bad = head.clone();
        bad.push(13);
        bad.extend(postcard::to_stdvec("VOL 1").expect("encode"));
        assert_eq!(Request::parse_body(&bad), Err(DecodeError::Body));
    }

    #[test]
    fn reconnect_net_carries_an_fd_is_short_and_names_a_checked_device() {
        let id = DeviceId::new("eni-1").expect("valid id");
        let c = Command::ReconnectNet { id: id.clone() };
        assert!(c.wants_fd() && !c.is_long());
        assert_eq!(c.device(), Some(&id));
        // The tags of the commands before it did not move: ReconnectNet is tag 11.
        let r = req(c);
        let body = postcard::to_stdvec(&r).expect("encode");
        let head = postcard::to_stdvec(&(VERSION, 7u64)).expect("encode");
        assert_eq!(body.get(head.len()), Some(&11u8));
        // A short command: id 0 is fine.
        let zero = Request {
            version: VERSION,
            id: 0,
            command: r.command.clone(),
        };
        assert!(Request::parse_frame(&zero.encode()).is_ok());
        for bad in ["", "ETH0", "eth 0", "../x", &"n".repeat(33)] {
            let mut body = head.clone();
            body.push(11);
            body.extend(postcard::to_stdvec(bad).expect("encode"));
            assert_eq!(
                Request::parse_body(&body),
                Err(DecodeError::Body),
                "{bad:?}"
            );
        }
        let good = r.encode();
        for cut in 0..good.len() {
            assert!(Request::parse_frame(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = good;
        long.push(0);
        assert!(Request::parse_frame(&long).is_err());
        // Its refusals round-trip.
        for f in [
            BackendFailure::IdentityMismatch,
            BackendFailure::FeatureMismatch,
        ] {
            let resp = Response {
                version: VERSION,
                id: 7,
                result: Err(CommandError::Backend(f)),
            };
            assert_eq!(Response::parse_frame(&resp.encode()), Ok(resp));
        }
    }

    #[test]
    fn console_read_is_bounded() {
        let r = req(Command::ReadConsole {
            cursor: 0,
            max: MAX_CONSOLE_CHUNK + 1,
        });
        assert!(matches!(
            Request::parse_frame(&r.encode()),
            Err(DecodeError::ConsoleTooLarge { .. })
        ));
    }

    #[test]
    fn responses_round_trip() {
        let r = Response {
            version: VERSION,
            id: 3,
            result: Err(CommandError::Malformed(DecodeError::Body)),
        };
        assert_eq!(Response::parse_frame(&r.encode()), Ok(r));
        for result in [
            Ok(Reply::Updated { pause_us: 612 }),
            Err(CommandError::LiveUpdate(LiveUpdateFailure::Refused(
                StateRefusal::UnknownVersion,
            ))),
            Err(CommandError::LiveUpdate(LiveUpdateFailure::PeerGone)),
        ] {
            let r = Response {
                version: VERSION,
                id: 4,
                result,
            };
            assert_eq!(Response::parse_frame(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn live_update_carries_an_fd_and_is_short() {
        let c = Command::LiveUpdate;
        assert!(c.wants_fd() && !c.is_long() && c.device().is_none());
        let r = Request {
            version: VERSION,
            id: 0,
            command: c,
        };
        assert_eq!(Request::parse_frame(&r.encode()), Ok(r));
    }

    #[test]
    fn long_operation_frames_round_trip() {
        let results = [
            Ok(Reply::Accepted { op: 9 }),
            Ok(Reply::Op {
                op: 9,
                status: OpStatus::Pending,
            }),
            Ok(Reply::Op {
                op: 9,
                status: OpStatus::Done {
                    state: VmState::Running,
                    guest_acknowledged: true,
                },
            }),
            Err(CommandError::NoSuchOp),
            Err(CommandError::OpIdInUse),
            Err(CommandError::DeviceBusy),
            Err(CommandError::TooManyOps),
            Err(CommandError::OutOfInterruptRoutes),
            Err(CommandError::Backend(BackendFailure::FeatureMismatch)),
            Err(CommandError::WrongDeviceKind),
            Ok(Reply::Stats {
                state: VmState::Running,
                stats: VmStats {
                    block_devices: 1,
                    net_devices: 2,
                    ..Default::default()
                },
            }),
        ];
        for result in results {
            let r = Response {
                version: VERSION,
                id: 9,
                result,
            };
            assert_eq!(Response::parse_frame(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn long_operations_need_a_nonzero_id() {
        let mut r = req(Command::OpStatus { op: 0 });
        assert_eq!(
            Request::parse_frame(&r.encode()),
            Err(DecodeError::ZeroOpId)
        );
        r.command = Command::DetachBlock {
            id: DeviceId::new("vol-1").expect("valid id"),
        };
        r.id = 0;
        assert_eq!(
            Request::parse_frame(&r.encode()),
            Err(DecodeError::ZeroOpId)
        );
        // Short commands keep working with id 0.
        r.command = Command::Stats;
        assert!(Request::parse_frame(&r.encode()).is_ok());
    }

    #[test]
    fn op_status_frames_with_bad_bodies_are_refused() {
        let good = req(Command::OpStatus { op: 300 }).encode();
        for cut in 0..good.len() {
            assert!(Request::parse_frame(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(Request::parse_frame(&long).is_err());
        // An op id that is not a valid varint (11 continuation bytes).
        let mut body = postcard::to_stdvec(&(VERSION, 1u64)).expect("encode");
        body.push(8); // OpStatus tag
        body.extend_from_slice(&[0xff; 11]);
        assert_eq!(Request::parse_body(&body), Err(DecodeError::Body));
    }

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).expect("valid id")
    }

    #[test]
    fn op_table_refuses_unknown_reused_busy_and_excess_ids() {
        let mut t: OpTable<u32> = OpTable::default();
        assert_eq!(t.status(5), Err(CommandError::NoSuchOp));
        t.admit(5, &dev("a")).expect("admit");
        t.insert(5, dev("a"), Err(0));
        assert!(t.any_pending() && t.busy(&dev("a")));
        assert_eq!(t.admit(5, &dev("b")), Err(CommandError::OpIdInUse));
        assert_eq!(t.admit(6, &dev("a")), Err(CommandError::DeviceBusy));
        assert_eq!(
            t.admit(0, &dev("b")),
            Err(CommandError::Malformed(DecodeError::ZeroOpId))
        );
        assert_eq!(t.status(5), Ok(OpStatus::Pending));
        // The waiter finishes after three steps.
        for _ in 0..3 {
            t.advance(|_, w| {
                *w += 1;
                (*w == 3).then_some(OpStatus::Done {
                    state: VmState::Running,
                    guest_acknowledged: true,
                })
            });
        }
        assert!(!t.any_pending());
        // A finished device is free again even before its outcome is collected.
        t.admit(6, &dev("a")).expect("device free");
        assert_eq!(
            t.status(5),
            Ok(OpStatus::Done {
                state: VmState::Running,
                guest_acknowledged: true
            })
        );
        assert_eq!(t.status(5), Err(CommandError::NoSuchOp), "reported once");
        for op in 1..=u64::try_from(MAX_OPS).expect("small") {
            t.admit(op, &dev("x")).expect("room");
            let outcome = if op == 2 {
                OpStatus::Failed {
                    state: VmState::Running,
                    failure: BackendFailure::Unresponsive,
                }
            } else {
                OpStatus::Done {
                    state: VmState::Created,
                    guest_acknowledged: false,
                }
            };
            t.insert(op, dev("x"), Ok(outcome));
        }
        assert_eq!(t.admit(99, &dev("y")), Err(CommandError::TooManyOps));
        assert_eq!(
            t.status(1),
            Ok(OpStatus::Done {
                state: VmState::Created,
                guest_acknowledged: false
            })
        );
        t.admit(99, &dev("y")).expect("room after collecting one");
        assert_eq!(
            t.status(2),
            Ok(OpStatus::Failed {
                state: VmState::Running,
                failure: BackendFailure::Unresponsive
            }),
            "a failed operation is reported like a finished one"
        );
        assert_eq!(t.status(2), Err(CommandError::NoSuchOp));
    }
}
