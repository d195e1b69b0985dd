//! Where instances go: whole cores, dedicated hosts, and only hosts that attested within
//! [`ATTESTATION_TTL`](crate::service::ATTESTATION_TTL).

use std::time::Instant;

use bulkhead_controller_proto::{calls, AttestRequest};

use crate::api;
use crate::repo::{HostRow, InstanceRow};
use crate::service::{lock, now, ControlPlane, ATTESTATION_TTL, THREADS_PER_CORE};
use crate::state::InstanceState;
use crate::workflow::WorkflowRow;
use crate::ControlError;

/// How many times a reservation re-reads capacity when the host it attested filled up
/// meanwhile (another call, or another replica, took the cores).
const RESERVE_ROUNDS: usize = 16;

impl ControlPlane {
    /// Attests `host` unless it did within [`ATTESTATION_TTL`]: a nonce from this control plane's
    /// verifier, the host's quote over it (relayed by its controller), verified here. A sealed
    /// host ([`crate::sealed`]) is always attested, by its whole boot chain.
    pub(crate) async fn ensure_attested(&self, host: &HostRow) -> Result<(), ControlError> {
        let sealed = self.is_sealed(&host.host_id);
        let v = match &self.attestation {
            Some(v) => Some(v),
            None if sealed => None,
            None => return Ok(()),
        };
        let fresh = lock(&self.attested)
            .get(&host.host_id)
            .is_some_and(|t| t.elapsed() < ATTESTATION_TTL);
        if fresh {
            return Ok(());
        }
        let outcome = match v {
            _ if sealed => self.attest_sealed(host).await,
            Some(v) => self.attest_once(host, v).await,
            None => Err(ControlError::Internal),
        };
        match outcome {
            Ok(release) => {
                tracing::info!(host = %host.host_id, release, "host attested for placement");
                self.fleet.attested(&host.host_id);
            }
            Err(e) => {
                tracing::warn!(host = %host.host_id, code = e.code(), "host failed attestation: no work placed on it");
                if let Some(f) = self.fleet.attestation_failed(&host.host_id, e.code()) {
                    self.raise(&f).await;
                }
                return Err(e);
            }
        }
        lock(&self.attested).insert(host.host_id.clone(), Instant::now());
        Ok(())
    }

    /// One attestation round: a nonce, the host's quote over it, verified here. Returns the
    /// attested release's version.
    async fn attest_once(
        &self,
        host: &HostRow,
        v: &std::sync::Mutex<bulkhead_rot::attest::Verifier>,
    ) -> Result<String, ControlError> {
        let nonce = lock(v)
            .challenge(&host.host_id)
            .map_err(|_| ControlError::Internal)?;
        let call = calls::AttestHost(AttestRequest {
            nonce: hex::encode(nonce),
            instance_id: None,
            credential: None,
        });
        let bulkhead_rot_proto::HostEvidence::Measured(ev) =
            self.hosts.call(&host.host_id, &host.addr, &call).await?.0
        else {
            return Err(ControlError::Host("attest_malformed"));
        };
        if ev.host != host.host_id {
            return Err(ControlError::Host("evidence_for_another_host"));
        }
        let ok = lock(v)
            .verify(&ev)
            .map_err(|e| ControlError::Host(crate::upstream_code(e.code())))?;
        Ok(ok.release_version.to_string())
    }

    /// Placement and the `pending` row that holds the cores: the best host with room that
    /// attests (a host that fails is left out and the next best tried). The choice and the
    /// insert are one atomic step of the store ([`crate::repo::Repository::reserve_instance`]:
    /// on PostgreSQL under an advisory lock every replica takes), so no two reservations, in
    /// this process or another, count the same free core. Attestation (a network round trip)
    /// happens before, outside that lock; the atomic step places only on hosts attested here.
    pub(crate) async fn reserve(
        &self,
        w: &WorkflowRow,
        r: &api::RunInstances,
    ) -> Result<String, ControlError> {
        let cores = r.vcpus.div_ceil(THREADS_PER_CORE);
        let dedicated = r.tenancy.as_deref() == Some("dedicated");
        let tenant = w.tenant_id.clone();
        // In-process: calls of this replica queue here instead of on the store's lock.
        let _g = self.placement.lock().await;
        let row = InstanceRow {
            instance_id: w.instance()?.to_string(),
            tenant_id: tenant.clone(),
            host_id: String::new(),
            image_id: r.image_id.clone(),
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            cores,
            dedicated,
            state: InstanceState::Pending,
            created: now(),
            instance_storage_gib: r.instance_storage_gib,
        };
        let mut refused: Vec<String> = Vec::new();
        let mut attested: Vec<String> = Vec::new();
        for _ in 0..RESERVE_ROUNDS {
            let hosts: Vec<HostRow> = self
                .repo
                .hosts()?
                .into_iter()
                .filter(|h| !refused.contains(&h.host_id))
                .collect();
            let live = self.repo.live_instances()?;
            let Some((host_id, _)) = Self::place(&hosts, &live, &tenant, cores, dedicated) else {
                return Err(if refused.is_empty() {
                    ControlError::NoCapacity
                } else {
                    ControlError::NoAttestedHost
                });
            };
            if !attested.contains(&host_id) {
                let h = hosts
                    .iter()
                    .find(|h| h.host_id == host_id)
                    .cloned()
                    .ok_or(ControlError::Internal)?;
                if let Err(e) = self.ensure_attested(&h).await {
                    tracing::warn!(host = %host_id, code = e.code(), "not placing on a host that did not attest");
                    refused.push(host_id);
                    continue;
                }
                attested.push(host_id);
            }
            let ok = attested.clone();
            let t = tenant.clone();
            let chosen = self.repo.reserve_instance(
                &row,
                Box::new(move |hosts: &[HostRow], live: &[InstanceRow]| {
                    let hosts: Vec<HostRow> = hosts
                        .iter()
                        .filter(|h| ok.contains(&h.host_id))
                        .cloned()
                        .collect();
                    Self::place(&hosts, live, &t, cores, dedicated).map(|p| p.0)
                }),
            )?;
            if let Some(host_id) = chosen {
                return Ok(host_id);
            }
            // The attested hosts filled up meanwhile: read capacity again.
        }
        Err(ControlError::NoCapacity)
    }

    pub(crate) fn host(&self, host_id: &str) -> Result<HostRow, ControlError> {
        self.repo
            .hosts()?
            .into_iter()
            .find(|h| h.host_id == host_id)
            .ok_or(ControlError::Internal)
    }

    /// Chooses a host with `cores` free whole cores. Dedicated: a host with no other tenant's
    /// live instance, then reserved for this tenant; default: never a host reserved for another.
    pub fn place(
        hosts: &[HostRow],
        live: &[InstanceRow],
        tenant: &str,
        cores: u32,
        dedicated: bool,
    ) -> Option<(String, bool)> {
        let mut best: Option<(u32, &HostRow)> = None;
        for h in hosts {
            let on: Vec<&InstanceRow> = live.iter().filter(|i| i.host_id == h.host_id).collect();
            let used: u32 = on.iter().map(|i| i.cores).sum();
            let free = h.cores.saturating_sub(used);
            let others = on.iter().any(|i| i.tenant_id != tenant);
            let reserved_for_other = on.iter().any(|i| i.dedicated && i.tenant_id != tenant)
                || (h.dedicated_tenant.as_deref().is_some_and(|t| t != tenant) && !on.is_empty());
            let ok = free >= cores && !reserved_for_other && (!dedicated || !others);
            if ok && best.is_none_or(|(f, _)| free > f) {
                best = Some((free, h));
            }
        }
        best.map(|(_, h)| (h.host_id.clone(), dedicated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::new_id;
    use crate::state::InstanceState;

    fn host(id: &str, cores: u32) -> HostRow {
        HostRow {
            host_id: id.into(),
            addr: String::new(),
            cores,
            dedicated_tenant: None,
        }
    }

    fn inst(host: &str, tenant: &str, cores: u32, dedicated: bool) -> InstanceRow {
        InstanceRow {
            instance_id: new_id("i"),
            tenant_id: tenant.into(),
            host_id: host.into(),
            image_id: "img".into(),
            vcpus: cores * 2,
            memory_mib: 128,
            cores,
            dedicated,
            state: InstanceState::Running,
            created: 0,
            instance_storage_gib: None,
        }
    }

    #[test]
    fn placement_whole_cores_and_dedicated_hosts() {
        let hosts = [host("h1", 2), host("h2", 2)];
        // Spreads to the host with most free cores.
        let live = [inst("h1", "a", 1, false)];
        assert_eq!(
            ControlPlane::place(&hosts, &live, "b", 1, false).map(|p| p.0),
            Some("h2".into())
        );
        // Two cores needed: only h2 has them.
        assert_eq!(
            ControlPlane::place(&hosts, &live, "a", 2, false).map(|p| p.0),
            Some("h2".into())
        );
        // Dedicated for b: h1 runs a's instance, so only h2.
        assert_eq!(
            ControlPlane::place(&hosts, &live, "b", 1, true).map(|p| p.0),
            Some("h2".into())
        );
        // A host dedicated to a takes nobody else, even with free cores.
        let live = [inst("h1", "a", 1, true), inst("h2", "c", 2, false)];
        assert_eq!(ControlPlane::place(&hosts, &live, "b", 1, false), None);
        assert_eq!(
            ControlPlane::place(&hosts, &live, "a", 1, false).map(|p| p.0),
            Some("h1".into())
        );
        // Never more cores than the host has.
        assert_eq!(ControlPlane::place(&hosts, &[], "a", 3, false), None);
    }
}
