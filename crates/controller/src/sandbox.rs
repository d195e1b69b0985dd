//! Process hardening: no_new_privs, non-dumpable, and a seccomp filter that blocks every
//! outbound connection attempt and every `exec`. The controller only listens.
//!
//! Blocked calls: `connect` (any address family — the controller's own unix channels are
//! socketpairs, and the block cards' unix sockets are connected by the launcher, see
//! [`crate::launcher`]), `socket` for any family but `AF_UNIX` (the TCP listener is opened before
//! the filter is installed), and `execve`/`execveat` (hypervisors and block cards are started by
//! the launcher, which was exec'd before this filter existed; the controller itself can run no
//! program). A blocked call traps: the kernel skips the syscall and
//! sends `SIGSYS`; our handler only bumps a counter, which the monitor turns into an
//! `outbound_connect_blocked` alert. Trapping rather than killing is what lets the alert be raised;
//! the syscall never runs either way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

static BLOCKED: AtomicU64 = AtomicU64::new(0);

/// Blocked attempts (outbound connection or exec) since start.
pub fn blocked_attempts() -> u64 {
    BLOCKED.load(Ordering::Relaxed)
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("prctl({0}) failed: {1}")]
    Prctl(&'static str, std::io::Error),
    #[error("sigaction(SIGSYS) failed: {0}")]
    Sigaction(std::io::Error),
    #[error("seccomp filter: {0}")]
    Seccomp(#[from] seccompiler::Error),
    #[error("seccomp filter: {0}")]
    Backend(#[from] seccompiler::BackendError),
    #[error("unsupported architecture")]
    Arch,
}

extern "C" fn on_sigsys(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // Async-signal-safe: one atomic add and one store into the saved registers.
    BLOCKED.fetch_add(1, Ordering::Relaxed);
    // The trapped syscall did not run; make it return -EPERM instead of whatever the return
    // register held (which could look like success).
    #[cfg(target_arch = "x86_64")]
    // SAFETY: for an SA_SIGINFO handler the kernel passes a valid, writable `ucontext_t` in
    // `ctx`; the saved RAX is restored on return from the handler and becomes the syscall's
    // return value. `REG_RAX` (13) is within the 23-entry `gregs` array.
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::EPERM);
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above; on aarch64 the return value is x0, `regs[0]`.
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.regs[0] = (-i64::from(libc::EPERM)) as u64;
    }
}

/// The seccomp target of this build.
pub fn target_arch() -> Result<TargetArch, SandboxError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else {
        Err(SandboxError::Arch)
    }
}

/// The filter, compiled.
pub fn outbound_filter() -> Result<BpfProgram, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_connect, vec![]);
    rules.insert(libc::SYS_execve, vec![]);
    rules.insert(libc::SYS_execveat, vec![]);
    let not_unix = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Ne,
        u64::try_from(libc::AF_UNIX).map_err(|_| SandboxError::Arch)?,
    )?;
    rules.insert(libc::SYS_socket, vec![SeccompRule::new(vec![not_unix])?]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Trap,
        target_arch()?,
    )?;
    Ok(filter.try_into()?)
}

/// Hardens the whole process. Call before starting worker threads; the filter is also synced
/// to any threads that already exist.
pub fn harden() -> Result<(), SandboxError> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS and integer arguments touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::Prctl(
            "PR_SET_NO_NEW_PRIVS",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: as above; PR_SET_DUMPABLE takes an integer flag only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(SandboxError::Prctl(
            "PR_SET_DUMPABLE",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `sa` is a zero-initialised sigaction (a valid "no flags, empty mask" value) that we
    // fill in before use; the handler is an `extern "C"` fn with the SA_SIGINFO signature and
    // does only an atomic add, which is async-signal-safe.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(SandboxError::Sigaction(std::io::Error::last_os_error()));
    }
    let prog = outbound_filter()?;
    seccompiler::apply_filter_all_threads(&prog)?;
    Ok(())
}
