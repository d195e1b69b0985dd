//! `bulkhead-launcher`: runs first on a host. Measures the installed release into the TPM,
//! unseals the host identity, and reports whether the host may take customer work.
//!
//! ```text
//! bulkhead-launcher --root DIR --name HOST --env ENV --trust-root FILE [--tcti T | --dev-swtpm] <cmd>
//!   provision --release FILE --from DIR   first release + fresh sealed identity; prints the enrolment
//!   boot                                  measured start + unseal; prints HostHealth; exit 3 if refused
//!   attest --nonce HEX                    boot, then a quote over the PCR; prints the evidence
//!   serve --socket PATH [--host-key-out F] boot once, then answer challenges on a unix socket
//!                                         (the attestation agent, see `bulkhead_rot::agent`)
//!   ek-certificate                        prints the TPM's EK certificate (DER, hex)
//!   activate-credential                   reads an enrolment credential (JSON) on stdin, opens
//!                                         it with the TPM, prints the secret
//! ```
//!
//! `--dev-swtpm` runs a private `swtpm` whose state lives in `DIR/swtpm` (a dev host's TPM);
//! with `--dev-manufacturer CA_DIR` a TPM not made yet is first manufactured with an EK
//! certificate from that local CA (`bulkhead_rot::endorsement::LocalManufacturer`).

use std::path::PathBuf;
use std::process::ExitCode;

use bulkhead_rot::host::{Host, HostConfig};
use bulkhead_rot::measure::Environment;
use bulkhead_rot::release::{SignedRelease, TrustRoot};
use bulkhead_rot::swtpm::{Swtpm, PRODUCTION_TCTI};
use bulkhead_rot::tpm::MeasurePcr;
use bulkhead_rot::RotError;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bulkhead-launcher",
    about = "Measured start and sealed host identity"
)]
struct Args {
    #[arg(long)]
    root: PathBuf,
    #[arg(long)]
    name: String,
    #[arg(long)]
    env: String,
    #[arg(long)]
    trust_root: PathBuf,
    #[arg(long, default_value = PRODUCTION_TCTI)]
    tcti: String,
    /// Run a private swtpm with state in ROOT/swtpm (development hosts only).
    #[arg(long)]
    dev_swtpm: bool,
    /// Manufacture the dev swtpm (EK certificates from this local CA) if it is not made yet.
    #[arg(long, requires = "dev_swtpm")]
    dev_manufacturer: Option<PathBuf>,
    #[arg(long, default_value_t = 23)]
    pcr: u8,
    /// Audit log (hash-chained) where a refusal is raised as an alert.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Provision {
        #[arg(long)]
        release: PathBuf,
        #[arg(long)]
        from: PathBuf,
    },
    Boot {
        /// When healthy, write the unsealed host key file (0600) here for the block card
        /// (a tmpfs path such as /run/bulkhead/host.key).
        #[arg(long)]
        host_key_out: Option<PathBuf>,
    },
    Attest {
        #[arg(long)]
        nonce: String,
    },
    /// Measured start once, then the attestation agent: quotes over verifier nonces on a unix
    /// socket (mode 0600) until killed. Prints one ready line (JSON) on stdout.
    Serve {
        #[arg(long)]
        socket: PathBuf,
        /// As for `boot`: the unsealed host key, written only when the host is healthy.
        #[arg(long)]
        host_key_out: Option<PathBuf>,
    },
    /// Prints the TPM's RSA EK certificate: `{"ek_certificate": "<DER hex>"}`.
    EkCertificate,
    /// Reads a `CredentialChallenge` (JSON) on stdin; prints `{"secret": "<hex>"}` when the TPM
    /// opens it (exit 4 with the reason when it refuses).
    ActivateCredential,
}

fn run(a: Args) -> Result<ExitCode, RotError> {
    let env = Environment::parse(&a.env)?;
    let pcr = MeasurePcr::new(a.pcr)?;
    let raw = std::fs::read(&a.trust_root).map_err(|e| RotError::Io {
        path: a.trust_root.clone(),
        source: e,
    })?;
    let trust_root = TrustRoot::parse(&raw)?;
    if let (true, Some(ca)) = (a.dev_swtpm, &a.dev_manufacturer) {
        let state = a.root.join("swtpm");
        if !state.join("tpm2-00.permall").exists() {
            bulkhead_rot::endorsement::LocalManufacturer::new(ca)
                .and_then(|m| m.manufacture(&state))
                .map_err(|e| RotError::Io {
                    path: state.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
        }
    }
    let swtpm = if a.dev_swtpm {
        Some(Swtpm::start_with_state_tied(&a.root.join("swtpm"))?)
    } else {
        None
    };
    let tcti = swtpm.as_ref().map(|s| s.tcti()).unwrap_or(a.tcti.clone());
    let cfg = HostConfig {
        name: a.name,
        root: a.root,
        environment: env,
        pcr,
        dev_reset_pcr: a.dev_swtpm,
        trust_root,
    };
    let mut host = Host::open(cfg, &tcti)?;
    if let Some(p) = &a.audit_log {
        let (log, _) = bulkhead_audit::AuditLog::open(p).map_err(|e| RotError::Io {
            path: p.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        host.set_audit(log);
    }
    let out = |v: &dyn erased::Json| println!("{}", v.json());
    match a.cmd {
        Cmd::EkCertificate => match host.ek_certificate() {
            Ok(der) => {
                out(&serde_json::json!({ "ek_certificate": hex::encode(der) }));
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("bulkhead-launcher: {e} ({})", e.code());
                Ok(ExitCode::from(4))
            }
        },
        Cmd::ActivateCredential => {
            use std::io::Read;
            let mut raw = Vec::new();
            std::io::stdin()
                .take(64 * 1024)
                .read_to_end(&mut raw)
                .map_err(|e| RotError::Io {
                    path: "<stdin>".into(),
                    source: e,
                })?;
            let challenge: bulkhead_rot::endorsement::CredentialChallenge =
                serde_json::from_slice(&raw).map_err(|_| RotError::Malformed("credential"))?;
            match host.activate_credential(&challenge) {
                Ok(secret) => {
                    out(&serde_json::json!({ "secret": hex::encode(secret.as_slice()) }));
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("bulkhead-launcher: {e} ({})", e.code());
                    Ok(ExitCode::from(4))
                }
            }
        }
        Cmd::Provision { release, from } => {
            let raw = std::fs::read(&release).map_err(|e| RotError::Io {
                path: release.clone(),
                source: e,
            })?;
            let signed = SignedRelease::parse(&raw)?;
            let enrol = host.provision(&signed, &from)?;
            out(&enrol);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Boot { host_key_out } => {
            let h = host.boot();
            eprintln!("{}", h.summary());
            if let (Some(p), true) = (&host_key_out, h.accepts_customer_work) {
                host.write_host_key(p)?;
            }
            out(&h);
            Ok(if h.accepts_customer_work {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Cmd::Attest { nonce } => {
            let n = hex::decode(nonce.trim()).map_err(|_| RotError::Malformed("nonce hex"))?;
            let h = host.boot();
            eprintln!("{}", h.summary());
            let ev = host.attest(&n)?;
            out(&ev);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve {
            socket,
            host_key_out,
        } => {
            use std::os::unix::fs::PermissionsExt;
            let h = host.boot();
            eprintln!("{}", h.summary());
            if let Some(p) = &host_key_out {
                // A stale key from an earlier healthy start must not outlive a refusal.
                let _ = std::fs::remove_file(p);
                if h.accepts_customer_work {
                    host.write_host_key(p)?;
                }
            }
            let _ = std::fs::remove_file(&socket);
            let listener =
                std::os::unix::net::UnixListener::bind(&socket).map_err(RotError::io(&socket))?;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
                .map_err(RotError::io(&socket))?;
            println!(
                "{}",
                serde_json::json!({
                    "event": "ready",
                    "socket": socket,
                    "accepts_customer_work": h.accepts_customer_work,
                    "release_version": h.release_version,
                    "pcr_value": h.pcr_value,
                })
            );
            bulkhead_rot::agent::serve(&mut host, &listener);
            Ok(ExitCode::SUCCESS)
        }
    }
}

mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into())
        }
    }
}

fn main() -> ExitCode {
    // libtss2 logs expected TPM refusals (a failed unseal) as ERROR on stderr; the typed error
    // says it better. Respect an explicit TSS2_LOG.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
    bulkhead_daemon::init_logging("BULKHEAD_LOG", "error");
    bulkhead_daemon::exit_code("bulkhead-launcher", run(Args::parse()))
}
