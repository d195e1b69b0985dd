//! `bulkhead-controller`: see the crate README for the API and error codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_audit::AuditLog;
use bulkhead_controller::backend::DetachedBackend;
use bulkhead_controller::config::Config;
use bulkhead_controller::controller::Controller;
use bulkhead_controller::{openapi, sandbox, server};
use bulkhead_tokens::statedir::{StateDir, DEV_HOST};
use bulkhead_tokens::token::public_key_from_text;
use bulkhead_tokens::{Policy, Verifier};
use clap::Parser;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, Parser)]
#[command(name = "bulkhead-controller", about = "The host's only management API")]
struct Args {
    /// Development mode: create whatever is missing under --state-dir and use it.
    #[arg(long, requires = "state_dir")]
    dev: bool,
    /// State directory (dev mode).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Host name (dev mode).
    #[arg(long, default_value = DEV_HOST)]
    host_id: String,
    /// Configuration file (production). Every file it names must exist.
    #[arg(long, conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// Address to listen on (overrides the config file's).
    #[arg(long)]
    listen: Option<String>,
    /// Print the OpenAPI document and exit.
    #[arg(long)]
    print_openapi: bool,
    /// Install the sandbox, try one outbound connection to ADDR, report whether it was blocked
    /// and alerted on, and exit. Proves the filter of this very binary.
    #[arg(long, value_name = "ADDR")]
    sandbox_self_test: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("give either --dev --state-dir DIR or --config FILE")]
    NoConfig,
    #[error(transparent)]
    Config(#[from] bulkhead_controller::config::ConfigError),
    #[error(transparent)]
    State(#[from] bulkhead_tokens::statedir::StateError),
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: not a valid PEM certificate or key")]
    Pem(PathBuf),
    #[error("{0}: not a valid token-service public key")]
    TokenKey(PathBuf),
    #[error("policy: {0}")]
    Policy(#[from] bulkhead_tokens::policy::PolicyError),
    #[error("audit log: {0}")]
    Audit(#[from] bulkhead_audit::AuditError),
    #[error("tls: {0}")]
    Tls(#[from] server::TlsSetupError),
    #[error("listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("sandbox: {0}")]
    Sandbox(#[from] sandbox::SandboxError),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

fn read(p: &PathBuf) -> Result<Vec<u8>, StartError> {
    std::fs::read(p).map_err(|e| StartError::Read(p.clone(), e))
}

fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

fn run(args: Args) -> Result<(), StartError> {
    if args.print_openapi {
        print!("{}", openapi::document_json());
        return Ok(());
    }
    let mut cfg = if args.dev {
        let dir = StateDir::new(args.state_dir.clone().ok_or(StartError::NoConfig)?);
        let made = dir.ensure_dev(&args.host_id)?;
        if !made.is_empty() {
            tracing::info!(created = ?made, dir = %dir.root().display(), "dev state directory prepared");
        }
        Config::from_state_dir(
            &dir,
            &args.host_id,
            args.listen.as_deref().unwrap_or("127.0.0.1:8443"),
        )
    } else {
        Config::load(args.config.as_ref().ok_or(StartError::NoConfig)?)?
    };
    if let Some(l) = &args.listen {
        cfg.listen = l.clone();
    }
    cfg.check()?;

    let ca = CertificateDer::from_pem_slice(&read(&cfg.ca_cert)?)
        .map_err(|_| StartError::Pem(cfg.ca_cert.clone()))?;
    let chain = CertificateDer::pem_slice_iter(&read(&cfg.host_cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| StartError::Pem(cfg.host_cert.clone()))?;
    let key = PrivateKeyDer::from_pem_slice(&read(&cfg.host_key)?)
        .map_err(|_| StartError::Pem(cfg.host_key.clone()))?;
    let tls = server::tls_config(ca, chain, key)?;
    let pk_text = String::from_utf8_lossy(&read(&cfg.token_public_key)?).to_string();
    let verifier = Verifier::new(
        public_key_from_text(&pk_text).ok_or(StartError::TokenKey(cfg.token_public_key.clone()))?,
    );
    let policy = Policy::parse(&String::from_utf8_lossy(&read(&cfg.rights)?))?;
    let (audit, report) = AuditLog::open(&cfg.audit_log)?;
    let vcpus = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let backend = Arc::new(DetachedBackend::new(vcpus, memory_mib()));
    let ctrl = Arc::new(Controller::new(
        cfg.host_id.clone(),
        verifier,
        policy,
        cfg.revocations.clone(),
        audit,
        backend.clone(),
        backend,
    ));

    // Bind before the sandbox forbids new inet sockets.
    let std_listener = std::net::TcpListener::bind(&cfg.listen)
        .map_err(|e| StartError::Listen(cfg.listen.clone(), e))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| StartError::Listen(cfg.listen.clone(), e))?;
    let local = std_listener
        .local_addr()
        .map_err(|e| StartError::Listen(cfg.listen.clone(), e))?;

    sandbox::harden()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    rt.block_on(async move {
        if let Some(target) = args.sandbox_self_test {
            let attempt = std::net::TcpStream::connect(&target);
            ctrl.poll_sandbox();
            // A durable record after the queued alert makes the alert durable too.
            let _ = ctrl.audit_lifecycle("SandboxSelfTest").await;
            let blocked = attempt.is_err() && sandbox::blocked_attempts() > 0;
            println!(
                "{}",
                serde_json::json!({
                    "event": "sandbox_self_test",
                    "target": target,
                    "blocked": blocked,
                    "blocked_attempts": sandbox::blocked_attempts(),
                    "error": attempt.err().map(|e| e.to_string()),
                })
            );
            if blocked {
                return Ok(());
            }
            std::process::exit(1);
        }
        ctrl.audit_lifecycle("ControllerStart").await?;
        let listener = tokio::net::TcpListener::from_std(std_listener)
            .map_err(|e| StartError::Listen(cfg.listen.clone(), e))?;
        let poller = Arc::clone(&ctrl);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                poller.poll_sandbox();
            }
        });
        println!(
            "{}",
            serde_json::json!({
                "event": "ready",
                "listen": local.to_string(),
                "host_id": cfg.host_id,
                "audit_records": report.records,
            })
        );
        tracing::info!(listen = %local, host = %cfg.host_id, "controller ready");
        server::serve(listener, tls, ctrl)
            .await
            .map_err(|e| StartError::Listen(local.to_string(), e))
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead-controller: {e}");
            ExitCode::from(2)
        }
    }
}
