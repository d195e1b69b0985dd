//! The hardening sysctls `bulkhead-init` sets before anything else runs, and checks by reading
//! each back. A `Required` one that cannot be set halts the host; an `IfBuilt` one names a
//! feature this kernel may not have (its file is then absent, which is logged, never ignored
//! silently).

/// Whether the host may run without the setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Must be set and read back, or the host halts.
    Required,
    /// The kernel may not have the feature at all (the file is absent); when present it must be
    /// set like a required one.
    IfBuilt,
}

/// One setting: the path under `/proc/sys`, the value, and why.
#[derive(Debug, Clone, Copy)]
pub struct Sysctl {
    pub path: &'static str,
    pub value: &'static str,
    pub need: Need,
    pub why: &'static str,
}

const fn s(path: &'static str, value: &'static str, need: Need, why: &'static str) -> Sysctl {
    Sysctl {
        path,
        value,
        need,
        why,
    }
}

/// Every setting, in the order they are written. Yama's scope 3 cannot be lowered again.
pub const HARDENING: &[Sysctl] = &[
    s(
        "kernel/yama/ptrace_scope",
        "3",
        Need::Required,
        "no process may ptrace another (Yama: no attach)",
    ),
    s(
        "kernel/kptr_restrict",
        "2",
        Need::Required,
        "no kernel addresses in /proc",
    ),
    s(
        "kernel/dmesg_restrict",
        "1",
        Need::Required,
        "the kernel log needs CAP_SYSLOG",
    ),
    s(
        "kernel/randomize_va_space",
        "2",
        Need::Required,
        "full ASLR",
    ),
    s(
        "fs/protected_symlinks",
        "1",
        Need::Required,
        "no symlink races in shared directories",
    ),
    s(
        "fs/protected_hardlinks",
        "1",
        Need::Required,
        "no hardlinks to files one cannot write",
    ),
    s(
        "fs/protected_fifos",
        "2",
        Need::Required,
        "no FIFO races in shared directories",
    ),
    s(
        "fs/protected_regular",
        "2",
        Need::Required,
        "no regular-file races in shared directories",
    ),
    s(
        "fs/suid_dumpable",
        "0",
        Need::Required,
        "no core dumps of privileged processes",
    ),
    s(
        "net/ipv4/conf/all/accept_redirects",
        "0",
        Need::Required,
        "no ICMP redirects",
    ),
    s(
        "net/ipv4/conf/default/accept_redirects",
        "0",
        Need::Required,
        "no ICMP redirects",
    ),
    s(
        "net/ipv4/conf/all/send_redirects",
        "0",
        Need::Required,
        "the host is not a router",
    ),
    s(
        "net/ipv4/conf/all/accept_source_route",
        "0",
        Need::Required,
        "no source routing",
    ),
    s(
        "net/ipv4/conf/all/rp_filter",
        "1",
        Need::Required,
        "strict reverse-path filter",
    ),
    s(
        "net/ipv4/tcp_syncookies",
        "1",
        Need::Required,
        "SYN floods do not fill the backlog",
    ),
    s(
        "net/ipv4/icmp_echo_ignore_broadcasts",
        "1",
        Need::Required,
        "no smurf amplification",
    ),
    // Port unreachable (type 3) is not rate-limited (mask 0x1818 without bit 3), so a UDP scan of
    // the host gets an answer for every closed port: "nothing open on UDP" is checkable.
    s(
        "net/ipv4/icmp_ratemask",
        "6160",
        Need::Required,
        "closed UDP ports answer a scan promptly",
    ),
    s(
        "kernel/perf_event_paranoid",
        "3",
        Need::IfBuilt,
        "no perf events for anyone without CAP_PERFMON (x86 always builds them)",
    ),
    s(
        "kernel/unprivileged_bpf_disabled",
        "1",
        Need::IfBuilt,
        "no BPF (not built here)",
    ),
    s(
        "kernel/kexec_load_disabled",
        "1",
        Need::IfBuilt,
        "no kexec (not built here)",
    ),
    s(
        "kernel/sysrq",
        "0",
        Need::IfBuilt,
        "no magic SysRq (not built here)",
    ),
    s(
        "user/max_user_namespaces",
        "0",
        Need::IfBuilt,
        "no user namespaces",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_relative_and_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for s in HARDENING {
            assert!(
                !s.path.starts_with('/') && !s.path.contains(".."),
                "{}",
                s.path
            );
            assert!(seen.insert(s.path), "{} twice", s.path);
        }
        assert_eq!(HARDENING[0].path, "kernel/yama/ptrace_scope");
    }
}
