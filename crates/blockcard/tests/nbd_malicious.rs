//! The card against a hostile storage node: a small NBD server in this test that completes the
//! real handshake (STARTTLS, TLS 1.3 with client certificates, GO) and then answers one poisoned
//! block with garbage, a wrong cookie, a short read and a closed connection, an oversized
//! payload, an error, or a structured reply. Each time the guest's request gets an I/O error
//! (or, for an over-long payload, exactly its own bytes), the card stays alive, and other
//! blocks keep reading back correctly.

#![allow(clippy::cast_possible_truncation)]

mod common;
mod nbd_common;

use bulkhead_blockcard::control::{ControlResponse, KeySource};
use bulkhead_blockcard::xts::CryptoSectorSize;
use bulkhead_nbd::consts::*;
use bulkhead_nbd::{
    ClientFlags, ClientOption, Command, Cookie, Errno, HandshakeFlags, InfoReply, OptionHeader,
    OptionReply, Request, ServerGreeting, SimpleReply, TransmissionFlags,
};
use common::frontend::*;
use common::*;
use nbd_common::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

const SIZE: u64 = 4 << 20;
const BLOCK: usize = 4096;
/// Byte offset of the block the server misbehaves on.
const POISON: u64 = 64 * BLOCK as u64;
const IOERR: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Garbage,
    WrongCookie,
    ShortReadThenClose,
    Oversized,
    ErrorReply,
    Structured,
}

fn server_config(ca: &bulkhead_tokens::pki::CaDir) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca.ca_pem()).expect("ca"))
        .expect("root");
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("client verifier");
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_file(ca.cert(STORAGE)).expect("cert")],
            PrivateKeyDer::from_pem_file(ca.key(STORAGE)).expect("key"),
        )
        .expect("server config");
    Arc::new(cfg)
}

fn read_option<S: Read>(s: &mut S) -> std::io::Result<ClientOption> {
    let mut h = [0u8; OptionHeader::LEN];
    s.read_exact(&mut h)?;
    let h = OptionHeader::parse(&h, MAX_OPTION_DATA).map_err(std::io::Error::other)?;
    let mut data = vec![0u8; h.data_len()];
    s.read_exact(&mut data)?;
    ClientOption::parse(&h, &data).map_err(std::io::Error::other)
}

fn serve(
    mut sock: TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    mode: Mode,
    store: Arc<Mutex<Vec<u8>>>,
) -> std::io::Result<()> {
    sock.write_all(
        &ServerGreeting {
            flags: HandshakeFlags::BULKHEAD,
        }
        .encode(),
    )?;
    let mut f = [0u8; 4];
    sock.read_exact(&mut f)?;
    ClientFlags::parse(&f).map_err(std::io::Error::other)?;
    if read_option(&mut sock)? != ClientOption::StartTls {
        return Ok(());
    }
    sock.write_all(&OptionReply::ack(OPT_STARTTLS).encode())?;
    let conn = rustls::ServerConnection::new(cfg).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let ClientOption::Go(_) = read_option(&mut tls)? else {
        return Ok(());
    };
    let info = InfoReply::Export {
        size: SIZE,
        flags: TransmissionFlags(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH),
    };
    tls.write_all(&OptionReply::info(OPT_GO, &info).encode())?;
    tls.write_all(&OptionReply::ack(OPT_GO).encode())?;
    loop {
        let mut r = [0u8; Request::LEN];
        tls.read_exact(&mut r)?;
        let req = Request::parse(&r).map_err(std::io::Error::other)?;
        let off = req.offset as usize;
        let len = req.length as usize;
        let ok = SimpleReply {
            error: None,
            cookie: req.cookie,
        };
        match req.command {
            Command::Write => {
                let mut data = vec![0u8; len];
                tls.read_exact(&mut data)?;
                store.lock().expect("store")[off..off + len].copy_from_slice(&data);
                tls.write_all(&ok.encode())?;
            }
            Command::Read => {
                let data = store.lock().expect("store")[off..off + len].to_vec();
                if req.offset != POISON {
                    tls.write_all(&ok.encode())?;
                    tls.write_all(&data)?;
                    continue;
                }
                match mode {
                    Mode::Garbage => tls.write_all(&[0xAB; 16])?,
                    Mode::WrongCookie => {
                        let wrong = SimpleReply {
                            error: None,
                            cookie: Cookie(req.cookie.0 ^ 0xdead),
                        };
                        tls.write_all(&wrong.encode())?;
                        tls.write_all(&data)?;
                    }
                    Mode::ShortReadThenClose => {
                        tls.write_all(&ok.encode())?;
                        tls.write_all(&data[..len / 2])?;
                        tls.flush()?;
                        return Ok(());
                    }
                    Mode::Oversized => {
                        tls.write_all(&ok.encode())?;
                        tls.write_all(&data)?;
                        tls.write_all(&[0x5A; 512])?;
                    }
                    Mode::ErrorReply => {
                        let err = SimpleReply {
                            error: Some(Errno::Io),
                            cookie: req.cookie,
                        };
                        tls.write_all(&err.encode())?;
                    }
                    Mode::Structured => {
                        let mut s = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
                        s.extend_from_slice(&[0, 1, 0, 1]);
                        s.extend_from_slice(&req.cookie.0.to_be_bytes());
                        s.extend_from_slice(&(len as u32).to_be_bytes());
                        tls.write_all(&s)?;
                        tls.write_all(&data)?;
                    }
                }
            }
            Command::Flush => tls.write_all(&ok.encode())?,
            _ => return Ok(()),
        }
    }
}

/// Starts the hostile server on a fresh port; it serves until the test process exits.
fn hostile_server(cfg: Arc<rustls::ServerConfig>, mode: Mode) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let store = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (cfg, store) = (cfg.clone(), store.clone());
            std::thread::spawn(move || {
                let _ = serve(conn, cfg, mode, store);
            });
        }
    });
    port
}

fn pattern(tag: u8) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (i as u8).wrapping_mul(7) ^ tag)
        .collect()
}

#[test]
fn hostile_storage_node_gets_io_errors_never_wrong_data() {
    let env = Env::new(4096);
    let ca = cluster_ca(&env.path("ca"));
    let cfg = server_config(&ca);
    for mode in [
        Mode::Garbage,
        Mode::WrongCookie,
        Mode::ShortReadThenClose,
        Mode::Oversized,
        Mode::ErrorReply,
        Mode::Structured,
    ] {
        let port = hostile_server(cfg.clone(), mode);
        let args = card_args(&ca, port, "vol-evil", STORAGE);
        let name = format!("{mode:?}").to_lowercase();
        let log = env.path(&format!("{name}.log"));
        let mut card = Card::start(
            &env,
            CardOpts {
                name: &name,
                nbd: Some(&args),
                log: Some(&log),
                ..Default::default()
            },
        );
        let r = card.attach("vol-evil", CryptoSectorSize::S512, KeySource::Plain);
        assert_eq!(
            r,
            ControlResponse::Attached {
                capacity_sectors: SIZE / 512,
                encrypted: false
            },
            "{mode:?}"
        );
        let mut h = Harness::connect(&card.vhost, 1);
        let (good, poison) = (pattern(1), pattern(2));
        assert_eq!(h.write(0, 0, &good), 0, "{mode:?}");
        assert_eq!(h.write(0, POISON / 512, &poison), 0, "{mode:?}");
        let got = h.read(0, POISON / 512, BLOCK);
        match mode {
            // A simple reply has no length: the surplus is seen as the next reply's header, a
            // protocol violation after this read completed with exactly its own bytes.
            Mode::Oversized => assert!(
                got.as_ref() == Ok(&poison) || got == Err(IOERR),
                "{mode:?}: wrong data returned"
            ),
            _ => assert_eq!(got.map(|_| ()), Err(IOERR), "{mode:?}"),
        }
        // The card is alive and the next request works (over a new connection if needed).
        // Oversized: the surplus may arrive in a later TLS record, after the guest already sent
        // its next read on the same connection; that read was in flight when the violation was
        // seen, so it fails (never with wrong data) and the one after it works.
        let mut next = h.read(0, 0, BLOCK);
        if matches!(mode, Mode::Oversized) && next == Err(IOERR) {
            next = h.read(0, 0, BLOCK);
        }
        assert!(next == Ok(good.clone()), "{mode:?}: good block");
        assert!(card.alive(), "{mode:?}");
        let protocol = card.metric("nbd_protocol_errors");
        let replies = card.metric("nbd_reply_errors");
        let losses = card.metric("nbd_connection_losses");
        eprintln!("{mode:?}: protocol_errors={protocol} reply_errors={replies} connection_losses={losses}");
        match mode {
            Mode::ErrorReply => assert_eq!((protocol, replies), (0, 1), "{mode:?}"),
            Mode::ShortReadThenClose => assert!(losses >= 4, "{mode:?}: {losses}"),
            _ => assert!(protocol >= 1, "{mode:?}"),
        }
        drop(h);
        card.detach();
    }
}
