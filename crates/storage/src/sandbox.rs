//! The node's confinement. It must keep spawning qemu-storage-daemon (and, for Ceph, `rbd`)
//! and connecting sockets, so its seccomp filter is a deny-list of what a storage node never
//! needs (kernel modules, mounts, namespaces, ptrace, kexec, BPF, keyrings, reboot, swap),
//! answered with EPERM; the child inherits it across exec, with no_new_privs.

use bulkhead_harden::{Action, Filter, HardenError, Rule};

const NEVER: &[Rule] = &[
    Rule::any(libc::SYS_ptrace),
    Rule::any(libc::SYS_process_vm_readv),
    Rule::any(libc::SYS_process_vm_writev),
    Rule::any(libc::SYS_mount),
    Rule::any(libc::SYS_umount2),
    Rule::any(libc::SYS_pivot_root),
    Rule::any(libc::SYS_chroot),
    Rule::any(libc::SYS_setns),
    Rule::any(libc::SYS_unshare),
    Rule::any(libc::SYS_init_module),
    Rule::any(libc::SYS_finit_module),
    Rule::any(libc::SYS_delete_module),
    Rule::any(libc::SYS_kexec_load),
    Rule::any(libc::SYS_kexec_file_load),
    Rule::any(libc::SYS_bpf),
    Rule::any(libc::SYS_perf_event_open),
    Rule::any(libc::SYS_add_key),
    Rule::any(libc::SYS_request_key),
    Rule::any(libc::SYS_keyctl),
    Rule::any(libc::SYS_reboot),
    Rule::any(libc::SYS_swapon),
    Rule::any(libc::SYS_swapoff),
    Rule::any(libc::SYS_acct),
    Rule::any(libc::SYS_settimeofday),
    Rule::any(libc::SYS_clock_settime),
    Rule::any(libc::SYS_iopl),
    Rule::any(libc::SYS_ioperm),
    Rule::any(libc::SYS_userfaultfd),
];

/// The deny-list filter of the node (and its engine child).
pub static NODE: Filter = Filter {
    name: "storage-node",
    tables: &[NEVER],
    listed: Action::Errno(libc::EPERM),
    otherwise: Action::Allow,
};

/// Every filter of the binary, for `--self-test`.
pub static FILTERS: &[&Filter] = &[&NODE];

/// Non-dumpable, no core dumps, no_new_privs, then the deny-list on every thread.
pub fn apply() -> Result<(), HardenError> {
    bulkhead_harden::set_non_dumpable()?;
    bulkhead_harden::lock_core_dumps()?;
    bulkhead_harden::no_new_privs()?;
    let program = NODE.compile()?;
    bulkhead_harden::apply_all_threads(&program)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        assert!(bulkhead_harden::self_test(FILTERS).is_ok());
    }
}
