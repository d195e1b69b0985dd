//! Seccomp filters from allow-lists given as data.
//!
//! A [`Filter`] is plain data: a name, tables of [`Rule`]s, the action for a listed call and
//! the action for everything else. [`Filter::compile`] turns it into a BPF program;
//! [`apply`] installs one on the calling thread. Argument conditions compare the low 32 bits
//! of one argument (ioctl request numbers, prctl options, address families all fit), which is
//! what every Bulkhead filter needs.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::HardenError;

/// What the kernel does with a system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The call runs.
    Allow,
    /// The whole process dies of SIGSYS.
    KillProcess,
    /// The call does not run; the thread gets SIGSYS (see
    /// [`install_trap_counter`](crate::install_trap_counter)).
    Trap,
    /// The call does not run and returns this errno.
    Errno(i32),
}

/// Which argument values a [`Rule`] matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Args {
    /// Any arguments.
    Any,
    /// Argument `index` (its low 32 bits) equals one of `values`.
    OneOf { index: u8, values: &'static [u64] },
    /// Argument `index` (its low 32 bits) differs from `value`.
    Not { index: u8, value: u64 },
}

/// One entry of an allow-list (or deny-list): a system call number and the arguments it
/// matches with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub syscall: i64,
    pub args: Args,
}

impl Rule {
    /// `syscall` with any arguments.
    pub const fn any(syscall: i64) -> Self {
        Rule {
            syscall,
            args: Args::Any,
        }
    }

    /// `syscall` when argument `index` is one of `values`.
    pub const fn arg_one_of(syscall: i64, index: u8, values: &'static [u64]) -> Self {
        Rule {
            syscall,
            args: Args::OneOf { index, values },
        }
    }

    /// `syscall` when argument `index` is not `value`.
    pub const fn arg_not(syscall: i64, index: u8, value: u64) -> Self {
        Rule {
            syscall,
            args: Args::Not { index, value },
        }
    }
}

/// A seccomp filter as data. A call matched by any rule of any table gets `listed`; every
/// other call gets `otherwise`. Several rules for one syscall are alternatives: the call is
/// listed if any of them matches (so an [`Args::Any`] rule makes the others moot).
#[derive(Clone, Copy, Debug)]
pub struct Filter {
    /// Names the filter in errors.
    pub name: &'static str,
    pub tables: &'static [&'static [Rule]],
    pub listed: Action,
    pub otherwise: Action,
}

impl Filter {
    /// Every syscall number that appears in the filter's tables (with or without argument
    /// conditions), sorted.
    pub fn syscalls(&self) -> Vec<i64> {
        let mut v: Vec<i64> = self.rules().map(|r| r.syscall).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Whether `syscall` is listed with no condition on its arguments.
    pub fn lists_unconditionally(&self, syscall: i64) -> bool {
        self.rules()
            .any(|r| r.syscall == syscall && r.args == Args::Any)
    }

    fn rules(&self) -> impl Iterator<Item = &'static Rule> + '_ {
        self.tables.iter().flat_map(|t| t.iter())
    }

    /// Compiles the filter for the architecture this was built for.
    pub fn compile(&self) -> Result<BpfProgram, HardenError> {
        // `None`: listed with any arguments; `Some(rules)`: listed when one of them matches.
        let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
        for rule in self.rules() {
            let conditional = self.seccomp_rules(rule)?;
            let entry = map.entry(rule.syscall).or_insert_with(|| Some(Vec::new()));
            match (entry.as_mut(), conditional) {
                (Some(list), Some(more)) => list.extend(more),
                (_, None) => *entry = None,
                (None, Some(_)) => {}
            }
        }
        let rules = map
            .into_iter()
            .map(|(nr, r)| (nr, r.unwrap_or_default()))
            .collect();
        let compiled = SeccompFilter::new(
            rules,
            self.action(self.otherwise)?,
            self.action(self.listed)?,
            target_arch()?,
        )
        .and_then(BpfProgram::try_from)
        .map_err(|source| HardenError::Compile {
            filter: self.name,
            source,
        })?;
        Ok(compiled)
    }

    /// Compiles the filter and installs it on the calling thread (threads it creates later
    /// inherit it).
    pub fn install(&self) -> Result<(), HardenError> {
        apply(&self.compile()?)
    }

    /// The seccompiler rules of one entry; `None` for "any arguments".
    fn seccomp_rules(&self, rule: &Rule) -> Result<Option<Vec<SeccompRule>>, HardenError> {
        let err = |source| HardenError::Rule {
            filter: self.name,
            syscall: rule.syscall,
            source,
        };
        let one = |index: u8, op: SeccompCmpOp, value: u64| {
            SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(err)
        };
        Ok(match rule.args {
            Args::Any => None,
            Args::OneOf { index, values } => Some(
                values
                    .iter()
                    .map(|v| one(index, SeccompCmpOp::Eq, *v))
                    .collect::<Result<_, _>>()?,
            ),
            Args::Not { index, value } => Some(vec![one(index, SeccompCmpOp::Ne, value)?]),
        })
    }

    fn action(&self, action: Action) -> Result<SeccompAction, HardenError> {
        Ok(match action {
            Action::Allow => SeccompAction::Allow,
            Action::KillProcess => SeccompAction::KillProcess,
            Action::Trap => SeccompAction::Trap,
            Action::Errno(errno) => {
                SeccompAction::Errno(u32::try_from(errno).map_err(|_| HardenError::BadErrno {
                    filter: self.name,
                    errno,
                })?)
            }
        })
    }
}

/// The seccomp target of this build.
pub fn target_arch() -> Result<TargetArch, HardenError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| HardenError::Arch(std::env::consts::ARCH))
}

/// Installs `program` on the calling thread (also sets no_new_privs, which seccomp needs
/// without CAP_SYS_ADMIN). Threads created afterwards inherit it; it cannot be removed.
pub fn apply(program: &BpfProgram) -> Result<(), HardenError> {
    seccompiler::apply_filter(program).map_err(HardenError::Apply)
}

/// Installs `program` on every thread of the process at once (seccomp TSYNC).
pub fn apply_all_threads(program: &BpfProgram) -> Result<(), HardenError> {
    seccompiler::apply_filter_all_threads(program).map_err(HardenError::Apply)
}

/// The system calls that open a path. libc sometimes tries them on its own (glibc reads
/// `/sys/devices/system/cpu/online` when a new thread gets its own malloc arena), so a daemon
/// that must open nothing answers them with an errno ([`deny_opens`]) rather than dying.
pub const OPEN_SYSCALLS: &[Rule] = &[
    Rule::any(libc::SYS_open),
    Rule::any(libc::SYS_openat),
    Rule::any(libc::SYS_openat2),
    Rule::any(libc::SYS_creat),
];

/// A filter named `name` that answers every [`OPEN_SYSCALLS`] call with EACCES and allows the
/// rest: stacked under a daemon's allow-list (which decides about the rest), an open fails
/// instead of killing the process, and nothing is opened either way.
pub const fn deny_opens(name: &'static str) -> Filter {
    Filter {
        name,
        tables: &[OPEN_SYSCALLS],
        listed: Action::Errno(libc::EACCES),
        otherwise: Action::Allow,
    }
}

/// Sets no_new_privs, compiles every filter of `stack`, then installs them in order on the
/// calling thread (threads created afterwards inherit them). Nothing is installed unless all
/// compile. The kernel applies the most restrictive verdict of all installed filters. Call
/// before any other thread exists.
pub fn install_stack(stack: &[&Filter]) -> Result<(), HardenError> {
    let programs = stack
        .iter()
        .map(|f| f.compile())
        .collect::<Result<Vec<_>, _>>()?;
    install_compiled(&programs)
}

/// Sets no_new_privs and installs already compiled filters in order on the calling thread:
/// the half of [`install_stack`] that allocates nothing (a forked child may call it).
pub fn install_compiled(programs: &[BpfProgram]) -> Result<(), HardenError> {
    crate::no_new_privs()?;
    for p in programs {
        apply(p)?;
    }
    Ok(())
}

/// Compiles every filter of a binary: what its `--self-test` runs before the host takes
/// customer work. Fails with the first filter that does not compile.
pub fn self_test(filters: &[&Filter]) -> Result<(), HardenError> {
    for f in filters {
        f.compile()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fork::in_child;

    const BASE: &[Rule] = &[
        Rule::any(libc::SYS_exit_group),
        Rule::any(libc::SYS_exit),
        Rule::any(libc::SYS_getpid),
        Rule::any(libc::SYS_rt_sigreturn),
    ];
    /// fcntl only with F_GETFD or F_GETFL.
    const FCNTL: &[Rule] = &[Rule::arg_one_of(
        libc::SYS_fcntl,
        1,
        &[libc::F_GETFD as u64, libc::F_GETFL as u64],
    )];
    static ALLOW: Filter = Filter {
        name: "test-allow",
        tables: &[BASE, FCNTL],
        listed: Action::Allow,
        otherwise: Action::KillProcess,
    };
    const SOCKETS: &[Rule] = &[Rule::arg_not(libc::SYS_socket, 0, libc::AF_UNIX as u64)];
    static NO_INET_EPERM: Filter = Filter {
        name: "test-errno",
        tables: &[SOCKETS],
        listed: Action::Errno(libc::EPERM),
        otherwise: Action::Allow,
    };
    static NO_INET_TRAP: Filter = Filter {
        name: "test-trap",
        tables: &[SOCKETS],
        listed: Action::Trap,
        otherwise: Action::Allow,
    };

    /// Installs `filter` in a child, then runs `attempt`; returns how the child ended.
    fn attempt_under(filter: &Filter, attempt: fn() -> i32) -> Result<i32, i32> {
        // Compiled before fork: the child only makes system calls.
        let bpf = filter.compile().expect("compiles");
        in_child(move || {
            if apply(&bpf).is_err() {
                return 100;
            }
            attempt()
        })
    }

    fn socket(family: i32) -> i32 {
        // SAFETY: plain system call with integer arguments.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            return 0;
        }
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn every_test_filter_compiles() {
        self_test(&[&ALLOW, &NO_INET_EPERM, &NO_INET_TRAP]).expect("compile");
        assert_eq!(ALLOW.syscalls(), {
            let mut v = vec![
                libc::SYS_exit_group,
                libc::SYS_exit,
                libc::SYS_getpid,
                libc::SYS_rt_sigreturn,
                libc::SYS_fcntl,
            ];
            v.sort_unstable();
            v
        });
        assert!(ALLOW.lists_unconditionally(libc::SYS_getpid));
        assert!(!ALLOW.lists_unconditionally(libc::SYS_fcntl));
    }

    #[test]
    fn bad_filters_are_refused_with_their_name() {
        static SAME: Filter = Filter {
            name: "same-actions",
            tables: &[BASE],
            listed: Action::Allow,
            otherwise: Action::Allow,
        };
        assert!(matches!(
            SAME.compile(),
            Err(HardenError::Compile {
                filter: "same-actions",
                ..
            })
        ));
        static NEG: Filter = Filter {
            name: "neg",
            tables: &[BASE],
            listed: Action::Errno(-1),
            otherwise: Action::Allow,
        };
        assert!(matches!(
            NEG.compile(),
            Err(HardenError::BadErrno { errno: -1, .. })
        ));
        const BAD_ARG: &[Rule] = &[Rule::arg_not(libc::SYS_socket, 9, 0)];
        static ARG: Filter = Filter {
            name: "bad-arg",
            tables: &[BAD_ARG],
            listed: Action::Allow,
            otherwise: Action::KillProcess,
        };
        assert!(matches!(
            ARG.compile(),
            Err(HardenError::Rule {
                filter: "bad-arg",
                syscall: libc::SYS_socket,
                ..
            })
        ));
    }

    #[test]
    fn unlisted_call_kills_with_sigsys() {
        assert_eq!(
            attempt_under(&ALLOW, || {
                // SAFETY: getpid has no arguments.
                unsafe { libc::getpid() };
                0
            }),
            Ok(0),
            "a listed call must run"
        );
        assert_eq!(
            attempt_under(&ALLOW, || {
                // SAFETY: getppid has no arguments; the filter kills before it runs.
                unsafe { libc::getppid() };
                1
            }),
            Err(libc::SIGSYS)
        );
    }

    #[test]
    fn argument_conditions_decide() {
        assert_eq!(
            attempt_under(&ALLOW, || {
                // SAFETY: F_GETFD on stdin with no further argument.
                unsafe { libc::fcntl(0, libc::F_GETFD) };
                0
            }),
            Ok(0)
        );
        assert_eq!(
            attempt_under(&ALLOW, || {
                // SAFETY: F_SETFD on stdin with an integer flag; the filter kills first.
                unsafe { libc::fcntl(0, libc::F_SETFD, 0) };
                1
            }),
            Err(libc::SIGSYS)
        );
    }

    static DENY_OPENS: Filter = deny_opens("test-open");

    /// The stack a card installs: opens answer EACCES, the allow-list still kills the rest.
    #[test]
    fn a_stack_denies_opens_and_kills_outside_the_allow_list() {
        const WITH_OPENS: &[&[Rule]] = &[BASE, OPEN_SYSCALLS];
        static ALLOW_OPENS: Filter = Filter {
            name: "test-allow-opens",
            tables: WITH_OPENS,
            listed: Action::Allow,
            otherwise: Action::KillProcess,
        };
        let open = || {
            // SAFETY: a NUL-terminated path; the result is only inspected.
            let fd = unsafe { libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) };
            match std::io::Error::last_os_error().raw_os_error() {
                Some(e) if fd < 0 => e,
                _ => 0,
            }
        };
        // Compiled before fork (as `install_stack` would): the child only makes system calls.
        let programs = [
            DENY_OPENS.compile().expect("compiles"),
            ALLOW_OPENS.compile().expect("compiles"),
        ];
        let stacked = |f: fn() -> i32| {
            let programs = &programs;
            in_child(move || match install_compiled(programs) {
                Ok(()) => f(),
                Err(_) => 100,
            })
        };
        assert_eq!(stacked(open), Ok(libc::EACCES));
        assert_eq!(
            stacked(|| {
                // SAFETY: getppid has no arguments; the allow-list kills before it runs.
                unsafe { libc::getppid() };
                1
            }),
            Err(libc::SIGSYS)
        );
    }

    #[test]
    fn listed_call_gets_the_errno() {
        assert_eq!(
            attempt_under(&NO_INET_EPERM, || socket(libc::AF_INET)),
            Ok(libc::EPERM)
        );
        assert_eq!(
            attempt_under(&NO_INET_EPERM, || socket(libc::AF_UNIX)),
            Ok(0)
        );
    }

    #[test]
    fn trapped_call_is_counted_and_fails() {
        let code = attempt_under(&NO_INET_TRAP, || {
            // The handler is installed after the filter here; it is the same process either
            // way, and the filter only matters at the call below.
            if crate::install_trap_counter().is_err() {
                return 101;
            }
            let before = crate::trapped_syscalls();
            let errno = socket(libc::AF_INET);
            match (errno, crate::trapped_syscalls() - before) {
                (libc::EPERM, 1) => 0,
                (_, 0) => 102,
                _ => 103,
            }
        });
        assert_eq!(code, Ok(0));
        // Without the handler, a trap is a fatal SIGSYS.
        assert_eq!(
            attempt_under(&NO_INET_TRAP, || socket(libc::AF_INET)),
            Err(libc::SIGSYS)
        );
    }
}
