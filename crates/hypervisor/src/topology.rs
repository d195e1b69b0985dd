//! Whole-core CPU allocation.
//!
//! A fixed-size instance gets whole physical cores: both SMT siblings of a core go to the
//! same instance, and a core is never shared by two instances. The host topology is read from
//! sysfs; the allocator itself is pure so it can be tested on synthetic topologies.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::Error;

/// One physical core: the host CPU ids of its hardware threads.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Core {
    pub package: u32,
    pub core: u32,
    pub cpus: Vec<usize>,
}

/// The host's cores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostTopology {
    pub cores: Vec<Core>,
}

impl HostTopology {
    /// Reads `/sys/devices/system/cpu` (or a copy of it at `root`).
    pub fn from_sysfs(root: &Path) -> Result<Self, Error> {
        let online = std::fs::read_to_string(root.join("online"))
            .map_err(|e| Error::Topology(format!("reading online cpus: {e}")))?;
        let mut by_core: BTreeMap<(u32, u32), Vec<usize>> = BTreeMap::new();
        for cpu in parse_cpu_list(online.trim())? {
            let t = root.join(format!("cpu{cpu}/topology"));
            let read = |name: &str| -> Result<u32, Error> {
                std::fs::read_to_string(t.join(name))
                    .map_err(|e| Error::Topology(format!("cpu{cpu}/{name}: {e}")))?
                    .trim()
                    .parse()
                    .map_err(|_| Error::Topology(format!("cpu{cpu}/{name} is not a number")))
            };
            by_core
                .entry((read("physical_package_id")?, read("core_id")?))
                .or_default()
                .push(cpu);
        }
        Ok(HostTopology {
            cores: by_core
                .into_iter()
                .map(|((package, core), mut cpus)| {
                    cpus.sort_unstable();
                    Core {
                        package,
                        core,
                        cpus,
                    }
                })
                .collect(),
        })
    }

    /// Threads per core (the maximum over cores).
    pub fn threads_per_core(&self) -> usize {
        self.cores.iter().map(|c| c.cpus.len()).max().unwrap_or(1)
    }
}

/// Parses a sysfs CPU list such as `0-3,8,10-11`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, Error> {
    let mut out = BTreeSet::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let bad = || Error::Topology(format!("bad cpu list {s:?}"));
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if b < a || b - a > 4096 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(part.parse().map_err(|_| bad())?);
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// Hands out whole cores to owners (instances).
#[derive(Debug)]
pub struct CoreAllocator {
    topo: HostTopology,
    owner: Vec<Option<String>>,
    reserved: BTreeSet<usize>,
}

impl CoreAllocator {
    /// `reserved_cores` (by index) stay with the host (controller, cards).
    pub fn new(topo: HostTopology, reserved_cores: &[usize]) -> Self {
        let n = topo.cores.len();
        CoreAllocator {
            topo,
            owner: vec![None; n],
            reserved: reserved_cores.iter().copied().collect(),
        }
    }

    /// Cores neither reserved nor owned.
    pub fn free_cores(&self) -> usize {
        (0..self.owner.len())
            .filter(|i| self.owner[*i].is_none() && !self.reserved.contains(i))
            .count()
    }

    /// Gives `owner` `n` whole cores, preferring one package. Returns their CPUs.
    pub fn allocate(&mut self, owner: &str, n: usize) -> Result<Vec<Core>, Error> {
        if n == 0 {
            return Err(Error::Topology(
                "an instance needs at least one core".into(),
            ));
        }
        if self.owner.iter().any(|o| o.as_deref() == Some(owner)) {
            return Err(Error::Topology(format!("{owner} already holds cores")));
        }
        let free: Vec<usize> = (0..self.owner.len())
            .filter(|i| self.owner[*i].is_none() && !self.reserved.contains(i))
            .collect();
        // Prefer a package that can hold the whole instance (accurate L3/NUMA locality).
        let mut by_pkg: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for i in &free {
            by_pkg
                .entry(self.topo.cores[*i].package)
                .or_default()
                .push(*i);
        }
        let pick: Vec<usize> = by_pkg
            .values()
            .find(|v| v.len() >= n)
            .map(|v| v[..n].to_vec())
            .or_else(|| (free.len() >= n).then(|| free[..n].to_vec()))
            .ok_or_else(|| Error::Topology(format!("{n} cores wanted, {} free", free.len())))?;
        for i in &pick {
            self.owner[*i] = Some(owner.to_owned());
        }
        Ok(pick.iter().map(|i| self.topo.cores[*i].clone()).collect())
    }

    /// Returns `owner`'s cores to the pool.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(packages: u32, cores: u32, threads: usize) -> HostTopology {
        let mut v = Vec::new();
        let mut cpu = 0;
        for p in 0..packages {
            for c in 0..cores {
                v.push(Core {
                    package: p,
                    core: c,
                    cpus: (0..threads).map(|t| cpu + t).collect(),
                });
                cpu += threads;
            }
        }
        HostTopology { cores: v }
    }

    #[test]
    fn siblings_are_never_split_between_owners() {
        let mut a = CoreAllocator::new(synthetic(2, 4, 2), &[0]);
        let x = a.allocate("i-a", 3).expect("alloc");
        let y = a.allocate("i-b", 3).expect("alloc");
        let cx: BTreeSet<usize> = x.iter().flat_map(|c| c.cpus.clone()).collect();
        let cy: BTreeSet<usize> = y.iter().flat_map(|c| c.cpus.clone()).collect();
        assert!(cx.is_disjoint(&cy));
        assert!(x.iter().chain(&y).all(|c| c.cpus.len() == 2));
        assert!(
            !cx.contains(&0) && !cx.contains(&1),
            "reserved core handed out"
        );
        // Each instance stayed within one package.
        assert!(x.iter().all(|c| c.package == x[0].package));
        assert!(y.iter().all(|c| c.package == y[0].package));
        assert_eq!(a.free_cores(), 1);
        assert!(a.allocate("i-c", 2).is_err());
        assert_eq!(a.release("i-a"), 3);
        assert!(a.allocate("i-c", 2).is_ok());
    }

    #[test]
    fn refuses_double_allocation_and_zero() {
        let mut a = CoreAllocator::new(synthetic(1, 2, 1), &[]);
        assert!(a.allocate("i-a", 0).is_err());
        a.allocate("i-a", 1).expect("alloc");
        assert!(a.allocate("i-a", 1).is_err());
    }

    #[test]
    fn parses_cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11").expect("list"),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
    }

    #[test]
    fn reads_this_hosts_sysfs() {
        let t = HostTopology::from_sysfs(Path::new("/sys/devices/system/cpu")).expect("sysfs");
        assert!(!t.cores.is_empty());
        let all: Vec<usize> = t.cores.iter().flat_map(|c| c.cpus.clone()).collect();
        let unique: BTreeSet<usize> = all.iter().copied().collect();
        assert_eq!(unique.len(), all.len(), "a CPU appears in two cores");
    }
}
