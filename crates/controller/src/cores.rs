//! Whole-core isolation: which host CPUs each instance's vCPUs may run on.
//!
//! The host's cores are read from sysfs (`/sys/devices/system/cpu`: the online CPUs and each
//! one's `thread_siblings_list`, so a core is the set of its SMT siblings). Some cores are
//! **reserved for the host** (configured as CPU ids, default CPU 0; each listed CPU reserves its
//! whole core): the controller, its launcher (keeper), every block and net card and the
//! hypervisors' own non-vCPU threads run there, and no instance is ever given them. Every other
//! core belongs to at most one instance at a time, with all its siblings: [`CoreAllocator`]
//! hands out whole cores until their threads cover the instance's vCPUs, preferring one package,
//! and refuses ([`CoreError::NotEnough`]) when whole cores are not free. The hypervisor pins vCPU
//! `i` to the `i mod n`-th CPU of the instance's cores (`bulkhead-hypervisor --pin`).
//!
//! The allocation is durable: each instance's CPUs are in the host record, and a restarted
//! controller re-claims them ([`CoreAllocator::claim`]) before it places anything.
//!
//! sysfs is the kernel's, not an untrusted peer's, but it is still parsed into checked values:
//! a malformed file is a typed error, never a panic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where the kernel describes the CPUs.
pub const SYSFS_CPU: &str = "/sys/devices/system/cpu";
/// Highest CPU id handled: a `cpu_set_t` holds `CPU_SETSIZE` (1024) CPUs.
pub const MAX_CPU: usize = 1023;
/// Longest sysfs file read.
const MAX_SYSFS_FILE: usize = 4096;

/// How a host shares its cores between instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CoreIsolation {
    /// Whole cores per instance, vCPUs pinned, host processes on the host cores; an instance
    /// is refused when whole cores are not free.
    Dedicated,
    /// Nothing pinned or reserved: instances and host processes float over every CPU
    /// (development machines with too few cores; never a production host).
    Shared,
}

/// Why the host's cores could not be read, reserved, handed out or applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("reading {path}: {kind}")]
    Read {
        path: PathBuf,
        kind: std::io::ErrorKind,
    },
    #[error("{path} is not a CPU list or number")]
    Parse { path: PathBuf },
    #[error("CPU {0} is beyond the highest CPU id handled ({MAX_CPU})")]
    CpuOutOfRange(usize),
    #[error("no CPU is online")]
    NoCpus,
    #[error("host CPU {0} is not online")]
    NotOnline(usize),
    #[error("{vcpus} vCPUs need whole cores; {free_cores} free cores hold {free_threads} threads")]
    NotEnough {
        vcpus: u32,
        free_cores: usize,
        free_threads: usize,
    },
    #[error("an instance needs at least one vCPU")]
    NoVcpus,
    #[error("{0} already holds cores")]
    AlreadyHolds(String),
    #[error("the CPUs recorded for {0} are not whole, free instance cores of this host")]
    NotWholeFreeCores(String),
    #[error("sched_setaffinity of thread {tid}: {kind}")]
    Affinity { tid: i32, kind: std::io::ErrorKind },
}

/// One physical core: the host CPU ids of its hardware threads (sorted, at least one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Core {
    pub package: u32,
    pub cpus: Vec<usize>,
}

/// The host's online cores, ordered by their first CPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostTopology {
    cores: Vec<Core>,
}

fn read_small(path: &Path) -> Result<String, CoreError> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).map_err(|e| CoreError::Read {
        path: path.to_path_buf(),
        kind: e.kind(),
    })?;
    let mut s = String::new();
    f.take(u64::try_from(MAX_SYSFS_FILE).unwrap_or(u64::MAX))
        .read_to_string(&mut s)
        .map_err(|e| CoreError::Read {
            path: path.to_path_buf(),
            kind: e.kind(),
        })?;
    Ok(s)
}

/// Parses a sysfs CPU list such as `0-3,8,10-11` (every id at most [`MAX_CPU`]).
pub fn parse_cpu_list(s: &str) -> Option<BTreeSet<usize>> {
    let mut out = BTreeSet::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => {
                let a = part.parse::<usize>().ok()?;
                (a, a)
            }
        };
        if b < a || b > MAX_CPU {
            return None;
        }
        out.extend(a..=b);
    }
    Some(out)
}

/// Formats CPUs as a list (`0-3,8`), as sysfs and `/proc/*/status` write them.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut sorted: Vec<usize> = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while let Some(&start) = sorted.get(i) {
        let mut end = start;
        while sorted.get(i + 1) == Some(&(end + 1)) {
            end += 1;
            i += 1;
        }
        parts.push(if end == start {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

impl HostTopology {
    /// Reads `/sys/devices/system/cpu` (or a copy of it at `root`).
    pub fn from_sysfs(root: &Path) -> Result<Self, CoreError> {
        let list = |path: PathBuf| -> Result<BTreeSet<usize>, CoreError> {
            parse_cpu_list(&read_small(&path)?).ok_or(CoreError::Parse { path })
        };
        let online = list(root.join("online"))?;
        let mut cores: BTreeMap<usize, Core> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for cpu in &online {
            if seen.contains(cpu) {
                continue;
            }
            let topo = root.join(format!("cpu{cpu}/topology"));
            let siblings: BTreeSet<usize> = list(topo.join("thread_siblings_list"))?
                .intersection(&online)
                .copied()
                .collect();
            let pkg_path = topo.join("physical_package_id");
            // -1 on some virtual machines: any constant keeps the core in one group.
            let package = read_small(&pkg_path)?
                .trim()
                .parse::<i64>()
                .map_err(|_| CoreError::Parse { path: pkg_path })?;
            let package = u32::try_from(package).unwrap_or(u32::MAX);
            let mut cpus: Vec<usize> = siblings.into_iter().collect();
            if !cpus.contains(cpu) {
                cpus.push(*cpu);
                cpus.sort_unstable();
            }
            seen.extend(cpus.iter().copied());
            let first = cpus.first().copied().unwrap_or(*cpu);
            cores.insert(first, Core { package, cpus });
        }
        if cores.is_empty() {
            return Err(CoreError::NoCpus);
        }
        Ok(HostTopology {
            cores: cores.into_values().collect(),
        })
    }

    /// A topology given as its cores (tests, other hosts' descriptions).
    pub fn from_cores(mut cores: Vec<Core>) -> Self {
        cores.retain(|c| !c.cpus.is_empty());
        for c in &mut cores {
            c.cpus.sort_unstable();
        }
        cores.sort_by_key(|c| c.cpus.first().copied());
        HostTopology { cores }
    }

    pub fn cores(&self) -> &[Core] {
        &self.cores
    }
}

/// Hands out whole cores to instances; keeps the reserved host cores out of every hand-out.
#[derive(Clone, Debug)]
pub struct CoreAllocator {
    cores: Vec<Core>,
    /// Indexes into `cores` reserved for the host.
    host: BTreeSet<usize>,
    owner: Vec<Option<String>>,
}

impl CoreAllocator {
    /// Reserves for the host every core that holds one of `host_cpus`.
    pub fn new(topo: HostTopology, host_cpus: &[usize]) -> Result<Self, CoreError> {
        let mut host = BTreeSet::new();
        for cpu in host_cpus {
            if *cpu > MAX_CPU {
                return Err(CoreError::CpuOutOfRange(*cpu));
            }
            let i = topo
                .cores
                .iter()
                .position(|c| c.cpus.contains(cpu))
                .ok_or(CoreError::NotOnline(*cpu))?;
            host.insert(i);
        }
        let n = topo.cores.len();
        Ok(CoreAllocator {
            cores: topo.cores,
            host,
            owner: vec![None; n],
        })
    }

    /// Every CPU of the reserved host cores (sorted).
    pub fn host_cpus(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .host
            .iter()
            .filter_map(|i| self.cores.get(*i))
            .flat_map(|c| c.cpus.iter().copied())
            .collect();
        v.sort_unstable();
        v
    }

    fn free(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.cores.len()).filter(|i| !self.host.contains(i) && self.owner[*i].is_none())
    }

    /// Cores instances may ever have (all but the host's).
    pub fn instance_cores(&self) -> usize {
        self.cores.len().saturating_sub(self.host.len())
    }

    /// Hardware threads of the instance cores (the host's vCPU capacity).
    pub fn instance_threads(&self) -> usize {
        (0..self.cores.len())
            .filter(|i| !self.host.contains(i))
            .map(|i| self.cores[i].cpus.len())
            .sum()
    }

    /// Cores neither reserved nor owned.
    pub fn free_cores(&self) -> usize {
        self.free().count()
    }

    /// Hardware threads of the free cores.
    pub fn free_threads(&self) -> usize {
        self.free().map(|i| self.cores[i].cpus.len()).sum()
    }

    /// The CPUs `owner` holds (sorted; empty if none).
    pub fn cpus_of(&self, owner: &str) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.cores.len())
            .filter(|i| self.owner[*i].as_deref() == Some(owner))
            .flat_map(|i| self.cores[i].cpus.iter().copied())
            .collect();
        v.sort_unstable();
        v
    }

    /// Gives `owner` whole cores whose threads cover `vcpus`, all from one package when one
    /// can hold them. Returns their CPUs in core order: vCPU `i` is pinned to entry `i mod n`.
    pub fn allocate(&mut self, owner: &str, vcpus: u32) -> Result<Vec<usize>, CoreError> {
        if vcpus == 0 {
            return Err(CoreError::NoVcpus);
        }
        if self.owner.iter().any(|o| o.as_deref() == Some(owner)) {
            return Err(CoreError::AlreadyHolds(owner.to_owned()));
        }
        let want = usize::try_from(vcpus).unwrap_or(usize::MAX);
        let take = |cands: &[usize]| -> Option<Vec<usize>> {
            let mut got = Vec::new();
            let mut threads = 0usize;
            for i in cands {
                if threads >= want {
                    break;
                }
                threads += self.cores[*i].cpus.len();
                got.push(*i);
            }
            (threads >= want).then_some(got)
        };
        let free: Vec<usize> = self.free().collect();
        let mut by_pkg: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for i in &free {
            by_pkg.entry(self.cores[*i].package).or_default().push(*i);
        }
        let pick = by_pkg
            .values()
            .find_map(|v| take(v))
            .or_else(|| take(&free))
            .ok_or(CoreError::NotEnough {
                vcpus,
                free_cores: free.len(),
                free_threads: self.free_threads(),
            })?;
        for i in &pick {
            self.owner[*i] = Some(owner.to_owned());
        }
        Ok(pick
            .iter()
            .flat_map(|i| self.cores[*i].cpus.iter().copied())
            .collect())
    }

    /// Gives `owner` exactly the cores `cpus` names (a recorded allocation, re-claimed by a
    /// restarted controller): they must be whole instance cores that nobody holds.
    pub fn claim(&mut self, owner: &str, cpus: &[usize]) -> Result<(), CoreError> {
        let refused = || CoreError::NotWholeFreeCores(owner.to_owned());
        if self.owner.iter().any(|o| o.as_deref() == Some(owner)) {
            return Err(CoreError::AlreadyHolds(owner.to_owned()));
        }
        let wanted: BTreeSet<usize> = cpus.iter().copied().collect();
        if wanted.is_empty() || wanted.len() != cpus.len() {
            return Err(refused());
        }
        let mut idx = BTreeSet::new();
        for cpu in &wanted {
            let i = self
                .cores
                .iter()
                .position(|c| c.cpus.contains(cpu))
                .ok_or_else(refused)?;
            if self.host.contains(&i) || self.owner[i].is_some() {
                return Err(refused());
            }
            if !self.cores[i].cpus.iter().all(|c| wanted.contains(c)) {
                return Err(refused());
            }
            idx.insert(i);
        }
        for i in idx {
            self.owner[i] = Some(owner.to_owned());
        }
        Ok(())
    }

    /// Returns `owner`'s cores to the pool; how many.
    pub fn release(&mut self, owner: &str) -> usize {
        let mut n = 0;
        for o in &mut self.owner {
            if o.as_deref() == Some(owner) {
                *o = None;
                n += 1;
            }
        }
        n
    }
}

/// Restricts every thread of this process to `cpus` (the host cores). Run by the controller
/// and by its launcher at start, before their sandboxes; every process the launcher starts
/// (hypervisors, block and net cards) inherits it. A hypervisor then moves only its vCPU
/// threads onto the instance's cores.
pub fn confine_process(cpus: &[usize]) -> Result<(), CoreError> {
    let mut set = CpuSet::new();
    for cpu in cpus {
        set.add(*cpu)?;
    }
    let tasks = Path::new("/proc/self/task");
    let dir = std::fs::read_dir(tasks).map_err(|e| CoreError::Read {
        path: tasks.to_path_buf(),
        kind: e.kind(),
    })?;
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        set.apply(tid)?;
    }
    Ok(())
}

/// A `cpu_set_t` built only through checked indexes.
struct CpuSet(libc::cpu_set_t);

impl CpuSet {
    fn new() -> Self {
        // SAFETY: `cpu_set_t` is a plain bitmask; all-zero is the empty set.
        CpuSet(unsafe { std::mem::zeroed() })
    }

    fn add(&mut self, cpu: usize) -> Result<(), CoreError> {
        if cpu > MAX_CPU {
            return Err(CoreError::CpuOutOfRange(cpu));
        }
        // SAFETY: `cpu < CPU_SETSIZE` was checked just above, so the bit is inside the set.
        unsafe { libc::CPU_SET(cpu, &mut self.0) };
        Ok(())
    }

    fn apply(&self, tid: i32) -> Result<(), CoreError> {
        // SAFETY: `self.0` is a valid cpu_set_t of the size passed; the kernel only reads it.
        let rc = unsafe {
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &self.0)
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // A thread that ended since the directory was read is no longer ours to confine.
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(CoreError::Affinity {
                tid,
                kind: e.kind(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn synthetic(packages: u32, cores: u32, threads: usize) -> HostTopology {
        let mut v = Vec::new();
        let mut cpu = 0;
        for p in 0..packages {
            for _ in 0..cores {
                v.push(Core {
                    package: p,
                    cpus: (0..threads).map(|t| cpu + t).collect(),
                });
                cpu += threads;
            }
        }
        HostTopology::from_cores(v)
    }

    fn set(v: &[usize]) -> BTreeSet<usize> {
        v.iter().copied().collect()
    }

    #[test]
    fn siblings_are_never_split_between_owners() {
        // 2 packages × 4 cores × 2 threads; CPU 1 (a sibling of 0) reserves core 0.
        let mut a = CoreAllocator::new(synthetic(2, 4, 2), &[1]).unwrap();
        assert_eq!(a.host_cpus(), vec![0, 1]);
        assert_eq!((a.instance_cores(), a.instance_threads()), (7, 14));
        let x = a.allocate("i-a", 6).unwrap();
        let y = a.allocate("i-b", 5).unwrap();
        assert_eq!(
            (x.len(), y.len()),
            (6, 6),
            "whole cores: 5 vCPUs take 3 cores"
        );
        assert!(set(&x).is_disjoint(&set(&y)));
        assert!(!x.contains(&0) && !x.contains(&1) && !y.contains(&0) && !y.contains(&1));
        // Each stayed within one package: x in package 0 (cores 1-3), y in package 1.
        assert_eq!(x, vec![2, 3, 4, 5, 6, 7]);
        assert_eq!(y, vec![8, 9, 10, 11, 12, 13]);
        assert_eq!(a.free_cores(), 1);
        assert_eq!(
            a.allocate("i-c", 3),
            Err(CoreError::NotEnough {
                vcpus: 3,
                free_cores: 1,
                free_threads: 2
            })
        );
        assert_eq!(a.release("i-a"), 3);
        assert_eq!(a.cpus_of("i-a"), Vec::<usize>::new());
        assert!(a.allocate("i-c", 3).is_ok());
    }

    #[test]
    fn one_vcpu_takes_a_whole_smt_core() {
        let mut a = CoreAllocator::new(synthetic(1, 2, 2), &[0]).unwrap();
        assert_eq!(a.allocate("i-a", 1).unwrap(), vec![2, 3]);
        assert!(matches!(
            a.allocate("i-b", 1),
            Err(CoreError::NotEnough { .. })
        ));
    }

    #[test]
    fn this_machine_shape_two_cores_no_smt() {
        let mut a = CoreAllocator::new(synthetic(1, 2, 1), &[0]).unwrap();
        assert_eq!(a.allocate("i-a", 1).unwrap(), vec![1]);
        assert!(a.allocate("i-b", 1).is_err());
        assert_eq!(
            a.allocate("i-a", 1),
            Err(CoreError::AlreadyHolds("i-a".into()))
        );
        assert_eq!(a.allocate("i-z", 0), Err(CoreError::NoVcpus));
    }

    #[test]
    fn claims_only_whole_free_instance_cores() {
        let mut a = CoreAllocator::new(synthetic(1, 4, 2), &[0]).unwrap();
        // Half a core, a host core, an unknown CPU: refused.
        for bad in [&[2][..], &[0, 1], &[99], &[], &[2, 2, 3]] {
            assert_eq!(
                a.claim("i-a", bad),
                Err(CoreError::NotWholeFreeCores("i-a".into()))
            );
        }
        a.claim("i-a", &[3, 2]).unwrap();
        assert_eq!(a.cpus_of("i-a"), vec![2, 3]);
        assert!(a.claim("i-b", &[2, 3]).is_err(), "held by i-a");
        assert_eq!(a.allocate("i-b", 2).unwrap(), vec![4, 5]);
    }

    #[test]
    fn unknown_host_cpu_is_refused() {
        assert_eq!(
            CoreAllocator::new(synthetic(1, 2, 1), &[7]).err(),
            Some(CoreError::NotOnline(7))
        );
        assert_eq!(
            CoreAllocator::new(synthetic(1, 2, 1), &[5000]).err(),
            Some(CoreError::CpuOutOfRange(5000))
        );
    }

    #[test]
    fn cpu_lists_parse_and_format() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n").unwrap(),
            set(&[0, 1, 2, 3, 8, 10, 11])
        );
        for bad in ["3-1", "x", "1-", "0-5000", "-1"] {
            assert!(parse_cpu_list(bad).is_none(), "{bad}");
        }
        assert_eq!(format_cpu_list(&[11, 0, 1, 2, 3, 8, 10]), "0-3,8,10-11");
        assert_eq!(format_cpu_list(&[1]), "1");
        assert_eq!(format_cpu_list(&[]), "");
    }

    #[test]
    fn reads_a_sysfs_copy_with_smt() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("online"), "0-3\n").unwrap();
        for (cpu, sib) in [(0, "0,2"), (1, "1,3"), (2, "0,2"), (3, "1,3")] {
            let t = d.path().join(format!("cpu{cpu}/topology"));
            std::fs::create_dir_all(&t).unwrap();
            std::fs::write(t.join("thread_siblings_list"), format!("{sib}\n")).unwrap();
            std::fs::write(t.join("physical_package_id"), "0\n").unwrap();
        }
        let topo = HostTopology::from_sysfs(d.path()).unwrap();
        let cores: Vec<Vec<usize>> = topo.cores().iter().map(|c| c.cpus.clone()).collect();
        assert_eq!(cores, vec![vec![0, 2], vec![1, 3]]);
        std::fs::write(d.path().join("cpu3/topology/thread_siblings_list"), "junk").unwrap();
        // cpu3 is never read (cpu1 named it as a sibling); break cpu1's instead.
        std::fs::write(d.path().join("cpu1/topology/thread_siblings_list"), "junk").unwrap();
        assert!(matches!(
            HostTopology::from_sysfs(d.path()),
            Err(CoreError::Parse { .. })
        ));
    }

    #[test]
    fn reads_this_hosts_sysfs() {
        let t = HostTopology::from_sysfs(Path::new(SYSFS_CPU)).unwrap();
        let all: Vec<usize> = t.cores().iter().flat_map(|c| c.cpus.clone()).collect();
        assert_eq!(set(&all).len(), all.len(), "a CPU appears in two cores");
        assert!(CoreAllocator::new(t, &[0])
            .unwrap()
            .host_cpus()
            .contains(&0));
    }
}
