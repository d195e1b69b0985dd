//! `bulkhead-devcluster deploy` (what `bulkhead deploy --cluster DIR` becomes): a signed release
//! deployed to the real hosts of a running `bulkhead up` cluster, in waves, by the one wave
//! engine of `bulkhead-rot` ([`bulkhead_rot::deploy::run_waves`]) over [`ControllerHost`], a
//! host reached through its controller over mTLS as the cluster's `deployer`.
//!
//! Per host: its health, then every artefact uploaded (`PUT /v1/host/artefacts/{sha256}`), then
//! `DeployRelease` (`POST /v1/host/releases`: the controller verifies, installs, self-tests and
//! live-updates its hypervisors, and measures the release into its TPM), then its health and
//! instances again, then a fresh attestation over a nonce of this deployer's verifier, which must
//! show the new release applied (`Attested::applied_release`). A failure stops the rollout; the
//! hosts that had moved, or may have (a `DeployRelease` whose answer was lost), are rolled back
//! (see [`ControllerHost::roll_back`] for what a controller offers for that today).
//!
//! Each host's token is minted just before its first call, for that host only, with a lifetime
//! of [`HOST_TOKEN_TTL_SECS`], and minted again before any call it might not outlive: no token
//! exists before its host's turn, and a long rollout never runs on an expiring one. Every step is audited by the controllers themselves, and the deploy's
//! own steps in `DIR/deploy/audit.log` (hash-chained).

use std::path::{Path, PathBuf};

use bulkhead_audit::{AuditLog, Decision, EntryKind};
use bulkhead_rot::attest::{Enrollment, Evidence, Verifier};
use bulkhead_rot::deploy::{run_waves, DeployAudit, DeployError, HostFailure, Moved, WaveHost};
use bulkhead_rot::measure::Environment;
use bulkhead_rot::release::{verify_release, Manifest, ReleasePolicy, SignedRelease, TrustRoot};
use bulkhead_rot::tpm::MeasurePcr;
use bulkhead_tokens::pki::{CaDir, ServerIdentity};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::tls;

/// Operations the deployer's token carries (its policy group, `deployers`).
const DEPLOY_OPERATIONS: &[&str] = &[
    "UploadArtefact",
    "DeployRelease",
    "DescribeHost",
    "GetHealth",
    "AttestHost",
];

/// Lifetime asked for each host's token: one host's update (uploads, DeployRelease, checks).
pub const HOST_TOKEN_TTL_SECS: u64 = 300;

/// A token with less than this left is minted again before a call: longer than the client's
/// whole-request timeout (75 s), so the token is valid when the controller checks it.
pub const TOKEN_RENEW_MARGIN_SECS: u64 = 120;

/// Why a real-host deploy did not run or did not pass.
#[derive(Debug, thiserror::Error)]
pub enum RealDeployError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0} is not what `bulkhead up` writes: {1}")]
    Cluster(PathBuf, &'static str),
    #[error("root of trust: {0}")]
    Rot(#[from] bulkhead_rot::RotError),
    #[error("release: {0}")]
    Release(#[from] bulkhead_rot::release::ReleaseError),
    #[error("pki: {0}")]
    Pki(#[from] bulkhead_tokens::pki::PkiError),
    #[error("tls: {0}")]
    Tls(String),
    #[error("audit log: {0}")]
    Audit(String),
    #[error("deploy: {0}")]
    Deploy(#[from] DeployError),
}

fn read(p: &Path) -> Result<Vec<u8>, RealDeployError> {
    std::fs::read(p).map_err(|e| RealDeployError::Io(p.to_path_buf(), e))
}

/// What every host update needs: the runtime the HTTPS client runs on, the release, its files,
/// and the verifier of the hosts' new measurements.
pub struct RealContext {
    rt: tokio::runtime::Runtime,
    release: String,
    manifest: Manifest,
    /// (SHA-256 hex, bytes) of every artefact, in manifest order.
    artefacts: Vec<(String, Vec<u8>)>,
    verifier: Verifier,
    minter: Box<dyn MintToken>,
}

/// Where the deployer's tokens come from: the token service ([`TokenService`]).
pub trait MintToken {
    /// A token for `host` alone, with the deployer's operations, valid for `ttl_secs`: (token,
    /// its expiry in Unix seconds). `Err` carries the code.
    fn mint(
        &self,
        rt: &tokio::runtime::Runtime,
        host: &str,
        ttl_secs: u64,
    ) -> Result<(String, u64), String>;
}

/// The cluster's token service, asked as the deployer's certificate.
pub struct TokenService {
    client: tls::HttpsClient,
    addr: String,
}

impl MintToken for TokenService {
    fn mint(
        &self,
        rt: &tokio::runtime::Runtime,
        host: &str,
        ttl_secs: u64,
    ) -> Result<(String, u64), String> {
        let body = json!({
            "hosts": [host],
            "operations": DEPLOY_OPERATIONS,
            "resources": ["host"],
            "ttl_secs": ttl_secs,
        })
        .to_string();
        let r = rt
            .block_on(self.client.request(
                &self.addr,
                "POST",
                "/v1/Mint",
                &[("content-type", "application/json")],
                body.into_bytes(),
            ))
            .map_err(|e| {
                tracing::warn!(host, error = %e, "token service unreachable");
                "token_service_unreachable".to_string()
            })?;
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        match (r.status, v["token"].as_str()) {
            (200, Some(t)) => {
                let expires = v["expires"]
                    .as_u64()
                    .unwrap_or_else(|| bulkhead_rot::unix_now().saturating_add(ttl_secs));
                Ok((t.to_string(), expires))
            }
            (st, _) => Err(format!("token_refused: {}", refusal_code(st, &v))),
        }
    }
}

/// One host of the cluster, reached through its controller.
pub struct ControllerHost {
    name: String,
    addr: String,
    client: tls::HttpsClient,
    /// This host's token and its expiry (Unix seconds); none before the host's turn.
    token: Option<(String, u64)>,
}

/// Why a call to a controller has no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NoAnswer {
    /// The request never reached the controller (no token, no connection, no handshake).
    NotSent(String),
    /// It may have reached it and run: the answer was lost.
    Lost(String),
}

impl NoAnswer {
    fn code(self) -> String {
        match self {
            NoAnswer::NotSent(c) | NoAnswer::Lost(c) => c,
        }
    }
}

/// An answer's refusal code (`{"error":{"code":..}}`), or the status.
fn refusal_code(status: u16, v: &Value) -> String {
    v["error"]["code"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("http_{status}"))
}

impl ControllerHost {
    /// A host the deploy reaches at `addr` with `client` (pinned to the host's name).
    pub fn new(name: String, addr: String, client: tls::HttpsClient) -> ControllerHost {
        ControllerHost {
            name,
            addr,
            client,
            token: None,
        }
    }

    /// This host's token, minted now if it has none or one with less than
    /// [`TOKEN_RENEW_MARGIN_SECS`] left.
    fn token(&mut self, cx: &RealContext) -> Result<String, String> {
        let now = bulkhead_rot::unix_now();
        if let Some((t, expires)) = &self.token {
            if *expires > now.saturating_add(TOKEN_RENEW_MARGIN_SECS) {
                return Ok(t.clone());
            }
        }
        let (t, expires) = cx.minter.mint(&cx.rt, &self.name, HOST_TOKEN_TTL_SECS)?;
        tracing::info!(host = %self.name, expires, "deploy token minted");
        self.token = Some((t.clone(), expires));
        Ok(t)
    }

    fn call(
        &mut self,
        cx: &RealContext,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Value), NoAnswer> {
        let auth = format!("Bearer {}", self.token(cx).map_err(NoAnswer::NotSent)?);
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", content_type),
        ];
        let r = cx
            .rt
            .block_on(
                self.client
                    .request(&self.addr, method, path, &headers, body),
            )
            .map_err(|e| {
                tracing::warn!(host = %self.name, error = %e, path, "controller unreachable");
                match e {
                    tls::TlsError::Connect(..) | tls::TlsError::Handshake(..) => {
                        NoAnswer::NotSent("host_unreachable".into())
                    }
                    _ => NoAnswer::Lost("host_answer_lost".into()),
                }
            })?;
        Ok((
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        ))
    }

    fn get(&mut self, cx: &RealContext, path: &str) -> Result<Value, String> {
        match self
            .call(cx, "GET", path, "application/json", Vec::new())
            .map_err(NoAnswer::code)?
        {
            (200, v) => Ok(v),
            (st, v) => Err(refusal_code(st, &v)),
        }
    }

    /// Healthy (audit writable), and the instances it runs.
    fn health(&mut self, cx: &RealContext) -> Result<u64, String> {
        let h = self.get(cx, "/v1/health")?;
        if h["audit_writable"] != true {
            return Err("health_audit_not_writable".into());
        }
        let d = self.get(cx, "/v1/host")?;
        d["instances"]
            .as_u64()
            .ok_or_else(|| "health_bad_description".into())
    }

    /// A fresh quote over this deployer's nonce, verified: the version it shows applied.
    fn attest(&mut self, cx: &mut RealContext) -> Result<Option<u64>, String> {
        let nonce = cx
            .verifier
            .challenge(&self.name)
            .map_err(|_| "attest_challenge_failed".to_string())?;
        let body = json!({ "nonce": hex::encode(nonce) }).to_string();
        let (st, v) = self
            .call(
                cx,
                "POST",
                "/v1/host/attest",
                "application/json",
                body.into_bytes(),
            )
            .map_err(NoAnswer::code)?;
        if st != 200 {
            return Err(refusal_code(st, &v));
        }
        let ev: Evidence =
            serde_json::from_value(v).map_err(|_| "attest_bad_evidence".to_string())?;
        if ev.host != self.name {
            return Err("attest_wrong_host".into());
        }
        let ok = cx.verifier.verify(&ev).map_err(|e| e.code().to_string())?;
        Ok(ok.applied_release)
    }
}

impl WaveHost<RealContext> for ControllerHost {
    fn name(&self) -> &str {
        &self.name
    }

    fn update(&mut self, cx: &mut RealContext) -> Result<(), HostFailure> {
        let (before, after) = (HostFailure::before, HostFailure::after);
        let running = self
            .health(cx)
            .map_err(|c| before(format!("unhealthy_before_update: {c}")))?;
        for (sha, bytes) in &cx.artefacts {
            let path = format!("/v1/host/artefacts/{sha}");
            match self
                .call(cx, "PUT", &path, "application/octet-stream", bytes.clone())
                .map_err(|e| before(e.code()))?
            {
                (200, _) => {}
                (st, v) => return Err(before(refusal_code(st, &v))),
            }
        }
        let body = json!({ "release": cx.release }).to_string();
        match self
            .call(
                cx,
                "POST",
                "/v1/host/releases",
                "application/json",
                body.into_bytes(),
            )
            .map_err(|e| match e {
                NoAnswer::NotSent(code) => before(code),
                // The controller may have run it (moved its hypervisors) before the answer was
                // lost: unknown, so rolled back like a moved host.
                NoAnswer::Lost(code) => HostFailure {
                    code: format!("deploy_release_{code}"),
                    moved: Moved::Unknown,
                },
            })? {
            (200, v) => {
                tracing::info!(host = %self.name, moved = v["moved"].as_array().map_or(0, Vec::len), "release deployed on the host");
            }
            // The controller moved nothing back or forth that it did not move back itself.
            (st, v) => return Err(before(refusal_code(st, &v))),
        }
        let now = self.health(cx).map_err(after)?;
        if now < running {
            return Err(after(format!("instances_lost: {running} -> {now}")));
        }
        match self.attest(cx).map_err(after)? {
            Some(v) if v == cx.manifest.version => Ok(()),
            _ => Err(after("attest_wrong_release".into())),
        }
    }

    /// A controller offers no typed roll-back of an applied release yet (its floor is the active
    /// release, so the previous release is a downgrade it refuses): the host is reported, as an
    /// alert, and stays on the new release with its guests running.
    fn roll_back(&mut self, _cx: &mut RealContext) -> Result<(), String> {
        Err("rollback_unsupported_by_controller".into())
    }

    /// The controller committed the release as its floor when it activated it.
    fn commit(&mut self, _cx: &mut RealContext) -> Result<(), String> {
        Ok(())
    }
}

/// What a deploy did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RealDeployReport {
    pub deploy_id: String,
    pub version: u64,
    pub waves: Vec<Vec<String>>,
    pub elapsed_ms: u128,
}

/// Deploys `release` (its files in `artefacts`) to every host of the cluster in `dir` as
/// `caller` (a `deployer` certificate of the cluster's CA).
pub fn run(
    dir: &Path,
    release: &Path,
    artefacts: &Path,
    caller: &str,
) -> Result<RealDeployReport, RealDeployError> {
    let started = std::time::Instant::now();
    let info_path = dir.join("cluster.json");
    let info: Value = serde_json::from_slice(&read(&info_path)?)
        .map_err(|_| RealDeployError::Cluster(info_path.clone(), "not JSON"))?;
    let bad = |what| RealDeployError::Cluster(info_path.clone(), what);
    let hosts: Vec<(String, String)> = info["hosts"]
        .as_array()
        .ok_or_else(|| bad("no hosts"))?
        .iter()
        .map(|h| {
            Some((
                h["host_id"].as_str()?.to_string(),
                h["addr"].as_str()?.to_string(),
            ))
        })
        .collect::<Option<_>>()
        .ok_or_else(|| bad("a host without host_id or addr"))?;
    let token_addr = info["tokens"]
        .as_str()
        .ok_or_else(|| bad("no token service"))?;

    // The release, checked as every host will check it.
    let env = Environment::parse(crate::cluster::DEV_ENVIRONMENT)?;
    let root = TrustRoot::parse(&read(&dir.join("release/trust-root.json"))?)?;
    let signed = SignedRelease::parse(&read(release)?)?;
    let policy = |floor| ReleasePolicy {
        root: &root,
        environment: &env,
        current_version: floor,
        now: bulkhead_rot::unix_now(),
    };
    let manifest = verify_release(&signed, &policy(0)).map_err(bulkhead_rot::RotError::from)?;
    manifest
        .check_artefacts(artefacts)
        .map_err(bulkhead_rot::RotError::from)?;
    let mut files = Vec::new();
    for a in &manifest.artefacts {
        let bytes = read(&artefacts.join(&a.name))?;
        files.push((hex::encode(Sha256::digest(&bytes)), bytes));
    }

    // This deployer's verifier: the hosts' enrolments, their boot release, the new release.
    let mut verifier = Verifier::new(env.clone(), MeasurePcr::DEV);
    let boot = SignedRelease::parse(&read(&dir.join("release/v1.json"))?)?;
    let boot = verify_release(&boot, &policy(0)).map_err(bulkhead_rot::RotError::from)?;
    verifier.accept_release(&boot);
    for (h, _) in &hosts {
        let p = dir.join(format!("kms/attest/{h}.json"));
        let e: Enrollment = serde_json::from_slice(&read(&p)?)
            .map_err(|_| RealDeployError::Cluster(p.clone(), "not an enrolment"))?;
        verifier.enroll(e);
    }
    verifier.accept_release(&manifest);

    let ca = dir.join("ca");
    let (identity, _) = CaDir::new(&ca).identity(caller)?;
    let (cert, key) = (
        ca.join(format!("{caller}.pem")),
        ca.join(format!("{caller}.key")),
    );
    let client = |expect| {
        tls::HttpsClient::pinned(&ca.join("ca.pem"), Some((&cert, &key)), expect)
            .map_err(|e| RealDeployError::Tls(e.to_string()))
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RealDeployError::Io(PathBuf::from("tokio runtime"), e))?;

    // The hosts; each one's token is minted at its turn (`ControllerHost::token`).
    let minter = TokenService {
        client: client(ServerIdentity::token_service())?,
        addr: token_addr.to_string(),
    };
    let mut targets = Vec::new();
    for (name, addr) in &hosts {
        targets.push(ControllerHost::new(
            name.clone(),
            addr.clone(),
            client(ServerIdentity::host(name))?,
        ));
    }

    let audit_dir = dir.join("deploy");
    std::fs::create_dir_all(&audit_dir).map_err(|e| RealDeployError::Io(audit_dir.clone(), e))?;
    let (log, _) = AuditLog::open(&audit_dir.join("audit.log"))
        .map_err(|e| RealDeployError::Audit(e.to_string()))?;
    let audit = DeployAudit::new(&log, &identity, &signed.manifest)?;
    let all: Vec<String> = hosts.iter().map(|(h, _)| format!("host:{h}")).collect();
    audit.write(EntryKind::Request, "Deploy", all, Decision::Allow, "ok")?;
    let span = tracing::info_span!("deploy", id = %audit.id(), version = manifest.version);
    let _g = span.enter();
    let mut cx = RealContext {
        rt,
        release: signed.to_json()?,
        manifest,
        artefacts: files,
        verifier,
        minter: Box::new(minter),
    };
    let waves = run_waves(&mut targets, &mut cx, &audit)?;
    Ok(RealDeployReport {
        deploy_id: audit.id().to_string(),
        version: cx.manifest.version,
        waves,
        elapsed_ms: started.elapsed().as_millis(),
    })
}

#[cfg(test)]
#[path = "deploy_tests.rs"]
mod tests;
