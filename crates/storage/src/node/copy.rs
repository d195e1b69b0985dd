//! Copies: snapshots, and volumes made from them, without the node's lock.
//!
//! A copy of a multi-GiB sparse volume can take minutes; under the node's one lock it would
//! hold up every other volume's grants, fencing, exports and opens. So a copy is three steps:
//! under the lock, the checks (a snapshot's volume is not granted and has no connection) and a
//! mark of both ends in [`Copies`]; the copy itself without the lock (the engine's copy reads
//! and writes only storage, never its QMP monitor); under the lock again, the new record (and,
//! for a volume, its export). While marked, the source refuses a Grant (so no host writes it
//! mid-copy, and with no grant no NBD open passes) and a DeleteVolume, and the target refuses a
//! CreateVolume ([`OpError::CopyInProgress`]); a DeleteVolume of the target waits for the copy
//! to end, then deletes what it made. The copy runs in its own task: a caller that goes away
//! does not cut it short, and its retry finds the finished copy.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex as StdMutex, MutexGuard, PoisonError};
use std::time::Instant;

use bulkhead_storage_proto::{CreateSnapshot, VolumeId, VolumeReply};
use tokio::sync::{Mutex, MutexGuard as StateGuard, OwnedMutexGuard};

use super::{Node, OpError, State};
use crate::table::VolumeRecord;

/// The end of one copy, for a delete of its target to wait on.
#[derive(Clone)]
pub(super) struct CopyEnd(Arc<Mutex<()>>);

impl CopyEnd {
    /// Returns once the copy ended (recorded or failed).
    pub(super) async fn ended(&self) {
        let _ = self.0.lock().await;
    }
}

/// What a volume is to the copies in progress.
pub(super) enum Busy {
    /// Being read by at least one copy.
    Source,
    /// Being made by a copy.
    Target(CopyEnd),
}

enum Mark {
    Source(u32),
    Target(CopyEnd),
}

/// The volumes copies in progress hold. Marks are added only under the node's lock (after the
/// checks they depend on) and removed when a copy ends.
#[derive(Default)]
pub(super) struct Copies {
    marks: StdMutex<BTreeMap<VolumeId, Mark>>,
    /// Test hook: the next copy reports that it started, then waits to be resumed.
    #[cfg(test)]
    pause: StdMutex<
        Option<(
            tokio::sync::oneshot::Sender<()>,
            tokio::sync::oneshot::Receiver<()>,
        )>,
    >,
}

impl Copies {
    fn marks(&self) -> MutexGuard<'_, BTreeMap<VolumeId, Mark>> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether (and how) a copy in progress holds `id`.
    pub(super) fn busy(&self, id: &VolumeId) -> Option<Busy> {
        match self.marks().get(id)? {
            Mark::Source(_) => Some(Busy::Source),
            Mark::Target(end) => Some(Busy::Target(end.clone())),
        }
    }

    /// Marks a copy from `source` to `target`; the caller holds the node's lock. Several copies
    /// may read one source; a target is made by one copy.
    fn begin(self: &Arc<Self>, source: &VolumeId, target: &VolumeId) -> Result<CopyGuard, OpError> {
        let mut m = self.marks();
        if m.contains_key(target) || matches!(m.get(source), Some(Mark::Target(_))) {
            return Err(OpError::CopyInProgress(target.clone()));
        }
        let end = Arc::new(Mutex::new(()));
        let held = Arc::clone(&end)
            .try_lock_owned()
            .map_err(|_| OpError::CopyInProgress(target.clone()))?;
        m.insert(target.clone(), Mark::Target(CopyEnd(end)));
        if let Mark::Source(n) = m.entry(source.clone()).or_insert(Mark::Source(0)) {
            *n = n.saturating_add(1);
        }
        Ok(CopyGuard {
            copies: Arc::clone(self),
            source: source.clone(),
            target: target.clone(),
            _held: held,
        })
    }

    async fn pause_point(&self) {
        #[cfg(test)]
        {
            let p = self
                .pause
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some((started, resume)) = p {
                let _ = started.send(());
                let _ = resume.await;
            }
        }
    }
}

/// One copy's marks; dropping it (the copy recorded, failed, or its task gone) removes them,
/// then wakes deletes waiting for the target.
struct CopyGuard {
    copies: Arc<Copies>,
    source: VolumeId,
    target: VolumeId,
    _held: OwnedMutexGuard<()>,
}

impl Drop for CopyGuard {
    fn drop(&mut self) {
        let mut m = self.copies.marks();
        m.remove(&self.target);
        if let Some(Mark::Source(n)) = m.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

impl Node {
    /// Takes a snapshot of a volume no host holds: not granted, no live connection (so nothing
    /// is in flight and every acknowledged write is in the engine's storage); no Grant can come
    /// between the check and the end of the copy (the volume is marked). File engine: a
    /// reflink, or a sparse copy of the allocated extents, fsync'd; RBD: `snap create` +
    /// `clone`. The snapshot is recorded but never exported.
    pub async fn snapshot(self: &Arc<Self>, r: &CreateSnapshot) -> Result<VolumeReply, OpError> {
        let st = self.state.lock().await;
        if let Some(rec) = st.table.get(&r.snapshot_id) {
            if rec.deleting {
                return Err(OpError::Deleting(r.snapshot_id.clone()));
            }
            return Ok(VolumeReply {
                volume: rec.view(0),
                cut_connections: 0,
            });
        }
        let src = st
            .table
            .get(&r.volume_id)
            .filter(|v| !v.deleting)
            .cloned()
            .ok_or_else(|| OpError::UnknownVolume(r.volume_id.clone()))?;
        let connections = self.conns.count(&r.volume_id);
        if src.granted_to.is_some() || connections > 0 {
            return Err(OpError::VolumeInUse {
                id: r.volume_id.clone(),
                connections,
            });
        }
        let snap = VolumeRecord {
            volume_id: r.snapshot_id.clone(),
            size_bytes: src.size_bytes,
            location: src.location.clone(),
            generation: 0,
            granted_to: None,
            deleting: false,
        };
        let guard = self.copies.begin(&src.volume_id, &snap.volume_id)?;
        let cfg = st.engine.cfg.clone();
        drop(st);
        let node = Arc::clone(self);
        let id = snap.volume_id.clone();
        tokio::spawn(async move {
            let _guard = guard;
            node.copies.pause_point().await;
            let started = Instant::now();
            cfg.snapshot_storage(&src, &snap).await?;
            let copied = started.elapsed();
            let mut st = node.state.lock().await;
            let mut next = st.table.clone();
            next.insert(snap.clone());
            if let Err(e) = node.save(&next) {
                // Never recorded: the copy must not outlive the failed call (a retry copies
                // again).
                if let Err(r) = cfg.remove_storage(&snap).await {
                    tracing::error!(snapshot = %snap.volume_id, error = %r, "an unrecorded snapshot's copy could not be removed");
                }
                return Err(e);
            }
            st.table = next;
            tracing::info!(volume = %src.volume_id, snapshot = %snap.volume_id, ms = copied.as_millis(), "snapshot taken");
            Ok(VolumeReply {
                volume: snap.view(0),
                cut_connections: 0,
            })
        })
        .await
        .map_err(|_| OpError::CopyAborted(id))?
    }

    /// The new volume `rec` as a copy of the snapshot `snap_id` (at least its size), exported
    /// once recorded. `st` is the node's lock, taken by [`Node::create`]'s checks.
    pub(super) async fn clone_from(
        self: &Arc<Self>,
        st: StateGuard<'_, State>,
        snap_id: &VolumeId,
        rec: VolumeRecord,
    ) -> Result<VolumeReply, OpError> {
        let from = st
            .table
            .get(snap_id)
            .filter(|s| !s.deleting)
            .cloned()
            .ok_or_else(|| OpError::UnknownVolume(snap_id.clone()))?;
        if rec.size_bytes < from.size_bytes {
            return Err(OpError::SmallerThanSnapshot {
                snapshot: snap_id.clone(),
                have: from.size_bytes,
            });
        }
        let guard = self.copies.begin(&from.volume_id, &rec.volume_id)?;
        let cfg = st.engine.cfg.clone();
        drop(st);
        let node = Arc::clone(self);
        let id = rec.volume_id.clone();
        tokio::spawn(async move {
            let _guard = guard;
            node.copies.pause_point().await;
            cfg.clone_storage(&from, &rec).await?;
            let mut st = node.state.lock().await;
            node.record_and_export(&mut st, &rec).await?;
            tracing::info!(volume = %rec.volume_id, snapshot = %from.volume_id, size = rec.size_bytes, engine = rec.location.engine().name(), "volume created from a snapshot");
            Ok(VolumeReply {
                volume: rec.view(0),
                cut_connections: 0,
            })
        })
        .await
        .map_err(|_| OpError::CopyAborted(id))?
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::{FileExt, PermissionsExt};
    use std::time::Duration;

    use bulkhead_storage_proto::{CreateVolume, DeleteVolume, Grant, HostName};

    use super::*;
    use crate::engine::EngineConfig;
    use crate::node::OpenRefusal;

    fn vid(s: &str) -> VolumeId {
        VolumeId::new(s).unwrap()
    }

    fn grant(v: &str, generation: u64) -> Grant {
        Grant {
            volume_id: vid(v),
            host: HostName::new("host-1").unwrap(),
            generation,
        }
    }

    /// Pauses the next copy: returns (started, resume).
    fn pause(
        node: &Node,
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (resume_tx, resume_rx) = tokio::sync::oneshot::channel();
        *node.copies.pause.lock().unwrap() = Some((started_tx, resume_rx));
        (started_rx, resume_tx)
    }

    /// Within a bound: the node's lock is not held by the paused copy (a hang fails the test).
    async fn soon<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("served while a copy is in progress")
    }

    /// While a snapshot's copy is paused mid-way: another volume is granted and created, the
    /// source refuses a grant (so it cannot be exported to a host) and a delete with the typed
    /// error; once the copy ended, the snapshot holds the source's bytes and the source is
    /// granted. While a volume is being made from the snapshot, the snapshot refuses a delete
    /// and a delete of the new volume waits for the copy, then deletes it.
    #[test]
    fn a_copy_runs_without_the_node_lock_and_holds_its_ends() {
        let qsd = std::path::Path::new("/usr/bin/qemu-storage-daemon");
        if !qsd.exists() {
            eprintln!("skipped: no qemu-storage-daemon");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (state, run, data) = (
            dir.path().join("state"),
            dir.path().join("run"),
            dir.path().join("data"),
        );
        for d in [&state, &run, &data] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        let cfg = EngineConfig {
            qsd: qsd.to_path_buf(),
            run_dir: run,
            data_dir: data,
            ceph: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (audit, _) = bulkhead_audit::AuditLog::open(&dir.path().join("audit.log")).unwrap();
            let (node, mut child, _) = Node::open(&state, cfg.clone(), audit).await.unwrap();
            let create = |id: &str, source: Option<&str>| CreateVolume {
                volume_id: vid(id),
                size_bytes: 8 << 20,
                source: source.map(vid),
            };
            node.create(&create("vol-src", None)).await.unwrap();
            node.create(&create("vol-other", None)).await.unwrap();
            let src_file = cfg.volume_file(&vid("vol-src"));
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&src_file)
                .unwrap();
            f.write_all_at(b"before the snapshot", 1 << 20).unwrap();
            f.sync_all().unwrap();

            let (started, resume) = pause(&node);
            let n = Arc::clone(&node);
            let snap = tokio::spawn(async move {
                n.snapshot(&CreateSnapshot {
                    snapshot_id: vid("snap-1"),
                    volume_id: vid("vol-src"),
                })
                .await
            });
            started.await.unwrap();

            // Another volume's operations are served meanwhile.
            soon(node.grant(&grant("vol-other", 1))).await.unwrap();
            soon(node.create(&create("vol-new", None))).await.unwrap();
            assert_eq!(
                soon(node.list()).await.volumes.len(),
                3,
                "no snapshot recorded yet"
            );
            // The source is held: no grant (hence no export to a host), no delete.
            let r = soon(node.grant(&grant("vol-src", 1))).await;
            assert!(matches!(r, Err(OpError::CopyInProgress(_))), "{r:?}");
            assert_eq!(r.unwrap_err().code().as_str(), "copy_in_progress");
            let r = soon(node.delete(&DeleteVolume {
                volume_id: vid("vol-src"),
            }))
            .await;
            assert!(matches!(r, Err(OpError::CopyInProgress(_))), "{r:?}");
            let host = HostName::new("host-1").unwrap();
            assert_eq!(
                soon(node.open_for(&vid("vol-src"), &host)).await.err(),
                Some(OpenRefusal::NotGranted)
            );
            // A second snapshot under the same id is refused, not run twice.
            let r = soon(node.snapshot(&CreateSnapshot {
                snapshot_id: vid("snap-1"),
                volume_id: vid("vol-src"),
            }))
            .await;
            assert!(matches!(r, Err(OpError::CopyInProgress(_))), "{r:?}");

            resume.send(()).unwrap();
            snap.await.unwrap().unwrap();
            let snap_file = cfg.volume_file(&vid("snap-1"));
            let mut got = [0u8; 19];
            std::fs::File::open(&snap_file)
                .unwrap()
                .read_exact_at(&mut got, 1 << 20)
                .unwrap();
            assert_eq!(&got, b"before the snapshot");
            node.grant(&grant("vol-src", 1)).await.unwrap();

            // A volume from the snapshot: the snapshot is held, the new volume's delete waits.
            let (started, resume) = pause(&node);
            let n = Arc::clone(&node);
            let clone =
                tokio::spawn(async move { n.create(&create("vol-clone", Some("snap-1"))).await });
            started.await.unwrap();
            let r = soon(node.delete(&DeleteVolume {
                volume_id: vid("snap-1"),
            }))
            .await;
            assert!(matches!(r, Err(OpError::CopyInProgress(_))), "{r:?}");
            let r = soon(node.create(&create("vol-clone", None))).await;
            assert!(matches!(r, Err(OpError::CopyInProgress(_))), "{r:?}");
            let n = Arc::clone(&node);
            let del = tokio::spawn(async move {
                n.delete(&DeleteVolume {
                    volume_id: vid("vol-clone"),
                })
                .await
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(!del.is_finished(), "the delete waits for the copy");
            resume.send(()).unwrap();
            clone.await.unwrap().unwrap();
            let d = soon(del).await.unwrap().unwrap();
            assert!(d.deleted, "what the copy made is deleted");
            assert!(!cfg.volume_file(&vid("vol-clone")).exists());
            node.delete(&DeleteVolume {
                volume_id: vid("snap-1"),
            })
            .await
            .unwrap();
            let _ = child.kill().await;
        });
    }
}
