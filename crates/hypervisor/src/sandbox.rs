//! The hypervisor's sandbox: per-thread seccomp filters, no_new_privs, non-dumpable, an
//! unprivileged uid/gid, and no stray file descriptors.
//!
//! Filters kill the whole process on any system call outside the role's allow-list. None of
//! them allows `socket`, `connect`, `execve` or any `open`: after start-up the hypervisor can
//! neither reach the network nor open a file.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::Error;

/// Which thread a filter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadRole {
    /// The main thread: serves the command channel, starts vCPU threads, wires devices.
    Main,
    /// A vCPU thread: runs KVM_RUN and emulates device registers.
    Vcpu,
}

/// System calls every thread needs (memory, futexes, signals, time, exit).
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_ioctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_rseq,
];

/// Extra system calls of the main thread.
const MAIN: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_sched_setaffinity,
    libc::SYS_rt_sigaction,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_fcntl,
    libc::SYS_eventfd2,
    libc::SYS_prctl,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_shutdown,
    // vCPU threads started after this filter install their own, narrower one. seccomp(2) can
    // only ever add restrictions.
    libc::SYS_seccomp,
];

/// Extra system calls of a vCPU thread. A vCPU thread activates devices when the guest driver
/// sets DRIVER_OK, which for vhost-user means messages on the already connected backend socket.
const VCPU: &[i64] = &[
    libc::SYS_sched_setaffinity,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
];

const KVMIO: u64 = 0xae;

const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}

/// `_IOW(KVMIO, nr, T)`.
const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

/// `_IOR(KVMIO, nr, T)`.
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

pub const KVM_RUN: u64 = io(0x80);
pub const KVM_GET_REGS: u64 = ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
pub const KVM_SET_GSI_ROUTING: u64 =
    iow(0x6a, std::mem::size_of::<kvm_bindings::kvm_irq_routing>());
pub const KVM_IRQFD: u64 = iow(0x76, std::mem::size_of::<kvm_bindings::kvm_irqfd>());
pub const KVM_IOEVENTFD: u64 = iow(0x79, std::mem::size_of::<kvm_bindings::kvm_ioeventfd>());
pub const KVM_SIGNAL_MSI: u64 = iow(0xa5, std::mem::size_of::<kvm_bindings::kvm_msi>());
/// Never allowed after set-up: remapping guest memory, new vCPUs or VMs.
pub const KVM_SET_USER_MEMORY_REGION: u64 = iow(
    0x46,
    std::mem::size_of::<kvm_bindings::kvm_userspace_memory_region>(),
);

/// The only ioctls any thread may issue once the sandbox is up: run a vCPU (and read its
/// registers for diagnostics), and wire interrupts and notifications of hot-plugged devices.
/// Everything that creates or reshapes a VM (memory slots, vCPUs, CPUID, MSRs) happens before.
pub const IOCTLS: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_SET_GSI_ROUTING,
    KVM_IRQFD,
    KVM_IOEVENTFD,
    KVM_SIGNAL_MSI,
];

/// The syscalls allowed for `role`.
pub fn allowed(role: ThreadRole) -> Vec<i64> {
    let mut v: Vec<i64> = COMMON.to_vec();
    match role {
        // The main thread's filter is inherited by vCPU threads it starts later, so it must
        // also hold everything a vCPU thread needs.
        ThreadRole::Main => {
            v.extend_from_slice(MAIN);
            v.extend_from_slice(VCPU);
        }
        ThreadRole::Vcpu => v.extend_from_slice(VCPU),
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// Compiles the filter for `role`.
pub fn filter(role: ThreadRole) -> Result<BpfProgram, Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed(role).into_iter().map(|s| (s, vec![])).collect();
    // ioctl only with the request numbers in IOCTLS.
    let ioctl_rules = IOCTLS
        .iter()
        .map(|nr| {
            let c = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *nr)
                .map_err(|e| Error::Sandbox(format!("seccomp condition: {e}")))?;
            SeccompRule::new(vec![c]).map_err(|e| Error::Sandbox(format!("seccomp rule: {e}")))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    rules.insert(libc::SYS_ioctl, ioctl_rules);
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| Error::Sandbox(format!("seccomp filter: {e}")))?;
    BpfProgram::try_from(f).map_err(|e| Error::Sandbox(format!("seccomp compile: {e}")))
}

/// Installs the filter for `role` on the calling thread.
pub fn apply_thread_filter(role: ThreadRole) -> Result<(), Error> {
    let bpf = filter(role)?;
    seccompiler::apply_filter(&bpf).map_err(|e| Error::Sandbox(format!("seccomp apply: {e}")))
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> Result<(), Error> {
    // SAFETY: prctl with integer arguments only; no pointers are passed.
    let rc = unsafe { libc::prctl(option, arg, 0, 0, 0) };
    if rc != 0 {
        return Err(Error::Sandbox(format!(
            "prctl({option}): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Process-wide hardening done once, after every file the VM needs is open:
/// drop to `uid`/`gid` when running as root, then no_new_privs and non-dumpable.
pub fn harden_process(drop_to: Option<(u32, u32)>) -> Result<(), Error> {
    if let Some((uid, gid)) = drop_to {
        // SAFETY: plain credential system calls with integer arguments; setgroups gets a null
        // pointer with a zero count, which clears the supplementary groups.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(Error::Sandbox(format!(
                    "dropping to {uid}:{gid}: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
    }
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1)?;
    prctl(libc::PR_SET_DUMPABLE, 0)?;
    Ok(())
}

/// Closes every fd above stderr except those in `keep`.
pub fn close_other_fds(keep: &[i32]) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2 && !keep.contains(fd))
        .collect();
    for fd in fds {
        // SAFETY: closing an fd number we own; the read_dir handle's own fd may already be
        // closed, in which case close returns EBADF harmlessly.
        unsafe {
            libc::close(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_filter_allows_network_exec_or_open() {
        for role in [ThreadRole::Main, ThreadRole::Vcpu] {
            let a = allowed(role);
            for forbidden in [
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_bind,
                libc::SYS_listen,
                libc::SYS_accept4,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_openat2,
                libc::SYS_ptrace,
                libc::SYS_process_vm_readv,
            ] {
                assert!(
                    !a.contains(&forbidden),
                    "{role:?} allows syscall {forbidden}"
                );
            }
        }
    }

    #[test]
    fn vcpu_filter_is_narrower_than_main() {
        let main = allowed(ThreadRole::Main);
        assert!(allowed(ThreadRole::Vcpu).iter().all(|s| main.contains(s)));
        assert!(filter(ThreadRole::Main).is_ok());
        assert!(filter(ThreadRole::Vcpu).is_ok());
    }
}
