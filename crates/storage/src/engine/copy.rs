//! Copies of volumes (snapshots, and volumes made from them). They read and write only the
//! engine's storage (files, or RBD images through the `rbd` tool), never its QMP monitor, so
//! they are methods of the [`EngineConfig`]: the node runs them without its lock (see
//! `crate::node`), and a multi-GiB copy does not hold up other volumes' operations.

use std::path::Path;
use std::process::Stdio;

use super::{io_err, rbd_cmd, rbd_size, run_tool, sync_dir, EngineConfig, EngineError};
use crate::table::{Location, VolumeRecord};

impl EngineConfig {
    pub(super) fn check_location(&self, rec: &VolumeRecord) -> Result<(), EngineError> {
        let here = self.new_location();
        let ok = match (&rec.location, &here) {
            (Location::File, _) => true,
            (Location::Rbd { pool }, Location::Rbd { pool: p }) => pool == p,
            (Location::Rbd { .. }, Location::File) => false,
        };
        if ok {
            Ok(())
        } else {
            Err(EngineError::WrongEngine(
                rec.volume_id.clone(),
                rec.location.clone(),
                here,
            ))
        }
    }

    /// Copies `src`'s blocks to the new snapshot `snap` (same engine). File: a reflink where
    /// the filesystem has one (XFS, btrfs), else a sparse copy of the allocated extents, fsync'd
    /// with its directory. RBD: `rbd snap create SRC@SNAP` and a clone-format-2 `rbd clone` of it
    /// as the image SNAP (copy-on-write; Ceph keeps the shared objects).
    pub async fn snapshot_storage(
        &self,
        src: &VolumeRecord,
        snap: &VolumeRecord,
    ) -> Result<(), EngineError> {
        self.check_location(src)?;
        let made = self.copy_storage(src, snap).await;
        self.discard_failed(made, snap).await
    }

    /// Makes the new volume `rec` from the snapshot `snap`: the same cheap copy as
    /// [`EngineConfig::snapshot_storage`], grown to `rec.size_bytes`.
    pub async fn clone_storage(
        &self,
        snap: &VolumeRecord,
        rec: &VolumeRecord,
    ) -> Result<(), EngineError> {
        self.check_location(snap)?;
        self.check_location(rec)?;
        let made = async {
            self.copy_storage(snap, rec).await?;
            self.grow_storage(snap, rec).await
        }
        .await;
        self.discard_failed(made, rec).await
    }

    /// `made`, after a failed copy removed what it left of `to` (a partial file or image, never
    /// recorded: a retry starts again from nothing).
    async fn discard_failed(
        &self,
        made: Result<(), EngineError>,
        to: &VolumeRecord,
    ) -> Result<(), EngineError> {
        if let Err(e) = &made {
            match self.remove_storage(to).await {
                Ok(()) => {
                    tracing::warn!(volume = %to.volume_id, error = %e, "copy failed; its partial target removed")
                }
                Err(r) => {
                    tracing::error!(volume = %to.volume_id, error = %e, remove_error = %r, "copy failed and its partial target could not be removed")
                }
            }
        }
        made
    }

    /// Grows the copy `rec` of `snap` to `rec.size_bytes`.
    async fn grow_storage(
        &self,
        snap: &VolumeRecord,
        rec: &VolumeRecord,
    ) -> Result<(), EngineError> {
        if rec.size_bytes > snap.size_bytes {
            match &rec.location {
                Location::File => {
                    let path = self.volume_file(&rec.volume_id);
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io_err(&path))?;
                    f.set_len(rec.size_bytes).map_err(io_err(&path))?;
                    f.sync_all().map_err(io_err(&path))?;
                }
                Location::Rbd { pool } => {
                    let Some(c) = &self.ceph else {
                        return Err(EngineError::Down);
                    };
                    run_tool(
                        "rbd resize",
                        &rec.volume_id,
                        rbd_cmd(c)
                            .arg("resize")
                            .arg("--no-progress")
                            .arg("--size")
                            .arg(format!("{}B", rec.size_bytes))
                            .arg(format!("{pool}/{}", rec.volume_id)),
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }

    async fn copy_storage(
        &self,
        from: &VolumeRecord,
        to: &VolumeRecord,
    ) -> Result<(), EngineError> {
        match &from.location {
            Location::File => {
                let src = self.volume_file(&from.volume_id);
                let dst = self.volume_file(&to.volume_id);
                let (s, d) = (src.clone(), dst.clone());
                tokio::task::spawn_blocking(move || cheap_copy(&s, &d))
                    .await
                    .map_err(|_| EngineError::Io {
                        path: dst.clone(),
                        source: std::io::Error::other("copy task failed"),
                    })??;
                sync_dir(&self.data_dir)
            }
            Location::Rbd { pool } => {
                let Some(c) = &self.ceph else {
                    return Err(EngineError::Down);
                };
                if rbd_size(c, &to.volume_id).await?.is_some() {
                    // A retry after the clone was made but not yet recorded.
                    return Ok(());
                }
                let snap = format!("{pool}/{}@{}", from.volume_id, to.volume_id);
                let exists = rbd_cmd(c)
                    .arg("snap")
                    .arg("ls")
                    .arg(format!("{pool}/{}", from.volume_id))
                    .stderr(Stdio::null())
                    .output()
                    .await
                    .map_err(EngineError::Spawn)?;
                let listed = String::from_utf8_lossy(&exists.stdout)
                    .split_whitespace()
                    .any(|w| w == to.volume_id.as_str());
                if !listed {
                    run_tool(
                        "rbd snap create",
                        &to.volume_id,
                        rbd_cmd(c).arg("snap").arg("create").arg(&snap),
                    )
                    .await?;
                }
                run_tool(
                    "rbd clone",
                    &to.volume_id,
                    rbd_cmd(c)
                        .arg("clone")
                        .arg("--rbd-default-clone-format")
                        .arg("2")
                        .arg(&snap)
                        .arg(format!("{pool}/{}", to.volume_id)),
                )
                .await
            }
        }
    }
}

/// Copies `src` to a new `dst` cheaply: `FICLONE` (a reflink: no data copied) where the
/// filesystem supports it, else only the allocated extents (`SEEK_DATA`/`SEEK_HOLE`), so a sparse
/// volume stays sparse; then fsyncs `dst`.
fn cheap_copy(src: &Path, dst: &Path) -> Result<(), EngineError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let s = std::fs::File::open(src).map_err(io_err(src))?;
    let len = s.metadata().map_err(io_err(src))?.len();
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .map_err(io_err(dst))?;
    // SAFETY: both descriptors are open files owned by `s` and `d` for the whole call; FICLONE
    // reads no memory of ours.
    let cloned = unsafe { libc::ioctl(d.as_raw_fd(), libc::FICLONE, s.as_raw_fd()) } == 0;
    if !cloned {
        let mut buf = vec![0u8; 1 << 20];
        let mut pos: u64 = 0;
        while pos < len {
            let Ok(at) = libc::off_t::try_from(pos) else {
                break;
            };
            // SAFETY: lseek on an open descriptor; no memory is passed.
            let data = unsafe { libc::lseek(s.as_raw_fd(), at, libc::SEEK_DATA) };
            let data = match u64::try_from(data) {
                Ok(d) => d,
                Err(_) => {
                    let e = std::io::Error::last_os_error();
                    match e.raw_os_error() {
                        // No data after `pos`: the rest is a hole.
                        Some(libc::ENXIO) => break,
                        // No SEEK_DATA on this file system: the rest counts as data.
                        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => pos,
                        // Anything else (EIO, ...) fails the copy: never a silent hole.
                        _ => {
                            return Err(EngineError::Io {
                                path: src.to_path_buf(),
                                source: e,
                            })
                        }
                    }
                }
            };
            let Ok(at) = libc::off_t::try_from(data) else {
                break;
            };
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(s.as_raw_fd(), at, libc::SEEK_HOLE) };
            let end = u64::try_from(hole).unwrap_or(len).min(len);
            let mut off = data;
            while off < end {
                let want = usize::try_from(end - off)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let chunk = buf.get_mut(..want).ok_or_else(|| EngineError::Io {
                    path: src.to_path_buf(),
                    source: std::io::Error::other("buffer"),
                })?;
                s.read_exact_at(chunk, off).map_err(io_err(src))?;
                d.write_all_at(chunk, off).map_err(io_err(dst))?;
                off += u64::try_from(want).unwrap_or(0);
            }
            pos = end.max(data.saturating_add(1));
        }
    }
    d.set_len(len).map_err(io_err(dst))?;
    d.sync_all().map_err(io_err(dst))?;
    tracing::debug!(src = %src.display(), dst = %dst.display(), reflink = cloned, bytes = len, "volume copied");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A copy that fails after its target was created (the source's reads fail: it is a
    /// directory) leaves no partial target behind, for a snapshot and for a clone.
    #[test]
    fn a_failed_copy_removes_its_partial_target() {
        use bulkhead_storage_proto::VolumeId;
        let dir = tempfile::tempdir().unwrap();
        let cfg = EngineConfig {
            qsd: "/nonexistent/qsd".into(),
            run_dir: dir.path().join("run"),
            data_dir: dir.path().to_path_buf(),
            ceph: None,
        };
        let rec = |id: &str, size_bytes: u64| VolumeRecord {
            volume_id: VolumeId::new(id).unwrap(),
            size_bytes,
            location: Location::File,
            generation: 0,
            granted_to: None,
            deleting: false,
        };
        let src = rec("vol-src", 1 << 20);
        let bad = cfg.volume_file(&src.volume_id);
        std::fs::create_dir(&bad).unwrap();
        std::fs::write(bad.join("entry"), b"x").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let snap = rec("snap-1", 1 << 20);
            let r = cfg.snapshot_storage(&src, &snap).await;
            assert!(r.is_err(), "{r:?}");
            assert!(!cfg.volume_file(&snap.volume_id).exists());
            let clone = rec("vol-clone", 2 << 20);
            let r = cfg.clone_storage(&src, &clone).await;
            assert!(r.is_err(), "{r:?}");
            assert!(!cfg.volume_file(&clone.volume_id).exists());
        });
    }

    #[test]
    fn a_cheap_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let f = std::fs::File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"first", 4096).unwrap();
        f.write_all_at(&[7u8; 100_000], 40 << 20).unwrap();
        f.sync_all().unwrap();
        cheap_copy(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&b).unwrap().blocks();
        assert!(
            blocks * 512 < 8 << 20,
            "the copy stays sparse: {blocks} blocks"
        );
    }
}
