//! The control plane's configuration file (TOML). Every path it names must exist.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Customer API listen address (TLS, server certificate `control` from the CA).
    pub listen: String,
    /// `control.db`, `root.key`, `audit.log`.
    pub state_dir: PathBuf,
    /// The CA directory (`bulkhead-tokens` layout): `ca.pem`, `control.pem`/`.key` (server),
    /// `control-plane.pem`/`.key` (client to KMS, hosts and the token service); with no
    /// `token_service_addr`, also `token-service.key` and `rights.toml` (in-process dev minting).
    pub ca_dir: PathBuf,
    pub kms_addr: String,
    /// The token service (`bulkhead-token-service`, mTLS). Set, the control plane never holds
    /// the signing key: it asks for every host token with its own certificate.
    #[serde(default)]
    pub token_service_addr: Option<String>,
    #[serde(default = "default_poll")]
    pub poll_interval_ms: u64,
    /// PostgreSQL connection string; unset: SQLite in `state_dir/control.db`.
    #[serde(default)]
    pub database_url: Option<String>,
    /// The operators' read-only API over pulled host data (mutual TLS, operator certificates
    /// only; see [`crate::operator`]). Unset: not served.
    #[serde(default)]
    pub operator_listen: Option<String>,
    /// Attestation policy (the KMS's format, `bulkhead_rot::policy`): when set, instances are
    /// placed only on hosts whose fresh TPM quote verifies against it.
    #[serde(default)]
    pub attest_config: Option<PathBuf>,
    /// Thresholds of the central monitoring rules (`crate::fleet::Rules`); unset: defaults.
    #[serde(default)]
    pub fleet_rules: Option<PathBuf>,
    /// How long this replica's hold on a running workflow lasts unless renewed (ms; default
    /// `crate::workflow::DEFAULT_LEASE`). Another replica takes a workflow over this long
    /// after its owner died; each replica sweeps for such workflows every half of it.
    #[serde(default)]
    pub workflow_lease_ms: Option<u64>,
    /// The region name of the EC2 Query API: what SigV4 credential scopes must name (and the
    /// availability zone is this plus `a`). Unset: [`DEFAULT_REGION`].
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub hosts: Vec<HostConfig>,
    /// Storage nodes for network volumes (`bulkhead-storage`); CreateVolume places each new
    /// volume on one of them. None: volumes are files on whichever host attaches them.
    #[serde(default)]
    pub storage_nodes: Vec<crate::storage::StorageNodeConfig>,
}

/// The region when the configuration names none.
pub const DEFAULT_REGION: &str = "us-east-1";

fn default_poll() -> u64 {
    1000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    pub host_id: String,
    /// The host controller's mTLS address.
    pub addr: String,
    /// Whole physical cores offered to instances (each = two SMT threads).
    pub cores: u32,
    /// The host's 38-byte public key file (what its block card unseals with).
    pub public_key: PathBuf,
    /// Set for a sealed host (booted from the host image): it is attested by its whole boot
    /// chain against the image manifest ([`crate::sealed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<crate::sealed::SealedHostConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Syntax(PathBuf, toml::de::Error),
    #[error("missing: {0}")]
    Missing(PathBuf),
    #[error("region: 1-32 of a-z0-9- starting with a letter")]
    BadRegion,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        let cfg: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Syntax(path.to_path_buf(), e))?;
        let mut needed = vec![
            cfg.ca_dir.join("ca.pem"),
            cfg.ca_dir.join("control-plane.pem"),
        ];
        if cfg.token_service_addr.is_none() {
            needed.push(cfg.ca_dir.join("token-service.key"));
        }
        for p in needed {
            if !p.is_file() {
                return Err(ConfigError::Missing(p));
            }
        }
        if let Some(p) = cfg.fleet_rules.as_ref().filter(|p| !p.is_file()) {
            return Err(ConfigError::Missing(p.clone()));
        }
        for h in &cfg.hosts {
            if !h.public_key.is_file() {
                return Err(ConfigError::Missing(h.public_key.clone()));
            }
        }
        if cfg.region.as_deref().is_some_and(|r| !valid_region(r)) {
            return Err(ConfigError::BadRegion);
        }
        Ok(cfg)
    }

    /// The configured region, or [`DEFAULT_REGION`].
    pub fn region(&self) -> &str {
        self.region.as_deref().unwrap_or(DEFAULT_REGION)
    }
}

/// A region name: 1-32 of `a-z0-9-`, starting with a letter.
pub fn valid_region(r: &str) -> bool {
    (1..=32).contains(&r.len())
        && r.starts_with(|c: char| c.is_ascii_lowercase())
        && r.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}
