//! Shared fixtures: real swtpm-backed hosts, release keys, artefacts, tokens.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bulkhead_rot::host::{Host, HostConfig};
use bulkhead_rot::measure::{Environment, EventKind};
use bulkhead_rot::release::{Manifest, ReleaseKey, SignedRelease, TrustRoot};
use bulkhead_rot::swtpm::{swtpm_available, Swtpm};
use bulkhead_rot::tpm::MeasurePcr;

/// True (and a loud note) when swtpm is absent and the test must skip.
pub fn skip(test: &str) -> bool {
    if swtpm_available() {
        return false;
    }
    bulkhead_testkit::skip_or_fail(&format!(
        "{test}: swtpm binary not found on PATH (install swtpm)"
    ));
    true
}

pub fn env(s: &str) -> Environment {
    Environment::parse(s).unwrap()
}

pub struct Keys {
    pub keys: Vec<ReleaseKey>,
    pub root: TrustRoot,
}

pub fn keys() -> Keys {
    let keys: Vec<ReleaseKey> = (0..3).map(|_| ReleaseKey::generate().unwrap()).collect();
    let root = TrustRoot::new(2, keys.iter().map(|k| k.public()).collect()).unwrap();
    Keys { keys, root }
}

/// A directory holding one release's artefacts: two service binaries (shell scripts whose
/// `--self-test` exits `self_test_rc`), a host config and a policy file.
pub struct Artefacts {
    pub dir: tempfile::TempDir,
}

impl Artefacts {
    pub fn new(tag: &str, self_test_rc: i32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let w = |n: &str, body: String| std::fs::write(dir.path().join(n), body).unwrap();
        w(
            "bulkhead-controller",
            format!("#!/bin/sh\n# controller build {tag}\n[ \"$1\" = --self-test ] && exit {self_test_rc}\nexit 0\n"),
        );
        w(
            "bulkhead-blockcard",
            format!("#!/bin/sh\n# blockcard build {tag}\nexit 0\n"),
        );
        w(
            "host.toml",
            format!("# host config {tag}\nlisten = \"0.0.0.0:8443\"\n"),
        );
        w("rights.toml", "version = 1\n".to_string());
        Artefacts { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn files(&self) -> Vec<(EventKind, PathBuf)> {
        vec![
            (EventKind::Binary, self.path().join("bulkhead-controller")),
            (EventKind::Binary, self.path().join("bulkhead-blockcard")),
            (EventKind::Config, self.path().join("host.toml")),
            (EventKind::Policy, self.path().join("rights.toml")),
        ]
    }

    pub fn manifest(&self, version: u64, env: &Environment, expires: u64) -> Manifest {
        let files = self.files();
        let refs: Vec<(EventKind, &Path)> = files.iter().map(|(k, p)| (*k, p.as_path())).collect();
        Manifest::from_files(version, env.clone(), expires, MeasurePcr::DEV, &refs).unwrap()
    }

    /// A release signed by the given key indices.
    pub fn release(
        &self,
        k: &Keys,
        version: u64,
        env: &Environment,
        signers: &[usize],
    ) -> SignedRelease {
        let m = self.manifest(version, env, bulkhead_rot::unix_now() + 3600);
        sign(&m, k, signers)
    }
}

pub fn sign(m: &Manifest, k: &Keys, signers: &[usize]) -> SignedRelease {
    let mut r = SignedRelease::new(m).unwrap();
    for i in signers {
        r.sign(&k.keys[*i]);
    }
    r
}

/// A simulated host: its own swtpm (its own seeds, so its own AK), its own state root.
pub struct SimHost {
    pub host: Host,
    pub swtpm: Swtpm,
    pub root: tempfile::TempDir,
}

impl SimHost {
    pub fn new(name: &str, env: &Environment, root: &TrustRoot) -> Self {
        let swtpm = Swtpm::start().expect("swtpm start");
        let dir = tempfile::tempdir().unwrap();
        let cfg = HostConfig {
            name: name.to_string(),
            root: dir.path().to_path_buf(),
            environment: env.clone(),
            pcr: MeasurePcr::DEV,
            dev_reset_pcr: true,
            trust_root: root.clone(),
        };
        let host = Host::open(cfg, &swtpm.tcti()).expect("open TPM");
        SimHost {
            host,
            swtpm,
            root: dir,
        }
    }
}

impl std::ops::Deref for SimHost {
    type Target = Host;
    fn deref(&self) -> &Host {
        &self.host
    }
}

impl std::ops::DerefMut for SimHost {
    fn deref_mut(&mut self) -> &mut Host {
        &mut self.host
    }
}

/// Deployer credentials minted by a real token service with the reviewed default policy.
pub struct Tokens {
    pub verifier: bulkhead_tokens::Verifier,
    pub revoked: bulkhead_tokens::RevocationList,
    pub operator: bulkhead_tokens::Identity,
    pub operator_token: String,
    pub customer: bulkhead_tokens::Identity,
    pub customer_token: String,
}

pub fn tokens() -> Tokens {
    use bulkhead_tokens::{MintRequest, Operation, Policy, Role, TokenService};
    let svc = TokenService::new(
        biscuit_auth::KeyPair::new(),
        Policy::parse(bulkhead_tokens::policy::DEFAULT_RIGHTS_TOML).unwrap(),
    );
    let operator = bulkhead_tokens::Identity {
        name: "operator".into(),
        role: Role::Operator,
        cert_sha256: "11".repeat(32),
    };
    let customer = bulkhead_tokens::Identity {
        name: "customer".into(),
        role: Role::Customer,
        cert_sha256: "22".repeat(32),
    };
    let (operator_token, _) = svc
        .mint(&MintRequest {
            caller: operator.clone(),
            hosts: vec!["*".into()],
            operations: vec![Operation::DrainHost],
            resources: None,
            ttl: Duration::from_secs(600),
        })
        .unwrap();
    let (customer_token, _) = svc
        .mint(&MintRequest {
            caller: customer.clone(),
            // Audience `*` needs the fleet right, which no customer group holds.
            hosts: vec!["host-0".into()],
            operations: vec![Operation::AttachVolume],
            resources: None,
            ttl: Duration::from_secs(600),
        })
        .unwrap();
    Tokens {
        verifier: bulkhead_tokens::Verifier::new(svc.public_key()),
        revoked: bulkhead_tokens::RevocationList::default(),
        operator,
        operator_token,
        customer,
        customer_token,
    }
}

/// Codes of every audit record, in order.
pub fn audit_codes(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["entry"]["op"].as_str().unwrap().to_string(),
                v["entry"]["code"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}
