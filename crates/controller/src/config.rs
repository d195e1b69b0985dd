//! Start-up configuration. Production takes a TOML file naming every input and refuses to start
//! if any is missing; `--dev` builds the same thing from a state directory it fills in.

use std::path::{Path, PathBuf};

use bulkhead_tokens::statedir::StateDir;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub host_id: String,
    pub listen: String,
    pub ca_cert: PathBuf,
    pub host_cert: PathBuf,
    pub host_key: PathBuf,
    pub token_public_key: PathBuf,
    pub rights: PathBuf,
    pub revocations: PathBuf,
    pub audit_log: PathBuf,
    /// Real backend: a directory with the guest kernel (`vmlinux`) and `initramfs.cpio`. Without
    /// it the controller runs the detached fallback (no guest runs) and says so.
    #[serde(default)]
    pub guest_dir: Option<PathBuf>,
    /// `bulkhead-hypervisor` binary (default: next to the controller's own binary).
    #[serde(default)]
    pub hypervisor_bin: Option<PathBuf>,
    /// `bulkhead-blockcard` binary (default: next to the controller's own binary).
    #[serde(default)]
    pub blockcard_bin: Option<PathBuf>,
    /// Sealing host key file handed to block cards (`--host-key`); the controller never reads
    /// it (it is not the TLS `host_key`).
    #[serde(default)]
    pub card_host_key: Option<PathBuf>,
    /// Volume backing files (`<volume_id>.img`).
    #[serde(default)]
    pub volume_dir: Option<PathBuf>,
    /// Block cards' sockets.
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    /// Guest kernel arguments (default: [`crate::host::DEFAULT_KERNEL_ARGS`]).
    #[serde(default)]
    pub kernel_args: Option<String>,
    /// The attestation agent's socket (`bulkhead-launcher serve --socket`). Without it
    /// `POST /v1/host/attest` answers `attestation_unavailable`, and a KMS that requires
    /// attestation releases no volume key to this host.
    #[serde(default)]
    pub attest_socket: Option<PathBuf>,
    /// `bulkhead-netcard` binary (default: next to the controller's own binary).
    #[serde(default)]
    pub netcard_bin: Option<PathBuf>,
    /// This host's address for VPC datagrams (net cards listen on it).
    #[serde(default)]
    pub net_host_ip: Option<std::net::Ipv4Addr>,
    /// `dedicated` (the default): whole cores per instance, vCPUs pinned, the host's own
    /// processes on the host cores ([`crate::cores`]); `shared`: nothing pinned (development
    /// only; the `--dev` default, so several instances fit on a small machine).
    #[serde(default)]
    pub core_isolation: Option<crate::cores::CoreIsolation>,
    /// CPUs whose whole cores are reserved for the host (controller, launcher, cards,
    /// hypervisors' non-vCPU threads). Default: `[0]`.
    #[serde(default)]
    pub host_cpus: Option<Vec<usize>>,
    /// The release trust root pinned at provisioning (`bulkhead-rot`'s `TrustRoot` JSON: the
    /// release keys and the threshold, 2 of 3). Without it DeployRelease answers
    /// `deploy_unavailable`.
    #[serde(default)]
    pub release_root: Option<PathBuf>,
    /// The deployment environment releases must name (default `dev`).
    #[serde(default)]
    pub release_environment: Option<String>,
    /// Installed releases and uploaded artefacts (default: `releases` next to the audit log).
    #[serde(default)]
    pub release_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {0}: {1}")]
    Syntax(PathBuf, toml::de::Error),
    #[error("missing: {0}")]
    Missing(PathBuf),
    #[error("bad host_id {0:?}")]
    BadHostId(String),
}

impl Config {
    /// Where releases are installed and artefacts uploaded: `release_dir`, else `releases`
    /// next to the audit log.
    pub fn releases_dir(&self) -> PathBuf {
        self.release_dir
            .clone()
            .unwrap_or_else(|| self.audit_log.with_file_name("releases"))
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Syntax(path.to_path_buf(), e))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Every input must exist; the audit log's directory must exist (the log itself may be new).
    pub fn check(&self) -> Result<(), ConfigError> {
        if !bulkhead_tokens::pki::valid_name(&self.host_id) {
            return Err(ConfigError::BadHostId(self.host_id.clone()));
        }
        for p in [
            &self.ca_cert,
            &self.host_cert,
            &self.host_key,
            &self.token_public_key,
            &self.rights,
            &self.revocations,
        ] {
            if !p.is_file() {
                return Err(ConfigError::Missing(p.clone()));
            }
        }
        match self.audit_log.parent() {
            Some(d) if d.as_os_str().is_empty() || d.is_dir() => Ok(()),
            Some(d) => Err(ConfigError::Missing(d.to_path_buf())),
            None => Err(ConfigError::Missing(self.audit_log.clone())),
        }
    }

    /// The configuration of a dev state directory. The guest defaults to `target/guest` (the
    /// directory `guest` next to the controller binary's directory) when it holds a kernel;
    /// the host key to `DIR/host.key` when it exists.
    pub fn from_state_dir(dir: &StateDir, host_id: &str, listen: &str) -> Config {
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        let guest_dir = exe_dir
            .as_ref()
            .and_then(|d| d.parent())
            .map(|t| t.join("guest"))
            .filter(|g| g.join("vmlinux").is_file());
        let card_host_key = Some(dir.root().join("host.key")).filter(|p| p.is_file());
        Config {
            guest_dir,
            hypervisor_bin: None,
            blockcard_bin: None,
            card_host_key,
            volume_dir: Some(dir.root().join("volumes")),
            run_dir: Some(dir.root().join("run")),
            kernel_args: None,
            attest_socket: Some(dir.root().join("attest.sock")).filter(|p| p.exists()),
            netcard_bin: None,
            net_host_ip: None,
            core_isolation: Some(crate::cores::CoreIsolation::Shared),
            host_cpus: None,
            release_root: Some(dir.root().join("release-root.json")).filter(|p| p.is_file()),
            release_environment: None,
            release_dir: None,
            host_id: host_id.to_string(),
            listen: listen.to_string(),
            ca_cert: dir.ca().ca_pem(),
            host_cert: dir.ca().cert(host_id),
            host_key: dir.ca().key(host_id),
            token_public_key: dir.token_pub(),
            rights: dir.rights(),
            revocations: dir.revoked(),
            audit_log: dir.audit_log(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cores::CoreIsolation;

    const BASE: &str = r#"
host_id = "host-1"
listen = "127.0.0.1:0"
ca_cert = "ca.pem"
host_cert = "host-1.pem"
host_key = "host-1.key"
token_public_key = "token.pub"
rights = "rights.toml"
revocations = "revoked.txt"
audit_log = "audit.log"
"#;

    #[test]
    fn core_isolation_and_host_cpus_parse() {
        let c: Config = toml::from_str(BASE).unwrap();
        assert_eq!((c.core_isolation, c.host_cpus), (None, None));
        let c: Config = toml::from_str(&format!(
            "{BASE}core_isolation = \"shared\"\nhost_cpus = [0, 1]\n"
        ))
        .unwrap();
        assert_eq!(c.core_isolation, Some(CoreIsolation::Shared));
        assert_eq!(c.host_cpus, Some(vec![0, 1]));
        let c: Config = toml::from_str(&format!("{BASE}core_isolation = \"dedicated\"\n")).unwrap();
        assert_eq!(c.core_isolation, Some(CoreIsolation::Dedicated));
        assert!(toml::from_str::<Config>(&format!("{BASE}core_isolation = \"some\"\n")).is_err());
    }
}
