//! Test support: start the real card binary, drive its control socket, connect a real frontend.

#![allow(dead_code, clippy::cast_possible_truncation)]

pub mod frontend;
pub mod guest;

use bulkhead_blockcard::control::{
    self, AttachSpec, ControlRequest, ControlResponse, KeySource, VolumeId,
};
use bulkhead_blockcard::xts::CryptoSectorSize;
use bulkhead_sealing::{seal_volume_key, HostKey};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CARD_UID: u32 = 65534;
pub const CARD_GID: u32 = 65534;

/// A scratch directory with a host key and a backing file.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub host: HostKey,
    pub host_key_path: PathBuf,
    pub backing: PathBuf,
}

impl Env {
    pub fn new(backing_bytes: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bhcard")
            .tempdir()
            .expect("tempdir");
        let host = HostKey::generate().expect("host key");
        let host_key_path = dir.path().join("host.key");
        let mut f = std::fs::File::create(&host_key_path).expect("key file");
        f.write_all(host.to_file_bytes().expect("encode").as_ref())
            .expect("write key");
        drop(f);
        std::fs::set_permissions(&host_key_path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
        let backing = dir.path().join("volume.img");
        let f = std::fs::File::create(&backing).expect("backing");
        f.set_len(backing_bytes).expect("size");
        Self {
            dir,
            host,
            host_key_path,
            backing,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Seals `key` for `volume` to this env's host key.
    pub fn seal(
        &self,
        volume: &str,
        key: &[u8; 64],
    ) -> Box<[u8; bulkhead_sealing::SEALED_BLOB_LEN]> {
        Box::new(seal_volume_key(self.host.public(), volume, key).expect("seal"))
    }
}

/// A running card process.
pub struct Card {
    pub child: Child,
    pub control: PathBuf,
    pub vhost: PathBuf,
    pub conn: Option<UnixStream>,
}

pub struct CardOpts<'a> {
    pub queues: u16,
    pub read_only: bool,
    pub host_key: bool,
    pub name: &'a str,
    /// Where the card's log (stderr) goes; the test's stderr when `None`.
    pub log: Option<&'a std::path::Path>,
    /// NBD mode: these arguments (`--nbd ...`) replace `--backing`.
    pub nbd: Option<&'a [String]>,
}

impl Default for CardOpts<'_> {
    fn default() -> Self {
        Self {
            queues: 1,
            read_only: false,
            host_key: true,
            name: "card",
            log: None,
            nbd: None,
        }
    }
}

impl Card {
    pub fn start(env: &Env, opts: CardOpts<'_>) -> Self {
        let mut card = Self::spawn(env, opts);
        card.connect_control();
        card
    }

    /// Starts the process without waiting for its control socket.
    pub fn spawn(env: &Env, opts: CardOpts<'_>) -> Self {
        let control = env.path(&format!("{}.ctl", opts.name));
        let vhost = env.path(&format!("{}.sock", opts.name));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulkhead-blockcard"));
        cmd.arg("--control-socket")
            .arg(&control)
            .arg("--vhost-socket")
            .arg(&vhost)
            .args(match opts.nbd {
                Some(a) => a.to_vec(),
                None => vec!["--backing".to_string(), env.backing.display().to_string()],
            })
            .arg("--queues")
            .arg(opts.queues.to_string())
            .arg("--uid")
            .arg(CARD_UID.to_string())
            .arg("--gid")
            .arg(CARD_GID.to_string())
            .env("BULKHEAD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(match opts.log {
                Some(p) => Stdio::from(std::fs::File::create(p).expect("card log")),
                None => Stdio::inherit(),
            });
        // Start the card with core dumps allowed (as a careless operator might), so the test's
        // "core file size 0" check sees what the card set itself, not what it inherited.
        // SAFETY: setrlimit is async-signal-safe and only reads the local struct.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                let unlimited = libc::rlimit {
                    rlim_cur: libc::RLIM_INFINITY,
                    rlim_max: libc::RLIM_INFINITY,
                };
                if libc::setrlimit(libc::RLIMIT_CORE, &unlimited) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if opts.read_only {
            cmd.arg("--read-only");
        }
        if opts.host_key {
            cmd.arg("--host-key").arg(&env.host_key_path);
        }
        let child = cmd.spawn().expect("spawn card");
        Self {
            child,
            control,
            vhost,
            conn: None,
        }
    }

    fn connect_control(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = UnixStream::connect(&self.control) {
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .expect("timeout");
                self.conn = Some(s);
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("card exited early: {st}");
            }
            assert!(Instant::now() < deadline, "control socket never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn call(&mut self, req: &ControlRequest) -> ControlResponse {
        let conn = self.conn.as_mut().expect("control connection");
        control::call(conn, req).expect("control call")
    }

    pub fn attach(
        &mut self,
        volume: &str,
        sector: CryptoSectorSize,
        key: KeySource,
    ) -> ControlResponse {
        self.call(&ControlRequest::Attach(AttachSpec {
            volume_id: VolumeId::new(volume).expect("volume id"),
            sector_size: sector,
            key,
        }))
    }

    /// Sends Detach, expects `Detached`, and waits for the process to exit 0.
    pub fn detach(mut self) {
        let r = self.call(&ControlRequest::Detach);
        assert_eq!(r, ControlResponse::Detached);
        let st = wait_exit(&mut self.child, Duration::from_secs(20));
        assert!(st.success(), "card exit status {st}");
    }

    pub fn metric(&mut self, name: &str) -> u64 {
        match self.call(&ControlRequest::GetMetrics) {
            ControlResponse::Metrics(v) => v
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| *v)
                .expect("metric"),
            other => panic!("unexpected {other:?}"),
        }
    }

    pub fn kill9(mut self) {
        // SAFETY: sending SIGKILL to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st;
        }
        assert!(Instant::now() < deadline, "card did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A deterministic, non-degenerate 64-byte XTS key.
pub fn test_key(seed: u8) -> [u8; 64] {
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed) ^ 0xA5;
    }
    k
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs the independent Python AES-XTS decryptor over `path`; returns the plaintext.
pub fn python_decrypt(key: &[u8; 64], path: &Path, sector: usize, out: &Path) -> Vec<u8> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/xts_decrypt.py");
    let st = Command::new("python3")
        .arg(script)
        .arg(hex(key))
        .arg(path)
        .arg(sector.to_string())
        .arg(out)
        .status()
        .expect("python3");
    assert!(st.success(), "python decryptor failed: {st}");
    std::fs::read(out).expect("plaintext")
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
