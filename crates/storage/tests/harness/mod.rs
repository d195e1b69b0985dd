//! Shared by the storage node's tests: a CA with the node's, the control plane's, hosts' and an
//! operator's certificates; the real `bulkhead-storage` binary (with its real
//! qemu-storage-daemon); QEMU's own NBD client (`qemu-io` with `tls-creds-x509`) as the host.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bulkhead_mtls::HttpsClient;
use bulkhead_storage_proto::{
    parse_answer, Answer, CreateVolume, DeleteReply, DeleteVolume, Grant, HostName, ListReply, Op,
    Request, Revoke, VolumeId, VolumeReply,
};
use bulkhead_tokens::pki::{CaDir, ServerIdentity};
use bulkhead_tokens::Role;

pub const NODE_NAME: &str = "storage";

/// A CA directory with every certificate the tests use, and QEMU client credential dirs.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: CaDir,
    /// Another cluster's CA, with a host certificate named like ours.
    pub other: CaDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::new(dir.path().join("ca"));
        ca.init().unwrap();
        ca.issue(NODE_NAME, Role::Service, false).unwrap();
        ca.issue("control", Role::ControlPlane, false).unwrap();
        ca.issue("host-1", Role::Host, false).unwrap();
        ca.issue("host-2", Role::Host, false).unwrap();
        ca.issue("alice", Role::Operator, false).unwrap();
        let other = CaDir::new(dir.path().join("other-ca"));
        other.init().unwrap();
        other.issue("host-1", Role::Host, false).unwrap();
        Pki { dir, ca, other }
    }

    /// A `tls-creds-x509` directory for `name` of `ca` (QEMU's file names), trusting our CA.
    pub fn qemu_creds(&self, ca: &CaDir, name: &str) -> PathBuf {
        let d = self.dir.path().join(format!(
            "qemu-{}-{name}",
            ca.root().file_name().unwrap().to_string_lossy()
        ));
        if !d.exists() {
            std::fs::create_dir_all(&d).unwrap();
            // QEMU checks its own certificate against this file before it connects: for
            // another CA's certificate, the file holds both CAs, so the refusal is the node's.
            let mut bundle = std::fs::read(self.ca.ca_pem()).unwrap();
            if ca.root() != self.ca.root() {
                bundle.extend(std::fs::read(ca.ca_pem()).unwrap());
            }
            std::fs::write(d.join("ca-cert.pem"), bundle).unwrap();
            std::fs::copy(ca.cert(name), d.join("client-cert.pem")).unwrap();
            std::fs::copy(ca.key(name), d.join("client-key.pem")).unwrap();
        }
        d
    }

    pub fn control_client(&self, name: &str) -> HttpsClient {
        HttpsClient::pinned(
            &self.ca.ca_pem(),
            Some((&self.ca.cert(name), &self.ca.key(name))),
            ServerIdentity::service(NODE_NAME),
        )
        .unwrap()
    }
}

/// Extra arguments of a node (engine choice).
#[derive(Clone, Default)]
pub struct NodeOpts {
    pub args: Vec<String>,
}

/// A running `bulkhead-storage`.
pub struct StorageNode {
    pub child: Child,
    pub control: String,
    pub nbd_port: u16,
    pub state_dir: PathBuf,
    pub opts: NodeOpts,
    ca_dir: PathBuf,
    /// Killed already: the pid file may name the next node's engine by now.
    dead: bool,
}

pub fn have_qemu() -> bool {
    ["qemu-storage-daemon", "qemu-io"].iter().all(|b| {
        Command::new(b)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// As root, the node drops to nobody (65534), as it would be run.
fn sandbox_args() -> Vec<&'static str> {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        vec!["--uid", "65534", "--gid", "65534"]
    } else {
        Vec::new()
    }
}

impl StorageNode {
    pub fn start(pki: &Pki, state_dir: &Path, opts: NodeOpts) -> StorageNode {
        Self::try_start(pki.ca.root(), state_dir, opts).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the binary and waits for its ready line; Err(stderr) if it exits instead.
    pub fn try_start(
        ca_dir: &Path,
        state_dir: &Path,
        opts: NodeOpts,
    ) -> Result<StorageNode, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead-storage"))
            .arg("--ca-dir")
            .arg(ca_dir)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--listen-control")
            .arg("127.0.0.1:0")
            .arg("--listen-nbd")
            .arg("127.0.0.1:0")
            .args(&opts.args)
            .args(sandbox_args())
            .env("BULKHEAD_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let (etx, erx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let _ = std::io::stderr().write_all(&chunk[..n]);
                buf.extend_from_slice(&chunk[..n]);
            }
            let _ = etx.send(String::from_utf8_lossy(&buf).into_owned());
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert_eq!(v["event"], "ready", "{line}");
                let nbd: std::net::SocketAddr = v["nbd"].as_str().unwrap().parse().unwrap();
                Ok(StorageNode {
                    child,
                    control: v["control"].as_str().unwrap().to_string(),
                    nbd_port: nbd.port(),
                    state_dir: state_dir.to_path_buf(),
                    opts,
                    ca_dir: ca_dir.to_path_buf(),
                    dead: false,
                })
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(erx
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_else(|_| "no stderr".into()))
            }
        }
    }

    /// The engine child's pid (from the node's pid file).
    pub fn qsd_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.state_dir.join("run/qsd.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// kill -9 of the node and of its qemu-storage-daemon.
    pub fn kill9(&mut self) {
        if self.dead {
            return;
        }
        self.dead = true;
        let qsd = self.qsd_pid();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = qsd {
            // SAFETY: kill has no memory-safety preconditions; the pid is the test's own
            // grandchild (the node wrote it).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn restart(&mut self, pki: &Pki) {
        self.kill9();
        let n = StorageNode::start(pki, &self.state_dir.clone(), self.opts.clone());
        *self = n;
    }

    pub fn audit_log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("audit.log")).unwrap_or_default()
    }

    /// Waits until an audit line contains every needle (queued records land within ~1 s).
    pub fn wait_audit(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.audit_log();
            if let Some(l) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no audit record with {needles:?} in:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn volume_file(&self, id: &str) -> PathBuf {
        self.state_dir.join("data").join(format!("{id}.raw"))
    }
}

impl Drop for StorageNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Sends a control request as `client`; returns status and body.
pub fn call(node: &StorageNode, client: &HttpsClient, req: &Request) -> (u16, Vec<u8>) {
    let r = rt()
        .block_on(client.request(&node.control, "POST", req.op().path(), &[], req.to_body()))
        .unwrap();
    (r.status, r.body)
}

pub fn ok<T: serde::de::DeserializeOwned + std::fmt::Debug>(
    node: &StorageNode,
    client: &HttpsClient,
    req: &Request,
) -> T {
    let (status, body) = call(node, client, req);
    match parse_answer::<T>(status, &body).unwrap() {
        Answer::Ok(t) => t,
        other => panic!("{:?} refused: {other:?}", req.op()),
    }
}

pub fn vid(s: &str) -> VolumeId {
    VolumeId::new(s).unwrap()
}

pub fn host(s: &str) -> HostName {
    HostName::new(s).unwrap()
}

pub fn create(node: &StorageNode, c: &HttpsClient, id: &str, size: u64) -> VolumeReply {
    ok(
        node,
        c,
        &Request::CreateVolume(CreateVolume {
            volume_id: vid(id),
            size_bytes: size,
            source: None,
        }),
    )
}

pub fn grant(
    node: &StorageNode,
    c: &HttpsClient,
    id: &str,
    h: &str,
    generation: u64,
) -> VolumeReply {
    ok(
        node,
        c,
        &Request::Grant(Grant {
            volume_id: vid(id),
            host: host(h),
            generation,
        }),
    )
}

pub fn revoke(node: &StorageNode, c: &HttpsClient, id: &str, generation: u64) -> VolumeReply {
    ok(
        node,
        c,
        &Request::Revoke(Revoke {
            volume_id: vid(id),
            generation,
        }),
    )
}

pub fn delete(node: &StorageNode, c: &HttpsClient, id: &str) -> DeleteReply {
    ok(
        node,
        c,
        &Request::DeleteVolume(DeleteVolume { volume_id: vid(id) }),
    )
}

pub fn list(node: &StorageNode, c: &HttpsClient) -> ListReply {
    ok(node, c, &Request::ListVolumes(Default::default()))
}

pub fn op_path(op: Op) -> &'static str {
    op.path()
}

/// `qemu-io` arguments opening `export` on the node over NBD+TLS with `creds`.
fn qemu_io_args(node: &StorageNode, creds: &Path, export: &str) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            creds.display()
        ),
        "--image-opts".into(),
        format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export={export},tls-creds=tls0",
            node.nbd_port
        ),
    ]
}

/// Runs `qemu-io` with `commands` (each `-c`); returns (success, stdout + stderr). Success
/// means exit 0 and no command reported a failure.
pub fn qemu_io(
    node: &StorageNode,
    creds: &Path,
    export: &str,
    commands: &[&str],
) -> (bool, String) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(qemu_io_args(node, creds, export));
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = text.contains("failed")
        || text.contains("error")
        || text.contains("can't open")
        || text.contains("Pattern verification failed");
    (out.status.success() && !failed, text)
}

/// A `qemu-io` kept open (one NBD connection), fed commands on stdin.
pub struct LiveClient {
    child: Child,
    stdin: ChildStdin,
    out: mpsc::Receiver<String>,
}

impl LiveClient {
    pub fn open(node: &StorageNode, creds: &Path, export: &str) -> LiveClient {
        let mut child = Command::new("qemu-io")
            .args(qemu_io_args(node, creds, export))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let (tx, rx) = mpsc::channel();
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(r);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    // qemu-io's prompt has no newline: split on '\n' and on "> ".
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
                        }
                    }
                }
            });
        }
        LiveClient {
            child,
            stdin,
            out: rx,
        }
    }

    /// Sends one command; waits for a line containing any of `until` (or 15 s); returns all
    /// output seen. (qemu-io reads one line per wake-up: send the next command only after
    /// this one's output.)
    pub fn run(&mut self, command: &str, until: &[&str]) -> String {
        let _ = writeln!(self.stdin, "{command}");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut seen = String::new();
        while Instant::now() < deadline {
            if let Ok(l) = self.out.recv_timeout(Duration::from_millis(100)) {
                seen.push_str(&l);
                if until.iter().any(|u| l.contains(u)) {
                    break;
                }
            }
        }
        seen
    }
}

impl Drop for LiveClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
