//! Network volumes: which storage node holds a volume's ciphertext, and the control plane's
//! calls to storage nodes (`bulkhead-storage`, mutual TLS 1.3 with the control plane's
//! certificate, each call pinned to the node it names; bodies are `bulkhead_storage_proto`'s
//! types, the same structs the node parses).
//!
//! The control plane is the authority over who may open a volume: AttachVolume grants the
//! volume to the instance's host at a new generation before the host's card starts (the node
//! cuts any other host's connections at once: fencing), DetachVolume revokes it after the card
//! stopped, DeleteVolume releases the storage after the KMS destroyed the data key.

use bulkhead_mtls::HttpsClient;
use bulkhead_storage_proto::{
    self as proto, Answer, CreateSnapshot, CreateVolume, DeleteReply, DeleteVolume, Grant,
    HostName, Request, Revoke, VolumeId, VolumeReply,
};
use bulkhead_tokens::pki::ServerIdentity;
use serde::{Deserialize, Serialize};

use crate::ControlError;

/// One storage node, as the configuration names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageNodeConfig {
    /// The node's certificate name (CN, role `service`): calls and hosts' cards pin it.
    pub node_id: String,
    /// The node's control API (`IP:PORT`, mutual TLS): what the control plane calls.
    pub api_addr: String,
    /// The node's NBD-over-TLS listener (`IP:PORT`): what hosts' block cards connect to.
    pub nbd_addr: String,
}

/// The configured storage nodes and the client that calls them.
pub struct Storage {
    nodes: Vec<StorageNodeConfig>,
    https: HttpsClient,
}

/// Storage node refusal codes the customer may see (anything else is generic).
fn code(c: proto::ErrorCode) -> &'static str {
    match c {
        proto::ErrorCode::StaleGeneration | proto::ErrorCode::GenerationConflict => {
            "storage_fenced"
        }
        proto::ErrorCode::UnknownVolume => "no_such_volume",
        _ => "storage_unavailable",
    }
}

/// How long a call that copies a volume (CreateSnapshot, CreateVolume from a snapshot) may run:
/// a copy of a large volume outlasts the client's default timeout, and a timed-out copy would
/// be undone while the node still writes it. Kept, with one KMS call after it, below
/// [`PENDING_DELETE_AFTER_SECS`](crate::snapshots::PENDING_DELETE_AFTER_SECS).
pub const COPY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10 * 60);
const _: () = assert!(COPY_TIMEOUT.as_secs() + 120 < crate::snapshots::PENDING_DELETE_AFTER_SECS);

/// Whether `req` makes the node copy a volume (see [`COPY_TIMEOUT`]).
fn copies(req: &Request) -> bool {
    match req {
        Request::CreateSnapshot(_) => true,
        Request::CreateVolume(c) => c.source.is_some(),
        _ => false,
    }
}

impl Storage {
    /// `https` must carry the control plane's client certificate and the cluster CA (it is
    /// pinned per call).
    pub fn new(nodes: Vec<StorageNodeConfig>, https: HttpsClient) -> Storage {
        Storage { nodes, https }
    }

    /// Where a new volume goes: spread over the nodes by its id (deterministic, so a retried
    /// placement lands on the same node).
    pub fn place(&self, volume_id: &str) -> Option<&StorageNodeConfig> {
        if self.nodes.is_empty() {
            return None;
        }
        let h = volume_id
            .bytes()
            .fold(0u64, |a, b| a.wrapping_mul(131).wrapping_add(u64::from(b)));
        let n = u64::try_from(self.nodes.len()).unwrap_or(1);
        let i = usize::try_from(h % n).unwrap_or(0);
        self.nodes.get(i)
    }

    pub fn node(&self, node_id: &str) -> Result<&StorageNodeConfig, ControlError> {
        self.nodes
            .iter()
            .find(|n| n.node_id == node_id)
            .ok_or_else(|| {
                tracing::error!(
                    node = node_id,
                    "a volume names a storage node this configuration lacks"
                );
                ControlError::Internal
            })
    }

    /// One call; a refusal comes back as [`Answer::Refused`].
    async fn call_raw<T: serde::de::DeserializeOwned>(
        &self,
        node_id: &str,
        req: &Request,
    ) -> Result<Answer<T>, ControlError> {
        let node = self.node(node_id)?;
        let mut https = self
            .https
            .expecting(ServerIdentity::service(node_id))
            .map_err(|e| {
                tracing::error!(error = %e, "no CA to pin storage node {node_id} with");
                ControlError::Internal
            })?;
        if copies(req) {
            https = https.with_timeout(COPY_TIMEOUT);
        }
        let r = https
            .request(
                &node.api_addr,
                "POST",
                req.op().path(),
                &[("content-type", "application/json")],
                req.to_body(),
            )
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, node = node_id, "storage node unreachable");
                ControlError::Upstream
            })?;
        proto::parse_answer::<T>(r.status, &r.body).map_err(|e| {
            tracing::error!(node = node_id, error = %e, "storage node answer does not parse");
            ControlError::Internal
        })
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        node_id: &str,
        req: &Request,
    ) -> Result<T, ControlError> {
        match self.call_raw::<T>(node_id, req).await? {
            Answer::Ok(v) => Ok(v),
            Answer::Refused { status, error } => Err(refused(node_id, req, status, &error)),
        }
    }

    /// A grant or revoke at a fresh [`generation`]; when the node has already seen a higher
    /// one (this replica's clock is behind the one that wrote it), once more just above it.
    async fn fenced_call(
        &self,
        node_id: &str,
        volume_id: &str,
        make: impl Fn(u64) -> Result<Request, ControlError>,
    ) -> Result<VolumeReply, ControlError> {
        let first = make(generation())?;
        match self.call_raw::<VolumeReply>(node_id, &first).await? {
            Answer::Ok(r) => Ok(r),
            Answer::Refused { error, .. } if error.code == proto::ErrorCode::StaleGeneration => {
                let list: proto::ListReply = self
                    .call(node_id, &Request::ListVolumes(proto::ListVolumes {}))
                    .await?;
                let seen = list
                    .volumes
                    .iter()
                    .find(|v| v.volume_id.as_str() == volume_id)
                    .map_or(0, |v| v.generation);
                tracing::warn!(volume = volume_id, seen, "the storage node has a newer fencing generation than this clock: going above it");
                let again = make(seen.saturating_add(1).max(generation()))?;
                self.call(node_id, &again).await
            }
            Answer::Refused { status, error } => Err(refused(node_id, &first, status, &error)),
        }
    }

    pub async fn create(
        &self,
        node_id: &str,
        volume_id: &str,
        size_gib: u32,
    ) -> Result<(), ControlError> {
        let req = Request::CreateVolume(CreateVolume {
            volume_id: vid(volume_id)?,
            size_bytes: u64::from(size_gib) << 30,
            source: None,
        });
        self.call::<VolumeReply>(node_id, &req).await.map(|_| ())
    }

    /// A new volume starting as a copy of the snapshot `source` (on the snapshot's node).
    pub async fn create_from(
        &self,
        node_id: &str,
        volume_id: &str,
        size_gib: u32,
        source: &str,
    ) -> Result<(), ControlError> {
        let req = Request::CreateVolume(CreateVolume {
            volume_id: vid(volume_id)?,
            size_bytes: u64::from(size_gib) << 30,
            source: Some(vid(source)?),
        });
        self.call::<VolumeReply>(node_id, &req).await.map(|_| ())
    }

    /// Copies a volume no host holds to the snapshot `snapshot_id` (released like a volume,
    /// by [`Storage::delete`]).
    pub async fn snapshot(
        &self,
        node_id: &str,
        snapshot_id: &str,
        volume_id: &str,
    ) -> Result<(), ControlError> {
        let req = Request::CreateSnapshot(CreateSnapshot {
            snapshot_id: vid(snapshot_id)?,
            volume_id: vid(volume_id)?,
        });
        self.call::<VolumeReply>(node_id, &req).await.map(|_| ())
    }

    /// Grants `host` the volume from a new generation on; any other host's connections are cut.
    pub async fn grant(
        &self,
        node_id: &str,
        volume_id: &str,
        host: &str,
    ) -> Result<(), ControlError> {
        let host = HostName::new(host).map_err(|_| ControlError::Internal)?;
        let vol = vid(volume_id)?;
        let r = self
            .fenced_call(node_id, volume_id, |generation| {
                Ok(Request::Grant(Grant {
                    volume_id: vol.clone(),
                    host: host.clone(),
                    generation,
                }))
            })
            .await?;
        if r.cut_connections > 0 {
            tracing::info!(volume = volume_id, host = %host, cut = r.cut_connections, "storage node fenced other hosts' connections");
        }
        Ok(())
    }

    /// Leaves the volume granted to nobody from a new generation on.
    pub async fn revoke(&self, node_id: &str, volume_id: &str) -> Result<(), ControlError> {
        let vol = vid(volume_id)?;
        self.fenced_call(node_id, volume_id, |generation| {
            Ok(Request::Revoke(Revoke {
                volume_id: vol.clone(),
                generation,
            }))
        })
        .await
        .map(|_| ())
    }

    /// Releases the volume's storage (idempotent).
    pub async fn delete(&self, node_id: &str, volume_id: &str) -> Result<(), ControlError> {
        let req = Request::DeleteVolume(DeleteVolume {
            volume_id: vid(volume_id)?,
        });
        self.call::<DeleteReply>(node_id, &req).await.map(|_| ())
    }
}

fn refused(node_id: &str, req: &Request, status: u16, error: &proto::ErrorDetail) -> ControlError {
    tracing::warn!(node = node_id, status, code = error.code.as_str(), message = %error.message, op = req.op().name(), "storage node refused");
    match error.code {
        // A conflict the customer can retry (409, EC2 `VolumeInUse`), not a host failure.
        proto::ErrorCode::VolumeInUse | proto::ErrorCode::CopyInProgress => {
            ControlError::VolumeInUse
        }
        c => ControlError::Host(code(c)),
    }
}

fn vid(v: &str) -> Result<VolumeId, ControlError> {
    VolumeId::new(v).map_err(|_| ControlError::Internal)
}

/// A fencing generation: microseconds of wall time. Every grant and revoke of a volume takes a
/// new one; the node refuses one below what it has seen, and [`Storage::fenced_call`] then goes
/// just above the node's (a clock stepped back). One workflow per volume runs at a time, so two
/// replicas never race on one volume's generation; a replica whose clock runs far ahead leaves
/// large generations behind it, which only ever move up.
pub fn generation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(1)
        .max(1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::query::ec2_code;
    use bulkhead_ec2_query::Ec2ErrorCode;

    fn refusal(code: proto::ErrorCode) -> ControlError {
        let req = Request::DeleteVolume(DeleteVolume {
            volume_id: VolumeId::new("vol-1").unwrap(),
        });
        let detail = proto::ErrorDetail {
            code,
            message: "refused".into(),
        };
        refused("storage-1", &req, 409, &detail)
    }

    /// A volume some host holds, or one being copied, is a conflict the customer sees as 409 /
    /// EC2 `VolumeInUse`, not a 502 / `InternalError`; other refusals stay host failures.
    #[test]
    fn in_use_refusals_are_conflicts_not_host_failures() {
        for c in [
            proto::ErrorCode::VolumeInUse,
            proto::ErrorCode::CopyInProgress,
        ] {
            let e = refusal(c);
            assert!(matches!(e, ControlError::VolumeInUse), "{c:?}: {e:?}");
            assert_eq!(e.status(), 409);
            assert_eq!(ec2_code(&e, "DeleteVolume"), Ec2ErrorCode::VolumeInUse);
            assert_eq!(ec2_code(&e, "CreateSnapshot"), Ec2ErrorCode::VolumeInUse);
        }
        let e = refusal(proto::ErrorCode::UnknownVolume);
        assert!(matches!(e, ControlError::Host("no_such_volume")), "{e:?}");
        assert_eq!(e.status(), 502);
    }

    /// Only the copying calls get the long timeout.
    #[test]
    fn copies_are_the_snapshot_and_the_clone() {
        let v = || VolumeId::new("vol-1").unwrap();
        let s = || VolumeId::new("snap-1").unwrap();
        assert!(copies(&Request::CreateSnapshot(CreateSnapshot {
            snapshot_id: s(),
            volume_id: v(),
        })));
        assert!(copies(&Request::CreateVolume(CreateVolume {
            volume_id: v(),
            size_bytes: 1 << 30,
            source: Some(s()),
        })));
        assert!(!copies(&Request::CreateVolume(CreateVolume {
            volume_id: v(),
            size_bytes: 1 << 30,
            source: None,
        })));
        assert!(!copies(&Request::DeleteVolume(DeleteVolume {
            volume_id: v()
        })));
    }
}
