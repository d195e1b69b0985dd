//! Test harness: starts the real `bulkhead-controller` binary in dev mode and talks to it over
//! real mutual TLS. Tokens come from the same token-service library the `bulkhead` CLI uses.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bulkhead_tokens::statedir::StateDir;
use bulkhead_tokens::{MintRequest, Operation};
use http_body_util::BodyExt;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

pub mod guest;
#[allow(unused_imports)]
pub use guest::*;
pub mod release;
#[allow(unused_imports)]
pub use release::*;

pub const HOST: &str = "host-1";

pub fn controller_bin() -> &'static str {
    env!("CARGO_BIN_EXE_bulkhead-controller")
}

pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
    /// The ready line the controller printed.
    pub ready: Value,
    /// Whether dropping this daemon also kills the host's keeper and its children (true unless
    /// [`Daemon::kill9_controller_only`] handed them over to a restarted controller).
    pub owns_keeper: bool,
}

impl Daemon {
    /// Starts a dev-mode controller on a free port with state in `dir`, with the explicit
    /// detached backend (these tests attack the API, authorization and audit path; the real
    /// backend has its own tests in `tests/host_backend.rs`).
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, &["--backend", "detached"])
    }

    /// Starts a dev-mode controller with extra arguments.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_env(dir, extra, &[])
    }

    /// Starts a dev-mode controller with extra arguments and environment variables.
    pub fn start_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::try_start_bin(Path::new(controller_bin()), dir, extra, env)
            .expect("spawn controller")
    }

    /// Starts the controller binary `bin` (dev mode, as [`Daemon::start_env`]); `Err` when it
    /// cannot be executed at all.
    pub fn try_start_bin(
        bin: &Path,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> std::io::Result<Daemon> {
        let mut child = Command::new(bin)
            .args(["--dev", "--state-dir"])
            .arg(dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let v: Value = match serde_json::from_str::<Value>(&line) {
            Ok(v) if v["event"] == "ready" => v,
            _ => {
                let _ = child.kill();
                let status = child.wait();
                return Err(std::io::Error::other(format!(
                    "controller did not print a ready line: {line:?} ({status:?})"
                )));
            }
        };
        let port = v["listen"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        Ok(Daemon {
            child,
            port,
            dir: dir.to_path_buf(),
            ready: v,
            owns_keeper: true,
        })
    }

    /// Waits (at most `within`) for the controller to exit on its own; its keeper and the
    /// keeper's children stay for the next controller. Panics if it does not exit.
    pub fn exits_within(&mut self, within: Duration) -> std::process::ExitStatus {
        let t = std::time::Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                self.owns_keeper = false;
                return st;
            }
            assert!(t.elapsed() < within, "the controller did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    /// SIGKILL to the controller alone: its keeper, hypervisors and cards keep running for
    /// the next controller on the same state directory (which then owns their clean-up).
    pub fn kill9_controller_only(&mut self) {
        self.kill9();
        self.owns_keeper = false;
    }

    pub fn state(&self) -> StateDir {
        StateDir::new(&self.dir)
    }

    /// A client presenting `name`'s certificate from this daemon's CA.
    pub fn client(&self, name: &str) -> Client {
        Client::new(&self.dir, Some((&self.dir, name)), self.port)
    }

    pub fn mint(&self, caller: &str, host: &str, ops: &[Operation], ttl: Duration) -> String {
        mint(&self.dir, caller, host, ops, ttl)
    }

    pub fn audit(&self) -> Vec<Value> {
        audit_records(&self.dir.join("audit.log"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if self.owns_keeper {
            kill_keeper(&self.dir.join("run"));
        }
    }
}

/// The pids of `pid`'s children (from /proc).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let ppid = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|st| {
                st.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|x| x.parse::<i32>().ok())
            });
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Kills the keeper whose pid file is in `run_dir` (if any), after its children.
pub fn kill_keeper(run_dir: &Path) {
    let Some(pid) = std::fs::read_to_string(run_dir.join("keeper.pid"))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    else {
        return;
    };
    let mut doomed = children_of(pid);
    doomed.push(pid);
    for p in doomed {
        let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
    }
    let _ = std::fs::remove_file(run_dir.join("keeper.pid"));
}

pub fn mint(dir: &Path, caller: &str, host: &str, ops: &[Operation], ttl: Duration) -> String {
    let st = StateDir::new(dir);
    let (identity, _) = st.ca().identity(caller).unwrap();
    let (t, _) = st
        .token_service()
        .unwrap()
        .mint(&MintRequest {
            caller: identity,
            hosts: vec![host.to_string()],
            operations: ops.to_vec(),
            resources: None,
            ttl,
        })
        .unwrap();
    t
}

/// The complete records of a live audit log: a line still being appended (no newline yet) is
/// left for the next read.
pub fn audit_records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub body: Vec<u8>,
    pub json: Value,
    pub request_id: String,
}

impl Resp {
    pub fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or("")
    }
}

pub struct Client {
    cfg: Arc<rustls::ClientConfig>,
    port: u16,
}

impl Client {
    /// `ca_dir`: whose CA the client trusts; `cert`: (dir, name) of the client certificate.
    pub fn new(ca_dir: &Path, cert: Option<(&Path, &str)>, port: u16) -> Client {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(ca_dir.join("ca.pem")).unwrap())
            .unwrap();
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
        let cfg = match cert {
            None => b.with_no_client_auth(),
            Some((dir, name)) => {
                let chain =
                    vec![CertificateDer::from_pem_file(dir.join(format!("{name}.pem"))).unwrap()];
                let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
                b.with_client_auth_cert(chain, key).unwrap()
            }
        };
        Client {
            cfg: Arc::new(cfg),
            port,
        }
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> Result<Resp, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // Covers a hot-plug, which waits for the guest's driver (≤30 s) or release (≤45 s).
            tokio::time::timeout(
                Duration::from_secs(90),
                self.request_async(method, path, token, body),
            )
            .await
        })
        .map_err(|_| "timeout".to_string())?
    }

    async fn request_async(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> Result<Resp, String> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let conn = tokio_rustls::TlsConnector::from(Arc::clone(&self.cfg));
        let tls = conn
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let (mut send, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| format!("http handshake: {e}"))?;
        tokio::spawn(connection);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "127.0.0.1");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
                body,
            )))
            .unwrap();
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = resp.status().as_u16();
        let request_id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes()
            .to_vec();
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok(Resp {
            status,
            body,
            json,
            request_id,
        })
    }
}

/// The request record for `request_id`, which must exist.
pub fn request_record(records: &[Value], request_id: &str) -> Value {
    records
        .iter()
        .find(|r| r["entry"]["request_id"] == request_id && r["entry"]["kind"] == "request")
        .unwrap_or_else(|| panic!("no audit record for request {request_id}"))
        .clone()
}

/// Asserts the refusal was audited as a denial with `code`.
pub fn assert_denied_and_audited(d: &Daemon, r: &Resp, code: &str) {
    assert_eq!(
        r.code(),
        code,
        "response: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(
        (400..500).contains(&r.status),
        "a refusal must be a 4xx, got {} ({code})",
        r.status
    );
    let rec = request_record(&d.audit(), &r.request_id);
    assert_eq!(rec["entry"]["decision"], "deny");
    assert_eq!(rec["entry"]["code"], code);
    // A refused request never has an outcome record: nothing ran.
    assert!(!d
        .audit()
        .iter()
        .any(|x| x["entry"]["request_id"] == r.request_id.as_str()
            && x["entry"]["kind"] == "outcome"));
}

/// Polls `f` every 500 ms until it holds; fails the test after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether process `pid` runs (exists and is not a zombie).
pub fn alive(pid: impl std::fmt::Display) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}
