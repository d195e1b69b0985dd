//! `bulkhead-kms`: see the crate documentation.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_audit::AuditLog;
use bulkhead_kms::service::Kms;
use bulkhead_kms::store::Store;
use bulkhead_kms::{crypto, server};
use bulkhead_mtls as tls;
use bulkhead_tokens::pki::CaDir;
use bulkhead_tokens::Role;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead-kms",
    about = "Bulkhead key service (mutual TLS 1.3, control plane only)"
)]
struct Args {
    /// CA directory (bulkhead-tokens layout): `ca.pem` and the service certificate `kms.pem`/`kms.key`.
    #[arg(long)]
    ca_dir: PathBuf,
    /// Where the KMS keeps `kms.db`, `root.key` and `audit.log`.
    #[arg(long)]
    state_dir: PathBuf,
    /// Enrolled host public keys, `HOST_ID.pub` (default: STATE_DIR/hosts).
    #[arg(long)]
    hosts_dir: Option<PathBuf>,
    /// Development mode: create the CA, the service certificate and the root key if absent.
    #[arg(long)]
    dev: bool,
    #[arg(long, default_value = "127.0.0.1:8600")]
    listen: String,
    /// Require host attestation for DecryptForHost, with this policy (enrolments, signed
    /// releases; see `bulkhead_rot::policy`). Dev default: STATE_DIR/attest.json if present.
    #[arg(long)]
    attest_config: Option<PathBuf>,
    /// Keep customer master keys in this PKCS#11 module's token (e.g.
    /// /usr/lib/softhsm/libsofthsm2.so) instead of wrapped in the KMS's own store.
    #[arg(long, requires_all = ["pkcs11_token", "pkcs11_pin_file"])]
    pkcs11_module: Option<PathBuf>,
    /// Label of the token to use.
    #[arg(long)]
    pkcs11_token: Option<String>,
    /// File whose first line is the token's user PIN (mode 0600).
    #[arg(long)]
    pkcs11_pin_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("pki: {0}")]
    Pki(#[from] bulkhead_tokens::pki::PkiError),
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("root key: {0}")]
    Crypto(#[from] crypto::CryptoError),
    #[error("store: {0}")]
    Store(#[from] bulkhead_kms::store::StoreError),
    #[error("audit log: {0}")]
    Audit(#[from] bulkhead_audit::AuditError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("attestation policy: {0}")]
    Attest(#[from] bulkhead_rot::policy::AttestConfigError),
    #[error("{0}")]
    Kms(#[from] bulkhead_kms::KmsError),
    #[error("{0}")]
    Pkcs11(#[from] bulkhead_kms::keystore::Pkcs11Error),
}

fn run(args: Args) -> Result<(), StartError> {
    let ca = CaDir::new(&args.ca_dir);
    std::fs::create_dir_all(&args.state_dir)
        .map_err(|e| StartError::Io(args.state_dir.display().to_string(), e))?;
    let hosts_dir = args
        .hosts_dir
        .clone()
        .unwrap_or_else(|| args.state_dir.join("hosts"));
    if args.dev {
        if !ca.exists() {
            ca.init()?;
        }
        if !ca.cert("kms").exists() {
            // A server certificate (serverAuth, SANs kms/localhost/127.0.0.1) from the dev CA.
            ca.issue("kms", Role::Service, true)?;
        }
        std::fs::create_dir_all(&hosts_dir)
            .map_err(|e| StartError::Io(hosts_dir.display().to_string(), e))?;
    }
    let tls_cfg = tls::server_config(&ca.ca_pem(), &ca.cert("kms"), &ca.key("kms"), true)?;
    let root = crypto::load_root_key(&args.state_dir.join("root.key"), args.dev)?;
    let store = Store::open(&args.state_dir.join("kms.db"))?;
    let (audit, report) = AuditLog::open_signed(&args.state_dir.join("audit.log"), &ca.key("kms"))?;
    let mut kms = Kms::new(store, root, audit, hosts_dir)?;
    let keystore = match (
        &args.pkcs11_module,
        &args.pkcs11_token,
        &args.pkcs11_pin_file,
    ) {
        (Some(m), Some(t), Some(p)) => {
            kms = kms.with_keystore(Box::new(bulkhead_kms::keystore::Pkcs11::open(m, t, p)?));
            "pkcs11"
        }
        _ => "embedded",
    };
    let attest_cfg = args
        .attest_config
        .clone()
        .or_else(|| Some(args.state_dir.join("attest.json")).filter(|p| args.dev && p.is_file()));
    let attested = match &attest_cfg {
        Some(p) => {
            kms = kms.with_attestation(bulkhead_rot::policy::load_verifier(p)?);
            tracing::info!(policy = %p.display(), "attestation required for DecryptForHost");
            true
        }
        None => {
            tracing::warn!("no attestation policy: DecryptForHost trusts enrolled host keys without a TPM quote");
            false
        }
    };
    let kms = Arc::new(kms);
    let refusals = server::refusals(&kms);
    tls::run_daemon(
        &args.listen,
        tls_cfg,
        server::router(kms, Arc::clone(&refusals)),
        "kms",
        serde_json::json!({"audit_records": report.records, "attestation_required": attested, "keystore": keystore}),
        refusals,
    )
    .map_err(|e| StartError::Io(args.listen.clone(), e))
}

fn main() -> ExitCode {
    bulkhead_daemon::init_logging("BULKHEAD_LOG", "info");
    bulkhead_daemon::exit("bulkhead-kms", run(Args::parse()))
}
