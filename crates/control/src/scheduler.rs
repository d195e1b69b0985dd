//! Where instances go: whole cores, dedicated hosts, and only hosts that attested within
//! [`ATTESTATION_TTL`](crate::service::ATTESTATION_TTL).

use std::time::Instant;

use bulkhead_tokens::Operation;
use serde_json::json;

use crate::repo::{HostRow, InstanceRow};
use crate::service::{lock, ControlPlane, ATTESTATION_TTL};
use crate::ControlError;

impl ControlPlane {
    /// Attests `host` unless it did within [`ATTESTATION_TTL`]: a nonce from this control plane's
    /// verifier, the host's quote over it (relayed by its controller), verified here.
    pub(crate) async fn ensure_attested(&self, host: &HostRow) -> Result<(), ControlError> {
        let Some(v) = &self.attestation else {
            return Ok(());
        };
        let fresh = lock(&self.attested)
            .get(&host.host_id)
            .is_some_and(|t| t.elapsed() < ATTESTATION_TTL);
        if fresh {
            return Ok(());
        }
        match self.attest_once(host, v).await {
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
        let ev = self
            .hosts
            .call(
                &host.host_id,
                &host.addr,
                Operation::AttestHost,
                &["host".to_string()],
                "POST",
                "/v1/host/attest",
                Some(json!({ "nonce": hex::encode(nonce) })),
            )
            .await?;
        let ev: bulkhead_rot::attest::Evidence =
            serde_json::from_value(ev).map_err(|_| ControlError::Host("attest_malformed"))?;
        if ev.host != host.host_id {
            return Err(ControlError::Host("evidence_for_another_host"));
        }
        let ok = lock(v)
            .verify(&ev)
            .map_err(|e| ControlError::Host(crate::upstream_code(e.code())))?;
        Ok(ok.release_version.to_string())
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
