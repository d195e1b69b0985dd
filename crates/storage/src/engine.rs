//! The storage engines, through one supervised qemu-storage-daemon child.
//!
//! The node writes no storage engine. Each volume is a block node of qemu-storage-daemon
//! (`blockdev-add`: QEMU's `file` driver over a raw sparse file, or its `rbd` driver over a Ceph
//! RBD image) exported over NBD on a unix socket in the node's private run directory
//! (`block-export-add`, writable). Only the node connects to that socket; hosts reach an export
//! through the node's TLS listener, which checks the grant first.
//!
//! The child gets `PR_SET_PDEATHSIG` = SIGKILL, so it dies with the node; a stale child of an
//! earlier run (its pid file names our QMP socket in its command line) is killed at start. If
//! the child dies, [`Engine::restart`] starts a new one and re-adds every export from the table.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bulkhead_storage_proto::VolumeId;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::qmp::{Qmp, QmpClass, QmpError};
use crate::table::{Location, VolumeRecord};

mod copy;

/// How long a deleted export may take to drain its in-flight requests.
pub const EXPORT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the child may take to open its QMP socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// The QMP secret object holding the Ceph client key.
const CEPH_SECRET_ID: &str = "ceph-key";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("qemu-storage-daemon is not running")]
    Down,
    #[error("could not start qemu-storage-daemon: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("qemu-storage-daemon did not open its QMP socket in time")]
    StartTimeout,
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("storage i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} exists with another size ({1} bytes)")]
    SizeMismatch(VolumeId, u64),
    #[error("{tool} failed for {volume} (exit {status:?})")]
    Tool {
        tool: &'static str,
        volume: VolumeId,
        status: Option<i32>,
    },
    #[error("ceph keyring {0} holds no `key = ...` line")]
    NoCephKey(PathBuf),
    #[error("volume {0} is on {1:?}, but this node serves {2:?}")]
    WrongEngine(VolumeId, Location, Location),
}

/// The Ceph cluster of the rbd engine.
#[derive(Debug, Clone)]
pub struct CephConfig {
    pub conf: PathBuf,
    pub pool: String,
    /// Client id without `client.` (e.g. `bulkhead`).
    pub id: String,
    pub keyring: PathBuf,
}

/// Where and how the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub qsd: PathBuf,
    /// Private (0700) directory for the QMP and NBD sockets and the pid file.
    pub run_dir: PathBuf,
    /// Directory of the file engine's volume files.
    pub data_dir: PathBuf,
    /// Present for the rbd engine; new volumes then go to Ceph.
    pub ceph: Option<CephConfig>,
}

impl EngineConfig {
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qsd-qmp.sock")
    }

    /// qemu-storage-daemon's NBD socket (plain NBD; only the node connects).
    pub fn nbd_socket(&self) -> PathBuf {
        self.run_dir.join("qsd-nbd.sock")
    }

    fn pid_file(&self) -> PathBuf {
        self.run_dir.join("qsd.pid")
    }

    /// A volume file of the file engine.
    pub fn volume_file(&self, id: &VolumeId) -> PathBuf {
        self.data_dir.join(format!("{id}.raw"))
    }

    /// Where new volumes go.
    pub fn new_location(&self) -> Location {
        match &self.ceph {
            Some(c) => Location::Rbd {
                pool: c.pool.clone(),
            },
            None => Location::File,
        }
    }

    /// Discards and releases the volume's storage (file removed / RBD image removed). An
    /// already absent storage is not an error. Touches only storage (never the QMP monitor),
    /// so a copy that failed without the node's lock removes what it made with it.
    pub async fn remove_storage(&self, rec: &VolumeRecord) -> Result<(), EngineError> {
        match &rec.location {
            Location::File => {
                let path = self.volume_file(&rec.volume_id);
                match std::fs::remove_file(&path) {
                    Ok(()) => sync_dir(&self.data_dir),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(io_err(&path)(e)),
                }
            }
            Location::Rbd { pool } => {
                let Some(c) = &self.ceph else {
                    return Err(EngineError::Down);
                };
                if rbd_size(c, &rec.volume_id).await?.is_none() {
                    return Ok(());
                }
                let spec = format!("{pool}/{}", rec.volume_id);
                // The image's own snapshots (one per snapshot or volume made from it): those
                // with clone-format-2 children go to Ceph's snapshot trash.
                run_tool(
                    "rbd snap purge",
                    &rec.volume_id,
                    rbd_cmd(c)
                        .arg("snap")
                        .arg("purge")
                        .arg("--no-progress")
                        .arg(&spec),
                )
                .await?;
                let out = rbd_cmd(c)
                    .arg("rm")
                    .arg("--no-progress")
                    .arg(&spec)
                    .stderr(Stdio::null())
                    .output()
                    .await
                    .map_err(EngineError::Spawn)?;
                match out.status.code() {
                    Some(0) => {}
                    // ENOTEMPTY: clones (a snapshot, or volumes made from it) still share its
                    // objects; it leaves the pool's namespace for the RBD trash, and a later
                    // purge removes it once its last clone is gone.
                    Some(39) => {
                        run_tool(
                            "rbd trash mv",
                            &rec.volume_id,
                            rbd_cmd(c).arg("trash").arg("mv").arg(&spec),
                        )
                        .await?;
                        tracing::info!(volume = %rec.volume_id, "image with clones moved to the rbd trash");
                        return Ok(());
                    }
                    status => {
                        return Err(EngineError::Tool {
                            tool: "rbd rm",
                            volume: rec.volume_id.clone(),
                            status,
                        })
                    }
                }
                // Parents this image was the last clone of can go now (best effort).
                let purged = rbd_cmd(c)
                    .arg("trash")
                    .arg("purge")
                    .arg("--no-progress")
                    .arg(pool)
                    .stderr(Stdio::null())
                    .status()
                    .await;
                tracing::debug!(volume = %rec.volume_id, ?purged, "rbd trash purged");
                Ok(())
            }
        }
    }
}

/// The running child.
pub struct Qsd {
    pub pid: u32,
    qmp: Qmp,
    /// Which start this is (1, 2, ...): the supervisor ignores exits of older children.
    pub instance: u64,
}

/// The engine: configuration and the child, if running.
pub struct Engine {
    pub cfg: EngineConfig,
    qsd: Option<Qsd>,
    starts: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the `key = …` of a Ceph keyring (the operator's file; the key goes to the child as a
/// QMP secret, never on a command line).
fn ceph_key(keyring: &Path) -> Result<String, EngineError> {
    let text = std::fs::read_to_string(keyring).map_err(io_err(keyring))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("key"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|k| k.trim().to_string())
        .find(|k| !k.is_empty())
        .ok_or_else(|| EngineError::NoCephKey(keyring.to_path_buf()))
}

/// Kills a qemu-storage-daemon left by an earlier run of this node (identified by our QMP
/// socket path in its command line), so its locks and sockets are free.
fn kill_stale(cfg: &EngineConfig) {
    let Ok(pid) = std::fs::read_to_string(cfg.pid_file()) else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return;
    };
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let sock = cfg.qmp_socket();
            let needle = sock.as_os_str().as_encoded_bytes();
            c.windows(needle.len()).any(|w| w == needle)
        })
        .unwrap_or(false);
    if !ours {
        return;
    }
    tracing::warn!(pid, "killing a qemu-storage-daemon left by an earlier run");
    // SAFETY: kill has no memory-safety preconditions; the pid was checked to be our child's.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Engine {
        Engine {
            cfg,
            qsd: None,
            starts: 0,
        }
    }

    pub fn running(&self) -> Option<(u32, u64)> {
        self.qsd.as_ref().map(|q| (q.pid, q.instance))
    }

    /// Forgets the child (it died); the next [`Engine::start`] makes a new one.
    pub fn mark_dead(&mut self, instance: u64) -> bool {
        if self.qsd.as_ref().map(|q| q.instance) == Some(instance) {
            self.qsd = None;
            true
        } else {
            false
        }
    }

    /// Starts the child and returns it (for the supervisor to wait on) and its instance.
    pub async fn start(&mut self) -> Result<(Child, u64), EngineError> {
        kill_stale(&self.cfg);
        for s in [self.cfg.qmp_socket(), self.cfg.nbd_socket()] {
            let _ = std::fs::remove_file(&s);
        }
        let mut cmd = Command::new(&self.cfg.qsd);
        cmd.arg("--chardev")
            .arg(format!(
                "socket,id=qmp,path={},server=on,wait=off",
                self.cfg.qmp_socket().display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp")
            .arg("--nbd-server")
            .arg(format!(
                "addr.type=unix,addr.path={},max-connections=0",
                self.cfg.nbd_socket().display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(false);
        // SAFETY: the closure runs in the forked child before exec and calls only prctl, which
        // is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(EngineError::Spawn)?;
        let pid = child.id().unwrap_or(0);
        std::fs::write(self.cfg.pid_file(), format!("{pid}\n"))
            .map_err(io_err(&self.cfg.pid_file()))?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut qmp = loop {
            match Qmp::connect(&self.cfg.qmp_socket()).await {
                Ok(q) => break q,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_) => return Err(EngineError::StartTimeout),
            }
        };
        if let Some(c) = &self.cfg.ceph {
            let key = ceph_key(&c.keyring)?;
            qmp.execute(
                "object-add",
                json!({"qom-type": "secret", "id": CEPH_SECRET_ID, "data": key, "format": "base64"}),
            )
            .await?;
        }
        self.starts += 1;
        let instance = self.starts;
        tracing::info!(pid, instance, "qemu-storage-daemon started");
        self.qsd = Some(Qsd { pid, qmp, instance });
        Ok((child, instance))
    }

    fn qmp(&mut self) -> Result<&mut Qmp, EngineError> {
        self.qsd
            .as_mut()
            .map(|q| &mut q.qmp)
            .ok_or(EngineError::Down)
    }

    /// Creates the volume's storage, or accepts an existing one of the same size.
    pub async fn create_storage(&self, rec: &VolumeRecord) -> Result<(), EngineError> {
        self.cfg.check_location(rec)?;
        match &rec.location {
            Location::File => {
                let path = self.cfg.volume_file(&rec.volume_id);
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(io_err(&path))?;
                let len = f.metadata().map_err(io_err(&path))?.len();
                if len == 0 {
                    f.set_len(rec.size_bytes).map_err(io_err(&path))?;
                } else if len != rec.size_bytes {
                    return Err(EngineError::SizeMismatch(rec.volume_id.clone(), len));
                }
                f.sync_all().map_err(io_err(&path))?;
                sync_dir(&self.cfg.data_dir)?;
                Ok(())
            }
            Location::Rbd { .. } => {
                let Some(c) = &self.cfg.ceph else {
                    return Err(EngineError::Down);
                };
                if let Some(size) = rbd_size(c, &rec.volume_id).await? {
                    if size != rec.size_bytes {
                        return Err(EngineError::SizeMismatch(rec.volume_id.clone(), size));
                    }
                    return Ok(());
                }
                let spec = format!("{}/{}", c.pool, rec.volume_id);
                run_tool(
                    "rbd create",
                    &rec.volume_id,
                    rbd_cmd(c)
                        .arg("create")
                        .arg("--size")
                        .arg(format!("{}B", rec.size_bytes))
                        .arg(&spec),
                )
                .await
            }
        }
    }

    /// Discards and releases the volume's storage ([`EngineConfig::remove_storage`]).
    pub async fn remove_storage(&self, rec: &VolumeRecord) -> Result<(), EngineError> {
        self.cfg.remove_storage(rec).await
    }

    /// Adds the volume's block node and its writable NBD export (named by the volume id).
    pub async fn add_export(&mut self, rec: &VolumeRecord) -> Result<(), EngineError> {
        self.cfg.check_location(rec)?;
        let id = rec.volume_id.as_str().to_string();
        let node = match &rec.location {
            Location::File => json!({
                "driver": "file",
                "node-name": id,
                "filename": self.cfg.volume_file(&rec.volume_id),
                "discard": "unmap",
            }),
            Location::Rbd { pool } => {
                let Some(c) = &self.cfg.ceph else {
                    return Err(EngineError::Down);
                };
                json!({
                    "driver": "rbd",
                    "node-name": id,
                    "pool": pool,
                    "image": id,
                    "conf": c.conf,
                    "user": c.id,
                    "key-secret": CEPH_SECRET_ID,
                    "discard": "unmap",
                    // No librbd writeback cache: a write is answered once the OSDs committed it,
                    // so an engine killed between a write's answer and the next flush loses
                    // nothing the card was told was written.
                    "cache": { "direct": true },
                })
            }
        };
        let qmp = self.qmp()?;
        qmp.execute("blockdev-add", node).await?;
        let export = json!({
            "type": "nbd",
            "id": id,
            "node-name": id,
            "name": id,
            "writable": true,
        });
        if let Err(e) = qmp.execute("block-export-add", export).await {
            let _ = qmp.execute("blockdev-del", json!({"node-name": id})).await;
            return Err(e.into());
        }
        Ok(())
    }

    /// Removes the volume's export, cutting qemu-storage-daemon's own connections to it, and
    /// waits until the export is gone, which QEMU reports only after the requests in flight on
    /// it have completed; then removes the block node. Absent exports and nodes are fine.
    pub async fn remove_export(&mut self, id: &VolumeId) -> Result<(), EngineError> {
        let qmp = self.qmp()?;
        let name = id.as_str().to_string();
        match qmp
            .execute("block-export-del", json!({"id": name, "mode": "hard"}))
            .await
        {
            Ok(_) => {
                let want = name.clone();
                qmp.wait_event(
                    "BLOCK_EXPORT_DELETED",
                    move |d| d.get("id").and_then(Value::as_str) == Some(&want),
                    EXPORT_DRAIN_TIMEOUT,
                )
                .await?;
            }
            Err(QmpError::Command {
                class: QmpClass::GenericError | QmpClass::DeviceNotFound,
                ..
            }) => {}
            Err(e) => return Err(e.into()),
        }
        match qmp
            .execute("blockdev-del", json!({"node-name": name}))
            .await
        {
            Ok(_)
            | Err(QmpError::Command {
                class: QmpClass::GenericError | QmpClass::DeviceNotFound,
                ..
            }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The size of an RBD image, `None` when there is none.
async fn rbd_size(c: &CephConfig, id: &VolumeId) -> Result<Option<u64>, EngineError> {
    let out = rbd_cmd(c)
        .arg("info")
        .arg("--format")
        .arg("json")
        .arg(format!("{}/{}", c.pool, id))
        .stderr(Stdio::null())
        .output()
        .await
        .map_err(EngineError::Spawn)?;
    if !out.status.success() {
        // ENOENT (2): no such image.
        if out.status.code() == Some(2) {
            return Ok(None);
        }
        return Err(EngineError::Tool {
            tool: "rbd info",
            volume: id.clone(),
            status: out.status.code(),
        });
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|_| EngineError::Tool {
        tool: "rbd info",
        volume: id.clone(),
        status: out.status.code(),
    })?;
    Ok(v.get("size").and_then(Value::as_u64))
}

fn rbd_cmd(c: &CephConfig) -> Command {
    let mut cmd = Command::new("rbd");
    cmd.arg("--conf")
        .arg(&c.conf)
        .arg("--id")
        .arg(&c.id)
        .arg("--keyring")
        .arg(&c.keyring)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    cmd
}

async fn run_tool(tool: &'static str, id: &VolumeId, cmd: &mut Command) -> Result<(), EngineError> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(EngineError::Spawn)?;
    if out.status.success() {
        return Ok(());
    }
    tracing::warn!(
        tool,
        volume = %id,
        stderr = %String::from_utf8_lossy(&out.stderr),
        "engine tool failed"
    );
    Err(EngineError::Tool {
        tool,
        volume: id.clone(),
        status: out.status.code(),
    })
}

fn sync_dir(dir: &Path) -> Result<(), EngineError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_the_key_of_a_ceph_keyring() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(
            &p,
            "[client.bulkhead]\n\tkey = AQBx1234==\n\tcaps mon = \"profile rbd\"\n",
        )
        .unwrap();
        assert_eq!(ceph_key(&p).unwrap(), "AQBx1234==");
        std::fs::write(&p, "[client.bulkhead]\n").unwrap();
        assert!(matches!(ceph_key(&p), Err(EngineError::NoCephKey(_))));
    }
}
