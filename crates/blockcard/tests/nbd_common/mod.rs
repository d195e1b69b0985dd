//! NBD test support: a Bulkhead CA with a storage node's and a host's certificates, a real
//! `qemu-storage-daemon` exporting a file over NBD with TLS, and the card's `--nbd` arguments.

#![allow(dead_code)]

use bulkhead_tokens::pki::CaDir;
use bulkhead_tokens::Role;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const STORAGE: &str = "storage-1";
pub const HOST: &str = "host-1";

/// A CA directory with `storage-1`, `storage-2` (service) and `host-1` (host) issued.
pub fn cluster_ca(dir: &Path) -> CaDir {
    let ca = CaDir::new(dir);
    ca.init().expect("ca init");
    ca.issue(STORAGE, Role::Service, false)
        .expect("issue storage-1");
    ca.issue("storage-2", Role::Service, false)
        .expect("issue storage-2");
    ca.issue(HOST, Role::Host, false).expect("issue host");
    ca
}

/// A `tls-creds-x509` directory for qemu: the CA and `server`'s certificate and key.
pub fn qsd_tls_dir(ca: &CaDir, server: &str, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("tls dir");
    std::fs::copy(ca.ca_pem(), dir.join("ca-cert.pem")).expect("ca");
    std::fs::copy(ca.cert(server), dir.join("server-cert.pem")).expect("cert");
    std::fs::copy(ca.key(server), dir.join("server-key.pem")).expect("key");
    dir.to_path_buf()
}

/// The card's arguments for NBD mode against `port` on localhost.
pub fn card_args(ca: &CaDir, port: u16, export: &str, server_name: &str) -> Vec<String> {
    vec![
        "--nbd".into(),
        format!("127.0.0.1:{port}"),
        "--nbd-export".into(),
        export.into(),
        "--nbd-server-name".into(),
        server_name.into(),
        "--tls-ca".into(),
        ca.ca_pem().display().to_string(),
        "--tls-cert".into(),
        ca.cert(HOST).display().to_string(),
        "--tls-key".into(),
        ca.key(HOST).display().to_string(),
    ]
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

pub fn have_qsd() -> bool {
    Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A running `qemu-storage-daemon` (killed with SIGKILL on drop).
pub struct Qsd {
    pub child: Child,
}

impl Qsd {
    /// Exports `image` as `export` on 127.0.0.1:`port`, TLS with client certificates required.
    pub fn start(tls_dir: &Path, image: &Path, port: u16, export: &str, log: &Path) -> Qsd {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("qsd log");
        let child = Command::new("qemu-storage-daemon")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                tls_dir.display()
            ))
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                image.display()
            ))
            .arg("--nbd-server")
            .arg(format!(
                "addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds=tls0"
            ))
            .arg("--export")
            .arg(format!(
                "type=nbd,id=exp0,node-name=file0,name={export},writable=on"
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut q = Qsd { child };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = q.child.try_wait() {
                panic!("qemu-storage-daemon exited: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes the server (SIGSTOP): it accepts no more bytes into its process and answers
    /// nothing, while its sockets stay open.
    pub fn freeze(&mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: sending SIGSTOP to our own child process.
        let rc = unsafe { libc::kill(pid, libc::SIGSTOP) };
        assert_eq!(rc, 0, "SIGSTOP failed");
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill9();
    }
}
