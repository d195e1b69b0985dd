//! `bulkhead-controller`: see the crate README for the API and error codes.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_audit::AuditLog;
use bulkhead_controller::attest::AgentLink;
use bulkhead_controller::backend::{DetachedBackend, InstanceBackend, VolumeBackend};
use bulkhead_controller::config::Config;
use bulkhead_controller::controller::Controller;
use bulkhead_controller::cores::{self, CoreAllocator, CoreIsolation, HostTopology};
use bulkhead_controller::host::{HostBackend, HostConfig, DEFAULT_IMAGE, DEFAULT_KERNEL_ARGS};
use bulkhead_controller::launcher::{self, Launcher, LauncherConfig};
use bulkhead_controller::record::HostRecord;
use bulkhead_controller::supervisor::EXIT_APPLY_RELEASE;
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
    // `scripts/build-host-image.sh` (BULKHEAD_HOST_TAMPER=binary, tests only) flips one byte of
    // the text `explicit fallback: nothing runs` below in the built binary and requires it to
    // occur exactly once: rewording it breaks that test image build.
    /// Which backend drives instances: `host` (real hypervisor and block-card processes; needs a
    /// guest kernel), `detached` (explicit fallback: nothing runs), or `auto` (host when a guest
    /// is configured or found, else detached).
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Guest directory with `vmlinux` and `initramfs.cpio` (dev default: target/guest).
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// The `bulkhead-hypervisor` binary (default: next to this binary).
    #[arg(long)]
    hypervisor_bin: Option<PathBuf>,
    /// The `bulkhead-blockcard` binary (default: next to this binary).
    #[arg(long)]
    blockcard_bin: Option<PathBuf>,
    /// Sealing host key file handed to block cards (dev default: DIR/host.key if it exists).
    #[arg(long)]
    card_host_key: Option<PathBuf>,
    /// The `bulkhead-netcard` binary (default: next to this binary, when it is there).
    #[arg(long)]
    netcard_bin: Option<PathBuf>,
    /// This host's address for VPC datagrams: net cards listen on it (default: the listen
    /// address's, when that is one IPv4 address). Without one no net card runs here.
    #[arg(long)]
    net_host_ip: Option<std::net::Ipv4Addr>,
    /// First UDP port handed to a net card (one port per card).
    #[arg(long, default_value_t = 40000)]
    net_port_base: u16,
    /// How many UDP ports from --net-port-base net cards may use.
    #[arg(long, default_value_t = 1000)]
    net_ports: u16,
    /// Guest kernel arguments.
    #[arg(long)]
    kernel_args: Option<String>,
    /// Size of a volume's backing file when it is first created.
    #[arg(long, default_value_t = 64)]
    volume_size_mib: u64,
    /// uid:gid that hypervisors and block cards drop to (default 65534:65534 when run as root).
    #[arg(long)]
    run_as: Option<String>,
    /// `dedicated` (production default): whole cores per instance, vCPU threads pinned, the
    /// controller, launcher and cards on the host cores, an instance refused when whole cores
    /// are not free. `shared` (`--dev` default): nothing pinned.
    #[arg(long, value_enum)]
    core_isolation: Option<IsolationChoice>,
    /// CPUs whose whole cores stay with the host (default 0), e.g. `0,1`.
    #[arg(long, value_delimiter = ',')]
    host_cpus: Option<Vec<usize>>,
    /// Where the binaries this controller names by default (hypervisor, cards) live (default:
    /// this binary's directory). The host's supervisor passes the original binary's directory
    /// when it starts a release's controller (`releases/v<N>/bulkhead-controller`).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// A supervisor started this controller and starts it again when it exits: DeployRelease
    /// of a release carrying a controller makes it exit with status 75 (apply the release).
    /// Without it the controller serves on and audits `controller_restart_unsupervised`.
    #[arg(long)]
    supervised: bool,
    /// Internal: run as the launcher on this inherited fd (see `launcher.rs`).
    #[arg(long, hide = true, requires = "launcher_config")]
    launcher_fd: Option<i32>,
    /// Internal: the launcher's fixed configuration (JSON).
    #[arg(long, hide = true)]
    launcher_config: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BackendChoice {
    Auto,
    Host,
    Detached,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum IsolationChoice {
    Dedicated,
    Shared,
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("cores: {0}")]
    Cores(#[from] bulkhead_controller::cores::CoreError),
    #[error("give either --dev --state-dir DIR or --config FILE")]
    NoConfig,
    #[error(transparent)]
    ReleaseTrust(#[from] bulkhead_rot::release::PinnedTrustError),
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
    #[error("attestation agent at {0}: {1}")]
    Attest(PathBuf, std::io::Error),
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
    #[error("--backend host needs a guest directory with vmlinux (--guest-dir or guest_dir)")]
    NoGuest,
    #[error("{0}: {1}")]
    Path(PathBuf, std::io::Error),
    #[error("--run-as wants UID:GID")]
    RunAs,
    #[error("launcher: {0}")]
    Launcher(#[from] launcher::LauncherError),
    #[error("{0}")]
    Record(#[from] bulkhead_controller::record::RecordError),
    #[error("adopting the running instances failed: {0}")]
    Adopt(&'static str),
}

/// One controller per host at a time: an exclusive lock on `run_dir/controller.lock`, taken
/// before the keeper is looked for or started and held until this process exits (the fd is
/// close-on-exec, so the keeper does not inherit it and a restarted controller can take it).
/// Without it two controllers started at the same moment could each start a keeper, the
/// second replacing the first's socket and orphaning its children.
fn hold_controller_lock(run_dir: &std::path::Path) -> Result<(), StartError> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(run_dir).map_err(|e| StartError::Path(run_dir.to_path_buf(), e))?;
    let path = run_dir.join("controller.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StartError::Path(path.clone(), e))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(StartError::Launcher(launcher::LauncherError::KeeperBusy));
    }
    // Held for the life of the process (released by the kernel when it exits).
    std::mem::forget(lock);
    Ok(())
}

use bulkhead_controller::supervisor::HOST_RECORD_FILE;

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

fn absolute(p: &std::path::Path) -> Result<PathBuf, StartError> {
    std::fs::canonicalize(p).map_err(|e| StartError::Path(p.to_path_buf(), e))
}

/// Where the binaries this controller names by default live: `--bin-dir`, else its own
/// directory.
static BIN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn bin_dir() -> PathBuf {
    BIN_DIR
        .get_or_init(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(std::path::Path::to_path_buf))
                .unwrap_or_default()
        })
        .clone()
}

fn next_to_exe(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Decides the backend and, for the real one, starts the launcher. Runs before any secret is
/// read and before the sandbox.
fn host_backend(
    args: &Args,
    cfg: &Config,
) -> Result<Option<(HostConfig, LauncherConfig)>, StartError> {
    let guest = args.guest_dir.clone().or_else(|| cfg.guest_dir.clone());
    let guest = match (args.backend, guest) {
        (BackendChoice::Detached, _) => return Ok(None),
        (BackendChoice::Auto, None) => return Ok(None),
        (BackendChoice::Host, None) => return Err(StartError::NoGuest),
        (_, Some(g)) => g,
    };
    if !guest.join("vmlinux").is_file() {
        return Err(StartError::NoGuest);
    }
    let guest = absolute(&guest)?;
    let initrd = Some(guest.join("initramfs.cpio")).filter(|p| p.is_file());
    let state = |p: Option<PathBuf>, what: &str| -> Result<PathBuf, StartError> {
        let p = p.unwrap_or_else(|| cfg.audit_log.with_file_name(what));
        std::fs::create_dir_all(&p).map_err(|e| StartError::Path(p.clone(), e))?;
        absolute(&p)
    };
    let volume_dir = state(cfg.volume_dir.clone(), "volumes")?;
    let release_dir = state(cfg.release_dir.clone(), "releases")?;
    let run_dir = state(cfg.run_dir.clone(), "run")?;
    let run_as = match &args.run_as {
        Some(s) => {
            let (u, g) = s.split_once(':').ok_or(StartError::RunAs)?;
            Some((
                u.parse().map_err(|_| StartError::RunAs)?,
                g.parse().map_err(|_| StartError::RunAs)?,
            ))
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        None if unsafe { libc::geteuid() } == 0 => Some((65534, 65534)),
        None => None,
    };
    let vcpus = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let isolation = match args.core_isolation {
        Some(IsolationChoice::Dedicated) => CoreIsolation::Dedicated,
        Some(IsolationChoice::Shared) => CoreIsolation::Shared,
        None => cfg.core_isolation.unwrap_or(CoreIsolation::Dedicated),
    };
    let cores = match isolation {
        CoreIsolation::Dedicated => {
            let host_cpus = args
                .host_cpus
                .clone()
                .or_else(|| cfg.host_cpus.clone())
                .unwrap_or_else(|| vec![0]);
            let topo = HostTopology::from_sysfs(std::path::Path::new(cores::SYSFS_CPU))?;
            let a = CoreAllocator::new(topo, &host_cpus)?;
            tracing::info!(
                host_cpus = %cores::format_cpu_list(&a.host_cpus()),
                instance_cores = a.instance_cores(),
                "whole cores per instance; the host keeps its own cores"
            );
            Some(a)
        }
        CoreIsolation::Shared => {
            tracing::warn!("cores are shared: vCPU threads are not pinned and instances share cores with each other and with the host (development only)");
            None
        }
    };
    let host_cpus = cores
        .as_ref()
        .map(CoreAllocator::host_cpus)
        .unwrap_or_default();
    let host = HostConfig {
        image: DEFAULT_IMAGE.to_string(),
        kernel: guest.join("vmlinux"),
        initrd,
        kernel_args: args
            .kernel_args
            .clone()
            .or_else(|| cfg.kernel_args.clone())
            .unwrap_or_else(|| DEFAULT_KERNEL_ARGS.to_string()),
        volume_dir: volume_dir.clone(),
        volume_size_mib: args.volume_size_mib,
        run_as,
        vcpus_total: vcpus,
        memory_mib_total: memory_mib(),
        cores,
        net: None,
    };
    let launch = LauncherConfig {
        hypervisor_bin: args
            .hypervisor_bin
            .clone()
            .or_else(|| cfg.hypervisor_bin.clone())
            .unwrap_or_else(|| next_to_exe("bulkhead-hypervisor")),
        blockcard_bin: args
            .blockcard_bin
            .clone()
            .or_else(|| cfg.blockcard_bin.clone())
            .unwrap_or_else(|| next_to_exe("bulkhead-blockcard")),
        host_cpus,
        guest_dir: guest,
        volume_dir,
        run_dir,
        host_key: args
            .card_host_key
            .clone()
            .or_else(|| cfg.card_host_key.clone()),
        netcard_bin: args
            .netcard_bin
            .clone()
            .or_else(|| cfg.netcard_bin.clone())
            .or_else(|| Some(next_to_exe("bulkhead-netcard")))
            .filter(|b| b.is_file()),
        card_tls: Some(bulkhead_controller::launcher::CardTls {
            ca: cfg.ca_cert.clone(),
            cert: cfg.host_cert.clone(),
            key: cfg.host_key.clone(),
        }),
        release_dir: Some(release_dir),
        release_root: cfg.release_root.clone(),
        release_environment: cfg.release_environment.clone(),
    };
    let net_ip = args.net_host_ip.or(cfg.net_host_ip).or_else(|| {
        match cfg.listen.parse::<std::net::SocketAddr>().ok()?.ip() {
            std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
            _ => None,
        }
    });
    let mut host = host;
    host.net = match (net_ip, &launch.netcard_bin, &launch.host_key) {
        (Some(host_ip), Some(_), Some(_)) => Some(bulkhead_controller::host::NetHostConfig {
            host_ip,
            port_base: args.net_port_base,
            ports: args.net_ports,
        }),
        _ => {
            tracing::info!(
                "no net card binary, host key or host address: this host runs no net cards"
            );
            None
        }
    };
    for b in [&launch.hypervisor_bin, &launch.blockcard_bin] {
        if !b.is_file() {
            return Err(StartError::Path(
                b.clone(),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
    }
    Ok(Some((host, launch)))
}

/// The host's release store: its pinned trust root, environment and directory.
fn release_store(
    cfg: &Config,
) -> Result<Option<bulkhead_controller::deploy::ReleaseStore>, StartError> {
    let Some(root_path) = &cfg.release_root else {
        return Ok(None);
    };
    let bulkhead_rot::release::PinnedTrust { root, environment } =
        bulkhead_rot::release::PinnedTrust::load(root_path, cfg.release_environment.as_deref())?;
    let dir = cfg.releases_dir();
    std::fs::create_dir_all(&dir).map_err(|e| StartError::Path(dir.clone(), e))?;
    Ok(Some(bulkhead_controller::deploy::ReleaseStore {
        root,
        environment,
        dir: absolute(&dir)?,
    }))
}

/// The release whose installed controller this binary is (its path is `<release
/// dir>/v<N>/bulkhead-controller`), if any: a controller started from a release directory.
fn running_release(cfg: &Config) -> Option<u64> {
    let exe = std::env::current_exe().ok()?;
    let dir = std::fs::canonicalize(cfg.releases_dir()).ok()?;
    let v = exe.parent()?;
    if v.parent()? != dir {
        return None;
    }
    v.file_name()?.to_str()?.strip_prefix('v')?.parse().ok()
}

fn run(args: Args) -> Result<(), StartError> {
    if let (Some(fd), Some(json)) = (args.launcher_fd, &args.launcher_config) {
        let cfg: LauncherConfig = serde_json::from_str(json)
            .map_err(|_| StartError::Launcher(launcher::LauncherError::BadReply))?;
        return Ok(launcher::run_launcher(fd, cfg)?);
    }
    if args.print_openapi {
        print!("{}", openapi::document_json());
        return Ok(());
    }
    if let Some(d) = &args.bin_dir {
        let _ = BIN_DIR.set(d.clone());
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

    // The launcher is exec'd first: before any key is read, any thread exists or the sandbox
    // forbids exec.
    // The host's durable record of its instances is read (and checked) before any process is
    // touched: a record this controller cannot trust stops it here, and whatever runs keeps
    // running for a controller that can.
    let record_path = cfg.audit_log.with_file_name(HOST_RECORD_FILE);
    let (host, record) = match host_backend(&args, &cfg)? {
        Some((host, launch)) => {
            let record = HostRecord::load(&record_path)?;
            hold_controller_lock(&launch.run_dir)?;
            // The controller runs on the host cores (its launcher confines itself too).
            if !launch.host_cpus.is_empty() {
                cores::confine_process(&launch.host_cpus)?;
            }
            // A keeper left by the previous controller holds the running instances: adopt it.
            let l = match Launcher::connect_keeper(&launch.run_dir)? {
                Some(l) => l,
                None => Launcher::start(&launch)?,
            };
            tracing::info!(
                guest = %launch.guest_dir.display(),
                hypervisor = %launch.hypervisor_bin.display(),
                blockcard = %launch.blockcard_bin.display(),
                launcher = l.pid(),
                adopted = l.adopted(),
                recorded_instances = record.instances.len(),
                "backend: host (real hypervisor and block-card processes)"
            );
            (
                Some(Arc::new(HostBackend::new(
                    host,
                    l,
                    Some(record_path.clone()),
                ))),
                Some(record),
            )
        }
        None => {
            tracing::warn!(
                "backend: detached — no guest kernel configured; instances are recorded in memory and NO GUEST RUNS"
            );
            (None, None)
        }
    };

    // Started by the host's supervisor from an installed release's controller (it verified
    // the release itself): the release this process runs. When the host's active release
    // carries a controller, `DeployRelease:controller-applied` is audited after adoption:
    // `ok` if this process runs it, `controller_not_applied` if not (the supervisor refused
    // it or it did not start, and the original binary runs).
    let controller_release = running_release(&cfg);
    let active_controller = record
        .as_ref()
        .and_then(|r| r.release.as_ref())
        .filter(|r| r.carries(bulkhead_rot::supervise::RELEASE_CONTROLLER))
        .map(|r| r.version);
    let ca = CertificateDer::from_pem_slice(&read(&cfg.ca_cert)?)
        .map_err(|_| StartError::Pem(cfg.ca_cert.clone()))?;
    let chain = CertificateDer::pem_slice_iter(&read(&cfg.host_cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| StartError::Pem(cfg.host_cert.clone()))?;
    let key = PrivateKeyDer::from_pem_slice(&read(&cfg.host_key)?)
        .map_err(|_| StartError::Pem(cfg.host_key.clone()))?;
    // The audit log's checkpoints are signed with this host's own TLS key, so whoever holds the
    // host's certificate can check that no record was edited, cut or rewritten.
    let audit_signer = bulkhead_audit::CheckpointSigner::from_pkcs8_der(key.secret_der())
        .map_err(|_| StartError::Pem(cfg.host_key.clone()))?;
    let tls = server::tls_config(ca, chain, key)?;
    let pk_text = String::from_utf8_lossy(&read(&cfg.token_public_key)?).to_string();
    let verifier = Verifier::new(
        public_key_from_text(&pk_text).ok_or(StartError::TokenKey(cfg.token_public_key.clone()))?,
    );
    let policy = Policy::parse(&String::from_utf8_lossy(&read(&cfg.rights)?))?;
    // Preallocated: each request's group commit then costs one device write (the records), not
    // two (the records and the inode's new size); see the audit crate's README.
    let (audit, report) = AuditLog::open_with_options(
        &cfg.audit_log,
        bulkhead_audit::LogOptions {
            signer: Some(Arc::new(audit_signer)),
            preallocate: true,
        },
    )?;
    let adopt_from = host.clone().zip(record);
    let keeper_pid = host.as_ref().map(|h| h.keeper_pid());
    let host_cpus = host.as_ref().map(|h| h.host_cpus()).unwrap_or_default();
    let (instances, volumes): (Arc<dyn InstanceBackend>, Arc<dyn VolumeBackend>) = match host {
        Some(h) => (h.clone(), h),
        None => {
            let vcpus = std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
                .unwrap_or(1);
            let d = Arc::new(DetachedBackend::new(vcpus, memory_mib()));
            (d.clone(), d)
        }
    };
    let backend_kind = instances.kind();
    // Connected now: once the sandbox is on, the controller can connect nowhere.
    let attest = match &cfg.attest_socket {
        Some(p) => match AgentLink::connect(p) {
            Ok(l) => {
                tracing::info!(socket = %p.display(), "attestation agent connected");
                l
            }
            Err(e) => return Err(StartError::Attest(p.clone(), e)),
        },
        None => {
            tracing::warn!("no attestation agent configured: this host cannot attest, and a KMS that requires attestation will release no volume key to it");
            AgentLink::none()
        }
    };
    let mut ctrl = Controller::new(
        cfg.host_id.clone(),
        verifier,
        policy,
        cfg.revocations.clone(),
        audit,
        instances,
        volumes,
    )
    .with_attestation(attest);
    match (release_store(&cfg)?, keeper_pid) {
        (Some(store), Some(_)) => {
            tracing::info!(dir = %store.dir.display(), environment = %store.environment, "releases: DeployRelease verifies against the pinned trust root");
            ctrl = ctrl.with_releases(store);
        }
        _ => {
            tracing::info!("releases: no trust root (or no host backend); DeployRelease answers deploy_unavailable");
        }
    }
    // Bind before the sandbox forbids new inet sockets.
    let std_listener = std::net::TcpListener::bind(&cfg.listen)
        .map_err(|e| StartError::Listen(cfg.listen.clone(), e))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| StartError::Listen(cfg.listen.clone(), e))?;
    let local = std_listener
        .local_addr()
        .map_err(|e| StartError::Listen(cfg.listen.clone(), e))?;
    let (restart_tx, mut restart_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let ctrl = ctrl.with_controller_release(controller_release);
    // Only a supervised controller exits for a release: nothing would start it again otherwise.
    let ctrl = Arc::new(if args.supervised {
        ctrl.with_restart(restart_tx)
    } else {
        drop(restart_tx);
        ctrl
    });

    sandbox::harden()?;

    let rt = bulkhead_daemon::runtime().map_err(StartError::Runtime)?;
    rt.block_on(async move {
        if let Some(target) = args.sandbox_self_test {
            let attempt = std::net::TcpStream::connect(&target);
            // The controller cannot run a program either (only its launcher can).
            // Our own binary certainly exists, so a failure is the filter's doing: EPERM from
            // the trap, or (posix_spawn resets handlers in the child) a child killed by SIGSYS.
            let exec = std::process::Command::new("/proc/self/exe")
                .arg("--help")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            let exec_blocked = match &exec {
                Err(e) => e.raw_os_error() == Some(libc::EPERM),
                Ok(st) => {
                    use std::os::unix::process::ExitStatusExt;
                    st.signal() == Some(libc::SIGSYS)
                }
            };
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
                    "exec_blocked": exec_blocked,
                    "blocked_attempts": sandbox::blocked_attempts(),
                    "error": attempt.err().map(|e| e.to_string()),
                })
            );
            if blocked && exec_blocked {
                return Ok(());
            }
            std::process::exit(1);
        }
        ctrl.audit_lifecycle("ControllerStart").await?;
        ctrl.audit_damage_found(&report.alerts);
        // Adopt what the previous controller left running, before serving anyone.
        let mut adopted = serde_json::Value::Null;
        if let Some((h, rec)) = adopt_from {
            let recorded = rec.instances.len();
            let r = tokio::task::spawn_blocking(move || h.adopt(rec))
                .await
                .map_err(|_| StartError::Adopt("adoption task failed"))?
                .map_err(|e| StartError::Adopt(e.code()))?;
            for a in &r.instances {
                tracing::info!(instance = %a.instance, codes = ?a.codes, pid = ?a.hypervisor_pid, "instance adopted");
                ctrl.audit_lifecycle_about(
                    "AdoptInstance",
                    vec![format!("instance:{}", a.instance)],
                    &a.codes.join(","),
                )
                .await?;
            }
            for pid in &r.orphans_reaped {
                ctrl.audit_lifecycle_about(
                    "ReapUnrecordedChild",
                    vec![format!("pid:{pid}")],
                    "ok",
                )
                .await?;
            }
            if recorded > 0 || !r.orphans_reaped.is_empty() {
                ctrl.audit_lifecycle_about(
                    "ControllerAdopted",
                    vec![format!("instances:{}", r.instances.len())],
                    "ok",
                )
                .await?;
            }
            adopted = serde_json::json!({
                "instances": r.instances.len(),
                "orphans_reaped": r.orphans_reaped.len(),
                "adopt_ms": r.millis,
            });
        }
        if let Some(v) = active_controller {
            let code = if controller_release == Some(v) {
                "ok"
            } else {
                tracing::error!(
                    release = v,
                    running = ?controller_release,
                    "the active release's controller is not the one running"
                );
                "controller_not_applied"
            };
            ctrl.audit_lifecycle_about(
                "DeployRelease:controller-applied",
                vec![format!("release:v{v}")],
                code,
            )
            .await?;
        }
        let restarter = Arc::clone(&ctrl);
        tokio::spawn(async move {
            while let Some(v) = restart_rx.recv().await {
                if let Some(_deploy_lock) = restarter.prepare_release_exit(v).await {
                    // Keepers, hypervisors, cards and guests run on (as after a kill -9); the
                    // supervisor verifies release v and starts its controller.
                    std::process::exit(EXIT_APPLY_RELEASE);
                }
            }
        });
        let listener = tokio::net::TcpListener::from_std(std_listener)
            .map_err(|e| StartError::Listen(cfg.listen.clone(), e))?;
        let poller = Arc::clone(&ctrl);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                poller.poll_sandbox();
                let p = Arc::clone(&poller);
                let _ = tokio::task::spawn_blocking(move || p.poll_children()).await;
            }
        });
        // Not println!: whoever started this controller may have stopped reading the stream.
        let _ = writeln!(
            std::io::stdout(),
            "{}",
            serde_json::json!({
                "event": "ready",
                "listen": local.to_string(),
                "host_id": cfg.host_id,
                "backend": backend_kind,
                "audit_records": report.records,
                "keeper_pid": keeper_pid,
                "host_cpus": host_cpus,
                "adopted": adopted,
                "controller_release": controller_release,
            })
        );
        tracing::info!(listen = %local, host = %cfg.host_id, "controller ready");
        server::serve(listener, tls, ctrl)
            .await
            .map_err(|e| StartError::Listen(local.to_string(), e))
    })
}

fn main() -> ExitCode {
    // Run by the host's measured start before it takes customer work: the controller's
    // outbound-blocking filter and its launcher's filter compile for this kernel's architecture.
    if std::env::args().nth(1).as_deref() == Some("--self-test") {
        return match bulkhead_harden::self_test(sandbox::FILTERS) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bulkhead-controller: self-test failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    bulkhead_daemon::init_logging("BULKHEAD_LOG", "info");
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead-controller: {e}");
            ExitCode::from(2)
        }
    }
}
