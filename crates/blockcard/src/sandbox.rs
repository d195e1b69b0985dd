//! Process hardening: non-dumpable from the first instruction of `main`, then, once the backing
//! fd and both sockets are open and the key is set up, privileges dropped, no_new_privs, and a
//! seccomp allow-list without socket creation, exec, or opening paths.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;

/// Sandbox errors.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("prctl({what}) failed: {source}")]
    Prctl {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("setrlimit(RLIMIT_CORE) failed: {0}")]
    Rlimit(#[source] std::io::Error),
    #[error("dropping privileges failed at {what}: {source}")]
    Drop {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("running as root needs --uid and --gid to drop to")]
    RootWithoutUid,
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccompiler::Error),
    #[error("seccomp filter: {0}")]
    SeccompBackend(#[from] seccompiler::BackendError),
}

fn prctl(what: &'static str, op: libc::c_int, arg: libc::c_ulong) -> Result<(), SandboxError> {
    // SAFETY: the prctl operations used here take integer arguments only.
    let rc = unsafe {
        libc::prctl(
            op,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(SandboxError::Prctl {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// No core dumps, no ptrace/`/proc/PID/mem` access by anyone without CAP_SYS_PTRACE.
pub fn make_non_dumpable() -> Result<(), SandboxError> {
    prctl("PR_SET_DUMPABLE", libc::PR_SET_DUMPABLE, 0)?;
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `zero` is a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(SandboxError::Rlimit(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Locks every page mapped right now (heap with the cipher contexts' key schedules included)
/// into RAM. Guest memory, mapped later, is not affected. Best effort: returns the error for
/// logging.
pub fn lock_current_memory() -> Result<(), std::io::Error> {
    // SAFETY: mlockall has no memory-safety preconditions.
    if unsafe { libc::mlockall(libc::MCL_CURRENT) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drops to `uid`/`gid` (all of real, effective, saved; no supplementary groups).
/// As root without a target this is refused.
pub fn drop_privileges(uid: Option<u32>, gid: Option<u32>) -> Result<(), SandboxError> {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let (uid, gid) = match (uid, gid) {
        (Some(u), Some(g)) => (u, g),
        _ if euid == 0 => return Err(SandboxError::RootWithoutUid),
        _ => return Ok(()),
    };
    let err = |what| SandboxError::Drop {
        what,
        source: std::io::Error::last_os_error(),
    };
    if euid == 0 {
        // SAFETY: an empty group list; the null pointer is allowed with size 0.
        if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
            return Err(err("setgroups"));
        }
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(err("setresgid"));
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(err("setresuid"));
    }
    // SAFETY: getuid/geteuid cannot fail.
    let (now_uid, now_euid) = unsafe { (libc::getuid(), libc::geteuid()) };
    if now_uid != uid || now_euid != uid {
        return Err(SandboxError::Drop {
            what: "verify uid",
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
    }
    // A credential change resets the dumpable flag from the suid_dumpable sysctl: set it again.
    make_non_dumpable()?;
    Ok(())
}

fn exit_sigset() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid argument for sigemptyset, which initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    set
}

/// Blocks SIGTERM/SIGINT/SIGHUP in the calling thread (and so in every thread it creates later).
pub fn block_exit_signals() -> Result<(), SandboxError> {
    let set = exit_sigset();
    // SAFETY: `set` is initialised; the old mask is not needed (null).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SandboxError::Prctl {
            what: "pthread_sigmask",
            source: std::io::Error::from_raw_os_error(rc),
        });
    }
    Ok(())
}

/// Waits for one of the blocked exit signals; returns its number.
pub fn wait_exit_signal() -> i32 {
    let set = exit_sigset();
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            return sig;
        }
    }
}

/// The syscalls the card needs once running: vhost-user message handling (recvmsg with fds,
/// mmap of guest memory), the per-queue epoll threads, pread/pwrite/fdatasync/fallocate on the
/// backing fd, and accepting on the two already-bound sockets.
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigtimedwait,
];

/// ioctls allowed: BLKDISCARD on the backing device, FIONBIO/FIOCLEX on fds, TCGETS (isatty).
const ALLOWED_IOCTLS: &[u64] = &[0x1277, 0x5421, 0x5451, 0x5401];
/// prctl ops allowed: PR_SET_NAME / PR_GET_NAME (thread names) and PR_SET_DUMPABLE.
const ALLOWED_PRCTLS: &[u64] = &[15, 16, 4];

fn arg_eq(index: u8, values: &[u64]) -> Result<Vec<SeccompRule>, SandboxError> {
    values
        .iter()
        .map(|v| {
            Ok(SeccompRule::new(vec![SeccompCondition::new(
                index,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                *v,
            )?])?)
        })
        .collect()
}

/// Builds the card's seccomp program. Anything not listed kills the process.
pub fn card_filter() -> Result<BpfProgram, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in ALLOWED {
        rules.insert(*nr, Vec::new());
    }
    // ioctl(fd, request, ...): filter on the request (argument 1).
    // Opens pass this filter only to get EACCES from `open_filter`.
    for nr in OPEN_SYSCALLS {
        rules.insert(*nr, Vec::new());
    }
    rules.insert(libc::SYS_ioctl, arg_eq(1, ALLOWED_IOCTLS)?);
    rules.insert(libc::SYS_prctl, arg_eq(0, ALLOWED_PRCTLS)?);
    let arch = std::env::consts::ARCH.try_into()?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )?;
    Ok(filter.try_into()?)
}

/// Syscalls that open paths. libc sometimes tries them internally (e.g. glibc reads
/// /sys/devices/system/cpu/online when a new thread gets its own malloc arena), so they fail with
/// EACCES instead of killing the card; either way nothing is opened.
const OPEN_SYSCALLS: &[i64] = &[
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_creat,
];

/// A filter that answers every path-opening syscall with EACCES and allows the rest (the main
/// allow-list, stacked on top, decides about the rest).
pub fn open_filter() -> Result<BpfProgram, SandboxError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        OPEN_SYSCALLS.iter().map(|nr| (*nr, Vec::new())).collect();
    let arch = std::env::consts::ARCH.try_into()?;
    let eacces = u32::try_from(libc::EACCES).unwrap_or(13);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(eacces),
        arch,
    )?;
    Ok(filter.try_into()?)
}

/// Sets no_new_privs and installs [`open_filter`] and [`card_filter`] on the calling thread;
/// threads created afterwards inherit them. Call before any other thread exists. The kernel
/// applies the most restrictive verdict of all filters: an open gets EACCES, anything outside
/// the allow-list kills the process.
pub fn install_seccomp() -> Result<(), SandboxError> {
    prctl("PR_SET_NO_NEW_PRIVS", libc::PR_SET_NO_NEW_PRIVS, 1)?;
    let deny_open = open_filter()?;
    let allow = card_filter()?;
    seccompiler::apply_filter(&deny_open)?;
    seccompiler::apply_filter(&allow)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn filter_compiles() {
        let prog = super::card_filter().expect("filter");
        assert!(!prog.is_empty());
        assert!(!super::open_filter().expect("filter").is_empty());
    }

    /// In a child process (seccomp cannot be undone): install the filters, then opening a file
    /// fails with EACCES and socket creation kills the process with SIGSYS.
    #[test]
    fn filters_deny_open_and_kill_on_socket() {
        // Built before fork: the child must not allocate (other test threads may hold locks).
        let deny_open = super::open_filter().expect("filter");
        let allow = super::card_filter().expect("filter");
        // SAFETY: fork in a test; the child only makes raw syscalls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let installed = super::prctl("PR_SET_NO_NEW_PRIVS", libc::PR_SET_NO_NEW_PRIVS, 1)
                .is_ok()
                && seccompiler::apply_filter(&deny_open).is_ok()
                && seccompiler::apply_filter(&allow).is_ok();
            let code = match installed {
                false => 10,
                true => {
                    // SAFETY: a NUL-terminated path; the result is only inspected.
                    let fd = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
                    let err = std::io::Error::last_os_error().raw_os_error();
                    if fd >= 0 || err != Some(libc::EACCES) {
                        11
                    } else {
                        // SAFETY: plain syscall; must not return.
                        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                        12
                    }
                }
            };
            // SAFETY: leave the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFSIGNALED(status),
            "child exited with {}",
            libc::WEXITSTATUS(status)
        );
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
