//! `bulkhead deploy`: the deployment service against a fleet of simulated hosts (each with its
//! own swtpm whose state persists under FLEET/host-N/swtpm). Deployer token, identity and audit
//! log come from the dev state directory (`bulkhead ca`/`bulkhead token`).

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
    #[arg(long)]
    trust_root: PathBuf,
    #[arg(long)]
    env: String,
    /// Simulated fleet state.
    #[arg(long)]
    fleet: PathBuf,
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Dev state directory (CA, token-service key, audit.log).
    #[arg(long)]
    dev_dir: PathBuf,
    /// The deployer (a certificate issued in the dev CA).
    #[arg(long)]
    caller: String,
    /// Deployer token (needs DrainHost on every target host).
    #[arg(long)]
    token: String,
}

fn rot(e: impl Into<RotError>) -> CliError {
    CliError::Rot(e.into())
}

fn read(p: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(p).map_err(|e| CliError::Io(p.display().to_string(), e))
}

pub fn run(a: DeployArgs) -> Result<(), CliError> {
    let env = Environment::parse(&a.env).map_err(rot)?;
    let root = TrustRoot::parse(&read(&a.trust_root)?).map_err(rot)?;
    let release = SignedRelease::parse(&read(&a.release)?).map_err(rot)?;
    let state = StateDir::new(&a.dev_dir);
    let (identity, _) = state.ca().identity(&a.caller)?;
    let tokens = state.verifier()?;
    let revoked = match std::fs::read_to_string(state.revoked()) {
        Ok(t) => RevocationList::parse(&t).0,
        Err(_) => RevocationList::default(),
    };
    let (audit, _) = bulkhead_audit::AuditLog::open(&state.audit_log())
        .map_err(|e| CliError::BadArgument(format!("audit log: {e}")))?;

    std::fs::create_dir_all(&a.fleet)
        .map_err(|e| CliError::Io(a.fleet.display().to_string(), e))?;
    let enrol_path = a.fleet.join("enrollments.json");
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
        let dir = a.fleet.join(&name);
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
        token: a.token.trim(),
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
