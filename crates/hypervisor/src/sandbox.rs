//! The hypervisor's sandbox: per-thread seccomp filters, no_new_privs, non-dumpable, an
//! unprivileged uid/gid, and no stray file descriptors.
//!
//! This module holds the hypervisor's policy only, as data: one allow-list per thread role.
//! The mechanism (compiling, installing, dropping privileges) is `bulkhead-harden`.
//!
//! Filters kill the whole process on any system call outside the role's allow-list. None of
//! them allows `socket`, `connect`, `execve` or any `open`: after start-up the hypervisor can
//! neither reach the network nor open a file.

use bulkhead_harden::{Action, BpfProgram, Filter, Rule};

use crate::Error;

/// Which thread a filter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadRole {
    /// The main thread: serves the command channel, starts vCPU threads, wires devices.
    Main,
    /// A vCPU thread: runs KVM_RUN and emulates device registers.
    Vcpu,
    /// The vhost-user backend watchdog: shuts down the socket of a backend that did not
    /// answer in time (see `devices::watchdog`).
    BackendWatchdog,
}

/// System calls every thread needs (memory, futexes, signals, time, exit).
const COMMON: &[Rule] = &[
    Rule::any(libc::SYS_read),
    Rule::any(libc::SYS_write),
    Rule::any(libc::SYS_writev),
    Rule::any(libc::SYS_close),
    Rule::any(libc::SYS_futex),
    Rule::any(libc::SYS_mmap),
    Rule::any(libc::SYS_munmap),
    Rule::any(libc::SYS_mremap),
    Rule::any(libc::SYS_mprotect),
    Rule::any(libc::SYS_madvise),
    Rule::any(libc::SYS_brk),
    Rule::any(libc::SYS_rt_sigreturn),
    Rule::any(libc::SYS_rt_sigprocmask),
    Rule::any(libc::SYS_sigaltstack),
    Rule::any(libc::SYS_clock_gettime),
    Rule::any(libc::SYS_clock_nanosleep),
    Rule::any(libc::SYS_nanosleep),
    Rule::any(libc::SYS_sched_yield),
    Rule::any(libc::SYS_getrandom),
    Rule::any(libc::SYS_gettid),
    Rule::any(libc::SYS_getpid),
    Rule::any(libc::SYS_tgkill),
    Rule::any(libc::SYS_exit),
    Rule::any(libc::SYS_exit_group),
    Rule::any(libc::SYS_sched_getaffinity),
    Rule::any(libc::SYS_rseq),
];

/// Extra system calls of the main thread.
const MAIN: &[Rule] = &[
    Rule::any(libc::SYS_clone),
    Rule::any(libc::SYS_clone3),
    Rule::any(libc::SYS_set_robust_list),
    // Inherited by each new vCPU thread, which pins itself with it before its own filter.
    Rule::any(libc::SYS_sched_setaffinity),
    Rule::any(libc::SYS_rt_sigaction),
    Rule::any(libc::SYS_recvmsg),
    Rule::any(libc::SYS_sendmsg),
    Rule::any(libc::SYS_poll),
    Rule::any(libc::SYS_ppoll),
    Rule::any(libc::SYS_fcntl),
    Rule::any(libc::SYS_eventfd2),
    Rule::any(libc::SYS_prctl),
    Rule::any(libc::SYS_fstat),
    Rule::any(libc::SYS_statx),
    Rule::any(libc::SYS_newfstatat),
    Rule::any(libc::SYS_lseek),
    Rule::any(libc::SYS_pread64),
    Rule::any(libc::SYS_shutdown),
    // LiveUpdate: who made the hand-over socket (`SO_PEERCRED` only) and who our parent is.
    Rule::arg_one_of(libc::SYS_getsockopt, 2, &[libc::SO_PEERCRED as u64]),
    Rule::any(libc::SYS_getppid),
    // vCPU threads started after this filter install their own, narrower one. seccomp(2) can
    // only ever add restrictions.
    Rule::any(libc::SYS_seccomp),
];

/// Extra system calls of a vCPU thread. A vCPU thread activates devices when the guest driver
/// sets DRIVER_OK, which for vhost-user means messages on the already connected backend socket.
/// (A vCPU thread pins itself to its host CPU before it installs this filter, under the main
/// thread's inherited one; afterwards it can no longer move: no `sched_setaffinity` here.)
const VCPU: &[Rule] = &[
    Rule::any(libc::SYS_sendmsg),
    Rule::any(libc::SYS_recvmsg),
    Rule::any(libc::SYS_sendto),
    Rule::any(libc::SYS_recvfrom),
];

/// Extra system calls of the backend watchdog: ending a connection whose deadline passed.
const WATCHDOG: &[Rule] = &[Rule::any(libc::SYS_shutdown)];

const KVMIO: u64 = 0xae;

const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}

/// `_IOW(KVMIO, nr, T)`.
const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

/// `_IOWR(KVMIO, nr, T)`.
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
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

// Reads of the machine state for a live update (`_IOR`/`_IOWR` request numbers of the kernel's
// uapi, checked against kvm-ioctls' own in the tests below). Only reads: setting a state
// happens in the new process before its sandbox is up.
pub const KVM_GET_SREGS: u64 = ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>());
pub const KVM_GET_MSRS: u64 = iowr(0x88, std::mem::size_of::<kvm_bindings::kvm_msrs>());
pub const KVM_GET_LAPIC: u64 = ior(0x8e, std::mem::size_of::<kvm_bindings::kvm_lapic_state>());
pub const KVM_GET_MP_STATE: u64 = ior(0x98, std::mem::size_of::<kvm_bindings::kvm_mp_state>());
pub const KVM_GET_VCPU_EVENTS: u64 =
    ior(0x9f, std::mem::size_of::<kvm_bindings::kvm_vcpu_events>());
pub const KVM_GET_DEBUGREGS: u64 = ior(0xa1, std::mem::size_of::<kvm_bindings::kvm_debugregs>());
pub const KVM_GET_XSAVE: u64 = ior(0xa4, std::mem::size_of::<kvm_bindings::kvm_xsave>());
pub const KVM_GET_XCRS: u64 = ior(0xa6, std::mem::size_of::<kvm_bindings::kvm_xcrs>());
pub const KVM_GET_IRQCHIP: u64 = iowr(0x62, std::mem::size_of::<kvm_bindings::kvm_irqchip>());
pub const KVM_GET_CLOCK: u64 = ior(0x7c, std::mem::size_of::<kvm_bindings::kvm_clock_data>());
pub const KVM_GET_PIT2: u64 = ior(0x9f, std::mem::size_of::<kvm_bindings::kvm_pit_state2>());

/// The only ioctls any thread may issue once the sandbox is up: run a vCPU (and read its
/// registers for diagnostics), wire interrupts and notifications of hot-plugged devices, and
/// read (never set) the machine state for a live update. Everything that creates or reshapes
/// a VM (memory slots, vCPUs, CPUID, MSRs) happens before.
pub const IOCTLS: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_SET_GSI_ROUTING,
    KVM_IRQFD,
    KVM_IOEVENTFD,
    KVM_SIGNAL_MSI,
    KVM_GET_SREGS,
    KVM_GET_MSRS,
    KVM_GET_LAPIC,
    KVM_GET_MP_STATE,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_DEBUGREGS,
    KVM_GET_XSAVE,
    KVM_GET_XCRS,
    KVM_GET_IRQCHIP,
    KVM_GET_CLOCK,
    KVM_GET_PIT2,
];

/// ioctl only with the request numbers in [`IOCTLS`] (argument 1).
const IOCTL: &[Rule] = &[Rule::arg_one_of(libc::SYS_ioctl, 1, IOCTLS)];

/// The main thread's filter. It is inherited by vCPU threads it starts later, so it must also
/// hold everything a vCPU thread needs.
pub static MAIN_FILTER: Filter = Filter {
    name: "hypervisor-main",
    tables: &[COMMON, MAIN, VCPU, IOCTL],
    listed: Action::Allow,
    otherwise: Action::KillProcess,
};

/// A vCPU thread's filter, stacked on the main thread's.
pub static VCPU_FILTER: Filter = Filter {
    name: "hypervisor-vcpu",
    tables: &[COMMON, VCPU, IOCTL],
    listed: Action::Allow,
    otherwise: Action::KillProcess,
};

/// The backend watchdog's filter (on its own when the thread starts before the main thread's
/// sandbox, stacked on the main thread's otherwise).
pub static WATCHDOG_FILTER: Filter = Filter {
    name: "hypervisor-backend-watchdog",
    tables: &[COMMON, WATCHDOG],
    listed: Action::Allow,
    otherwise: Action::KillProcess,
};

/// Every filter of the hypervisor, for `--self-test`.
pub static FILTERS: &[&Filter] = &[&MAIN_FILTER, &VCPU_FILTER, &WATCHDOG_FILTER];

/// The filter of `role`, as data.
pub fn filter_of(role: ThreadRole) -> &'static Filter {
    match role {
        ThreadRole::Main => &MAIN_FILTER,
        ThreadRole::Vcpu => &VCPU_FILTER,
        ThreadRole::BackendWatchdog => &WATCHDOG_FILTER,
    }
}

/// The syscalls allowed for `role` (ioctl with conditions on its request number).
pub fn allowed(role: ThreadRole) -> Vec<i64> {
    filter_of(role).syscalls()
}

/// Compiles the filter for `role`.
pub fn filter(role: ThreadRole) -> Result<BpfProgram, Error> {
    Ok(filter_of(role).compile()?)
}

/// Installs the filter for `role` on the calling thread.
pub fn apply_thread_filter(role: ThreadRole) -> Result<(), Error> {
    Ok(filter_of(role).install()?)
}

/// Process-wide hardening done once, after every file the VM needs is open:
/// drop to `uid`/`gid` when running as root, then no_new_privs and non-dumpable.
pub fn harden_process(drop_to: Option<(u32, u32)>) -> Result<(), Error> {
    if let Some((uid, gid)) = drop_to {
        bulkhead_harden::drop_privileges(uid, gid)?;
    }
    bulkhead_harden::no_new_privs()?;
    bulkhead_harden::set_non_dumpable()?;
    Ok(())
}

/// Closes every fd above stderr except those in `keep`.
pub fn close_other_fds(keep: &[i32]) -> Result<(), Error> {
    Ok(bulkhead_harden::close_other_fds(keep)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_filter_allows_network_exec_or_open() {
        for role in [
            ThreadRole::Main,
            ThreadRole::Vcpu,
            ThreadRole::BackendWatchdog,
        ] {
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
        assert!(bulkhead_harden::self_test(FILTERS).is_ok());
    }

    #[test]
    fn the_backend_watchdog_may_only_shut_sockets_down() {
        let w = allowed(ThreadRole::BackendWatchdog);
        let main = allowed(ThreadRole::Main);
        assert!(w.iter().all(|s| main.contains(s)));
        assert!(w.contains(&libc::SYS_shutdown));
        for forbidden in [
            libc::SYS_ioctl,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_setsockopt,
        ] {
            assert!(!w.contains(&forbidden), "watchdog allows {forbidden}");
        }
        assert!(!allowed(ThreadRole::Vcpu).contains(&libc::SYS_shutdown));
    }

    #[test]
    fn ioctl_is_only_allowed_by_request_number() {
        for role in [ThreadRole::Main, ThreadRole::Vcpu] {
            assert!(allowed(role).contains(&libc::SYS_ioctl));
            assert!(!filter_of(role).lists_unconditionally(libc::SYS_ioctl));
        }
    }
}
