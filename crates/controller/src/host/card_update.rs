//! Card update of one attached volume (DeployRelease with a block card): the steps, and the
//! undo of each failure. See [`HostBackend::update_card_vm`].
//!
//! The old card is told `HandOver` and, once it answered `HandedOver`, erases its key and exits
//! at its frontend's next disconnect. So every failure after that point must tell it
//! `CancelHandOver` (it then keeps its key and serves on), and the new card, which may hold the
//! key, is told `Detach` (it wipes its key pages) before it is reaped. A `ReplaceBlock` whose
//! answer was lost (not a typed refusal) may have moved the disk: it is settled as adoption
//! settles an update a dead controller left ([`HostBackend::settle_card_update`]).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bulkhead_card_proto::{self as proto, ControlRequest, ControlResponse, ErrorCode};
use bulkhead_hypervisor_client::{ClientError, Command, DeviceId, Reply};

use super::{
    channel_err, fault, launcher_err, BackendError, Fault, HostBackend, HostInstance, LaunchReply,
    LaunchRequest, CARD_TIMEOUT, EXIT_GRACE_MS,
};

/// Bound on a best-effort request to a card that is being undone (`CancelHandOver`, `Detach`).
const UNDO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a settle waits for the old card to leave on its own once the hypervisor answered
/// again (it exits within milliseconds of losing its frontend after a hand-over).
const SETTLE_WAIT: Duration = Duration::from_secs(5);

/// What the old card answered to `CancelHandOver`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cancelled {
    /// It keeps its key and serves on.
    Yes,
    /// It had no hand-over pending (it never handed over, or was cancelled before).
    NonePending,
    /// Its frontend already left after the hand-over: it is exiting (the hypervisor had moved
    /// the disk away from it).
    FrontendGone,
    /// No answer, or another one.
    Unknown,
}

/// Which card a settled update left on the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Winner {
    Old,
    New,
}

/// What a `ReplaceBlock` answer says about where the disk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReplaceOutcome {
    /// Done: the new card has it.
    Moved,
    /// A typed refusal: nothing changed, the old card has it.
    Refused,
    /// No answer (timeout, closed channel, a garbled or foreign reply): either card may.
    Unknown,
}

/// Classifies a `ReplaceBlock` answer. Only a typed refusal means "not moved".
pub(super) fn replace_outcome(r: &Result<Reply, ClientError>) -> ReplaceOutcome {
    match r {
        Ok(Reply::Done { .. }) => ReplaceOutcome::Moved,
        Err(ClientError::Refused(_)) => ReplaceOutcome::Refused,
        Ok(_) | Err(_) => ReplaceOutcome::Unknown,
    }
}

/// One look at the two cards while settling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SettleStep {
    Decided(Winner),
    Wait,
    /// Both still run after the wait: the old card's answer to `CancelHandOver` decides.
    AskOldCard,
}

fn settle_step(old_running: bool, new_running: bool, waited_out: bool) -> SettleStep {
    match (old_running, new_running) {
        // The old card left on its own: the hypervisor moved away from it.
        (false, true) => SettleStep::Decided(Winner::New),
        // The new card is gone: it cannot have the disk.
        (_, false) => SettleStep::Decided(Winner::Old),
        (true, true) if waited_out => SettleStep::AskOldCard,
        (true, true) => SettleStep::Wait,
    }
}

/// The winner once the old card answered `CancelHandOver`: only `FrontendGone` (it lost its
/// frontend to the move and is exiting) gives the disk to the new card. No answer: the old
/// card is kept, as before the cancel existed.
fn winner_after_cancel(c: Cancelled) -> Winner {
    match c {
        Cancelled::FrontendGone => Winner::New,
        Cancelled::Yes | Cancelled::NonePending | Cancelled::Unknown => Winner::Old,
    }
}

impl HostBackend {
    /// `CancelHandOver` to an old card (bounded, best effort), on its control connection.
    pub(super) fn cancel_hand_over(control: &mut UnixStream, pid: u32) -> Cancelled {
        let _ = control.set_read_timeout(Some(UNDO_TIMEOUT));
        let r = proto::call(control, &ControlRequest::CancelHandOver);
        let _ = control.set_read_timeout(Some(CARD_TIMEOUT));
        let out = match r {
            Ok(ControlResponse::HandOverCancelled) => Cancelled::Yes,
            Ok(ControlResponse::Error {
                code: ErrorCode::NoHandOver,
                ..
            }) => Cancelled::NonePending,
            Ok(ControlResponse::Error {
                code: ErrorCode::FrontendGone,
                ..
            }) => Cancelled::FrontendGone,
            other => {
                tracing::warn!(pid, reply = ?other.map_err(|e| e.to_string()), "card update: CancelHandOver not answered");
                Cancelled::Unknown
            }
        };
        tracing::info!(pid, outcome = ?out, "card update: hand-over cancelled on the old card");
        out
    }

    /// Ends a new card of a failed update: `Detach` first (bounded; a card that took the key
    /// wipes its key pages and exits), then reaped (killed if it did not exit).
    pub(super) fn retire_new_card(&self, pid: u32, control: Option<&mut UnixStream>) {
        let mut detached = false;
        if let Some(c) = control {
            let _ = c.set_read_timeout(Some(UNDO_TIMEOUT));
            let _ = c.set_write_timeout(Some(UNDO_TIMEOUT));
            match proto::call(c, &ControlRequest::Detach) {
                Ok(ControlResponse::Detached) => detached = true,
                Ok(other) => {
                    tracing::info!(pid, reply = ?other, "new card: Detach refused (no key)")
                }
                Err(e) => tracing::warn!(pid, error = %e, "new card: Detach failed"),
            }
        }
        let grace_ms = if detached { EXIT_GRACE_MS } else { 0 };
        if let Err(e) = self.launcher.call(&LaunchRequest::Reap { pid, grace_ms }) {
            tracing::warn!(pid, error = %e, "reaping the new card failed");
        }
    }

    fn card_running(&self, pid: u32) -> bool {
        self.launcher
            .children()
            .map(|c| c.iter().any(|k| k.pid == pid && k.running))
            .unwrap_or(false)
    }

    /// A card update whose outcome is unknown — a `ReplaceBlock` answered by neither success
    /// nor a typed refusal, or one a dead controller left recorded: which card has the disk?
    /// The hypervisor serves its channel one command at a time, so once it answered anything
    /// after the `ReplaceBlock` (the caller's `Stats`), the move is over and, if it happened,
    /// the old card's connection is closed; the old card then exits on its own (its hand-over
    /// mark). So: wait (bounded) for the old card to leave — it did: the new card has the
    /// disk; the new card is gone: the old one keeps it; both still there: `CancelHandOver` to
    /// the old card decides (accepted: the old card keeps the disk; `FrontendGone`: it is
    /// leaving, the new card has it). The loser is ended (the new card with `Detach` first).
    pub(super) fn settle_card_update(
        &self,
        old: u32,
        mut old_control: Option<&mut UnixStream>,
        new: u32,
        new_control: Option<&mut UnixStream>,
    ) -> Winner {
        let until = Instant::now() + SETTLE_WAIT;
        let winner = loop {
            let step = settle_step(
                self.card_running(old),
                self.card_running(new),
                Instant::now() >= until,
            );
            match step {
                SettleStep::Decided(w) => break w,
                SettleStep::Wait => std::thread::sleep(Duration::from_millis(50)),
                SettleStep::AskOldCard => {
                    let c = match old_control.as_deref_mut() {
                        Some(c) => Self::cancel_hand_over(c, old),
                        None => Cancelled::Unknown,
                    };
                    break winner_after_cancel(c);
                }
            }
        };
        match winner {
            Winner::New => {
                if let Err(e) = self.launcher.call(&LaunchRequest::Reap {
                    pid: old,
                    grace_ms: EXIT_GRACE_MS,
                }) {
                    tracing::warn!(pid = old, error = %e, "reaping the old card failed");
                }
            }
            Winner::Old => {
                // The new card died on its own: the old card may still carry the mark.
                if !self.card_running(new) {
                    if let Some(c) = old_control {
                        let _ = Self::cancel_hand_over(c, old);
                    }
                }
                self.retire_new_card(new, new_control);
            }
        }
        tracing::info!(old, new, ?winner, "card update settled");
        winner
    }

    /// The card update of one attached volume (see [`InstanceBackend::update_card`]): the
    /// launcher starts the new card like any card (so the keeper holds it); the new card gets
    /// `TakeOver` and the old one `HandOver`, each with one end of a socketpair made here, so
    /// the volume state and its key go from card to card and nowhere else; the hypervisor's
    /// `ReplaceBlock` moves the device's rings to the new card; the old card exits once its
    /// frontend left (reaped); the new pid is committed and recorded. A failure leaves the
    /// old card serving with its key (`CancelHandOver` once it handed over) and ends the new
    /// one (`Detach`, reap); a `ReplaceBlock` with no answer is settled.
    ///
    /// [`InstanceBackend::update_card`]: crate::backend::InstanceBackend::update_card
    pub(super) fn update_card_vm(
        &self,
        g: &mut HostInstance,
        volume: &str,
        to: Option<u64>,
    ) -> Result<crate::api::CardMoved, BackendError> {
        if g.vm.is_none() {
            return Err(BackendError::WrongState);
        }
        let (old_pid, device) = match g.volumes.get(volume) {
            Some(a) => (a.card_pid, a.device.clone()),
            None => return Err(BackendError::NoSuchVolume),
        };
        // Local volumes only: a network volume's NBD endpoint is not kept with its attachment.
        let backing = self.cfg.volume_dir.join(format!("{volume}.img"));
        if !backing.is_file() {
            tracing::warn!(
                volume,
                "card update: no local backing file (network volume?)"
            );
            return Err(BackendError::Unavailable);
        }
        let queues = u16::try_from(g.desc.vcpus).unwrap_or(1);
        let spawned = self.launcher.call_fd(&LaunchRequest::SpawnCard {
            backing: Some(backing),
            network: None,
            read_only: false,
            queues,
            run_as: self.cfg.run_as,
            release: to,
        });
        let (new_pid, mut new_control) = match spawned {
            Ok((LaunchReply::Spawned { pid }, fd)) => (pid, UnixStream::from(fd)),
            Ok(_) => return Err(BackendError::Unavailable),
            Err(e) => return Err(launcher_err("spawn card")(e)),
        };
        let _ = new_control.set_read_timeout(Some(CARD_TIMEOUT));
        let _ = new_control.set_write_timeout(Some(CARD_TIMEOUT));
        // Undo: the old card keeps serving (told `CancelHandOver` once `HandOver` went out),
        // the new one is ended (`Detach` first: it may hold the key).
        let fail = |g: &mut HostInstance, new_control: &mut UnixStream, why: &str, sent: bool| {
            tracing::warn!(
                volume,
                old_pid,
                new_pid,
                why,
                "card update failed; the old card keeps serving"
            );
            if sent {
                if let Some(att) = g.volumes.get_mut(volume) {
                    if Self::cancel_hand_over(&mut att.control, old_pid) == Cancelled::FrontendGone
                    {
                        tracing::error!(
                            volume,
                            old_pid,
                            "card update: the old card lost its frontend meanwhile and exits"
                        );
                    }
                }
            }
            self.retire_new_card(new_pid, Some(new_control));
            BackendError::Unavailable
        };
        let (ours, theirs) = match UnixStream::pair() {
            Ok(p) => p,
            Err(_) => return Err(fail(g, &mut new_control, "socketpair", false)),
        };
        let (take, hand) = match (
            proto::frame(&ControlRequest::TakeOver.encode()),
            proto::frame(&ControlRequest::HandOver.encode()),
        ) {
            (Ok(t), Ok(h)) => (t, h),
            _ => return Err(fail(g, &mut new_control, "frame", false)),
        };
        if crate::launcher::send_packet(new_control.as_raw_fd(), &take, Some(theirs.as_raw_fd()))
            .is_err()
        {
            return Err(fail(g, &mut new_control, "send TakeOver", false));
        }
        drop(theirs);
        let t_hand = Instant::now();
        let handed = {
            let Some(att) = g.volumes.get_mut(volume) else {
                return Err(fail(g, &mut new_control, "attachment gone", false));
            };
            // The old card bounds its wait for the new card's answer (30 s): wait a bit longer.
            let _ = att
                .control
                .set_read_timeout(Some(CARD_TIMEOUT + Duration::from_secs(15)));
            let r = crate::launcher::send_packet(
                att.control.as_raw_fd(),
                &hand,
                Some(ours.as_raw_fd()),
            )
            .map_err(|_| ())
            .and_then(|()| proto::read_frame(&mut att.control).map_err(|_| ()))
            .and_then(|f| f.ok_or(()))
            .and_then(|b| ControlResponse::parse(&b).map_err(|_| ()));
            let _ = att.control.set_read_timeout(Some(CARD_TIMEOUT));
            if r.is_err() {
                // The connection's state is unknown: a fresh one for the next request.
                if let Some(c) = self.card_control(old_pid, true) {
                    att.control = c;
                }
            }
            r
        };
        drop(ours);
        let handover_us = u64::try_from(t_hand.elapsed().as_micros()).unwrap_or(u64::MAX);
        match handed {
            Ok(ControlResponse::HandedOver) => {}
            // A typed refusal: nothing was handed over.
            Ok(ControlResponse::Error { .. }) => {
                tracing::warn!(reply = ?handed, "card update: the old card did not hand over");
                return Err(fail(g, &mut new_control, "HandOver", false));
            }
            // No answer: it may have handed over; the cancel is answered either way.
            other => {
                tracing::warn!(reply = ?other, "card update: the old card's answer is lost");
                return Err(fail(g, &mut new_control, "HandOver", true));
            }
        }
        match proto::read_frame(&mut new_control)
            .ok()
            .flatten()
            .and_then(|b| ControlResponse::parse(&b).ok())
        {
            Some(ControlResponse::Attached {
                encrypted: true, ..
            }) => {}
            other => {
                tracing::warn!(reply = ?other, "card update: the new card did not take over");
                return Err(fail(g, &mut new_control, "TakeOver", true));
            }
        }
        // The new card's vhost-user socket (it listens once keyed).
        let mut vhost = None;
        for _ in 0..50 {
            match self
                .launcher
                .call_fd(&LaunchRequest::ConnectVhost { pid: new_pid })
            {
                Ok((_, fd)) => {
                    vhost = Some(fd);
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let Some(vhost) = vhost else {
            return Err(fail(g, &mut new_control, "connect vhost", true));
        };
        // Before the move: the new card is committed (it outlives this controller) and the
        // update is in the record, so a controller that dies from here on is followed by one
        // that keeps whichever card then serves the volume.
        if let Some(att) = g.volumes.get_mut(volume) {
            att.updating = Some(new_pid);
        }
        if let Err(e) = self.persist(g, &[new_pid]) {
            if let Some(att) = g.volumes.get_mut(volume) {
                att.updating = None;
            }
            let _ = fail(g, &mut new_control, "record", true);
            return Err(e);
        }
        let target = match fault() {
            // Test hook: a `ReplaceBlock` the hypervisor refuses (typed), after the hand-over.
            Some(Fault::CardUpdateReplaceRefused) => {
                tracing::error!("fault hook: ReplaceBlock for a device that does not exist");
                DeviceId::new("fault-no-such-disk").unwrap_or_else(|_| device.clone())
            }
            _ => device.clone(),
        };
        if fault() == Some(Fault::CardUpdateAfterReplaceExit) {
            let r = g.vm.as_ref().map(|vm| {
                vm.chan.call(
                    Command::ReplaceBlock { id: target.clone() },
                    Some(vhost.as_raw_fd()),
                )
            });
            tracing::error!(ok = ?r.map(|r| r.is_ok()), "fault hook: exiting after ReplaceBlock, before its outcome is recorded");
            std::process::exit(70);
        }
        let Some(vm) = g.vm.as_ref() else {
            return Err(fail(g, &mut new_control, "no hypervisor", true));
        };
        let chan = vm.chan.clone();
        let t_replace = Instant::now();
        let r = chan.call(
            Command::ReplaceBlock { id: target },
            Some(vhost.as_raw_fd()),
        );
        let replace_us = u64::try_from(t_replace.elapsed().as_micros()).unwrap_or(u64::MAX);
        drop(vhost);
        // `Some(true)`: moved, the old card still to reap; `Some(false)`: moved by a settle that
        // reaped it; `None`: not moved.
        let moved = match replace_outcome(&r) {
            ReplaceOutcome::Moved => Some(true),
            ReplaceOutcome::Refused => {
                // Typed: the hypervisor kept the device on the old card.
                tracing::warn!(reply = ?r, "card update: ReplaceBlock refused");
                if let Some(att) = g.volumes.get_mut(volume) {
                    att.updating = None;
                }
                let _ = fail(g, &mut new_control, "ReplaceBlock refused", true);
                self.persist_noticed(g);
                return Err(match r {
                    Err(e) => channel_err("replace block")(e),
                    Ok(_) => BackendError::Unavailable,
                });
            }
            ReplaceOutcome::Unknown => {
                // Lost on the transport (or an answer that is no answer): the disk may have
                // moved. Once the hypervisor answers again the move is over either way.
                tracing::warn!(reply = ?r, "card update: ReplaceBlock outcome unknown; settling");
                let answers = chan.call(Command::Stats, None).is_ok();
                if !answers {
                    tracing::warn!(
                        "card update: the hypervisor does not answer; settling on the cards alone"
                    );
                }
                let Some(att) = g.volumes.get_mut(volume) else {
                    return Err(fail(g, &mut new_control, "attachment gone", false));
                };
                match self.settle_card_update(
                    old_pid,
                    Some(&mut att.control),
                    new_pid,
                    Some(&mut new_control),
                ) {
                    Winner::New => Some(false),
                    Winner::Old => None,
                }
            }
        };
        let Some(reap_old) = moved else {
            if let Some(att) = g.volumes.get_mut(volume) {
                att.updating = None;
            }
            self.persist_noticed(g);
            return Err(BackendError::Unavailable);
        };
        // The device runs on the new card: it is the volume's card from here on.
        if let Some(att) = g.volumes.get_mut(volume) {
            att.card_pid = new_pid;
            att.control = new_control;
            att.updating = None;
        }
        let persisted = self.persist(g, &[new_pid]);
        // The old card saw its frontend go and exits with its keys erased.
        if reap_old {
            if let Err(e) = self.launcher.call(&LaunchRequest::Reap {
                pid: old_pid,
                grace_ms: EXIT_GRACE_MS,
            }) {
                tracing::warn!(pid = old_pid, error = %e, "reaping the old card failed");
            }
        }
        persisted?;
        tracing::info!(instance = %g.desc.instance_id, volume, old_pid, new_pid, handover_us, replace_us, ?to, "block card updated");
        Ok(crate::api::CardMoved {
            instance_id: g.desc.instance_id.clone(),
            volume_id: volume.to_string(),
            old_pid,
            new_pid,
            handover_us,
            replace_us,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_hypervisor_client::{BackendFailure, CommandError, VmState, VmStats};

    #[test]
    fn only_a_typed_refusal_means_not_moved() {
        let done: Result<Reply, ClientError> = Ok(Reply::Done {
            state: VmState::Running,
        });
        assert_eq!(replace_outcome(&done), ReplaceOutcome::Moved);
        for refused in [
            CommandError::NoSuchDevice,
            CommandError::DeviceBusy,
            CommandError::Backend(BackendFailure::IdentityMismatch),
        ] {
            assert_eq!(
                replace_outcome(&Err(ClientError::Refused(refused))),
                ReplaceOutcome::Refused
            );
        }
        let timeout = std::io::Error::from(std::io::ErrorKind::WouldBlock);
        for unknown in [
            Err(ClientError::Io(timeout)),
            Err(ClientError::Closed),
            Err(ClientError::IdMismatch { got: 3, want: 4 }),
            Ok(Reply::Stats {
                state: VmState::Running,
                stats: VmStats::default(),
            }),
        ] {
            assert_eq!(
                replace_outcome(&unknown),
                ReplaceOutcome::Unknown,
                "{unknown:?}"
            );
        }
    }

    #[test]
    fn settle_decides_by_who_left_then_by_the_cancel() {
        // The old card left: the hypervisor had moved; the new card left: it cannot serve.
        for waited in [false, true] {
            assert_eq!(
                settle_step(false, true, waited),
                SettleStep::Decided(Winner::New)
            );
            assert_eq!(
                settle_step(true, false, waited),
                SettleStep::Decided(Winner::Old)
            );
            assert_eq!(
                settle_step(false, false, waited),
                SettleStep::Decided(Winner::Old)
            );
        }
        assert_eq!(settle_step(true, true, false), SettleStep::Wait);
        assert_eq!(settle_step(true, true, true), SettleStep::AskOldCard);
        assert_eq!(winner_after_cancel(Cancelled::FrontendGone), Winner::New);
        for c in [Cancelled::Yes, Cancelled::NonePending, Cancelled::Unknown] {
            assert_eq!(winner_after_cancel(c), Winner::Old, "{c:?}");
        }
    }
}
