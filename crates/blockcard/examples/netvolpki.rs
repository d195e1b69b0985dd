//! Bench-only helper for scripts/bench-netvol.sh: a throw-away cluster CA with the certificates
//! a network-volume benchmark needs — the storage node's (role service), the control plane's
//! (to create and grant the volume over the node's control API) and one host's (the card's and
//! the qemu-storage-daemon peer's NBD client certificate). The `bulkhead ca` CLI cannot issue
//! service certificates, so the benchmark uses the library the clusters use.
//!
//! netvolpki DIR NODE_NAME HOST_NAME

use bulkhead_tokens::pki::CaDir;
use bulkhead_tokens::Role;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let [_, dir, node, host] = a.as_slice() else {
        return Err("usage: netvolpki DIR NODE_NAME HOST_NAME".into());
    };
    let ca = CaDir::new(dir);
    ca.init()?;
    ca.issue(node, Role::Service, false)?;
    ca.issue("control", Role::ControlPlane, false)?;
    ca.issue(host, Role::Host, false)?;
    println!("{}", ca.root().display());
    Ok(())
}
