//! `bulkhead-blockcard`: one process per attached volume, started by the controller.

use bulkhead_blockcard::card::{self, BackingSpec, CardConfig};
use bulkhead_blockcard::nbd::NbdConfig;
use clap::Parser;
use std::path::PathBuf;

/// Encrypting vhost-user-blk backend. Listens on two local unix sockets and never connects out.
#[derive(Debug, Parser)]
#[command(name = "bulkhead-blockcard", version)]
struct Args {
    /// Control socket (created, mode 0600) on which the controller sends Attach/Detach/GetMetrics.
    #[arg(long)]
    control_socket: PathBuf,
    /// vhost-user socket (created) for the VMM's vhost-user-blk frontend.
    #[arg(long)]
    vhost_socket: PathBuf,
    /// Backing raw file or block device (exactly one of --backing and --nbd).
    #[arg(long, required_unless_present = "nbd", conflicts_with = "nbd")]
    backing: Option<PathBuf>,
    /// Network volume: the storage node's NBD address, HOST:PORT (NBD over TLS 1.3).
    #[arg(long, requires_all = ["nbd_export", "nbd_server_name", "tls_ca", "tls_cert", "tls_key"])]
    nbd: Option<String>,
    /// NBD export name (the volume id).
    #[arg(long, requires = "nbd")]
    nbd_export: Option<String>,
    /// The storage node's certificate name (service role), e.g. storage-1: pinned on top of the
    /// CA check.
    #[arg(long, requires = "nbd")]
    nbd_server_name: Option<String>,
    /// Cluster CA certificate (PEM) the storage node's certificate must chain to.
    #[arg(long, requires = "nbd")]
    tls_ca: Option<PathBuf>,
    /// This host's certificate (PEM), presented to the storage node.
    #[arg(long, requires = "nbd")]
    tls_cert: Option<PathBuf>,
    /// This host's private key (PEM); read before the sandbox.
    #[arg(long, requires = "nbd")]
    tls_key: Option<PathBuf>,
    /// Serve the volume read-only.
    #[arg(long)]
    read_only: bool,
    /// Host key file (70 bytes, mode 0600) used to open sealed volume keys.
    #[arg(long)]
    host_key: Option<PathBuf>,
    /// Number of virtqueues (one I/O thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// User to drop to after start-up (required when started as root).
    #[arg(long)]
    uid: Option<u32>,
    /// Group to drop to after start-up (required when started as root).
    #[arg(long)]
    gid: Option<u32>,
    /// Card update: an inherited socketpair end on which the card being replaced sends the
    /// volume state (key included); the card then serves without an `Attach`.
    #[arg(long)]
    receive_state_fd: Option<i32>,
}

/// `--self-test`, run by the host's measured start before it takes customer work: every seccomp
/// filter (local-file and NBD mode) compiles for this kernel's architecture.
fn self_test() -> ! {
    use bulkhead_blockcard::sandbox;
    if let Err(e) = bulkhead_harden::self_test(sandbox::FILTERS) {
        eprintln!("bulkhead-blockcard: self-test failed: {e}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--self-test") {
        self_test();
    }
    let args = Args::parse();
    bulkhead_daemon::init_logging("BULKHEAD_LOG", "info");
    let backing = match (args.backing, args.nbd) {
        (Some(p), None) => BackingSpec::File(p),
        (None, Some(addr)) => BackingSpec::Nbd(NbdConfig {
            addr,
            export: args.nbd_export.unwrap_or_default(),
            server_name: args.nbd_server_name.unwrap_or_default(),
            ca: args.tls_ca.unwrap_or_default(),
            cert: args.tls_cert.unwrap_or_default(),
            key: args.tls_key.unwrap_or_default(),
        }),
        _ => {
            eprintln!("bulkhead-blockcard: give exactly one of --backing and --nbd");
            std::process::exit(2);
        }
    };
    let cfg = CardConfig {
        control_socket: args.control_socket,
        vhost_socket: args.vhost_socket,
        backing,
        read_only: args.read_only,
        host_key: args.host_key,
        queues: args.queues,
        uid: args.uid,
        gid: args.gid,
        receive_state_fd: args.receive_state_fd,
    };
    if let Err(e) = card::run(cfg) {
        tracing::error!(error = %e, "block card failed");
        eprintln!("bulkhead-blockcard: {e}");
        std::process::exit(1);
    }
}
