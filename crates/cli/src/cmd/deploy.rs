//! `bulkhead deploy`: the deployment service, by one wave engine (`bulkhead_rot::deploy`), in
//! one of two modes:
//!
//! * `--cluster DIR`: the real hosts of a running `bulkhead up` cluster, through their
//!   controllers over mTLS as the cluster's `deployer` (upload, DeployRelease, health,
//!   attestation with the new measurements). The work is done by `bulkhead-devcluster deploy`
//!   (found next to this binary), which this command becomes.
//! * `--fleet FLEET`: a fleet of simulated hosts (each with its own swtpm whose state persists
//!   under FLEET/host-N/swtpm). Deployer token, identity and audit log come from the dev state
//!   directory (`bulkhead ca`/`bulkhead token`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bulkhead_rot::attest::{Enrollment, Verifier};
use bulkhead_rot::deploy::{deploy, DeployerAuth, Deployment};
use bulkhead_rot::host::{Host, HostConfig};
use bulkhead_rot::measure::Environment;
use bulkhead_rot::release::{SignedRelease, TrustRoot};
use bulkhead_rot::swtpm::Swtpm;
use bulkhead_rot::tpm::MeasurePcr;
use bulkhead_rot::RotError;
use bulkhead_tokens::statedir::StateDir;
use bulkhead_tokens::RevocationList;
use clap::Args;

use super::CliError;

#[derive(Debug, Args)]
pub struct DeployArgs {
    #[arg(long)]
    release: PathBuf,
    /// Directory holding the release's artefacts.
    #[arg(long)]
    artefacts: PathBuf,
    /// The cluster directory of a running `bulkhead up` (real hosts).
    #[arg(long, conflicts_with_all = ["trust_root", "env", "fleet", "dev_dir", "token"])]
    cluster: Option<PathBuf>,
    #[arg(long, required_unless_present = "cluster")]
    trust_root: Option<PathBuf>,
    #[arg(long, required_unless_present = "cluster")]
    env: Option<String>,
    /// Simulated fleet state.
    #[arg(long, required_unless_present = "cluster")]
    fleet: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Dev state directory (CA, token-service key, audit.log).
    #[arg(long, required_unless_present = "cluster")]
    dev_dir: Option<PathBuf>,
    /// The deployer (a certificate issued in the dev CA; with --cluster, in the cluster's CA,
    /// default `deployer`).
    #[arg(long, required_unless_present = "cluster")]
    caller: Option<String>,
    /// Deployer token (needs DrainHost on every target host; with --cluster, minted by the
    /// cluster's token service for the deployer's certificate).
    #[arg(long, required_unless_present = "cluster")]
    token: Option<String>,
}

/// `--cluster`: becomes `bulkhead-devcluster deploy` (returns only on failure to start it).
fn real_hosts(dir: &Path, a: &DeployArgs) -> Result<(), CliError> {
    use std::os::unix::process::CommandExt;
    let bin = super::sibling_binary("bulkhead-devcluster")?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("deploy")
        .arg("--dir")
        .arg(dir)
        .arg("--release")
        .arg(&a.release)
        .arg("--artefacts")
        .arg(&a.artefacts);
    if let Some(c) = &a.caller {
        cmd.arg("--caller").arg(c);
    }
    let e = cmd.exec();
    Err(CliError::Io(bin.display().to_string(), e))
}

fn required<'a, T>(v: &'a Option<T>, name: &str) -> Result<&'a T, CliError> {
    v.as_ref()
        .ok_or_else(|| CliError::BadArgument(format!("--{name} is required without --cluster")))
}

fn rot(e: impl Into<RotError>) -> CliError {
    CliError::Rot(e.into())
}

fn read(p: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(p).map_err(|e| CliError::Io(p.display().to_string(), e))
}

pub fn run(a: DeployArgs) -> Result<(), CliError> {
    if let Some(dir) = &a.cluster {
        return real_hosts(dir, &a);
    }
    let env = Environment::parse(required(&a.env, "env")?).map_err(rot)?;
    let root = TrustRoot::parse(&read(required(&a.trust_root, "trust-root")?)?).map_err(rot)?;
    let release = SignedRelease::parse(&read(&a.release)?).map_err(rot)?;
    let state = StateDir::new(required(&a.dev_dir, "dev-dir")?);
    let (identity, _) = state.ca().identity(required(&a.caller, "caller")?)?;
    let fleet = required(&a.fleet, "fleet")?;
    let token = required(&a.token, "token")?;
    let tokens = state.verifier()?;
    let revoked = match std::fs::read_to_string(state.revoked()) {
        Ok(t) => RevocationList::parse(&t).0,
        Err(_) => RevocationList::default(),
    };
    let (audit, _) = bulkhead_audit::AuditLog::open(&state.audit_log())
        .map_err(|e| CliError::BadArgument(format!("audit log: {e}")))?;

    std::fs::create_dir_all(fleet).map_err(|e| CliError::Io(fleet.display().to_string(), e))?;
    let enrol_path = fleet.join("enrollments.json");
    let mut enrolled: BTreeMap<String, Enrollment> = match std::fs::read(&enrol_path) {
        Ok(raw) => serde_json::from_slice(&raw)
            .map_err(|_| CliError::BadArgument("enrollments.json".into()))?,
        Err(_) => BTreeMap::new(),
    };
    let mut verifier = Verifier::new(env.clone(), MeasurePcr::DEV);
    let mut tpms = Vec::new();
    let mut hosts = Vec::new();
    for i in 0..a.hosts {
        let name = format!("host-{i}");
        let dir = fleet.join(&name);
        let sw = Swtpm::start_with_state(&dir.join("swtpm")).map_err(rot)?;
        let cfg = HostConfig {
            name: name.clone(),
            root: dir,
            environment: env.clone(),
            pcr: MeasurePcr::DEV,
            dev_reset_pcr: true,
            trust_root: root.clone(),
        };
        let mut h = Host::open(cfg, &sw.tcti()).map_err(rot)?;
        if h.versions().map_err(rot)?.0.is_none() {
            // Provisioning ceremony for a new simulated host: first release + fresh identity.
            let e = h.provision(&release, &a.artefacts).map_err(rot)?;
            eprintln!("{name}: provisioned with release, AK {}", e.ak.key_id());
            enrolled.insert(name.clone(), e);
        }
        let health = h.boot();
        eprintln!("{}", health.summary());
        tpms.push(sw);
        hosts.push(h);
    }
    for e in enrolled.values() {
        verifier.enroll(e.clone());
    }
    let raw =
        serde_json::to_vec_pretty(&enrolled).map_err(|e| CliError::BadArgument(e.to_string()))?;
    std::fs::write(&enrol_path, raw)
        .map_err(|e| CliError::Io(enrol_path.display().to_string(), e))?;

    let auth = DeployerAuth {
        token: token.trim(),
        identity: &identity,
        tokens: &tokens,
        revoked: &revoked,
    };
    let mut d = Deployment {
        audit: &audit,
        root: &root,
        environment: env,
        verifier: &mut verifier,
    };
    let report = deploy(&mut d, &auth, &release, &a.artefacts, &mut hosts).map_err(rot)?;
    println!(
        "deployed release {} to {} host(s) in waves {:?} in {} ms (deploy {})",
        report.version,
        hosts.len(),
        report.waves.iter().map(Vec::len).collect::<Vec<_>>(),
        report.elapsed.as_millis(),
        report.deploy_id
    );
    drop(hosts);
    drop(tpms);
    Ok(())
}
