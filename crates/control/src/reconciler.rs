//! Convergence after faults, and the pull loop: work left mid-flight by a crash is unwound,
//! instances a host lost are released, and each host's state and audit are pulled (never
//! pushed) and checked ([`crate::fleet`]).

use bulkhead_controller_proto::calls;

use crate::repo::{HostRow, InstanceRow};
use crate::service::{now, ControlPlane};
use crate::state::{InstanceState, VolumeState};
use crate::workflow::now_ms;
use crate::ControlError;

/// The leader lease of the host poller.
const POLLER: &str = "poller";

impl ControlPlane {
    /// Start-up convergence after a crash: every workflow left running is finished or unwound
    /// from the step it reached ([`crate::workflow`]); then whatever no workflow owns (rows
    /// written before workflows existed) is rolled back: volumes caught mid-attach or mid-detach
    /// are detached on their host (dropping any key the card got) and made available again;
    /// instances caught mid-launch are terminated.
    ///
    /// On a store several replicas share (PostgreSQL), only workflows whose owner's lease ended
    /// are taken here (the others are still being run), and the pre-workflow roll-back is not
    /// done (another replica's live workflow would look interrupted to it); the periodic
    /// [`ControlPlane::sweep_workflows`] takes the rest as their leases end.
    pub async fn reconcile(&self) -> Result<usize, ControlError> {
        let shared = self.repo.shared();
        let mut n = self.converge_workflows(!shared).await?;
        if shared {
            return Ok(n);
        }
        for v in self.repo.volumes_in_transition()? {
            if let (Some(inst), Some(host_id)) = (&v.instance_id, &v.host_id) {
                if let Ok(host) = self.host(host_id) {
                    let call = calls::DetachVolume {
                        instance_id: inst.clone(),
                        volume_id: v.volume_id.clone(),
                    };
                    let _ = self.hosts.call(&host.host_id, &host.addr, &call).await;
                }
            }
            self.repo.transition_volume(
                &v.tenant_id,
                &v.volume_id,
                v.state,
                VolumeState::Available,
                None,
                None,
            )?;
            tracing::warn!(volume = %v.volume_id, from = %v.state, "rolled back interrupted volume transition");
            n += 1;
        }
        for i in self
            .repo
            .live_instances()?
            .into_iter()
            .filter(|i| i.state == InstanceState::Pending)
        {
            if let Ok(host) = self.host(&i.host_id) {
                let call = calls::TerminateInstance {
                    instance_id: i.instance_id.clone(),
                };
                let _ = self.hosts.call(&host.host_id, &host.addr, &call).await;
            }
            self.repo.set_instance_state(
                &i.tenant_id,
                &i.instance_id,
                InstanceState::Pending,
                InstanceState::Terminated,
            )?;
            n += 1;
        }
        Ok(n)
    }

    /// Claims running workflows (those whose lease ended, or every one when `all`) and
    /// finishes or unwinds each. Returns how many.
    async fn converge_workflows(&self, all: bool) -> Result<usize, ControlError> {
        let claimed = self
            .repo
            .claim_workflows(&self.lease.claim(), now_ms(), all)?;
        let mut n = 0;
        for w in claimed {
            let (id, kind, owner) = (w.workflow_id.clone(), w.kind, self.replica_id().to_string());
            let how = self.resume_any(w).await;
            tracing::warn!(workflow = %id, kind = kind.as_str(), replica = %owner, outcome = ?how, "interrupted workflow converged");
            n += 1;
        }
        Ok(n)
    }

    /// The periodic take-over (every replica runs it): workflows whose owner stopped renewing
    /// its lease (killed, or cut off from the store) are claimed by exactly one replica and
    /// finished or unwound from the step they reached, by the rules of a restart.
    pub async fn sweep_workflows(&self) -> Result<usize, ControlError> {
        self.converge_workflows(false).await
    }

    /// When a host reports fewer instances than the records place on it (its controller was
    /// killed and restarted: its guests and cards died with it), the instances it no longer
    /// knows are marked terminated and their volumes released, so the state converges and the
    /// volumes can be attached again. Returns how many instances were lost.
    pub(crate) async fn reconcile_lost(
        &self,
        h: &HostRow,
        reported: u64,
    ) -> Result<usize, ControlError> {
        let recorded: Vec<InstanceRow> = self
            .repo
            .live_instances()?
            .into_iter()
            .filter(|i| {
                i.host_id == h.host_id
                    && matches!(i.state, InstanceState::Running | InstanceState::Stopped)
            })
            .collect();
        if u64::try_from(recorded.len()).unwrap_or(0) <= reported {
            return Ok(0);
        }
        let mut lost = 0;
        for i in recorded {
            let call = calls::DescribeInstance {
                instance_id: i.instance_id.clone(),
            };
            let r = self.hosts.call(&h.host_id, &h.addr, &call).await;
            if !matches!(r, Err(ControlError::Host("no_such_instance"))) {
                continue;
            }
            for v in self.repo.volumes(&i.tenant_id)?.into_iter().filter(|v| {
                v.instance_id.as_deref() == Some(&i.instance_id) && v.state == VolumeState::InUse
            }) {
                self.repo.transition_volume(
                    &i.tenant_id,
                    &v.volume_id,
                    VolumeState::InUse,
                    VolumeState::Available,
                    None,
                    None,
                )?;
            }
            self.repo.set_instance_state(
                &i.tenant_id,
                &i.instance_id,
                i.state,
                InstanceState::Terminated,
            )?;
            tracing::warn!(host = %h.host_id, instance = %i.instance_id, "instance lost with its host's controller: marked terminated, volumes released");
            lost += 1;
        }
        Ok(lost)
    }

    /// One polling round (pull, never push): each host's description and its new audit records
    /// after the stored cursor. Returns how many audit records were pulled.
    ///
    /// With replicas sharing the store, one polls: the holder of the `poller` leader lease
    /// (renewed each round, taken over once it ends), so the chain checks and the lost-instance
    /// roll-back never race between replicas. The others return 0.
    pub async fn poll_hosts(&self) -> Result<u64, ControlError> {
        if self.repo.shared() && !self.repo.lead(POLLER, &self.lease.claim(), now_ms())? {
            return Ok(0);
        }
        let mut pulled = 0u64;
        for h in self.repo.hosts()? {
            let described = self
                .hosts
                .call(&h.host_id, &h.addr, &calls::DescribeHost)
                .await;
            let v = match described {
                Ok(v) => {
                    self.fleet.seen(&h.host_id);
                    let status = serde_json::to_string(&v).map_err(|_| ControlError::Internal)?;
                    self.repo.set_host_status(&h.host_id, &status, now())?;
                    let reported = u64::from(v.instances);
                    if let Err(e) = self.reconcile_lost(&h, reported).await {
                        tracing::warn!(host = %h.host_id, code = e.code(), "reconciling lost instances failed");
                    }
                    v
                }
                Err(e) => {
                    tracing::warn!(host = %h.host_id, code = e.code(), "poll failed");
                    if let Some(f) = self.fleet.unanswered(&h.host_id) {
                        self.raise(&f).await;
                    }
                    continue;
                }
            };
            // A sealed host is attested by its boot chain as it is polled (a refused one is
            // asked again at most every SEALED_RETRY).
            if self.sealed_attestation_due(&h.host_id) {
                if let Err(e) = self.ensure_attested(&h).await {
                    tracing::warn!(host = %h.host_id, code = e.code(), "sealed host not attested");
                }
            }
            pulled += self.pull_host_audit(&h, &v).await?;
        }
        Ok(pulled)
    }
}
