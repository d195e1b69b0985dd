//! One network namespace per simulated host, when the cluster runs as root.
//!
//! Each host's agent and controller (and so its hypervisors and block cards) run inside
//! `bulkhead-<tag>-host-N`, which has only its own loopback and one veth link to the
//! orchestrating namespace: `10.A.B.1/30` outside, `10.A.B.2/30` inside. The controller listens on
//! the inside address only, so the host is reachable from the control plane over that link and
//! from nowhere else, and nothing on the host can reach another host's loopback services (its
//! TPM emulator, its block-card sockets are unix sockets in its own directory).
//!
//! Set-up uses `ip` (iproute2). Without root, or if namespaces cannot be created here (a
//! container without `CAP_SYS_ADMIN`), the cluster says so and uses loopback ports.

use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// One host's namespace and link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNet {
    pub ns: String,
    /// The orchestrating side of the veth pair (deleted with the namespace).
    pub outer_if: String,
    /// The host's address (inside the namespace).
    pub host_ip: String,
    /// The orchestrator's address on the link.
    pub outer_ip: String,
    /// The host's address on the cluster's data network (the [`Fabric`]), once joined.
    pub fabric_ip: Option<String>,
}

/// The hosts' data network: one namespace holding a bridge, and one veth link per host into it.
/// Host `n` has `10.A.B.(128+n)/25` on its end (`fab0`); the bridge end is `bk{tag}f{n}`, where a
/// capture sees exactly what crosses between that host and the others. Net cards send their
/// sealed datagrams over it; nothing else of the cluster uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fabric {
    pub ns: String,
    /// The bridge ends of the host links, host 1 first.
    pub links: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("network namespace set-up: `ip {cmd}` failed: {detail}")]
pub struct NetnsError {
    pub cmd: String,
    pub detail: String,
}

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetnsError {
            cmd: args.join(" "),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError {
            cmd: args.join(" "),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Whether this process can build what [`setup`] builds here: root, `ip` present, and a
/// namespace with a veth pair into it allowed (a container may allow the one but not the other).
/// Probed once per process: the probe's names derive from the pid, so two probes running at
/// the same time (clusters started by parallel tests) would collide and one would wrongly
/// report "unavailable", silently putting its cluster on loopback.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(probe)
}

fn probe() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    let id = std::process::id() % 100_000;
    let probe = format!("bulkhead-probe-{id}");
    let (outer, inner) = (format!("bkprobe{id}o"), format!("bkprobe{id}i"));
    let ok = ip(&["netns", "add", &probe]).is_ok()
        && ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &probe,
        ])
        .is_ok()
        && ip(&["-n", &probe, "link", "set", "lo", "up"]).is_ok();
    let _ = ip(&["netns", "del", &probe]);
    let _ = ip(&["link", "del", &outer]);
    ok
}

/// A short tag naming this cluster's namespaces and links, stable for its directory.
pub fn tag_for(dir: &Path) -> String {
    let h = Sha256::digest(dir.as_os_str().as_encoded_bytes());
    hex::encode(h.get(..3).unwrap_or_default())
}

/// The cluster's /24 inside 10.0.0.0/8 (`10.A.B.0/24`): derived from the tag, moved along while
/// any interface here already uses it (another cluster running at the same time). Call once per
/// cluster, before [`setup`].
pub fn subnet(tag: &str) -> (u8, u8) {
    let raw = hex::decode(tag).unwrap_or_default();
    let mut a = raw.first().copied().unwrap_or(0) % 128 + 64;
    let b = raw.get(1).copied().unwrap_or(0);
    let in_use = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    for _ in 0..128 {
        if !in_use.contains(&format!(" 10.{a}.{b}.")) {
            break;
        }
        a = if a >= 191 { 64 } else { a + 1 };
    }
    (a, b)
}

/// Creates (replacing any stale one) the namespace and link of host `n` (1-based, ≤ 63) in the
/// cluster's `subnet`.
pub fn setup(tag: &str, subnet: (u8, u8), n: usize) -> Result<HostNet, NetnsError> {
    setup_named(tag, subnet, n, &format!("host-{n}"))
}

/// Turns host `n`'s namespace into a sealed host's (see `crate::sealed`): the inner end of its
/// veth link loses its address and joins a bridge with a new tap device (returned), so the VM
/// on that tap holds `net.host_ip` itself and the orchestrator reaches it over the same /30.
pub fn bridge_to_tap(tag: &str, n: usize, net: &HostNet) -> Result<String, NetnsError> {
    let inner_if = format!("bk{tag}i{n}");
    let tap = format!("bk{tag}t{n}");
    let ns = net.ns.as_str();
    ip(&["-n", ns, "addr", "flush", "dev", &inner_if])?;
    ip(&["-n", ns, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", ns, "link", "set", &inner_if, "master", "br0"])?;
    ip(&["-n", ns, "tuntap", "add", "dev", &tap, "mode", "tap"])?;
    ip(&["-n", ns, "link", "set", &tap, "master", "br0"])?;
    ip(&["-n", ns, "link", "set", &tap, "up"])?;
    ip(&["-n", ns, "link", "set", "br0", "up"])?;
    Ok(tap)
}

/// Slot number of the storage node's namespace and links (clear of any host's).
pub const STORAGE_SLOT: usize = 50;

/// As [`setup`], for slot `n` (≤ 63, its addresses) of a namespace named `bulkhead-<tag>-<name>`
/// (e.g. the storage node's, [`STORAGE_SLOT`]).
pub fn setup_named(
    tag: &str,
    (a, b): (u8, u8),
    n: usize,
    name: &str,
) -> Result<HostNet, NetnsError> {
    let ns = format!("bulkhead-{tag}-{name}");
    let outer_if = format!("bk{tag}o{n}");
    let inner_if = format!("bk{tag}i{n}");
    // Host n uses 10.a.b.(4n+1)/30 outside and 10.a.b.(4n+2)/30 inside.
    let base = u8::try_from(n.saturating_mul(4)).map_err(|_| NetnsError {
        cmd: "addr".into(),
        detail: format!("host number {n} too large"),
    })?;
    let outer_ip = format!("10.{a}.{b}.{}", base + 1);
    let host_ip = format!("10.{a}.{b}.{}", base + 2);
    let _ = ip(&["netns", "del", &ns]);
    let _ = ip(&["link", "del", &outer_if]);
    ip(&["netns", "add", &ns])?;
    let made = (|| {
        ip(&[
            "link", "add", &outer_if, "type", "veth", "peer", "name", &inner_if, "netns", &ns,
        ])?;
        ip(&["addr", "add", &format!("{outer_ip}/30"), "dev", &outer_if])?;
        ip(&["link", "set", &outer_if, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &inner_if,
        ])?;
        ip(&["-n", &ns, "link", "set", &inner_if, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])
    })();
    if let Err(e) = made {
        let _ = ip(&["netns", "del", &ns]);
        return Err(e);
    }
    tracing::info!(ns = %ns, host_ip = %host_ip, "host network namespace ready");
    Ok(HostNet {
        ns,
        outer_if,
        host_ip,
        outer_ip,
        fabric_ip: None,
    })
}

/// The fabric's namespace name for a cluster tag.
pub fn fabric_ns(tag: &str) -> String {
    format!("bulkhead-{tag}-fabric")
}

/// Builds the data network and joins every host of `hosts` to it (setting their `fabric_ip`).
pub fn setup_fabric(
    tag: &str,
    (a, b): (u8, u8),
    hosts: &mut [HostNet],
) -> Result<Fabric, NetnsError> {
    let ns = fabric_ns(tag);
    let _ = ip(&["netns", "del", &ns]);
    ip(&["netns", "add", &ns])?;
    let mut fabric = Fabric {
        ns: ns.clone(),
        links: Vec::new(),
    };
    let made = (|| {
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ns, "link", "set", "br0", "up"])?;
        for (i, h) in hosts.iter_mut().enumerate() {
            fabric.links.push(join_link(tag, (a, b), &ns, h, i + 1)?);
        }
        Ok(())
    })();
    if let Err(e) = made {
        let _ = ip(&["netns", "del", &ns]);
        return Err(e);
    }
    tracing::info!(ns = %ns, hosts = hosts.len(), "host data network ready");
    Ok(fabric)
}

/// Links namespace `net` to the fabric as slot `n` (`10.A.B.(128+n)/25` on its `fab0`); returns
/// the bridge end's name.
fn join_link(
    tag: &str,
    (a, b): (u8, u8),
    fabric_ns: &str,
    net: &mut HostNet,
    n: usize,
) -> Result<String, NetnsError> {
    let last = u8::try_from(128 + n).map_err(|_| NetnsError {
        cmd: "fabric".into(),
        detail: format!("slot {n} too large"),
    })?;
    let outer = format!("bk{tag}f{n}");
    ip(&[
        "-n", fabric_ns, "link", "add", &outer, "type", "veth", "peer", "name", "fab0", "netns",
        &net.ns,
    ])?;
    ip(&["-n", fabric_ns, "link", "set", &outer, "master", "br0"])?;
    ip(&["-n", fabric_ns, "link", "set", &outer, "up"])?;
    let addr = format!("10.{a}.{b}.{last}");
    ip(&[
        "-n",
        &net.ns,
        "addr",
        "add",
        &format!("{addr}/25"),
        "dev",
        "fab0",
    ])?;
    ip(&["-n", &net.ns, "link", "set", "fab0", "up"])?;
    net.fabric_ip = Some(addr);
    Ok(outer)
}

/// Joins one more namespace (e.g. the storage node's) to an existing fabric as slot `n`.
pub fn join_fabric(
    tag: &str,
    subnet: (u8, u8),
    fabric: &mut Fabric,
    net: &mut HostNet,
    n: usize,
) -> Result<(), NetnsError> {
    let link = join_link(tag, subnet, &fabric.ns.clone(), net, n)?;
    fabric.links.push(link);
    Ok(())
}

/// The `(A, B)` of the cluster's `10.A.B.0/24`, read back from its hosts' addresses.
pub fn subnet_of(nets: &[HostNet]) -> Option<(u8, u8)> {
    let ip: std::net::Ipv4Addr = nets.first()?.host_ip.parse().ok()?;
    let o = ip.octets();
    Some((o[1], o[2]))
}

/// Joins the orchestrating (root) namespace itself to the fabric as slot `n`: a veth whose
/// root end `bk<tag>s<n>` gets `10.A.B.(128+n)/25`. For a daemon that must reach services of
/// the root namespace (a Ceph cluster on loopback) and be reached by hosts. Returns the root
/// end's name (remove it with [`remove_link`]) and its address.
pub fn join_fabric_from_root(
    tag: &str,
    (a, b): (u8, u8),
    fabric: &mut Fabric,
    n: usize,
) -> Result<(String, String), NetnsError> {
    let last = u8::try_from(128 + n).map_err(|_| NetnsError {
        cmd: "fabric".into(),
        detail: format!("slot {n} too large"),
    })?;
    let root_end = format!("bk{tag}s{n}");
    let outer = format!("bk{tag}f{n}");
    let _ = ip(&["link", "del", &root_end]);
    ip(&[
        "link", "add", &root_end, "type", "veth", "peer", "name", &outer, "netns", &fabric.ns,
    ])?;
    ip(&["-n", &fabric.ns, "link", "set", &outer, "master", "br0"])?;
    ip(&["-n", &fabric.ns, "link", "set", &outer, "up"])?;
    let addr = format!("10.{a}.{b}.{last}");
    ip(&["addr", "add", &format!("{addr}/25"), "dev", &root_end])?;
    ip(&["link", "set", &root_end, "up"])?;
    fabric.links.push(outer);
    Ok((root_end, addr))
}

/// Deletes a link of the root namespace (its veth peer goes with it).
pub fn remove_link(name: &str) {
    let _ = ip(&["link", "del", name]);
}

/// Removes the fabric (its links go with the namespace).
pub fn teardown_fabric(f: &Fabric) {
    let _ = ip(&["netns", "del", &f.ns]);
}

/// Removes the namespace (its veth pair goes with it).
pub fn teardown(net: &HostNet) {
    let _ = ip(&["netns", "del", &net.ns]);
    let _ = ip(&["link", "del", &net.outer_if]);
}

/// `cmd` run inside the namespace (`ip netns exec NS …`: the same process, after `setns`).
pub fn command_in(net: &HostNet, program: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &net.ns]).arg(program);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two hosts joined by the fabric reach each other over it (and only the fabric carries
    /// their traffic: the management links are /30s to the orchestrator).
    #[test]
    fn fabric_joins_hosts() {
        if !available() {
            bulkhead_testkit::skip_or_fail("network namespaces need root and ip(8)");
            return;
        }
        let tag = format!("t{:05}", std::process::id() % 100_000);
        let subnet = subnet(&tag);
        let mut hosts = vec![
            setup(&tag, subnet, 1).expect("host 1"),
            setup(&tag, subnet, 2).expect("host 2"),
        ];
        let fabric = setup_fabric(&tag, subnet, &mut hosts).expect("fabric");
        let peer = hosts[1].fabric_ip.clone().expect("host 2 joined");
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                &hosts[0].ns,
                "ping",
                "-c",
                "1",
                "-W",
                "2",
                &peer,
            ])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        teardown_fabric(&fabric);
        for h in &hosts {
            teardown(h);
        }
        assert!(ok, "host 1 cannot reach host 2 at {peer} over the fabric");
        assert_eq!(fabric.links.len(), 2);
    }
}
