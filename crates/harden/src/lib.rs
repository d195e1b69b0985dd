//! Process hardening shared by every sandboxed Bulkhead daemon (hypervisor, block card,
//! controller and its launcher), written once.
//!
//! The mechanism lives here; the policy does not. Each daemon keeps its own seccomp allow-list
//! as data — a static table of [`Rule`]s bundled into a [`Filter`] — and calls into this crate
//! to set no_new_privs, become non-dumpable, drop privileges, close stray file descriptors and
//! compile and install its filters:
//!
//! ```
//! use bulkhead_harden::{Action, Filter, Rule};
//!
//! const ALWAYS: &[Rule] = &[Rule::any(libc::SYS_read), Rule::any(libc::SYS_exit_group)];
//! /// ioctl only with FIONBIO (argument 1).
//! const IOCTL: &[Rule] = &[Rule::arg_one_of(libc::SYS_ioctl, 1, &[0x5421])];
//! static EXAMPLE: Filter = Filter {
//!     name: "example",
//!     tables: &[ALWAYS, IOCTL],
//!     listed: Action::Allow,
//!     otherwise: Action::KillProcess,
//! };
//! assert!(bulkhead_harden::self_test(&[&EXAMPLE]).is_ok());
//! ```
//!
//! The steps every card repeats are here too: [`forbid_dumps`] first in `main`,
//! [`lock_current_memory`], [`drop_privileges_if_given`] (root is never kept by omission), and
//! [`install_stack`] with a [`deny_opens`] filter under the daemon's allow-list.
//!
//! Every failure is a [`HardenError`] naming the step that failed and, for a system call, its
//! errno.

mod filter;
mod process;
mod trap;

pub use filter::{
    apply, apply_all_threads, deny_opens, install_compiled, install_stack, self_test, target_arch,
    Action, Args, Filter, Rule, OPEN_SYSCALLS,
};
pub use process::{
    close_other_fds, drop_privileges, drop_privileges_if_given, forbid_dumps, lock_core_dumps,
    lock_current_memory, no_new_privs, set_non_dumpable,
};
pub use seccompiler::BpfProgram;
pub use trap::{install_trap_counter, trapped_syscalls};

/// A hardening step that can fail with an errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
    NoNewPrivs,
    /// `prctl(PR_SET_DUMPABLE, 0)`.
    NonDumpable,
    /// `setrlimit(RLIMIT_CORE, 0)`.
    CoreLimit,
    /// `setgroups(0, NULL)`.
    SetGroups,
    /// `setresgid(gid, gid, gid)`.
    SetResGid,
    /// `setresuid(uid, uid, uid)`.
    SetResUid,
    /// `getresuid`/`getresgid`/`getgroups` while checking the drop.
    ReadCredentials,
    /// Listing `/proc/self/fd`.
    ListFds,
    /// `close` of one fd.
    CloseFd,
    /// `sigaction(SIGSYS)` for the trap counter.
    TrapHandler,
    /// `mlockall(MCL_CURRENT)`.
    LockMemory,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::NoNewPrivs => "prctl(PR_SET_NO_NEW_PRIVS)",
            Step::NonDumpable => "prctl(PR_SET_DUMPABLE)",
            Step::CoreLimit => "setrlimit(RLIMIT_CORE)",
            Step::SetGroups => "setgroups",
            Step::SetResGid => "setresgid",
            Step::SetResUid => "setresuid",
            Step::ReadCredentials => "reading credentials",
            Step::ListFds => "listing /proc/self/fd",
            Step::CloseFd => "close",
            Step::TrapHandler => "sigaction(SIGSYS)",
            Step::LockMemory => "mlockall(MCL_CURRENT)",
        })
    }
}

/// Everything that can go wrong while hardening a process.
#[derive(Debug, thiserror::Error)]
pub enum HardenError {
    /// A system call of `step` failed with `errno`.
    #[error("{step} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Sys { step: Step, errno: i32 },
    /// The credential calls succeeded but the process does not hold exactly the target ids.
    #[error(
        "dropped to {uid}:{gid} but the process holds uids {got_uids:?}, gids {got_gids:?} \
         and {groups} supplementary groups"
    )]
    DropNotVerified {
        uid: u32,
        gid: u32,
        got_uids: [u32; 3],
        got_gids: [u32; 3],
        groups: usize,
    },
    /// Running as root, but not given both ids to drop to ([`drop_privileges_if_given`]).
    #[error("running as root needs --uid and --gid to drop to")]
    RootWithoutIds,
    /// A rule of filter `filter` for `syscall` cannot be expressed.
    #[error("seccomp filter {filter}: rule for syscall {syscall}: {source}")]
    Rule {
        filter: &'static str,
        syscall: i64,
        source: seccompiler::BackendError,
    },
    /// Filter `filter` does not compile (too large, identical actions, ...).
    #[error("seccomp filter {filter}: {source}")]
    Compile {
        filter: &'static str,
        source: seccompiler::BackendError,
    },
    /// An [`Action::Errno`] with a value that is not an errno.
    #[error("seccomp filter {filter}: {errno} is not an errno")]
    BadErrno { filter: &'static str, errno: i32 },
    /// The kernel refused to install a filter.
    #[error("installing a seccomp filter: {0}")]
    Apply(#[source] seccompiler::Error),
    /// No seccomp support for the architecture this was built for.
    #[error("no seccomp filters for architecture {0}")]
    Arch(&'static str),
}

impl HardenError {
    /// The errno of a failed system call, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            HardenError::Sys { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// `step` failed with the calling thread's current errno.
    pub(crate) fn last(step: Step) -> Self {
        HardenError::Sys {
            step,
            errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        }
    }
}

/// Runs a closure in a forked child (seccomp and credential changes cannot be undone, so the
/// tests make them there) and reports how the child ended.
#[cfg(test)]
mod test_fork {
    /// `Ok(exit code)` or `Err(signal)` of a child that ran `f` and exited with its result.
    pub(crate) fn in_child(f: impl FnOnce() -> i32) -> Result<i32, i32> {
        // SAFETY: fork in a test; the child runs `f` (system calls and small allocations, which
        // glibc keeps usable after fork) and leaves with `_exit`, never returning into the
        // test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = f();
            // SAFETY: leaves the child without running the parent's destructors or atexit.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid, "waitpid");
        if libc::WIFSIGNALED(status) {
            Err(libc::WTERMSIG(status))
        } else {
            Ok(libc::WEXITSTATUS(status))
        }
    }
}
