//! `bulkhead-devcluster`: start a whole local cluster (`up`, what `bulkhead up` runs) or
//! benchmark one (`bench`, what `scripts/bench-control.sh` runs). Development and tests only.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bulkhead_devcluster::cluster;
use bulkhead_ec2_query::bh1 as sigv;
use bulkhead_mtls as tls;
use bulkhead_tokens::pki::ServerIdentity;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead-devcluster",
    about = "A local Bulkhead cluster for development and tests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

mod deploy;

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Deploy a signed release to every host of the cluster in DIR, in waves (one host, then
    /// the rest), as the cluster's deployer: upload, DeployRelease, health, attestation with the
    /// new measurements; a failed wave stops the rollout. Prints the report as JSON.
    Deploy {
        #[arg(long)]
        dir: PathBuf,
        /// The signed release (JSON).
        #[arg(long)]
        release: PathBuf,
        /// Directory holding the release's artefacts.
        #[arg(long)]
        artefacts: PathBuf,
        /// The deployer's certificate name in the cluster's CA.
        #[arg(long, default_value = "deployer")]
        caller: String,
    },
    /// Start a local cluster (KMS, token service, N host controllers, the control plane) in DIR
    /// and keep it running until interrupted. Writes DIR/cluster.json once everything is up.
    Up {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// Record every inter-service link through relays into DIR/capture/.
        #[arg(long)]
        record: bool,
        /// Controller instance backend (`auto`, `host`, `detached`), if the controller supports it.
        #[arg(long)]
        controller_backend: Option<String>,
        /// Directory with the daemons' binaries (default: next to this one).
        #[arg(long)]
        bins: Option<PathBuf>,
        /// Whole cores each host offers (default: half this machine's threads).
        #[arg(long)]
        host_cores: Option<u32>,
        /// Run each host as the sealed host image (`make host-image`) under QEMU (TCG, OVMF,
        /// its own swtpm) instead of host processes; the control plane attests its whole boot
        /// chain. Needs root, qemu-system-x86_64, OVMF and swtpm.
        #[arg(long)]
        sealed_hosts: bool,
        /// The host image directory for --sealed-hosts (default: `host-image` next to the
        /// binaries' directory, where `make host-image` puts it).
        #[arg(long)]
        host_image: Option<PathBuf>,
        /// With --sealed-hosts: boot host N from another image directory (`N=DIR`) than the one
        /// the control plane expects, to watch it be refused. Repeatable.
        #[arg(long, value_parser = parse_other_image)]
        sealed_boot_image: Vec<(usize, PathBuf)>,
        /// With --sealed-hosts: host N's TPM is made by a rogue manufacturer (an EK certificate
        /// from a CA the control plane does not trust), to watch its AK not be enrolled.
        /// Repeatable.
        #[arg(long)]
        sealed_rogue_tpm: Vec<usize>,
    },
    /// Benchmark a local cluster: RunInstances and AttachVolume latency, API throughput.
    /// Prints a markdown section.
    Bench {
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        #[arg(long, default_value_t = 40)]
        iterations: usize,
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Also measure with the control plane on this PostgreSQL server.
        #[arg(long)]
        database_url: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("cluster: {0}")]
    Cluster(#[from] cluster::ClusterError),
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
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

/// The directory of this binary, where `make build` puts every Bulkhead binary.
fn own_dir() -> Result<PathBuf, CliError> {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or(CliError::BadArgument("cannot locate binaries"))
}

/// Whether `bulkhead-controller` in `bins` accepts `--backend`.
fn controller_backend_args(bins: &Path, backend: Option<&str>) -> Vec<String> {
    let Some(b) = backend else { return Vec::new() };
    let help = std::process::Command::new(bins.join("bulkhead-controller"))
        .arg("--help")
        .output();
    match help {
        Ok(o) if String::from_utf8_lossy(&o.stdout).contains("--backend") => {
            vec!["--backend".into(), b.to_string()]
        }
        _ => Vec::new(),
    }
}

fn parse_other_image(s: &str) -> Result<(usize, PathBuf), String> {
    let (n, d) = s
        .split_once('=')
        .ok_or_else(|| "expected N=DIR".to_string())?;
    let n: usize = n
        .parse()
        .map_err(|_| "N must be a host number".to_string())?;
    Ok((n, PathBuf::from(d)))
}

/// `up`'s sealed-host switches.
struct SealedArgs {
    on: bool,
    image: Option<PathBuf>,
    other: Vec<(usize, PathBuf)>,
    rogue_tpm: Vec<usize>,
}

fn up(
    dir: &Path,
    hosts: usize,
    record: bool,
    backend: Option<String>,
    bins: Option<PathBuf>,
    host_cores: Option<u32>,
    sealed: SealedArgs,
) -> Result<(), CliError> {
    let bins = match bins {
        Some(b) => b,
        None => own_dir()?,
    };
    let sealed_opts = if sealed.on {
        let image = match sealed.image {
            Some(i) => i,
            None => bins
                .parent()
                .map(|t| t.join("host-image"))
                .ok_or(CliError::BadArgument("cannot locate the host image"))?,
        };
        Some(cluster::SealedOptions {
            image,
            boot_other_image: sealed.other,
            boot_timeout: Duration::from_secs(600),
            rogue_tpm: sealed.rogue_tpm,
        })
    } else {
        None
    };
    let sealed_mode = sealed_opts.is_some();
    let opts = cluster::StartOptions {
        hosts,
        controller_args: controller_backend_args(&bins, backend.as_deref()),
        bins: bins.clone(),
        record,
        poll_interval_ms: 1000,
        database_url: None,
        attest: None,
        netns: None,
    };
    let mut c = cluster::start_replicated(
        dir,
        &opts,
        &cluster::ReplicaOptions {
            host_cores,
            storage: (!sealed_mode && bins.join("bulkhead-storage").is_file())
                .then_some(cluster::StorageEngine::File),
            sealed: sealed_opts,
            ..cluster::ReplicaOptions::default()
        },
    )?;
    let ca = dir.join("ca/ca.pem");
    println!("Bulkhead cluster up in {}", dir.display());
    println!("  KMS            {} (mTLS, control plane only)", c.kms_addr);
    println!(
        "  token service  {} (mTLS; the only holder of the token signing key)",
        c.token_addr
    );
    for (h, a) in &c.host_addrs {
        println!("  controller     {a} ({h}, mTLS + tokens)");
    }
    if c.nets.is_empty() {
        println!(
            "  network        loopback ports (run as root for one network namespace per host)"
        );
    } else {
        println!(
            "  network        one namespace per host, reached only over its veth link ({})",
            c.nets
                .iter()
                .map(|n| format!("{} {}", n.ns, n.host_ip))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    match &c.storage {
        Some(s) => println!(
            "  storage node   {} (NBD over TLS for granted hosts; control API {}): volumes are network volumes, ciphertext only",
            s.nbd_addr, s.control_addr
        ),
        None => println!("  storage node   none (bulkhead-storage not built): volumes are files on the attaching host"),
    }
    if sealed_mode {
        for (h, secs) in &c.sealed_ready_secs {
            println!("  sealed host    {h}: host image under QEMU TCG + OVMF + its own swtpm, controller ready {secs:.1} s after power-on, reached on its mTLS port only");
        }
        for (h, verdict) in sealed_verdicts(&c)? {
            println!("  boot chain     {h}: {verdict}");
        }
        println!("  attestation    sealed hosts: the control plane enrols each one's AK only once its TPM activates a credential for it under an EK certified by the dev manufacturer's CA, then verifies its whole boot chain (PCRs 4, 9, 11, 12 against the image manifest, 23 against its config disk) when polled and before placing; GET /v1/operator/hosts shows boot_attestation");
        println!("  instances      none on sealed hosts here (0 cores offered: no nested virtualization, their controllers run the detached backend)");
    } else if c.attested {
        println!("  attestation    each host: own TPM (swtpm), measured start of a 2-of-3 signed release; the KMS seals keys only after a fresh quote");
    } else {
        println!("  attestation    OFF (swtpm or bulkhead-launcher missing): the KMS trusts enrolled host keys without a quote");
    }
    println!(
        "  control plane  {} (customer API, signed requests)",
        c.control_addr
    );
    println!(
        "  operator API   {} (mTLS, operator certificates only: GET /v1/operator/hosts, /hosts/ID/audit, /alerts, /metrics)",
        c.operator_addr
    );
    println!("Create a customer and call the API:");
    println!("  {}/bulkhead-control create-customer --config {}/control.toml --tenant acme --out acme.json", bins.display(), dir.display());
    println!("  {}/bulkhead-control call --endpoint {} --ca {} --credentials acme.json RunInstances '{{\"ImageId\":\"img-1\"}}'", bins.display(), c.control_addr, ca.display());
    println!("Or drive it with the aws CLI or any AWS SDK (EC2 Query API, AWS Signature Version 4, region {}):", bulkhead_control::config::DEFAULT_REGION);
    println!("  export AWS_CA_BUNDLE={}", ca.display());
    println!(
        "  export AWS_DEFAULT_REGION={}",
        bulkhead_control::config::DEFAULT_REGION
    );
    println!("  export AWS_ACCESS_KEY_ID=$(jq -r .access_key_id acme.json) AWS_SECRET_ACCESS_KEY=$(jq -r .secret acme.json)");
    println!(
        "  aws ec2 describe-instances --endpoint-url https://{}",
        c.control_addr
    );
    println!(
        "Operator view of pulled host state: bulkhead-control hosts --config {}/control.toml",
        dir.display()
    );
    println!("Stop with Ctrl-C (or SIGTERM).");
    println!(
        "{}",
        json!({"event": "ready", "service": "cluster", "dir": dir.display().to_string(), "control": c.control_addr, "ec2_endpoint_url": format!("https://{}", c.control_addr), "aws_ca_bundle": ca.display().to_string(), "region": bulkhead_control::config::DEFAULT_REGION})
    );
    runtime()?.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| CliError::Io("signal".into(), e))?;
        // The hosts' controller supervisor: a controller that exits to apply a release is
        // started again from the binary the host's release verifies to (see `cluster::supervise`).
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tick.tick() => {
                    for r in c.supervise_hosts() {
                        println!(
                            "{}",
                            json!({"event": "controller_restarted", "host": r.host, "release": r.release, "pid": r.pid})
                        );
                    }
                }
            }
        }
        Ok::<(), CliError>(())
    })?;
    drop(c);
    Ok(())
}

/// Waits (up to 120 s) until the control plane's operator view has a boot-chain verdict for
/// every sealed host; returns each host's verdict as a line, with the time from its power-on.
fn sealed_verdicts(c: &cluster::Cluster) -> Result<Vec<(String, String)>, CliError> {
    let ca = c.dir.join("ca");
    let op = tls::HttpsClient::pinned(
        &ca.join("ca.pem"),
        Some((&ca.join("operator.pem"), &ca.join("operator.key"))),
        ServerIdentity::control_plane(),
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let rt = runtime()?;
    let mut out: Vec<(String, String)> = Vec::new();
    while out.len() < c.sealed_vms.len() && std::time::Instant::now() < deadline {
        let hosts = rt
            .block_on(op.request(
                &c.operator_addr,
                "GET",
                "/v1/operator/hosts",
                &[],
                Vec::new(),
            ))
            .ok()
            .filter(|r| r.status == 200)
            .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok())
            .unwrap_or(Value::Null);
        for vm in &c.sealed_vms {
            if out.iter().any(|(h, _)| *h == vm.name) {
                continue;
            }
            let Some(b) = hosts
                .as_array()
                .and_then(|a| a.iter().find(|h| h["host_id"] == vm.name.as_str()))
                .map(|h| &h["boot_attestation"])
            else {
                continue;
            };
            let secs = vm.started.elapsed().as_secs_f64();
            match b["state"].as_str() {
                Some("attested") => out.push((
                    vm.name.clone(),
                    format!("attested (AK certified by its TPM's EK; PCRs 4, 9, 11, 12, 23 exact) {secs:.1} s after power-on"),
                )),
                Some("refused") => out.push((
                    vm.name.clone(),
                    format!(
                        "REFUSED ({}; PCRs differing: {}) {secs:.1} s after power-on: no work is placed on it",
                        b["code"].as_str().unwrap_or("?"),
                        b["pcrs_differing"]
                    ),
                )),
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for vm in &c.sealed_vms {
        if !out.iter().any(|(h, _)| *h == vm.name) {
            out.push((vm.name.clone(), "no verdict within 120 s".into()));
        }
    }
    Ok(out)
}

/// A signing customer client for the bench.
struct Signer {
    akid: String,
    secret: Vec<u8>,
    endpoint: String,
    client: tls::HttpsClient,
}

impl Signer {
    async fn call(&self, action: &str, body: &Value) -> Result<(u16, Value), CliError> {
        let body = body.to_string();
        let parts = sigv::SignedParts {
            method: "POST".into(),
            path: format!("/v1/{action}"),
            query: String::new(),
            host: self.endpoint.clone(),
            date: sigv::format_date(bulkhead_control::service::now()),
            body: body.clone(),
            nonce: bulkhead_sealing::random_nonce(),
        };
        let auth = sigv::sign(&self.akid, &self.secret, &parts);
        let r = self
            .client
            .request(
                &self.endpoint,
                "POST",
                &parts.path,
                &[
                    ("authorization", &auth),
                    ("x-bh-date", &parts.date),
                    ("x-bh-nonce", &parts.nonce),
                ],
                body.into_bytes(),
            )
            .await?;
        Ok((
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        ))
    }

    async fn ok(&self, action: &str, body: Value) -> Result<Value, CliError> {
        match self.call(action, &body).await? {
            (200, v) => Ok(v),
            (st, v) => {
                eprintln!("{action}: {v}");
                Err(CliError::CallFailed(st))
            }
        }
    }
}

/// Nearest-rank percentile, `permille` of 1000.
fn pct(sorted: &[f64], permille: usize) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    let i = (last * permille + 500) / 1000;
    sorted.get(i.min(last)).copied().unwrap_or(0.0)
}

/// (RunInstances ms, AttachVolume ms, DescribeInstances completed) on a fresh cluster served by
/// `replicas` control-plane processes (more than one needs `database_url`): calls alternate
/// between the replicas, and the concurrent clients are spread over them.
fn measure(
    hosts: usize,
    iterations: usize,
    seconds: u64,
    concurrency: usize,
    database_url: Option<String>,
    replicas: usize,
) -> Result<(Vec<f64>, Vec<f64>, u64), CliError> {
    let bins = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or(CliError::BadArgument("cannot locate binaries"))?;
    let dir = std::env::temp_dir().join(format!(
        "bulkhead-bench-{}-{}-{replicas}",
        std::process::id(),
        database_url.is_some()
    ));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    if let Some(url) = &database_url {
        // Each measured cluster starts on an empty schema (the same database serves every run).
        bulkhead_control::pg::drop_schema(url)
            .map_err(|_| CliError::BadArgument("cannot reset the PostgreSQL schema"))?;
    }
    let opts = cluster::StartOptions {
        hosts,
        controller_args: controller_backend_args(&bins, Some("detached")),
        bins: bins.clone(),
        record: false,
        attest: None,
        netns: None,
        poll_interval_ms: 1000,
        database_url,
    };
    let more = cluster::ReplicaOptions {
        replicas,
        ..Default::default()
    };
    let c = cluster::start_replicated(&dir, &opts, &more)?;
    let creds = dir.join("bench.json");
    let made = std::process::Command::new(bins.join("bulkhead-control"))
        .arg("create-customer")
        .arg("--config")
        .arg(dir.join("control.toml"))
        .args(["--tenant", "bench", "--out"])
        .arg(&creds)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(io(&creds))?;
    if !made.success() {
        return Err(CliError::BadArgument("create-customer failed"));
    }
    let v: Value =
        serde_json::from_slice(&std::fs::read(&creds).map_err(io(&creds))?).unwrap_or(Value::Null);
    let endpoints = if c.replica_addrs.is_empty() {
        vec![c.control_addr.clone()]
    } else {
        c.replica_addrs.clone()
    };
    let mut signers = Vec::new();
    for endpoint in endpoints {
        signers.push(Arc::new(Signer {
            akid: v["access_key_id"].as_str().unwrap_or("").to_string(),
            secret: v["secret"]
                .as_str()
                .and_then(|s| B64.decode(s).ok())
                .unwrap_or_default(),
            endpoint,
            client: tls::HttpsClient::pinned(
                &dir.join("ca/ca.pem"),
                None,
                ServerIdentity::control_plane(),
            )?,
        }));
    }
    let n = signers.len();
    let pick = |i: usize| signers.get(i % n).cloned();
    let result = runtime()?.block_on(async {
        let mut run_ms = Vec::new();
        let mut attach_ms = Vec::new();
        for i in 0..iterations {
            // Each instance's calls go to one replica, the next instance's to the next.
            let Some(signer) = pick(i) else { break };
            let t = std::time::Instant::now();
            let r = signer
                .ok("RunInstances", json!({"ImageId": "test-guest"}))
                .await?;
            run_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let id = r["Instances"][0]["InstanceId"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let vol = signer.ok("CreateVolume", json!({"SizeGiB": 1})).await?;
            let vid = vol["VolumeId"].as_str().unwrap_or("").to_string();
            let t = std::time::Instant::now();
            signer
                .ok("AttachVolume", json!({"VolumeId": vid, "InstanceId": id}))
                .await?;
            attach_ms.push(t.elapsed().as_secs_f64() * 1e3);
            signer
                .ok("TerminateInstances", json!({"InstanceIds": [id]}))
                .await?;
            signer.ok("DeleteVolume", json!({"VolumeId": vid})).await?;
        }
        // Throughput: concurrent signed DescribeInstances for `seconds`.
        let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for j in 0..concurrency.max(1) {
            let Some(s) = pick(j) else { break };
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while std::time::Instant::now() < deadline {
                    if matches!(s.call("DescribeInstances", &json!({})).await, Ok((200, _))) {
                        n += 1;
                    }
                }
                n
            }));
        }
        let mut total = 0u64;
        for t in tasks {
            total += t.await.unwrap_or(0);
        }
        Ok::<_, CliError>((run_ms, attach_ms, total))
    });
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
    let (mut run_ms, mut attach_ms, total) = result?;
    run_ms.sort_by(f64::total_cmp);
    attach_ms.sort_by(f64::total_cmp);
    Ok((run_ms, attach_ms, total))
}

fn bench(
    hosts: usize,
    iterations: usize,
    seconds: u64,
    concurrency: usize,
    database_url: Option<String>,
) -> Result<(), CliError> {
    let mut rows = vec![(
        "SQLite (WAL, synchronous=FULL)",
        measure(hosts, iterations, seconds, concurrency, None, 1)?,
    )];
    if let Some(url) = database_url {
        rows.push((
            "PostgreSQL 15 (local, loopback), one replica",
            measure(
                hosts,
                iterations,
                seconds,
                concurrency,
                Some(url.clone()),
                1,
            )?,
        ));
        rows.push((
            "PostgreSQL 15, two replicas (calls alternate)",
            measure(hosts, iterations, seconds, concurrency, Some(url), 2)?,
        ));
    }
    let bins = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let attested = if cluster::can_attest(&bins) {
        "each host attested by its own swtpm (every AttachVolume: KMS nonce → TPM quote → KMS \
         verification; placement re-attests a host every 60 s)"
    } else {
        "hosts NOT attested (no swtpm)"
    };
    let net = if bulkhead_devcluster::netns::available() {
        "each host in its own network namespace"
    } else {
        "hosts on loopback ports"
    };
    println!("## Control plane");
    println!();
    println!(
        "Local cluster: {hosts} host controllers (detached backend: controllers record state, no guest \
         boots, no card starts), KMS, token service and control plane as separate processes, mTLS 1.3 \
         on every link, every call audited with fsync; {attested}; {net}. {iterations} iterations per \
         store; throughput = signed DescribeInstances from {concurrency} concurrent clients for \
         {seconds} s. Each latency is one signed customer call end to end. With two replicas \
         (one PostgreSQL), each instance's calls go to one replica and the next instance's to the \
         other, and the concurrent clients are split between them; every run starts on an empty \
         schema."
    );
    println!();
    println!("| Store | RunInstances→running p50 | p99 | AttachVolume→attached p50 | p99 | API throughput |");
    println!("|---|---|---|---|---|---|");
    for (name, (run_ms, attach_ms, total)) in &rows {
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} req/s |",
            pct(run_ms, 500),
            pct(run_ms, 990),
            pct(attach_ms, 500),
            pct(attach_ms, 990),
            *total as f64 / seconds.max(1) as f64
        );
    }
    if rows.len() == 1 {
        println!();
        println!("PostgreSQL: not measured in this run (run under scripts/with-postgres.sh).");
    }
    Ok(())
}

fn main() -> ExitCode {
    bulkhead_daemon::init_logging("BULKHEAD_LOG", "info");
    let r = match Cli::parse().cmd {
        Cmd::Deploy {
            dir,
            release,
            artefacts,
            caller,
        } => {
            let r = deploy::run(&dir, &release, &artefacts, &caller).map(|report| {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            });
            return bulkhead_daemon::exit("bulkhead-devcluster deploy", r);
        }
        Cmd::Up {
            dir,
            hosts,
            record,
            controller_backend,
            bins,
            host_cores,
            sealed_hosts,
            host_image,
            sealed_boot_image,
            sealed_rogue_tpm,
        } => up(
            &dir,
            hosts,
            record,
            controller_backend,
            bins,
            host_cores,
            SealedArgs {
                on: sealed_hosts,
                image: host_image,
                other: sealed_boot_image,
                rogue_tpm: sealed_rogue_tpm,
            },
        ),
        Cmd::Bench {
            hosts,
            iterations,
            seconds,
            concurrency,
            database_url,
        } => bench(hosts, iterations, seconds, concurrency, database_url),
    };
    bulkhead_daemon::exit("bulkhead-devcluster", r)
}
