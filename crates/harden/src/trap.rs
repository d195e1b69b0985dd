//! The SIGSYS handler for [`Action::Trap`](crate::Action::Trap) filters: a trapped system call
//! does not run, fails with EPERM, and is counted, so the daemon can raise an alert instead of
//! dying silently.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{HardenError, Step};

static TRAPPED: AtomicU64 = AtomicU64::new(0);

/// System calls trapped by a seccomp filter since the process started.
pub fn trapped_syscalls() -> u64 {
    TRAPPED.load(Ordering::Relaxed)
}

extern "C" fn on_sigsys(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // Async-signal-safe: one atomic add and one store into the saved registers.
    TRAPPED.fetch_add(1, Ordering::Relaxed);
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

/// Installs the process-wide SIGSYS handler that makes a trapped system call fail with EPERM
/// and counts it (see [`trapped_syscalls`]). Without it, a trap kills the process.
pub fn install_trap_counter() -> Result<(), HardenError> {
    // SAFETY: `sa` is a zero-initialised sigaction (a valid "no flags, empty mask" value) that
    // is filled in before use; the handler is an `extern "C"` fn with the SA_SIGINFO signature
    // and does only an atomic add and a register store, both async-signal-safe.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(HardenError::last(Step::TrapHandler));
    }
    Ok(())
}
