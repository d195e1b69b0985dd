//! The card against its real peer: the workspace's `bulkhead-storage` node (NBD + TLS listener
//! in front of `qemu-storage-daemon`) — volume created and granted to this host over the node's
//! mTLS control API, encrypted I/O through the card, then the volume granted to another host: the
//! node cuts the card's connection and refuses it at GO, and the card is fenced for good.
//!
//! Uses the `bulkhead-storage` binary of the same target directory (`make test` builds every
//! binary before the tests; by hand: `cargo build --release -p bulkhead-storage`).

#![allow(clippy::cast_possible_truncation)]

mod common;

use bulkhead_blockcard::control::{ControlResponse, KeySource};
use bulkhead_blockcard::xts::CryptoSectorSize;
use bulkhead_tokens::pki::{CaDir, ServerIdentity};
use bulkhead_tokens::Role;
use common::frontend::*;
use common::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NODE: &str = "storage-1";
const VOLUME: &str = "vol-card1";
const IOERR: u8 = 1;

fn storage_binary() -> PathBuf {
    // tests run from target/<profile>/deps/<test>-<hash>; the binaries sit in target/<profile>.
    let exe = std::env::current_exe().expect("test exe");
    exe.parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("bulkhead-storage"))
        .expect("target dir")
}

struct Node {
    child: Child,
    control: String,
    nbd_port: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, key: &str) -> String {
    line.split(&format!("\"{key}\":\""))
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .to_string()
}

fn start_node(ca: &CaDir, state: &std::path::Path) -> Node {
    std::fs::create_dir_all(state).expect("state dir");
    let mut child = Command::new(storage_binary())
        .arg("--ca-dir")
        .arg(ca.root())
        .args(["--name", NODE])
        .arg("--state-dir")
        .arg(state)
        .args([
            "--listen-control",
            "127.0.0.1:0",
            "--listen-nbd",
            "127.0.0.1:0",
        ])
        .env("BULKHEAD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn bulkhead-storage");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert!(line.contains("\"event\":\"ready\""), "{line}");
    let nbd: std::net::SocketAddr = field(&line, "nbd").parse().expect("nbd addr");
    Node {
        control: field(&line, "control"),
        nbd_port: nbd.port(),
        child,
    }
}

/// One control call as the control plane makes it (mTLS, the node's identity pinned by name
/// through the CA check on `storage-1`'s certificate); returns the status code and body.
fn call(ca: &CaDir, node: &Node, op: &str, body: &str) -> (u16, String) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca.ca_pem()).expect("ca"))
        .expect("root");
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_file(ca.cert("control")).expect("cert")],
            PrivateKeyDer::from_pem_file(ca.key("control")).expect("key"),
        )
        .expect("client config");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("conn");
    let sock = std::net::TcpStream::connect(&node.control).expect("connect control");
    let mut tls = rustls::StreamOwned::new(conn, sock);
    write!(
        tls,
        "POST /v1/{op} HTTP/1.1\r\nHost: {NODE}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("request");
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // The peer is the node we meant (the check the control plane makes with its pinned client).
    let peer = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first().cloned());
    ServerIdentity::service(NODE)
        .check_der(peer.expect("peer certificate").as_ref())
        .expect("storage node identity");
    (code, text)
}

fn have_storage_node() -> bool {
    storage_binary().exists()
        && Command::new("qemu-storage-daemon")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

#[test]
fn card_on_a_bulkhead_storage_node_is_fenced_when_the_volume_moves() {
    if !have_storage_node() {
        bulkhead_testkit::skip_or_fail(
            "needs target/<profile>/bulkhead-storage (cargo build --release -p bulkhead-storage) and qemu-storage-daemon",
        );
        return;
    }
    let env = Env::new(4096);
    let ca = CaDir::new(env.path("ca"));
    ca.init().expect("ca");
    ca.issue(NODE, Role::Service, false).expect("node cert");
    ca.issue("control", Role::ControlPlane, false)
        .expect("control cert");
    ca.issue("host-1", Role::Host, false).expect("host-1");
    ca.issue("host-2", Role::Host, false).expect("host-2");
    let node = start_node(&ca, &env.path("state"));
    let (code, body) = call(
        &ca,
        &node,
        "CreateVolume",
        &format!(r#"{{"volume_id":"{VOLUME}","size_bytes":16777216}}"#),
    );
    assert_eq!(code, 200, "{body}");
    let (code, body) = call(
        &ca,
        &node,
        "Grant",
        &format!(r#"{{"volume_id":"{VOLUME}","host":"host-1","generation":1}}"#),
    );
    assert_eq!(code, 200, "{body}");

    let args: Vec<String> = vec![
        "--nbd".into(),
        format!("127.0.0.1:{}", node.nbd_port),
        "--nbd-export".into(),
        VOLUME.into(),
        "--nbd-server-name".into(),
        NODE.into(),
        "--tls-ca".into(),
        ca.ca_pem().display().to_string(),
        "--tls-cert".into(),
        ca.cert("host-1").display().to_string(),
        "--tls-key".into(),
        ca.key("host-1").display().to_string(),
    ];
    let log = env.path("card.log");
    let mut card = Card::start(
        &env,
        CardOpts {
            nbd: Some(&args),
            log: Some(&log),
            ..Default::default()
        },
    );
    let r = card.attach(
        VOLUME,
        CryptoSectorSize::S4096,
        KeySource::Sealed(env.seal(VOLUME, &test_key(12))),
    );
    assert_eq!(
        r,
        ControlResponse::Attached {
            capacity_sectors: 16 << 11,
            encrypted: true
        }
    );
    let mut h = Harness::connect(&card.vhost, 1);
    let marker: Vec<u8> = b"BULKHEAD-STORAGE-NODE-MARKER...."
        .iter()
        .copied()
        .cycle()
        .take(64 << 10)
        .collect();
    assert_eq!(h.write(0, 0, &marker), 0);
    assert_eq!(h.flush(0), 0);
    assert!(h.read(0, 0, 64 << 10) == Ok(marker.clone()));
    let four_k = &marker[..4096];
    let t = Instant::now();
    for i in 0..300u64 {
        assert_eq!(h.write(0, 256 + (i % 64) * 8, four_k), 0);
    }
    let w = t.elapsed() / 300;
    let t = Instant::now();
    for i in 0..300u64 {
        assert!(h.read(0, 256 + (i % 64) * 8, 4096).is_ok());
    }
    eprintln!(
        "card via bulkhead-storage: 4K QD1 write {w:?}, read {:?} per op",
        t.elapsed() / 300
    );

    // The volume moves to host-2: the node cuts host-1's connection and refuses it at GO.
    let (code, body) = call(
        &ca,
        &node,
        "Grant",
        &format!(r#"{{"volume_id":"{VOLUME}","host":"host-2","generation":2}}"#),
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"cut_connections\":1"), "{body}");
    assert_eq!(h.write(0, 0, four_k), IOERR);
    assert_eq!(h.read(0, 0, 4096), Err(IOERR));
    assert_eq!(card.metric("nbd_fenced"), 1);
    assert!(card.alive());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("volume is fenced")
    {
        assert!(Instant::now() < deadline, "fence not logged");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(h);
    card.detach();
    // Only ciphertext reached the node's volume file.
    let mut found = false;
    for e in walk(&env.path("state")) {
        let bytes = std::fs::read(&e).unwrap_or_default();
        assert!(
            !contains(&bytes, b"BULKHEAD-STORAGE-NODE-MARKER"),
            "{}",
            e.display()
        );
        found |= bytes.len() >= 16 << 20;
    }
    assert!(
        found,
        "the volume file was not found under the node's state directory"
    );
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
