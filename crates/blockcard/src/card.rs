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
//! 5. Card update: `HandOver` sends the volume state to the next card; after `HandedOver` the
//!    card erases its keys and exits once its frontend leaves, unless `CancelHandOver` came
//!    first (the update failed): then it keeps its key and serves on
//!    ([`crate::update_stage`]).

use crate::backend::{BlockBackend, CipherState, QueueWorker, Volume, IO_LANES, MAX_QUEUES};
use crate::control::{
    self, AttachSpec, ControlError, ControlRequest, ControlResponse, CryptoSectorSize, ErrorCode,
    KeySource, VolumeId,
};
use crate::handover::{self, HandoverError, RefusalReason, VolumeState};
use crate::metrics::BlkMetrics;
use crate::nbd::{NbdClient, NbdConfig};
use crate::request::{DiskLimits, SectorCount, ID_LEN};
use crate::sandbox::{self, SandboxError};
use crate::store::{Backing, StoreError};
use crate::update_stage::{CancelRefused, StageCell};
use crate::xts::{XtsCipher, XtsError};
use bulkhead_sealing::{fill_random, open_volume_key, HostKey, SealingError, VolumeKey};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{error, info, warn};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

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
    /// Card update: instead of waiting for `Attach`, take the volume state (key included) from
    /// the card being replaced over this inherited socketpair end ([`crate::handover`]).
    pub receive_state_fd: Option<RawFd>,
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
    #[error("receiving the volume state: {0}")]
    Receive(#[from] HandoverError),
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

/// The volume key an attach asks for (`None`: a plain volume), in a locked page.
fn attach_key(spec: &AttachSpec, host: Option<&HostKey>) -> Result<Option<VolumeKey>, AttachError> {
    match &spec.key {
        KeySource::Plain => Ok(None),
        KeySource::Ephemeral => {
            let mut key = VolumeKey::new().map_err(SealingError::from)?;
            loop {
                fill_random(key.as_mut())?;
                if key.as_ref()[..32] != key.as_ref()[32..] {
                    break;
                }
            }
            Ok(Some(key))
        }
        KeySource::Sealed(blob) => {
            let host = host.ok_or(AttachError::NoHostKey)?;
            Ok(Some(open_volume_key(
                host,
                spec.volume_id.as_str(),
                &blob[..],
            )?))
        }
    }
}

/// Keys one cipher state per I/O lane (`queues * IO_LANES`).
fn key_queues(
    key: Option<&VolumeKey>,
    sector: CryptoSectorSize,
    queues: u16,
) -> Result<Vec<CipherState>, XtsError> {
    let lanes = usize::from(queues) * IO_LANES;
    (0..lanes)
        .map(|_| match key {
            None => Ok(CipherState::Plain),
            Some(k) => Ok(CipherState::Xts(Box::new(XtsCipher::new(
                k.as_ref(),
                sector,
            )?))),
        })
        .collect()
}

/// What a card update hands on besides the key (fixed at attach).
#[derive(Clone, Debug)]
struct VolumeInfo {
    volume_id: VolumeId,
    sector: CryptoSectorSize,
    capacity_sectors: u64,
    read_only: bool,
    encrypted: bool,
}

/// Builds the backend for a keyed volume; the key is retained for a later card update.
fn build_backend(
    cfg: &CardConfig,
    st: Backing,
    info: &VolumeInfo,
    key: Option<VolumeKey>,
    metrics: &Arc<BlkMetrics>,
) -> Result<Arc<BlockBackend>, CardError> {
    let ciphers = key_queues(key.as_ref(), info.sector, cfg.queues)
        .map_err(|e| CardError::Vhost(format!("cipher setup: {e}")))?;
    let mut workers = Vec::with_capacity(ciphers.len());
    for c in ciphers {
        workers.push(QueueWorker::new(c)?);
    }
    let mut serial = [0u8; ID_LEN];
    for (d, s) in serial.iter_mut().zip(info.volume_id.as_str().bytes()) {
        *d = s;
    }
    let sector = info.sector.bytes();
    let vol = Volume {
        store: st,
        limits: DiskLimits {
            capacity: SectorCount(info.capacity_sectors),
            align: sector / 512,
            read_only: info.read_only,
        },
        sector: info.sector,
        serial,
    };
    let backend = Arc::new(BlockBackend::new(Arc::new(vol), workers, metrics.clone())?);
    backend.retain_key(key);
    Ok(backend)
}

struct Attached {
    stream: Option<UnixStream>,
    backend: Arc<BlockBackend>,
    info: VolumeInfo,
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
            let (body, fd) = match read_frame_with_fd(&mut stream) {
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
                ControlRequest::TakeOver => {
                    let (Some(fd), Some(st)) = (fd, store.take()) else {
                        if respond(
                            &mut stream,
                            &err_resp(ErrorCode::BadRequest, "TakeOver needs a socket".into()),
                        )
                        .is_err()
                        {
                            break;
                        }
                        continue;
                    };
                    match take_state(cfg, UnixStream::from(fd), st, metrics) {
                        Ok((backend, info)) => {
                            // The host key is zeroized here, as after an attach.
                            drop(host);
                            let _ = respond(
                                &mut stream,
                                &ControlResponse::Attached {
                                    capacity_sectors: info.capacity_sectors,
                                    encrypted: info.encrypted,
                                },
                            );
                            return Ok(Attached {
                                stream: Some(stream),
                                backend,
                                info,
                            });
                        }
                        Err((e, Some(st))) => {
                            warn!(error = %e, "card update: taking the state failed; still waiting");
                            store = Some(st);
                            if respond(
                                &mut stream,
                                &err_resp(ErrorCode::KeyRefused, format!("take-over failed: {e}")),
                            )
                            .is_err()
                            {
                                break;
                            }
                        }
                        Err((e, None)) => return Err(e),
                    }
                }
                ControlRequest::Detach
                | ControlRequest::HandOver
                | ControlRequest::CancelHandOver => {
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
                    match attach_key(&spec, host.as_ref()) {
                        Err(e) => {
                            warn!(volume = spec.volume_id.as_str(), error = %e, "attach refused");
                            store = Some(st);
                            if respond(&mut stream, &err_resp(ErrorCode::KeyRefused, e.to_string()))
                                .is_err()
                            {
                                break;
                            }
                        }
                        Ok(key) => {
                            let encrypted = key.is_some();
                            let info = VolumeInfo {
                                volume_id: spec.volume_id.clone(),
                                sector: spec.sector_size,
                                capacity_sectors: whole / 512,
                                read_only: cfg.read_only || st.read_only(),
                                encrypted,
                            };
                            info!(
                                volume = spec.volume_id.as_str(),
                                encrypted,
                                sectors = whole / 512,
                                crypto_sector = sector,
                                queues = cfg.queues,
                                "volume keyed"
                            );
                            let backend = build_backend(cfg, st, &info, key, metrics)?;
                            // The host key is zeroized here: one card serves one volume.
                            drop(host);
                            lock_down(cfg)?;
                            // If the controller is gone, it reconnects and sees `AlreadyAttached`.
                            let _ = respond(
                                &mut stream,
                                &ControlResponse::Attached {
                                    capacity_sectors: info.capacity_sectors,
                                    encrypted,
                                },
                            );
                            return Ok(Attached {
                                stream: Some(stream),
                                backend,
                                info,
                            });
                        }
                    }
                }
            }
        }
    }
}

/// Card update, the new card's side: takes the volume state from the card it replaces on
/// `sock`, checks it against its own backing store, keys itself, locks down, and answers
/// `Taken` (or `Refused`). A refusal before the store was used gives the store back.
fn take_state(
    cfg: &CardConfig,
    mut sock: UnixStream,
    store: Backing,
    metrics: &Arc<BlkMetrics>,
) -> Result<(Arc<BlockBackend>, VolumeInfo), (CardError, Option<Backing>)> {
    let refuse = |sock: &mut UnixStream, why: RefusalReason| {
        let _ = handover::write_frame(sock, &handover::Reply::Refused(why).encode());
    };
    let body = match handover::read_frame(&mut sock) {
        Ok(b) => b,
        Err(e) => return Err((e.into(), Some(store))),
    };
    let st = match VolumeState::parse(&body) {
        Ok(s) => s,
        Err(e) => {
            refuse(&mut sock, RefusalReason::Malformed);
            return Err((e.into(), Some(store)));
        }
    };
    drop(body);
    let sector = st.sector_size.bytes();
    let whole = store.size_bytes() / sector * sector;
    let read_only = cfg.read_only || store.read_only();
    if whole / 512 != st.capacity_sectors || read_only != st.read_only {
        warn!(
            volume = st.volume_id.as_str(),
            theirs = st.capacity_sectors,
            ours = whole / 512,
            "card update refused: another volume geometry"
        );
        refuse(&mut sock, RefusalReason::Geometry);
        return Err((
            HandoverError::Refused(RefusalReason::Geometry).into(),
            Some(store),
        ));
    }
    let info = VolumeInfo {
        volume_id: st.volume_id.clone(),
        sector: st.sector_size,
        capacity_sectors: st.capacity_sectors,
        read_only,
        encrypted: st.key.is_some(),
    };
    let backend = match build_backend(cfg, store, &info, st.key, metrics) {
        Ok(b) => b,
        Err(e) => {
            refuse(&mut sock, RefusalReason::Cipher);
            return Err((e, None));
        }
    };
    lock_down(cfg).map_err(|e| (e, None))?;
    handover::write_frame(&mut sock, &handover::Reply::Taken.encode())
        .map_err(|e| (e.into(), None))?;
    info!(
        volume = info.volume_id.as_str(),
        encrypted = info.encrypted,
        sectors = info.capacity_sectors,
        "volume state taken over from the previous card"
    );
    Ok((backend, info))
}

/// `--receive-state-fd`: [`take_state`] on the inherited fd, before the control socket serves.
fn receive_state(
    cfg: &CardConfig,
    fd: RawFd,
    store: Backing,
    metrics: &Arc<BlkMetrics>,
) -> Result<Attached, CardError> {
    // SAFETY: the fd was handed to this process at start (`--receive-state-fd`) for this use
    // only; nothing else in the process owns or closes it.
    let sock = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let (backend, info) = take_state(cfg, sock, store, metrics).map_err(|(e, _)| e)?;
    Ok(Attached {
        stream: None,
        backend,
        info,
    })
}

fn lock_down(cfg: &CardConfig) -> Result<(), CardError> {
    if let Err(e) = bulkhead_harden::lock_current_memory() {
        warn!(error = %e, "memory not locked; the rest of the card may be swapped (key schedules are in their own locked pages)");
    }
    bulkhead_harden::drop_privileges_if_given(cfg.uid, cfg.gid).map_err(SandboxError::from)?;
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

/// One control frame body and the fd that rode on its first byte, if any.
type FrameWithFd = (Vec<u8>, Option<OwnedFd>);

/// Reads one control frame and the fd that may ride on its first byte (`HandOver`).
fn read_frame_with_fd(stream: &mut UnixStream) -> Result<Option<FrameWithFd>, ControlError> {
    use std::io::Read;
    let mut len = [0u8; 4];
    let (n, file) = loop {
        match stream.recv_with_fd(&mut len) {
            Ok(r) => break r,
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => {
                return Err(ControlError::Io(std::io::Error::from_raw_os_error(
                    e.errno(),
                )))
            }
        }
    };
    let fd = file.map(OwnedFd::from);
    if n == 0 {
        return Ok(None);
    }
    let mut got = n;
    while got < 4 {
        let slot = len.get_mut(got..).ok_or(ControlError::Truncated)?;
        match stream.read(slot) {
            Ok(0) => return Err(ControlError::Truncated),
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ControlError::Io(e)),
        }
    }
    let size = u32::from_le_bytes(len);
    if size == 0 || size > control::MAX_FRAME {
        return Err(ControlError::FrameSize(size));
    }
    let mut body = vec![0u8; usize::try_from(size).map_err(|_| ControlError::FrameSize(size))?];
    stream.read_exact(&mut body).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ControlError::Truncated
        } else {
            ControlError::Io(e)
        }
    })?;
    Ok(Some((body, fd)))
}

/// `HandOver`: sends the volume state (key included) to the card at the other end of `fd`.
fn hand_over(
    backend: &BlockBackend,
    info: &VolumeInfo,
    fd: Option<OwnedFd>,
) -> Result<(), HandoverError> {
    let fd = fd.ok_or(HandoverError::NoSocket)?;
    let mut sock = UnixStream::from(fd);
    // The frame is made under the key's lock, the socket I/O happens without it (an exit
    // signal erasing the keys never waits for the other card).
    let body = backend.with_key(|key| {
        let key = match (info.encrypted, key) {
            (false, _) => None,
            (true, Some(k)) => Some(k.as_ref()),
            (true, None) => return Err(HandoverError::KeyErased),
        };
        Ok(handover::encode_state(
            &info.volume_id,
            info.sector,
            key,
            info.capacity_sectors,
            info.read_only,
        ))
    })?;
    handover::send_state(&mut sock, &body, handover::REPLY_TIMEOUT_MS)
}

fn serve_attached(
    control: UnixListener,
    first: Option<UnixStream>,
    backend: Arc<BlockBackend>,
    info: VolumeInfo,
    metrics: Arc<BlkMetrics>,
    stage: Arc<StageCell>,
) {
    let mut stream = first;
    loop {
        while let Some(s) = stream.as_mut() {
            let (body, fd) = match read_frame_with_fd(s) {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    let _ = respond(s, &err_resp(ErrorCode::BadRequest, e.to_string()));
                    break;
                }
            };
            let resp = match ControlRequest::parse(&body) {
                Err(e) => err_resp(ErrorCode::BadRequest, e.to_string()),
                Ok(ControlRequest::GetMetrics) => ControlResponse::Metrics(metrics_list(&metrics)),
                Ok(ControlRequest::Attach(_) | ControlRequest::TakeOver) => err_resp(
                    ErrorCode::AlreadyAttached,
                    "a volume is already attached".into(),
                ),
                Ok(ControlRequest::HandOver) => match hand_over(&backend, &info, fd) {
                    Ok(()) if stage.handed_over() => {
                        info!(
                            volume = info.volume_id.as_str(),
                            "volume state handed to the next card; exiting once the frontend leaves"
                        );
                        ControlResponse::HandedOver
                    }
                    Ok(()) => err_resp(
                        ErrorCode::FrontendGone,
                        "the frontend left meanwhile: the card is exiting".into(),
                    ),
                    Err(e) => {
                        warn!(error = %e, "card update: hand-over failed; still serving");
                        err_resp(ErrorCode::Internal, format!("hand-over failed: {e}"))
                    }
                },
                Ok(ControlRequest::CancelHandOver) => match stage.cancel() {
                    Ok(()) => {
                        info!(
                            volume = info.volume_id.as_str(),
                            "card update cancelled: key kept, serving on"
                        );
                        ControlResponse::HandOverCancelled
                    }
                    Err(e) => {
                        warn!(error = %e, "CancelHandOver refused");
                        let code = match e {
                            CancelRefused::NoHandOver => ErrorCode::NoHandOver,
                            CancelRefused::FrontendGone => ErrorCode::FrontendGone,
                        };
                        err_resp(code, e.to_string())
                    }
                },
                Ok(ControlRequest::Detach) => {
                    backend.erase_keys();
                    if let Err(e) = backend.volume().store.flush() {
                        error!(error = %e, "flush at detach failed");
                    }
                    info!(
                        key_pages_wiped = crate::xts::key_pages_wiped(),
                        "keys erased; detached"
                    );
                    let _ = respond(s, &ControlResponse::Detached);
                    std::process::exit(0);
                }
            };
            if respond(s, &resp).is_err() {
                break;
            }
        }
        match control.accept() {
            Ok((s, _)) => stream = Some(s),
            Err(e) => {
                error!(error = %e, "control accept failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// Runs the card until detach (which exits the process) or a fatal error.
pub fn run(cfg: CardConfig) -> Result<(), CardError> {
    bulkhead_harden::forbid_dumps().map_err(SandboxError::from)?;
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

    let attached = match cfg.receive_state_fd {
        Some(fd) => {
            drop(host);
            receive_state(&cfg, fd, store, &metrics)?
        }
        None => wait_for_attach(&cfg, &control, host, store, &metrics)?,
    };
    let stage = Arc::new(StageCell::default());
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
        let stage = stage.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                serve_attached(
                    control,
                    attached.stream,
                    backend,
                    attached.info,
                    metrics,
                    stage,
                )
            })
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
        if stage.frontend_left() {
            // Card update: the hypervisor moved to the next card (it stopped this card's rings
            // first, so every request this card took is completed). Erase and leave. A
            // `CancelHandOver` from here on is refused (`FrontendGone`).
            backend.erase_keys();
            if let Err(e) = backend.volume().store.flush() {
                error!(error = %e, "flush after the hand-over failed");
            }
            info!(
                key_pages_wiped = crate::xts::key_pages_wiped(),
                "card update complete: keys erased, exiting"
            );
            std::process::exit(0);
        }
    }
}
