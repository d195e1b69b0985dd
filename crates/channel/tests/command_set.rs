//! Claim 2 (no administrative API can access customer content), pinned at the hypervisor's
//! command channel: the complete command set and the complete reply set are listed here with
//! *exhaustive* matches (no wildcard arm). Adding a command or a reply variant does not compile
//! until it is reviewed and classified below, and nothing in the set may read guest memory or a
//! guest disk. The wire format is pinned too: no variant tag beyond the listed ones decodes.

use bulkhead_channel::{
    Command, DecodeError, DeviceId, OpStatus, Reply, Request, VmState, VERSION,
};

/// What a command touches. There is deliberately no "guest memory" or "guest disk" class: a
/// command that needed one could not be classified without adding it here, in review.
#[derive(Debug, PartialEq, Eq)]
enum Touches {
    /// Starts, pauses, resumes or ends the vCPUs; moves no data.
    Lifecycle,
    /// Hands the guest a vhost-user socket (served by the block card or the net card) or takes
    /// it away. The hypervisor passes the descriptor on; it never opens, reads or writes the
    /// disk, and never sees a packet.
    DevicePlumbing,
    /// The serial console's output ring (what the guest chose to print), for the customer plane
    /// only (the controller refuses it to operator tokens).
    ConsoleOutput,
    /// Counters (exit counts, sizes).
    Counters,
    /// Where an accepted long operation (a device attach or detach) stands: a state and a
    /// flag, keyed by the request id that started it.
    OperationStatus,
    /// Moves the VM to a new hypervisor process (live update): guest memory (the memfd) and the
    /// machine state go from one hypervisor to the other over the socket the command carries,
    /// never to the caller; the reply is a duration. The hypervisor sends nothing on that socket
    /// unless the hypervisor's own parent (the launcher, which starts only the measured binary)
    /// made it (`SO_PEERCRED`, `LiveUpdateFailure::NotFromParent`; attacked in
    /// `hypervisor/tests/live_update.rs`).
    HandOver,
}

fn classify(c: &Command) -> Touches {
    // No wildcard arm: a new variant breaks this build until it is classified here.
    match c {
        Command::Start | Command::Pause | Command::Resume | Command::Shutdown => Touches::Lifecycle,
        Command::AttachBlock {
            id: _,
            read_only: _,
        }
        | Command::DetachBlock { id: _ }
        | Command::AttachNet { id: _ }
        | Command::DetachNet { id: _ }
        // Hands a running NIC a restarted card's socket. To resume the rings where they
        // stand, the hypervisor reads each ring's used index (ring bookkeeping the guest's
        // driver keeps for the device, 2 bytes per ring), never a packet, and returns none.
        | Command::ReconnectNet { id: _ }
        // Card update: stops the old card's rings (their positions come back from the card,
        // 2 bytes each; the used index is read only to cross-check them) and hands the new
        // card the same rings. Never a block of the disk.
        | Command::ReplaceBlock { id: _ } => Touches::DevicePlumbing,
        Command::ReadConsole { cursor: _, max: _ } => Touches::ConsoleOutput,
        Command::Stats => Touches::Counters,
        Command::OpStatus { op: _ } => Touches::OperationStatus,
        Command::LiveUpdate => Touches::HandOver,
    }
}

/// The only bytes a reply can carry that came from the guest: console output.
fn guest_bytes(r: &Reply) -> Option<&[u8]> {
    match r {
        Reply::Done { state: _ } => None,
        Reply::Console {
            data,
            next: _,
            lost: _,
        } => Some(data),
        Reply::Stats { state: _, stats: _ } => None,
        Reply::Device {
            state: _,
            guest_acknowledged: _,
        } => None,
        Reply::Accepted { op: _ } => None,
        Reply::Op {
            op: _,
            status:
                OpStatus::Pending
                | OpStatus::Done {
                    state: _,
                    guest_acknowledged: _,
                }
                // A state and a failure code: nothing from the guest or the card's data.
                | OpStatus::Failed {
                    state: _,
                    failure: _,
                },
        } => None,
        Reply::Updated { pause_us: _ } => None,
    }
}

fn every_command() -> Vec<Command> {
    let id = DeviceId::new("vol-1").expect("id");
    vec![
        Command::Start,
        Command::Pause,
        Command::Resume,
        Command::Shutdown,
        Command::AttachBlock {
            id: id.clone(),
            read_only: false,
        },
        Command::DetachBlock { id },
        Command::ReadConsole { cursor: 0, max: 1 },
        Command::Stats,
        Command::OpStatus { op: 1 },
        Command::AttachNet {
            id: DeviceId::new("eni-1").expect("id"),
        },
        Command::DetachNet {
            id: DeviceId::new("eni-1").expect("id"),
        },
        Command::ReconnectNet {
            id: DeviceId::new("eni-1").expect("id"),
        },
        Command::LiveUpdate,
        Command::ReplaceBlock {
            id: DeviceId::new("vol-1").expect("id"),
        },
    ]
}

#[test]
fn command_set_is_pinned_and_reads_no_guest_memory_or_disk() {
    let all = every_command();
    // Exactly these fourteen, in this wire order (the postcard variant tag is the index).
    assert_eq!(all.len(), 14);
    let classes: Vec<Touches> = all.iter().map(classify).collect();
    assert_eq!(
        classes,
        vec![
            Touches::Lifecycle,
            Touches::Lifecycle,
            Touches::Lifecycle,
            Touches::Lifecycle,
            Touches::DevicePlumbing,
            Touches::DevicePlumbing,
            Touches::ConsoleOutput,
            Touches::Counters,
            Touches::OperationStatus,
            Touches::DevicePlumbing,
            Touches::DevicePlumbing,
            Touches::DevicePlumbing,
            Touches::HandOver,
            Touches::DevicePlumbing,
        ]
    );
    // Only AttachBlock, AttachNet, ReconnectNet, LiveUpdate and ReplaceBlock carry a
    // descriptor, a socket the hypervisor hands on (or, for LiveUpdate, hands its VM over on).
    let with_fd: Vec<bool> = all.iter().map(Command::wants_fd).collect();
    assert_eq!(
        with_fd,
        vec![
            false, false, false, false, true, false, false, false, false, true, false, true, true,
            true
        ]
    );
    for (tag, c) in all.iter().enumerate() {
        let req = Request {
            version: VERSION,
            id: 7,
            command: c.clone(),
        };
        let frame = req.encode();
        assert_eq!(Request::parse_frame(&frame).expect("roundtrip"), req);
        // version (one-byte varint) + id (varint 7) + the command's tag.
        let version = u8::try_from(VERSION).expect("one-byte version");
        assert_eq!(frame[4..7], [version, 7, u8::try_from(tag).expect("tag")]);
    }
}

/// No tag past the thirteen pinned commands decodes to anything: a command added to the enum but
/// hidden from this list would be caught here on the wire even if `classify` were bypassed.
#[test]
fn no_unlisted_command_tag_decodes() {
    let known = u8::try_from(every_command().len()).expect("count");
    for tag in known..=127u8 {
        let version = u8::try_from(VERSION).expect("one-byte version");
        let body = [version, 7, tag, 0, 0, 0, 0, 0, 0, 0, 0];
        for len in 3..=body.len() {
            assert_eq!(
                Request::parse_body(&body[..len]),
                Err(DecodeError::Body),
                "tag {tag} with {len} body bytes decoded"
            );
        }
    }
}

/// Replies: only `Console` carries bytes that came from the guest, and they are console output.
#[test]
fn only_console_replies_carry_guest_bytes() {
    let replies = [
        Reply::Done {
            state: VmState::Running,
        },
        Reply::Console {
            data: b"hi".to_vec(),
            next: 2,
            lost: 0,
        },
        Reply::Stats {
            state: VmState::Running,
            stats: Default::default(),
        },
        Reply::Device {
            state: VmState::Running,
            guest_acknowledged: true,
        },
        Reply::Accepted { op: 3 },
        Reply::Updated { pause_us: 1 },
        Reply::Op {
            op: 3,
            status: OpStatus::Done {
                state: VmState::Running,
                guest_acknowledged: true,
            },
        },
    ];
    let carrying: Vec<bool> = replies.iter().map(|r| guest_bytes(r).is_some()).collect();
    assert_eq!(
        carrying,
        vec![false, true, false, false, false, false, false]
    );
}
