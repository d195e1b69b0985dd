//! `bulkhead-netcard`: one process per instance network interface.

use bulkhead_netcard::datapath::{CardConfig, KeySource};
use bulkhead_netcard::encap::{CardId, KeyEpoch, PayloadKind, VpcId};
use bulkhead_netcard::frame::MacAddr;
use bulkhead_netcard::responder::InterfaceConfig;
use bulkhead_netcard::routes::{Route, RouteTable};
use bulkhead_netcard::secgroup::{Cidr, IngressRule};
use bulkhead_netcard::NetcardError;
use bulkhead_netcard::{tap, vhost};
use clap::{Parser, Subcommand};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "bulkhead-netcard", version, about = "The Bulkhead net card")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Serve a TAP device as the guest's interface; tunnel to the VPC's peer cards over UDP.
    Tap(TapArgs),
    /// Be the guest's virtio-net device (vhost-user-net backend on --vhost-socket); tunnel to
    /// the VPC's peer cards over UDP.
    Vhost(VhostArgs),
}

#[derive(Debug, clap::Args)]
struct TapArgs {
    /// TAP device to attach to (created if absent).
    #[arg(long)]
    tap: String,
    #[command(flatten)]
    card: CardArgs,
}

#[derive(Debug, clap::Args)]
struct VhostArgs {
    /// vhost-user socket to create and listen on (one frontend at a time; after a disconnect
    /// the next one is accepted).
    #[arg(long)]
    vhost_socket: PathBuf,
    #[command(flatten)]
    card: CardArgs,
}

#[derive(Debug, clap::Args)]
struct CardArgs {
    /// UDP address to receive the peer's datagrams on.
    #[arg(long)]
    listen: SocketAddr,
    /// VPC route, repeatable: GUEST_IP=CARD_ID@HOST_IP:PORT (the peer card owning that guest
    /// address, and the host address its datagrams must come from).
    #[arg(long = "route")]
    routes: Vec<String>,
    /// Point-to-point shorthand (benchmarks): every destination goes to this peer card's UDP
    /// address (with --peer-card-id).
    #[arg(long, requires = "peer_card_id")]
    peer: Option<SocketAddr>,
    /// The point-to-point peer card's id.
    #[arg(long, requires = "peer")]
    peer_card_id: Option<u32>,
    /// The first epoch's key, HPKE-sealed to the host key (a bulkhead-sealing blob; see
    /// README.md). Without it (and without --key-file) the card waits for an `install` on
    /// --control.
    #[arg(long, requires = "host_key", conflicts_with = "key_file")]
    sealed_key: Option<PathBuf>,
    /// The host key file (opens sealed epoch keys; read before the sandbox, kept locked).
    #[arg(long)]
    host_key: Option<PathBuf>,
    /// DEVELOPMENT AND BENCHMARKS ONLY: the epoch key as 32 raw bytes in a file. Production
    /// cards get keys only HPKE-sealed to the host key (--sealed-key / --control).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Unix socket for key install/switch/retire and counters (see README.md).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Sequence-floor file: keeps sequence numbers unique across restarts (see README.md).
    #[arg(long)]
    seq_state: Option<PathBuf>,
    /// VPC id.
    #[arg(long)]
    vpc: u32,
    /// The first key epoch.
    #[arg(long, default_value_t = 1)]
    epoch: u32,
    /// This card's id within the VPC.
    #[arg(long)]
    card_id: u32,
    /// The guest's MAC (frames from any other source MAC are dropped as spoofed).
    #[arg(long)]
    mac: String,
    /// The guest's address with the subnet prefix, e.g. 10.0.1.10/24.
    #[arg(long)]
    ip: String,
    /// The subnet gateway (the card itself). Default: the subnet's first address.
    #[arg(long)]
    gateway: Option<Ipv4Addr>,
    /// The gateway's MAC.
    #[arg(long, default_value = "02:00:00:00:00:01")]
    gateway_mac: String,
    /// MTU offered by DHCP.
    #[arg(long, default_value_t = 1400)]
    mtu: u16,
    /// Ingress rule, repeatable: tcp|udp:PORT[-PORT]:CIDR or icmp|all:CIDR.
    #[arg(long = "allow")]
    allow: Vec<String>,
    /// Conntrack table bound.
    #[arg(long, default_value_t = 4096)]
    max_flows: usize,
    /// Send frames in clear (benchmarks only: measures the cost of the crypto). Both ends
    /// must agree; a sealed card refuses plain datagrams.
    #[arg(long)]
    plain: bool,
    /// User to drop to after start-up (required when started as root).
    #[arg(long)]
    uid: Option<u32>,
    /// Group to drop to after start-up (required when started as root).
    #[arg(long)]
    gid: Option<u32>,
}

fn config(a: CardArgs) -> Result<CardConfig, NetcardError> {
    let (ip, prefix) = a.ip.split_once('/').ok_or(NetcardError::Config {
        what: "--ip",
        value: a.ip.clone(),
        why: "want ADDRESS/PREFIX",
    })?;
    let subnet = Cidr::parse_text(&a.ip)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| NetcardError::Config {
        what: "--ip",
        value: a.ip.clone(),
        why: "not an IPv4 address",
    })?;
    let _ = prefix;
    let net = Ipv4Addr::from(u32::from(ip) & subnet.mask());
    let subnet = Cidr {
        addr: net,
        prefix: subnet.prefix,
    };
    let gateway_ip = a
        .gateway
        .unwrap_or_else(|| Ipv4Addr::from(u32::from(net).wrapping_add(1)));
    let local = CardId(a.card_id);
    let mut routes = RouteTable::new();
    for r in &a.routes {
        routes.add_text(local, r)?;
    }
    if let (Some(host), Some(card)) = (a.peer, a.peer_card_id) {
        routes.set_default(
            local,
            Route {
                card: CardId(card),
                host,
            },
        )?;
    }
    let key = match (a.sealed_key, a.key_file) {
        (Some(p), _) => KeySource::Sealed(p),
        (None, Some(p)) => KeySource::DevRawFile(p),
        (None, None) => KeySource::Control,
    };
    Ok(CardConfig {
        listen: a.listen,
        routes,
        vpc: VpcId(a.vpc),
        local,
        kind: if a.plain {
            PayloadKind::Plain
        } else {
            PayloadKind::Sealed
        },
        epoch: KeyEpoch(a.epoch),
        key,
        host_key: a.host_key,
        control: a.control,
        seq_state: a.seq_state,
        iface: InterfaceConfig {
            mac: MacAddr::parse_text(&a.mac)?,
            ip,
            subnet,
            gateway_ip,
            gateway_mac: MacAddr::parse_text(&a.gateway_mac)?,
            mtu: a.mtu,
            lease_secs: 3600,
        },
        rules: a
            .allow
            .iter()
            .map(|r| IngressRule::parse_text(r))
            .collect::<Result<_, _>>()?,
        max_flows: a.max_flows,
        flow_idle: Duration::from_secs(300),
        uid: a.uid,
        gid: a.gid,
    })
}

fn main() -> ExitCode {
    // Non-dumpable before anything else is read or derived.
    if let Err(e) = bulkhead_harden::forbid_dumps() {
        eprintln!("bulkhead-netcard: {e}");
        return ExitCode::FAILURE;
    }
    if std::env::args().nth(1).as_deref() == Some("--self-test") {
        return match bulkhead_harden::self_test(bulkhead_netcard::sandbox::FILTERS) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bulkhead-netcard: self-test failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    bulkhead_daemon::init_logging("BULKHEAD_LOG", "info");
    let result = match cli.mode {
        Mode::Tap(a) => config(a.card).and_then(|c| tap::run(c, &a.tap)),
        Mode::Vhost(a) => config(a.card).and_then(|c| vhost::run(c, a.vhost_socket)),
    };
    bulkhead_daemon::exit("bulkhead-netcard", result)
}
