//! `bulkhead-storage`: see the crate documentation.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_audit::{AuditLog, Decision, EntryKind};
use bulkhead_mtls::{Limits, Refusals};
use bulkhead_storage::control::{router, NodeRefusals};
use bulkhead_storage::engine::{CephConfig, EngineConfig};
use bulkhead_storage::nbd_server::{self, NbdServer};
use bulkhead_storage::node::{entry, request_id, Node, StartError};
use bulkhead_storage::table::valid_pool;
use bulkhead_storage::tls::{server_config, TlsFiles};
use bulkhead_storage::{sandbox, tls};
use bulkhead_storage_proto::{DEFAULT_CONTROL_PORT, DEFAULT_NBD_PORT, DEFAULT_SERVER_NAME};
use bulkhead_tokens::pki::CaDir;
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EngineArg {
    File,
    Rbd,
}

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead-storage",
    about = "Bulkhead storage node: volume ciphertext over NBD with TLS for granted hosts, through qemu-storage-daemon"
)]
struct Args {
    /// CA directory: `ca.pem` and this node's certificate `<name>.pem`/`.key` (role service).
    #[arg(long)]
    ca_dir: PathBuf,
    /// This node's certificate name (CN); clients pin it.
    #[arg(long, default_value = DEFAULT_SERVER_NAME)]
    name: String,
    /// Volume table, `audit.log`, `run/` (engine sockets) and, by default, `data/`.
    #[arg(long)]
    state_dir: PathBuf,
    /// Volume files of the file engine (default `<state-dir>/data`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Control API (mutual TLS, control plane only).
    #[arg(long, default_value_t = format!("127.0.0.1:{DEFAULT_CONTROL_PORT}"))]
    listen_control: String,
    /// NBD listener (STARTTLS required, host certificates only).
    #[arg(long, default_value_t = format!("0.0.0.0:{DEFAULT_NBD_PORT}"))]
    listen_nbd: String,
    /// Where new volumes go.
    #[arg(long, value_enum, default_value = "file")]
    engine: EngineArg,
    /// Ceph configuration file (rbd engine).
    #[arg(long, env = "BULKHEAD_CEPH_CONF")]
    ceph_conf: Option<PathBuf>,
    /// Ceph pool (rbd engine).
    #[arg(long, env = "BULKHEAD_CEPH_POOL")]
    ceph_pool: Option<String>,
    /// Ceph client id without `client.` (rbd engine).
    #[arg(long, env = "BULKHEAD_CEPH_ID")]
    ceph_id: Option<String>,
    /// Keyring of that client (rbd engine).
    #[arg(long, env = "BULKHEAD_CEPH_KEYRING")]
    ceph_keyring: Option<PathBuf>,
    /// The qemu-storage-daemon binary.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// Drop to this uid (with --gid) once the listeners are bound and the keys read; the
    /// state and data directories are handed to it first. The engine runs as it too.
    #[arg(long, requires = "gid")]
    uid: Option<u32>,
    #[arg(long, requires = "uid")]
    gid: Option<u32>,
}

/// Hands `dir`, its entries and its subdirectories' entries to `uid`:`gid` (the node's own
/// layout is two levels deep).
fn chown_tree(dir: &Path, uid: u32, gid: u32, depth: u8) -> Result<(), MainError> {
    let io = |e| MainError::Io(dir.to_path_buf(), e);
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).map_err(io)?;
    if depth == 0 || !dir.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir).map_err(io)? {
        let p = e.map_err(io)?.path();
        chown_tree(&p, uid, gid, depth - 1)?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("audit log: {0}")]
    Audit(#[from] bulkhead_audit::AuditError),
    #[error("sandbox: {0}")]
    Sandbox(#[from] bulkhead_harden::HardenError),
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("the rbd engine needs --ceph-conf, --ceph-pool, --ceph-id and --ceph-keyring")]
    CephConfig,
    #[error("bad Ceph pool name")]
    CephPool,
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("listen {0}: {1}")]
    Listen(String, std::io::Error),
}

fn private_dir(p: &Path) -> Result<(), MainError> {
    std::fs::create_dir_all(p).map_err(|e| MainError::Io(p.to_path_buf(), e))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| MainError::Io(p.to_path_buf(), e))
}

fn bind(addr: &str) -> Result<std::net::TcpListener, MainError> {
    let l = std::net::TcpListener::bind(addr).map_err(|e| MainError::Listen(addr.into(), e))?;
    l.set_nonblocking(true)
        .map_err(|e| MainError::Listen(addr.into(), e))?;
    Ok(l)
}

fn run(args: Args) -> Result<(), MainError> {
    sandbox::apply()?;
    let ca = CaDir::new(&args.ca_dir);
    private_dir(&args.state_dir)?;
    let run_dir = args.state_dir.join("run");
    private_dir(&run_dir)?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| args.state_dir.join("data"));
    private_dir(&data_dir)?;
    let ceph = match args.engine {
        EngineArg::File => None,
        EngineArg::Rbd => {
            let (Some(conf), Some(pool), Some(id), Some(keyring)) = (
                args.ceph_conf.clone(),
                args.ceph_pool.clone(),
                args.ceph_id.clone(),
                args.ceph_keyring.clone(),
            ) else {
                return Err(MainError::CephConfig);
            };
            if !valid_pool(&pool) || !bulkhead_tokens::pki::valid_name(&id) {
                return Err(MainError::CephPool);
            }
            Some(CephConfig {
                conf,
                pool,
                id,
                keyring,
            })
        }
    };
    let files = TlsFiles {
        ca_pem: &ca.ca_pem(),
        cert_pem: &ca.cert(&args.name),
        key_pem: &ca.key(&args.name),
    };
    let control_tls = server_config(&files, &[b"http/1.1"])?;
    let nbd_tls = server_config(&files, &[])?;
    let (audit, report) =
        AuditLog::open_signed(&args.state_dir.join("audit.log"), &ca.key(&args.name))?;
    let control_listener = bind(&args.listen_control)?;
    let nbd_listener = bind(&args.listen_nbd)?;
    let control_addr = control_listener
        .local_addr()
        .map_err(|e| MainError::Listen(args.listen_control.clone(), e))?;
    let nbd_addr = nbd_listener
        .local_addr()
        .map_err(|e| MainError::Listen(args.listen_nbd.clone(), e))?;
    if let (Some(uid), Some(gid)) = (args.uid, args.gid) {
        chown_tree(&args.state_dir, uid, gid, 2)?;
        chown_tree(&data_dir, uid, gid, 1)?;
        bulkhead_harden::drop_privileges(uid, gid)?;
        tracing::info!(uid, gid, "privileges dropped");
    } else if running_as_root() {
        tracing::warn!("running as root without --uid/--gid: the node and its engine keep root");
    }
    let cfg = EngineConfig {
        qsd: args.qsd.clone(),
        run_dir,
        data_dir,
        ceph,
    };
    let engine_name = if cfg.ceph.is_some() { "rbd" } else { "file" };
    let rt =
        bulkhead_daemon::runtime().map_err(|e| MainError::Io(PathBuf::from("tokio runtime"), e))?;
    rt.block_on(async move {
        let (node, child, instance) = Node::open(&args.state_dir, cfg, audit.clone()).await?;
        let rid = request_id();
        audit.append_queued(entry(
            EntryKind::Lifecycle,
            &rid,
            None,
            "Start",
            Vec::new(),
            Decision::None,
            "ok",
        ));
        tokio::spawn(Arc::clone(&node).supervise(child, instance));
        let refusals = Refusals::new(Arc::new(NodeRefusals(audit.clone())));
        let control = tokio::net::TcpListener::from_std(control_listener)
            .map_err(|e| MainError::Listen(args.listen_control.clone(), e))?;
        let nbd = tokio::net::TcpListener::from_std(nbd_listener)
            .map_err(|e| MainError::Listen(args.listen_nbd.clone(), e))?;
        let server = Arc::new(NbdServer {
            node: Arc::clone(&node),
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(nbd_tls)),
            refusals: Arc::clone(&refusals),
        });
        tokio::spawn(nbd_server::serve(nbd, server));
        let volumes = node.volume_count().await;
        println!(
            "{}",
            serde_json::json!({
                "event": "ready",
                "service": "storage",
                "control": control_addr.to_string(),
                "nbd": nbd_addr.to_string(),
                "engine": engine_name,
                "volumes": volumes,
                "audit_records": report.records,
            })
        );
        tracing::info!(control = %control_addr, nbd = %nbd_addr, engine = engine_name, volumes, "ready");
        let app = router(node, Arc::clone(&refusals));
        bulkhead_mtls::serve(control, control_tls, app, Limits::default(), refusals)
            .await
            .map_err(|e| MainError::Listen(args.listen_control.clone(), e))
    })
}

fn running_as_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--self-test") {
        return match bulkhead_harden::self_test(sandbox::FILTERS) {
            Ok(()) => {
                println!("bulkhead-storage: self-test passed");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bulkhead-storage: self-test failed: {e}");
                ExitCode::from(bulkhead_daemon::FATAL)
            }
        };
    }
    bulkhead_daemon::init_logging("BULKHEAD_LOG", "info");
    bulkhead_daemon::exit("bulkhead-storage", run(Args::parse()))
}
