//! Issue 12 items 3-5 against the real controller: every request refused before the audited
//! pipeline (malformed HTTP, refused handshakes, connection caps) leaves an audit record; a
//! flood leaves a bounded number of records plus summaries that account for every refusal;
//! the metrics output cannot be forged through a path; and a valid operator call is answered
//! within 1 s while 1,000 idle TCP connections and 1,000 idle TLS connections of one tokenless
//! identity are open.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_tokens::Operation;
use common::{Daemon, HOST};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIN5: Duration = Duration::from_secs(300);

/// The flood and the timed idle-connection test do not run at the same time (the 1 s bound
/// is about the server under idle connections, not about sharing two cores with a flood).
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn tls_client(dir: &Path, name: Option<&str>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match name {
        None => b.with_no_client_auth(),
        Some(n) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(dir.join(format!("{n}.pem"))).unwrap()],
                PrivateKeyDer::from_pem_file(dir.join(format!("{n}.key"))).unwrap(),
            )
            .unwrap(),
    })
}

async fn tls_connect(
    cfg: &Arc<rustls::ClientConfig>,
    port: u16,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tokio_rustls::TlsConnector::from(Arc::clone(cfg))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
}

/// Writes `bytes` raw over TLS and reads until the server closes (or 10 s pass).
async fn raw(cfg: &Arc<rustls::ClientConfig>, port: u16, bytes: &[u8]) -> Vec<u8> {
    let Ok(mut s) = tls_connect(cfg, port).await else {
        return Vec::new();
    };
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn entries(d: &Daemon) -> Vec<Value> {
    d.audit().into_iter().map(|r| r["entry"].clone()).collect()
}

/// Waits (up to 10 s) until some audit entry satisfies `pred`; returns it.
fn wait_for_entry(d: &Daemon, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(e) = entries(d).into_iter().find(|e| pred(e)) {
            return e;
        }
        assert!(Instant::now() < deadline, "no audit record for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn is(e: &Value, op: &str, code: &str) -> bool {
    e["op"] == op && e["code"] == code && e["decision"] == "deny" && e["kind"] == "request"
}

#[test]
fn every_malformed_request_leaves_an_audit_record() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let cfg = tls_client(dir.path(), Some("operator"));
    let big = format!(
        "GET /v1/host HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(1024 * 1024)
    );
    let cases: [(&str, &[u8], &str); 4] = [
        (
            "garbage request line",
            b"\x01\x02 GARBAGE\r\n\r\n",
            "http_malformed",
        ),
        (
            "header line without a colon",
            b"GET /v1/host HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n",
            "http_malformed",
        ),
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "http2_preface",
        ),
        ("1 MB header", big.as_bytes(), "http_header_too_large"),
    ];
    let rt = rt();
    for (what, bytes, code) in cases {
        let before = entries(&d)
            .iter()
            .filter(|e| is(e, "HttpParse", code))
            .count();
        let resp = rt.block_on(raw(&cfg, d.port, bytes));
        let head = String::from_utf8_lossy(&resp[..resp.len().min(16)]).to_string();
        assert!(
            resp.is_empty() || head.starts_with("HTTP/1.1 4") || head.starts_with("HTTP/1.1 5"),
            "{what}: answered {head:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let e = loop {
            let found: Vec<Value> = entries(&d)
                .into_iter()
                .filter(|e| is(e, "HttpParse", code))
                .collect();
            if found.len() > before {
                break found[before].clone();
            }
            assert!(Instant::now() < deadline, "{what}: no audit record");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(e["caller"], "operator", "{what}: the caller is recorded");
        assert!(e["cert_sha256"].as_str().is_some_and(|c| c.len() == 64));
    }
    // A handshake without a client certificate is refused and recorded too.
    let anon = tls_client(dir.path(), None);
    rt.block_on(async {
        if let Ok(mut s) = tls_connect(&anon, d.port).await {
            let _ = s
                .write_all(b"GET /v1/host HTTP/1.1\r\nhost: x\r\n\r\n")
                .await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        }
    });
    wait_for_entry(&d, "no client certificate", |e| {
        is(e, "TlsHandshake", "tls_no_client_cert")
    });
    // Not TLS at all.
    rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", d.port))
            .await
            .unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    });
    wait_for_entry(&d, "plain HTTP on the TLS port", |e| {
        is(e, "TlsHandshake", "tls_handshake_failed")
    });
    // The log still verifies.
    bulkhead_audit::verify(&dir.path().join("audit.log")).unwrap();
}

#[test]
fn a_flood_leaves_bounded_records_and_summaries_that_count_every_refusal() {
    const FLOOD: u64 = 5000;
    let _serial = heavy();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let cfg = tls_client(dir.path(), Some("operator"));
    let started = Instant::now();
    rt().block_on(async {
        let mut tasks = Vec::new();
        let per = FLOOD / 25;
        for _ in 0..25 {
            let cfg = Arc::clone(&cfg);
            let port = d.port;
            tasks.push(tokio::spawn(async move {
                for _ in 0..per {
                    let out = raw(&cfg, port, b"\x01 NOT HTTP\r\n\r\n").await;
                    assert!(
                        out.starts_with(b"HTTP/1.1 400"),
                        "{:?}",
                        String::from_utf8_lossy(&out)
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let secs = started.elapsed().as_secs();
    eprintln!("flood of {FLOOD} took {secs} s");
    // Let the last interval's summary be written (5 s interval, generous margin).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (single, suppressed, summaries) = loop {
        let es = entries(&d);
        let single = es
            .iter()
            .filter(|e| is(e, "HttpParse", "http_malformed"))
            .count() as u64;
        let sums: Vec<u64> = es
            .iter()
            .filter(|e| is(e, "RefusalSummary", "http_malformed"))
            .map(|e| {
                e["resources"][0]
                    .as_str()
                    .and_then(|s| s.strip_prefix("suppressed:"))
                    .and_then(|n| n.parse().ok())
                    .expect("summary carries suppressed:K")
            })
            .collect();
        let suppressed: u64 = sums.iter().sum();
        if single + suppressed >= FLOOD || Instant::now() > deadline {
            break (single, suppressed, sums.len() as u64);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!("{single} individual records, {summaries} summaries of {suppressed}");
    assert_eq!(
        single + suppressed,
        FLOOD,
        "every refusal is either written or counted in a summary"
    );
    // At most 5 individual records per second of flood (plus the partial seconds at both ends).
    assert!(single <= 5 * (secs + 2), "{single} records in {secs} s");
    assert!(summaries >= 1 && summaries <= secs / 5 + 3, "{summaries}");
    let total = d.audit().len() as u64;
    assert!(total < 1000, "{total} records for a flood of {FLOOD}");
    bulkhead_audit::verify(&dir.path().join("audit.log")).unwrap();
}

/// A minimal check of the Prometheus text format: every sample line is
/// `name{label="value",...} number` with values escaped, and no line is anything else.
/// One sample: metric name, labels (name, unescaped value), value.
type Sample = (String, Vec<(String, String)>, f64);

fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") || line.is_empty() {
            continue;
        }
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(line.len());
        let name = &line[..name_end];
        assert!(!name.is_empty(), "bad line {line:?}");
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            let b = r.as_bytes();
            let mut i = 0;
            loop {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                let lname = r[start..i].to_string();
                assert!(!lname.is_empty(), "bad label name in {line:?}");
                assert_eq!(&r[i..i + 2], "=\"", "{line:?}");
                i += 2;
                let mut v = String::new();
                loop {
                    let c = *b.get(i).unwrap_or_else(|| panic!("unterminated {line:?}"));
                    i += 1;
                    match c {
                        b'\\' => {
                            match b.get(i) {
                                Some(b'\\') => v.push('\\'),
                                Some(b'"') => v.push('"'),
                                Some(b'n') => v.push('\n'),
                                other => panic!("bad escape {other:?} in {line:?}"),
                            }
                            i += 1;
                        }
                        b'"' => break,
                        b'\n' => panic!("raw newline in {line:?}"),
                        c => v.push(char::from(c)),
                    }
                }
                labels.push((lname, v));
                match b.get(i) {
                    Some(b',') => i += 1,
                    Some(b'}') => {
                        i += 1;
                        break;
                    }
                    other => panic!("bad label list {other:?} in {line:?}"),
                }
            }
            rest = &r[i..];
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.push((name.to_string(), labels, v));
    }
    out
}

#[test]
fn a_metrics_injection_through_a_path_is_escaped_and_the_scrape_parses() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let cfg = tls_client(dir.path(), Some("operator"));
    let rt = rt();
    // Raw request lines: a `"`, `}` and `\` in the path, and one with a newline in it.
    for line in [
        &b"GET /v1/x\"}_1\\ HTTP/1.1\r\nhost: x\r\n\r\n"[..],
        b"GET /v1/x\"}%201%0Afake_metric%201 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"GET /v1/x\"} 1\nfake_metric 1 HTTP/1.1\r\nhost: x\r\n\r\n",
    ] {
        let out = rt.block_on(raw(&cfg, d.port, line));
        assert!(
            out.starts_with(b"HTTP/1.1 4"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
    let t = d.mint("operator", HOST, &[Operation::GetMetrics], MIN5);
    let r = d
        .client("operator")
        .request("GET", "/v1/metrics", Some(&t), b"")
        .unwrap();
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).unwrap();
    let samples = parse_exposition(&text);
    assert!(
        !samples.iter().any(|(n, _, _)| n == "fake_metric"),
        "{text}"
    );
    for (_, labels, _) in &samples {
        for (_, v) in labels {
            assert!(!v.contains("/v1/x"), "a raw path became a label: {text}");
        }
    }
    let unknown: f64 = samples
        .iter()
        .filter(|(n, l, _)| {
            n == "bulkhead_requests_total"
                && l.iter()
                    .any(|(k, v)| k == "operation" && v == "unknown_route")
        })
        .map(|x| x.2)
        .sum();
    assert!(
        unknown >= 1.0,
        "unknown routes counted under one label: {text}"
    );
}

#[test]
fn a_valid_operator_call_is_answered_within_1s_while_2000_idle_connections_are_open() {
    bulkhead_mtls::raise_nofile_limit();
    let _serial = heavy();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let rt = rt();
    let customer = tls_client(dir.path(), Some("customer"));
    let port = d.port;
    // 1,000 TLS connections with one identity (a customer certificate), no token, no request.
    let (tls, refused) = rt.block_on(async {
        let mut held = Vec::new();
        let mut refused = 0;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..1000 {
            let cfg = Arc::clone(&customer);
            tasks.spawn(async move {
                tokio::time::sleep(Duration::from_millis(i % 50)).await;
                tls_connect(&cfg, port).await
            });
        }
        while let Some(r) = tasks.join_next().await {
            match r.unwrap() {
                Ok(s) => held.push(s),
                Err(_) => refused += 1,
            }
        }
        (held, refused)
    });
    // 1,000 idle TCP connections that never start a handshake.
    let tcp = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..1000 {
            v.push(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap(),
            );
        }
        v
    });
    eprintln!(
        "holding {} TLS (+{refused} refused in the handshake) and {} TCP connections",
        tls.len(),
        tcp.len()
    );
    // A valid operator call, timed from connect to answer.
    let t = d.mint("operator", HOST, &[Operation::DescribeHost], MIN5);
    let c = d.client("operator");
    let started = Instant::now();
    let r = c.request("GET", "/v1/host", Some(&t), b"").unwrap();
    let took = started.elapsed();
    eprintln!("valid operator call: {took:?}");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        took < Duration::from_secs(1),
        "a valid operator call took {took:?} with 2,000 idle connections open"
    );
    drop(tcp);
    drop(tls);
    // The customer identity held at most its cap (64) of connections: the others were refused
    // right after the handshake, each recorded one by one or counted in a summary.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let es = entries(&d);
        let single = es
            .iter()
            .filter(|e| is(e, "ConnectionAdmission", "identity_connection_cap"))
            .inspect(|e| assert_eq!(e["caller"], "customer"))
            .count() as u64;
        let summarised: u64 = es
            .iter()
            .filter(|e| is(e, "RefusalSummary", "identity_connection_cap"))
            .filter_map(|e| {
                e["resources"][0]
                    .as_str()?
                    .strip_prefix("suppressed:")?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        if single + summarised >= 936 || Instant::now() > deadline {
            break single + summarised;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        (800..=936).contains(&refused),
        "{refused} of 1000 connections of one identity refused by the cap of 64"
    );
}
