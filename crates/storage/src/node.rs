//! The node: the volume table, the engine and the live connections behind one lock, and the
//! control operations on them.
//!
//! Every change is made durable in the table before it takes effect outside (connections cut,
//! exports removed, storage released), and a grant check plus connection registration on the
//! NBD side happens under the same lock as a grant change, so no connection of a fenced host
//! can slip in between.
//!
//! The one exception is a copy (a snapshot, or a volume made from one: `copy`), which can take
//! minutes: it is checked and marked under the lock, runs without it, and is recorded under it
//! again; meanwhile the volumes it copies from and to refuse a grant or a delete
//! ([`OpError::CopyInProgress`]), and every other volume is served as usual.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bulkhead_audit::{AuditEntry, AuditLog, Decision, EntryKind, ParamsKey};
use bulkhead_storage_proto::{
    CreateVolume, DeleteReply, DeleteVolume, ErrorCode, Grant, HostName, ListReply, Revoke,
    VolumeId, VolumeReply,
};
use tokio::process::Child;
use tokio::sync::Mutex;

use crate::conns::{ConnGuard, Connections};
use crate::engine::{Engine, EngineConfig, EngineError};
use crate::qmp::QmpError;
use crate::table::{Table, TableError, VolumeRecord, TABLE_FILE};

mod copy;

use copy::{Busy, Copies};

/// Why a control operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("no volume {0}")]
    UnknownVolume(VolumeId),
    #[error("volume {id} exists with {have} bytes")]
    VolumeExists { id: VolumeId, have: u64 },
    #[error("generation {got} is below the volume's generation {have}")]
    StaleGeneration { have: u64, got: u64 },
    #[error("generation {0} is already granted otherwise")]
    GenerationConflict(u64),
    #[error("volume {0} is being deleted")]
    Deleting(VolumeId),
    #[error("volume {id} is granted or connected ({connections} connections): snapshots are taken of detached volumes")]
    VolumeInUse { id: VolumeId, connections: u32 },
    #[error("{0} is a snapshot: never granted or opened")]
    NotAttachable(VolumeId),
    #[error("a volume from snapshot {snapshot} must be at least its {have} bytes")]
    SmallerThanSnapshot { snapshot: VolumeId, have: u64 },
    #[error("volume {0} is being copied from or to (a snapshot in progress)")]
    CopyInProgress(VolumeId),
    #[error("the copy to {0} ended abnormally")]
    CopyAborted(VolumeId),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Table(#[from] TableError),
}

impl OpError {
    pub fn code(&self) -> ErrorCode {
        match self {
            OpError::UnknownVolume(_) => ErrorCode::UnknownVolume,
            OpError::VolumeExists { .. } => ErrorCode::VolumeExists,
            OpError::StaleGeneration { .. } => ErrorCode::StaleGeneration,
            OpError::GenerationConflict(_) => ErrorCode::GenerationConflict,
            OpError::Deleting(_) => ErrorCode::Deleting,
            OpError::VolumeInUse { .. } => ErrorCode::VolumeInUse,
            OpError::NotAttachable(_) => ErrorCode::NotAttachable,
            OpError::SmallerThanSnapshot { .. } => ErrorCode::BadRequest,
            OpError::CopyInProgress(_) => ErrorCode::CopyInProgress,
            OpError::CopyAborted(_) => ErrorCode::EngineFailure,
            OpError::Engine(_) => ErrorCode::EngineFailure,
            OpError::Table(_) => ErrorCode::TableFailure,
        }
    }
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("volume table: {0}")]
    Table(#[from] TableError),
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("volume {0}: {1}")]
    Volume(VolumeId, EngineError),
    #[error("audit parameter key: {0}")]
    ParamsKey(#[from] bulkhead_audit::ParamsKeyError),
}

/// What is behind the lock.
pub struct State {
    pub table: Table,
    pub engine: Engine,
}

/// Why a host may not open a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenRefusal {
    UnknownVolume,
    NotGranted,
    Deleting,
}

impl OpenRefusal {
    pub fn code(self) -> &'static str {
        match self {
            OpenRefusal::UnknownVolume => "unknown_volume",
            OpenRefusal::NotGranted => "not_granted",
            OpenRefusal::Deleting => "deleting",
        }
    }
}

/// An open the grant allowed: the registration (cut on fencing) and the export's size.
pub struct Opened {
    pub guard: ConnGuard,
    pub cut: tokio::sync::oneshot::Receiver<()>,
    pub size_bytes: u64,
}

pub struct Node {
    state: Mutex<State>,
    pub conns: Arc<Connections>,
    pub audit: AuditLog,
    /// Digests control request bodies for the audit log (drawn at start, memory only; see
    /// `bulkhead_audit::params`).
    pub(crate) params_key: ParamsKey,
    table_path: PathBuf,
    /// qemu-storage-daemon's NBD socket.
    pub qsd_nbd: PathBuf,
    /// The copies in progress and the volumes they hold.
    copies: Arc<Copies>,
}

impl Node {
    /// Loads the table (refusing a corrupt one), starts the engine, finishes interrupted
    /// deletions and re-adds every export. Returns the node and the engine child for
    /// [`Node::supervise`].
    pub async fn open(
        state_dir: &Path,
        cfg: EngineConfig,
        audit: AuditLog,
    ) -> Result<(Arc<Node>, Child, u64), StartError> {
        let params_key = ParamsKey::generate()?;
        let table_path = state_dir.join(TABLE_FILE);
        let mut table = Table::load(&table_path)?;
        let qsd_nbd = cfg.nbd_socket();
        let mut engine = Engine::new(cfg);
        let (child, instance) = engine.start().await?;
        let deleting: Vec<VolumeRecord> = table.volumes().filter(|v| v.deleting).cloned().collect();
        for rec in deleting {
            tracing::info!(volume = %rec.volume_id, "finishing an interrupted delete");
            engine
                .remove_storage(&rec)
                .await
                .map_err(|e| StartError::Volume(rec.volume_id.clone(), e))?;
            table.remove(&rec.volume_id);
            table.save(&table_path)?;
        }
        add_all_exports(&mut engine, &table).await?;
        let node = Arc::new(Node {
            state: Mutex::new(State { table, engine }),
            conns: Arc::new(Connections::default()),
            audit,
            params_key,
            table_path,
            qsd_nbd,
            copies: Arc::new(Copies::default()),
        });
        Ok((node, child, instance))
    }

    pub async fn volume_count(&self) -> usize {
        self.state.lock().await.table.len()
    }

    /// Watches the engine child; when it dies, starts a new one and re-adds every export
    /// (retrying each second until that works). Runs until the process ends.
    pub async fn supervise(self: Arc<Node>, mut child: Child, mut instance: u64) {
        loop {
            let status = child.wait().await;
            tracing::warn!(?status, instance, "qemu-storage-daemon exited; restarting");
            let mut st = self.state.lock().await;
            if !st.engine.mark_dead(instance) {
                // Replaced already (fence recovery); that start's child is watched below.
            }
            // Whatever was connected through the dead child has lost its session.
            loop {
                let State { table, engine } = &mut *st;
                match engine.start().await {
                    Ok((c, i)) => match add_all_exports(engine, table).await {
                        Ok(()) => {
                            child = c;
                            instance = i;
                            break;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "re-adding exports failed; restarting again");
                            let _ = c.id().map(kill_pid);
                            engine.mark_dead(i);
                        }
                    },
                    Err(e) => tracing::error!(error = %e, "qemu-storage-daemon restart failed"),
                }
                drop(st);
                tokio::time::sleep(Duration::from_secs(1)).await;
                st = self.state.lock().await;
            }
        }
    }

    fn save(&self, table: &Table) -> Result<(), OpError> {
        table.save(&self.table_path).map_err(|e| {
            tracing::error!(error = %e, "volume table write failed");
            OpError::Table(e)
        })
    }

    /// CreateVolume: an empty volume, or (with `source`) a copy of a snapshot ([`Node::clone_from`]).
    pub async fn create(self: &Arc<Self>, r: &CreateVolume) -> Result<VolumeReply, OpError> {
        let mut st = self.state.lock().await;
        if let Some(rec) = st.table.get(&r.volume_id) {
            if rec.deleting {
                return Err(OpError::Deleting(r.volume_id.clone()));
            }
            if rec.size_bytes != r.size_bytes {
                return Err(OpError::VolumeExists {
                    id: r.volume_id.clone(),
                    have: rec.size_bytes,
                });
            }
            return Ok(VolumeReply {
                volume: rec.view(self.conns.count(&r.volume_id)),
                cut_connections: 0,
            });
        }
        if self.copies.busy(&r.volume_id).is_some() {
            return Err(OpError::CopyInProgress(r.volume_id.clone()));
        }
        let rec = VolumeRecord {
            volume_id: r.volume_id.clone(),
            size_bytes: r.size_bytes,
            location: st.engine.cfg.new_location(),
            generation: 0,
            granted_to: None,
            deleting: false,
        };
        if let Some(snap) = &r.source {
            return self.clone_from(st, snap, rec).await;
        }
        st.engine.create_storage(&rec).await?;
        self.record_and_export(&mut st, &rec).await?;
        tracing::info!(volume = %rec.volume_id, size = rec.size_bytes, engine = rec.location.engine().name(), "volume created");
        Ok(VolumeReply {
            volume: rec.view(0),
            cut_connections: 0,
        })
    }

    /// Exports a new volume and records it in the table (a create retried after a failed table
    /// write finds its export already there).
    async fn record_and_export(&self, st: &mut State, rec: &VolumeRecord) -> Result<(), OpError> {
        st.engine.remove_export(&rec.volume_id).await?;
        st.engine.add_export(rec).await?;
        let mut next = st.table.clone();
        next.insert(rec.clone());
        self.save(&next)?;
        st.table = next;
        Ok(())
    }

    /// Cuts the node's connections to `rec`'s volume except `keep`'s, then fences inside the
    /// engine. If the engine cannot fence, it is killed (the supervisor restarts it and
    /// re-adds the exports): either way nothing of a cut connection is in flight afterwards.
    async fn fence(&self, st: &mut State, rec: &VolumeRecord, keep: Option<&HostName>) -> u32 {
        let cut = self.conns.cut(&rec.volume_id, keep);
        match st.engine.remove_export(&rec.volume_id).await {
            // Drained: nothing of a cut connection is in flight any more.
            Ok(()) => {
                if let Err(e) = st.engine.add_export(rec).await {
                    tracing::error!(volume = %rec.volume_id, error = %e, "export not re-added after fencing: opens fail until the engine restarts");
                }
            }
            Err(e) => {
                tracing::error!(volume = %rec.volume_id, error = %e, "engine fence failed; killing qemu-storage-daemon");
                if let Some((pid, instance)) = st.engine.running() {
                    kill_pid(pid);
                    st.engine.mark_dead(instance);
                }
            }
        }
        cut
    }

    pub async fn grant(&self, r: &Grant) -> Result<VolumeReply, OpError> {
        if r.volume_id.is_snapshot() {
            return Err(OpError::NotAttachable(r.volume_id.clone()));
        }
        let mut st = self.state.lock().await;
        if self.copies.busy(&r.volume_id).is_some() {
            // A snapshot is being taken of it: no host may write it until that ended.
            return Err(OpError::CopyInProgress(r.volume_id.clone()));
        }
        let rec = fenceable(&st, &r.volume_id, r.generation)?;
        if r.generation == rec.generation {
            if rec.granted_to.as_ref() == Some(&r.host) {
                return Ok(VolumeReply {
                    volume: rec.view(self.conns.count(&r.volume_id)),
                    cut_connections: 0,
                });
            }
            return Err(OpError::GenerationConflict(r.generation));
        }
        let mut new = rec.clone();
        new.generation = r.generation;
        new.granted_to = Some(r.host.clone());
        let mut next = st.table.clone();
        next.insert(new.clone());
        self.save(&next)?;
        st.table = next;
        let moved = rec.granted_to.as_ref().is_some_and(|h| *h != r.host);
        let cut = if moved {
            self.fence(&mut st, &new, Some(&r.host)).await
        } else {
            self.conns.cut(&r.volume_id, Some(&r.host))
        };
        tracing::info!(volume = %r.volume_id, host = %r.host, generation = r.generation, cut, "granted");
        Ok(VolumeReply {
            volume: new.view(self.conns.count(&r.volume_id)),
            cut_connections: cut,
        })
    }

    pub async fn revoke(&self, r: &Revoke) -> Result<VolumeReply, OpError> {
        if r.volume_id.is_snapshot() {
            return Err(OpError::NotAttachable(r.volume_id.clone()));
        }
        let mut st = self.state.lock().await;
        let rec = fenceable(&st, &r.volume_id, r.generation)?;
        let mut new = rec.clone();
        new.generation = r.generation;
        new.granted_to = None;
        let mut next = st.table.clone();
        next.insert(new.clone());
        self.save(&next)?;
        st.table = next;
        let cut = if rec.granted_to.is_some() {
            self.fence(&mut st, &new, None).await
        } else {
            self.conns.cut(&r.volume_id, None)
        };
        tracing::info!(volume = %r.volume_id, generation = r.generation, cut, "revoked");
        Ok(VolumeReply {
            volume: new.view(0),
            cut_connections: cut,
        })
    }

    /// DeleteVolume. A volume being copied from is refused; one being copied to (a create
    /// whose caller gave up may be undone by this delete) is deleted once its copy ended.
    pub async fn delete(&self, r: &DeleteVolume) -> Result<DeleteReply, OpError> {
        let mut st = loop {
            let st = self.state.lock().await;
            match self.copies.busy(&r.volume_id) {
                None => break st,
                Some(Busy::Source) => return Err(OpError::CopyInProgress(r.volume_id.clone())),
                Some(Busy::Target(copy)) => {
                    drop(st);
                    copy.ended().await;
                }
            }
        };
        let Some(rec) = st.table.get(&r.volume_id).cloned() else {
            return Ok(DeleteReply {
                volume_id: r.volume_id.clone(),
                deleted: false,
                cut_connections: 0,
            });
        };
        let mut dying = rec.clone();
        dying.deleting = true;
        dying.granted_to = None;
        let mut next = st.table.clone();
        next.insert(dying.clone());
        self.save(&next)?;
        st.table = next;
        let cut = self.conns.cut(&r.volume_id, None);
        st.engine.remove_export(&r.volume_id).await?;
        st.engine.remove_storage(&dying).await?;
        let mut next = st.table.clone();
        next.remove(&r.volume_id);
        self.save(&next)?;
        st.table = next;
        tracing::info!(volume = %r.volume_id, cut, "volume deleted");
        Ok(DeleteReply {
            volume_id: r.volume_id.clone(),
            deleted: true,
            cut_connections: cut,
        })
    }

    pub async fn list(&self) -> ListReply {
        let st = self.state.lock().await;
        ListReply {
            volumes: st
                .table
                .volumes()
                .map(|v| v.view(self.conns.count(&v.volume_id)))
                .collect(),
        }
    }

    /// The grant check of an NBD open, and the connection's registration, under the table
    /// lock (a grant change waits for it, and cuts it if it moves the volume away).
    pub async fn open_for(
        &self,
        volume: &VolumeId,
        host: &HostName,
    ) -> Result<Opened, OpenRefusal> {
        let st = self.state.lock().await;
        let rec = st.table.get(volume).ok_or(OpenRefusal::UnknownVolume)?;
        if rec.deleting {
            return Err(OpenRefusal::Deleting);
        }
        if rec.granted_to.as_ref() != Some(host) {
            return Err(OpenRefusal::NotGranted);
        }
        let (guard, cut) = self.conns.register(volume, host);
        Ok(Opened {
            guard,
            cut,
            size_bytes: rec.size_bytes,
        })
    }

    /// The grant check alone (NBD_OPT_INFO).
    pub async fn check(&self, volume: &VolumeId, host: &HostName) -> Result<u64, OpenRefusal> {
        let st = self.state.lock().await;
        let rec = st.table.get(volume).ok_or(OpenRefusal::UnknownVolume)?;
        if rec.deleting {
            return Err(OpenRefusal::Deleting);
        }
        if rec.granted_to.as_ref() != Some(host) {
            return Err(OpenRefusal::NotGranted);
        }
        Ok(rec.size_bytes)
    }

    /// Appends an audit record and waits until it is durable.
    pub async fn audit(&self, entry: AuditEntry) -> Result<(), bulkhead_audit::AuditError> {
        self.audit.append(entry).await.map(|_| ())
    }
}

/// Adds every live volume's export. A volume the engine refuses (its file or image is gone or
/// unreadable) is logged and left without an export — its opens fail — so that one broken
/// volume does not take the others down; an engine that stops answering is an error.
async fn add_all_exports(engine: &mut Engine, table: &Table) -> Result<(), StartError> {
    for rec in table
        .volumes()
        .filter(|v| !v.deleting && !v.volume_id.is_snapshot())
    {
        match engine.add_export(rec).await {
            Ok(()) => {}
            Err(e @ EngineError::Qmp(QmpError::Command { .. })) => {
                tracing::error!(volume = %rec.volume_id, error = %e, "volume unavailable: the engine refused its export");
            }
            Err(e) => return Err(StartError::Volume(rec.volume_id.clone(), e)),
        }
    }
    Ok(())
}

fn kill_pid(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions; `pid` is our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// An audit entry of the node.
pub fn entry(
    kind: EntryKind,
    request_id: &str,
    caller: Option<&bulkhead_tokens::Identity>,
    op: &str,
    resources: Vec<String>,
    decision: Decision,
    code: &str,
) -> AuditEntry {
    AuditEntry {
        kind,
        request_id: request_id.to_string(),
        caller: caller.map_or_else(|| "-".to_string(), |c| c.name.clone()),
        cert_sha256: caller.map(|c| c.cert_sha256.clone()),
        token_id: None,
        op: op.to_string(),
        resources,
        params_sha256: None,
        decision,
        code: code.to_string(),
    }
}

/// A fresh request id.
pub fn request_id() -> String {
    format!("sto-{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// The record a Grant or Revoke at `generation` may change: the volume exists, is not being
/// deleted, and has seen no higher generation.
fn fenceable(st: &State, volume: &VolumeId, generation: u64) -> Result<VolumeRecord, OpError> {
    let rec = st
        .table
        .get(volume)
        .cloned()
        .ok_or_else(|| OpError::UnknownVolume(volume.clone()))?;
    if rec.deleting {
        return Err(OpError::Deleting(volume.clone()));
    }
    if generation < rec.generation {
        return Err(OpError::StaleGeneration {
            have: rec.generation,
            got: generation,
        });
    }
    Ok(rec)
}
