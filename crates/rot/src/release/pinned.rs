//! A host's pinned release trust: the trust-root file written at provisioning and the
//! environment its releases must name. Read once, at start, by each party on the host that
//! verifies releases (the controller, its supervisor, the launcher), so all three hold the same
//! root and the same default environment.

use std::path::{Path, PathBuf};

use super::TrustRoot;
use crate::measure::Environment;

/// The environment a host's releases must name when its configuration names none.
pub const DEFAULT_ENVIRONMENT: &str = "dev";

/// Why a host's pinned trust root or environment cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PinnedTrustError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not a release trust root (threshold and release keys)")]
    Root(PathBuf),
    #[error("release_environment: want 1-32 of a-z0-9-")]
    Environment,
}

/// The trust root and environment a host verifies its releases against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedTrust {
    pub root: TrustRoot,
    pub environment: Environment,
}

impl PinnedTrust {
    /// Reads the trust root at `root` and parses `environment` ([`DEFAULT_ENVIRONMENT`] when
    /// `None`), in that order (a host with both wrong reports its root).
    pub fn load(root: &Path, environment: Option<&str>) -> Result<PinnedTrust, PinnedTrustError> {
        let raw = std::fs::read(root).map_err(|source| PinnedTrustError::Read {
            path: root.to_path_buf(),
            source,
        })?;
        let root =
            TrustRoot::parse(&raw).map_err(|_| PinnedTrustError::Root(root.to_path_buf()))?;
        let environment = Environment::parse(environment.unwrap_or(DEFAULT_ENVIRONMENT))
            .map_err(|_| PinnedTrustError::Environment)?;
        Ok(PinnedTrust { root, environment })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::release::ReleaseKey;

    fn root_file(dir: &Path) -> (PathBuf, TrustRoot) {
        let keys: Vec<_> = (0..3)
            .map(|_| ReleaseKey::generate().unwrap().public())
            .collect();
        let root = TrustRoot::new(2, keys).unwrap();
        let p = dir.join("release-root.json");
        std::fs::write(&p, serde_json::to_vec(&root).unwrap()).unwrap();
        (p, root)
    }

    #[test]
    fn a_pinned_root_loads_with_the_default_or_named_environment() {
        let dir = tempfile::tempdir().unwrap();
        let (p, root) = root_file(dir.path());
        let t = PinnedTrust::load(&p, None).unwrap();
        assert_eq!(t.root, root);
        assert_eq!(t.environment.as_str(), DEFAULT_ENVIRONMENT);
        let t = PinnedTrust::load(&p, Some("prod-eu")).unwrap();
        assert_eq!(t.environment.as_str(), "prod-eu");
    }

    #[test]
    fn a_missing_or_bad_root_or_environment_is_refused_with_its_kind() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.json");
        assert!(matches!(
            PinnedTrust::load(&missing, None),
            Err(PinnedTrustError::Read { path, .. }) if path == missing
        ));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, b"{\"threshold\":0,\"keys\":[]}").unwrap();
        assert!(matches!(
            PinnedTrust::load(&bad, None),
            Err(PinnedTrustError::Root(p)) if p == bad
        ));
        let (p, _) = root_file(dir.path());
        assert!(matches!(
            PinnedTrust::load(&p, Some("Prod")),
            Err(PinnedTrustError::Environment)
        ));
        // Both wrong: the root is reported.
        assert!(matches!(
            PinnedTrust::load(&bad, Some("Prod")),
            Err(PinnedTrustError::Root(_))
        ));
    }
}
