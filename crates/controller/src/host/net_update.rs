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

use std::time::Instant;

use bulkhead_hypervisor_client::{ClientError, Command, DeviceId};

use super::{lock, BackendError, HostBackend, HostInstance, LaunchRequest, NetCard, Vm};
use super::{EXIT_GRACE_MS, NET_DEVICE};
use crate::api::{NetCardMoved, ResourceId};

impl HostBackend {
    /// Every instance with a net card whose `filter` holds: its id, the card's pid and release.
    pub(super) fn net_cards_of(
        &self,
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
                let g = lock(&inst);
                let c = g.net.as_ref()?;
                filter(&g).then_some((id, c.pid, c.release))
            })
            .collect()
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
    /// committed and recorded. On a failure the binary the card ran before serves the NIC
    /// again and the error says why.
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
        let dev = DeviceId::new(NET_DEVICE).map_err(|_| BackendError::Unavailable)?;
        let t = Instant::now();
        self.stop_net_card_keep_port(old.pid);
        let mut new = NetCard {
            release: to,
            ..old.clone()
        };
        let outcome = match self.start_net_card(&rid, &spec, &mut new, Some(old.listen)) {
            Ok(()) => match g
                .vm
                .as_mut()
                .map(|vm| self.reconnect_net(vm, new.pid, &dev))
            {
                Some(Ok(true)) => Ok(()),
                Some(Ok(false)) => Err(BackendError::NetReconnectRefused),
                Some(Err(e)) => Err(e),
                None => Err(BackendError::WrongState),
            },
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                let gap_us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                g.net = Some(new.clone());
                self.persist(g, &[new.pid])?;
                tracing::info!(instance = %id, old_pid = old.pid, new_pid = new.pid, ?to, gap_us, "net card updated in place");
                Ok(NetCardMoved {
                    instance_id: id,
                    old_pid: old.pid,
                    new_pid: new.pid,
                    gap_us,
                })
            }
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, ?to, "net card update failed; the card's previous binary serves the NIC again");
                if new.pid != old.pid {
                    // The new card started: ended (SIGTERM, it wipes its key), port kept.
                    self.stop_net_card_keep_port(new.pid);
                }
                self.restore_net_card(g, &rid, old);
                Err(e)
            }
        }
    }

    /// After a failed update: the card's previous binary is started again on its port and
    /// takes the NIC back. If even that fails, the card is left recorded as dead, so the
    /// controller's restart of dead net cards keeps trying with the same binary.
    fn restore_net_card(&self, g: &mut HostInstance, id: &ResourceId, old: NetCard) {
        let Some(spec) = g.network.clone() else {
            return;
        };
        let mut card = old.clone();
        let restored = self
            .start_net_card(id, &spec, &mut card, Some(old.listen))
            .and_then(|()| match g.vm.as_mut() {
                Some(vm) => self.reconnect_or_replug(vm, card.pid),
                None => Ok(()),
            });
        match restored {
            Ok(()) => {
                tracing::info!(instance = %id, pid = card.pid, release = ?card.release, "net card restored on its previous binary");
                let pid = card.pid;
                g.net = Some(card);
                self.persist_noticed_commit(g, pid);
            }
            Err(e) => {
                tracing::error!(instance = %id, error = %e, "net card not restored; retried as a dead card");
                if card.pid != old.pid {
                    self.stop_net_card_keep_port(card.pid);
                }
                lock(&self.inner).net_pids.insert(old.pid, id.clone());
                lock(&self.dead_net_cards).push(old.pid);
                g.net = Some(old);
                self.persist_noticed(g);
            }
        }
    }
}
