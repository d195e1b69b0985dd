//! Process hardening: no_new_privs, non-dumpable, and a seccomp filter that blocks every
//! outbound connection attempt and every `exec` but one. The controller only listens.
//!
//! Blocked calls: `connect` (any address family — the controller's own unix channels are
//! socketpairs, and the block cards' unix sockets are connected by the launcher, see
//! [`crate::launcher`]), `socket` for any family but `AF_UNIX` (the TCP listener is opened before
//! the filter is installed), and `execve`/`execveat` (hypervisors and block cards are started by
//! the launcher, which was exec'd before this filter existed; the controller itself can run no
//! program). The one exec left is a release's controller: `execveat` on the fixed descriptor
//! [`crate::reexec::EXEC_FD`] with `AT_EMPTY_PATH` (DeployRelease re-executes the controller
//! into the installed binary; see [`crate::reexec`]). The filter survives that exec, so the
//! new image runs under it too (and stacks a second copy when it hardens itself). A blocked call traps: the kernel skips the syscall and
//! sends `SIGSYS`; the handler of `bulkhead-harden` only bumps a counter and makes the call fail
//! with EPERM, and the monitor turns the counter into an `outbound_connect_blocked` alert.
//! Trapping rather than killing is what lets the alert be raised; the syscall never runs
//! either way.
//!
//! This module holds the controller's policy only (its deny-list, as data); the mechanism is
//! `bulkhead-harden`.

use bulkhead_harden::{Action, Filter, Rule};

pub use bulkhead_harden::HardenError as SandboxError;

/// Blocked attempts (outbound connection or exec) since start.
pub fn blocked_attempts() -> u64 {
    bulkhead_harden::trapped_syscalls()
}

/// `AF_UNIX` as a syscall argument (a small positive constant: the cast is lossless).
const AF_UNIX: u64 = libc::AF_UNIX as u64;

/// What the controller may never do.
const OUTBOUND: &[Rule] = &[
    Rule::any(libc::SYS_connect),
    Rule::any(libc::SYS_execve),
    // execveat only as `execveat(EXEC_FD, "", .., AT_EMPTY_PATH)`: listed if either differs.
    Rule::arg_not(libc::SYS_execveat, 0, crate::reexec::EXEC_FD as u64),
    Rule::arg_not(libc::SYS_execveat, 4, libc::AT_EMPTY_PATH as u64),
    Rule::arg_not(libc::SYS_socket, 0, AF_UNIX),
];

/// The controller's filter: every listed call traps, everything else runs.
pub static OUTBOUND_FILTER: Filter = Filter {
    name: "controller-outbound",
    tables: &[OUTBOUND],
    listed: Action::Trap,
    otherwise: Action::Allow,
};

/// Every filter of the controller binary (its own and its launcher's), for `--self-test`.
pub static FILTERS: &[&Filter] = &[&OUTBOUND_FILTER, &crate::launcher::LAUNCHER_FILTER];

/// Hardens the whole process. Call before starting worker threads; the filter is also synced
/// to any threads that already exist.
pub fn harden() -> Result<(), SandboxError> {
    bulkhead_harden::no_new_privs()?;
    bulkhead_harden::set_non_dumpable()?;
    bulkhead_harden::install_trap_counter()?;
    bulkhead_harden::apply_all_threads(&OUTBOUND_FILTER.compile()?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_block_what_they_say() {
        bulkhead_harden::self_test(FILTERS).expect("compile");
        for nr in [libc::SYS_connect, libc::SYS_execve] {
            assert!(OUTBOUND_FILTER.lists_unconditionally(nr));
        }
        // execveat only on the release's descriptor, with AT_EMPTY_PATH.
        assert!(OUTBOUND_FILTER.syscalls().contains(&libc::SYS_execveat));
        assert!(!OUTBOUND_FILTER.lists_unconditionally(libc::SYS_execveat));
        // socket() only for families other than AF_UNIX.
        assert!(OUTBOUND_FILTER.syscalls().contains(&libc::SYS_socket));
        assert!(!OUTBOUND_FILTER.lists_unconditionally(libc::SYS_socket));
    }
}
