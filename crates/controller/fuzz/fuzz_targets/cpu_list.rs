//! The sysfs CPU-list parser (`cores::parse_cpu_list`) and the whole-core allocator: any text
//! in, a bounded set or `None` out, never a panic; a parsed list formats back to a list that
//! parses to the same set. Then the remaining bytes drive allocate/claim/release on a topology
//! built from the first byte, and the allocator's invariants must hold after every step: no CPU
//! held by two instances, no host CPU ever handed out, and every holding made of whole cores.
#![no_main]

use std::collections::BTreeSet;

use bulkhead_controller::cores::{
    format_cpu_list, parse_cpu_list, Core, CoreAllocator, HostTopology,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(set) = parse_cpu_list(text) {
            let list: Vec<usize> = set.iter().copied().collect();
            assert_eq!(parse_cpu_list(&format_cpu_list(&list)), Some(set));
        }
    }
    let Some((&shape, ops)) = data.split_first() else {
        return;
    };
    // 1-8 cores of 1-4 threads, in 1-2 packages.
    let cores_n = usize::from(shape & 7) + 1;
    let threads = usize::from((shape >> 3) & 3) + 1;
    let packages = u32::from((shape >> 5) & 1) + 1;
    let cores: Vec<Core> = (0..cores_n)
        .map(|i| Core {
            package: u32::try_from(i).unwrap_or(0) % packages,
            cpus: (0..threads).map(|t| i * threads + t).collect(),
        })
        .collect();
    let topo = HostTopology::from_cores(cores.clone());
    let Ok(mut a) = CoreAllocator::new(topo, &[0]) else {
        return;
    };
    let host: BTreeSet<usize> = a.host_cpus().into_iter().collect();
    let owners = ["i-a", "i-b", "i-c", "i-d"];
    for op in ops.chunks(2) {
        let (&kind, arg) = match op {
            [k, x] => (k, *x),
            [k] => (k, 0),
            _ => continue,
        };
        let owner = owners[usize::from(kind >> 2) % owners.len()];
        match kind & 3 {
            0 => {
                let _ = a.allocate(owner, u32::from(arg & 15));
            }
            1 => {
                let want: Vec<usize> = (0..8)
                    .filter(|b| arg & (1 << b) != 0)
                    .flat_map(|b| (0..threads).map(move |t| b * threads + t))
                    .collect();
                let _ = a.claim(owner, &want);
            }
            _ => {
                a.release(owner);
            }
        }
        let mut seen = BTreeSet::new();
        for o in owners {
            let held = a.cpus_of(o);
            for c in &held {
                assert!(!host.contains(c), "host CPU {c} handed to {o}");
                assert!(seen.insert(*c), "CPU {c} held twice");
            }
            // Whole cores only.
            for core in &cores {
                let n = core.cpus.iter().filter(|c| held.contains(c)).count();
                assert!(n == 0 || n == core.cpus.len(), "{o} holds part of {core:?}");
            }
        }
    }
});
