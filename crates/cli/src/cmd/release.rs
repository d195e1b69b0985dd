//! `bulkhead release keygen|root|create|sign|verify`: threshold-signed releases
//! (see `bulkhead-rot`'s `release` module and docs/rot.md).

use std::path::{Path, PathBuf};

use bulkhead_rot::measure::{Environment, EventKind};
use bulkhead_rot::release::{
    verify_release, Manifest, ReleaseKey, ReleasePolicy, ReleasePublicKey, SignedRelease, TrustRoot,
};
use bulkhead_rot::tpm::MeasurePcr;
use bulkhead_rot::RotError;
use clap::Subcommand;

use super::CliError;

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Create the dev state directory a deployer needs (CA, operator/customer certificates,
    /// token-service key, rights policy, audit log location), as the controller does in dev mode.
    DevState {
        #[arg(long)]
        dev_dir: PathBuf,
    },
    /// Generate an Ed25519 release key: OUT/NAME.key (0600) and OUT/NAME.pub.json.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Write the trust root (release public keys + threshold) hosts pin at provisioning.
    Root {
        #[arg(long, default_value_t = 2)]
        threshold: usize,
        /// A NAME.pub.json file; repeat.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Build an unsigned release of files in DIR, measured in this order: binaries, configs,
    /// policies (each in the order given).
    Create {
        #[arg(long)]
        version: u64,
        #[arg(long)]
        env: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 30 * 24 * 3600)]
        expires_in: u64,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long = "binary")]
        binaries: Vec<String>,
        #[arg(long = "config")]
        configs: Vec<String>,
        #[arg(long = "policy")]
        policies: Vec<String>,
        #[arg(long, default_value_t = 23)]
        pcr: u8,
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a signature to a release file (in place).
    Sign {
        #[arg(long)]
        release: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Verify a release as a host would; with --artefacts, also every file's digest.
    Verify {
        #[arg(long)]
        release: PathBuf,
        #[arg(long)]
        trust_root: PathBuf,
        #[arg(long)]
        env: String,
        /// The version the host runs (lower versions are refused).
        #[arg(long, default_value_t = 0)]
        current_version: u64,
        #[arg(long)]
        artefacts: Option<PathBuf>,
    },
}

fn read(p: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(p).map_err(|e| CliError::Io(p.display().to_string(), e))
}

fn write(p: &Path, bytes: &[u8], mode: u32) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(p)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| CliError::Io(p.display().to_string(), e))
}

fn rot(e: impl Into<RotError>) -> CliError {
    CliError::Rot(e.into())
}

pub fn run(c: ReleaseCommand) -> Result<(), CliError> {
    match c {
        ReleaseCommand::DevState { dev_dir } => {
            let made = bulkhead_tokens::statedir::StateDir::new(&dev_dir).ensure_dev("host-0")?;
            println!(
                "dev state in {}: created [{}]",
                dev_dir.display(),
                made.join(", ")
            );
        }
        ReleaseCommand::Keygen { out, name } => {
            if !bulkhead_rot::measure::valid_name(&name) {
                return Err(CliError::BadArgument(format!("bad key name {name}")));
            }
            std::fs::create_dir_all(&out)
                .map_err(|e| CliError::Io(out.display().to_string(), e))?;
            let k = ReleaseKey::generate().map_err(rot)?;
            let secret = k.to_secret_text();
            write(&out.join(format!("{name}.key")), secret.as_bytes(), 0o600)?;
            let public = serde_json::to_vec_pretty(&k.public())
                .map_err(|e| CliError::BadArgument(e.to_string()))?;
            write(&out.join(format!("{name}.pub.json")), &public, 0o644)?;
            println!("{}", k.public().key_id);
        }
        ReleaseCommand::Root {
            threshold,
            keys,
            out,
        } => {
            let mut pubs = Vec::new();
            for p in &keys {
                let k: ReleasePublicKey = serde_json::from_slice(&read(p)?).map_err(|_| {
                    CliError::BadArgument(format!("{}: not a release public key", p.display()))
                })?;
                pubs.push(k);
            }
            let root = TrustRoot::new(threshold, pubs).map_err(rot)?;
            let raw = serde_json::to_vec_pretty(&root)
                .map_err(|e| CliError::BadArgument(e.to_string()))?;
            write(&out, &raw, 0o644)?;
            println!("trust root: {threshold} of {}", root.keys.len());
        }
        ReleaseCommand::Create {
            version,
            env,
            expires_in,
            dir,
            binaries,
            configs,
            policies,
            pcr,
            out,
        } => {
            let env = Environment::parse(&env).map_err(rot)?;
            let pcr = MeasurePcr::new(pcr).map_err(rot)?;
            let mut files: Vec<(EventKind, PathBuf)> = Vec::new();
            files.extend(binaries.iter().map(|n| (EventKind::Binary, dir.join(n))));
            files.extend(configs.iter().map(|n| (EventKind::Config, dir.join(n))));
            files.extend(policies.iter().map(|n| (EventKind::Policy, dir.join(n))));
            let refs: Vec<(EventKind, &Path)> =
                files.iter().map(|(k, p)| (*k, p.as_path())).collect();
            let expires = bulkhead_rot::unix_now().saturating_add(expires_in);
            let m = Manifest::from_files(version, env, expires, pcr, &refs).map_err(rot)?;
            let r = SignedRelease::new(&m).map_err(rot)?;
            write(&out, r.to_json().map_err(rot)?.as_bytes(), 0o644)?;
            println!(
                "release {version}: {} artefacts, expected PCR {} = {}",
                m.artefacts.len(),
                pcr.index(),
                m.expected_pcr
            );
        }
        ReleaseCommand::Sign { release, key } => {
            let mut r = SignedRelease::parse(&read(&release)?).map_err(rot)?;
            let text = String::from_utf8(read(&key)?)
                .map_err(|_| CliError::BadArgument("key file is not text".into()))?;
            let k = ReleaseKey::from_secret_text(&text).map_err(rot)?;
            r.sign(&k);
            write(&release, r.to_json().map_err(rot)?.as_bytes(), 0o644)?;
            println!(
                "signed by {} ({} signature(s))",
                k.public().key_id,
                r.signatures.len()
            );
        }
        ReleaseCommand::Verify {
            release,
            trust_root,
            env,
            current_version,
            artefacts,
        } => {
            let r = SignedRelease::parse(&read(&release)?).map_err(rot)?;
            let root = TrustRoot::parse(&read(&trust_root)?).map_err(rot)?;
            let env = Environment::parse(&env).map_err(rot)?;
            let m = verify_release(
                &r,
                &ReleasePolicy {
                    root: &root,
                    environment: &env,
                    current_version,
                    now: bulkhead_rot::unix_now(),
                },
            )
            .map_err(rot)?;
            if let Some(dir) = artefacts {
                m.check_artefacts(&dir).map_err(rot)?;
            }
            println!(
                "ok: release {} for {}, expected PCR {}",
                m.version, m.environment, m.expected_pcr
            );
        }
    }
    Ok(())
}
