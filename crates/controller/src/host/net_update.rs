//! Net-card update (DeployRelease with a net card): a running guest's net card is replaced by a
//! release's `bulkhead-netcard` by the same in-place path that restarts a card killed -9.
//!
//! One card per interface can run: both ends are named by the interface (its vhost-user and
//! control sockets, its sequence-floor file) and the card owns the interface's UDP port. So the
//! old card is stopped first (SIGTERM: it wipes its key pages; the sequence floor it reserved
//! on disk keeps every later nonce above any it used), the new one is started on the same port
//! with the same configuration and the same sealed epoch key (written to a 0600 file the card
//! reads and the launcher removes; never opened by the controller), and the hypervisor's
//! `ReconnectNet` moves the running NIC to it in place (same MAC, rings resumed). A new card
//! that does not come up, or whose connection the hypervisor refuses, is ended, and the binary
//! the card ran before is started again the same way: the guest's NIC is served by the old
//! release, and the failure is answered typed. The card's release is kept in the host record,
//! so a card restarted after it died (by this controller or a restarted one) runs the same
//! binary.
//!
//! If the old binary cannot be started again either, the card is *down*: it is kept (its
//! port, sealed key, sequence floor and release) with no process (`pid: None`, recorded so), the
//! update fails as [`BackendError::NetCardOldCardGone`], and the controller's poll of dead cards
//! starts it again with backoff ([`NetRetry`]) until it runs. A down card has no pid, so no
//! stale pid is ever signalled or reaped: the keeper is only asked to reap pids it reports as
//! its own exited children.

use std::time::{Duration, Instant};

use bulkhead_hypervisor_client::{ClientError, Command, DeviceId};

use super::{lock, BackendError, HostBackend, HostInstance, LaunchRequest, NetCard, Vm};
use super::{EXIT_GRACE_MS, NET_DEVICE};
use crate::api::{NetCardMoved, NetworkSpec, ResourceId};
use crate::backend::NetCardRestart;

/// First wait before a down net card is started again; doubled per failure up to
/// [`NET_RETRY_MAX`].
const NET_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two starts of a down net card.
const NET_RETRY_MAX: Duration = Duration::from_secs(60);

/// When a down net card (no process) is started again, and how often starting it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct NetRetry {
    pub at: Instant,
    pub failures: u32,
}

impl NetRetry {
    /// Due now (a card just found down).
    pub fn now() -> NetRetry {
        NetRetry {
            at: Instant::now(),
            failures: 0,
        }
    }

    /// The retry after one more failed start at `now`: the wait doubles, capped.
    pub fn failed(self, now: Instant) -> NetRetry {
        let failures = self.failures.saturating_add(1);
        let wait = NET_RETRY_FIRST
            .checked_mul(1u32 << failures.saturating_sub(1).min(16))
            .map_or(NET_RETRY_MAX, |w| w.min(NET_RETRY_MAX));
        NetRetry {
            at: now + wait,
            failures,
        }
    }
}

/// How `net_cards_of` locks each instance.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    /// Waits for an instance in an operation (DeployRelease's own walk).
    Block,
    /// Leaves out an instance in an operation (a card update holds it for up to a minute):
    /// GetHealth never stalls behind one.
    Skip,
}

/// Why a net card is started again in place, and what that asks of
/// [`HostBackend::restart_card_in_place`].
#[derive(Clone, Copy, Debug)]
pub(super) struct InPlace {
    /// For the logs.
    why: &'static str,
    /// A card that runs but cannot take the NIC back (`reconnect_or_replug` failed) counts as
    /// not started (stopped, the card down); otherwise it is kept and the failure logged.
    nic_required: bool,
    /// A failed start is recorded (the card was recorded with a process); a card already
    /// recorded down is not written again.
    record_down: bool,
}

impl InPlace {
    /// A card found dead (killed, crashed): its NIC is moved if it can be.
    pub const AFTER_DEATH: InPlace = InPlace {
        why: "died",
        nic_required: false,
        record_down: true,
    };
    /// A down card whose retry is due.
    pub const WHILE_DOWN: InPlace = InPlace {
        why: "down",
        nic_required: false,
        record_down: false,
    };
    /// The previous binary after a failed update: it must serve the NIC again, or it is down.
    pub const RESTORE: InPlace = InPlace {
        why: "update undone",
        nic_required: true,
        record_down: true,
    };
}

impl HostBackend {
    /// Every instance with a running net card whose `filter` holds: its id, the card's pid and
    /// release. A down card (no process) is left out.
    pub(super) fn net_cards_of(
        &self,
        wait: Wait,
        filter: impl Fn(&HostInstance) -> bool,
    ) -> Vec<(ResourceId, u32, Option<u64>)> {
        let slots: Vec<_> = lock(&self.inner)
            .instances
            .iter()
            .map(|(id, s)| (id.clone(), std::sync::Arc::clone(&s.inst)))
            .collect();
        slots
            .into_iter()
            .filter_map(|(id, inst)| {
                let g = match wait {
                    Wait::Block => lock(&inst),
                    Wait::Skip => match inst.try_lock() {
                        Ok(g) => g,
                        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                        Err(std::sync::TryLockError::WouldBlock) => {
                            tracing::debug!(instance = %id, "instance busy: its net card left out of this answer");
                            return None;
                        }
                    },
                };
                let c = g.net.as_ref()?;
                let pid = c.pid?;
                filter(&g).then_some((id, pid, c.release))
            })
            .collect()
    }

    /// Starts every down net card whose retry is due (instances in an operation are left for
    /// the next poll); each start is reported for the audit (`old_pid` 0: there was no
    /// process).
    pub(super) fn restart_down_net_cards(&self, out: &mut Vec<NetCardRestart>) {
        let slots: Vec<_> = lock(&self.inner)
            .instances
            .iter()
            .map(|(id, s)| (id.clone(), std::sync::Arc::clone(&s.inst)))
            .collect();
        let now = Instant::now();
        for (id, inst) in slots {
            let Ok(mut g) = inst.try_lock() else {
                continue;
            };
            let Some(spec) = g.network.clone() else {
                continue;
            };
            let Some(card) = g.net.take_if(|c| c.pid.is_none() && c.retry.at <= now) else {
                continue;
            };
            let outcome = self
                .restart_card_in_place(&mut g, &id, &spec, card, InPlace::WHILE_DOWN)
                .map_err(|e| e.code());
            out.push(NetCardRestart {
                instance: id.to_string(),
                old_pid: 0,
                outcome,
            });
        }
    }

    /// The NIC moved to net card `pid` in place (`ReconnectNet`); if the hypervisor refuses,
    /// the NIC is unplugged and plugged again on the card (the guest sees a new NIC).
    pub(super) fn reconnect_or_replug(&self, vm: &mut Vm, pid: u32) -> Result<(), BackendError> {
        let dev = DeviceId::new(NET_DEVICE).map_err(|_| BackendError::Unavailable)?;
        // The guest keeps its NIC: the new card takes over the device in place (same MAC,
        // rings resumed where they stand).
        if self.reconnect_net(vm, pid, &dev)? {
            return Ok(());
        }
        // Refused (e.g. the device is busy or the card does not match): unplug the old
        // device, plug the new one.
        match vm.chan.call(Command::DetachNet { id: dev }, None) {
            Ok(_) | Err(ClientError::Refused(_)) => {}
            Err(e) => tracing::warn!(error = %e, "detach net"),
        }
        self.plug_net(vm, pid)
    }

    /// Stops net card `pid` (SIGTERM: it wipes its key pages; then reaped) and forgets it,
    /// keeping its port for the card that follows it.
    fn stop_net_card_keep_port(&self, pid: u32) {
        lock(&self.inner).net_pids.remove(&pid);
        if let Err(e) = self.launcher.call(&LaunchRequest::Reap {
            pid,
            grace_ms: EXIT_GRACE_MS,
        }) {
            tracing::warn!(pid, error = %e, "reaping a net card failed");
        }
    }

    /// The net-card update of one running instance (see the module docs): the old card
    /// stopped, a card of release `to` (`None`: the configured binary) started on its port
    /// with its configuration and sealed key, the NIC reconnected in place, the new card
    /// committed and recorded. On a failure (the recording included) the binary the card ran
    /// before serves the NIC again and the error says why; if that binary does not start
    /// either, the card is left down (retried by the dead-card poll) and the error is
    /// [`BackendError::NetCardOldCardGone`].
    pub(super) fn update_net_card_vm(
        &self,
        g: &mut HostInstance,
        to: Option<u64>,
    ) -> Result<NetCardMoved, BackendError> {
        if g.vm.is_none() {
            return Err(BackendError::WrongState);
        }
        let id = g.desc.instance_id.clone();
        let rid = ResourceId::parse(&id).map_err(|_| BackendError::Unavailable)?;
        let spec = g.network.clone().ok_or(BackendError::NoNetwork)?;
        let old = g.net.clone().ok_or(BackendError::NoNetwork)?;
        // A down card is started again by the dead-card poll, on its own release.
        let old_pid = old.pid.ok_or(BackendError::WrongState)?;
        let dev = DeviceId::new(NET_DEVICE).map_err(|_| BackendError::Unavailable)?;
        let t = Instant::now();
        self.stop_net_card_keep_port(old_pid);
        let mut new = NetCard {
            release: to,
            pid: None,
            ..old.clone()
        };
        let moved = self
            .start_net_card(&rid, &spec, &mut new, Some(old.listen))
            .and_then(|()| {
                let pid = new.pid.ok_or(BackendError::Unavailable)?;
                match g.vm.as_mut().map(|vm| self.reconnect_net(vm, pid, &dev)) {
                    Some(Ok(true)) => Ok(pid),
                    Some(Ok(false)) => Err(BackendError::NetReconnectRefused),
                    Some(Err(e)) => Err(e),
                    None => Err(BackendError::WrongState),
                }
            });
        let gap_us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
        // Recorded before it is answered: a record that cannot be written fails the update
        // like a card that did not start (the card must not stay on a release whose move was
        // never acknowledged).
        let outcome = moved.and_then(|pid| {
            g.net = Some(new.clone());
            match self.persist(g, &[pid]) {
                Ok(()) => Ok(pid),
                Err(e) => {
                    g.net = Some(old.clone());
                    Err(e)
                }
            }
        });
        match outcome {
            Ok(new_pid) => {
                tracing::info!(instance = %id, old_pid, new_pid, ?to, gap_us, "net card updated in place");
                Ok(NetCardMoved {
                    instance_id: id,
                    old_pid,
                    new_pid,
                    gap_us,
                })
            }
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, ?to, "net card update failed; starting the card's previous binary again");
                if let Some(pid) = new.pid {
                    // The new card started: ended (SIGTERM, it wipes its key), port kept.
                    self.stop_net_card_keep_port(pid);
                }
                if self.restore_net_card(g, &rid, old) {
                    Err(e)
                } else {
                    Err(BackendError::NetCardOldCardGone)
                }
            }
        }
    }

    /// After a failed update: the card's previous binary is started again on its port and
    /// takes the NIC back (true). If even that fails (false), the card is left down: recorded
    /// with no process, so no stale pid is kept, and started again by the dead-card poll with
    /// backoff on the same binary.
    fn restore_net_card(&self, g: &mut HostInstance, id: &ResourceId, old: NetCard) -> bool {
        let card = NetCard {
            pid: None,
            retry: NetRetry::now(),
            ..old
        };
        let Some(spec) = g.network.clone() else {
            g.net = Some(card);
            return false;
        };
        self.restart_card_in_place(g, id, &spec, card, InPlace::RESTORE)
            .is_ok()
    }

    /// Starts `card` (no process; its port, sealed key and release kept) again on its own port
    /// and moves the instance's NIC to it (`reconnect_or_replug`), then records it. On success
    /// the card is the instance's with its retry reset, and its pid is answered. On failure the
    /// card is *down* — no process (one that started is stopped), its port still its own (a
    /// failed start frees it), its next start after one more backoff step of `card.retry` —
    /// recorded so when `how.record_down`, and the error is answered.
    pub(super) fn restart_card_in_place(
        &self,
        g: &mut HostInstance,
        id: &ResourceId,
        spec: &NetworkSpec,
        mut card: NetCard,
        how: InPlace,
    ) -> Result<u32, BackendError> {
        let listen = card.listen;
        card.pid = None;
        let restarted = self
            .start_net_card(id, spec, &mut card, Some(listen))
            .and_then(|()| {
                let pid = card.pid.ok_or(BackendError::Unavailable)?;
                let nic = match g.vm.as_mut() {
                    Some(vm) => self.reconnect_or_replug(vm, pid),
                    None => Ok(()),
                };
                match nic {
                    Err(e) if how.nic_required => Err(e),
                    Err(e) => {
                        tracing::warn!(instance = %id, error = %e, "restarted net card not re-plugged");
                        Ok(pid)
                    }
                    Ok(()) => Ok(pid),
                }
            });
        match restarted {
            Ok(pid) => {
                card.retry = NetRetry::now();
                tracing::info!(instance = %id, pid, release = ?card.release, why = how.why, "net card started in place");
                g.net = Some(card);
                self.persist_noticed_commit(g, pid);
                Ok(pid)
            }
            Err(e) => {
                if let Some(pid) = card.pid.take() {
                    self.stop_net_card_keep_port(pid);
                }
                lock(&self.inner).net_ports.insert(listen.port());
                card.retry = card.retry.failed(Instant::now());
                tracing::error!(instance = %id, error = %e, failures = card.retry.failures, why = how.why, "net card did not start in place: down, retried with backoff");
                g.net = Some(card);
                if how.record_down {
                    self.persist_noticed(g);
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_down_card_is_retried_with_a_doubling_capped_wait() {
        let t = Instant::now();
        let r = NetRetry { at: t, failures: 0 };
        let waits: Vec<Duration> = (0..10)
            .scan(r, |r, _| {
                *r = r.failed(t);
                Some(r.at - t)
            })
            .collect();
        assert_eq!(waits[0], Duration::from_secs(1));
        assert_eq!(waits[1], Duration::from_secs(2));
        assert_eq!(waits[5], Duration::from_secs(32));
        assert_eq!(waits[6], NET_RETRY_MAX);
        assert_eq!(waits[9], NET_RETRY_MAX);
        let many = NetRetry {
            at: t,
            failures: u32::MAX,
        };
        assert_eq!(many.failed(t).at - t, NET_RETRY_MAX);
    }
}
