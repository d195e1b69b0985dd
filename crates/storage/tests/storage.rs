//! The storage node end to end, file engine: the real `bulkhead-storage` binary with its real
//! qemu-storage-daemon, QEMU's own NBD client (`qemu-io`, TLS with x509 client certificates)
//! as the host, the control plane's certificate on the control API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;

use bulkhead_nbd::consts::{MAX_OPTION_REPLY_DATA, OPT_GO, OPT_STARTTLS};
use bulkhead_nbd::{
    ClientFlags, ClientOption, ExportName, InfoRequest, OptionError, OptionReplyHeader, ReplyType,
    ServerGreeting,
};
use bulkhead_storage_proto::{
    parse_answer, Answer, CreateVolume, ErrorCode, Grant, Request, VolumeReply,
};
use harness::*;

const MIB: u64 = 1 << 20;

fn setup() -> Option<(Pki, tempfile::TempDir)> {
    if !have_qemu() {
        bulkhead_testkit::skip_or_fail("qemu-storage-daemon and qemu-io are not installed");
        return None;
    }
    Some((Pki::new(), tempfile::tempdir().unwrap()))
}

fn read_file_at(path: &std::path::Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn granted_host_writes_and_reads_and_the_file_holds_exactly_that() {
    let Some((pki, state)) = setup() else { return };
    let node = StorageNode::start(&pki, state.path(), NodeOpts::default());
    let cp = pki.control_client("control");
    let v = create(&node, &cp, "vol-1", 16 * MIB);
    assert_eq!(v.volume.size_bytes, 16 * MIB);
    // Idempotent: the same again is the same volume; another size is refused.
    assert_eq!(create(&node, &cp, "vol-1", 16 * MIB).volume, v.volume);
    let (status, body) = call(
        &node,
        &cp,
        &Request::CreateVolume(CreateVolume {
            volume_id: vid("vol-1"),
            size_bytes: 8 * MIB,
            source: None,
        }),
    );
    assert!(matches!(
        parse_answer::<VolumeReply>(status, &body).unwrap(),
        Answer::Refused { error, .. } if error.code == ErrorCode::VolumeExists
    ));
    let file = node.volume_file("vol-1");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 16 * MIB);
    grant(&node, &cp, "vol-1", "host-1", 1);

    let creds = pki.qemu_creds(&pki.ca, "host-1");
    let (ok, out) = qemu_io(
        &node,
        &creds,
        "vol-1",
        &[
            "write -P 0xa5 0 64k",
            "write -P 0x3c 1M 4k",
            "write -P 0x77 16380k 4k",
            "flush",
            "read -P 0xa5 0 64k",
            "read -P 0x3c 1M 4k",
            "read -P 0x77 16380k 4k",
            "read -P 0 64k 4k",
        ],
    );
    assert!(ok, "qemu-io through the node failed:\n{out}");
    // The node never transforms data: the file holds byte for byte what the host wrote.
    assert_eq!(read_file_at(&file, 0, 65536), vec![0xa5; 65536]);
    assert_eq!(read_file_at(&file, MIB, 4096), vec![0x3c; 4096]);
    assert_eq!(read_file_at(&file, 16380 * 1024, 4096), vec![0x77; 4096]);
    assert_eq!(read_file_at(&file, 65536, 4096), vec![0; 4096]);
    // And what is in the file is what the host reads.
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.seek(SeekFrom::Start(2 * MIB)).unwrap();
        f.write_all(&[0x5a; 4096]).unwrap();
        f.sync_all().unwrap();
    }
    let (ok, out) = qemu_io(&node, &creds, "vol-1", &["read -P 0x5a 2M 4k"]);
    assert!(ok, "{out}");
    node.wait_audit(&[
        "\"caller\":\"host-1\"",
        "NbdGo",
        "volume:vol-1",
        "\"code\":\"ok\"",
    ]);
    node.wait_audit(&["\"caller\":\"control\"", "\"op\":\"Grant\"", "host:host-1"]);
    node.wait_audit(&["NbdConnection", "volume:vol-1", "\"code\":\"closed\""]);
    // Figures (not asserted): 8 MiB sequential through the node (TLS + proxy) and straight on
    // the engine's own socket (the peer without the node).
    let (ok, via_node) = qemu_io(
        &node,
        &creds,
        "vol-1",
        &["write -P 0x42 0 8M", "read -P 0x42 0 8M"],
    );
    assert!(ok, "{via_node}");
    let direct = std::process::Command::new("qemu-io")
        .args([
            "--image-opts",
            &format!(
                "driver=nbd,server.type=unix,server.path={},export=vol-1",
                node.state_dir.join("run/qsd-nbd.sock").display()
            ),
            "-c",
            "write -P 0x43 0 8M",
            "-c",
            "read -P 0x43 0 8M",
        ])
        .output()
        .unwrap();
    for (what, out) in [
        ("node", via_node),
        (
            "engine socket",
            String::from_utf8_lossy(&direct.stdout).into_owned(),
        ),
    ] {
        for l in out.lines().filter(|l| l.contains("/sec")) {
            eprintln!("FIGURE 8 MiB one op via {what}: {l}");
        }
    }
    // A reading past the end is the engine's refusal, not data.
    let (ok, _) = qemu_io(&node, &creds, "vol-1", &["read 16M 4k"]);
    assert!(!ok, "a read past the end succeeded");
}

#[test]
fn ungranted_host_and_unknown_volume_are_refused_and_audited() {
    let Some((pki, state)) = setup() else { return };
    let node = StorageNode::start(&pki, state.path(), NodeOpts::default());
    let cp = pki.control_client("control");
    create(&node, &cp, "vol-2", 4 * MIB);
    // Not granted to anyone yet: host-1 is refused too.
    let h1 = pki.qemu_creds(&pki.ca, "host-1");
    let (ok, out) = qemu_io(&node, &h1, "vol-2", &["read 0 4k"]);
    assert!(!ok, "an ungranted volume opened:\n{out}");
    node.wait_audit(&[
        "\"caller\":\"host-1\"",
        "volume:vol-2",
        "not_granted",
        "deny",
    ]);
    grant(&node, &cp, "vol-2", "host-1", 1);
    let (ok, out) = qemu_io(&node, &h1, "vol-2", &["write -P 1 0 4k"]);
    assert!(ok, "{out}");
    let h2 = pki.qemu_creds(&pki.ca, "host-2");
    let (ok, out) = qemu_io(&node, &h2, "vol-2", &["read 0 4k"]);
    assert!(!ok, "host-2 opened host-1's volume:\n{out}");
    node.wait_audit(&[
        "\"caller\":\"host-2\"",
        "volume:vol-2",
        "not_granted",
        "deny",
    ]);
    let (ok, _) = qemu_io(&node, &h1, "vol-9", &["read 0 4k"]);
    assert!(!ok);
    node.wait_audit(&["\"caller\":\"host-1\"", "volume:vol-9", "unknown_volume"]);
    let (ok, _) = qemu_io(&node, &h1, "../etc/passwd", &["read 0 4k"]);
    assert!(!ok);
    node.wait_audit(&["\"caller\":\"host-1\"", "export:", "unknown_volume"]);
    // An operator's certificate of the cluster is no host's.
    let op = pki.qemu_creds(&pki.ca, "alice");
    let (ok, _) = qemu_io(&node, &op, "vol-2", &["read 0 4k"]);
    assert!(!ok, "an operator certificate opened a volume");
    node.wait_audit(&["\"caller\":\"alice\"", "volume:vol-2", "not_a_host"]);
}

#[test]
fn a_certificate_of_another_ca_is_refused_and_audited() {
    let Some((pki, state)) = setup() else { return };
    let node = StorageNode::start(&pki, state.path(), NodeOpts::default());
    let cp = pki.control_client("control");
    create(&node, &cp, "vol-3", 4 * MIB);
    grant(&node, &cp, "vol-3", "host-1", 1);
    // Named host-1 too, but issued by another cluster's CA.
    let forged = pki.qemu_creds(&pki.other, "host-1");
    let (ok, out) = qemu_io(&node, &forged, "vol-3", &["read 0 4k"]);
    assert!(!ok, "another CA's certificate opened a volume:\n{out}");
    node.wait_audit(&["TlsHandshake", "tls_bad_client_cert"]);
}

#[test]
fn options_before_starttls_get_tls_reqd() {
    let Some((pki, state)) = setup() else { return };
    let node = StorageNode::start(&pki, state.path(), NodeOpts::default());
    let mut s = TcpStream::connect(("127.0.0.1", node.nbd_port)).unwrap();
    let mut greeting = [0u8; ServerGreeting::LEN];
    s.read_exact(&mut greeting).unwrap();
    ServerGreeting::parse(&greeting).unwrap();
    s.write_all(&ClientFlags::BULKHEAD.encode()).unwrap();
    let go = ClientOption::Go(InfoRequest {
        name: ExportName::new("vol-1").unwrap(),
        requests: vec![],
    });
    s.write_all(&go.encode()).unwrap();
    let mut head = [0u8; OptionReplyHeader::LEN];
    s.read_exact(&mut head).unwrap();
    let h = OptionReplyHeader::parse(&head, MAX_OPTION_REPLY_DATA).unwrap();
    assert_eq!(h.option, OPT_GO);
    assert_eq!(h.reply, ReplyType::Error(OptionError::TlsReqd));
    // STARTTLS is then acknowledged (the TLS handshake would follow).
    s.write_all(&ClientOption::StartTls.encode()).unwrap();
    s.read_exact(&mut head).unwrap();
    let h = OptionReplyHeader::parse(&head, MAX_OPTION_REPLY_DATA).unwrap();
    assert_eq!((h.option, h.reply), (OPT_STARTTLS, ReplyType::Ack));
    node.wait_audit(&["TlsHandshake", "nbd_tls_required"]);
}

#[test]
fn idle_unauthenticated_connections_from_one_address_cannot_shut_hosts_out() {
    let Some((pki, state)) = setup() else { return };
    let node = StorageNode::start(&pki, state.path(), NodeOpts::default());
    let cp = pki.control_client("control");
    create(&node, &cp, "vol-b", 4 * MIB);
    grant(&node, &cp, "vol-b", "host-1", 1);
    let rt = rt();
    // A client at 127.0.0.2 opens connections and never answers the greeting.
    let connect = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            s.connect(format!("127.0.0.1:{}", node.nbd_port).parse().unwrap())
                .await
                .unwrap()
        })
    };
    let greeted = |rt: &tokio::runtime::Runtime, c: &mut tokio::net::TcpStream| {
        use tokio::io::AsyncReadExt;
        rt.block_on(async {
            let mut g = [0u8; ServerGreeting::LEN];
            matches!(
                tokio::time::timeout(std::time::Duration::from_secs(5), c.read_exact(&mut g)).await,
                Ok(Ok(_))
            )
        })
    };
    let mut idle = Vec::new();
    for _ in 0..bulkhead_storage::nbd_server::MAX_NEGOTIATING_PER_ADDR {
        let mut c = connect(&rt);
        assert!(
            greeted(&rt, &mut c),
            "a connection within the budget got no greeting"
        );
        idle.push(c);
    }
    // One more from that address is closed at once, and the refusal is audited.
    let mut extra = connect(&rt);
    assert!(
        !greeted(&rt, &mut extra),
        "the address's budget was not enforced"
    );
    node.wait_audit(&["nbd_address_negotiation_cap"]);
    // The granted host, at another address, is served all the while.
    let h1 = pki.qemu_creds(&pki.ca, "host-1");
    let (ok, out) = qemu_io(&node, &h1, "vol-b", &["write -P 7 0 4k", "read -P 7 0 4k"]);
    assert!(ok, "a host was shut out by idle connections:\n{out}");
    // Once the idle connections go, that address is served again.
    drop(idle);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut again = connect(&rt);
    assert!(greeted(&rt, &mut again));
}

#[test]
fn the_control_api_serves_only_the_control_plane() {
    let Some((pki, state)) = setup() else { return };
    let node = StorageNode::start(&pki, state.path(), NodeOpts::default());
    for who in ["host-1", "alice"] {
        let c = pki.control_client(who);
        let (status, body) = call(
            &node,
            &c,
            &Request::CreateVolume(CreateVolume {
                volume_id: vid("vol-4"),
                size_bytes: MIB,
                source: None,
            }),
        );
        assert_eq!(status, 403, "{who}: {}", String::from_utf8_lossy(&body));
        assert!(matches!(
            parse_answer::<VolumeReply>(status, &body).unwrap(),
            Answer::Refused { error, .. } if error.code == ErrorCode::NotControlPlane
        ));
        node.wait_audit(&[&format!("\"caller\":\"{who}\""), "not_control_plane"]);
    }
    let cp = pki.control_client("control");
    assert!(list(&node, &cp).volumes.is_empty(), "a refused create ran");
    // Strict bodies: an unknown field is refused, audited with the body's digest.
    let r = bulkhead_mtls::HttpsClient::request(
        &cp,
        &node.control,
        "POST",
        "/v1/CreateVolume",
        &[],
        br#"{"volume_id":"vol-4","size_bytes":1048576,"engine":"rbd"}"#.to_vec(),
    );
    let r = rt().block_on(r).unwrap();
    assert_eq!(r.status, 400);
    node.wait_audit(&["\"caller\":\"control\"", "CreateVolume", "bad_request"]);
}

#[test]
fn a_grant_to_another_host_cuts_the_live_connection_and_refuses_the_old_host() {
    let Some((pki, state)) = setup() else { return };
    let node = StorageNode::start(&pki, state.path(), NodeOpts::default());
    let cp = pki.control_client("control");
    create(&node, &cp, "vol-5", 4 * MIB);
    grant(&node, &cp, "vol-5", "host-1", 1);
    let h1 = pki.qemu_creds(&pki.ca, "host-1");
    let mut live = LiveClient::open(&node, &h1, "vol-5");
    let out = live.run("write -P 0x11 0 4k", &["wrote", "failed", "can't open"]);
    assert!(out.contains("wrote 4096/4096"), "{out}");
    assert_eq!(list(&node, &cp).volumes[0].connections, 1);

    // A stale or conflicting grant is refused and changes nothing.
    for (generation, code) in [(0u64, None), (1, Some(ErrorCode::GenerationConflict))] {
        let (status, body) = call(
            &node,
            &cp,
            &Request::Grant(Grant {
                volume_id: vid("vol-5"),
                host: host("host-2"),
                generation,
            }),
        );
        match code {
            Some(code) => assert!(matches!(
                parse_answer::<VolumeReply>(status, &body).unwrap(),
                Answer::Refused { error, .. } if error.code == code
            )),
            None => assert_eq!(status, 400),
        }
    }
    let out = live.run("write -P 0x12 4k 4k", &["wrote", "failed"]);
    assert!(out.contains("wrote 4096/4096"), "{out}");

    // Fencing: the grant to host-2 cuts host-1's live connection before it answers.
    let t = std::time::Instant::now();
    let g = grant(&node, &cp, "vol-5", "host-2", 2);
    eprintln!(
        "FIGURE fence: Grant with one live connection answered in {:?} (cut, export drained and re-added)",
        t.elapsed()
    );
    assert_eq!(g.cut_connections, 1);
    assert_eq!(g.volume.granted_to, Some(host("host-2")));
    let out = live.run("write -P 0x13 8k 4k", &["wrote", "failed", "error"]);
    assert!(
        !out.contains("wrote 4096/4096"),
        "host-1 wrote after the fence:\n{out}"
    );
    drop(live);
    node.wait_audit(&["NbdConnection", "volume:vol-5", "fenced"]);
    let (ok, out) = qemu_io(&node, &h1, "vol-5", &["write -P 0x14 0 4k"]);
    assert!(!ok, "host-1 reconnected after the fence:\n{out}");
    node.wait_audit(&["\"caller\":\"host-1\"", "volume:vol-5", "not_granted"]);
    // Host-2 sees everything host-1 had written before the fence, and nothing after.
    let h2 = pki.qemu_creds(&pki.ca, "host-2");
    let (ok, out) = qemu_io(
        &node,
        &h2,
        "vol-5",
        &["read -P 0x11 0 4k", "read -P 0x12 4k 4k", "read -P 0 8k 4k"],
    );
    assert!(ok, "{out}");
    let file = node.volume_file("vol-5");
    assert_eq!(read_file_at(&file, 8192, 4096), vec![0; 4096]);
    // Revoke: nobody may open it.
    let r = revoke(&node, &cp, "vol-5", 3);
    assert_eq!(r.volume.granted_to, None);
    let (ok, _) = qemu_io(&node, &h2, "vol-5", &["read 0 4k"]);
    assert!(!ok, "host-2 opened a revoked volume");
}

#[test]
fn kill_9_and_restart_keeps_data_and_grants() {
    let Some((pki, state)) = setup() else { return };
    let mut node = StorageNode::start(&pki, state.path(), NodeOpts::default());
    let cp = pki.control_client("control");
    create(&node, &cp, "vol-6", 4 * MIB);
    create(&node, &cp, "vol-7", 4 * MIB);
    grant(&node, &cp, "vol-6", "host-1", 1);
    grant(&node, &cp, "vol-6", "host-2", 4);
    let h2 = pki.qemu_creds(&pki.ca, "host-2");
    let (ok, out) = qemu_io(&node, &h2, "vol-6", &["write -P 0x66 0 64k", "flush"]);
    assert!(ok, "{out}");
    let before = list(&node, &cp);
    let t = std::time::Instant::now();
    node.restart(&pki);
    eprintln!(
        "FIGURE restart: kill -9 of node and engine to ready with 2 volumes: {:?}",
        t.elapsed()
    );
    let after = list(&node, &cp);
    assert_eq!(before, after, "table changed across kill -9");
    let (ok, out) = qemu_io(&node, &h2, "vol-6", &["read -P 0x66 0 64k"]);
    assert!(ok, "{out}");
    let h1 = pki.qemu_creds(&pki.ca, "host-1");
    let (ok, _) = qemu_io(&node, &h1, "vol-6", &["read 0 4k"]);
    assert!(!ok, "the fenced host opened the volume after a restart");
    // The audit log kept its chain across the kill.
    node.wait_audit(&["\"caller\":\"host-1\"", "volume:vol-6", "not_granted"]);
    let head = bulkhead_audit::verify(&node.state_dir.join("audit.log")).unwrap();
    assert!(head.records > 10, "{head:?}");
    // The old generation stays refused.
    let (status, _) = call(
        &node,
        &cp,
        &Request::Grant(Grant {
            volume_id: vid("vol-6"),
            host: host("host-1"),
            generation: 3,
        }),
    );
    assert_eq!(status, 409);
    // The engine child dies alone: the node restarts it and re-adds the exports.
    let old = node.qsd_pid().unwrap();
    // SAFETY: kill has no memory-safety preconditions; `old` is the node's child.
    unsafe { libc::kill(old, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (ok, out) = qemu_io(&node, &h2, "vol-6", &["read -P 0x66 0 64k"]);
        if ok && node.qsd_pid() != Some(old) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no engine after its death:\n{out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn a_volume_whose_file_is_gone_does_not_take_the_node_down() {
    let Some((pki, state)) = setup() else { return };
    let mut node = StorageNode::start(&pki, state.path(), NodeOpts::default());
    let cp = pki.control_client("control");
    for v in ["vol-12", "vol-13"] {
        create(&node, &cp, v, MIB);
        grant(&node, &cp, v, "host-1", 1);
    }
    let h1 = pki.qemu_creds(&pki.ca, "host-1");
    let (ok, out) = qemu_io(&node, &h1, "vol-12", &["write -P 0x12 0 4k", "flush"]);
    assert!(ok, "{out}");
    node.kill9();
    std::fs::remove_file(node.volume_file("vol-13")).unwrap();
    let node = StorageNode::start(&pki, state.path(), NodeOpts::default());
    let (ok, out) = qemu_io(&node, &h1, "vol-12", &["read -P 0x12 0 4k"]);
    assert!(ok, "the intact volume is not served:\n{out}");
    let (ok, _) = qemu_io(&node, &h1, "vol-13", &["read 0 4k"]);
    assert!(!ok, "a volume without its file was served");
    // Fencing it still works, and it can be deleted.
    assert_eq!(grant(&node, &cp, "vol-13", "host-2", 2).cut_connections, 0);
    assert!(delete(&node, &cp, "vol-13").deleted);
    assert_eq!(list(&node, &cp).volumes.len(), 1);
}

#[test]
fn a_corrupt_table_stops_the_node() {
    let Some((pki, state)) = setup() else { return };
    let mut node = StorageNode::start(&pki, state.path(), NodeOpts::default());
    let cp = pki.control_client("control");
    create(&node, &cp, "vol-8", MIB);
    node.kill9();
    let table = state.path().join("volumes.table");
    let mut raw = std::fs::read(&table).unwrap();
    let last = raw.len() - 3;
    raw[last] ^= 0x20;
    std::fs::write(&table, &raw).unwrap();
    let err = StorageNode::try_start(pki.ca.root(), state.path(), NodeOpts::default())
        .err()
        .expect("the node started on a corrupt table");
    assert!(err.contains("digest"), "{err}");
}

#[test]
fn delete_cuts_connections_and_removes_the_file() {
    let Some((pki, state)) = setup() else { return };
    let node = StorageNode::start(&pki, state.path(), NodeOpts::default());
    let cp = pki.control_client("control");
    create(&node, &cp, "vol-9", 4 * MIB);
    grant(&node, &cp, "vol-9", "host-1", 1);
    let h1 = pki.qemu_creds(&pki.ca, "host-1");
    let mut live = LiveClient::open(&node, &h1, "vol-9");
    let out = live.run("write -P 0x99 0 4k", &["wrote", "failed", "can't open"]);
    assert!(out.contains("wrote 4096/4096"), "{out}");
    let file = node.volume_file("vol-9");
    assert!(file.exists());
    let d = delete(&node, &cp, "vol-9");
    assert!(d.deleted);
    assert_eq!(d.cut_connections, 1);
    assert!(!file.exists(), "the volume file is still there");
    let out = live.run("write -P 0x98 0 4k", &["wrote", "failed", "error"]);
    assert!(
        !out.contains("wrote 4096/4096"),
        "wrote after delete:\n{out}"
    );
    drop(live);
    assert!(!delete(&node, &cp, "vol-9").deleted, "delete is idempotent");
    assert!(list(&node, &cp).volumes.is_empty());
    let (ok, _) = qemu_io(&node, &h1, "vol-9", &["read 0 4k"]);
    assert!(!ok);
    // The id can be used again, for a fresh, empty volume.
    create(&node, &cp, "vol-9", 4 * MIB);
    assert_eq!(read_file_at(&file, 0, 4096), vec![0; 4096]);
}

/// A raw NBD client over TLS with a host certificate (our own `bulkhead-nbd` encoders and
/// parsers): the options after STARTTLS, and a write/read in transmission.
mod raw {
    use super::*;
    use bulkhead_nbd::consts::{OPT_ABORT, OPT_INFO, OPT_LIST, OPT_STRUCTURED_REPLY};
    use bulkhead_nbd::{
        Command, CommandFlags, Cookie, InfoReply, InfoType, OptionReplyHeader, SimpleReply,
    };
    use bulkhead_tokens::pki::ServerIdentity;

    type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

    fn reply(s: &mut impl Read) -> (OptionReplyHeader, Vec<u8>) {
        let mut head = [0u8; OptionReplyHeader::LEN];
        s.read_exact(&mut head).unwrap();
        let h = OptionReplyHeader::parse(&head, MAX_OPTION_REPLY_DATA).unwrap();
        let mut data = vec![0u8; h.data_len()];
        s.read_exact(&mut data).unwrap();
        (h, data)
    }

    fn connect(pki: &Pki, node: &StorageNode, who: &str) -> Tls {
        let mut s = TcpStream::connect(("127.0.0.1", node.nbd_port)).unwrap();
        let mut greeting = [0u8; ServerGreeting::LEN];
        s.read_exact(&mut greeting).unwrap();
        ServerGreeting::parse(&greeting).unwrap();
        s.write_all(&ClientFlags::BULKHEAD.encode()).unwrap();
        s.write_all(&ClientOption::StartTls.encode()).unwrap();
        let (h, _) = reply(&mut s);
        assert_eq!(h.reply, ReplyType::Ack);
        let cfg = bulkhead_mtls::pinned_client_config(
            &pki.ca.ca_pem(),
            Some((&pki.ca.cert(who), &pki.ca.key(who))),
            ServerIdentity::service(NODE_NAME),
        )
        .unwrap();
        let conn = rustls::ClientConnection::new(
            std::sync::Arc::new(cfg),
            "127.0.0.1".try_into().unwrap(),
        )
        .unwrap();
        rustls::StreamOwned::new(conn, s)
    }

    fn go(name: &str) -> ClientOption {
        ClientOption::Go(InfoRequest {
            name: ExportName::new(name).unwrap(),
            requests: vec![InfoType::BlockSize],
        })
    }

    #[test]
    fn options_after_tls_and_a_transmission_through_the_node() {
        let Some((pki, state)) = setup() else { return };
        let node = StorageNode::start(&pki, state.path(), NodeOpts::default());
        let cp = pki.control_client("control");
        create(&node, &cp, "vol-10", MIB);
        grant(&node, &cp, "vol-10", "host-1", 1);
        let mut s = connect(&pki, &node, "host-1");
        // Simple replies only; no export list; a second STARTTLS is invalid.
        for (opt, code, want) in [
            (
                ClientOption::StructuredReply,
                OPT_STRUCTURED_REPLY,
                ReplyType::Error(OptionError::Unsup),
            ),
            (
                ClientOption::List,
                OPT_LIST,
                ReplyType::Error(OptionError::Policy),
            ),
            (
                ClientOption::StartTls,
                OPT_STARTTLS,
                ReplyType::Error(OptionError::Invalid),
            ),
            (
                ClientOption::Unknown(99),
                99,
                ReplyType::Error(OptionError::Unsup),
            ),
        ] {
            s.write_all(&opt.encode()).unwrap();
            let (h, _) = reply(&mut s);
            assert_eq!((h.option, h.reply), (code, want), "{opt:?}");
        }
        // INFO on the granted volume: its size, then ACK.
        let info = ClientOption::Info(InfoRequest {
            name: ExportName::new("vol-10").unwrap(),
            requests: vec![],
        });
        s.write_all(&info.encode()).unwrap();
        let (h, data) = reply(&mut s);
        assert_eq!((h.option, h.reply), (OPT_INFO, ReplyType::Info));
        assert!(matches!(
            InfoReply::parse(&data).unwrap(),
            InfoReply::Export { size, .. } if size == MIB
        ));
        let (h, _) = reply(&mut s);
        assert_eq!(h.reply, ReplyType::Ack);
        // GO on an unknown volume: policy; then GO on ours.
        s.write_all(&go("vol-11").encode()).unwrap();
        let (h, _) = reply(&mut s);
        assert_eq!(h.reply, ReplyType::Error(OptionError::Policy));
        s.write_all(&go("vol-10").encode()).unwrap();
        let mut flags = None;
        loop {
            let (h, data) = reply(&mut s);
            assert_eq!(h.option, OPT_GO);
            match h.reply {
                ReplyType::Info => {
                    if let InfoReply::Export { size, flags: f } = InfoReply::parse(&data).unwrap() {
                        assert_eq!(size, MIB);
                        flags = Some(f);
                    }
                }
                ReplyType::Ack => break,
                other => panic!("GO answered {other:?}"),
            }
        }
        let flags = flags.expect("GO gave no NBD_INFO_EXPORT");
        assert!(!flags.read_only() && flags.flush() && flags.fua());
        // Transmission: a write with FUA, then a read, through the node.
        let payload: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        let write = bulkhead_nbd::Request {
            flags: CommandFlags(bulkhead_nbd::consts::CMD_FLAG_FUA),
            command: Command::Write,
            cookie: Cookie(7),
            offset: 4096,
            length: 8192,
        };
        s.write_all(&write.encode()).unwrap();
        s.write_all(&payload).unwrap();
        let mut r = [0u8; SimpleReply::LEN];
        s.read_exact(&mut r).unwrap();
        let r = SimpleReply::parse(&r).unwrap();
        assert_eq!((r.error, r.cookie), (None, Cookie(7)));
        let read = bulkhead_nbd::Request {
            flags: CommandFlags(0),
            command: Command::Read,
            cookie: Cookie(8),
            offset: 4096,
            length: 8192,
        };
        s.write_all(&read.encode()).unwrap();
        let mut r = [0u8; SimpleReply::LEN];
        s.read_exact(&mut r).unwrap();
        let r = SimpleReply::parse(&r).unwrap();
        assert_eq!((r.error, r.cookie), (None, Cookie(8)));
        let mut back = vec![0u8; 8192];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, payload);
        assert_eq!(
            read_file_at(&node.volume_file("vol-10"), 4096, 8192),
            payload
        );
        // A read past the end is the engine's error reply, not data.
        let past = bulkhead_nbd::Request {
            offset: MIB,
            cookie: Cookie(9),
            ..read
        };
        s.write_all(&past.encode()).unwrap();
        let mut r = [0u8; SimpleReply::LEN];
        s.read_exact(&mut r).unwrap();
        let r = SimpleReply::parse(&r).unwrap();
        assert!(r.error.is_some() && r.cookie == Cookie(9), "{r:?}");
        drop(s);
        // ABORT before any export: acknowledged, then closed.
        let mut s = connect(&pki, &node, "host-1");
        s.write_all(&ClientOption::Abort.encode()).unwrap();
        let (h, _) = reply(&mut s);
        assert_eq!((h.option, h.reply), (OPT_ABORT, ReplyType::Ack));
    }
}

/// Snapshots on the file engine: refused while a host holds the volume; taken once it is
/// detached (a sparse copy or reflink, never exported, never grantable); a bigger volume made
/// from it holds the snapshot's bytes and is served to its host; deleting the original leaves
/// snapshot and clone intact.
#[test]
fn snapshots_are_copies_of_detached_volumes_and_volumes_are_made_from_them() {
    use bulkhead_storage_proto::CreateSnapshot;
    let Some((pki, state)) = setup() else { return };
    let node = StorageNode::start(&pki, state.path(), NodeOpts::default());
    let cp = pki.control_client("control");
    let refused = |req: &Request| -> ErrorCode {
        let (status, body) = call(&node, &cp, req);
        match parse_answer::<VolumeReply>(status, &body).unwrap() {
            Answer::Refused { error, .. } => error.code,
            Answer::Ok(v) => panic!("{:?} answered {v:?}", req.op()),
        }
    };
    create(&node, &cp, "vol-1", 16 * MIB);
    grant(&node, &cp, "vol-1", "host-1", 1);
    let creds = pki.qemu_creds(&pki.ca, "host-1");
    let (wrote, out) = qemu_io(
        &node,
        &creds,
        "vol-1",
        &["write -P 0xa5 0 64k", "write -P 0x3c 8M 4k", "flush"],
    );
    assert!(wrote, "{out}");
    let snap = |s: &str, v: &str| {
        Request::CreateSnapshot(CreateSnapshot {
            snapshot_id: vid(s),
            volume_id: vid(v),
        })
    };
    // Granted: no consistent point without the host; refused, typed.
    assert_eq!(refused(&snap("snap-1", "vol-1")), ErrorCode::VolumeInUse);
    assert_eq!(refused(&snap("snap-1", "vol-9")), ErrorCode::UnknownVolume);
    revoke(&node, &cp, "vol-1", 2);
    let t = std::time::Instant::now();
    let s: VolumeReply = ok(&node, &cp, &snap("snap-1", "vol-1"));
    eprintln!("snapshot of a 16 MiB volume: {:?}", t.elapsed());
    assert_eq!(s.volume.size_bytes, 16 * MIB);
    // Idempotent.
    let again: VolumeReply = ok(&node, &cp, &snap("snap-1", "vol-1"));
    assert_eq!(again.volume, s.volume);
    let sfile = node.volume_file("snap-1");
    assert_eq!(read_file_at(&sfile, 0, 65536), vec![0xa5; 65536]);
    assert_eq!(read_file_at(&sfile, 8 * MIB, 4096), vec![0x3c; 4096]);
    // A snapshot is never granted, and never served.
    let g = Request::Grant(Grant {
        volume_id: vid("snap-1"),
        host: host("host-1"),
        generation: 5,
    });
    assert_eq!(refused(&g), ErrorCode::NotAttachable);
    let (ok_open, out) = qemu_io(&node, &creds, "snap-1", &["read 0 4k"]);
    assert!(!ok_open, "a snapshot opened: {out}");
    // The original changes afterwards; the snapshot does not.
    grant(&node, &cp, "vol-1", "host-1", 3);
    let (okw, out) = qemu_io(&node, &creds, "vol-1", &["write -P 0x11 0 64k", "flush"]);
    assert!(okw, "{out}");
    assert_eq!(read_file_at(&sfile, 0, 4096), vec![0xa5; 4096]);

    // A volume from the snapshot: smaller refused, larger holds the snapshot's bytes.
    let from = |size: u64| {
        Request::CreateVolume(CreateVolume {
            volume_id: vid("vol-2"),
            size_bytes: size,
            source: Some(vid("snap-1")),
        })
    };
    assert_eq!(refused(&from(8 * MIB)), ErrorCode::BadRequest);
    let v: VolumeReply = ok(&node, &cp, &from(32 * MIB));
    assert_eq!(v.volume.size_bytes, 32 * MIB);
    // The original deleted: snapshot and clone keep their blocks.
    delete(&node, &cp, "vol-1");
    grant(&node, &cp, "vol-2", "host-1", 1);
    let (ok2, out) = qemu_io(
        &node,
        &creds,
        "vol-2",
        &[
            "read -P 0xa5 0 64k",
            "read -P 0x3c 8M 4k",
            "read -P 0 30M 4k",
        ],
    );
    assert!(ok2, "{out}");
    delete(&node, &cp, "vol-2");
    delete(&node, &cp, "snap-1");
    assert!(!sfile.exists());
    assert!(list(&node, &cp).volumes.is_empty());
    node.wait_audit(&["\"op\":\"CreateSnapshot\"", "volume:snap-1"]);
}
