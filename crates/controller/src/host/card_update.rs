//! Card update of one attached volume (DeployRelease with a block card): the steps, and the
//! undo of each failure. See [`HostBackend::update_card_vm`].
//!
//! The old card is told `HandOver` and, once it answered `HandedOver`, erases its key and exits
//! at its frontend's next disconnect. So every failure after that point must tell it
//! `CancelHandOver` (it then keeps its key and serves on), and the new card, which may hold the
//! key, is told `Detach` (it wipes its key pages) before it is reaped. A `ReplaceBlock` whose
//! answer was lost (not a typed refusal) may have moved the disk: it is settled as adoption
//! settles an update a dead controller left ([`HostBackend::settle_card_update`]). An old card
//! that answers the cancel with `FrontendGone` is leaving whatever the controller does: a new
//! card that took the volume over is then kept as the volume's card, not ended. The undo and
//! the settle are in `undo.rs`.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bulkhead_card_proto::{self as proto, ControlRequest, ControlResponse};
use bulkhead_hypervisor_client::{ClientError, Command, DeviceId, Reply};

use super::{
    channel_err, fault, launcher_err, BackendError, Fault, HostBackend, HostInstance, LaunchReply,
    LaunchRequest, CARD_TIMEOUT,
};

mod undo;

pub(super) use undo::Settled;
use undo::{keep_new_card, read_take_over, Cancelled, UNDO_TIMEOUT};

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

/// How far a failed card update got, for its undo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reached {
    /// `HandOver` was not sent: the old card knows of no update.
    BeforeHandOver,
    /// `HandOver` went out (answered or not). `took_over`: the new card's answer to `TakeOver`
    /// (`Some(true)`: `Attached`), `None` while nobody has read it.
    HandOver { took_over: Option<bool> },
}

/// The failure paths of [`HostBackend::update_card_vm`] share their undo.
struct Update<'a> {
    volume: &'a str,
    old_pid: u32,
    new_pid: u32,
}

impl HostBackend {
    /// Undoes a failed card update: the old card is told `CancelHandOver` once `HandOver` went
    /// out (it keeps its key and serves on; a card with none pending answers `NoHandOver`);
    /// the new card is detached and reaped — unless the old card answered `FrontendGone` (it
    /// is exiting, keys erased) and the new card took the volume over: then the new card is
    /// the only one that can serve, and becomes the volume's card
    /// ([`BackendError::CardUpdateOldCardGone`]).
    fn undo_card_update(
        &self,
        g: &mut HostInstance,
        u: &Update<'_>,
        new_control: &mut UnixStream,
        why: &str,
        reached: Reached,
    ) -> BackendError {
        let Update {
            volume,
            old_pid,
            new_pid,
        } = *u;
        tracing::warn!(
            volume,
            old_pid,
            new_pid,
            why,
            ?reached,
            "card update failed; the old card keeps serving"
        );
        let Reached::HandOver { took_over } = reached else {
            self.retire_new_card(new_pid, Some(new_control));
            return BackendError::Unavailable;
        };
        let cancelled = match g.volumes.get_mut(volume) {
            Some(att) => Self::cancel_hand_over(&mut att.control, old_pid),
            None => Cancelled::Unknown,
        };
        if cancelled != Cancelled::FrontendGone {
            self.retire_new_card(new_pid, Some(new_control));
            return BackendError::Unavailable;
        }
        // The old card lost its frontend meanwhile and exits with its keys erased.
        let took_over = match took_over {
            Some(t) => t,
            None => read_take_over(new_control, UNDO_TIMEOUT),
        };
        if keep_new_card(cancelled, took_over) {
            let control = new_control
                .try_clone()
                .ok()
                .or_else(|| self.card_control(new_pid, true));
            match (g.volumes.get_mut(volume), control) {
                (Some(att), Some(control)) => {
                    let _ = control.set_read_timeout(Some(CARD_TIMEOUT));
                    let _ = control.set_write_timeout(Some(CARD_TIMEOUT));
                    att.card_pid = new_pid;
                    att.control = control;
                    att.updating = None;
                    tracing::error!(
                        volume,
                        old_pid,
                        new_pid,
                        "card update: the old card is exiting; the new card (keyed) is kept \
                         as the volume's card"
                    );
                    self.persist_noticed_commit(g, new_pid);
                    self.reap_old_card(old_pid);
                    return BackendError::CardUpdateOldCardGone;
                }
                _ => tracing::error!(
                    volume,
                    new_pid,
                    "card update: the old card is exiting and the new card cannot be kept"
                ),
            }
        } else {
            tracing::error!(
                volume,
                old_pid,
                new_pid,
                "card update: the old card is exiting and the new card did not take over: \
                 the volume has no card"
            );
        }
        self.retire_new_card(new_pid, Some(new_control));
        BackendError::CardUpdateOldCardGone
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
        let u = Update {
            volume,
            old_pid,
            new_pid,
        };
        let before = Reached::BeforeHandOver;
        let unread = Reached::HandOver { took_over: None };
        let took_over = Reached::HandOver {
            took_over: Some(true),
        };
        let fail = |g: &mut HostInstance, c: &mut UnixStream, why: &str, r: Reached| {
            self.undo_card_update(g, &u, c, why, r)
        };
        let (ours, theirs) = match UnixStream::pair() {
            Ok(p) => p,
            Err(_) => return Err(fail(g, &mut new_control, "socketpair", before)),
        };
        let (take, hand) = match (
            proto::frame(&ControlRequest::TakeOver.encode()),
            proto::frame(&ControlRequest::HandOver.encode()),
        ) {
            (Ok(t), Ok(h)) => (t, h),
            _ => return Err(fail(g, &mut new_control, "frame", before)),
        };
        if crate::launcher::send_packet(new_control.as_raw_fd(), &take, Some(theirs.as_raw_fd()))
            .is_err()
        {
            return Err(fail(g, &mut new_control, "send TakeOver", before));
        }
        drop(theirs);
        let t_hand = Instant::now();
        let handed = {
            let Some(att) = g.volumes.get_mut(volume) else {
                return Err(fail(g, &mut new_control, "attachment gone", before));
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
            // A typed refusal: nothing was handed over (the cancel is answered `NoHandOver`) —
            // or `FrontendGone`: it handed over and its frontend left meanwhile (so is the
            // cancel, and the new card may be the only one left to serve).
            Ok(ControlResponse::Error { .. }) => {
                tracing::warn!(reply = ?handed, "card update: the old card did not hand over");
                return Err(fail(g, &mut new_control, "HandOver", unread));
            }
            // No answer: it may have handed over; the cancel is answered either way.
            other => {
                tracing::warn!(reply = ?other, "card update: the old card's answer is lost");
                return Err(fail(g, &mut new_control, "HandOver", unread));
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
                let r = Reached::HandOver {
                    took_over: other
                        .as_ref()
                        .map(|a| matches!(a, ControlResponse::Attached { .. })),
                };
                return Err(fail(g, &mut new_control, "TakeOver", r));
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
            return Err(fail(g, &mut new_control, "connect vhost", took_over));
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
            return Err(match fail(g, &mut new_control, "record", took_over) {
                gone @ BackendError::CardUpdateOldCardGone => gone,
                _ => e,
            });
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
            return Err(fail(g, &mut new_control, "no hypervisor", took_over));
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
                let undone = fail(g, &mut new_control, "ReplaceBlock refused", took_over);
                self.persist_noticed(g);
                return Err(match (undone, r) {
                    (gone @ BackendError::CardUpdateOldCardGone, _) => gone,
                    (_, Err(e)) => channel_err("replace block")(e),
                    (_, Ok(_)) => BackendError::Unavailable,
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
                    return Err(fail(g, &mut new_control, "attachment gone", before));
                };
                match self.settle_card_update(
                    old_pid,
                    Some(&mut att.control),
                    new_pid,
                    Some(&mut new_control),
                ) {
                    Settled::New => Some(false),
                    Settled::Old => None,
                    Settled::OldCardGone => {
                        // The new card is kept as the volume's card (it alone may serve).
                        if let Some(att) = g.volumes.get_mut(volume) {
                            att.card_pid = new_pid;
                            att.control = new_control;
                            att.updating = None;
                        }
                        self.persist_noticed_commit(g, new_pid);
                        return Err(BackendError::CardUpdateOldCardGone);
                    }
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
            self.reap_old_card(old_pid);
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
}
