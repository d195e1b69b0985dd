//! A local cluster in one directory: the dev CA and every certificate, the token-service key and
//! rights policy, one sealing host key per host (enrolled with the KMS), then the real daemons as
//! separate processes: `bulkhead-kms`, `bulkhead-token-service` (the only holder of the token
//! signing key), N × `bulkhead-controller`, `bulkhead-control`.
//!
//! With `record`, every inter-service link (customer → control plane, control plane → KMS,
//! control plane → token service, control plane → each controller) goes through a recording TCP relay in this orchestrating
//! process, so a test can grep everything that crossed the wire.
//!
//! Layout: `ca/` (CA, certificates, token public key, rights), `tokens/` (token signing key,
//! token-service audit log), `kms/` (its db, root key, audit,
//! `hosts/*.pub`), `host-N/` (each controller's state dir, `host.key`), `control/` + `control.toml`,
//! `logs/*.log`, `capture/*.bin`, and `cluster.json` (endpoints) once everything is up.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use bulkhead_tokens::pki::CaDir;
use bulkhead_tokens::policy::DEFAULT_RIGHTS_TOML;
use bulkhead_tokens::statedir::StateDir;
use bulkhead_tokens::Role;
use serde_json::{json, Value};

use crate::netns::{self, HostNet};

mod floor;
mod supervise;
use bulkhead_control::config::{Config, HostConfig};
pub use supervise::ControllerRestarted;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("pki: {0}")]
    Pki(#[from] bulkhead_tokens::pki::PkiError),
    #[error("state: {0}")]
    State(#[from] bulkhead_tokens::statedir::StateError),
    #[error("sealing: {0}")]
    Sealing(#[from] bulkhead_sealing::SealingError),
    #[error("{0} did not become ready (see {1})")]
    NotReady(String, PathBuf),
    #[error("binary {0} not found next to this one; build with `cargo build --release --workspace --bins`")]
    MissingBinary(PathBuf),
    #[error("bad hosts count")]
    BadHosts,
    #[error("root of trust: {0}")]
    Rot(String),
    #[error("{0}")]
    Net(String),
    #[error("control-plane replicas share a PostgreSQL database: set database_url")]
    ReplicasNeedPostgres,
}

fn io(p: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let s = p.as_ref().display().to_string();
    move |e| ClusterError::Io(s, e)
}

/// Running daemons; killed when dropped.
pub struct Cluster {
    pub dir: PathBuf,
    pub control_addr: String,
    pub kms_addr: String,
    /// The token service (the only process holding the token signing key).
    pub token_addr: String,
    /// The control plane's operator API (mTLS, operator certificates only).
    pub operator_addr: String,
    pub host_addrs: Vec<(String, String)>,
    /// Every control-plane replica's customer address, replica 1 (`control`) first.
    pub replica_addrs: Vec<String>,
    /// Hosts run measured start on their own TPM and the KMS requires their attestation.
    pub attested: bool,
    /// Each host's network namespace (empty: loopback ports).
    pub nets: Vec<HostNet>,
    /// The hosts' data network (with namespaces only).
    pub fabric: Option<netns::Fabric>,
    /// The storage node, when [`ReplicaOptions::storage`] asked for one.
    pub storage: Option<StorageNodeInfo>,
    /// The root-namespace end of the storage node's data-network link (rbd engine).
    storage_link: Option<String>,
    launches: Vec<HostLaunch>,
    children: Vec<(String, Child)>,
    /// Sealed hosts ([`ReplicaOptions::sealed`]): the VMs, host 1 first.
    pub sealed_vms: Vec<crate::sealed::SealedVm>,
    /// Each sealed host's controller ready, seconds after power-on (QEMU start).
    pub sealed_ready_secs: Vec<(String, f64)>,
}

/// How a host's controller was started (to start it again after a kill).
#[derive(Debug, Clone)]
struct HostLaunch {
    name: String,
    bin: PathBuf,
    config: PathBuf,
    args: Vec<String>,
    net: Option<HostNet>,
    /// What the host's releases are checked against, read once before its controller first
    /// ran (`None`: the host pins no release trust root; only `bin` is started).
    releases: Option<bulkhead_controller::supervisor::HostReleases>,
    /// The supervisor's floor file for the host (see `floor`).
    floor_file: PathBuf,
    /// Restart bookkeeping (see `supervise`).
    restart: supervise::RestartState,
}

impl HostLaunch {
    fn command(&self) -> Command {
        self.command_of(&self.bin)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Sealed hosts first: QEMU holds its tap inside the namespace torn down below.
        self.sealed_vms.clear();
        for (_, c) in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A host's keeper outlives its controller by design (a restarted controller adopts the
        // running guests); a cluster that goes away takes its keepers and their children along.
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                kill_keeper(&e.path().join("run"));
            }
        }
        for n in &self.nets {
            netns::teardown(n);
        }
        if let Some(n) = self.storage.as_ref().and_then(|s| s.net.as_ref()) {
            netns::teardown(n);
        }
        if let Some(l) = &self.storage_link {
            netns::remove_link(l);
        }
        if let Some(f) = &self.fabric {
            netns::teardown_fabric(f);
        }
    }
}

/// Kills the keeper whose pid file is in `run_dir` (if any), after its children (hypervisors
/// and cards, which would otherwise keep running).
pub fn kill_keeper(run_dir: &Path) {
    let Some(pid) = std::fs::read_to_string(run_dir.join("keeper.pid"))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    else {
        return;
    };
    let mut doomed = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let ppid = std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|st| {
                    st.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                        .and_then(|x| x.parse::<i32>().ok())
                });
            if ppid == Some(pid) {
                doomed.push(child);
            }
        }
    }
    doomed.push(pid);
    for p in doomed {
        // SAFETY: kill(2) with a pid read from /proc (a child of this cluster's keeper) and
        // SIGKILL; at worst the process is already gone (ESRCH).
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let _ = std::fs::remove_file(run_dir.join("keeper.pid"));
}

/// Namespaces made before the cluster exists; removed if start-up fails.
struct NetGuard(Vec<HostNet>, Option<netns::Fabric>);

impl Drop for NetGuard {
    fn drop(&mut self) {
        for n in &self.0 {
            netns::teardown(n);
        }
        if let Some(f) = &self.1 {
            netns::teardown_fabric(f);
        }
    }
}

impl Cluster {
    /// Kills one daemon by name (`kms`, `control`, `host-N`) with SIGKILL.
    pub fn kill9(&mut self, name: &str) {
        for (n, c) in self.children.iter_mut() {
            if n == name {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Starts the storage node again (after [`Cluster::kill9`] of `storage-1`, which also
    /// takes its engine down) at the same addresses, with the same state.
    pub fn restart_storage(&mut self) -> Result<(), ClusterError> {
        let Some(info) = self.storage.clone() else {
            return Err(ClusterError::Net("this cluster has no storage node".into()));
        };
        // Its qemu-storage-daemon dies with it (parent-death signal); wait until the old
        // listeners are gone so the new node can bind the same ports.
        let logs = self.dir.join("logs");
        let mut last = None;
        for _ in 0..50 {
            match spawn_ready(&info.name, &mut info.command(&self.dir), &logs) {
                Ok((child, _)) => {
                    self.children.push((info.name.clone(), child));
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        Err(last.unwrap_or(ClusterError::NotReady(info.name, logs)))
    }

    /// The pids of the daemons, by name.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .map(|(n, c)| (n.clone(), c.id()))
            .collect()
    }

    /// Restarts host `name`'s controller (after [`Cluster::kill9`]) with the same configuration
    /// and address, from the binary the host's supervisor picks (the active release's
    /// controller when it verifies, else the original). Its keeper, guests and cards run on
    /// and are adopted.
    pub fn restart_host(&mut self, name: &str) -> Result<(), ClusterError> {
        self.restart_host_with_env(name, &[])
    }

    /// As [`Cluster::restart_host`], with extra environment variables for the new controller
    /// process only (tests use it to arm the controller's `BULKHEAD_FAULT` hook on one host).
    pub fn restart_host_with_env(
        &mut self,
        name: &str,
        env: &[(&str, &str)],
    ) -> Result<(), ClusterError> {
        self.start_host_controller(name, env).map(|_| ())
    }

    /// Restarts the control plane (after [`Cluster::kill9`]) with the same configuration.
    pub fn restart_control(&mut self, bins: &Path) -> Result<(), ClusterError> {
        self.restart_control_with_env(bins, &[])
    }

    /// As [`Cluster::restart_control`], with extra environment variables for the new control
    /// plane process only (tests use it for its `BULKHEAD_TEST_DUMP_KMS_BODIES` switch).
    pub fn restart_control_with_env(
        &mut self,
        bins: &Path,
        env: &[(&str, &str)],
    ) -> Result<(), ClusterError> {
        self.children.retain(|(n, _)| n != "control");
        let cfg = self.dir.join("control.toml");
        let (child, _) = spawn_ready(
            "control",
            Command::new(bins.join("bulkhead-control"))
                .arg("serve")
                .arg("--config")
                .arg(&cfg)
                .arg("--dev")
                .envs(env.iter().copied()),
            &self.dir.join("logs"),
        )?;
        self.children.push(("control".into(), child));
        Ok(())
    }
}

/// The reviewed central monitoring rules, written into the cluster directory.
fn fleet_rules_file(dir: &Path) -> Result<PathBuf, ClusterError> {
    let p = dir.join("fleet-rules.toml");
    std::fs::write(&p, include_str!("../../../policy/fleet-rules.toml")).map_err(io(&p))?;
    Ok(p)
}

/// `rights.toml` for the cluster: the reviewed default, plus GetConsole for the control plane
/// (it serves the customer's GetConsoleOutput).
pub fn cluster_rights() -> String {
    if DEFAULT_RIGHTS_TOML.contains("\"DetachVolume\",\n]\nresources = [\"host\"") {
        DEFAULT_RIGHTS_TOML.replacen(
            "\"DetachVolume\",\n]\nresources = [\"host\"",
            "\"DetachVolume\", \"GetConsole\",\n]\nresources = [\"host\"",
            1,
        )
    } else {
        DEFAULT_RIGHTS_TOML.to_string()
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), ClusterError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(data).map_err(io(path))
}

/// Creates the cluster's files for `hosts` hosts (idempotent for what already exists).
///
/// `host_ips[n-1]`, when given, is host n's address in its network namespace: its TLS
/// certificate is (re-)issued to name it.
pub fn prepare(
    dir: &Path,
    hosts: usize,
    attested: bool,
    host_ips: &[String],
) -> Result<(), ClusterError> {
    if hosts == 0 || hosts > 64 {
        return Err(ClusterError::BadHosts);
    }
    let ca_dir = dir.join("ca");
    std::fs::create_dir_all(&ca_dir).map_err(io(&ca_dir))?;
    std::fs::create_dir_all(dir.join("logs")).map_err(io(dir))?;
    std::fs::create_dir_all(dir.join("kms/hosts")).map_err(io(dir))?;
    let rights = ca_dir.join("rights.toml");
    if !rights.exists() {
        std::fs::write(&rights, cluster_rights()).map_err(io(&rights))?;
    }
    // The token signing key lives only in tokens/, read by the token service alone. The dev
    // state-dir helper expects it in ca/ (and would mint a new one if it were missing), so it
    // goes back there for the duration of `ensure_dev` only.
    let tokens_dir = dir.join("tokens");
    std::fs::create_dir_all(&tokens_dir).map_err(io(&tokens_dir))?;
    let held = tokens_dir.join("token-service.key");
    let st = StateDir::new(&ca_dir);
    if held.exists() && !st.token_key().exists() {
        std::fs::rename(&held, st.token_key()).map_err(io(&held))?;
    }
    st.ensure_dev("host-1")?;
    std::fs::rename(st.token_key(), &held).map_err(io(&held))?;
    let ca = CaDir::new(&ca_dir);
    // The services' TLS identities name their role (`service`) and which service they are, and
    // every client pins the one it means to reach (`ServerIdentity`). A certificate from before
    // that (role `host`) is re-issued.
    for name in [
        bulkhead_tokens::pki::KMS_NAME,
        bulkhead_tokens::pki::CONTROL_PLANE_NAME,
        // The token service's TLS identity ("tokens"; `token-service.*` is the signing key).
        bulkhead_tokens::pki::TOKEN_SERVICE_NAME,
    ] {
        let current = ca.identity(name).ok().map(|(id, _)| id.role);
        if current != Some(Role::Service) {
            ca.issue(name, Role::Service, true)?;
        }
    }
    for n in 1..=hosts {
        let host = format!("host-{n}");
        match host_ips.get(n - 1) {
            Some(ip) => {
                ca.issue_with_sans(&host, Role::Host, true, std::slice::from_ref(ip))?;
            }
            None if !ca.cert(&host).exists() => {
                ca.issue(&host, Role::Host, true)?;
            }
            None => {}
        }
        let hd = dir.join(&host);
        std::fs::create_dir_all(&hd).map_err(io(&hd))?;
        let key_file = hd.join("host.key");
        // An attested host's key is created in its TPM at provisioning and unsealed by its
        // measured start ([`provision_attested`]); only an unattested host gets one here.
        if !attested && !key_file.exists() {
            let key = bulkhead_sealing::HostKey::generate()?;
            let bytes = key.to_file_bytes()?;
            write_private(&key_file, bytes.as_ref())?;
            let public = key.public().to_file_bytes();
            std::fs::write(hd.join("host.pub"), public).map_err(io(&hd))?;
            // Enrolment with the KMS: out of band (here: the same operator ceremony).
            std::fs::write(dir.join("kms/hosts").join(format!("{host}.pub")), public)
                .map_err(io(dir))?;
        }
    }
    Ok(())
}

/// The environment every dev cluster is provisioned and measured in.
pub const DEV_ENVIRONMENT: &str = "dev";

/// What a host runs, in measurement order: the four host binaries, then the rights policy.
const HOST_ARTEFACTS: &[&str] = &[
    "bulkhead-controller",
    "bulkhead-hypervisor",
    "bulkhead-blockcard",
    "bulkhead-netcard",
];

/// The attested cluster's release and enrolments (idempotent):
///
/// * `release/`: three dev release keys (2-of-3 trust root, `trust-root.json`), the artefacts
///   of release 1 (`v1/`: the host binaries from `bins` and the rights policy) and the signed
///   release `v1.json`;
/// * each host is provisioned by `bulkhead-launcher provision` into `host-N/rot/`: its own TPM
///   (swtpm state in `host-N/rot/swtpm`), the release installed, a fresh host identity sealed to
///   the release's expected PCR value; the enrolment it prints (AK, host public key,
///   environment) goes to `kms/attest/host-N.json`;
/// * `kms/attest.json`: the KMS's attestation policy naming all of the above.
pub fn provision_attested(dir: &Path, bins: &Path, hosts: usize) -> Result<(), ClusterError> {
    use bulkhead_rot::measure::{Environment, EventKind};
    use bulkhead_rot::release::{Manifest, ReleaseKey, SignedRelease, TrustRoot};
    use bulkhead_rot::tpm::MeasurePcr;
    let rot = |e: bulkhead_rot::RotError| ClusterError::Rot(e.to_string());
    let rel = dir.join("release");
    let v1 = rel.join("v1");
    let signed_path = rel.join("v1.json");
    let trust_path = rel.join("trust-root.json");
    if !signed_path.exists() {
        std::fs::create_dir_all(rel.join("keys")).map_err(io(&rel))?;
        std::fs::create_dir_all(&v1).map_err(io(&v1))?;
        let keys = (0..3)
            .map(|_| ReleaseKey::generate())
            .collect::<Result<Vec<_>, _>>()
            .map_err(rot)?;
        for (n, k) in keys.iter().enumerate() {
            let p = rel.join(format!("keys/release-{n}.secret"));
            if !p.exists() {
                write_private(&p, k.to_secret_text().as_bytes())?;
            }
        }
        let root = TrustRoot::new(2, keys.iter().map(ReleaseKey::public).collect()).map_err(rot)?;
        let text =
            serde_json::to_vec_pretty(&root).map_err(|e| ClusterError::Rot(e.to_string()))?;
        std::fs::write(&trust_path, text).map_err(io(&trust_path))?;
        let mut files = Vec::new();
        for name in HOST_ARTEFACTS {
            let dst = v1.join(name);
            std::fs::copy(bins.join(name), &dst).map_err(io(&dst))?;
            files.push((EventKind::Binary, dst));
        }
        let rights = v1.join("rights.toml");
        std::fs::copy(dir.join("ca/rights.toml"), &rights).map_err(io(&rights))?;
        files.push((EventKind::Policy, rights));
        let refs: Vec<(EventKind, &Path)> = files.iter().map(|(k, p)| (*k, p.as_path())).collect();
        let env = Environment::parse(DEV_ENVIRONMENT).map_err(rot)?;
        let expires = bulkhead_rot::unix_now() + 90 * 24 * 3600;
        let m = Manifest::from_files(1, env, expires, MeasurePcr::DEV, &refs).map_err(rot)?;
        let mut signed = SignedRelease::new(&m).map_err(rot)?;
        for k in keys.iter().take(2) {
            signed.sign(k);
        }
        let text = signed.to_json().map_err(rot)?;
        std::fs::write(&signed_path, text).map_err(io(&signed_path))?;
    }
    let enrol_dir = dir.join("kms/attest");
    std::fs::create_dir_all(&enrol_dir).map_err(io(&enrol_dir))?;
    let mut enrollments = Vec::new();
    for n in 1..=hosts {
        let host = format!("host-{n}");
        let enrol = enrol_dir.join(format!("{host}.json"));
        if !enrol.exists() {
            let out = launcher(bins, dir, &host, None)
                .arg("provision")
                .arg("--release")
                .arg(&signed_path)
                .arg("--from")
                .arg(&v1)
                .output()
                .map_err(io("bulkhead-launcher"))?;
            if !out.status.success() {
                return Err(ClusterError::Rot(format!(
                    "provisioning {host}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            let e: bulkhead_rot::attest::Enrollment = serde_json::from_slice(&out.stdout)
                .map_err(|e| ClusterError::Rot(format!("enrolment of {host}: {e}")))?;
            // The AK is enrolled only once the host proved it lives in a TPM whose EK the
            // (dev) manufacturer certified.
            let ek = endorse(bins, dir, &host, &e)?;
            std::fs::write(enrol_dir.join(format!("{host}.ek.der")), ek).map_err(io(&host))?;
            let public = hex::decode(&e.host_public)
                .map_err(|_| ClusterError::Rot(format!("enrolment of {host}: host key")))?;
            // The control plane presents this key; the KMS seals to the enrolment's copy.
            std::fs::write(dir.join(&host).join("host.pub"), &public).map_err(io(&host))?;
            std::fs::write(dir.join("kms/hosts").join(format!("{host}.pub")), &public)
                .map_err(io(&host))?;
            std::fs::write(&enrol, &out.stdout).map_err(io(&enrol))?;
        }
        enrollments.push(enrol);
    }
    let policy = bulkhead_rot::policy::AttestConfig {
        environment: DEV_ENVIRONMENT.into(),
        pcr: MeasurePcr::DEV.index(),
        trust_root: trust_path,
        releases: vec![signed_path],
        enrollments,
        sealed: Vec::new(),
    };
    let p = dir.join("kms/attest.json");
    let text = serde_json::to_vec_pretty(&policy).map_err(|e| ClusterError::Rot(e.to_string()))?;
    std::fs::write(&p, text).map_err(io(&p))?;
    Ok(())
}

/// `bulkhead-launcher` for `host` with the cluster's common arguments (its own dev TPM).
/// The enrolment ceremony's endorsement check (`bulkhead_rot::endorsement`): the host's EK
/// certificate must chain to the dev manufacturer's CA, and its TPM must open a credential made
/// for the enrolment's AK. Returns the EK certificate (DER).
fn endorse(
    bins: &Path,
    dir: &Path,
    host: &str,
    e: &bulkhead_rot::attest::Enrollment,
) -> Result<Vec<u8>, ClusterError> {
    use bulkhead_rot::endorsement::{make_credential, verify_ek_certificate, LocalManufacturer};
    use std::io::Write;
    let refused = |what: &str, why: String| {
        ClusterError::Rot(format!("endorsement of {host}: {what}: {why}"))
    };
    let out = launcher(bins, dir, host, None)
        .arg("ek-certificate")
        .output()
        .map_err(io("bulkhead-launcher"))?;
    if !out.status.success() {
        return Err(refused(
            "EK certificate",
            String::from_utf8_lossy(&out.stderr).trim().into(),
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| refused("EK certificate", e.to_string()))?;
    let der = v
        .get("ek_certificate")
        .and_then(|h| h.as_str())
        .and_then(|h| hex::decode(h).ok())
        .ok_or_else(|| refused("EK certificate", "not hex".into()))?;
    let trust = LocalManufacturer::new(&dir.join("manufacturer"))
        .and_then(|m| m.trust())
        .map_err(|e| refused("manufacturer CA", e.to_string()))?;
    let ek = verify_ek_certificate(&der, &trust, bulkhead_rot::unix_now())
        .map_err(|e| refused("EK certificate", e.to_string()))?;
    let (challenge, check) =
        make_credential(&ek, &e.ak).map_err(|e| refused("credential", e.to_string()))?;
    let mut child = launcher(bins, dir, host, None)
        .arg("activate-credential")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(io("bulkhead-launcher"))?;
    let body = serde_json::to_vec(&challenge).map_err(|e| refused("credential", e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&body).map_err(io("bulkhead-launcher"))?;
    }
    let out = child.wait_with_output().map_err(io("bulkhead-launcher"))?;
    if !out.status.success() {
        return Err(refused(
            "activation",
            String::from_utf8_lossy(&out.stderr).trim().into(),
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| refused("activation", e.to_string()))?;
    let secret = v
        .get("secret")
        .and_then(|h| h.as_str())
        .and_then(|h| hex::decode(h).ok())
        .ok_or_else(|| refused("activation", "no secret".into()))?;
    let ek = check
        .finish(&secret)
        .map_err(|e| refused("activation", e.to_string()))?;
    tracing::info!(host, ek = %ek.fingerprint(), "attestation key endorsed by the TPM's EK");
    Ok(der)
}

fn launcher(bins: &Path, dir: &Path, host: &str, net: Option<&HostNet>) -> Command {
    let program = bins.join("bulkhead-launcher");
    let mut c = match net {
        Some(n) => netns::command_in(n, &program),
        None => Command::new(program),
    };
    c.arg("--root")
        .arg(dir.join(host).join("rot"))
        .args(["--name", host, "--env", DEV_ENVIRONMENT, "--trust-root"])
        .arg(dir.join("release/trust-root.json"))
        .arg("--dev-swtpm")
        .arg("--dev-manufacturer")
        .arg(dir.join("manufacturer"))
        .arg("--audit-log")
        .arg(dir.join(host).join("launcher-audit.log"));
    c
}

/// Each controller's configuration (`host-N/controller.toml`, production form): it names only
/// the files this host needs — the CA certificate, its own TLS certificate and key, the token
/// public key, the policy — so no host directory holds any other key.
fn write_controller_config(
    dir: &Path,
    host: &str,
    guest_dir: Option<PathBuf>,
    attested: bool,
    listen: &str,
) -> Result<PathBuf, ClusterError> {
    let ca = dir.join("ca");
    let hd = dir.join(host);
    let mut t = toml::map::Map::new();
    let mut put = |k: &str, v: &Path| {
        t.insert(k.into(), toml::Value::String(v.display().to_string()));
    };
    put("ca_cert", &ca.join("ca.pem"));
    put("host_cert", &ca.join(format!("{host}.pem")));
    put("host_key", &ca.join(format!("{host}.key")));
    put("token_public_key", &ca.join("token-service.pub"));
    put("rights", &ca.join("rights.toml"));
    put("revocations", &ca.join("revoked.txt"));
    put("audit_log", &hd.join("audit.log"));
    put("volume_dir", &hd.join("volumes"));
    put("run_dir", &hd.join("run"));
    put("card_host_key", &hd.join("host.key"));
    if let Some(g) = guest_dir {
        put("guest_dir", &g);
    }
    if attested {
        put("attest_socket", &hd.join("attest.sock"));
        // The release trust root pinned at provisioning: the controller takes DeployRelease
        // (`bulkhead deploy --cluster`) of releases 2 of its 3 keys signed.
        put("release_root", &dir.join("release/trust-root.json"));
    }
    t.insert("host_id".into(), toml::Value::String(host.into()));
    t.insert("listen".into(), toml::Value::String(listen.into()));
    // The hosts of a dev cluster share one machine's CPUs: each would reserve the same host core
    // and hand out the same instance cores, so whole-core isolation means nothing here (and a
    // two-core machine would fit one instance per host). Each host shares its cores instead.
    t.insert(
        "core_isolation".into(),
        toml::Value::String("shared".into()),
    );
    let p = hd.join("controller.toml");
    std::fs::write(&p, toml::to_string(&t).unwrap_or_default()).map_err(io(&p))?;
    Ok(p)
}

fn spawn_ready(name: &str, cmd: &mut Command, logs: &Path) -> Result<(Child, Value), ClusterError> {
    spawn_ready_within(name, cmd, logs, None)
}

/// As [`spawn_ready`]; a daemon that has not printed its ready line within `deadline` is
/// killed and reported not ready.
fn spawn_ready_within(
    name: &str,
    cmd: &mut Command,
    logs: &Path,
    deadline: Option<std::time::Duration>,
) -> Result<(Child, Value), ClusterError> {
    let log_path = logs.join(format!("{name}.log"));
    // Appended: a restarted daemon's log follows its predecessor's.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(&log_path))?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .map_err(io(name))?;
    let out = match child.stdout.take() {
        Some(o) => o,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ClusterError::NotReady(name.into(), log_path));
        }
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        let ready = v["event"] == "ready";
        let _ = tx.send(v);
        if ready {
            // Keep draining stdout so the daemon never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        }
    });
    let v = match deadline {
        Some(d) => rx.recv_timeout(d).unwrap_or_else(|_| {
            tracing::error!(
                daemon = name,
                secs = d.as_secs_f64(),
                "no ready line within the deadline: killed"
            );
            Value::Null
        }),
        None => rx.recv().unwrap_or(Value::Null),
    };
    if v["event"] != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        return Err(ClusterError::NotReady(name.into(), log_path));
    }
    Ok((child, v))
}

/// Issues the storage node's certificate, gives it its network place and starts it.
fn start_storage(
    dir: &Path,
    opts: &StartOptions,
    engine: StorageEngine,
    cluster: &mut Cluster,
    logs: &Path,
) -> Result<StorageNodeInfo, ClusterError> {
    let bin = opts.bins.join("bulkhead-storage");
    if !bin.is_file() {
        return Err(ClusterError::MissingBinary(bin));
    }
    let mut net = None;
    let (control_ip, nbd_ip) = match (&mut cluster.fabric, engine) {
        (Some(fabric), StorageEngine::File) => {
            let tag = netns::tag_for(dir);
            let subnet = netns::subnet_of(&cluster.nets)
                .ok_or_else(|| ClusterError::Net("no host subnet".into()))?;
            let mut n = netns::setup_named(&tag, subnet, netns::STORAGE_SLOT, STORAGE_NODE)
                .map_err(|e| ClusterError::Net(e.to_string()))?;
            netns::join_fabric(&tag, subnet, fabric, &mut n, netns::STORAGE_SLOT)
                .map_err(|e| ClusterError::Net(e.to_string()))?;
            let ips = (n.host_ip.clone(), n.fabric_ip.clone().unwrap_or_default());
            net = Some(n);
            ips
        }
        (Some(fabric), StorageEngine::Rbd) => {
            let tag = netns::tag_for(dir);
            let subnet = netns::subnet_of(&cluster.nets)
                .ok_or_else(|| ClusterError::Net("no host subnet".into()))?;
            let (link, ip) =
                netns::join_fabric_from_root(&tag, subnet, fabric, netns::STORAGE_SLOT)
                    .map_err(|e| ClusterError::Net(e.to_string()))?;
            cluster.storage_link = Some(link);
            ("127.0.0.1".to_string(), ip)
        }
        (None, _) => ("127.0.0.1".to_string(), "127.0.0.1".to_string()),
    };
    let ca = CaDir::new(dir.join("ca"));
    let mut sans = vec![control_ip.clone(), nbd_ip.clone()];
    sans.dedup();
    ca.issue_with_sans(STORAGE_NODE, Role::Service, true, &sans)?;
    let mut info = StorageNodeInfo {
        name: STORAGE_NODE.to_string(),
        control_addr: format!("{control_ip}:0"),
        nbd_addr: format!("{nbd_ip}:0"),
        state_dir: dir.join(STORAGE_NODE),
        net,
        engine,
        bin,
    };
    let (child, v) = spawn_ready(STORAGE_NODE, &mut info.command(dir), logs)?;
    cluster.children.push((STORAGE_NODE.to_string(), child));
    // Pinned, so a restarted node comes back at the same addresses.
    info.control_addr = v["control"].as_str().unwrap_or("").to_string();
    info.nbd_addr = v["nbd"].as_str().unwrap_or("").to_string();
    cluster.storage = Some(info.clone());
    Ok(info)
}

fn listen_of(v: &Value) -> String {
    v["listen"].as_str().unwrap_or("").to_string()
}

/// A recording relay: listens on a loopback port and forwards to `target`, appending every byte
/// in both directions to `file`. Returns the relay's address.
pub fn relay(target: String, file: PathBuf) -> Result<String, ClusterError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("relay"))?;
    let addr = l.local_addr().map_err(io("relay"))?.to_string();
    let sink = Arc::new(Mutex::new(std::fs::File::create(&file).map_err(io(&file))?));
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(a) = conn else { continue };
            let Ok(b) = TcpStream::connect(&target) else {
                continue;
            };
            let _ = a.set_nodelay(true);
            let _ = b.set_nodelay(true);
            for (mut from, mut to) in [
                (a.try_clone(), b.try_clone()),
                (b.try_clone(), a.try_clone()),
            ]
            .into_iter()
            .filter_map(|(x, y)| Some((x.ok()?, y.ok()?)))
            {
                let sink = Arc::clone(&sink);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let chunk = buf.get(..n).unwrap_or(&[]);
                        if let Ok(mut f) = sink.lock() {
                            let _ = f.write_all(chunk);
                        }
                        if to.write_all(chunk).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    Ok(addr)
}

/// Options for [`start`].
#[derive(Debug, Clone)]
pub struct StartOptions {
    pub hosts: usize,
    /// Directory holding `bulkhead-kms`, `bulkhead-controller`, `bulkhead-control`.
    pub bins: PathBuf,
    /// Interpose recording relays on every inter-service link.
    pub record: bool,
    pub poll_interval_ms: u64,
    /// Extra arguments for each controller (e.g. `--backend detached` where supported).
    pub controller_args: Vec<String>,
    /// PostgreSQL for the control plane's state (default SQLite).
    pub database_url: Option<String>,
    /// Hosts with a TPM (swtpm), measured start and attestation, and a KMS that requires it.
    /// `None`: when `swtpm` and `bulkhead-launcher` are present.
    pub attest: Option<bool>,
    /// Each host in its own network namespace. `None`: when running as root and namespaces can
    /// be created here.
    pub netns: Option<bool>,
}

/// Whether this machine can run attested hosts (swtpm on PATH, the launcher built).
pub fn can_attest(bins: &Path) -> bool {
    bulkhead_rot::swtpm::swtpm_available()
        && bulkhead_rot::swtpm::swtpm_setup_available()
        && bins.join("bulkhead-launcher").is_file()
}

/// Control-plane replicas and sizes for [`start_replicated`] (the defaults are [`start`]'s).
#[derive(Debug, Clone, Default)]
pub struct ReplicaOptions {
    /// Control-plane processes serving the cluster (0 or 1: one). More than one needs
    /// `database_url` (PostgreSQL is what they share); replica 1 is `control` (at
    /// [`Cluster::control_addr`]), replica N is `control-N`, each with its own state directory
    /// (its audit log) and the same root key; [`Cluster::replica_addrs`] lists them all.
    pub replicas: usize,
    /// Each replica's workflow lease (ms; default the control plane's).
    pub workflow_lease_ms: Option<u64>,
    /// Whole cores each host offers (default: half this machine's threads). With the detached
    /// controller backend no guest runs, so a test may offer more than the machine has.
    pub host_cores: Option<u32>,
    /// A storage node (`bulkhead-storage`, named [`STORAGE_NODE`]) for network volumes. `None`:
    /// volumes are files on the host that attaches them.
    pub storage: Option<StorageEngine>,
    /// Sealed hosts: every host is the host image booted under QEMU (see [`crate::sealed`])
    /// instead of host processes. Needs root, QEMU, OVMF, swtpm and a built image.
    pub sealed: Option<SealedOptions>,
}

/// How a dev cluster's sealed hosts are booted and checked.
#[derive(Debug, Clone)]
pub struct SealedOptions {
    /// The host image directory (`make host-image`): every host must run it, and its
    /// `manifest.json` holds the boot PCRs the control plane demands.
    pub image: PathBuf,
    /// Hosts booted from another image directory than `image` (host number, directory): a
    /// development switch to watch the control plane refuse a host whose image differs.
    pub boot_other_image: Vec<(usize, PathBuf)>,
    /// How long each host may take from power-on to a ready controller.
    pub boot_timeout: std::time::Duration,
    /// Hosts whose TPM another manufacturer made (a CA the control plane does not trust): a
    /// development switch to watch the control plane refuse to enrol their AK.
    pub rogue_tpm: Vec<usize>,
}

/// The storage node's certificate name in a dev cluster.
pub const STORAGE_NODE: &str = "storage-1";

/// Which engine the dev cluster's storage node keeps volumes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageEngine {
    /// A file per volume; the node runs in its own network namespace (when namespaces are
    /// used), reachable by hosts over the data network and by the control plane over its link.
    File,
    /// RBD images in the Ceph cluster named by `BULKHEAD_CEPH_CONF`, `BULKHEAD_CEPH_POOL`,
    /// `BULKHEAD_CEPH_ID` and `BULKHEAD_CEPH_KEYRING` (what `scripts/with-ceph.sh` exports). The
    /// node runs in the orchestrating namespace, where the Ceph daemons are, joined to the
    /// hosts' data network.
    Rbd,
}

/// The running storage node of a dev cluster.
#[derive(Debug, Clone)]
pub struct StorageNodeInfo {
    pub name: String,
    /// Its control API (what the control plane calls).
    pub control_addr: String,
    /// Its NBD-over-TLS listener (what hosts' cards connect to).
    pub nbd_addr: String,
    pub state_dir: PathBuf,
    /// Its own namespace (file engine with namespaces).
    pub net: Option<HostNet>,
    engine: StorageEngine,
    bin: PathBuf,
}

impl StorageNodeInfo {
    fn command(&self, dir: &Path) -> Command {
        let mut c = match &self.net {
            Some(x) => netns::command_in(x, &self.bin),
            None => Command::new(&self.bin),
        };
        c.arg("--ca-dir")
            .arg(dir.join("ca"))
            .arg("--name")
            .arg(&self.name)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--listen-control")
            .arg(&self.control_addr)
            .arg("--listen-nbd")
            .arg(&self.nbd_addr)
            .arg("--engine")
            .arg(match self.engine {
                StorageEngine::File => "file",
                StorageEngine::Rbd => "rbd",
            })
            .env("BULKHEAD_LOG", "info");
        c
    }
}

/// Prepares and starts the whole cluster; returns once every daemon printed its ready line.
pub fn start(dir: &Path, opts: &StartOptions) -> Result<Cluster, ClusterError> {
    start_replicated(dir, opts, &ReplicaOptions::default())
}

/// As [`start`], with [`ReplicaOptions`].
pub fn start_replicated(
    dir: &Path,
    opts: &StartOptions,
    more: &ReplicaOptions,
) -> Result<Cluster, ClusterError> {
    if more.replicas > 1 && opts.database_url.is_none() {
        return Err(ClusterError::ReplicasNeedPostgres);
    }
    for b in [
        "bulkhead-kms",
        "bulkhead-token-service",
        "bulkhead-controller",
        "bulkhead-control",
    ] {
        if !opts.bins.join(b).is_file() {
            return Err(ClusterError::MissingBinary(opts.bins.join(b)));
        }
    }
    if let Some(s) = &more.sealed {
        if let Some(why) = crate::sealed::missing_resource()
            .or_else(|| crate::sealed::image_missing(&s.image))
            .or_else(|| (!netns::available()).then(|| "network namespaces unavailable".into()))
        {
            return Err(ClusterError::Net(format!("sealed hosts: {why}")));
        }
        if more.storage.is_some() {
            return Err(ClusterError::Net(
                "sealed hosts run no block cards: no storage node".into(),
            ));
        }
    }
    let sealed_mode = more.sealed.is_some();
    // Sealed hosts attest their boot chain to the control plane; the process hosts' measured
    // start (launcher, signed release, KMS policy) does not apply to them.
    let attested = !sealed_mode && opts.attest.unwrap_or_else(|| can_attest(&opts.bins));
    if attested && !can_attest(&opts.bins) {
        return Err(ClusterError::Rot(
            "attested hosts need swtpm on PATH and bulkhead-launcher".into(),
        ));
    }
    let use_netns = sealed_mode || opts.netns.unwrap_or_else(netns::available);
    // A fallback is said out loud (tests with BULKHEAD_REQUIRE_ALL=1 also fail on it: they check
    // `Cluster::attested` and `Cluster::nets`).
    if !attested {
        tracing::warn!(
            "hosts run UNATTESTED: swtpm or bulkhead-launcher missing, or not asked for"
        );
    }
    if !use_netns {
        tracing::warn!(
            "hosts share the loopback network: not root, or network namespaces not allowed here"
        );
    }
    let mut guard = NetGuard(Vec::new(), None);
    if use_netns {
        let tag = netns::tag_for(dir);
        // Stale namespaces of an earlier run in this directory go first, so the subnet they
        // held is free again.
        for n in 1..=opts.hosts {
            netns::teardown(&HostNet {
                ns: format!("bulkhead-{tag}-host-{n}"),
                outer_if: format!("bk{tag}o{n}"),
                host_ip: String::new(),
                outer_ip: String::new(),
                fabric_ip: None,
            });
        }
        netns::teardown(&HostNet {
            ns: format!("bulkhead-{tag}-{STORAGE_NODE}"),
            outer_if: format!("bk{tag}o{}", netns::STORAGE_SLOT),
            host_ip: String::new(),
            outer_ip: String::new(),
            fabric_ip: None,
        });
        netns::remove_link(&format!("bk{tag}s{}", netns::STORAGE_SLOT));
        netns::teardown_fabric(&netns::Fabric {
            ns: netns::fabric_ns(&tag),
            links: Vec::new(),
        });
        let subnet = netns::subnet(&tag);
        for n in 1..=opts.hosts {
            guard
                .0
                .push(netns::setup(&tag, subnet, n).map_err(|e| ClusterError::Net(e.to_string()))?);
        }
        if sealed_mode {
            for (i, n) in guard.0.iter().enumerate() {
                netns::bridge_to_tap(&tag, i + 1, n)
                    .map_err(|e| ClusterError::Net(e.to_string()))?;
            }
        } else {
            guard.1 = Some(
                netns::setup_fabric(&tag, subnet, &mut guard.0)
                    .map_err(|e| ClusterError::Net(e.to_string()))?,
            );
        }
    } else {
        tracing::warn!(
            "hosts share the loopback network (not root, or namespaces unavailable here)"
        );
    }
    let host_ips: Vec<String> = guard.0.iter().map(|n| n.host_ip.clone()).collect();
    prepare(dir, opts.hosts, attested, &host_ips)?;
    if attested {
        provision_attested(dir, &opts.bins, opts.hosts)?;
    } else {
        tracing::warn!(
            "hosts without a TPM: the KMS trusts enrolled host keys without attestation"
        );
        let _ = std::fs::remove_file(dir.join("kms/attest.json"));
    }
    let guest_dir = opts
        .bins
        .parent()
        .map(|t| t.join("guest"))
        .filter(|g| g.join("vmlinux").is_file());
    let logs = dir.join("logs");
    let cap = dir.join("capture");
    if opts.record {
        std::fs::create_dir_all(&cap).map_err(io(&cap))?;
    }
    let mut cluster = Cluster {
        dir: dir.to_path_buf(),
        control_addr: String::new(),
        kms_addr: String::new(),
        token_addr: String::new(),
        operator_addr: String::new(),
        host_addrs: Vec::new(),
        replica_addrs: Vec::new(),
        attested,
        nets: std::mem::take(&mut guard.0),
        fabric: guard.1.take(),
        storage: None,
        storage_link: None,
        launches: Vec::new(),
        children: Vec::new(),
        sealed_vms: Vec::new(),
        sealed_ready_secs: Vec::new(),
    };
    let nets = cluster.nets.clone();
    let via = |name: &str, target: String| -> Result<String, ClusterError> {
        if opts.record {
            relay(target, cap.join(format!("{name}.bin")))
        } else {
            Ok(target)
        }
    };
    let (kms, v) = spawn_ready(
        "kms",
        Command::new(opts.bins.join("bulkhead-kms"))
            .args(["--dev", "--listen", "127.0.0.1:0", "--ca-dir"])
            .arg(dir.join("ca"))
            .arg("--state-dir")
            .arg(dir.join("kms")),
        &logs,
    )?;
    cluster.children.push(("kms".into(), kms));
    cluster.kms_addr = listen_of(&v);
    let (tokens, v) = spawn_ready(
        "token-service",
        Command::new(opts.bins.join("bulkhead-token-service"))
            .args(["--listen", "127.0.0.1:0", "--ca-dir"])
            .arg(dir.join("ca"))
            .arg("--signing-key")
            .arg(dir.join("tokens/token-service.key"))
            .arg("--rights")
            .arg(dir.join("ca/rights.toml"))
            .arg("--state-dir")
            .arg(dir.join("tokens")),
        &logs,
    )?;
    cluster.children.push(("token-service".into(), tokens));
    cluster.token_addr = listen_of(&v);
    let storage_node = match more.storage {
        Some(engine) => Some(start_storage(dir, opts, engine, &mut cluster, &logs)?),
        None => None,
    };
    let mut hosts = Vec::new();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let cores = more
        .host_cores
        .unwrap_or_else(|| u32::try_from((cores / 2).max(1)).unwrap_or(1));
    if let Some(s) = &more.sealed {
        hosts = start_sealed(dir, s, opts.hosts, &mut cluster)?;
    }
    for n in (1..=opts.hosts).filter(|_| !sealed_mode) {
        let host = format!("host-{n}");
        let controller_bin = if attested {
            // Measured start: the agent measures the installed release and unseals the host
            // key; the controller that runs is the measured copy (its hypervisor and block
            // card are found next to it).
            let (agent, _) = spawn_ready(
                &format!("attest-{host}"),
                launcher(&opts.bins, dir, &host, nets.get(n - 1))
                    .arg("serve")
                    .arg("--socket")
                    .arg(dir.join(&host).join("attest.sock"))
                    .arg("--host-key-out")
                    .arg(dir.join(&host).join("host.key")),
                &logs,
            )?;
            cluster.children.push((format!("attest-{host}"), agent));
            dir.join(&host).join("rot/releases/v1/bulkhead-controller")
        } else {
            opts.bins.join("bulkhead-controller")
        };
        let net = nets.get(n - 1);
        let ip = net.map_or("127.0.0.1".to_string(), |x| x.host_ip.clone());
        let cfg =
            write_controller_config(dir, &host, guest_dir.clone(), attested, &format!("{ip}:0"))?;
        let mut args = opts.controller_args.clone();
        // Net cards listen on the host's data-network address (VPC datagrams between hosts).
        if let Some(f) = net.and_then(|x| x.fabric_ip.clone()) {
            args.extend(["--net-host-ip".to_string(), f]);
        }
        // `bulkhead up` is the controller's supervisor (see `supervise`): the controller exits
        // to apply a release only when it knows it is started again.
        args.push("--supervised".to_string());
        let launch = HostLaunch {
            name: host.clone(),
            bin: controller_bin.clone(),
            releases: supervise::host_releases(&host, &cfg),
            config: cfg,
            args,
            net: net.cloned(),
            floor_file: floor::floor_path(dir, &host),
            restart: supervise::RestartState::default(),
        };
        cluster.launches.push(launch);
        // Chosen as on every restart: a cluster directory whose host applied a release starts
        // that release's controller again (not below the host's floor).
        let (_, v) = cluster.start_host_controller(&host, &[])?;
        let addr = listen_of(&v);
        // Pinned, so a restarted controller comes back at the same address.
        write_controller_config(dir, &host, guest_dir.clone(), attested, &addr)?;
        cluster.host_addrs.push((host.clone(), addr.clone()));
        hosts.push(HostConfig {
            host_id: host.clone(),
            addr: via(&format!("control-to-{host}"), addr)?,
            cores,
            public_key: dir.join(&host).join("host.pub"),
            sealed: None,
        });
    }
    let cfg = Config {
        listen: "127.0.0.1:0".into(),
        state_dir: dir.join("control"),
        ca_dir: dir.join("ca"),
        kms_addr: via("control-to-kms", cluster.kms_addr.clone())?,
        token_service_addr: Some(via("control-to-tokens", cluster.token_addr.clone())?),
        poll_interval_ms: opts.poll_interval_ms,
        database_url: opts.database_url.clone(),
        operator_listen: Some("127.0.0.1:0".into()),
        attest_config: attested.then(|| dir.join("kms/attest.json")),
        fleet_rules: Some(fleet_rules_file(dir)?),
        workflow_lease_ms: more.workflow_lease_ms,
        region: None,
        hosts,
        storage_nodes: match &storage_node {
            Some(n) => vec![bulkhead_control::storage::StorageNodeConfig {
                node_id: n.name.clone(),
                api_addr: via("control-to-storage", n.control_addr.clone())?,
                nbd_addr: n.nbd_addr.clone(),
            }],
            None => Vec::new(),
        },
    };
    let cfg_path = dir.join("control.toml");
    let text = toml::to_string(&cfg).map_err(|_| {
        ClusterError::Io(
            "control.toml".into(),
            std::io::ErrorKind::InvalidData.into(),
        )
    })?;
    std::fs::write(&cfg_path, text).map_err(io(&cfg_path))?;
    let (control, v) = spawn_ready(
        "control",
        Command::new(opts.bins.join("bulkhead-control"))
            .arg("serve")
            .arg("--config")
            .arg(&cfg_path)
            .arg("--dev"),
        &logs,
    )?;
    cluster.children.push(("control".into(), control));
    cluster.operator_addr = v["operator_listen"].as_str().unwrap_or("").to_string();
    // Pin the ports so a restarted control plane comes back at the same addresses.
    let cfg = Config {
        listen: listen_of(&v),
        operator_listen: Some(cluster.operator_addr.clone()),
        ..cfg
    };
    let text = toml::to_string(&cfg).map_err(|_| {
        ClusterError::Io(
            "control.toml".into(),
            std::io::ErrorKind::InvalidData.into(),
        )
    })?;
    std::fs::write(&cfg_path, text).map_err(io(&cfg_path))?;
    cluster.control_addr = via("customer-to-control", listen_of(&v))?;
    cluster.replica_addrs.push(cluster.control_addr.clone());
    // Further replicas: the same hosts, KMS and database; their own state directory (audit
    // log) holding the same root key (the customers' wrapped secrets open under it).
    for n in 2..=more.replicas {
        let name = format!("control-{n}");
        let state = dir.join(&name);
        std::fs::create_dir_all(&state).map_err(io(&state))?;
        let key = state.join("root.key");
        std::fs::copy(dir.join("control/root.key"), &key).map_err(io(&key))?;
        let rcfg = Config {
            listen: "127.0.0.1:0".into(),
            operator_listen: Some("127.0.0.1:0".into()),
            state_dir: state,
            ..cfg.clone()
        };
        let path = dir.join(format!("{name}.toml"));
        let text = toml::to_string(&rcfg)
            .map_err(|_| ClusterError::Io(name.clone(), std::io::ErrorKind::InvalidData.into()))?;
        std::fs::write(&path, text).map_err(io(&path))?;
        let (child, v) = spawn_ready(
            &name,
            Command::new(opts.bins.join("bulkhead-control"))
                .arg("serve")
                .arg("--config")
                .arg(&path)
                .arg("--dev"),
            &logs,
        )?;
        cluster.children.push((name.clone(), child));
        cluster
            .replica_addrs
            .push(via(&format!("customer-to-{name}"), listen_of(&v))?);
    }
    let info = json!({
        "control": cluster.control_addr,
        "kms": cluster.kms_addr,
        "tokens": cluster.token_addr,
        "operator": cluster.operator_addr,
        "hosts": cluster.host_addrs.iter().map(|(h, a)| json!({"host_id": h, "addr": a})).collect::<Vec<_>>(),
        "ca": dir.join("ca/ca.pem"),
        "config": cfg_path,
        "attested": attested,
        "netns": cluster.nets.iter().map(|n| json!({"ns": n.ns, "host_ip": n.host_ip, "fabric_ip": n.fabric_ip})).collect::<Vec<_>>(),
        "fabric": cluster.fabric.as_ref().map(|f| json!({"ns": f.ns, "links": f.links})),
        "pids": cluster.pids().into_iter().map(|(n, p)| json!({"name": n, "pid": p})).collect::<Vec<_>>(),
    });
    let info_path = dir.join("cluster.json");
    std::fs::write(
        &info_path,
        serde_json::to_string_pretty(&info).unwrap_or_default(),
    )
    .map_err(io(&info_path))?;
    Ok(cluster)
}

/// Boots every host of a sealed cluster (all powered on at once, then each awaited) and
/// returns their entries for the control plane: address `host_ip:8443`, no cores (their
/// controllers run the detached backend: no guests here), and the boot-chain policy — the
/// image manifest every host must match, the digest of its own configuration disk, the
/// attestation key its agent printed at start, and the dev TPM manufacturer's CA: the control
/// plane enrols that AK only after the host's TPM proves it holds it under an EK that CA
/// certified. Each host's swtpm is made by that manufacturer (`swtpm_setup --create-ek-cert`),
/// or by a rogue one for the hosts of `s.rogue_tpm`.
fn start_sealed(
    dir: &Path,
    s: &SealedOptions,
    hosts: usize,
    cluster: &mut Cluster,
) -> Result<Vec<HostConfig>, ClusterError> {
    use crate::sealed::{SealedVm, MANIFEST, MTLS_PORT, UKI};
    let tag = netns::tag_for(dir);
    let sealed_err = |e: crate::sealed::SealedError| ClusterError::Rot(e.to_string());
    let made = |d: &str| {
        bulkhead_rot::endorsement::LocalManufacturer::new(&dir.join(d))
            .map_err(|e| ClusterError::Rot(e.to_string()))
    };
    let manufacturer = made("manufacturer")?;
    let rogue = made("rogue-manufacturer")?;
    let mut digests = Vec::new();
    for n in 1..=hosts {
        let host = format!("host-{n}");
        let net = cluster
            .nets
            .get(n - 1)
            .cloned()
            .ok_or(ClusterError::BadHosts)?;
        let parse = |a: &str| {
            a.parse::<std::net::Ipv4Addr>()
                .map_err(|_| ClusterError::Net(format!("bad address {a}")))
        };
        let hd = dir.join(&host);
        let disk = hd.join("config.img");
        let digest = crate::sealed::write_config_disk(
            &dir.join("ca"),
            &host,
            parse(&net.host_ip)?,
            30,
            parse(&net.outer_ip)?,
            &disk,
        )
        .map_err(sealed_err)?;
        let image = s
            .boot_other_image
            .iter()
            .find(|(k, _)| *k == n)
            .map_or(s.image.clone(), |(_, p)| p.clone());
        if image != s.image {
            tracing::warn!(host, image = %image.display(), "booting this host from ANOTHER image than the one the control plane expects");
        }
        let vm = SealedVm::boot(
            &host,
            &hd.join("vm"),
            &image.join(UKI),
            &disk,
            &net.ns,
            &format!("bk{tag}t{n}"),
            Some(if s.rogue_tpm.contains(&n) {
                tracing::warn!(host, "this host's TPM is made by a ROGUE manufacturer");
                &rogue
            } else {
                &manufacturer
            }),
        )
        .map_err(sealed_err)?;
        cluster.sealed_vms.push(vm);
        digests.push(digest);
    }
    let mut out = Vec::new();
    for (i, vm) in cluster.sealed_vms.iter_mut().enumerate() {
        let ready = vm
            .wait_for("\"event\":\"ready\"", s.boot_timeout)
            .map_err(sealed_err)?;
        let ak = vm.ak().map_err(sealed_err)?;
        tracing::info!(host = %vm.name, secs = ready.as_secs_f64(), "sealed host's controller ready");
        cluster
            .sealed_ready_secs
            .push((vm.name.clone(), ready.as_secs_f64()));
        let net = cluster.nets.get(i).ok_or(ClusterError::BadHosts)?;
        let addr = format!("{}:{MTLS_PORT}", net.host_ip);
        cluster.host_addrs.push((vm.name.clone(), addr.clone()));
        out.push(HostConfig {
            host_id: vm.name.clone(),
            addr,
            cores: 0,
            public_key: dir.join(&vm.name).join("host.pub"),
            sealed: Some(bulkhead_control::sealed::SealedHostConfig {
                image_manifest: s.image.join(MANIFEST),
                config_sha256: hex::encode(digests.get(i).ok_or(ClusterError::BadHosts)?),
                ak,
                ek_roots: vec![manufacturer.root_cert()],
                ek_intermediates: vec![manufacturer.issuer_cert()],
            }),
        });
    }
    Ok(out)
}
