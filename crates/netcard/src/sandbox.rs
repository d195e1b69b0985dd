//! The card's hardening policy (the mechanism is `bulkhead-harden`): non-dumpable from the first
//! instruction, then, once the TAP device and the UDP socket are open and the keys derived,
//! privileges dropped, no_new_privs, and a seccomp allow-list without socket creation, bind,
//! connect, exec, ioctl or opening paths. This module holds the allow-lists, as data.

use crate::Result;
use bulkhead_harden::{Action, Filter, Rule, OPEN_SYSCALLS};

/// What the running card needs: read/write on the TAP fd, recvfrom/sendto on the bound socket,
/// poll, the signal thread (sigtimedwait), memory, and creating its two worker threads.
const ALLOWED: &[Rule] = &[
    Rule::any(libc::SYS_read),
    Rule::any(libc::SYS_write),
    Rule::any(libc::SYS_readv),
    Rule::any(libc::SYS_writev),
    Rule::any(libc::SYS_recvfrom),
    Rule::any(libc::SYS_sendto),
    Rule::any(libc::SYS_recvmsg),
    Rule::any(libc::SYS_sendmsg),
    Rule::any(libc::SYS_poll),
    // The control socket (bound before the sandbox) and the sequence-floor file (opened before).
    Rule::any(libc::SYS_accept4),
    Rule::any(libc::SYS_pwrite64),
    Rule::any(libc::SYS_fdatasync),
    Rule::any(libc::SYS_ppoll),
    Rule::any(libc::SYS_close),
    Rule::any(libc::SYS_mmap),
    Rule::any(libc::SYS_munmap),
    Rule::any(libc::SYS_mremap),
    Rule::any(libc::SYS_mprotect),
    Rule::any(libc::SYS_madvise),
    // Key pages for epochs installed after start (LockedSecret: mmap, madvise, mlock).
    Rule::any(libc::SYS_mlock),
    Rule::any(libc::SYS_munlock),
    Rule::any(libc::SYS_brk),
    Rule::any(libc::SYS_futex),
    Rule::any(libc::SYS_clone),
    Rule::any(libc::SYS_clone3),
    Rule::any(libc::SYS_set_robust_list),
    Rule::any(libc::SYS_rseq),
    Rule::any(libc::SYS_sigaltstack),
    Rule::any(libc::SYS_rt_sigaction),
    Rule::any(libc::SYS_rt_sigprocmask),
    Rule::any(libc::SYS_rt_sigreturn),
    Rule::any(libc::SYS_rt_sigtimedwait),
    Rule::any(libc::SYS_sched_yield),
    Rule::any(libc::SYS_sched_getaffinity),
    Rule::any(libc::SYS_gettid),
    Rule::any(libc::SYS_getpid),
    Rule::any(libc::SYS_tgkill),
    Rule::any(libc::SYS_getrandom),
    Rule::any(libc::SYS_clock_gettime),
    Rule::any(libc::SYS_clock_nanosleep),
    Rule::any(libc::SYS_nanosleep),
    Rule::any(libc::SYS_restart_syscall),
    Rule::any(libc::SYS_exit),
    Rule::any(libc::SYS_exit_group),
];

/// What vhost-user-net mode needs on top: the frontend's messages arrive with fds (guest
/// memory memfds, kick/call eventfds: recvmsg with SCM_RIGHTS, then mmap MAP_SHARED), the
/// backend's epoll thread (epoll, eventfd writes), fstat/fcntl on received fds, accept4 on the
/// already-bound vhost-user socket, shutdown of a finished connection.
const VHOST_ALLOWED: &[Rule] = &[
    Rule::any(libc::SYS_epoll_create1),
    Rule::any(libc::SYS_epoll_ctl),
    Rule::any(libc::SYS_epoll_wait),
    Rule::any(libc::SYS_epoll_pwait),
    Rule::any(libc::SYS_eventfd2),
    Rule::any(libc::SYS_fstat),
    Rule::any(libc::SYS_newfstatat),
    Rule::any(libc::SYS_statx),
    Rule::any(libc::SYS_fcntl),
    Rule::any(libc::SYS_lseek),
    Rule::any(libc::SYS_shutdown),
    Rule::any(libc::SYS_accept),
];

/// ioctls of vhost mode: FIONBIO and FIOCLEX on fds (std and vmm-sys-util use them).
const VHOST_IOCTLS: &[u64] = &[0x5421, 0x5451];
const VHOST_CONDITIONAL: &[Rule] = &[
    Rule::arg_one_of(libc::SYS_ioctl, 1, VHOST_IOCTLS),
    Rule::arg_one_of(libc::SYS_prctl, 0, ALLOWED_PRCTLS),
];

/// prctl: PR_SET_NAME / PR_GET_NAME (thread names).
const ALLOWED_PRCTLS: &[u64] = &[15, 16];
const CONDITIONAL: &[Rule] = &[Rule::arg_one_of(libc::SYS_prctl, 0, ALLOWED_PRCTLS)];

/// The card's allow-list; anything else kills the process.
pub static CARD_FILTER: Filter = Filter {
    name: "netcard",
    tables: &[ALLOWED, CONDITIONAL, OPEN_SYSCALLS],
    listed: Action::Allow,
    otherwise: Action::KillProcess,
};

/// The vhost-user-net card's allow-list: [`CARD_FILTER`]'s plus [`VHOST_ALLOWED`].
pub static VHOST_CARD_FILTER: Filter = Filter {
    name: "netcard-vhost",
    tables: &[ALLOWED, VHOST_ALLOWED, VHOST_CONDITIONAL, OPEN_SYSCALLS],
    listed: Action::Allow,
    otherwise: Action::KillProcess,
};

/// Opens fail with EACCES instead of killing.
pub static OPEN_FILTER: Filter = bulkhead_harden::deny_opens("netcard-open");

/// Every filter of the card, for `--self-test`.
pub static FILTERS: &[&Filter] = &[&OPEN_FILTER, &CARD_FILTER, &VHOST_CARD_FILTER];

/// no_new_privs, then both filters on the calling thread; threads created later inherit them.
pub fn install_seccomp() -> Result<()> {
    Ok(bulkhead_harden::install_stack(&[
        &OPEN_FILTER,
        &CARD_FILTER,
    ])?)
}

/// no_new_privs, then [`OPEN_FILTER`] and [`VHOST_CARD_FILTER`] (vhost-user-net mode).
pub fn install_vhost_seccomp() -> Result<()> {
    Ok(bulkhead_harden::install_stack(&[
        &OPEN_FILTER,
        &VHOST_CARD_FILTER,
    ])?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn filters_compile_and_leave_out_sockets_exec_ioctl() {
        bulkhead_harden::self_test(super::FILTERS).expect("self-test");
        for nr in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_execve,
            libc::SYS_ioctl,
            libc::SYS_ptrace,
        ] {
            assert!(!super::CARD_FILTER.syscalls().contains(&nr), "{nr} listed");
            if nr != libc::SYS_ioctl {
                assert!(
                    !super::VHOST_CARD_FILTER.syscalls().contains(&nr),
                    "{nr} listed"
                );
            }
        }
        assert!(!super::VHOST_CARD_FILTER.lists_unconditionally(libc::SYS_ioctl));
        for nr in [libc::SYS_epoll_wait, libc::SYS_eventfd2, libc::SYS_accept4] {
            assert!(super::VHOST_CARD_FILTER.lists_unconditionally(nr));
        }
    }
}
