//! `bulkhead-control`: the control plane daemon (`serve`), customer enrolment
//! (`create-customer`), a signing customer client (`call`, the `aws ec2`-like front end), and
//! the operator's view of what was pulled from hosts (`hosts`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bulkhead_audit::AuditLog;
use bulkhead_control::config::Config;
use bulkhead_control::hosts::{HostClient, TokenSource};
use bulkhead_control::repo::{CustomerRow, HostRow, Repository, SqliteRepo};
use bulkhead_control::server;
use bulkhead_control::service::{secret_aad, ControlPlane};
use bulkhead_ec2_query::bh1 as sigv;
use bulkhead_kms_proto::{KmsCall, RegisterCustomerRequest};
use bulkhead_mtls as tls;
use bulkhead_sealing::wrap as crypto;
use bulkhead_tokens::pki::{CaDir, ServerIdentity};
use bulkhead_tokens::statedir::StateDir;
use bulkhead_tokens::Role;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(name = "bulkhead-control", about = "Bulkhead control plane")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the control plane.
    Serve {
        #[arg(long)]
        config: PathBuf,
        /// Issue the `control` server certificate from the CA if it is absent.
        #[arg(long)]
        dev: bool,
    },
    /// Create a tenant with one access key; writes its credentials file (mode 0600).
    CreateCustomer {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the customer API's OpenAPI document (the checked-in copy is openapi/control.json).
    PrintOpenapi,
    /// Sign and send one customer API call; prints the JSON answer.
    Call {
        /// Control plane address (host:port).
        #[arg(long)]
        endpoint: String,
        /// CA certificate the control plane's server certificate chains to.
        #[arg(long)]
        ca: PathBuf,
        /// Credentials file written by create-customer.
        #[arg(long)]
        credentials: PathBuf,
        /// Action, e.g. RunInstances.
        action: String,
        /// JSON body (default `{}`).
        body: Option<String>,
    },
    /// Operator view: hosts, their last pulled status and how many audit records were pulled.
    Hosts {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("config: {0}")]
    Config(#[from] bulkhead_control::config::ConfigError),
    #[error("fleet rules {0}: {1}")]
    Rules(String, bulkhead_control::fleet::RulesError),
    #[error("sealed host {0}: {1}")]
    Sealed(String, Box<bulkhead_control::sealed::SealedConfigError>),
    #[error("attestation policy: {0}")]
    Attest(#[from] bulkhead_rot::policy::AttestConfigError),
    #[error("state: {0}")]
    State(#[from] bulkhead_tokens::statedir::StateError),
    #[error("pki: {0}")]
    Pki(#[from] bulkhead_tokens::pki::PkiError),
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("crypto: {0}")]
    Crypto(#[from] crypto::WrapError),
    #[error("store: {0}")]
    Repo(#[from] bulkhead_control::repo::RepoError),
    #[error("audit: {0}")]
    Audit(#[from] bulkhead_audit::AuditError),
    #[error("[{code}] {0}", code = .0.code())]
    Control(#[from] bulkhead_control::ControlError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("bad argument: {0}")]
    BadArgument(&'static str),
    #[error("call failed with HTTP {0}")]
    CallFailed(u16),
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |e| CliError::Io(p.display().to_string(), e)
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    bulkhead_daemon::runtime().map_err(|e| CliError::Io("runtime".into(), e))
}

/// The control plane's client (its `control-plane` certificate), pinned to the server it must
/// reach: the KMS, the token service, or (per call, in `HostClient`) one host.
fn client(cfg: &Config, expect: Option<ServerIdentity>) -> Result<tls::HttpsClient, CliError> {
    let ca = CaDir::new(&cfg.ca_dir);
    let c = tls::HttpsClient::from_ca(
        &ca.ca_pem(),
        Some((&ca.cert("control-plane"), &ca.key("control-plane"))),
    )?;
    Ok(match expect {
        Some(e) => c.expecting(e)?,
        None => c,
    })
}

fn open_repo(cfg: &Config) -> Result<(Arc<dyn Repository>, crypto::Key32), CliError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(io(&cfg.state_dir))?;
    let repo: Arc<dyn Repository> = match &cfg.database_url {
        Some(url) => Arc::new(bulkhead_control::pg::PgRepo::connect(url)?),
        None => Arc::new(SqliteRepo::open(&cfg.state_dir.join("control.db"))?),
    };
    let root = crypto::load_root_key(&cfg.state_dir.join("root.key"), true)?;
    Ok((repo, root))
}

fn serve(config: &Path, dev: bool) -> Result<(), CliError> {
    // The test-only workflow fault hook: read once, here, inert unless set (README).
    let _ = bulkhead_control::workflow::arm_fault();
    let cfg = Config::load(config)?;
    let ca = CaDir::new(&cfg.ca_dir);
    if dev && !ca.cert("control").exists() {
        ca.issue("control", Role::Service, true)?;
    }
    let (repo, root) = open_repo(&cfg)?;
    let (identity, _) = ca.identity("control-plane")?;
    let tokens = match &cfg.token_service_addr {
        Some(addr) => TokenSource::Remote {
            addr: addr.clone(),
            https: client(&cfg, Some(ServerIdentity::token_service()))?,
        },
        None => TokenSource::Local(Box::new(StateDir::new(&cfg.ca_dir).token_service()?)),
    };
    let hosts = HostClient::new(client(&cfg, None)?, tokens, identity);
    let mut keys = BTreeMap::new();
    for h in &cfg.hosts {
        repo.upsert_host(&HostRow {
            host_id: h.host_id.clone(),
            addr: h.addr.clone(),
            cores: h.cores,
            dedicated_tenant: None,
        })?;
        keys.insert(
            h.host_id.clone(),
            std::fs::read(&h.public_key).map_err(io(&h.public_key))?,
        );
    }
    let (audit, _) = AuditLog::open_signed(&cfg.state_dir.join("audit.log"), &ca.key("control"))?;
    let tls_cfg = tls::server_config(&ca.ca_pem(), &ca.cert("control"), &ca.key("control"), false)?;
    let mut cp = ControlPlane::new(
        repo,
        root,
        client(&cfg, Some(ServerIdentity::kms()))?,
        cfg.kms_addr.clone(),
        hosts,
        keys,
        audit,
    );
    // Each host's audit checkpoints are signed with its TLS key: its certificate, where the CA
    // directory has it, is what pulled chains are verified against.
    let mut audit_keys = BTreeMap::new();
    for h in &cfg.hosts {
        let pem = std::fs::read(ca.cert(&h.host_id)).ok();
        match pem.map(|p| bulkhead_audit::CheckpointKey::from_cert_pem(&p)) {
            Some(Ok(k)) => {
                audit_keys.insert(h.host_id.clone(), k);
            }
            _ => {
                tracing::warn!(host = %h.host_id, "no certificate for this host in the CA directory: its pulled audit chain is checked for continuity, not for signatures")
            }
        }
    }
    cp = cp.with_audit_keys(audit_keys);
    if let Some(p) = &cfg.fleet_rules {
        let text = std::fs::read_to_string(p).map_err(io(p))?;
        let rules = bulkhead_control::fleet::Rules::parse(&text)
            .map_err(|e| CliError::Rules(p.display().to_string(), e))?;
        cp = cp.with_fleet_rules(rules);
    }
    cp = cp.with_region(cfg.region());
    if !cfg.storage_nodes.is_empty() {
        cp = cp.with_storage(bulkhead_control::storage::Storage::new(
            cfg.storage_nodes.clone(),
            client(&cfg, None)?,
        ));
    }
    if let Some(ms) = cfg.workflow_lease_ms {
        cp = cp.with_workflow_lease(Duration::from_millis(ms));
    }
    let mut sealed = std::collections::HashMap::new();
    for h in &cfg.hosts {
        if let Some(s) = &h.sealed {
            let p = bulkhead_control::sealed::SealedPolicy::load(s)
                .map_err(|e| CliError::Sealed(h.host_id.clone(), Box::new(e)))?;
            sealed.insert(h.host_id.clone(), p);
        }
    }
    if !sealed.is_empty() {
        tracing::info!(
            hosts = sealed.len(),
            "sealed hosts are attested by their whole boot chain (PCRs 4, 9, 11, 12, 23)"
        );
        cp = cp.with_sealed_hosts(sealed);
    }
    if let Some(p) = &cfg.attest_config {
        cp = cp.with_attestation(bulkhead_rot::policy::load_verifier(p)?);
        tracing::info!(policy = %p.display(), "instances are placed only on attested hosts");
    }
    let cp = Arc::new(cp);
    let std_listener = std::net::TcpListener::bind(&cfg.listen)
        .map_err(|e| CliError::Io(cfg.listen.clone(), e))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| CliError::Io(cfg.listen.clone(), e))?;
    let local = std_listener
        .local_addr()
        .map_err(|e| CliError::Io(cfg.listen.clone(), e))?;
    // The operators' API: its own listener, client certificates required.
    let operator = match &cfg.operator_listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr).map_err(|e| CliError::Io(addr.clone(), e))?;
            l.set_nonblocking(true)
                .map_err(|e| CliError::Io(addr.clone(), e))?;
            let tls_op =
                tls::server_config(&ca.ca_pem(), &ca.cert("control"), &ca.key("control"), true)?;
            Some((l, tls_op))
        }
        None => None,
    };
    let operator_local = operator
        .as_ref()
        .and_then(|(l, _)| l.local_addr().ok())
        .map(|a| a.to_string());
    let refusals = server::refusals(&cp);
    let ca_bundle = ca.ca_pem().display().to_string();
    let region = cfg.region().to_string();
    runtime()?.block_on(async move {
        if let Some((l, tls_op)) = operator {
            let l = tokio::net::TcpListener::from_std(l)
                .map_err(|e| CliError::Io("operator listener".into(), e))?;
            let app = bulkhead_control::operator::router(Arc::clone(&cp));
            let op_refusals = Arc::clone(&refusals);
            tokio::spawn(async move {
                if let Err(e) = tls::serve(l, tls_op, app, tls::Limits::default(), op_refusals).await {
                    tracing::error!(error = %e, "operator API stopped");
                }
            });
        }
        let rolled = cp.reconcile().await.unwrap_or(0);
        // Workflows whose owner (another replica, or this process before a restart) stopped
        // renewing its lease are taken over here.
        let sweeper = Arc::clone(&cp);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sweeper.workflow_lease() / 2);
            loop {
                tick.tick().await;
                if let Err(e) = sweeper.sweep_workflows().await {
                    tracing::warn!(code = e.code(), "workflow sweep failed");
                }
            }
        });
        let poller = Arc::clone(&cp);
        let every = Duration::from_millis(cfg.poll_interval_ms.max(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = poller.poll_hosts().await {
                    tracing::warn!(code = e.code(), "polling round failed");
                }
            }
        });
        let listener = tokio::net::TcpListener::from_std(std_listener).map_err(|e| CliError::Io(local.to_string(), e))?;
        println!("{}", json!({"event": "ready", "service": "control", "listen": local.to_string(), "operator_listen": operator_local, "reconciled": rolled, "ec2_endpoint_url": format!("https://{local}"), "aws_ca_bundle": ca_bundle, "region": region}));
        tracing::info!("EC2 Query API: aws ec2 ... --endpoint-url https://{local} with AWS_CA_BUNDLE={ca_bundle} AWS_DEFAULT_REGION={region} AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY = access_key_id/secret of a create-customer credentials file");
        tracing::info!(listen = %local, "control plane ready");
        let app = server::router(cp, Arc::clone(&refusals));
        tls::serve(listener, tls_cfg, app, tls::Limits::default(), refusals).await.map_err(|e| CliError::Io(local.to_string(), e))
    })
}

fn create_customer(config: &Path, tenant: &str, out: &Path, quiet: bool) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if !bulkhead_tokens::ops::valid_resource_id(tenant) {
        return Err(CliError::BadArgument("tenant: 1-64 of A-Za-z0-9-_."));
    }
    let cfg = Config::load(config)?;
    let (repo, root) = open_repo(&cfg)?;
    let mut raw = [0u8; 10];
    bulkhead_sealing::fill_random(&mut raw).map_err(|_| CliError::BadArgument("random"))?;
    let akid = format!("AKID{}", hex::encode_upper(raw));
    let secret = crypto::random_secret::<32>()?;
    let wrapped = crypto::wrap(&root, &secret_aad(&akid), secret.as_ref())?;
    let kms = client(&cfg, Some(ServerIdentity::kms()))?;
    let req = RegisterCustomerRequest {
        tenant_id: tenant.to_string(),
        access_key_id: akid.clone(),
        secret: B64.encode(secret.as_ref()),
    };
    let body = serde_json::to_vec(&req).map_err(|_| CliError::BadArgument("request"))?;
    let r = runtime()?.block_on(kms.request(
        &cfg.kms_addr,
        "POST",
        &format!("/v1/{}", RegisterCustomerRequest::OP.name()),
        &[("content-type", "application/json")],
        body,
    ))?;
    if r.status != 200 {
        eprintln!("{}", String::from_utf8_lossy(&r.body));
        return Err(CliError::CallFailed(r.status));
    }
    repo.put_customer(&CustomerRow {
        access_key_id: akid.clone(),
        tenant_id: tenant.to_string(),
        wrapped_secret: wrapped,
    })?;
    let creds =
        json!({"tenant_id": tenant, "access_key_id": akid, "secret": B64.encode(secret.as_ref())});
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(io(out))?;
    f.write_all(creds.to_string().as_bytes()).map_err(io(out))?;
    if !quiet {
        println!(
            "{}",
            json!({"tenant_id": tenant, "access_key_id": akid, "credentials": out.display().to_string()})
        );
    }
    Ok(())
}

/// Signs and sends one call. Public to tests through the binary only.
fn call(
    endpoint: &str,
    ca: &Path,
    credentials: &Path,
    action: &str,
    body: Option<String>,
) -> Result<(), CliError> {
    let creds: Value =
        serde_json::from_slice(&std::fs::read(credentials).map_err(io(credentials))?)
            .map_err(|_| CliError::BadArgument("credentials file is not JSON"))?;
    let akid = creds["access_key_id"]
        .as_str()
        .ok_or(CliError::BadArgument("credentials: access_key_id"))?;
    let secret = creds["secret"]
        .as_str()
        .and_then(|s| B64.decode(s).ok())
        .map(zeroize::Zeroizing::new)
        .ok_or(CliError::BadArgument("credentials: secret"))?;
    let body = body.unwrap_or_else(|| "{}".into());
    let path = format!("/v1/{action}");
    let parts = sigv::SignedParts {
        method: "POST".into(),
        path: path.clone(),
        query: String::new(),
        host: endpoint.to_string(),
        date: sigv::format_date(bulkhead_control::service::now()),
        body: body.clone(),
        nonce: bulkhead_sealing::random_nonce(),
    };
    let auth = sigv::sign(akid, &secret, &parts);
    let c = tls::HttpsClient::pinned(ca, None, ServerIdentity::control_plane())?;
    let r = runtime()?.block_on(c.request(
        endpoint,
        "POST",
        &path,
        &[
            ("authorization", &auth),
            ("x-bh-date", &parts.date),
            ("x-bh-nonce", &parts.nonce),
            ("content-type", "application/json"),
        ],
        body.into_bytes(),
    ))?;
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    if r.status == 200 {
        Ok(())
    } else {
        Err(CliError::CallFailed(r.status))
    }
}

fn hosts(config: &Path) -> Result<(), CliError> {
    let cfg = Config::load(config)?;
    let (repo, _) = open_repo(&cfg)?;
    let out = bulkhead_control::operator::host_list(repo.as_ref(), |_| None)?;
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(())
}

fn main() -> ExitCode {
    bulkhead_daemon::init_logging("BULKHEAD_LOG", "info");
    let r = match Cli::parse().cmd {
        Cmd::Serve { config, dev } => serve(&config, dev),
        Cmd::PrintOpenapi => {
            print!("{}", bulkhead_control::openapi::document_json());
            Ok(())
        }
        Cmd::CreateCustomer {
            config,
            tenant,
            out,
        } => create_customer(&config, &tenant, &out, false),
        Cmd::Call {
            endpoint,
            ca,
            credentials,
            action,
            body,
        } => call(&endpoint, &ca, &credentials, &action, body),
        Cmd::Hosts { config } => hosts(&config),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead-control: {e}");
            ExitCode::from(1)
        }
    }
}
