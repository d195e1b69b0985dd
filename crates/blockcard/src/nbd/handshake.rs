//! One connection: TCP, the fixed-newstyle greeting, `NBD_OPT_STARTTLS`, the TLS 1.3 handshake,
//! `NBD_OPT_GO`. Blocking, with timeouts; the socket is left non-blocking for the engine.

use super::{NbdClientError, Target};
use bulkhead_nbd::consts::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_NO_ZEROES, MAX_OPTION_REPLY_DATA, MAX_PAYLOAD,
    OPT_GO, OPT_STARTTLS,
};
use bulkhead_nbd::{
    ClientFlags, ClientOption, InfoReply, InfoRequest, InfoType, OptionError, OptionReplyHeader,
    ReplyType, ServerGreeting, TransmissionFlags,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Per-step timeout of a handshake (connect, each read and write).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most option replies one `NBD_OPT_GO` may produce before its ACK.
const MAX_GO_REPLIES: usize = 32;

/// Deadline of a whole handshake (greeting to GO's ACK): a server that trickles its answers a
/// byte at a time cannot hold a connect, or a reconnect, beyond it.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(30);

/// The socket during a handshake: every read and write gets only the time left before the
/// deadline (`TimedOut` once it has passed).
struct Deadline {
    sock: TcpStream,
    until: Instant,
}

impl Deadline {
    fn left(&self) -> std::io::Result<Duration> {
        self.until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .map(|d| d.min(HANDSHAKE_TIMEOUT))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut))
    }
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.sock.set_read_timeout(Some(left))?;
        self.sock.read(buf)
    }
}

impl Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.sock.set_write_timeout(Some(left))?;
        self.sock.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// A connected, negotiated session.
pub(crate) struct Session {
    pub tls: rustls::ClientConnection,
    pub sock: TcpStream,
    pub size: u64,
    pub flags: TransmissionFlags,
    pub max_payload: u32,
}

fn read_reply<S: Read>(s: &mut S, option: u32) -> Result<(ReplyType, Vec<u8>), NbdClientError> {
    let mut head = [0u8; OptionReplyHeader::LEN];
    s.read_exact(&mut head).map_err(NbdClientError::Io)?;
    let h = OptionReplyHeader::parse(&head, MAX_OPTION_REPLY_DATA)?;
    let mut data = vec![0u8; h.data_len()];
    s.read_exact(&mut data).map_err(NbdClientError::Io)?;
    if h.option != option {
        return Err(NbdClientError::UnexpectedReply {
            option,
            reply: h.reply.code(),
        });
    }
    Ok((h.reply, data))
}

fn tcp(target: &Target) -> Result<TcpStream, NbdClientError> {
    let mut last = None;
    for a in &target.addrs {
        match TcpStream::connect_timeout(a, HANDSHAKE_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(NbdClientError::Connect(last.unwrap_or_else(|| {
        std::io::Error::from(std::io::ErrorKind::AddrNotAvailable)
    })))
}

/// Connects and negotiates. `NBD_REP_ERR_POLICY` / `NBD_REP_ERR_UNKNOWN` at GO is
/// [`NbdClientError::Fenced`].
pub(crate) fn connect(target: &Target) -> Result<Session, NbdClientError> {
    let until = Instant::now() + HANDSHAKE_DEADLINE;
    let tcp_sock = tcp(target)?;
    tcp_sock.set_nodelay(true).map_err(NbdClientError::Io)?;
    let mut sock = Deadline {
        sock: tcp_sock,
        until,
    };

    let mut greeting = [0u8; ServerGreeting::LEN];
    sock.read_exact(&mut greeting).map_err(NbdClientError::Io)?;
    let g = ServerGreeting::parse(&greeting)?;
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if g.flags.contains(FLAG_NO_ZEROES) {
        cflags |= FLAG_C_NO_ZEROES;
    }
    sock.write_all(&ClientFlags(cflags).encode())
        .map_err(NbdClientError::Io)?;
    sock.write_all(&ClientOption::StartTls.encode())
        .map_err(NbdClientError::Io)?;
    match read_reply(&mut sock, OPT_STARTTLS)? {
        (ReplyType::Ack, _) => {}
        (ReplyType::Error(error), _) => {
            return Err(NbdClientError::Refused {
                option: OPT_STARTTLS,
                error,
            })
        }
        (other, _) => {
            return Err(NbdClientError::UnexpectedReply {
                option: OPT_STARTTLS,
                reply: other.code(),
            })
        }
    }

    let mut tls = rustls::ClientConnection::new(target.tls.clone(), target.server_name.clone())
        .map_err(NbdClientError::Tls)?;
    while tls.is_handshaking() {
        tls.complete_io(&mut sock)
            .map_err(NbdClientError::Handshake)?;
    }
    let (size, flags, max_payload) = {
        let mut s = rustls::Stream::new(&mut tls, &mut sock);
        let go = ClientOption::Go(InfoRequest {
            name: target.export.clone(),
            requests: vec![InfoType::Export, InfoType::BlockSize],
        });
        s.write_all(&go.encode()).map_err(NbdClientError::Io)?;
        let mut export = None;
        let mut max_payload = MAX_PAYLOAD;
        let mut acked = false;
        for _ in 0..MAX_GO_REPLIES {
            match read_reply(&mut s, OPT_GO)? {
                (ReplyType::Info, data) => match InfoReply::parse(&data)? {
                    InfoReply::Export { size, flags } => export = Some((size, flags)),
                    InfoReply::BlockSize { max, .. } => {
                        // Requests are whole 512-byte sectors: round the server's maximum down.
                        let m = max.min(MAX_PAYLOAD) / 512 * 512;
                        if m >= 512 {
                            max_payload = m;
                        }
                    }
                    _ => {}
                },
                (ReplyType::Ack, _) => {
                    acked = true;
                    break;
                }
                (ReplyType::Error(e @ (OptionError::Policy | OptionError::Unknown)), _) => {
                    return Err(NbdClientError::Fenced(e));
                }
                (ReplyType::Error(error), _) => {
                    return Err(NbdClientError::Refused {
                        option: OPT_GO,
                        error,
                    })
                }
                (other, _) => {
                    return Err(NbdClientError::UnexpectedReply {
                        option: OPT_GO,
                        reply: other.code(),
                    })
                }
            }
        }
        if !acked {
            return Err(NbdClientError::UnexpectedReply {
                option: OPT_GO,
                reply: 0,
            });
        }
        let (size, flags) = export.ok_or(NbdClientError::NoExportInfo)?;
        (size, flags, max_payload)
    };
    // Lanes may have many requests in flight (each bounded by the bounce buffer); rustls must
    // take each whole so a request is never half-written.
    tls.set_buffer_limit(None);
    let sock = sock.sock;
    sock.set_read_timeout(None).map_err(NbdClientError::Io)?;
    sock.set_write_timeout(None).map_err(NbdClientError::Io)?;
    sock.set_nonblocking(true).map_err(NbdClientError::Io)?;
    Ok(Session {
        tls,
        sock,
        size,
        flags,
        max_payload,
    })
}
