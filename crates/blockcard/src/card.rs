//! The card's life cycle.
//!
//! 1. Start-up (privileged): non-dumpable, read the host key file into a locked page, open the
//!    backing store, bind the control socket and the vhost-user socket.
//! 2. Wait on the control socket for `Attach`. A refused key is answered with an error and the
//!    card keeps waiting. On success the volume key exists only long enough to key one XTS
//!    context pair per queue, then it and the host key are zeroized.
//! 3. Lock down: mlockall(MCL_CURRENT), drop to `--uid/--gid`, no_new_privs, seccomp. Only then
//!    is `Attached` sent.
//! 4. Serve vhost-user frontends (one at a time; a reconnect gets fresh queue threads) while the
//!    control thread answers `GetMetrics`, and on `Detach` erases the keys, flushes, answers and
//!    exits.

use crate::backend::{BlockBackend, CipherState, QueueWorker, Volume, IO_LANES, MAX_QUEUES};
use crate::control::{
    self, AttachSpec, ControlError, ControlRequest, ControlResponse, ErrorCode, KeySource,
};
use crate::metrics::BlkMetrics;
use crate::nbd::{NbdClient, NbdConfig};
use crate::request::{DiskLimits, SectorCount, ID_LEN};
use crate::sandbox::{self, SandboxError};
use crate::store::{Backing, StoreError};
use crate::xts::{XtsCipher, XtsError};
use bulkhead_sealing::{fill_random, open_volume_key, HostKey, SealingError, VolumeKey};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{error, info, warn};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Start-up configuration (from the command line).
#[derive(Debug, Clone)]
pub struct CardConfig {
    pub control_socket: PathBuf,
    pub vhost_socket: PathBuf,
    pub backing: BackingSpec,
    pub read_only: bool,
    pub host_key: Option<PathBuf>,
    pub queues: u16,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Where the volume lives.
#[derive(Debug, Clone)]
pub enum BackingSpec {
    /// A local raw file or block device.
    File(PathBuf),
    /// An NBD export on a storage node (TLS, client certificate).
    Nbd(NbdConfig),
}

/// Card errors.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error("host key: {0}")]
    HostKey(#[source] SealingError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("binding {what} socket: {source}")]
    Bind {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("vhost-user: {0}")]
    Vhost(String),
    #[error("control: {0}")]
    Control(#[from] ControlError),
    #[error("queues must be 1..={MAX_QUEUES}")]
    Queues,
}

/// Why an attach was refused (sent back as the error message).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("key refused: {0}")]
    Key(#[from] SealingError),
    #[error("key refused: the card was started without --host-key, so it cannot open sealed keys")]
    NoHostKey,
    #[error("cipher setup: {0}")]
    Cipher(#[from] XtsError),
    #[error("backing store of {size} bytes holds no whole {sector}-byte sector")]
    TooSmall { size: u64, sector: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn bind_control(path: &PathBuf) -> Result<UnixListener, CardError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    let l = UnixListener::bind(path).map_err(|source| CardError::Bind {
        what: "control",
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        CardError::Bind {
            what: "control",
            source,
        }
    })?;
    Ok(l)
}

fn respond(stream: &mut UnixStream, resp: &ControlResponse) -> Result<(), ControlError> {
    control::write_frame(stream, &resp.encode())
}

fn err_resp(code: ErrorCode, message: String) -> ControlResponse {
    ControlResponse::Error { code, message }
}

/// Keys one cipher state per I/O lane (`queues * IO_LANES`) from the attach request.
fn key_queues(
    spec: &AttachSpec,
    host: Option<&HostKey>,
    queues: u16,
) -> Result<(Vec<CipherState>, bool), AttachError> {
    let lanes = usize::from(queues) * IO_LANES;
    let make = |key: &VolumeKey| -> Result<Vec<CipherState>, AttachError> {
        (0..lanes)
            .map(|_| {
                Ok(CipherState::Xts(Box::new(XtsCipher::new(
                    key.as_ref(),
                    spec.sector_size,
                )?)))
            })
            .collect()
    };
    match &spec.key {
        KeySource::Plain => Ok(((0..lanes).map(|_| CipherState::Plain).collect(), false)),
        KeySource::Ephemeral => {
            let mut key = VolumeKey::new().map_err(SealingError::from)?;
            loop {
                fill_random(key.as_mut())?;
                if key.as_ref()[..32] != key.as_ref()[32..] {
                    break;
                }
            }
            Ok((make(&key)?, true))
        }
        KeySource::Sealed(blob) => {
            let host = host.ok_or(AttachError::NoHostKey)?;
            let key = open_volume_key(host, spec.volume_id.as_str(), &blob[..])?;
            Ok((make(&key)?, true))
        }
    }
}

struct Attached {
    stream: UnixStream,
    backend: Arc<BlockBackend>,
}

fn wait_for_attach(
    cfg: &CardConfig,
    control: &UnixListener,
    host: Option<HostKey>,
    store: Backing,
    metrics: &Arc<BlkMetrics>,
) -> Result<Attached, CardError> {
    let mut store = Some(store);
    loop {
        let (mut stream, _) = control
            .accept()
            .map_err(|e| CardError::Control(ControlError::Io(e)))?;
        loop {
            let body = match control::read_frame(&mut stream) {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "bad control frame; closing connection");
                    let _ = respond(&mut stream, &err_resp(ErrorCode::BadRequest, e.to_string()));
                    break;
                }
            };
            let req = match ControlRequest::parse(&body) {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "bad control message");
                    if respond(&mut stream, &err_resp(ErrorCode::BadRequest, e.to_string()))
                        .is_err()
                    {
                        break;
                    }
                    continue;
                }
            };
            match req {
                ControlRequest::GetMetrics => {
                    if respond(
                        &mut stream,
                        &ControlResponse::Metrics(metrics_list(metrics)),
                    )
                    .is_err()
                    {
                        break;
                    }
                }
                ControlRequest::Detach => {
                    if respond(
                        &mut stream,
                        &err_resp(ErrorCode::NotAttached, "no volume attached".into()),
                    )
                    .is_err()
                    {
                        break;
                    }
                }
                ControlRequest::Attach(spec) => {
                    let Some(st) = store.take() else {
                        return Err(CardError::Vhost("store already consumed".into()));
                    };
                    let sector = spec.sector_size.bytes();
                    let whole = st.size_bytes() / sector * sector;
                    if whole == 0 {
                        let e = AttachError::TooSmall {
                            size: st.size_bytes(),
                            sector,
                        };
                        store = Some(st);
                        if respond(&mut stream, &err_resp(ErrorCode::BadRequest, e.to_string()))
                            .is_err()
                        {
                            break;
                        }
                        continue;
                    }
                    match key_queues(&spec, host.as_ref(), cfg.queues) {
                        Err(e) => {
                            warn!(volume = spec.volume_id.as_str(), error = %e, "attach refused");
                            store = Some(st);
                            if respond(&mut stream, &err_resp(ErrorCode::KeyRefused, e.to_string()))
                                .is_err()
                            {
                                break;
                            }
                        }
                        Ok((ciphers, encrypted)) => {
                            let mut workers = Vec::with_capacity(ciphers.len());
                            for c in ciphers {
                                workers.push(QueueWorker::new(c)?);
                            }
                            let mut serial = [0u8; ID_LEN];
                            for (d, s) in serial.iter_mut().zip(spec.volume_id.as_str().bytes()) {
                                *d = s;
                            }
                            let store_read_only = st.read_only();
                            let vol = Volume {
                                store: st,
                                limits: DiskLimits {
                                    capacity: SectorCount(whole / 512),
                                    align: sector / 512,
                                    read_only: cfg.read_only || store_read_only,
                                },
                                sector: spec.sector_size,
                                serial,
                            };
                            info!(
                                volume = spec.volume_id.as_str(),
                                encrypted,
                                sectors = whole / 512,
                                crypto_sector = sector,
                                queues = cfg.queues,
                                "volume keyed"
                            );
                            let backend = Arc::new(BlockBackend::new(
                                Arc::new(vol),
                                workers,
                                metrics.clone(),
                            )?);
                            // The host key is zeroized here: one card serves one volume.
                            drop(host);
                            let capacity = whole / 512;
                            lock_down(cfg)?;
                            // If the controller is gone, it reconnects and sees `AlreadyAttached`.
                            let _ = respond(
                                &mut stream,
                                &ControlResponse::Attached {
                                    capacity_sectors: capacity,
                                    encrypted,
                                },
                            );
                            return Ok(Attached { stream, backend });
                        }
                    }
                }
            }
        }
    }
}

fn lock_down(cfg: &CardConfig) -> Result<(), CardError> {
    if let Err(e) = sandbox::lock_current_memory() {
        warn!(error = %e, "mlockall(MCL_CURRENT) failed; the rest of the card may be swapped (key schedules are in their own locked pages)");
    }
    sandbox::drop_privileges(cfg.uid, cfg.gid)?;
    sandbox::install_seccomp(matches!(cfg.backing, BackingSpec::Nbd(_)))?;
    info!("sandbox in place: privileges dropped, no_new_privs, seccomp");
    Ok(())
}

fn metrics_list(m: &BlkMetrics) -> Vec<(String, u64)> {
    m.snapshot()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

fn serve_attached(
    control: UnixListener,
    first: UnixStream,
    backend: Arc<BlockBackend>,
    metrics: Arc<BlkMetrics>,
) {
    let mut stream = first;
    loop {
        loop {
            let body = match control::read_frame(&mut stream) {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    let _ = respond(&mut stream, &err_resp(ErrorCode::BadRequest, e.to_string()));
                    break;
                }
            };
            let resp = match ControlRequest::parse(&body) {
                Err(e) => err_resp(ErrorCode::BadRequest, e.to_string()),
                Ok(ControlRequest::GetMetrics) => ControlResponse::Metrics(metrics_list(&metrics)),
                Ok(ControlRequest::Attach(_)) => err_resp(
                    ErrorCode::AlreadyAttached,
                    "a volume is already attached".into(),
                ),
                Ok(ControlRequest::Detach) => {
                    backend.erase_keys();
                    if let Err(e) = backend.volume().store.flush() {
                        error!(error = %e, "flush at detach failed");
                    }
                    info!(
                        key_pages_wiped = crate::xts::key_pages_wiped(),
                        "keys erased; detached"
                    );
                    let _ = respond(&mut stream, &ControlResponse::Detached);
                    std::process::exit(0);
                }
            };
            if respond(&mut stream, &resp).is_err() {
                break;
            }
        }
        match control.accept() {
            Ok((s, _)) => stream = s,
            Err(e) => {
                error!(error = %e, "control accept failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// Runs the card until detach (which exits the process) or a fatal error.
pub fn run(cfg: CardConfig) -> Result<(), CardError> {
    sandbox::make_non_dumpable()?;
    if cfg.queues == 0 || cfg.queues > MAX_QUEUES {
        return Err(CardError::Queues);
    }
    let host = match &cfg.host_key {
        Some(p) => Some(HostKey::read_file(p).map_err(CardError::HostKey)?),
        None => None,
    };
    let metrics = Arc::new(BlkMetrics::default());
    let store = match &cfg.backing {
        BackingSpec::File(path) => {
            let store = Backing::open(path, cfg.read_only)?;
            info!(
                backing = %path.display(),
                bytes = store.size_bytes(),
                direct = store.is_direct(),
                read_only = cfg.read_only,
                "backing store open"
            );
            store
        }
        BackingSpec::Nbd(n) => Backing::Nbd(Box::new(
            NbdClient::connect(n, metrics.clone()).map_err(StoreError::from)?,
        )),
    };
    let control = bind_control(&cfg.control_socket)?;
    let mut listener = vhost::vhost_user::Listener::new(&cfg.vhost_socket, true)
        .map_err(|e| CardError::Vhost(e.to_string()))?;
    info!(control = %cfg.control_socket.display(), vhost = %cfg.vhost_socket.display(), "waiting for attach");

    let attached = wait_for_attach(&cfg, &control, host, store, &metrics)?;
    let backend = attached.backend.clone();
    // From here SIGTERM/SIGINT/SIGHUP are blocked in every thread (no other thread exists yet)
    // and taken by one waiter thread, so a terminated card zeroizes its keys before it exits.
    // SIGKILL cannot be caught; the kernel frees (and zeroes before reuse) the memory.
    sandbox::block_exit_signals()?;
    // Threads started from here inherit the sandbox and the signal mask (NBD: the connection
    // thread).
    backend.volume().store.start()?;
    backend
        .start_workers()
        .map_err(|e| CardError::Vhost(format!("starting I/O workers: {e}")))?;
    {
        let backend = backend.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = sandbox::wait_exit_signal();
                backend.erase_keys();
                let _ = backend.volume().store.flush();
                info!(
                    signal = sig,
                    key_pages_wiped = crate::xts::key_pages_wiped(),
                    "terminated; keys erased"
                );
                std::process::exit(0);
            })
            .map_err(|e| CardError::Vhost(e.to_string()))?;
    }
    {
        let backend = backend.clone();
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve_attached(control, attached.stream, backend, metrics))
            .map_err(|e| CardError::Vhost(e.to_string()))?;
    }

    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
        let mut daemon = VhostUserDaemon::new("bulkhead-blockcard".into(), backend.clone(), mem)
            .map_err(|e| CardError::Vhost(e.to_string()))?;
        daemon
            .start(&mut listener)
            .map_err(|e| CardError::Vhost(e.to_string()))?;
        info!("frontend connected");
        let res = daemon.wait();
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        // Requests still with the workers complete into this frontend's rings before the next
        // frontend is served.
        backend.quiesce();
        match res {
            Ok(()) => info!("frontend disconnected"),
            Err(e) => info!(reason = %e, "frontend disconnected"),
        }
    }
}
