//! The block card as an NBD client: the network backing of a volume.
//!
//! The card connects (TCP) to a storage node, upgrades with `NBD_OPT_STARTTLS` to TLS 1.3
//! (rustls, aws-lc-rs) presenting the host's certificate, checks the node's certificate against
//! the cluster CA and pins its identity, then `NBD_OPT_GO`es to the export (the volume id). Only
//! ciphertext goes over it: the XTS layer in `backend` runs before [`NbdClient::write_at`] and
//! after [`NbdClient::read_at`], and no key is ever sent.
//!
//! Design: one **connection thread** owns the TLS session (rustls over a non-blocking socket,
//! `poll` on the socket and an eventfd). The queue workers' lanes submit an operation and block
//! on its completion; the connection thread gives it a cookie, writes it, parses every reply
//! (`bulkhead_nbd::SimpleReply::parse`: magic, known cookie, error field, exact payload length)
//! and completes it. A write completes only on the server's reply. See `engine` for connection
//! loss (stall, reconnect with backoff, re-send) and the terminal fenced state.

mod engine;
mod handshake;
pub mod replies;
mod tls;

use crate::metrics::BlkMetrics;
use bulkhead_nbd::{Command, Errno, ExportName, NbdError, OptionError, TransmissionFlags};
use bulkhead_tokens::pki::ServerIdentity;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use engine::{RECONNECT_BUDGET, REPLY_TIMEOUT};

/// Where and how to reach the volume (from the command line).
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// `HOST:PORT` of the storage node.
    pub addr: String,
    /// The export name: the volume id.
    pub export: String,
    /// The storage node's certificate name (role service), e.g. `storage-1`.
    pub server_name: String,
    /// The cluster CA (PEM).
    pub ca: PathBuf,
    /// The host's certificate and key (PEM), from the Bulkhead CA.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// NBD client errors: at start-up (the card exits) or per request (the guest gets IOERR).
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    #[error("reading the {what} PEM file failed")]
    Pem { what: &'static str },
    #[error("tls configuration: {0}")]
    Tls(#[source] rustls::Error),
    #[error("storage address is not HOST:PORT")]
    BadAddress,
    #[error("export or server name is not valid")]
    BadName,
    #[error("resolving the storage address: {0}")]
    Resolve(#[source] std::io::Error),
    #[error("connecting to the storage node: {0}")]
    Connect(#[source] std::io::Error),
    #[error("NBD handshake I/O: {0}")]
    Io(#[source] std::io::Error),
    #[error("TLS handshake: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("NBD protocol: {0}")]
    Protocol(#[from] NbdError),
    #[error("reply {reply:#x} to option {option} is not what the protocol allows here")]
    UnexpectedReply { option: u32, reply: u32 },
    #[error("the storage node refused option {option}: {}", error.name())]
    Refused { option: u32, error: OptionError },
    #[error("the storage node refused the export ({}): the volume is fenced", .0.name())]
    Fenced(OptionError),
    #[error("the storage node did not describe the export")]
    NoExportInfo,
    #[error("the export changed size from {was} to {now} bytes")]
    ExportChanged { was: u64, now: u64 },
    #[error("the export is read-only")]
    ReadOnly,
    #[error("the storage node answered {0:?}")]
    Reply(Errno),
    #[error("the connection was lost {0} times with this request outstanding")]
    Dropped(u32),
    #[error("the storage node was unreachable for longer than the reconnect budget")]
    Unavailable,
    #[error("the NBD connection thread is gone")]
    Stopped,
    #[error("request offset or length overflows")]
    Overflow,
}

/// A request as the lanes submit it.
pub(crate) struct Op {
    command: Command,
    offset: u64,
    length: u32,
    /// A write's ciphertext (kept until the reply, for a re-send after reconnect).
    payload: Vec<u8>,
    done: Mutex<Option<Result<Vec<u8>, NbdClientError>>>,
    cv: std::sync::Condvar,
}

/// The resolved target, built before the sandbox.
pub(crate) struct Target {
    addrs: Vec<SocketAddr>,
    server_name: rustls_pki_types::ServerName<'static>,
    export: ExportName,
    tls: Arc<rustls::ClientConfig>,
}

/// A connected NBD export.
pub struct NbdClient {
    shared: Arc<engine::Shared>,
    /// The engine, until [`NbdClient::start`] moves it to its thread.
    engine: Mutex<Option<engine::Engine>>,
    size: u64,
    flags: TransmissionFlags,
    max_payload: u32,
}

impl NbdClient {
    /// Reads the TLS files, resolves the address and runs the first handshake (all before the
    /// sandbox). A refused export here is [`NbdClientError::Fenced`] and the card does not start.
    pub fn connect(cfg: &NbdConfig, metrics: Arc<BlkMetrics>) -> Result<Self, NbdClientError> {
        let (host, _) = cfg
            .addr
            .rsplit_once(':')
            .ok_or(NbdClientError::BadAddress)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = rustls_pki_types::ServerName::try_from(host.to_owned())
            .map_err(|_| NbdClientError::BadAddress)?;
        let addrs: Vec<SocketAddr> = cfg
            .addr
            .to_socket_addrs()
            .map_err(NbdClientError::Resolve)?
            .collect();
        if addrs.is_empty() {
            return Err(NbdClientError::BadAddress);
        }
        if !bulkhead_tokens::pki::valid_name(&cfg.server_name) {
            return Err(NbdClientError::BadName);
        }
        let export = ExportName::new(&cfg.export).map_err(|_| NbdClientError::BadName)?;
        let tls = tls::client_config(
            &cfg.ca,
            &cfg.cert,
            &cfg.key,
            ServerIdentity::service(&cfg.server_name),
        )?;
        let target = Target {
            addrs,
            server_name,
            export,
            tls,
        };
        let session = handshake::connect(&target)?;
        let (size, flags, max_payload) = (session.size, session.flags, session.max_payload);
        tracing::info!(
            export = %target.export,
            server = %cfg.server_name,
            size,
            flags = flags.0,
            max_payload,
            "NBD export open over TLS"
        );
        let shared = Arc::new(engine::Shared::new(metrics).map_err(NbdClientError::Io)?);
        let engine = engine::Engine::new(shared.clone(), target, session);
        Ok(NbdClient {
            shared,
            engine: Mutex::new(Some(engine)),
            size,
            flags,
            max_payload,
        })
    }

    /// Starts the connection thread (call after the sandbox is in place, so it inherits it).
    pub fn start(&self) -> std::io::Result<()> {
        let engine = match self.engine.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(e) = engine {
            std::thread::Builder::new()
                .name("nbd".into())
                .spawn(move || e.run())?;
        }
        Ok(())
    }

    /// Export size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// The export's transmission flags.
    pub fn flags(&self) -> TransmissionFlags {
        self.flags
    }

    fn submit(
        &self,
        command: Command,
        offset: u64,
        length: u32,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, NbdClientError> {
        let op = Arc::new(Op {
            command,
            offset,
            length,
            payload,
            done: Mutex::new(None),
            cv: std::sync::Condvar::new(),
        });
        self.shared.submit(op)
    }

    fn chunks(&self, total: usize) -> impl Iterator<Item = (usize, usize)> {
        let step = usize::try_from(self.max_payload)
            .unwrap_or(usize::MAX)
            .max(512);
        (0..total)
            .step_by(step)
            .map(move |s| (s, step.min(total - s)))
    }

    /// Reads exactly `buf.len()` bytes at `offset`; returns only what the server answered for
    /// exactly this request.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), NbdClientError> {
        for (s, n) in self.chunks(buf.len()) {
            let off = offset
                .checked_add(u64::try_from(s).map_err(|_| NbdClientError::Overflow)?)
                .ok_or(NbdClientError::Overflow)?;
            let len = u32::try_from(n).map_err(|_| NbdClientError::Overflow)?;
            let data = self.submit(Command::Read, off, len, Vec::new())?;
            let dst = buf.get_mut(s..s + n).ok_or(NbdClientError::Overflow)?;
            if data.len() != dst.len() {
                return Err(NbdClientError::Protocol(NbdError::Length {
                    what: "read payload",
                    got: data.len(),
                    want: dst.len(),
                }));
            }
            dst.copy_from_slice(&data);
        }
        Ok(())
    }

    /// Writes `buf` at `offset`; returns once the server acknowledged every byte.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), NbdClientError> {
        if self.flags.read_only() {
            return Err(NbdClientError::ReadOnly);
        }
        for (s, n) in self.chunks(buf.len()) {
            let off = offset
                .checked_add(u64::try_from(s).map_err(|_| NbdClientError::Overflow)?)
                .ok_or(NbdClientError::Overflow)?;
            let len = u32::try_from(n).map_err(|_| NbdClientError::Overflow)?;
            let src = buf.get(s..s + n).ok_or(NbdClientError::Overflow)?;
            self.submit(Command::Write, off, len, src.to_vec())?;
        }
        Ok(())
    }

    /// NBD_CMD_FLUSH if the export takes it (otherwise its writes are durable on reply).
    pub fn flush(&self) -> Result<(), NbdClientError> {
        if self.flags.flush() {
            self.submit(Command::Flush, 0, 0, Vec::new())?;
        }
        Ok(())
    }

    /// NBD_CMD_TRIM if the export advertises it; otherwise nothing (discard is advisory).
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), NbdClientError> {
        if !self.flags.trim() || self.flags.read_only() {
            return Ok(());
        }
        const STEP: u64 = 1 << 30;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(STEP);
            let off = offset.checked_add(done).ok_or(NbdClientError::Overflow)?;
            let n32 = u32::try_from(n).map_err(|_| NbdClientError::Overflow)?;
            self.submit(Command::Trim, off, n32, Vec::new())?;
            done += n;
        }
        Ok(())
    }
}
