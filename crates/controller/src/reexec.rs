//! Applying a release's controller by re-executing into it: **not in use**. The controller's
//! seccomp filter traps every `execve`/`execveat` ([`crate::sandbox`]): a rule allowing
//! `execveat(EXEC_FD, path, .., AT_EMPTY_PATH)` on descriptor and flags let any program run
//! (with a non-empty absolute path the kernel ignores the descriptor), and Linux refuses a NULL
//! path for execveat (EFAULT), so no argument rule can pin the exec to one file. DeployRelease
//! therefore installs a release's controller and audits `controller_restart_unsupported`
//! ([`ReexecError::Unsupported`]); and since this build never re-executes, a hand-off found at
//! start is forged and refused ([`Handoff::take_from_env`], [`ReexecError::HandoffRefused`]).
//! The mechanism below (the hand-off format and its parser, [`exec_release`]) stays for a
//! future exec that can be pinned to one file; what follows describes it.
//!
//! `execve` keeps the pid, so whatever supervises the controller (a test, `bulkhead up`, the
//! sealed host's PID 1) sees no exit. The new image starts like a controller restarted after
//! a kill -9 (it adopts every hypervisor and card from the keeper and the host record and
//! continues the same audit chain), except for what the sandbox no longer lets it open: the
//! seccomp filter survives `exec`, so the successor cannot `connect` to the keeper or the
//! attestation agent, nor make the TCP listener. Those three descriptors are the only ones
//! handed across (their close-on-exec flag cleared just before the call); their numbers travel
//! in the environment variable [`HANDOFF_ENV`] ([`Handoff::parse`], the one parser of it).
//! Every other descriptor of the controller is close-on-exec: [`exec_release`] checks each
//! one in `/proc/self/fd` and sets the flag on any that lacks it (logged).
//!
//! The sandbox allows one exec form only: `execveat(EXEC_FD, NULL, argv, envp, AT_EMPTY_PATH)`
//! on the fixed descriptor [`EXEC_FD`] (see [`crate::sandbox`]); the binary is opened and moved
//! there just before the call. If the call fails, the descriptors get their flags back and the
//! old controller serves on.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The only descriptor the sandbox lets the controller exec (within the default soft limit of
/// 1024 descriptors).
pub const EXEC_FD: RawFd = 1023;

/// The environment variable that tells a re-executed controller which descriptors it inherited.
pub const HANDOFF_ENV: &str = "BULKHEAD_CONTROLLER_HANDOFF";

/// What a controller hands to the release it re-executes into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    /// The release the controller re-executed into.
    pub release: u64,
    /// The bound, listening TCP socket of the management API.
    pub listen: RawFd,
    /// The connection to the keeper (`SOCK_SEQPACKET`).
    pub keeper: RawFd,
    /// The connection to the attestation agent, if the host has one.
    pub agent: Option<RawFd>,
    /// Where the first image of this controller found the binaries it names by default (its
    /// own directory): a release's directory need not hold them all.
    pub bin_dir: PathBuf,
}

/// The descriptors a re-executed controller took over, now its own.
#[derive(Debug)]
pub struct Inherited {
    pub release: u64,
    pub listen: OwnedFd,
    pub keeper: OwnedFd,
    pub agent: Option<OwnedFd>,
    pub bin_dir: PathBuf,
}

/// Why a hand-off was refused or an exec failed. Codes are stable: they go into the audit log.
#[derive(Debug, thiserror::Error)]
pub enum ReexecError {
    #[error("malformed {HANDOFF_ENV}")]
    Malformed,
    #[error("no keeper connection to hand over")]
    NoKeeper,
    #[error("inherited descriptor {fd} is not a {want} socket")]
    NotASocket { fd: RawFd, want: &'static str },
    #[error("the release has no controller binary at {0}")]
    NoBinary(std::path::PathBuf),
    #[error("exec of the release's controller failed: {0}")]
    Exec(std::io::Error),
    #[error("this controller cannot apply a release's controller (its filter traps every exec)")]
    Unsupported,
    #[error(
        "{HANDOFF_ENV} set at start: this controller never re-executes, the hand-off is refused"
    )]
    HandoffRefused,
}

impl ReexecError {
    pub fn code(&self) -> &'static str {
        match self {
            ReexecError::Malformed | ReexecError::NotASocket { .. } => "controller_handoff_bad",
            ReexecError::NoBinary(_) => "controller_binary_missing",
            ReexecError::NoKeeper => "controller_restart_unavailable",
            ReexecError::Exec(_) => "controller_exec_failed",
            ReexecError::Unsupported => "controller_restart_unsupported",
            ReexecError::HandoffRefused => "controller_handoff_refused",
        }
    }
}

fn fd_value(v: &str) -> Result<RawFd, ReexecError> {
    let fd: RawFd = v.parse().map_err(|_| ReexecError::Malformed)?;
    // 0..=2 are the standard streams, EXEC_FD is closed by the exec itself.
    if fd <= 2 || fd >= EXEC_FD {
        return Err(ReexecError::Malformed);
    }
    Ok(fd)
}

impl Handoff {
    /// `v=N,listen=FD,keeper=FD,agent=FD|none,bin=DIR`, every key once and in this order (the
    /// directory, absolute, takes the rest).
    pub fn parse(s: &str) -> Result<Handoff, ReexecError> {
        let mut it = s.splitn(5, ',');
        let mut field = |key: &str| -> Result<&str, ReexecError> {
            let kv = it.next().ok_or(ReexecError::Malformed)?;
            kv.strip_prefix(key)
                .and_then(|r| r.strip_prefix('='))
                .ok_or(ReexecError::Malformed)
        };
        let release = field("v")?
            .parse::<u64>()
            .map_err(|_| ReexecError::Malformed)?;
        let listen = fd_value(field("listen")?)?;
        let keeper = fd_value(field("keeper")?)?;
        let agent = match field("agent")? {
            "none" => None,
            v => Some(fd_value(v)?),
        };
        let bin_dir = PathBuf::from(field("bin")?);
        if !bin_dir.is_absolute()
            || listen == keeper
            || agent.is_some_and(|a| a == listen || a == keeper)
        {
            return Err(ReexecError::Malformed);
        }
        Ok(Handoff {
            release,
            listen,
            keeper,
            agent,
            bin_dir,
        })
    }

    pub fn encode(&self) -> String {
        let agent = self
            .agent
            .map_or_else(|| "none".to_string(), |a| a.to_string());
        format!(
            "v={},listen={},keeper={},agent={agent},bin={}",
            self.release,
            self.listen,
            self.keeper,
            self.bin_dir.display()
        )
    }

    /// The hand-off this process was started with, removed from the environment (so nothing
    /// it starts inherits it). Call before any thread exists. This build never re-executes
    /// (its filter traps every exec), so any hand-off is forged: refused with
    /// [`ReexecError::HandoffRefused`] before anything is read from it or audited.
    pub fn take_from_env() -> Result<Option<Inherited>, ReexecError> {
        if std::env::var_os(HANDOFF_ENV).is_none() {
            return Ok(None);
        }
        std::env::remove_var(HANDOFF_ENV);
        Err(ReexecError::HandoffRefused)
    }

    fn fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.listen, self.keeper];
        v.extend(self.agent);
        v
    }
}

fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<bool> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor number only read and set its flag word.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let had = flags & libc::FD_CLOEXEC != 0;
    let want = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if want != flags && unsafe { libc::fcntl(fd, libc::F_SETFD, want) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(had)
}

/// Sets close-on-exec on every open descriptor above the standard streams but `keep`; returns
/// how many lacked it.
fn close_the_rest_on_exec(keep: &[RawFd]) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .collect();
    let mut fixed = 0;
    for fd in fds {
        if fd <= 2 || keep.contains(&fd) {
            continue;
        }
        // The directory's own descriptor is gone by now: EBADF is harmless.
        if let Ok(false) = set_cloexec(fd, true) {
            tracing::warn!(fd, "descriptor without close-on-exec (inherited by the controller): set before the exec");
            fixed += 1;
        }
    }
    fixed
}

fn cstring(s: &std::ffi::OsStr) -> Result<CString, ReexecError> {
    CString::new(s.as_bytes()).map_err(|_| ReexecError::Malformed)
}

/// Re-executes this process into `binary` with the same arguments, handing over `handoff`'s
/// descriptors. Returns only on failure, with every descriptor's flag as it was.
pub fn exec_release(binary: &Path, handoff: &Handoff) -> ReexecError {
    let argv: Result<Vec<CString>, _> = std::env::args_os().map(|a| cstring(&a)).collect();
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| k != HANDOFF_ENV)
        .collect();
    env.push((HANDOFF_ENV.into(), handoff.encode().into()));
    let envp: Result<Vec<CString>, _> = env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            cstring(&kv)
        })
        .collect();
    let (argv, envp) = match (argv, envp) {
        (Ok(a), Ok(e)) => (a, e),
        _ => return ReexecError::Malformed,
    };
    let file = match File::open(binary) {
        Ok(f) => f,
        Err(_) => return ReexecError::NoBinary(binary.to_path_buf()),
    };
    // SAFETY: dup3 of a descriptor we own onto EXEC_FD (closing whatever was there: nothing of
    // ours, numbers that high are never handed out on this path); close-on-exec set atomically.
    if unsafe { libc::dup3(file.as_raw_fd(), EXEC_FD, libc::O_CLOEXEC) } < 0 {
        return ReexecError::Exec(std::io::Error::last_os_error());
    }
    drop(file);
    let fds = handoff.fds();
    let mut keep = fds.clone();
    keep.push(EXEC_FD);
    let fixed = close_the_rest_on_exec(&keep);
    for &fd in &fds {
        if let Err(e) = set_cloexec(fd, false) {
            restore(&fds);
            return ReexecError::Exec(e);
        }
    }
    tracing::info!(
        binary = %binary.display(),
        release = handoff.release,
        fixed_cloexec = fixed,
        "re-executing into the release's controller"
    );
    let mut argp: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argp.push(std::ptr::null());
    let mut envpp: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envpp.push(std::ptr::null());
    // SAFETY: EXEC_FD is the open binary; the path is NULL (with AT_EMPTY_PATH, Linux 6.11 and
    // later run the descriptor's file; older kernels fail with EFAULT and nothing runs); argp and envpp are NULL-terminated
    // arrays of pointers into `argv`/`envp`, alive across the call. On success nothing returns.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            EXEC_FD,
            std::ptr::null::<libc::c_char>(),
            argp.as_ptr(),
            envpp.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
    }
    let e = std::io::Error::last_os_error();
    restore(&fds);
    ReexecError::Exec(e)
}

fn restore(fds: &[RawFd]) {
    for &fd in fds {
        let _ = set_cloexec(fd, true);
    }
    // SAFETY: EXEC_FD is the descriptor this function put there.
    unsafe { libc::close(EXEC_FD) };
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_handoff_at_start_is_refused() {
        // The only test that touches this process's HANDOFF_ENV.
        std::env::set_var(HANDOFF_ENV, "v=99,listen=5,keeper=9,agent=none,bin=/b");
        assert!(matches!(
            Handoff::take_from_env(),
            Err(ReexecError::HandoffRefused)
        ));
        assert!(std::env::var_os(HANDOFF_ENV).is_none());
        assert!(matches!(Handoff::take_from_env(), Ok(None)));
    }

    #[test]
    fn a_handoff_round_trips_and_malformed_ones_are_refused() {
        let h = Handoff {
            release: 7,
            listen: 5,
            keeper: 9,
            agent: Some(11),
            bin_dir: PathBuf::from("/opt/bulk,head/bin"),
        };
        assert_eq!(Handoff::parse(&h.encode()).unwrap(), h);
        let none = Handoff {
            agent: None,
            bin_dir: PathBuf::from("/b"),
            ..h
        };
        assert_eq!(none.encode(), "v=7,listen=5,keeper=9,agent=none,bin=/b");
        assert_eq!(Handoff::parse(&none.encode()).unwrap(), none);
        for bad in [
            "",
            "v=7",
            "v=7,listen=5,keeper=9,agent=none",
            "v=7,listen=5,keeper=9,agent=none,extra=/b",
            "v=7,listen=5,keeper=9,agent=none,bin=relative",
            "v=x,listen=5,keeper=9,agent=none,bin=/b",
            "v=7,listen=2,keeper=9,agent=none,bin=/b",
            "v=7,listen=5,keeper=1023,agent=none,bin=/b",
            "v=7,listen=5,keeper=5,agent=none,bin=/b",
            "v=7,listen=5,keeper=9,agent=9,bin=/b",
            "v=7,keeper=9,listen=5,agent=none,bin=/b",
            "v=7,listen=-5,keeper=9,agent=none,bin=/b",
        ] {
            assert!(Handoff::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_missing_binary_fails_and_changes_no_flag() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let h = Handoff {
            release: 1,
            listen: a.as_raw_fd(),
            keeper: _b.as_raw_fd(),
            agent: None,
            bin_dir: PathBuf::from("/b"),
        };
        let e = exec_release(Path::new("/nonexistent/bulkhead-controller"), &h);
        assert_eq!(e.code(), "controller_binary_missing");
        assert!(set_cloexec(a.as_raw_fd(), true).unwrap());
    }

    #[test]
    fn a_refused_exec_returns_with_the_descriptors_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_program = dir.path().join("bulkhead-controller");
        std::fs::write(&not_a_program, b"not a program").unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let h = Handoff {
            release: 1,
            listen: a.as_raw_fd(),
            keeper: b.as_raw_fd(),
            agent: None,
            bin_dir: PathBuf::from("/b"),
        };
        let e = exec_release(&not_a_program, &h);
        assert_eq!(e.code(), "controller_exec_failed", "{e}");
        // Close-on-exec again, and the exec descriptor closed.
        assert!(set_cloexec(a.as_raw_fd(), true).unwrap());
        assert!(set_cloexec(b.as_raw_fd(), true).unwrap());
        assert!(set_cloexec(EXEC_FD, true).is_err());
    }
}
