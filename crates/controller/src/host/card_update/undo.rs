//! The undo side of a card update: `CancelHandOver` to the old card, `Detach` and reap of the
//! new one, and the settle of an update whose `ReplaceBlock` outcome is unknown (also run by
//! adoption for an update a dead controller left recorded).

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bulkhead_card_proto::{self as proto, ControlRequest, ControlResponse, ErrorCode};

use super::super::{HostBackend, LaunchRequest, CARD_TIMEOUT, EXIT_GRACE_MS};

/// Bound on a best-effort request to a card that is being undone (`CancelHandOver`, `Detach`).
pub(super) const UNDO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a settle waits for the old card to leave on its own once the hypervisor answered
/// again (it exits within milliseconds of losing its frontend after a hand-over).
const SETTLE_WAIT: Duration = Duration::from_secs(5);
/// Answers skipped on a new card's control connection before its answer to `Detach`: the
/// answer to `TakeOver`, when nobody read it yet.
const MAX_STALE_ANSWERS: usize = 2;

/// What the old card answered to `CancelHandOver`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::host) enum Cancelled {
    /// It keeps its key and serves on.
    Yes,
    /// It had no hand-over pending (it never handed over, or was cancelled before).
    NonePending,
    /// Its frontend already left after the hand-over: it is exiting (the hypervisor had moved
    /// the disk away from it, or closed its connection).
    FrontendGone,
    /// No answer, or another one.
    Unknown,
}

/// Which card a settle decided has the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::host) enum Winner {
    Old,
    New,
}

/// How a settled card update ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::host) enum Settled {
    /// The new card has the disk; the old one is reaped.
    New,
    /// The old card keeps the disk; the new one is detached and reaped.
    Old,
    /// The old card answered `FrontendGone` (it is exiting, keys erased) though the new card
    /// was not seen serving: the new card is kept as the volume's card (it alone may hold the
    /// key; if it is dead too, the volume has no card). Audited `card_update_old_card_gone`.
    OldCardGone,
}

/// What a new card of a failed update answered to `Detach`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DetachOutcome {
    /// `Detached`: it wiped its key pages and exits.
    Detached,
    /// `Error{NotAttached}`: it holds no volume and no key.
    Keyless,
    /// Its connection ended with no answer: it exited.
    Gone,
    /// No answer within the bound, or another answer.
    Unknown,
}

/// One look at the two cards while settling (`None`: the launcher could not say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SettleStep {
    Decided(Winner),
    Wait,
    /// Both (may) still run after the wait: the old card's answer to `CancelHandOver` decides.
    AskOldCard,
}

/// `old_running` / `new_running`: `None` when the launcher did not answer (never read as "not
/// running": one launcher error must not give the disk back to an old card the hypervisor
/// already left).
pub(super) fn settle_step(
    old_running: Option<bool>,
    new_running: Option<bool>,
    waited_out: bool,
) -> SettleStep {
    match (old_running, new_running) {
        // The new card is gone: it cannot have the disk.
        (_, Some(false)) => SettleStep::Decided(Winner::Old),
        // The old card left on its own: the hypervisor moved away from it; the new card is
        // the only one that can have the disk.
        (Some(false), _) => SettleStep::Decided(Winner::New),
        _ if waited_out => SettleStep::AskOldCard,
        _ => SettleStep::Wait,
    }
}

/// The winner once the old card answered `CancelHandOver`: only `FrontendGone` (it lost its
/// frontend to the move and is exiting) gives the disk to the new card. No answer: the old
/// card is kept, as before the cancel existed.
pub(super) fn winner_after_cancel(c: Cancelled) -> Winner {
    match c {
        Cancelled::FrontendGone => Winner::New,
        Cancelled::Yes | Cancelled::NonePending | Cancelled::Unknown => Winner::Old,
    }
}

/// A failed update whose old card answered the cancel with `FrontendGone` keeps the new card
/// when it took the volume over (answered `Attached`): it is then the only card that can serve.
pub(super) fn keep_new_card(c: Cancelled, took_over: bool) -> bool {
    c == Cancelled::FrontendGone && took_over
}

/// The grace a new card of a failed update gets before it is killed: none only when it is
/// known to hold no key (a keyed card must have the time to wipe it).
pub(super) fn reap_grace_ms(o: DetachOutcome) -> u64 {
    match o {
        DetachOutcome::Keyless => 0,
        DetachOutcome::Detached | DetachOutcome::Gone | DetachOutcome::Unknown => EXIT_GRACE_MS,
    }
}

/// Sends `Detach` and reads until its answer, within `bound` overall. An answer to `TakeOver`
/// nobody read yet (`Attached`, `Error{KeyRefused | BadRequest}`) comes first and is skipped.
pub(super) fn detach_card(c: &mut UnixStream, bound: Duration) -> DetachOutcome {
    let until = Instant::now() + bound;
    let _ = c.set_write_timeout(Some(bound));
    if let Err(e) = proto::write_frame(c, &ControlRequest::Detach.encode()) {
        tracing::warn!(error = %e, "new card: Detach not sent");
        return DetachOutcome::Unknown;
    }
    let mut skipped = 0usize;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return DetachOutcome::Unknown;
        }
        let _ = c.set_read_timeout(Some(left));
        let body = match proto::read_frame(c) {
            Ok(Some(b)) => b,
            Ok(None) => return DetachOutcome::Gone,
            Err(e) => {
                tracing::warn!(error = %e, "new card: no answer to Detach");
                return DetachOutcome::Unknown;
            }
        };
        match ControlResponse::parse(&body) {
            Ok(ControlResponse::Detached) => return DetachOutcome::Detached,
            Ok(ControlResponse::Error {
                code: ErrorCode::NotAttached,
                ..
            }) => return DetachOutcome::Keyless,
            Ok(
                stale @ (ControlResponse::Attached { .. }
                | ControlResponse::Error {
                    code: ErrorCode::KeyRefused | ErrorCode::BadRequest,
                    ..
                }),
            ) if skipped < MAX_STALE_ANSWERS => {
                tracing::info!(reply = ?stale, "new card: its answer to TakeOver, skipped");
                skipped += 1;
            }
            other => {
                tracing::warn!(reply = ?other, "new card: Detach answered otherwise");
                return DetachOutcome::Unknown;
            }
        }
    }
}

/// Reads a new card's answer to `TakeOver` (bounded): did it take the volume over?
pub(super) fn read_take_over(c: &mut UnixStream, bound: Duration) -> bool {
    let _ = c.set_read_timeout(Some(bound));
    let r = proto::read_frame(c)
        .ok()
        .flatten()
        .and_then(|b| ControlResponse::parse(&b).ok());
    let _ = c.set_read_timeout(Some(CARD_TIMEOUT));
    tracing::info!(reply = ?r, "card update: the new card's answer to TakeOver");
    matches!(r, Some(ControlResponse::Attached { .. }))
}

impl HostBackend {
    /// `CancelHandOver` to an old card (bounded, best effort), on its control connection.
    pub(in crate::host) fn cancel_hand_over(control: &mut UnixStream, pid: u32) -> Cancelled {
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
    /// wipes its key pages and exits), then reaped (killed if it did not exit within the
    /// grace; no grace only for a card known to hold no key).
    pub(in crate::host) fn retire_new_card(&self, pid: u32, control: Option<&mut UnixStream>) {
        let outcome = match control {
            Some(c) => detach_card(c, UNDO_TIMEOUT),
            None => DetachOutcome::Unknown,
        };
        tracing::info!(pid, ?outcome, "new card of a failed update detached");
        let grace_ms = reap_grace_ms(outcome);
        if let Err(e) = self.launcher.call(&LaunchRequest::Reap { pid, grace_ms }) {
            tracing::warn!(pid, error = %e, "reaping the new card failed");
        }
    }

    /// Reaps an old card that is leaving (after the move, or `FrontendGone`).
    pub(in crate::host) fn reap_old_card(&self, pid: u32) {
        if let Err(e) = self.launcher.call(&LaunchRequest::Reap {
            pid,
            grace_ms: EXIT_GRACE_MS,
        }) {
            tracing::warn!(pid, error = %e, "reaping the old card failed");
        }
    }

    /// Is the card running? `None`: the launcher did not answer.
    fn card_running(&self, pid: u32) -> Option<bool> {
        match self.launcher.children() {
            Ok(c) => Some(c.iter().any(|k| k.pid == pid && k.running)),
            Err(e) => {
                tracing::warn!(pid, error = %e, "card update: the launcher does not list its children");
                None
            }
        }
    }

    /// A card update whose outcome is unknown — a `ReplaceBlock` answered by neither success
    /// nor a typed refusal, or one a dead controller left recorded: which card has the disk?
    /// The hypervisor serves its channel one command at a time, so once it answered anything
    /// after the `ReplaceBlock` (the caller's `Stats`), the move is over and, if it happened,
    /// the old card's connection is closed; the old card then exits on its own (its hand-over
    /// mark). So: wait (bounded) for the old card to leave — it did: the new card has the
    /// disk; the new card is gone: the old one keeps it; both still there (or the launcher
    /// cannot say): `CancelHandOver` to the old card decides (accepted: the old card keeps the
    /// disk; `FrontendGone`: it is leaving, the new card has it). The loser is ended (the new
    /// card with `Detach` first) — except that a new card is never ended once the old card
    /// answered `FrontendGone` ([`Settled::OldCardGone`]).
    pub(in crate::host) fn settle_card_update(
        &self,
        old: u32,
        mut old_control: Option<&mut UnixStream>,
        new: u32,
        new_control: Option<&mut UnixStream>,
    ) -> Settled {
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
        let settled = match winner {
            Winner::New => Settled::New,
            Winner::Old => {
                // The new card is not seen running: the old card may still carry the mark.
                let cancelled = match old_control {
                    Some(c) if self.card_running(new) != Some(true) => {
                        Self::cancel_hand_over(c, old)
                    }
                    _ => Cancelled::Unknown,
                };
                if cancelled == Cancelled::FrontendGone {
                    Settled::OldCardGone
                } else {
                    Settled::Old
                }
            }
        };
        match settled {
            Settled::New => self.reap_old_card(old),
            Settled::OldCardGone => {
                tracing::error!(
                    old,
                    new,
                    "card update: the old card is exiting and the new card was not seen \
                     serving; the new card is kept as the volume's card"
                );
                self.reap_old_card(old);
            }
            Settled::Old => self.retire_new_card(new, new_control),
        }
        tracing::info!(old, new, ?settled, "card update settled");
        settled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settle_decides_by_who_left_then_by_the_cancel() {
        let (up, down) = (Some(true), Some(false));
        // The old card left: the hypervisor had moved; the new card left: it cannot serve.
        for waited in [false, true] {
            assert_eq!(
                settle_step(down, up, waited),
                SettleStep::Decided(Winner::New)
            );
            assert_eq!(
                settle_step(up, down, waited),
                SettleStep::Decided(Winner::Old)
            );
            assert_eq!(
                settle_step(down, down, waited),
                SettleStep::Decided(Winner::Old)
            );
            // The old card left, the launcher cannot say about the new one: only it can serve.
            assert_eq!(
                settle_step(down, None, waited),
                SettleStep::Decided(Winner::New)
            );
            // The new card left, the old one unknown: the new card cannot have the disk.
            assert_eq!(
                settle_step(None, down, waited),
                SettleStep::Decided(Winner::Old)
            );
        }
        assert_eq!(settle_step(up, up, false), SettleStep::Wait);
        assert_eq!(settle_step(up, up, true), SettleStep::AskOldCard);
        assert_eq!(winner_after_cancel(Cancelled::FrontendGone), Winner::New);
        for c in [Cancelled::Yes, Cancelled::NonePending, Cancelled::Unknown] {
            assert_eq!(winner_after_cancel(c), Winner::Old, "{c:?}");
        }
    }

    /// A launcher error is no "not running": the settle waits, then asks the old card, and
    /// never decides for the old card on it.
    #[test]
    fn a_launcher_error_is_not_a_card_gone() {
        for (old, new) in [(None, Some(true)), (Some(true), None), (None, None)] {
            assert_eq!(
                settle_step(old, new, false),
                SettleStep::Wait,
                "{old:?} {new:?}"
            );
            assert_eq!(
                settle_step(old, new, true),
                SettleStep::AskOldCard,
                "{old:?} {new:?}"
            );
        }
    }

    #[test]
    fn only_an_old_card_gone_and_a_new_card_that_took_over_keep_the_new_card() {
        assert!(keep_new_card(Cancelled::FrontendGone, true));
        assert!(!keep_new_card(Cancelled::FrontendGone, false));
        for c in [Cancelled::Yes, Cancelled::NonePending, Cancelled::Unknown] {
            assert!(!keep_new_card(c, true), "{c:?}");
        }
    }

    #[test]
    fn only_a_keyless_card_is_killed_without_grace() {
        assert_eq!(reap_grace_ms(DetachOutcome::Keyless), 0);
        for o in [
            DetachOutcome::Detached,
            DetachOutcome::Gone,
            DetachOutcome::Unknown,
        ] {
            assert_eq!(reap_grace_ms(o), EXIT_GRACE_MS, "{o:?}");
        }
    }

    /// A card peer on the other end of a socketpair: reads the `Detach`, then writes `answers`
    /// and closes (a fake neighbour; the thing under test is the controller's read loop).
    fn card_answering(
        answers: Vec<ControlResponse>,
    ) -> (UnixStream, std::thread::JoinHandle<bool>) {
        let (ours, mut card) = UnixStream::pair().expect("socketpair");
        let h = std::thread::spawn(move || {
            let got = proto::read_frame(&mut card)
                .ok()
                .flatten()
                .and_then(|b| ControlRequest::parse(&b).ok());
            for a in answers {
                if proto::write_frame(&mut card, &a.encode()).is_err() {
                    break;
                }
            }
            got == Some(ControlRequest::Detach)
        });
        (ours, h)
    }

    fn detach_with(answers: Vec<ControlResponse>) -> DetachOutcome {
        let (mut c, h) = card_answering(answers);
        let o = detach_card(&mut c, Duration::from_secs(2));
        assert!(h.join().expect("card thread"), "the card got no Detach");
        o
    }

    fn err(code: ErrorCode) -> ControlResponse {
        ControlResponse::Error {
            code,
            message: "x".into(),
        }
    }

    #[test]
    fn detach_skips_the_unread_take_over_answer() {
        let attached = ControlResponse::Attached {
            capacity_sectors: 8,
            encrypted: true,
        };
        // The stale `Attached` of `TakeOver` is not the answer: the card is keyed, it detaches.
        assert_eq!(
            detach_with(vec![attached.clone(), ControlResponse::Detached]),
            DetachOutcome::Detached
        );
        assert_eq!(
            detach_with(vec![ControlResponse::Detached]),
            DetachOutcome::Detached
        );
        // A refused take-over, then "not attached": keyless.
        assert_eq!(
            detach_with(vec![
                err(ErrorCode::KeyRefused),
                err(ErrorCode::NotAttached)
            ]),
            DetachOutcome::Keyless
        );
        assert_eq!(
            detach_with(vec![err(ErrorCode::NotAttached)]),
            DetachOutcome::Keyless
        );
        // Keyed, then gone without an answer: not keyless.
        assert_eq!(detach_with(vec![attached.clone()]), DetachOutcome::Gone);
        assert_eq!(detach_with(vec![]), DetachOutcome::Gone);
        // Another answer to Detach, or an endless stream of stale ones: unknown.
        assert_eq!(
            detach_with(vec![err(ErrorCode::Internal)]),
            DetachOutcome::Unknown
        );
        assert_eq!(
            detach_with(vec![attached.clone(), attached.clone(), attached]),
            DetachOutcome::Unknown
        );
    }

    #[test]
    fn detach_is_bounded_when_the_card_is_silent() {
        let (mut ours, card) = UnixStream::pair().expect("socketpair");
        let t = Instant::now();
        assert_eq!(
            detach_card(&mut ours, Duration::from_millis(300)),
            DetachOutcome::Unknown
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        drop(card);
    }

    #[test]
    fn the_take_over_answer_is_read_once() {
        let (mut ours, mut card) = UnixStream::pair().expect("socketpair");
        let attached = ControlResponse::Attached {
            capacity_sectors: 8,
            encrypted: true,
        };
        proto::write_frame(&mut card, &attached.encode()).expect("write");
        assert!(read_take_over(&mut ours, Duration::from_secs(2)));
        proto::write_frame(&mut card, &err(ErrorCode::KeyRefused).encode()).expect("write");
        assert!(!read_take_over(&mut ours, Duration::from_secs(2)));
        assert!(!read_take_over(&mut ours, Duration::from_millis(100)));
    }
}
