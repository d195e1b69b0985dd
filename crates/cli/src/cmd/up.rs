//! `bulkhead up --hosts N`: starts a local cluster — the KMS, N simulated hosts (one
//! `bulkhead-controller` each, with its own sealing host key enrolled with the KMS), and the
//! control plane — creating the CA and every certificate, then prints how to use it. The work is
//! done by `bulkhead-devcluster up` (found next to this binary), which this command becomes.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use super::CliError;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Number of simulated hosts.
    #[arg(long, default_value_t = 2)]
    pub hosts: usize,
    /// Cluster directory (CA, state, logs, cluster.json). Default: a new directory under /tmp.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Record every inter-service link into DIR/capture/ (for the no-plaintext check).
    #[arg(long)]
    pub record: bool,
    /// Controller instance backend (`auto`, `host`, `detached`) where the controller offers it.
    #[arg(long)]
    pub backend: Option<String>,
    /// Whole cores each host offers (default: half this machine's threads).
    #[arg(long)]
    pub host_cores: Option<u32>,
    /// Run each host as the sealed host image (`make host-image`) under QEMU with OVMF and its
    /// own swtpm; the control plane attests its whole boot chain. Needs root, QEMU, OVMF, swtpm.
    #[arg(long)]
    pub sealed_hosts: bool,
    /// The host image directory for --sealed-hosts (default: the one `make host-image` builds).
    #[arg(long)]
    pub host_image: Option<PathBuf>,
}

pub fn run(a: UpArgs) -> Result<(), CliError> {
    if a.hosts == 0 || a.hosts > 64 {
        return Err(CliError::BadArgument("--hosts must be 1..=64".into()));
    }
    let bin = super::sibling_binary("bulkhead-devcluster")?;
    let dir = match a.dir {
        Some(d) => d,
        None => {
            let d = std::env::temp_dir().join(format!("bulkhead-cluster-{}", std::process::id()));
            std::fs::create_dir_all(&d).map_err(|e| CliError::Io(d.display().to_string(), e))?;
            d
        }
    };
    let mut cmd = Command::new(&bin);
    cmd.arg("up")
        .arg("--dir")
        .arg(&dir)
        .arg("--hosts")
        .arg(a.hosts.to_string());
    if a.record {
        cmd.arg("--record");
    }
    if let Some(b) = a.backend {
        cmd.arg("--controller-backend").arg(b);
    }
    if let Some(n) = a.host_cores {
        cmd.arg("--host-cores").arg(n.to_string());
    }
    if a.sealed_hosts {
        cmd.arg("--sealed-hosts");
    }
    if let Some(i) = a.host_image {
        cmd.arg("--host-image").arg(i);
    }
    // Only returns on failure.
    let e = cmd.exec();
    Err(CliError::Io(bin.display().to_string(), e))
}
