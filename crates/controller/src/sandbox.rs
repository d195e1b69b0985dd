//! Process hardening: no_new_privs, non-dumpable, and a seccomp filter that blocks every
//! outbound connection attempt and every `exec`. The controller only listens.
//!
//! Blocked calls: `connect` (any address family — the controller's own unix channels are
//! socketpairs, and the block cards' unix sockets are connected by the launcher, see
//! [`crate::launcher`]), `socket` for any family but `AF_UNIX` (the TCP listener is opened before
//! the filter is installed), and `execve`/`execveat` (hypervisors and block cards are started by
//! the launcher, which was exec'd before this filter existed; the controller itself can run no
//! program, not even a release's controller: DeployRelease records it and exits, and the host's
//! supervisor starts it, see `bulkhead_rot::supervise`). A blocked call traps: the kernel skips the syscall and
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
    // No exec form at all: with a non-empty absolute path the kernel ignores execveat's
    // descriptor, and Linux refuses a NULL path for execveat (EFAULT, checked on 6.18), so no
    // argument rule can limit it to one file (the supervisor, outside this filter, starts a
    // release's controller instead).
    Rule::any(libc::SYS_execveat),
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::ffi::CStr;
    use std::os::fd::AsRawFd;
    use std::os::fd::RawFd;

    /// The descriptor the test opens a binary onto before trying each `execveat` form.
    const EXEC_FD: RawFd = 1023;

    /// Forks a child that opens `binary` onto [`EXEC_FD`], installs the controller's real
    /// filter (no signal handler: a trapped call kills the child with SIGSYS) and calls
    /// `execveat(EXEC_FD, path, ["true"], [], AT_EMPTY_PATH)`; returns the child's wait status.
    /// The test process itself never runs under the filter.
    fn execveat_under_the_filter(binary: &str, path: Option<&CStr>) -> libc::c_int {
        let program = OUTBOUND_FILTER.compile().unwrap();
        let file = std::fs::File::open(binary).unwrap();
        let fd = file.as_raw_fd();
        let argv = [c"true".as_ptr(), std::ptr::null()];
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        let pathp = path.map_or(std::ptr::null(), CStr::as_ptr);
        // SAFETY: after the fork the child only makes system calls (dup2, signal, prctl,
        // seccomp, execveat, _exit) on memory prepared before it: nothing that takes a lock
        // another thread of the test harness might have held.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: the child's calls named above; `argv`, `envp` and `pathp` point into
            // memory that outlives the call; `_exit` never returns.
            unsafe {
                if libc::dup2(fd, EXEC_FD) < 0 {
                    libc::_exit(101);
                }
                libc::signal(libc::SIGSYS, libc::SIG_DFL);
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    libc::_exit(102);
                }
                if bulkhead_harden::apply(&program).is_err() {
                    libc::_exit(103);
                }
                libc::syscall(
                    libc::SYS_execveat,
                    EXEC_FD,
                    pathp,
                    argv.as_ptr(),
                    envp.as_ptr(),
                    libc::AT_EMPTY_PATH,
                );
                libc::_exit(104);
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above; `status` is valid for writes.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    #[test]
    fn the_filter_traps_every_execveat_form() {
        // The defect this guards: with a non-empty absolute path the kernel ignores the
        // descriptor, so a rule on descriptor and flags let this run /bin/true although
        // EXEC_FD holds /dev/null. Every form must be trapped (SIGSYS, no handler here).
        for (file, path) in [
            ("/dev/null", Some(c"/bin/true")),
            ("/bin/true", Some(c"")),
            ("/bin/true", None),
        ] {
            let st = execveat_under_the_filter(file, path);
            assert!(
                libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGSYS,
                "execveat(EXEC_FD={file}, {path:?}) was not trapped (wait status {st:#x})"
            );
        }
    }

    #[test]
    fn filters_compile_and_block_what_they_say() {
        bulkhead_harden::self_test(FILTERS).expect("compile");
        for nr in [libc::SYS_connect, libc::SYS_execve, libc::SYS_execveat] {
            assert!(OUTBOUND_FILTER.lists_unconditionally(nr));
        }
        // socket() only for families other than AF_UNIX.
        assert!(OUTBOUND_FILTER.syscalls().contains(&libc::SYS_socket));
        assert!(!OUTBOUND_FILTER.lists_unconditionally(libc::SYS_socket));
    }
}
