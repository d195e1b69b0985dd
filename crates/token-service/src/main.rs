//! `bulkhead-token-service`: see the crate documentation.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_audit::{AuditLog, ParamsKey};
use bulkhead_mtls as tls;
use bulkhead_token_service::{refusals, router, Minter};
use bulkhead_tokens::pki::CaDir;
use bulkhead_tokens::policy::Policy;
use bulkhead_tokens::token::keypair_from_text;
use bulkhead_tokens::TokenService;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead-token-service",
    about = "Bulkhead token service: mints host tokens over mutual TLS 1.3 for the caller its certificate names"
)]
struct Args {
    /// CA directory: `ca.pem` and this service's TLS certificate `tokens.pem`/`.key`.
    #[arg(long)]
    ca_dir: PathBuf,
    /// The token signing key (only this process reads it).
    #[arg(long)]
    signing_key: PathBuf,
    /// The reviewed policy.
    #[arg(long)]
    rights: PathBuf,
    /// Where `audit.log` goes.
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8700")]
    listen: String,
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("audit log: {0}")]
    Audit(#[from] bulkhead_audit::AuditError),
    #[error("audit parameter key: {0}")]
    ParamsKey(#[from] bulkhead_audit::ParamsKeyError),
    #[error("{0}: not a token signing key")]
    BadKey(PathBuf),
    #[error("policy {0}: {1}")]
    Policy(PathBuf, bulkhead_tokens::policy::PolicyError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

fn read(p: &PathBuf) -> Result<String, StartError> {
    std::fs::read_to_string(p).map_err(|e| StartError::Io(p.display().to_string(), e))
}

fn run(args: Args) -> Result<(), StartError> {
    let ca = CaDir::new(&args.ca_dir);
    std::fs::create_dir_all(&args.state_dir)
        .map_err(|e| StartError::Io(args.state_dir.display().to_string(), e))?;
    let tls_cfg = tls::server_config(&ca.ca_pem(), &ca.cert("tokens"), &ca.key("tokens"), true)?;
    let key = keypair_from_text(&read(&args.signing_key)?)
        .ok_or_else(|| StartError::BadKey(args.signing_key.clone()))?;
    let policy = Policy::parse(&read(&args.rights)?)
        .map_err(|e| StartError::Policy(args.rights.clone(), e))?;
    let (audit, report) =
        AuditLog::open_signed(&args.state_dir.join("audit.log"), &ca.key("tokens"))?;
    let minter = Arc::new(Minter {
        tokens: TokenService::new(key, policy),
        audit,
        params_key: ParamsKey::generate()?,
    });
    let refusals = refusals(&minter);
    tls::run_daemon(
        &args.listen,
        tls_cfg,
        router(minter, Arc::clone(&refusals)),
        "token-service",
        serde_json::json!({"audit_records": report.records}),
        refusals,
    )
    .map_err(|e| StartError::Io(args.listen.clone(), e))
}

fn main() -> ExitCode {
    bulkhead_daemon::init_logging("BULKHEAD_LOG", "info");
    bulkhead_daemon::exit("bulkhead-token-service", run(Args::parse()))
}
