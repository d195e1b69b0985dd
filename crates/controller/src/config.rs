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

    /// The configuration of a dev state directory.
    pub fn from_state_dir(dir: &StateDir, host_id: &str, listen: &str) -> Config {
        Config {
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
