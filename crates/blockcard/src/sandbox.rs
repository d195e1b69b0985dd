//! Process hardening: non-dumpable from the first instruction of `main`, then, once the backing
//! fd and both sockets are open and the key is set up, privileges dropped, no_new_privs, and a
//! seccomp allow-list without socket creation, exec, or opening paths.
//!
//! This module holds the card's policy (its allow-lists, as data, and when to drop to which
//! ids); the mechanism (non-dumpable, mlockall, the privilege drop, installing the filter
//! stack) is `bulkhead-harden`.

use bulkhead_harden::{Action, BpfProgram, Filter, HardenError, Rule, OPEN_SYSCALLS};

/// Sandbox errors.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Harden(#[from] HardenError),
    #[error("pthread_sigmask failed: {0}")]
    SignalMask(#[source] std::io::Error),
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
        return Err(SandboxError::SignalMask(std::io::Error::from_raw_os_error(
            rc,
        )));
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
const ALLOWED: &[Rule] = &[
    Rule::any(libc::SYS_read),
    Rule::any(libc::SYS_write),
    Rule::any(libc::SYS_readv),
    Rule::any(libc::SYS_writev),
    Rule::any(libc::SYS_pread64),
    Rule::any(libc::SYS_pwrite64),
    Rule::any(libc::SYS_preadv),
    Rule::any(libc::SYS_pwritev),
    Rule::any(libc::SYS_close),
    Rule::any(libc::SYS_fstat),
    Rule::any(libc::SYS_newfstatat),
    Rule::any(libc::SYS_statx),
    Rule::any(libc::SYS_lseek),
    Rule::any(libc::SYS_fcntl),
    Rule::any(libc::SYS_mmap),
    Rule::any(libc::SYS_munmap),
    Rule::any(libc::SYS_mremap),
    Rule::any(libc::SYS_mprotect),
    Rule::any(libc::SYS_madvise),
    Rule::any(libc::SYS_brk),
    Rule::any(libc::SYS_mlock),
    Rule::any(libc::SYS_munlock),
    Rule::any(libc::SYS_rt_sigaction),
    Rule::any(libc::SYS_rt_sigprocmask),
    Rule::any(libc::SYS_rt_sigreturn),
    Rule::any(libc::SYS_sigaltstack),
    Rule::any(libc::SYS_futex),
    Rule::any(libc::SYS_sched_yield),
    Rule::any(libc::SYS_sched_getaffinity),
    Rule::any(libc::SYS_clone),
    Rule::any(libc::SYS_clone3),
    Rule::any(libc::SYS_set_robust_list),
    Rule::any(libc::SYS_rseq),
    Rule::any(libc::SYS_gettid),
    Rule::any(libc::SYS_getpid),
    Rule::any(libc::SYS_tgkill),
    Rule::any(libc::SYS_exit),
    Rule::any(libc::SYS_exit_group),
    Rule::any(libc::SYS_accept),
    Rule::any(libc::SYS_accept4),
    Rule::any(libc::SYS_recvmsg),
    Rule::any(libc::SYS_sendmsg),
    Rule::any(libc::SYS_recvfrom),
    Rule::any(libc::SYS_sendto),
    Rule::any(libc::SYS_shutdown),
    Rule::any(libc::SYS_epoll_create1),
    Rule::any(libc::SYS_epoll_ctl),
    Rule::any(libc::SYS_epoll_wait),
    Rule::any(libc::SYS_epoll_pwait),
    Rule::any(libc::SYS_eventfd2),
    Rule::any(libc::SYS_poll),
    Rule::any(libc::SYS_ppoll),
    Rule::any(libc::SYS_fsync),
    Rule::any(libc::SYS_fdatasync),
    Rule::any(libc::SYS_fallocate),
    Rule::any(libc::SYS_getrandom),
    Rule::any(libc::SYS_clock_gettime),
    Rule::any(libc::SYS_clock_nanosleep),
    Rule::any(libc::SYS_nanosleep),
    Rule::any(libc::SYS_restart_syscall),
    Rule::any(libc::SYS_rt_sigtimedwait),
];

/// ioctls allowed: BLKDISCARD on the backing device, FIONBIO/FIOCLEX on fds, TCGETS (isatty).
const ALLOWED_IOCTLS: &[u64] = &[0x1277, 0x5421, 0x5451, 0x5401];
/// prctl ops allowed: PR_SET_NAME / PR_GET_NAME (thread names) and PR_SET_DUMPABLE.
const ALLOWED_PRCTLS: &[u64] = &[15, 16, 4];
/// ioctl(fd, request, ...) filtered on the request (argument 1); prctl on the option
/// (argument 0).
const CONDITIONAL: &[Rule] = &[
    Rule::arg_one_of(libc::SYS_ioctl, 1, ALLOWED_IOCTLS),
    Rule::arg_one_of(libc::SYS_prctl, 0, ALLOWED_PRCTLS),
];

/// The card's allow-list. Anything not listed kills the process. Opens pass this filter only
/// to get EACCES from [`OPEN_FILTER`].
pub static CARD_FILTER: Filter = Filter {
    name: "blockcard",
    tables: &[ALLOWED, OPEN_SYSCALLS, CONDITIONAL],
    listed: Action::Allow,
    otherwise: Action::KillProcess,
};

/// Answers every path-opening syscall with EACCES and allows the rest (the main allow-list,
/// stacked on top, decides about the rest).
pub static OPEN_FILTER: Filter = bulkhead_harden::deny_opens("blockcard-open");

/// What the NBD mode adds (`--nbd`): the connection thread reconnects to the storage node, so
/// it may create IPv4/IPv6 sockets (no unix, netlink or raw sockets), connect them and set their
/// options. It never binds or listens. The address was resolved before the sandbox.
const NBD_NET: &[Rule] = &[
    Rule::arg_one_of(
        libc::SYS_socket,
        0,
        &[libc::AF_INET as u64, libc::AF_INET6 as u64],
    ),
    Rule::any(libc::SYS_connect),
    Rule::any(libc::SYS_setsockopt),
    Rule::any(libc::SYS_getsockopt),
    Rule::any(libc::SYS_getpeername),
    Rule::any(libc::SYS_getsockname),
];

/// The card's allow-list in NBD mode: [`CARD_FILTER`] plus [`NBD_NET`].
pub static NBD_CARD_FILTER: Filter = Filter {
    name: "blockcard-nbd",
    tables: &[ALLOWED, OPEN_SYSCALLS, CONDITIONAL, NBD_NET],
    listed: Action::Allow,
    otherwise: Action::KillProcess,
};

/// Every filter of the card, for `--self-test`.
pub static FILTERS: &[&Filter] = &[&OPEN_FILTER, &CARD_FILTER, &NBD_CARD_FILTER];

/// Builds the card's seccomp program (local-file mode).
pub fn card_filter() -> Result<BpfProgram, SandboxError> {
    Ok(CARD_FILTER.compile()?)
}

/// Builds the card's seccomp program for NBD mode.
pub fn nbd_card_filter() -> Result<BpfProgram, SandboxError> {
    Ok(NBD_CARD_FILTER.compile()?)
}

/// Builds the program of [`OPEN_FILTER`].
pub fn open_filter() -> Result<BpfProgram, SandboxError> {
    Ok(OPEN_FILTER.compile()?)
}

/// Sets no_new_privs and installs [`OPEN_FILTER`] and [`CARD_FILTER`] (or, with `nbd`,
/// [`NBD_CARD_FILTER`]) on the calling thread; threads created afterwards inherit them. Call
/// before any other thread exists. The kernel applies the most restrictive verdict of all
/// filters: an open gets EACCES, anything outside the allow-list kills the process.
pub fn install_seccomp(nbd: bool) -> Result<(), SandboxError> {
    let allow = if nbd { &NBD_CARD_FILTER } else { &CARD_FILTER };
    Ok(bulkhead_harden::install_stack(&[&OPEN_FILTER, allow])?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn filter_compiles() {
        let prog = super::card_filter().expect("filter");
        assert!(!prog.is_empty());
        assert!(!super::open_filter().expect("filter").is_empty());
        bulkhead_harden::self_test(super::FILTERS).expect("self-test");
    }

    #[test]
    fn ioctl_and_prctl_are_conditional() {
        for nr in [libc::SYS_ioctl, libc::SYS_prctl] {
            assert!(super::CARD_FILTER.syscalls().contains(&nr));
            assert!(!super::CARD_FILTER.lists_unconditionally(nr));
        }
        for nr in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_execve,
            libc::SYS_bind,
        ] {
            assert!(!super::CARD_FILTER.syscalls().contains(&nr));
        }
        // NBD mode: sockets only of the internet families, never bind/listen/exec.
        assert!(!super::NBD_CARD_FILTER.lists_unconditionally(libc::SYS_socket));
        assert!(super::NBD_CARD_FILTER.lists_unconditionally(libc::SYS_connect));
        for nr in [libc::SYS_execve, libc::SYS_bind, libc::SYS_listen] {
            assert!(!super::NBD_CARD_FILTER.syscalls().contains(&nr));
        }
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
            let installed = bulkhead_harden::no_new_privs().is_ok()
                && bulkhead_harden::apply(&deny_open).is_ok()
                && bulkhead_harden::apply(&allow).is_ok();
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
