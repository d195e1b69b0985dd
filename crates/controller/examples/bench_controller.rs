//! `make bench` piece: DescribeHost throughput and latency of the real controller (mTLS + token
//! verification + host policy re-check + fsync'd group-commit audit) against the same axum
//! server behind the same TLS 1.3 mTLS config with no authorization and no audit, in one run.
//! Prints a Markdown section on stdout.
//!
//! Usage: bench_controller [SECONDS_PER_SIDE] [CONNECTIONS]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_controller::api::HostDescription;
use bulkhead_controller::server::tls_config;
use bulkhead_tokens::statedir::StateDir;
use bulkhead_tokens::{MintRequest, Operation};
use http_body_util::BodyExt;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

struct Result {
    requests: u64,
    errors: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
}

fn client_config(dir: &Path) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_file(dir.join("operator.pem")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(dir.join("operator.key")).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

async fn drive(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
    token: String,
    secs: u64,
    conns: usize,
) -> Result {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let cfg = Arc::clone(&cfg);
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            'outer: while Instant::now() < deadline {
                let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                    errors += 1;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let Ok(tls) = tokio_rustls::TlsConnector::from(Arc::clone(&cfg))
                    .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
                    .await
                else {
                    errors += 1;
                    continue;
                };
                let Ok((mut send, conn)) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await
                else {
                    errors += 1;
                    continue;
                };
                tokio::spawn(conn);
                while Instant::now() < deadline {
                    let req = hyper::Request::get("/v1/host")
                        .header("host", "127.0.0.1")
                        .header("authorization", format!("Bearer {token}"))
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap();
                    let t0 = Instant::now();
                    if send.ready().await.is_err() {
                        errors += 1;
                        continue 'outer;
                    }
                    match send.send_request(req).await {
                        Ok(resp) => {
                            let ok = resp.status() == 200;
                            let _ = resp.into_body().collect().await;
                            if ok {
                                lat.push(
                                    u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
                                );
                            } else {
                                errors += 1;
                            }
                        }
                        Err(_) => {
                            errors += 1;
                            continue 'outer;
                        }
                    }
                }
            }
            (lat, errors)
        }));
    }
    let start = Instant::now();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let secs_f = start
        .elapsed()
        .as_secs_f64()
        .max(f64::from(u32::try_from(secs).unwrap_or(1)));
    all.sort_unstable();
    let pct = |p: usize| {
        all.get(all.len().saturating_sub(1) * p / 100)
            .copied()
            .unwrap_or(0)
    };
    Result {
        requests: u64::try_from(all.len()).unwrap_or(0),
        errors,
        secs: secs_f,
        p50_us: pct(50),
        p99_us: pct(99),
    }
}

/// The baseline: the same TLS config and axum, answering DescribeHost with no token check, no
/// policy, no quota and no audit.
async fn baseline(dir: &Path) -> u16 {
    let ca = CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap();
    let chain = vec![CertificateDer::from_pem_file(dir.join("host-1.pem")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(dir.join("host-1.key")).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(ca, chain, key).unwrap()));
    let app = axum::Router::new().route(
        "/v1/host",
        axum::routing::get(|| async {
            axum::Json(HostDescription {
                host_id: "host-1".into(),
                controller_version: "baseline".into(),
                backend: "none".into(),
                draining: false,
                vcpus_total: 2,
                vcpus_free: 2,
                memory_mib_total: 1,
                memory_mib_free: 1,
                instances: 0,
                audit_head: Default::default(),
            })
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let mut app = app.clone();
                        async move {
                            use tower::Service;
                            app.call(req.map(axum::body::Body::new)).await
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    port
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let conns: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(16);
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("bulkhead-controller");
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "target".into()))
        .unwrap();
    let mut child = Command::new(&bin)
        .args(["--dev", "--state-dir"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start bulkhead-controller (build it first)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let port: u16 = v["listen"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let st = StateDir::new(dir.path());
    let (id, _) = st.ca().identity("operator").unwrap();
    let (token, _) = st
        .token_service()
        .unwrap()
        .mint(&MintRequest {
            caller: id,
            hosts: vec!["host-1".into()],
            operations: vec![Operation::DescribeHost],
            resources: None,
            ttl: Duration::from_secs(900),
        })
        .unwrap();
    let cfg = client_config(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (full, base) = rt.block_on(async {
        let bport = baseline(dir.path()).await;
        eprintln!(
            "bench-controller: baseline (TLS, no authz/audit) for {secs}s x {conns} connections"
        );
        let base = drive(bport, Arc::clone(&cfg), token.clone(), secs, conns).await;
        eprintln!(
            "bench-controller: controller (TLS + token + policy + fsync'd audit) for {secs}s"
        );
        let full = drive(port, Arc::clone(&cfg), token.clone(), secs, conns).await;
        (full, base)
    });
    let _ = child.kill();
    let _ = child.wait();
    let audit = bulkhead_audit::verify(&dir.path().join("audit.log"))
        .map(|h| h.records)
        .unwrap_or(0);
    let rps = |r: &Result| r.requests as f64 / r.secs;
    let ratio = rps(&full) / rps(&base).max(1.0);
    println!("## Controller: authenticated, authorized, audited DescribeHost");
    println!();
    println!(
        "`scripts/bench-controller.sh`: {conns} keep-alive mTLS 1.3 connections for {secs} s per side, \
         client and server on the same {}-core machine. Baseline: the same axum + rustls/aws-lc-rs \
         mTLS server answering `GET /v1/host` with no token check, no policy, no quota and no audit. \
         Controller: the real `bulkhead-controller` binary (Biscuit verification, certificate binding, \
         host policy re-check, quota, audit record fsync'd with group commit before acting, outcome \
         record after).",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!();
    println!("| Server | req/s | p50 | p99 | errors |");
    println!("|---|---:|---:|---:|---:|");
    for (name, r) in [
        ("baseline (TLS only)", &base),
        ("bulkhead-controller", &full),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} ms | {:.2} ms | {} |",
            rps(r),
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.errors
        );
    }
    println!();
    println!(
        "Controller / baseline throughput: **{:.0}%** (target ≥ 50%). Audit log after the run: {audit} \
         records, chain verified.",
        ratio * 100.0
    );
    println!();
}
