//! Layout of a controller state directory (and of the dev-mode token service under it):
//! the CA files of [`CaDir`], `token-service.key` / `.pub`, `rights.toml`, `revoked.txt`,
//! `audit.log`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::ops::Role;
use crate::pki::{CaDir, PkiError};
use crate::policy::{Policy, PolicyError, DEFAULT_RIGHTS_TOML};
use crate::token::{
    keypair_from_text, keypair_to_text, public_key_from_text, TokenService, Verifier,
};

/// Name of the one host a dev state directory is made for.
pub const DEV_HOST: &str = "host-1";
/// Callers a dev state directory gets certificates for.
pub const DEV_CALLERS: &[(&str, Role)] = &[
    ("operator", Role::Operator),
    ("customer", Role::Customer),
    ("control-plane", Role::ControlPlane),
    ("deployer", Role::Deployer),
];

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("policy {path}: {source}")]
    Policy { path: PathBuf, source: PolicyError },
    #[error("{0} is missing")]
    Missing(PathBuf),
    #[error("{0} is not a valid key")]
    BadKey(PathBuf),
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct StateDir {
    ca: CaDir,
}

fn read(path: &Path) -> Result<String, StateError> {
    if !path.exists() {
        return Err(StateError::Missing(path.to_path_buf()));
    }
    fs::read_to_string(path).map_err(|source| StateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_mode(path: &Path, text: &str, mode: u32) -> Result<(), StateError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir {
            ca: CaDir::new(root),
        }
    }

    pub fn ca(&self) -> &CaDir {
        &self.ca
    }

    pub fn root(&self) -> &Path {
        self.ca.root()
    }

    pub fn token_key(&self) -> PathBuf {
        self.root().join("token-service.key")
    }

    pub fn token_pub(&self) -> PathBuf {
        self.root().join("token-service.pub")
    }

    pub fn rights(&self) -> PathBuf {
        self.root().join("rights.toml")
    }

    pub fn revoked(&self) -> PathBuf {
        self.root().join("revoked.txt")
    }

    pub fn audit_log(&self) -> PathBuf {
        self.root().join("audit.log")
    }

    /// Creates whatever of the dev layout is absent. Returns what it created.
    pub fn ensure_dev(&self, host: &str) -> Result<Vec<String>, StateError> {
        let mut made = Vec::new();
        fs::create_dir_all(self.root()).map_err(|source| StateError::Io {
            path: self.root().to_path_buf(),
            source,
        })?;
        if !self.ca.exists() {
            self.ca.init()?;
            made.push("ca".to_string());
        }
        let mut wanted = vec![(host, Role::Host)];
        wanted.extend_from_slice(DEV_CALLERS);
        for (name, role) in wanted {
            if !self.ca.cert(name).exists() || !self.ca.key(name).exists() {
                self.ca.issue(name, role, true)?;
                made.push(name.to_string());
            }
        }
        // A directory with only the public key belongs to a verifier (a host whose tokens come
        // from a token service elsewhere): never mint a key of its own there.
        if !self.token_key().exists() && !self.token_pub().exists() {
            let kp = biscuit_auth::KeyPair::new();
            let (private, public) = keypair_to_text(&kp);
            let _ = fs::remove_file(self.token_pub());
            write_mode(&self.token_key(), &private, 0o600)?;
            write_mode(&self.token_pub(), &public, 0o644)?;
            made.push("token-service key".to_string());
        }
        if !self.rights().exists() {
            write_mode(&self.rights(), DEFAULT_RIGHTS_TOML, 0o644)?;
            made.push("rights.toml".to_string());
        }
        if !self.revoked().exists() {
            write_mode(
                &self.revoked(),
                "# revoked token ids, one per line\n",
                0o644,
            )?;
        }
        Ok(made)
    }

    pub fn policy(&self) -> Result<Policy, StateError> {
        let path = self.rights();
        Policy::parse(&read(&path)?).map_err(|source| StateError::Policy { path, source })
    }

    /// The dev-mode token service (key and policy under this directory).
    pub fn token_service(&self) -> Result<TokenService, StateError> {
        let path = self.token_key();
        let kp = keypair_from_text(&read(&path)?).ok_or(StateError::BadKey(path))?;
        Ok(TokenService::new(kp, self.policy()?))
    }

    pub fn verifier(&self) -> Result<Verifier, StateError> {
        let path = self.token_pub();
        let pk = public_key_from_text(&read(&path)?).ok_or(StateError::BadKey(path))?;
        Ok(Verifier::new(pk))
    }
}
