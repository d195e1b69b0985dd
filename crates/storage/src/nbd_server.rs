//! The NBD listener: fixed newstyle, STARTTLS first, TLS 1.3 with host certificates, then
//! `NBD_OPT_GO`/`NBD_OPT_INFO` on an export named by a volume id, served only to the host the
//! volume is granted to; the data path is qemu-storage-daemon's export, reached over its
//! private unix socket, with bytes copied both ways until the host leaves or is fenced.
//!
//! Every NBD byte the node reads is parsed with `bulkhead-nbd` (option headers capped before
//! their data is buffered). The transmission phase is copied, not parsed: qemu-storage-daemon
//! checks each request against the export, and the node never transforms data.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_audit::{Decision, EntryKind};
use bulkhead_mtls::{KeyedSlot, KeyedSlots, Refusal, Refusals, Stage};
use bulkhead_nbd::consts::{MAX_OPTION_DATA, MAX_OPTION_REPLY_DATA};
use bulkhead_nbd::{
    ClientFlags, ClientOption, ExportName, ExportNameReply, HandshakeFlags, InfoReply, InfoRequest,
    InfoType, NbdError, OptionError, OptionHeader, OptionReply, OptionReplyHeader, ReplyType,
    ServerGreeting, TransmissionFlags,
};
use bulkhead_storage_proto::{HostName, VolumeId};
use bulkhead_tokens::pki::identity_from_der;
use bulkhead_tokens::{Identity, Role};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::node::{entry, request_id, Node, OpenRefusal};

/// Time allowed from TCP accept to the start of transmission (greeting, STARTTLS, TLS
/// handshake, options).
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(20);
/// Option requests one connection may send before transmission.
pub const MAX_OPTIONS: usize = 32;
/// Connections in negotiation at once (before and during the TLS handshake and options): an
/// unauthenticated client holds one of these, never a transmission slot.
pub const MAX_NEGOTIATING: usize = 256;
/// Connections in negotiation from one source address at once.
pub const MAX_NEGOTIATING_PER_ADDR: usize = 16;
/// Authenticated connections at once (past the TLS handshake).
pub const MAX_CONNECTIONS: usize = 1024;
/// Authenticated connections one client certificate may hold (a host's cards: one connection
/// per attached network volume, plus reconnects overlapping a dying connection).
pub const MAX_PER_HOST: usize = 128;
/// Copy buffer per direction in transmission (a 1 MiB request crosses in a few reads).
pub const COPY_BUFFER: usize = 256 * 1024;

/// Stable refusal codes of the NBD listener (audited through the refusal summariser).
pub mod codes {
    /// An option other than STARTTLS (or ABORT) before TLS.
    pub const TLS_REQUIRED: &str = "nbd_tls_required";
    /// The handshake bytes were not NBD (bad magic, unknown client flags, oversized option).
    pub const BAD_HANDSHAKE: &str = "nbd_bad_handshake";
    /// Negotiation took longer than [`super::NEGOTIATION_TIMEOUT`].
    pub const NEGOTIATION_TIMEOUT: &str = "nbd_negotiation_timeout";
    /// Too many authenticated connections at once.
    pub const TOO_MANY_CONNECTIONS: &str = "nbd_too_many_connections";
    /// Too many connections in negotiation at once.
    pub const TOO_MANY_NEGOTIATING: &str = "nbd_too_many_negotiating";
    /// Too many connections in negotiation from one source address.
    pub const ADDRESS_NEGOTIATION_CAP: &str = "nbd_address_negotiation_cap";
    /// One client certificate holds [`super::MAX_PER_HOST`] connections already.
    pub const HOST_CONNECTION_CAP: &str = "nbd_host_connection_cap";
    /// More than [`super::MAX_OPTIONS`] options.
    pub const TOO_MANY_OPTIONS: &str = "nbd_too_many_options";
}

/// Why a session ended early (logged; refusals are audited where they happen).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("nbd: {0}")]
    Nbd(#[from] NbdError),
    #[error("the engine refused the export ({0:?})")]
    EngineRefused(ReplyType),
    #[error("the engine's export answer had no size")]
    EngineNoSize,
    #[error("audit log unavailable")]
    Audit,
}

/// The listener's shared parts.
pub struct NbdServer {
    pub node: Arc<Node>,
    pub tls: TlsAcceptor,
    pub refusals: Arc<Refusals>,
}

/// The listener's connection budgets: negotiation (global and per source address) and
/// authenticated connections (global and per client certificate) draw on separate pools, so
/// clients that never finish a handshake cannot take the slots hosts transmit on.
#[derive(Clone)]
struct Budgets {
    negotiating: Arc<Semaphore>,
    per_addr: Arc<KeyedSlots>,
    established: Arc<Semaphore>,
    per_host: Arc<KeyedSlots>,
}

/// What an authenticated connection holds until it ends.
struct Admitted {
    _permit: OwnedSemaphorePermit,
    _slot: KeyedSlot,
}

/// What a negotiating connection holds until it is authenticated or ends.
struct Negotiating {
    _permit: OwnedSemaphorePermit,
    _slot: KeyedSlot,
}

/// Accepts connections until the process ends.
pub async fn serve(listener: TcpListener, server: Arc<NbdServer>) {
    let budgets = Budgets {
        negotiating: Arc::new(Semaphore::new(MAX_NEGOTIATING)),
        per_addr: Arc::new(KeyedSlots::default()),
        established: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        per_host: Arc::new(KeyedSlots::default()),
    };
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "nbd accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&budgets.negotiating).try_acquire_owned() else {
            server
                .refusals
                .refuse(Refusal::new(Stage::Admission, codes::TOO_MANY_NEGOTIATING));
            continue;
        };
        let Some(slot) = budgets
            .per_addr
            .take(addr.ip().to_string(), MAX_NEGOTIATING_PER_ADDR)
        else {
            server.refusals.refuse(Refusal::new(
                Stage::Admission,
                codes::ADDRESS_NEGOTIATION_CAP,
            ));
            continue;
        };
        let negotiating = Negotiating {
            _permit: permit,
            _slot: slot,
        };
        let _ = tcp.set_nodelay(true);
        let server = Arc::clone(&server);
        let budgets = budgets.clone();
        tokio::spawn(async move {
            if let Err(e) = server.session(tcp, addr, negotiating, &budgets).await {
                tracing::debug!(peer = %addr, error = %e, "nbd session ended");
            }
        });
    }
}

async fn read_vec<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Reads one option request (header capped before the data is buffered).
async fn read_option<S: AsyncRead + Unpin>(s: &mut S) -> Result<ClientOption, SessionError> {
    let head = read_vec(s, OptionHeader::LEN).await?;
    let header = OptionHeader::parse(&head, MAX_OPTION_DATA)?;
    let data = read_vec(s, header.data_len()).await?;
    Ok(ClientOption::parse(&header, &data)?)
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, reply: OptionReply) -> std::io::Result<()> {
    s.write_all(&reply.encode()).await?;
    s.flush().await
}

/// What the engine's export answered to GO.
struct EngineExport {
    stream: UnixStream,
    size: u64,
    flags: TransmissionFlags,
    block_size: Option<InfoReply>,
}

/// Opens `name` on qemu-storage-daemon's socket as an NBD client (fixed newstyle, GO).
async fn engine_go(node: &Node, name: &ExportName) -> Result<EngineExport, SessionError> {
    let mut s = UnixStream::connect(&node.qsd_nbd).await?;
    let greeting = ServerGreeting::parse(&read_vec(&mut s, ServerGreeting::LEN).await?)?;
    let flags = if greeting
        .flags
        .contains(bulkhead_nbd::consts::FLAG_NO_ZEROES)
    {
        ClientFlags::BULKHEAD
    } else {
        ClientFlags(bulkhead_nbd::consts::FLAG_C_FIXED_NEWSTYLE)
    };
    s.write_all(&flags.encode()).await?;
    let go = ClientOption::Go(InfoRequest {
        name: name.clone(),
        requests: vec![InfoType::BlockSize],
    });
    s.write_all(&go.encode()).await?;
    let mut export = None;
    let mut block_size = None;
    for _ in 0..MAX_OPTIONS {
        let head = OptionReplyHeader::parse(
            &read_vec(&mut s, OptionReplyHeader::LEN).await?,
            MAX_OPTION_REPLY_DATA,
        )?;
        let data = read_vec(&mut s, head.data_len()).await?;
        match head.reply {
            ReplyType::Info => match InfoReply::parse(&data)? {
                InfoReply::Export { size, flags } => export = Some((size, flags)),
                b @ InfoReply::BlockSize { .. } => block_size = Some(b),
                _ => {}
            },
            ReplyType::Ack => {
                let (size, flags) = export.ok_or(SessionError::EngineNoSize)?;
                return Ok(EngineExport {
                    stream: s,
                    size,
                    flags,
                    block_size,
                });
            }
            other => {
                // Leave politely (the engine would log an end-of-file in negotiation).
                let _ = s.write_all(&ClientOption::Abort.encode()).await;
                return Err(SessionError::EngineRefused(other));
            }
        }
    }
    Err(SessionError::EngineRefused(ReplyType::Other(0)))
}

/// The host a certificate names, if it is a host's.
fn host_of(id: Option<&Identity>) -> Option<HostName> {
    id.filter(|i| i.role == Role::Host)
        .and_then(|i| HostName::new(&i.name).ok())
}

enum Next {
    /// Keep reading options.
    Again,
    /// Close the connection.
    Close,
    /// Transmission: copy between the host and the engine's export until done or cut.
    Transmit(Box<Transmission>),
}

struct Transmission {
    engine: UnixStream,
    opened: crate::node::Opened,
    volume: VolumeId,
    request_id: String,
    /// The authenticated connection's budget slots (set once negotiation returns).
    admitted: Option<Admitted>,
}

impl NbdServer {
    fn refuse(&self, code: &'static str, identity: Option<&Arc<Identity>>) {
        self.refusals
            .refuse(Refusal::new(Stage::Handshake, code).by(identity.cloned()));
    }

    async fn session(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        negotiating: Negotiating,
        budgets: &Budgets,
    ) -> Result<(), SessionError> {
        let negotiated =
            tokio::time::timeout(NEGOTIATION_TIMEOUT, self.negotiate(tcp, addr, budgets)).await;
        // Negotiation is over, whatever its outcome: its slot goes back at once.
        drop(negotiating);
        let (mut tls, t) = match negotiated {
            Ok(Ok(Some(x))) => x,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                self.refuse(codes::NEGOTIATION_TIMEOUT, None);
                return Ok(());
            }
        };
        let Transmission {
            mut engine,
            opened,
            volume,
            request_id,
            admitted: _admitted,
        } = *t;
        let crate::node::Opened { guard, cut, .. } = opened;
        tokio::select! {
            // A cut wins over bytes waiting to be copied: nothing of a fenced holder's is
            // forwarded once its fence fired.
            biased;
            _ = cut => {
                tracing::info!(volume = %volume, peer = %addr, "nbd connection cut (fenced)");
                self.node.audit.append_queued(entry(
                    EntryKind::Outcome, &request_id, None, "NbdConnection",
                    vec![format!("volume:{volume}")], Decision::None, "fenced",
                ));
            }
            r = tokio::io::copy_bidirectional_with_sizes(&mut tls, &mut engine, COPY_BUFFER, COPY_BUFFER) => {
                // QEMU's client closes without a TLS close_notify: an end-of-file or a reset
                // is the peer leaving, not a failure.
                let code = match &r {
                    Ok(_) => "closed",
                    Err(e) if matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::BrokenPipe
                    ) => "closed",
                    Err(_) => "broken",
                };
                match &r {
                    Ok((up, down)) => tracing::info!(volume = %volume, peer = %addr, bytes_from_host = up, bytes_to_host = down, code, "nbd connection ended"),
                    Err(e) => tracing::info!(volume = %volume, peer = %addr, error = %e, code, "nbd connection ended"),
                }
                self.node.audit.append_queued(entry(
                    EntryKind::Outcome, &request_id, None, "NbdConnection",
                    vec![format!("volume:{volume}")], Decision::None, code,
                ));
            }
        }
        drop(guard);
        Ok(())
    }

    /// Greeting, plaintext options until STARTTLS, TLS, then options until GO (or the end).
    #[allow(clippy::type_complexity)]
    async fn negotiate(
        &self,
        mut tcp: TcpStream,
        addr: SocketAddr,
        budgets: &Budgets,
    ) -> Result<
        Option<(
            tokio_rustls::server::TlsStream<TcpStream>,
            Box<Transmission>,
        )>,
        SessionError,
    > {
        tcp.write_all(
            &ServerGreeting {
                flags: HandshakeFlags::BULKHEAD,
            }
            .encode(),
        )
        .await?;
        let client = match ClientFlags::parse(&read_vec(&mut tcp, ClientFlags::LEN).await?) {
            Ok(c) => c,
            Err(e) => {
                self.refuse(codes::BAD_HANDSHAKE, None);
                return Err(e.into());
            }
        };
        let no_zeroes = client.contains(bulkhead_nbd::consts::FLAG_C_NO_ZEROES);
        let mut n = 0;
        loop {
            n += 1;
            if n > MAX_OPTIONS {
                self.refuse(codes::TOO_MANY_OPTIONS, None);
                return Ok(None);
            }
            let opt = match read_option(&mut tcp).await {
                Ok(o) => o,
                Err(SessionError::Nbd(e)) => {
                    self.refuse(codes::BAD_HANDSHAKE, None);
                    return Err(e.into());
                }
                Err(e) => return Err(e),
            };
            match opt {
                ClientOption::StartTls => {
                    send(&mut tcp, OptionReply::ack(opt.code())).await?;
                    break;
                }
                ClientOption::Abort => {
                    let _ = send(&mut tcp, OptionReply::ack(opt.code())).await;
                    return Ok(None);
                }
                // No error reply exists for EXPORT_NAME: the spec has the server close.
                ClientOption::ExportName(_) => {
                    self.refuse(codes::TLS_REQUIRED, None);
                    return Ok(None);
                }
                other => {
                    self.refuse(codes::TLS_REQUIRED, None);
                    send(
                        &mut tcp,
                        OptionReply::error(other.code(), OptionError::TlsReqd),
                    )
                    .await?;
                }
            }
        }
        let mut tls = match self.tls.accept(tcp).await {
            Ok(s) => s,
            Err(e) => {
                let code = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(rustls::Error::NoCertificatesPresented) => {
                        bulkhead_mtls::codes::TLS_NO_CLIENT_CERT
                    }
                    Some(rustls::Error::InvalidCertificate(_)) => {
                        bulkhead_mtls::codes::TLS_BAD_CLIENT_CERT
                    }
                    _ => bulkhead_mtls::codes::TLS_HANDSHAKE_FAILED,
                };
                tracing::info!(peer = %addr, error = %e, code, "nbd tls handshake refused");
                self.refuse(code, None);
                return Ok(None);
            }
        };
        let identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| identity_from_der(c.as_ref()).ok())
            .map(Arc::new);
        // Authenticated: the connection now counts against its certificate and the
        // established pool (refused before any option is read when either is full).
        let key = match &identity {
            Some(i) => format!("cert:{}", i.cert_sha256),
            None => format!("anonymous:{}", addr.ip()),
        };
        let Some(slot) = budgets.per_host.take(key, MAX_PER_HOST) else {
            self.refusals.refuse(
                Refusal::new(Stage::Admission, codes::HOST_CONNECTION_CAP).by(identity.clone()),
            );
            return Ok(None);
        };
        let Ok(permit) = Arc::clone(&budgets.established).try_acquire_owned() else {
            self.refusals.refuse(
                Refusal::new(Stage::Admission, codes::TOO_MANY_CONNECTIONS).by(identity.clone()),
            );
            return Ok(None);
        };
        let mut admitted = Some(Admitted {
            _permit: permit,
            _slot: slot,
        });
        loop {
            n += 1;
            if n > MAX_OPTIONS {
                self.refuse(codes::TOO_MANY_OPTIONS, identity.as_ref());
                return Ok(None);
            }
            let opt = match read_option(&mut tls).await {
                Ok(o) => o,
                Err(SessionError::Nbd(e)) => {
                    self.refuse(codes::BAD_HANDSHAKE, identity.as_ref());
                    return Err(e.into());
                }
                Err(e) => return Err(e),
            };
            let next = self
                .option(&mut tls, identity.as_deref(), opt, no_zeroes)
                .await?;
            match next {
                Next::Again => continue,
                Next::Close => return Ok(None),
                Next::Transmit(mut t) => {
                    t.admitted = admitted.take();
                    return Ok(Some((tls, t)));
                }
            }
        }
    }

    /// Audits an open decision (durable before the answer).
    async fn audit_open(
        &self,
        rid: &str,
        identity: Option<&Identity>,
        op: &str,
        export: &ExportName,
        decision: Decision,
        code: &str,
    ) -> Result<(), SessionError> {
        let resource = match VolumeId::new(export.as_str()) {
            Ok(v) => format!("volume:{v}"),
            Err(_) => format!(
                "export:{}",
                bulkhead_mtls::route_label("NBD", export.as_str())
            ),
        };
        self.node
            .audit(entry(
                EntryKind::Request,
                rid,
                identity,
                op,
                vec![resource],
                decision,
                code,
            ))
            .await
            .map_err(|_| SessionError::Audit)
    }

    /// The grant check for `export` by `identity`: the volume, or why not.
    fn who_and_what(
        identity: Option<&Identity>,
        export: &ExportName,
    ) -> Result<(HostName, VolumeId), &'static str> {
        let host = host_of(identity).ok_or("not_a_host")?;
        let vol = VolumeId::new(export.as_str()).map_err(|_| OpenRefusal::UnknownVolume.code())?;
        Ok((host, vol))
    }

    async fn option<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        identity: Option<&Identity>,
        opt: ClientOption,
        no_zeroes: bool,
    ) -> Result<Next, SessionError> {
        let code = opt.code();
        match opt {
            ClientOption::Abort => {
                let _ = send(s, OptionReply::ack(code)).await;
                Ok(Next::Close)
            }
            ClientOption::StartTls => {
                send(s, OptionReply::error(code, OptionError::Invalid)).await?;
                Ok(Next::Again)
            }
            ClientOption::StructuredReply | ClientOption::Unknown(_) => {
                send(s, OptionReply::error(code, OptionError::Unsup)).await?;
                Ok(Next::Again)
            }
            ClientOption::List => {
                send(s, OptionReply::error(code, OptionError::Policy)).await?;
                Ok(Next::Again)
            }
            ClientOption::Info(req) => {
                let rid = request_id();
                let checked = match Self::who_and_what(identity, &req.name) {
                    Ok((host, vol)) => self
                        .node
                        .check(&vol, &host)
                        .await
                        .map_err(OpenRefusal::code),
                    Err(why) => Err(why),
                };
                if let Err(why) = checked {
                    self.audit_open(&rid, identity, "NbdInfo", &req.name, Decision::Deny, why)
                        .await?;
                    send(s, OptionReply::error(code, OptionError::Policy)).await?;
                    return Ok(Next::Again);
                }
                let ex = match engine_go(&self.node, &req.name).await {
                    Ok(ex) => ex,
                    Err(e) => {
                        tracing::warn!(error = %e, export = %req.name, "engine export unavailable");
                        send(s, OptionReply::error(code, OptionError::Shutdown)).await?;
                        return Ok(Next::Again);
                    }
                };
                self.audit_open(&rid, identity, "NbdInfo", &req.name, Decision::Allow, "ok")
                    .await?;
                reply_info(s, code, &req, &ex).await?;
                disconnect(ex.stream).await;
                send(s, OptionReply::ack(code)).await?;
                Ok(Next::Again)
            }
            ClientOption::Go(req) => self.open(s, identity, code, req, None).await,
            ClientOption::ExportName(name) => {
                let req = InfoRequest {
                    name,
                    requests: Vec::new(),
                };
                self.open(s, identity, code, req, Some(no_zeroes)).await
            }
        }
    }

    /// GO (or EXPORT_NAME, `export_name = Some(no_zeroes)`): grant check and registration,
    /// the engine's export, the answer, then transmission.
    async fn open<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        identity: Option<&Identity>,
        code: u32,
        req: InfoRequest,
        export_name: Option<bool>,
    ) -> Result<Next, SessionError> {
        let rid = request_id();
        let op = if export_name.is_some() {
            "NbdExportName"
        } else {
            "NbdGo"
        };
        let opened = match Self::who_and_what(identity, &req.name) {
            Ok((host, vol)) => self
                .node
                .open_for(&vol, &host)
                .await
                .map(|o| (o, vol))
                .map_err(OpenRefusal::code),
            Err(why) => Err(why),
        };
        let (mut opened, volume) = match opened {
            Ok(x) => x,
            Err(why) => {
                tracing::info!(caller = ?identity.map(|i| &i.name), export = %req.name, why, "nbd open refused");
                self.audit_open(&rid, identity, op, &req.name, Decision::Deny, why)
                    .await?;
                if export_name.is_none() {
                    send(s, OptionReply::error(code, OptionError::Policy)).await?;
                    return Ok(Next::Again);
                }
                return Ok(Next::Close);
            }
        };
        let ex = match engine_go(&self.node, &req.name).await {
            Ok(ex) => ex,
            Err(e) => {
                tracing::warn!(error = %e, export = %req.name, "engine export unavailable");
                if export_name.is_none() {
                    send(s, OptionReply::error(code, OptionError::Shutdown)).await?;
                    return Ok(Next::Again);
                }
                return Ok(Next::Close);
            }
        };
        // A fence (a Grant to another host, a Revoke, a Delete) that ran while this session
        // connected to the engine cut it before re-adding the export: this session must not
        // reach the re-added export with the old holder's requests.
        if !matches!(
            opened.cut.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        ) {
            tracing::info!(caller = ?identity.map(|i| &i.name), export = %req.name, "nbd open fenced while it reached the engine");
            disconnect(ex.stream).await;
            self.audit_open(&rid, identity, op, &req.name, Decision::Deny, "fenced")
                .await?;
            if export_name.is_none() {
                send(s, OptionReply::error(code, OptionError::Policy)).await?;
                return Ok(Next::Again);
            }
            return Ok(Next::Close);
        }
        self.audit_open(&rid, identity, op, &req.name, Decision::Allow, "ok")
            .await?;
        match export_name {
            Some(no_zeroes) => {
                let reply = ExportNameReply {
                    size: ex.size,
                    flags: ex.flags,
                };
                s.write_all(&reply.encode(no_zeroes)).await?;
                s.flush().await?;
            }
            None => {
                reply_info(s, code, &req, &ex).await?;
                send(s, OptionReply::ack(code)).await?;
            }
        }
        tracing::info!(volume = %volume, caller = ?identity.map(|i| &i.name), size = opened.size_bytes, "nbd export opened");
        Ok(Next::Transmit(Box::new(Transmission {
            engine: ex.stream,
            opened,
            volume,
            request_id: rid,
            admitted: None,
        })))
    }
}

/// Ends a transmission with the engine that carried no request (INFO): `NBD_CMD_DISC`.
async fn disconnect(mut s: UnixStream) {
    let disc = bulkhead_nbd::Request {
        flags: bulkhead_nbd::CommandFlags(0),
        command: bulkhead_nbd::Command::Disconnect,
        cookie: bulkhead_nbd::Cookie(0),
        offset: 0,
        length: 0,
    };
    let _ = s.write_all(&disc.encode()).await;
    let _ = s.shutdown().await;
}

/// NBD_REP_INFO replies for GO/INFO: the export (always), block sizes if asked for and known.
async fn reply_info<S: AsyncWrite + Unpin>(
    s: &mut S,
    code: u32,
    req: &InfoRequest,
    ex: &EngineExport,
) -> std::io::Result<()> {
    send(
        s,
        OptionReply::info(
            code,
            &InfoReply::Export {
                size: ex.size,
                flags: ex.flags,
            },
        ),
    )
    .await?;
    if req.requests.contains(&InfoType::BlockSize) {
        if let Some(b) = &ex.block_size {
            send(s, OptionReply::info(code, b)).await?;
        }
    }
    Ok(())
}
