//! A software TPM (`swtpm`) for tests, benchmarks and `bulkhead-launcher --dev`.
//!
//! [`Swtpm::start`] runs
//! `swtpm socket --tpm2 --server type=tcp,port=P,bindaddr=127.0.0.1 --ctrl type=tcp,port=P+1,...
//! --tpmstate dir=D --flags not-need-init,startup-clear` with its state in a private temporary
//! directory (or a caller-chosen one, to keep a host's TPM across restarts), waits until the TPM
//! port accepts connections, and kills the process when dropped. Several engineers' test runs share
//! one machine, so ports are picked at random from a high range and retried if taken.
//!
//! Production hosts use the kernel's resource manager: TCTI `device:/dev/tpmrm0`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::RotError;

/// TCTI of a production host.
pub const PRODUCTION_TCTI: &str = "device:/dev/tpmrm0";

/// Name of the emulator binary looked up on `PATH`.
pub const SWTPM_BIN: &str = "swtpm";

/// Whether the `swtpm` binary is on `PATH`.
pub fn swtpm_available() -> bool {
    find_on_path(SWTPM_BIN).is_some()
}

/// Whether `swtpm_setup` (which manufactures a TPM with EK certificates) is on `PATH`.
pub fn swtpm_setup_available() -> bool {
    find_on_path("swtpm_setup").is_some()
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Where the emulator keeps its NVRAM state.
enum StateDir {
    Owned(tempfile::TempDir),
    Borrowed(PathBuf),
}

impl StateDir {
    fn path(&self) -> &Path {
        match self {
            StateDir::Owned(t) => t.path(),
            StateDir::Borrowed(p) => p,
        }
    }
}

/// A running `swtpm` process; killed on drop.
pub struct Swtpm {
    child: Child,
    port: u16,
    state: StateDir,
}

impl std::fmt::Debug for Swtpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swtpm")
            .field("pid", &self.child.id())
            .field("port", &self.port)
            .field("state", &self.state.path())
            .finish()
    }
}

impl Swtpm {
    /// Starts an emulator with fresh state in a temporary directory (a new TPM: new seeds, so a
    /// new endorsement and attestation key).
    pub fn start() -> Result<Self, RotError> {
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-swtpm-")
            .tempdir()
            .map_err(RotError::Swtpm)?;
        Self::start_in(StateDir::Owned(dir), false)
    }

    /// Starts an emulator whose state lives in `dir` (kept after drop: the same TPM next time).
    pub fn start_with_state(dir: &Path) -> Result<Self, RotError> {
        std::fs::create_dir_all(dir).map_err(RotError::Swtpm)?;
        Self::start_in(StateDir::Borrowed(dir.to_path_buf()), false)
    }

    /// As [`Swtpm::start_with_state`], and the emulator is killed by the kernel when the thread
    /// that started it exits (`PR_SET_PDEATHSIG`): for a long-lived process's main thread, so a
    /// killed agent leaves no orphan TPM behind.
    pub fn start_with_state_tied(dir: &Path) -> Result<Self, RotError> {
        std::fs::create_dir_all(dir).map_err(RotError::Swtpm)?;
        Self::start_in(StateDir::Borrowed(dir.to_path_buf()), true)
    }

    fn start_in(state: StateDir, die_with_parent: bool) -> Result<Self, RotError> {
        let bin = find_on_path(SWTPM_BIN).ok_or(RotError::SwtpmMissing)?;
        let mut last_err = None;
        for _ in 0..20 {
            let port = pick_port_pair()?;
            let ctrl = port
                .checked_add(1)
                .ok_or(RotError::SwtpmStart("port overflow"))?;
            let log = state.path().join("swtpm.log");
            let stderr = std::fs::File::create(&log).map_err(RotError::Swtpm)?;
            let mut cmd = Command::new(&bin);
            // The emulator dies with the thread that started it (a killed launcher leaves no
            // orphan TPM).
            if die_with_parent {
                // SAFETY: the closure runs in the forked child before exec and only calls
                // prctl, which is async-signal-safe and touches no memory of ours.
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            let mut child = cmd
                .arg("socket")
                .arg("--tpm2")
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
                .arg("--tpmstate")
                .arg(format!("dir={}", state.path().display()))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .map_err(RotError::Swtpm)?;
            match wait_listening(&mut child, port) {
                Ok(()) => {
                    tracing::debug!(port, pid = child.id(), "swtpm started");
                    return Ok(Swtpm { child, port, state });
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(RotError::SwtpmStart("no free port pair")))
    }

    /// The TCTI configuration string for `tss-esapi`.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// TPM command port (the control port is the next one).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The emulator's state directory.
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// The emulator's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Picks a random port P in 20000..60000 such that P and P+1 are both free right now.
fn pick_port_pair() -> Result<u16, RotError> {
    for _ in 0..200 {
        let p: u16 = rand::random::<u16>() % 40000 + 20000;
        let a = TcpListener::bind(("127.0.0.1", p));
        let b = TcpListener::bind(("127.0.0.1", p + 1));
        if a.is_ok() && b.is_ok() {
            return Ok(p);
        }
    }
    Err(RotError::SwtpmStart("no free port pair"))
}

fn wait_listening(child: &mut Child, port: u16) -> Result<(), RotError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return Err(RotError::SwtpmStart(
                "swtpm exited during start (port taken?)",
            ));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            // Someone else (another test's emulator) may own the port while ours failed to
            // bind and is about to exit: make sure ours is still alive a moment later.
            std::thread::sleep(Duration::from_millis(50));
            if let Ok(Some(_)) = child.try_wait() {
                return Err(RotError::SwtpmStart(
                    "swtpm exited during start (port taken?)",
                ));
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(RotError::SwtpmStart("swtpm did not listen within 10 s"))
}
