//! `bulkhead-blockcard`: one process per attached volume, started by the controller.

use bulkhead_blockcard::card::{self, CardConfig};
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
    /// Backing raw file or block device.
    #[arg(long)]
    backing: PathBuf,
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
}

/// `--self-test`, run by the host's measured start before it takes customer work: both seccomp
/// filters compile for this kernel's architecture.
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
    let cfg = CardConfig {
        control_socket: args.control_socket,
        vhost_socket: args.vhost_socket,
        backing: args.backing,
        read_only: args.read_only,
        host_key: args.host_key,
        queues: args.queues,
        uid: args.uid,
        gid: args.gid,
    };
    if let Err(e) = card::run(cfg) {
        tracing::error!(error = %e, "block card failed");
        eprintln!("bulkhead-blockcard: {e}");
        std::process::exit(1);
    }
}
