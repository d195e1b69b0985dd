//! Process-wide steps: no_new_privs, non-dumpable, no core dumps, privilege drop, fd hygiene.

use std::os::fd::RawFd;

use crate::{HardenError, Step};

fn prctl(step: Step, option: libc::c_int, arg: libc::c_ulong) -> Result<(), HardenError> {
    let zero: libc::c_ulong = 0;
    // SAFETY: the options used here (PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE) take integer
    // arguments only; no pointer is passed.
    let rc = unsafe { libc::prctl(option, arg, zero, zero, zero) };
    if rc != 0 {
        return Err(HardenError::last(step));
    }
    Ok(())
}

/// Sets no_new_privs: no `execve` from here on can gain privileges (setuid bits, file
/// capabilities), and seccomp filters may be installed without CAP_SYS_ADMIN. Inherited by
/// every thread and child created afterwards; cannot be unset.
pub fn no_new_privs() -> Result<(), HardenError> {
    prctl(Step::NoNewPrivs, libc::PR_SET_NO_NEW_PRIVS, 1)
}

/// Makes the process non-dumpable: no core dump, and no ptrace or `/proc/PID/mem` access by
/// anyone without CAP_SYS_PTRACE. A credential change resets this flag, so
/// [`drop_privileges`] sets it again.
pub fn set_non_dumpable() -> Result<(), HardenError> {
    prctl(Step::NonDumpable, libc::PR_SET_DUMPABLE, 0)
}

/// Sets RLIMIT_CORE to zero (soft and hard): no core file, even if the process were made
/// dumpable again.
pub fn lock_core_dumps() -> Result<(), HardenError> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `zero` is a valid rlimit that lives for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(HardenError::last(Step::CoreLimit));
    }
    Ok(())
}

/// Non-dumpable ([`set_non_dumpable`]) and no core files ([`lock_core_dumps`]): what a daemon
/// that will hold keys does first in `main`.
pub fn forbid_dumps() -> Result<(), HardenError> {
    set_non_dumpable()?;
    lock_core_dumps()
}

/// Locks every page mapped right now (the heap included) into RAM; memory mapped later (guest
/// memory) is not affected. Callers treat a failure as best effort and log it.
pub fn lock_current_memory() -> Result<(), HardenError> {
    // SAFETY: mlockall has no memory-safety preconditions.
    if unsafe { libc::mlockall(libc::MCL_CURRENT) } != 0 {
        return Err(HardenError::last(Step::LockMemory));
    }
    Ok(())
}

/// Drops to the ids a daemon was given (its `--uid`/`--gid`) with [`drop_privileges`]. Without
/// both, nothing changes, except that running as root is refused
/// ([`HardenError::RootWithoutIds`]): a daemon never keeps root by omission.
pub fn drop_privileges_if_given(uid: Option<u32>, gid: Option<u32>) -> Result<(), HardenError> {
    // SAFETY: geteuid cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    match (uid, gid) {
        (Some(u), Some(g)) => drop_privileges(u, g),
        _ if euid == 0 => Err(HardenError::RootWithoutIds),
        _ => Ok(()),
    }
}

/// Drops to `uid`/`gid`: real, effective and saved ids, and (when running as root) no
/// supplementary groups. Groups go first and the uid last, since after `setresuid` the
/// process may no longer change its groups. The result is read back and checked; then the
/// process is made non-dumpable again (the kernel resets the flag on a credential change).
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), HardenError> {
    // SAFETY: geteuid cannot fail and touches no memory.
    let was_root = unsafe { libc::geteuid() } == 0;
    if was_root {
        // SAFETY: an empty group list: a null pointer is allowed with a size of 0.
        if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
            return Err(HardenError::last(Step::SetGroups));
        }
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(HardenError::last(Step::SetResGid));
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(HardenError::last(Step::SetResUid));
    }
    let (got_uids, got_gids, groups) = credentials()?;
    if got_uids != [uid; 3] || got_gids != [gid; 3] || (was_root && groups != 0) {
        return Err(HardenError::DropNotVerified {
            uid,
            gid,
            got_uids,
            got_gids,
            groups,
        });
    }
    set_non_dumpable()
}

/// The process's (real, effective, saved) uids and gids and its number of supplementary
/// groups.
fn credentials() -> Result<([u32; 3], [u32; 3], usize), HardenError> {
    let (mut ru, mut eu, mut su) = (0, 0, 0);
    let (mut rg, mut eg, mut sg) = (0, 0, 0);
    // SAFETY: three valid, writable out-pointers each.
    if unsafe { libc::getresuid(&mut ru, &mut eu, &mut su) } != 0
        // SAFETY: as above.
        || unsafe { libc::getresgid(&mut rg, &mut eg, &mut sg) } != 0
    {
        return Err(HardenError::last(Step::ReadCredentials));
    }
    // SAFETY: a size of 0 only asks for the count; the null list is not written.
    let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let groups = usize::try_from(groups).map_err(|_| HardenError::last(Step::ReadCredentials))?;
    Ok(([ru, eu, su], [rg, eg, sg], groups))
}

/// Closes every fd above stderr except those in `keep`. Call early, while the process is
/// still single-threaded, so no other thread owns one of the fds closed here.
pub fn close_other_fds(keep: &[RawFd]) -> Result<(), HardenError> {
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|e| HardenError::Sys {
        step: Step::ListFds,
        errno: e.raw_os_error().unwrap_or(0),
    })?;
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2 && !keep.contains(fd))
        .collect();
    // The listing's own fd is in `fds` but already closed (the iterator was dropped): its
    // close fails with EBADF, which is harmless.
    for fd in fds {
        // SAFETY: closing an fd number this process owns; the caller guarantees nothing else
        // in the process still uses it.
        if unsafe { libc::close(fd) } != 0 {
            let err = HardenError::last(Step::CloseFd);
            if err.errno() != Some(libc::EBADF) {
                return Err(err);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fork::in_child;

    #[test]
    fn close_other_fds_keeps_only_what_is_asked() {
        let (a, b) = (pipe(), pipe());
        let code = in_child(|| {
            if close_other_fds(&[a.0]).is_err() {
                return 10;
            }
            // SAFETY: F_GETFD on integer fds only.
            let (kept, closed) = unsafe {
                (
                    libc::fcntl(a.0, libc::F_GETFD),
                    libc::fcntl(b.0, libc::F_GETFD),
                )
            };
            match (kept >= 0, closed < 0) {
                (true, true) => 0,
                _ => 11,
            }
        });
        assert_eq!(code, Ok(0));
    }

    #[test]
    fn no_new_privs_and_non_dumpable_show_in_status() {
        let code = in_child(|| {
            if no_new_privs().is_err() || set_non_dumpable().is_err() || lock_core_dumps().is_err()
            {
                return 10;
            }
            // SAFETY: PR_GET_* with no further arguments.
            let (nnp, dumpable) = unsafe {
                (
                    libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
                    libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0),
                )
            };
            match (nnp, dumpable) {
                (1, 0) => 0,
                _ => 11,
            }
        });
        assert_eq!(code, Ok(0));
    }

    /// As root: the drop lands on exactly the target ids, and root cannot be regained.
    #[test]
    fn drop_privileges_is_verified_and_final() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let code = in_child(|| {
            if drop_privileges(65534, 65534).is_err() {
                return 10;
            }
            // SAFETY: integer arguments only; this must fail now.
            if unsafe { libc::setresuid(0, 0, 0) } == 0 {
                return 11;
            }
            // SAFETY: PR_GET_DUMPABLE takes no further arguments.
            if unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } != 0 {
                return 12;
            }
            0
        });
        assert_eq!(code, Ok(0));
    }

    #[test]
    fn forbid_dumps_clears_dumpable_and_core_limit() {
        let code = in_child(|| {
            if forbid_dumps().is_err() {
                return 10;
            }
            // SAFETY: PR_GET_DUMPABLE takes no pointer.
            if unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } != 0 {
                return 11;
            }
            let mut lim = libc::rlimit {
                rlim_cur: 1,
                rlim_max: 1,
            };
            // SAFETY: `lim` is a valid out-pointer for the call.
            if unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) } != 0 {
                return 12;
            }
            if lim.rlim_cur != 0 || lim.rlim_max != 0 {
                return 13;
            }
            0
        });
        assert_eq!(code, Ok(0));
    }

    #[test]
    fn root_without_ids_is_refused_and_a_non_root_without_ids_is_left_alone() {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let code = in_child(move || {
            let none = drop_privileges_if_given(None, None);
            let half = drop_privileges_if_given(Some(65534), None);
            match (root, none, half) {
                (true, Err(HardenError::RootWithoutIds), Err(HardenError::RootWithoutIds)) => 0,
                (false, Ok(()), Ok(())) => 0,
                _ => 1,
            }
        });
        assert_eq!(code, Ok(0));
    }

    #[test]
    fn lock_current_memory_locks_or_names_mlockall() {
        let code = in_child(|| match lock_current_memory() {
            Ok(()) => 0,
            Err(HardenError::Sys {
                step: Step::LockMemory,
                ..
            }) => 0,
            Err(_) => 1,
        });
        assert_eq!(code, Ok(0));
    }

    /// Unprivileged: dropping to root fails at the step that the kernel refuses, with EPERM.
    #[test]
    fn failed_drop_names_step_and_errno() {
        let code = in_child(|| {
            // SAFETY: geteuid cannot fail.
            let root = unsafe { libc::geteuid() } == 0;
            // SAFETY: integer arguments only; become nobody first (as root) so the next
            // drop has to fail.
            if root && unsafe { libc::setresuid(65534, 65534, 65534) } != 0 {
                return 10;
            }
            match drop_privileges(0, 0) {
                Err(HardenError::Sys {
                    step: Step::SetResGid | Step::SetResUid,
                    errno: libc::EPERM,
                }) => 0,
                _ => 11,
            }
        });
        assert_eq!(code, Ok(0));
    }

    fn pipe() -> (RawFd, RawFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        (fds[0], fds[1])
    }
}
