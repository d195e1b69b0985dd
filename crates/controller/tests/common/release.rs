//! Releases for DeployRelease tests: a host pinning a fresh 2-of-3 release trust root, binaries
//! stripped of debug information as releases are built, signed manifests, uploads and deploys.

use std::path::{Path, PathBuf};

use bulkhead_rot::measure::{Environment, EventKind};
use bulkhead_rot::release::{Manifest, ReleaseKey, SignedRelease, TrustRoot};
use bulkhead_rot::tpm::MeasurePcr;
use bulkhead_tokens::Operation;
use sha2::{Digest, Sha256};

use super::guest::{release_dir, MIN10};
use super::{Daemon, Resp, HOST};

pub const DEPLOY_OPS: &[Operation] = &[Operation::UploadArtefact, Operation::DeployRelease];

/// A dev host state directory under `dir` pinning a fresh release trust root (3 release keys,
/// any 2 sign); the keys, to sign releases with.
pub fn host_with_release_root(dir: &Path) -> Vec<ReleaseKey> {
    bulkhead_tokens::statedir::StateDir::new(dir)
        .ensure_dev(HOST)
        .unwrap();
    let keys: Vec<ReleaseKey> = (0..3).map(|_| ReleaseKey::generate().unwrap()).collect();
    let root = TrustRoot::new(2, keys.iter().map(|k| k.public()).collect()).unwrap();
    std::fs::write(
        dir.join("release-root.json"),
        serde_json::to_vec(&root).unwrap(),
    )
    .unwrap();
    keys
}

/// `name` from the build copied into `src` and stripped of debug information, as a release is
/// built (the release profile keeps line tables); its path.
pub fn stripped(src: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(src).unwrap();
    let st = std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(release_dir().join(name))
        .arg(src.join(name))
        .status()
        .expect("objcopy (binutils)");
    assert!(st.success(), "objcopy --strip-debug {name}");
    src.join(name)
}

/// A release of `files` (names as they are), version `v`, signed by `signers`.
pub fn release(v: u64, files: &[&Path], signers: &[&ReleaseKey]) -> String {
    let list: Vec<(EventKind, &Path)> = files.iter().map(|f| (EventKind::Binary, *f)).collect();
    let m = Manifest::from_files(
        v,
        Environment::parse("dev").unwrap(),
        bulkhead_tokens::clock::unix_now() + 3600,
        MeasurePcr::DEV,
        &list,
    )
    .unwrap();
    let mut r = SignedRelease::new(&m).unwrap();
    for k in signers {
        r.sign(k);
    }
    r.to_json().unwrap()
}

/// One call as `who` with a token for `ops`.
pub fn call_as(
    d: &Daemon,
    who: &str,
    ops: &[Operation],
    method: &str,
    path: &str,
    body: &[u8],
) -> Resp {
    let t = d.mint(who, HOST, ops, MIN10);
    d.client(who)
        .request(method, path, Some(&t), body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Uploads every file (content-addressed, as a deployer).
pub fn upload(d: &Daemon, files: &[&Path]) {
    for f in files {
        let bytes = std::fs::read(f).unwrap();
        let sha = hex::encode(Sha256::digest(&bytes));
        let r = call_as(
            d,
            "deployer",
            DEPLOY_OPS,
            "PUT",
            &format!("/v1/host/artefacts/{sha}"),
            &bytes,
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json["sha256"], sha.as_str());
    }
}

/// GetHealth as the deployer: asserts 200, returns the answer's JSON.
pub fn health(d: &Daemon) -> serde_json::Value {
    let r = call_as(
        d,
        "deployer",
        &[Operation::GetHealth],
        "GET",
        "/v1/health",
        b"",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json
}

/// `POST /v1/host/releases` with `signed` as `who`.
pub fn deploy(d: &Daemon, who: &str, ops: &[Operation], signed: &str) -> Resp {
    let body = serde_json::json!({ "release": signed }).to_string();
    call_as(d, who, ops, "POST", "/v1/host/releases", body.as_bytes())
}

/// The file process `pid` runs (as it was named when it started: a binary rebuilt since shows
/// as `PATH (deleted)`).
pub fn exe(pid: impl std::fmt::Display) -> PathBuf {
    let p = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let s = p.display().to_string();
    PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s))
}
