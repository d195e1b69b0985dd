//! The seccomp filters really kill: a child that installs the vCPU filter and then tries to
//! open a socket, open a file or exec dies of SIGSYS.

use bulkhead_hypervisor::sandbox::{filter, ThreadRole};

fn dies_of_sigsys(role: ThreadRole, attempt: fn()) -> bool {
    let bpf = filter(role).expect("filter");
    // SAFETY: the child only runs async-signal-safe code (prctl, seccomp, one syscall) before
    // it either dies or calls _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: see above; the BPF program was compiled before fork.
        unsafe {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            let prog = libc::sock_fprog {
                len: u16::try_from(bpf.len()).expect("short filter"),
                filter: bpf.as_ptr() as *mut libc::sock_filter,
            };
            libc::syscall(
                libc::SYS_seccomp,
                1, /* SECCOMP_SET_MODE_FILTER */
                0,
                &prog as *const _,
            );
        }
        attempt();
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
}

#[test]
fn forbidden_calls_kill_the_process() {
    for role in [ThreadRole::Main, ThreadRole::Vcpu] {
        assert!(
            dies_of_sigsys(role, || {
                // SAFETY: plain syscall with integer arguments.
                unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
            }),
            "{role:?}: socket() was allowed"
        );
        assert!(
            dies_of_sigsys(role, || {
                // SAFETY: a valid NUL-terminated path.
                unsafe {
                    libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), 0)
                };
            }),
            "{role:?}: openat() was allowed"
        );
        assert!(
            dies_of_sigsys(role, || {
                let argv = [c"/bin/sh".as_ptr(), std::ptr::null()];
                // SAFETY: valid NUL-terminated path and NULL-terminated argv/envp.
                unsafe {
                    libc::syscall(
                        libc::SYS_execve,
                        c"/bin/sh".as_ptr(),
                        argv.as_ptr(),
                        std::ptr::null::<*const i8>(),
                    )
                };
            }),
            "{role:?}: execve() was allowed"
        );
    }
    // ioctl is limited to its request numbers: remapping guest memory is not among them.
    for role in [ThreadRole::Main, ThreadRole::Vcpu] {
        assert!(
            dies_of_sigsys(role, || {
                // SAFETY: ioctl on an invalid fd; seccomp decides before the fd is looked at.
                unsafe {
                    libc::syscall(
                        libc::SYS_ioctl,
                        -1,
                        bulkhead_hypervisor::sandbox::KVM_SET_USER_MEMORY_REGION,
                        0,
                    )
                };
            }),
            "{role:?}: KVM_SET_USER_MEMORY_REGION was allowed"
        );
        assert!(
            !dies_of_sigsys(role, || {
                // SAFETY: ioctl on an invalid fd: fails with EBADF.
                unsafe {
                    libc::syscall(
                        libc::SYS_ioctl,
                        -1,
                        bulkhead_hypervisor::sandbox::KVM_RUN,
                        0,
                    )
                };
            }),
            "{role:?}: KVM_RUN was refused"
        );
    }
    // And an allowed call does not kill.
    assert!(!dies_of_sigsys(ThreadRole::Vcpu, || {
        // SAFETY: getpid has no arguments.
        unsafe { libc::syscall(libc::SYS_getpid) };
    }));
}
