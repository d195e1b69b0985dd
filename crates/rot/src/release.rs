//! Threshold-signed releases.
//!
//! Roles, kept small (TUF-like; see docs/rot.md):
//!
//! * **root** ([`TrustRoot`]): the set of release public keys and the threshold (2 of 3). It is
//!   pinned on every host at provisioning and in the deployment service; changing it is a
//!   provisioning step, not a deploy.
//! * **targets + snapshot + timestamp**, merged into one [`Manifest`]: artefact names, kinds,
//!   sizes and SHA-384 digests in measurement order, the PCR value a host running exactly them
//!   in that environment must show, a version (monotonic: hosts refuse lower ones) and an expiry.
//!
//! A [`SignedRelease`] carries the manifest as the exact JSON text that was signed (no
//! canonicalisation problem) and Ed25519 signatures over `"bulkhead release v1\0" || text`.
//! [`verify_release`] is the one parser and checker; each refusal is its own [`ReleaseError`].
//!
//! **Live update.** A manifest may carry [`LiveUpdate`]: "replace component C of release B (by
//! version) in place". The host does not restart: it extends the new component's digest as a
//! `live-update` event on top of release B's measurements, so the expected PCR value is
//! `extend(B.expected_pcr, sha384(C'))`, which the manifest states and the verifier checks like any
//! other value. Instances keep running; the identity is re-sealed to the new value first.

use std::collections::HashSet;
use std::path::Path;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

use crate::measure::{parse_sha384, sha384_file, valid_name, Environment, EventKind};
use crate::tpm::{extend, MeasurePcr, Sha384Digest};
use crate::RotError;

mod pinned;
pub use pinned::{PinnedTrust, PinnedTrustError, DEFAULT_ENVIRONMENT};

/// Manifest schema understood here.
pub const MANIFEST_SCHEMA: u32 = 1;
/// Largest signed release accepted, in bytes of JSON.
pub const MAX_RELEASE_BYTES: usize = 256 * 1024;
/// Most artefacts in one release.
pub const MAX_ARTEFACTS: usize = 64;
/// Most signatures looked at.
pub const MAX_SIGNATURES: usize = 16;

const SIGNING_CONTEXT: &[u8] = b"bulkhead release v1\0";

/// Why a release was refused. Codes are stable (they go into the audit log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error("release is not valid JSON or is too large")]
    Malformed,
    #[error("release is unsigned")]
    Unsigned,
    #[error(
        "release has {valid} valid signature(s) from distinct release keys; {threshold} required"
    )]
    TooFewSignatures { valid: usize, threshold: usize },
    #[error("release manifest is malformed: {0}")]
    BadManifest(&'static str),
    #[error("release expired at {expires} (now {now})")]
    Expired { expires: u64, now: u64 },
    #[error(
        "release version {version} is lower than the running version {current} (rollback refused)"
    )]
    Rollback { version: u64, current: u64 },
    #[error("release is for environment {release}, this is {here}")]
    WrongEnvironment { release: String, here: String },
    #[error("release states PCR value {stated}, its artefacts produce {computed}")]
    InconsistentPcr { stated: String, computed: String },
    #[error("artefact {name}: digest {got} differs from the manifest's {want}")]
    ArtefactDigestMismatch {
        name: String,
        want: String,
        got: String,
    },
    #[error("artefact {name} is missing")]
    ArtefactMissing { name: String },
}

impl ReleaseError {
    pub fn code(&self) -> &'static str {
        match self {
            ReleaseError::Malformed => "release_malformed",
            ReleaseError::Unsigned => "release_unsigned",
            ReleaseError::TooFewSignatures { .. } => "release_too_few_signatures",
            ReleaseError::BadManifest(_) => "release_bad_manifest",
            ReleaseError::Expired { .. } => "release_expired",
            ReleaseError::Rollback { .. } => "release_rollback",
            ReleaseError::WrongEnvironment { .. } => "release_wrong_environment",
            ReleaseError::InconsistentPcr { .. } => "release_inconsistent_pcr",
            ReleaseError::ArtefactDigestMismatch { .. } => "release_artefact_mismatch",
            ReleaseError::ArtefactMissing { .. } => "release_artefact_missing",
        }
    }
}

/// One file of a release.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artefact {
    pub name: String,
    pub kind: EventKind,
    pub size: u64,
    pub sha384: String,
}

/// In-place replacement of one component on top of a base release (hypervisor live update).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveUpdate {
    /// The release whose measurements stay in the PCR.
    pub base_version: u64,
    pub base_expected_pcr: String,
    /// The artefact (of this manifest) that replaces its namesake in place.
    pub component: String,
    /// `extend(base_expected_pcr, sha384(component))`.
    pub expected_pcr_after: String,
}

/// The signed content of a release.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema: u32,
    pub version: u64,
    pub environment: Environment,
    /// Unix seconds after which hosts refuse it.
    pub expires: u64,
    pub pcr: MeasurePcr,
    /// In measurement order.
    pub artefacts: Vec<Artefact>,
    /// The PCR value after measured start of exactly these artefacts in this environment.
    pub expected_pcr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_update: Option<LiveUpdate>,
}

impl Manifest {
    /// Builds a manifest from files on disk (release engineering side), in the order given.
    pub fn from_files(
        version: u64,
        environment: Environment,
        expires: u64,
        pcr: MeasurePcr,
        files: &[(EventKind, &Path)],
    ) -> Result<Self, RotError> {
        let mut artefacts = Vec::new();
        for (kind, path) in files {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| valid_name(n))
                .ok_or(RotError::Malformed("artefact file name"))?
                .to_string();
            let size = std::fs::metadata(path).map_err(RotError::io(path))?.len();
            artefacts.push(Artefact {
                name,
                kind: *kind,
                size,
                sha384: hex::encode(sha384_file(path)?),
            });
        }
        let mut m = Manifest {
            schema: MANIFEST_SCHEMA,
            version,
            environment,
            expires,
            pcr,
            artefacts,
            expected_pcr: String::new(),
            live_update: None,
        };
        m.expected_pcr = hex::encode(m.computed_pcr().map_err(RotError::Release)?);
        Ok(m)
    }

    /// Replays environment + artefacts.
    pub fn computed_pcr(&self) -> Result<Sha384Digest, ReleaseError> {
        let mut pcr = extend(&[0u8; 48], &self.environment.digest());
        for a in &self.artefacts {
            let d = parse_sha384(&a.sha384)
                .map_err(|_| ReleaseError::BadManifest("artefact digest"))?;
            pcr = extend(&pcr, &d);
        }
        Ok(pcr)
    }

    pub fn expected_pcr_value(&self) -> Result<Sha384Digest, ReleaseError> {
        parse_sha384(&self.expected_pcr).map_err(|_| ReleaseError::BadManifest("expected_pcr"))
    }

    /// Turns this manifest into a live update of `component` over `base`.
    pub fn make_live_update(
        &mut self,
        base: &Manifest,
        component: &str,
    ) -> Result<(), ReleaseError> {
        let art = self.artefacts.iter().find(|a| a.name == component).ok_or(
            ReleaseError::BadManifest("live-update component not in artefacts"),
        )?;
        let d =
            parse_sha384(&art.sha384).map_err(|_| ReleaseError::BadManifest("artefact digest"))?;
        let after = extend(&base.expected_pcr_value()?, &d);
        self.live_update = Some(LiveUpdate {
            base_version: base.version,
            base_expected_pcr: base.expected_pcr.clone(),
            component: component.to_string(),
            expected_pcr_after: hex::encode(after),
        });
        Ok(())
    }

    fn check_shape(&self) -> Result<(), ReleaseError> {
        if self.schema != MANIFEST_SCHEMA {
            return Err(ReleaseError::BadManifest("unknown schema"));
        }
        if self.artefacts.is_empty() || self.artefacts.len() > MAX_ARTEFACTS {
            return Err(ReleaseError::BadManifest("artefact count"));
        }
        let mut names = HashSet::new();
        for a in &self.artefacts {
            if !valid_name(&a.name) || !names.insert(a.name.as_str()) {
                return Err(ReleaseError::BadManifest("artefact name"));
            }
            if a.kind == EventKind::Environment {
                return Err(ReleaseError::BadManifest("artefact kind"));
            }
        }
        let computed = self.computed_pcr()?;
        if self.expected_pcr_value()? != computed {
            return Err(ReleaseError::InconsistentPcr {
                stated: self.expected_pcr.clone(),
                computed: hex::encode(computed),
            });
        }
        if let Some(lu) = &self.live_update {
            let art = self
                .artefacts
                .iter()
                .find(|a| a.name == lu.component)
                .ok_or(ReleaseError::BadManifest("live-update component"))?;
            let base = parse_sha384(&lu.base_expected_pcr)
                .map_err(|_| ReleaseError::BadManifest("live-update base pcr"))?;
            let d = parse_sha384(&art.sha384)
                .map_err(|_| ReleaseError::BadManifest("artefact digest"))?;
            if hex::encode(extend(&base, &d)) != lu.expected_pcr_after {
                return Err(ReleaseError::InconsistentPcr {
                    stated: lu.expected_pcr_after.clone(),
                    computed: hex::encode(extend(&base, &d)),
                });
            }
        }
        Ok(())
    }

    /// Checks files in `dir` (named as the artefacts) against the manifest's digests.
    pub fn check_artefacts(&self, dir: &Path) -> Result<(), ReleaseError> {
        for a in &self.artefacts {
            let path = dir.join(&a.name);
            let got = match sha384_file(&path) {
                Ok(d) => hex::encode(d),
                Err(_) => {
                    return Err(ReleaseError::ArtefactMissing {
                        name: a.name.clone(),
                    })
                }
            };
            if got != a.sha384 {
                return Err(ReleaseError::ArtefactDigestMismatch {
                    name: a.name.clone(),
                    want: a.sha384.clone(),
                    got,
                });
            }
        }
        Ok(())
    }
}

/// One signature.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseSignature {
    pub key_id: String,
    /// Ed25519, hex.
    pub sig: String,
}

/// The envelope shipped to hosts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRelease {
    /// The manifest JSON, exactly as signed.
    pub manifest: String,
    pub signatures: Vec<ReleaseSignature>,
}

impl SignedRelease {
    pub fn new(m: &Manifest) -> Result<Self, RotError> {
        Ok(SignedRelease {
            manifest: serde_json::to_string_pretty(m)
                .map_err(|_| RotError::Malformed("manifest"))?,
            signatures: Vec::new(),
        })
    }

    /// Adds one signature (replacing an earlier one by the same key).
    pub fn sign(&mut self, key: &ReleaseKey) {
        let mut msg = SIGNING_CONTEXT.to_vec();
        msg.extend_from_slice(self.manifest.as_bytes());
        let sig = key.key.sign(&msg);
        let key_id = key.public().key_id;
        self.signatures.retain(|s| s.key_id != key_id);
        self.signatures.push(ReleaseSignature {
            key_id,
            sig: hex::encode(sig.to_bytes()),
        });
    }

    pub fn parse(raw: &[u8]) -> Result<Self, ReleaseError> {
        if raw.len() > MAX_RELEASE_BYTES {
            return Err(ReleaseError::Malformed);
        }
        serde_json::from_slice(raw).map_err(|_| ReleaseError::Malformed)
    }

    pub fn to_json(&self) -> Result<String, RotError> {
        serde_json::to_string_pretty(self).map_err(|_| RotError::Malformed("release"))
    }

    /// The manifest, without any check. For display only.
    pub fn unverified_manifest(&self) -> Result<Manifest, ReleaseError> {
        serde_json::from_str(&self.manifest).map_err(|_| ReleaseError::BadManifest("json"))
    }
}

/// A release signing key (Ed25519). The secret is zeroized on drop by `ed25519-dalek`.
pub struct ReleaseKey {
    key: SigningKey,
}

impl std::fmt::Debug for ReleaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReleaseKey({})", self.public().key_id)
    }
}

/// A release public key as pinned in the trust root.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleasePublicKey {
    /// First 8 bytes of SHA-256 of the public key, hex.
    pub key_id: String,
    /// Ed25519 public key, hex.
    pub public: String,
}

impl ReleaseKey {
    pub fn generate() -> Result<Self, RotError> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        bulkhead_sealing::fill_random(seed.as_mut())?;
        Ok(ReleaseKey {
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn public(&self) -> ReleasePublicKey {
        let pk = self.key.verifying_key().to_bytes();
        let id = Sha256::digest(pk);
        ReleasePublicKey {
            key_id: hex::encode(id.get(..8).unwrap_or(&[])),
            public: hex::encode(pk),
        }
    }

    /// Secret file text: hex of the 32-byte seed (written 0600 by the caller).
    pub fn to_secret_text(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(hex::encode(self.key.to_bytes()))
    }

    pub fn from_secret_text(text: &str) -> Result<Self, RotError> {
        let raw = zeroize::Zeroizing::new(
            hex::decode(text.trim()).map_err(|_| RotError::Malformed("release key"))?,
        );
        let seed: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| RotError::Malformed("release key"))?;
        let seed = zeroize::Zeroizing::new(seed);
        Ok(ReleaseKey {
            key: SigningKey::from_bytes(&seed),
        })
    }
}

/// The root role: release keys and threshold, pinned at provisioning.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustRoot {
    pub threshold: usize,
    pub keys: Vec<ReleasePublicKey>,
}

impl TrustRoot {
    pub fn new(threshold: usize, keys: Vec<ReleasePublicKey>) -> Result<Self, RotError> {
        if threshold == 0 || threshold > keys.len() {
            return Err(RotError::Malformed("trust root threshold"));
        }
        Ok(TrustRoot { threshold, keys })
    }

    pub fn parse(raw: &[u8]) -> Result<Self, RotError> {
        let r: TrustRoot =
            serde_json::from_slice(raw).map_err(|_| RotError::Malformed("trust root"))?;
        TrustRoot::new(r.threshold, r.keys)
    }

    fn verifying_key(&self, key_id: &str) -> Option<VerifyingKey> {
        let k = self.keys.iter().find(|k| k.key_id == key_id)?;
        let raw: [u8; 32] = hex::decode(&k.public).ok()?.try_into().ok()?;
        VerifyingKey::from_bytes(&raw).ok()
    }

    /// Number of distinct root keys with a valid signature over the manifest text.
    fn count_valid(&self, r: &SignedRelease) -> usize {
        let mut msg = SIGNING_CONTEXT.to_vec();
        msg.extend_from_slice(r.manifest.as_bytes());
        let mut seen = HashSet::new();
        for s in r.signatures.iter().take(MAX_SIGNATURES) {
            let Some(vk) = self.verifying_key(&s.key_id) else {
                continue;
            };
            let Ok(raw) = hex::decode(&s.sig) else {
                continue;
            };
            let Ok(sig) = ed25519_dalek::Signature::from_slice(&raw) else {
                continue;
            };
            if vk.verify_strict(&msg, &sig).is_ok() {
                seen.insert(s.key_id.as_str());
            }
        }
        seen.len()
    }
}

/// What a verifier of a release holds about the host(s) it is for.
#[derive(Debug, Clone, Copy)]
pub struct ReleasePolicy<'a> {
    pub root: &'a TrustRoot,
    pub environment: &'a Environment,
    /// Lowest acceptable version (the committed, running version).
    pub current_version: u64,
    pub now: u64,
}

/// Verifies signatures (threshold), then the manifest: shape, expiry, environment, rollback and
/// PCR consistency. Checks in this order, so a release with several faults gets the first error.
pub fn verify_release(r: &SignedRelease, p: &ReleasePolicy<'_>) -> Result<Manifest, ReleaseError> {
    if r.signatures.is_empty() {
        return Err(ReleaseError::Unsigned);
    }
    let valid = p.root.count_valid(r);
    if valid < p.root.threshold {
        return Err(ReleaseError::TooFewSignatures {
            valid,
            threshold: p.root.threshold,
        });
    }
    let m: Manifest =
        serde_json::from_str(&r.manifest).map_err(|_| ReleaseError::BadManifest("json"))?;
    if m.expires <= p.now {
        return Err(ReleaseError::Expired {
            expires: m.expires,
            now: p.now,
        });
    }
    if &m.environment != p.environment {
        return Err(ReleaseError::WrongEnvironment {
            release: m.environment.to_string(),
            here: p.environment.to_string(),
        });
    }
    if m.version < p.current_version {
        return Err(ReleaseError::Rollback {
            version: m.version,
            current: p.current_version,
        });
    }
    m.check_shape()?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn setup() -> (Vec<ReleaseKey>, TrustRoot, tempfile::TempDir, Manifest) {
        let keys: Vec<ReleaseKey> = (0..3).map(|_| ReleaseKey::generate().unwrap()).collect();
        let root = TrustRoot::new(2, keys.iter().map(|k| k.public()).collect()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("bulkhead-controller");
        std::fs::write(&a, b"#!/bin/sh\nexit 0\n").unwrap();
        let c = dir.path().join("host.toml");
        std::fs::write(&c, b"x = 1\n").unwrap();
        let m = Manifest::from_files(
            5,
            Environment::parse("staging").unwrap(),
            crate::unix_now() + 3600,
            MeasurePcr::DEV,
            &[(EventKind::Binary, &a), (EventKind::Config, &c)],
        )
        .unwrap();
        (keys, root, dir, m)
    }

    #[test]
    fn threshold_expiry_rollback() {
        let (keys, root, dir, m) = setup();
        let env = Environment::parse("staging").unwrap();
        let pol = ReleasePolicy {
            root: &root,
            environment: &env,
            current_version: 5,
            now: crate::unix_now(),
        };
        let mut r = SignedRelease::new(&m).unwrap();
        assert_eq!(verify_release(&r, &pol), Err(ReleaseError::Unsigned));
        r.sign(&keys[0]);
        r.sign(&keys[0]);
        assert_eq!(
            verify_release(&r, &pol),
            Err(ReleaseError::TooFewSignatures {
                valid: 1,
                threshold: 2
            })
        );
        // A duplicated signature entry from the same key still counts once.
        let dup = r.signatures[0].clone();
        r.signatures.push(ReleaseSignature {
            key_id: dup.key_id.clone(),
            sig: dup.sig.clone(),
        });
        assert!(matches!(
            verify_release(&r, &pol),
            Err(ReleaseError::TooFewSignatures { valid: 1, .. })
        ));
        r.sign(&keys[2]);
        let got = verify_release(&r, &pol).unwrap();
        assert_eq!(got, m);
        got.check_artefacts(dir.path()).unwrap();
        std::fs::write(dir.path().join("host.toml"), b"x = 2\n").unwrap();
        assert!(matches!(
            got.check_artefacts(dir.path()),
            Err(ReleaseError::ArtefactDigestMismatch { .. })
        ));
        let newer = ReleasePolicy {
            current_version: 6,
            ..pol
        };
        assert_eq!(
            verify_release(&r, &newer),
            Err(ReleaseError::Rollback {
                version: 5,
                current: 6
            })
        );
        let later = ReleasePolicy {
            now: m.expires,
            ..pol
        };
        assert!(matches!(
            verify_release(&r, &later),
            Err(ReleaseError::Expired { .. })
        ));
        let prod = Environment::parse("production").unwrap();
        let p2 = ReleasePolicy {
            environment: &prod,
            ..pol
        };
        assert!(matches!(
            verify_release(&r, &p2),
            Err(ReleaseError::WrongEnvironment { .. })
        ));
        // Tampering with the signed text breaks every signature.
        r.manifest = r.manifest.replace("\"version\": 5", "\"version\": 7");
        assert!(matches!(
            verify_release(&r, &pol),
            Err(ReleaseError::TooFewSignatures { valid: 0, .. })
        ));
    }

    #[test]
    fn live_update_pcr() {
        let (_, _, dir, base) = setup();
        let hv = dir.path().join("bulkhead-hypervisor");
        std::fs::write(&hv, b"new hypervisor").unwrap();
        let mut m = Manifest::from_files(
            6,
            base.environment.clone(),
            base.expires,
            MeasurePcr::DEV,
            &[(EventKind::Binary, &hv)],
        )
        .unwrap();
        m.make_live_update(&base, "bulkhead-hypervisor").unwrap();
        m.check_shape().unwrap();
        let lu = m.live_update.clone().unwrap();
        assert_eq!(
            lu.expected_pcr_after,
            hex::encode(extend(
                &base.expected_pcr_value().unwrap(),
                &sha384_file(&hv).unwrap()
            ))
        );
    }
}
