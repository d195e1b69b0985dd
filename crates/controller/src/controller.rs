//! Request pipeline: parse → authorize twice (token, then this host's own policy) → quota →
//! audit (durable) → act → audit outcome → monitor. Every refusal is audited too.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Extension, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_audit::{AuditEntry, AuditLog, Decision, EntryKind};
use bulkhead_tokens::clock::unix_now;
use bulkhead_tokens::quota::QuotaBook;
use bulkhead_tokens::token::{RequestContext, TokenCache};
use bulkhead_tokens::{Identity, Operation, Policy, RevocationList, TokenError, Verifier};
use http_body_util::BodyExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::api::{self, ApiRequest, RequestError, MAX_BODY_BYTES};
use crate::backend::{BackendError, InstanceBackend, InstanceSpec, VolumeBackend};
use crate::metrics::{Metrics, Sampled};
use crate::monitor::Monitor;

mod net_deploy;
mod restart;
pub use restart::ANSWER_GRACE;

/// Everything the request pipeline needs.
pub struct Controller {
    pub host_id: String,
    pub verifier: Verifier,
    tokens: TokenCache,
    pub policy: Policy,
    pub revocations_path: PathBuf,
    revocations: Mutex<(Option<SystemTime>, RevocationList)>,
    quotas: Mutex<QuotaBook>,
    pub audit: AuditLog,
    pub instances: Arc<dyn InstanceBackend>,
    pub volumes: Arc<dyn VolumeBackend>,
    pub metrics: Metrics,
    monitor: Mutex<Monitor>,
    outbound_seen: Mutex<u64>,
    attest: Arc<crate::attest::AgentLink>,
    /// Where releases are verified against and installed (`None`: DeployRelease answers
    /// `deploy_unavailable`).
    releases: Option<Arc<crate::deploy::ReleaseStore>>,
    /// One deploy at a time.
    deploying: tokio::sync::Mutex<()>,
    /// Where a deploy queues "exit for the supervisor" for a release carrying a controller
    /// (`None`: not started `--supervised`; a release's controller is installed and recorded,
    /// not applied, and the step is audited `controller_restart_unsupervised`).
    restart: Option<tokio::sync::mpsc::UnboundedSender<u64>>,
    /// The release whose controller binary this process runs (`None`: the original binary its
    /// supervisor names).
    controller_release: Option<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Why a request was refused after parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("this host's policy does not grant the operation to this caller")]
    PolicyDenied,
    #[error("quota exceeded: at most {max} per {per_secs}s")]
    Quota { max: u32, per_secs: u64 },
    #[error("audit log unavailable; refusing to act")]
    AuditUnavailable,
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Attest(#[from] crate::attest::AttestError),
    #[error(transparent)]
    Deploy(#[from] crate::deploy::DeployError),
    #[error("internal error")]
    Internal,
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Request(e) => e.code(),
            Refusal::Token(e) => e.code(),
            Refusal::PolicyDenied => "policy_denied",
            Refusal::Quota { .. } => "quota_exceeded",
            Refusal::AuditUnavailable => "audit_unavailable",
            Refusal::Backend(e) => e.code(),
            Refusal::Attest(e) => e.code(),
            Refusal::Deploy(e) => e.code(),
            Refusal::Internal => "internal_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        let s = match self {
            Refusal::Request(e) => e.status(),
            Refusal::Token(
                TokenError::Missing
                | TokenError::TooLarge
                | TokenError::Invalid
                | TokenError::Revoked
                | TokenError::Expired
                | TokenError::NotYetValid,
            ) => 401,
            Refusal::Token(_) | Refusal::PolicyDenied => 403,
            Refusal::Quota { .. } => 429,
            Refusal::AuditUnavailable => 503,
            Refusal::Backend(e) => e.status(),
            Refusal::Attest(e) => e.status(),
            Refusal::Deploy(e) => e.status(),
            Refusal::Internal => 500,
        };
        StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

fn error_response(request_id: &str, r: &Refusal) -> Response {
    let body = api::ErrorBody {
        error: api::ErrorDetail {
            code: r.code().to_string(),
            message: r.to_string(),
            request_id: request_id.to_string(),
        },
    };
    with_request_id(request_id, (r.status(), axum::Json(body)).into_response())
}

fn with_request_id(request_id: &str, mut resp: Response) -> Response {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

fn json_ok<T: Serialize>(request_id: &str, status: StatusCode, v: &T) -> Response {
    with_request_id(request_id, (status, axum::Json(v)).into_response())
}

/// A printable, bounded description of a request that matched no route.
fn route_label(method: &str, path: &str) -> String {
    let p: String = path
        .chars()
        .take(120)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    format!("{method} {p}")
}

fn bearer(req: &Request) -> Result<String, TokenError> {
    let v = match req.headers().get(header::AUTHORIZATION) {
        None => return Err(TokenError::Missing),
        Some(v) => v,
    };
    let s = v.to_str().map_err(|_| TokenError::Invalid)?;
    let t = s.strip_prefix("Bearer ").ok_or(TokenError::Invalid)?.trim();
    if t.len() > bulkhead_tokens::token::MAX_TOKEN_LEN {
        return Err(TokenError::TooLarge);
    }
    if t.is_empty()
        || !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=+/".contains(&b))
    {
        return Err(TokenError::Invalid);
    }
    Ok(t.to_string())
}

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        host_id: String,
        verifier: Verifier,
        policy: Policy,
        revocations_path: PathBuf,
        audit: AuditLog,
        instances: Arc<dyn InstanceBackend>,
        volumes: Arc<dyn VolumeBackend>,
    ) -> Self {
        let c = Controller {
            host_id,
            verifier,
            tokens: TokenCache::default(),
            policy,
            revocations_path,
            revocations: Mutex::new((None, RevocationList::default())),
            quotas: Mutex::new(QuotaBook::default()),
            audit,
            instances,
            volumes,
            metrics: Metrics::default(),
            monitor: Mutex::new(Monitor::default()),
            outbound_seen: Mutex::new(0),
            attest: Arc::new(crate::attest::AgentLink::none()),
            releases: None,
            deploying: tokio::sync::Mutex::new(()),
            restart: None,
            controller_release: None,
        };
        c.rebuild_quotas();
        c
    }

    /// Relays `POST /v1/host/attest` to this attestation agent.
    pub fn with_attestation(mut self, link: crate::attest::AgentLink) -> Self {
        self.attest = Arc::new(link);
        self
    }

    /// Takes releases (DeployRelease) verified against and installed into `store`.
    pub fn with_releases(mut self, store: crate::deploy::ReleaseStore) -> Self {
        self.releases = Some(Arc::new(store));
        self
    }

    /// Re-counts allowed calls from the audit log so a restart does not reset quotas.
    fn rebuild_quotas(&self) {
        let Ok(lines) = bulkhead_audit::read_after(self.audit.path(), 0, usize::MAX) else {
            return;
        };
        let mut book = lock(&self.quotas);
        let horizon = unix_now().saturating_sub(24 * 3600);
        for l in lines {
            let Ok(rec) = serde_json::from_str::<bulkhead_audit::AuditRecord>(&l) else {
                continue;
            };
            let at = rec.time_ms / 1000;
            if rec.entry.kind != EntryKind::Request
                || rec.entry.decision != Decision::Allow
                || at < horizon
            {
                continue;
            }
            if let Some(op) = Operation::from_name(&rec.entry.op) {
                if self.policy.quota_for(&rec.entry.caller, op).is_some() {
                    book.record(&rec.entry.caller, op, at);
                }
            }
        }
    }

    fn revocations(&self) -> RevocationList {
        let mtime = std::fs::metadata(&self.revocations_path)
            .and_then(|m| m.modified())
            .ok();
        let mut g = lock(&self.revocations);
        if g.0 != mtime || mtime.is_none() {
            match std::fs::read_to_string(&self.revocations_path) {
                Ok(text) => {
                    let (list, bad) = RevocationList::parse(&text);
                    if bad > 0 {
                        tracing::warn!(bad, "ignored malformed revocation lines");
                    }
                    *g = (mtime, list);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "revocation list unreadable; keeping the last one")
                }
            }
        }
        g.1.clone()
    }

    /// This host's own check: does its policy grant `op` on `resources` to this caller?
    fn policy_allows(&self, peer: &Identity, op: Operation, resources: &[String]) -> bool {
        self.policy.groups_of(&peer.name).any(|g| {
            g.role == peer.role
                && g.allows_host(&self.host_id)
                && g.operations.contains(&op)
                && resources.iter().all(|r| g.covers_resource(r))
        })
    }

    fn charge_quota(&self, caller: &str, op: Operation) -> Result<(), Refusal> {
        let Some(q) = self.policy.quota_for(caller, op) else {
            return Ok(());
        };
        lock(&self.quotas)
            .charge(caller, op, q, unix_now())
            .map_err(|e| Refusal::Quota {
                max: e.max,
                per_secs: e.per_secs,
            })
    }

    /// Feeds the monitor and audits any alerts it raised.
    fn observe(&self, caller: &str, op: &str, code: &str) {
        let alerts = lock(&self.monitor).observe(caller, op, code, unix_now());
        self.audit_alerts(alerts);
    }

    fn audit_alerts(&self, alerts: Vec<api::Alert>) {
        for a in alerts {
            tracing::warn!(rule = %a.rule, subject = %a.subject, detail = %a.detail, "alert");
            self.audit.append_queued(AuditEntry {
                kind: EntryKind::Alert,
                request_id: format!("alert-{}", a.id),
                caller: a.subject.clone(),
                cert_sha256: None,
                token_id: None,
                op: a.rule.clone(),
                resources: vec![],
                params_sha256: None,
                decision: Decision::None,
                code: a.detail.clone(),
            });
        }
    }

    /// Raises alerts for damage the audit log found when it was opened (already recorded in the
    /// log itself by `bulkhead_audit`).
    pub fn audit_damage_found(&self, what: &[String]) {
        if what.is_empty() {
            return;
        }
        let alerts = lock(&self.monitor).audit_damaged(what, unix_now());
        self.audit_alerts(alerts);
    }

    /// Turns hypervisors and cards their sandbox killed into alerts. Called periodically (it
    /// asks the launcher, so off the async workers).
    pub fn poll_children(&self) {
        for r in self.instances.restart_dead_net_cards() {
            let (code, new_pid) = match r.outcome {
                Ok(pid) => ("ok", Some(pid)),
                Err(code) => (code, None),
            };
            tracing::warn!(instance = %r.instance, old_pid = r.old_pid, ?new_pid, code, "net card died; restart audited");
            self.audit.append_queued(AuditEntry {
                kind: EntryKind::Lifecycle,
                request_id: new_request_id(),
                caller: "controller".into(),
                cert_sha256: None,
                token_id: None,
                op: "RestartNetCard".into(),
                resources: vec![format!("instance:{}", r.instance)],
                params_sha256: None,
                decision: Decision::None,
                code: code.into(),
            });
        }
        let kills = self.instances.sandbox_kills();
        if kills.is_empty() {
            return;
        }
        let alerts = lock(&self.monitor).sandbox_killed(&kills, unix_now());
        self.audit_alerts(alerts);
    }

    /// Turns newly blocked outbound attempts into alerts. Called periodically.
    pub fn poll_sandbox(&self) {
        let now_blocked = crate::sandbox::blocked_attempts();
        let new = {
            let mut seen = lock(&self.outbound_seen);
            let new = now_blocked.saturating_sub(*seen);
            *seen = now_blocked;
            new
        };
        let alerts = lock(&self.monitor).outbound_blocked(new, unix_now());
        self.audit_alerts(alerts);
    }

    /// Audits a connection or request refused before the audited pipeline (by the TLS server
    /// loop: handshakes, connection caps, malformed HTTP). Queued: a refusal acts on nothing.
    pub fn audit_refusal(&self, r: &bulkhead_mtls::Refusal) {
        self.audit.append_queued(r.audit_entry(new_request_id()));
        let op = r.stage.op();
        self.metrics.count(op, r.code);
        let caller = r.identity.as_ref().map_or("-", |i| i.name.as_str());
        self.observe(caller, op, r.code);
    }

    /// Audits how many refusals of one code were counted but not written one by one.
    pub fn audit_refusal_summary(&self, s: &bulkhead_mtls::Summary) {
        self.audit.append_queued(s.audit_entry(new_request_id()));
        self.metrics.count_n(s.stage.op(), s.code, s.suppressed);
    }

    /// Records a lifecycle event about `resources` with its outcome `code`, durably.
    pub async fn audit_lifecycle_about(
        &self,
        what: &str,
        resources: Vec<String>,
        code: &str,
    ) -> Result<u64, bulkhead_audit::AuditError> {
        self.audit
            .append(AuditEntry {
                kind: EntryKind::Lifecycle,
                request_id: new_request_id(),
                caller: "controller".into(),
                cert_sha256: None,
                token_id: None,
                op: what.into(),
                resources,
                params_sha256: None,
                decision: Decision::None,
                code: code.into(),
            })
            .await
    }

    /// Records a lifecycle event (start-up).
    pub async fn audit_lifecycle(&self, what: &str) -> Result<u64, bulkhead_audit::AuditError> {
        self.audit
            .append(AuditEntry {
                kind: EntryKind::Lifecycle,
                request_id: new_request_id(),
                caller: "controller".into(),
                cert_sha256: None,
                token_id: None,
                op: what.into(),
                resources: vec![],
                params_sha256: None,
                decision: Decision::None,
                code: "ok".into(),
            })
            .await
    }

    /// The whole pipeline for one request.
    pub async fn handle(&self, peer: &Identity, req: Request) -> Response {
        let request_id = new_request_id();
        let method = req.method().as_str().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        let token = bearer(&req);
        let limit = api::find_route(&method, &path)
            .map(|(r, _)| api::max_body(r))
            .unwrap_or(MAX_BODY_BYTES);
        let body = http_body_util::Limited::new(req.into_body(), limit)
            .collect()
            .await
            .map(|c| c.to_bytes());
        let mut entry = AuditEntry {
            kind: EntryKind::Request,
            request_id: request_id.clone(),
            caller: peer.name.clone(),
            cert_sha256: Some(peer.cert_sha256.clone()),
            token_id: None,
            op: route_label(&method, &path),
            resources: vec![],
            params_sha256: None,
            decision: Decision::Deny,
            code: String::new(),
        };
        if let Ok((route, _)) = api::find_route(&method, &path) {
            entry.op = route.op.name().to_string();
        }
        let decided = self
            .decide(
                peer,
                &method,
                &path,
                query.as_deref(),
                token,
                body,
                &mut entry,
            )
            .await;
        let (parsed, claims_ok) = match decided {
            Ok(p) => (p, true),
            Err(refusal) => {
                entry.decision = Decision::Deny;
                entry.code = refusal.code().to_string();
                let audited = self.audit.append(entry.clone()).await;
                if let Err(e) = &audited {
                    tracing::error!(error = %e, "audit write failed for a refusal");
                }
                self.metrics.count(&entry.op, refusal.code());
                tracing::info!(request = %request_id, caller = %peer.name, op = %entry.op, code = refusal.code(), "refused");
                self.observe(&peer.name, &entry.op, refusal.code());
                return error_response(&request_id, &refusal);
            }
        };
        debug_assert!(claims_ok);
        // Audit before acting. If the record cannot be made durable, nothing happens.
        entry.decision = Decision::Allow;
        entry.code = "ok".into();
        let op_name = parsed.operation().name();
        // The writer hands the entry back once it is durable: it becomes the outcome record
        // (no copy of the entry per request).
        let mut entry = match self.audit.append_returning(entry).await {
            Ok((_, entry)) => entry,
            Err(e) => {
                tracing::error!(error = %e, "audit write failed; refusing");
                let refusal = Refusal::AuditUnavailable;
                self.metrics.count(op_name, refusal.code());
                return error_response(&request_id, &refusal);
            }
        };
        let result = self.act(&request_id, parsed).await;
        let code = match &result {
            Ok(_) => "ok",
            Err(r) => r.code(),
        };
        entry.kind = EntryKind::Outcome;
        entry.decision = Decision::None;
        entry.code = code.to_string();
        self.audit.append_queued(entry);
        // `entry.op` of an allowed request is its operation's name.
        self.metrics.count(op_name, code);
        self.observe(&peer.name, op_name, code);
        tracing::info!(request = %request_id, caller = %peer.name, op = %op_name, code, "served");
        match result {
            Ok(resp) => resp,
            Err(r) => error_response(&request_id, &r),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn decide(
        &self,
        peer: &Identity,
        method: &str,
        path: &str,
        query: Option<&str>,
        token: Result<String, TokenError>,
        body: Result<bytes::Bytes, Box<dyn std::error::Error + Send + Sync>>,
        entry: &mut AuditEntry,
    ) -> Result<ApiRequest, Refusal> {
        // Route first, so probes of routes that do not exist are reported as such.
        api::find_route(method, path)?;
        let body = body.map_err(|_| RequestError::BodyTooLarge)?;
        let parsed = ApiRequest::parse(method, path, query, &body)?;
        let op = parsed.operation();
        // Claim 2: nothing an operator can read may be a function of customer content that can be
        // tested offline. A customer-plane body (an instance's user data, a sealed key) gets no
        // digest, length or prefix in the record; only operator-plane bodies, the operators' own
        // input, are digested.
        if op.plane() == bulkhead_tokens::Plane::Operator {
            entry.params_sha256 = Some(hex::encode(Sha256::digest(&body)));
        }
        let resources = parsed.resources();
        entry.op = op.name().to_string();
        entry.resources = resources.clone();
        let token = token?;
        let revoked = self.revocations();
        let ctx = RequestContext {
            host: &self.host_id,
            peer,
            operation: op,
            resources: &resources,
            now: unix_now(),
        };
        let vt = self.tokens.get_or_verify(&self.verifier, &token)?;
        entry.token_id = Some(vt.claims.token_id.clone());
        self.verifier.check(&token, &vt, &revoked, &ctx)?;
        // This host's copy of the reviewed policy caps the token's lifetime and admits a
        // fleet-wide (`*`) audience only for a group with the fleet right.
        self.policy.admits_token(peer, &vt.claims)?;
        if !self.policy_allows(peer, op, &resources) {
            return Err(Refusal::PolicyDenied);
        }
        self.charge_quota(&peer.name, op)?;
        Ok(parsed)
    }

    async fn act(&self, request_id: &str, req: ApiRequest) -> Result<Response, Refusal> {
        let ack = |status: &str| {
            json_ok(
                request_id,
                StatusCode::OK,
                &api::Ack {
                    request_id: request_id.to_string(),
                    status: status.to_string(),
                },
            )
        };
        Ok(match req {
            ApiRequest::DescribeHost => {
                let c = self.instances.capacity();
                json_ok(
                    request_id,
                    StatusCode::OK,
                    &api::HostDescription {
                        host_id: self.host_id.clone(),
                        controller_version: env!("CARGO_PKG_VERSION").to_string(),
                        backend: self.instances.kind().to_string(),
                        draining: self.instances.draining(),
                        vcpus_total: c.vcpus_total,
                        vcpus_free: c.vcpus_free,
                        memory_mib_total: c.memory_mib_total,
                        memory_mib_free: c.memory_mib_free,
                        instances: c.instances,
                        audit_head: self.audit.head(),
                    },
                )
            }
            ApiRequest::GetHealth => {
                // Off the runtime: an instance's lock is held through a live or card update.
                let net_cards = self.blocking(|b| Ok(b.net_card_releases())).await?;
                let s = self.audit.stats();
                json_ok(
                    request_id,
                    StatusCode::OK,
                    &api::Health {
                        status: if s.poisoned { "degraded" } else { "ok" }.to_string(),
                        audit_records: s.records,
                        audit_writable: !s.poisoned,
                        audit_head: self.audit.head(),
                        alerts: lock(&self.monitor).counts().iter().map(|(_, n)| n).sum(),
                        release: self.instances.active_release().map(|r| r.version),
                        controller_release: self.controller_release,
                        net_cards,
                    },
                )
            }
            ApiRequest::GetMetrics => {
                let b = Arc::clone(&self.instances);
                let net = tokio::task::spawn_blocking(move || b.net_counters())
                    .await
                    .unwrap_or_default();
                let s = self.audit.stats();
                let text = self.metrics.render(&Sampled {
                    audit_records: s.records,
                    audit_batches: s.batches,
                    audit_failures: s.failures,
                    outbound_blocked: crate::sandbox::blocked_attempts(),
                    alerts: lock(&self.monitor).counts(),
                    instances: self.instances.capacity().instances,
                    net,
                });
                let mut resp = Response::new(Body::from(text));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                with_request_id(request_id, resp)
            }
            ApiRequest::ReadAudit { after, limit } => {
                let path = self.audit.path().to_path_buf();
                let lim = usize::try_from(limit).unwrap_or(100);
                let records = tokio::task::spawn_blocking(move || {
                    bulkhead_audit::read_after(&path, after, lim)
                })
                .await
                .map_err(|_| Refusal::Internal)?
                .map_err(|_| Refusal::Internal)?;
                let n = u64::try_from(records.len()).unwrap_or(0);
                json_ok(
                    request_id,
                    StatusCode::OK,
                    &api::AuditPage {
                        records,
                        next_after: after.saturating_add(n),
                    },
                )
            }
            ApiRequest::ListAlerts => json_ok(
                request_id,
                StatusCode::OK,
                &api::AlertList {
                    alerts: lock(&self.monitor).alerts(),
                },
            ),
            ApiRequest::DrainHost => {
                self.instances.set_draining(true);
                ack("draining")
            }
            ApiRequest::UploadArtefact { sha256, bytes } => {
                let store = self
                    .releases
                    .clone()
                    .ok_or(crate::deploy::DeployError::Unavailable)?;
                let size =
                    tokio::task::spawn_blocking(move || store.store_artefact(&sha256, &bytes))
                        .await
                        .map_err(|_| Refusal::Internal)??;
                json_ok(
                    request_id,
                    StatusCode::OK,
                    &api::ArtefactStored {
                        sha256: hex::encode(sha256),
                        size,
                    },
                )
            }
            ApiRequest::DeployRelease { release } => {
                let d = self.deploy_release(request_id, release).await?;
                json_ok(request_id, StatusCode::OK, &d)
            }
            ApiRequest::AttestHost {
                nonce,
                instance,
                credential,
            } => {
                // A quote bound to an instance says this host runs it: only if the backend does.
                if let Some(id) = instance.clone() {
                    let d = self.blocking(move |b| b.describe(&id)).await?;
                    if d.state == api::InstanceState::Terminated {
                        return Err(BackendError::NoSuchInstance.into());
                    }
                }
                let link = Arc::clone(&self.attest);
                let instance = instance.map(|i| i.as_str().to_string());
                let call = bulkhead_rot_proto::AgentCall {
                    nonce,
                    instance,
                    credential,
                    release_applied: None,
                };
                let evidence = tokio::task::spawn_blocking(move || link.call(&call))
                    .await
                    .map_err(|_| Refusal::Internal)??;
                json_ok(request_id, StatusCode::OK, &api::RelayedEvidence(evidence))
            }
            ApiRequest::CreateInstance {
                id,
                image,
                vcpus,
                memory_mib,
                user_data,
                network,
                instance_storage,
            } => {
                let spec = InstanceSpec {
                    id,
                    image,
                    vcpus,
                    memory_mib,
                    user_data,
                    network,
                    instance_storage,
                };
                let d = self.blocking(move |b| b.create(&spec)).await?;
                json_ok(request_id, StatusCode::CREATED, &d)
            }
            ApiRequest::DescribeInstance(id) => {
                let d = self.blocking(move |b| b.describe(&id)).await?;
                json_ok(request_id, StatusCode::OK, &d)
            }
            ApiRequest::StartInstance(id) => {
                self.blocking(move |b| b.start(&id)).await?;
                ack("running")
            }
            ApiRequest::StopInstance(id) => {
                self.blocking(move |b| b.stop(&id)).await?;
                ack("stopped")
            }
            ApiRequest::RebootInstance(id) => {
                self.blocking(move |b| b.reboot(&id)).await?;
                ack("rebooted")
            }
            ApiRequest::TerminateInstance(id) => {
                self.blocking(move |b| b.terminate(&id)).await?;
                ack("terminated")
            }
            ApiRequest::AttachVolume {
                id,
                volume,
                sealed_key,
                storage,
            } => {
                let v = Arc::clone(&self.volumes);
                blocking(move || v.attach(&id, &volume, sealed_key, storage)).await?;
                ack("attached")
            }
            ApiRequest::DetachVolume { id, volume } => {
                let v = Arc::clone(&self.volumes);
                blocking(move || v.detach(&id, &volume)).await?;
                ack("detached")
            }
            ApiRequest::GetConsole(id) => {
                let cid = id.clone();
                let output = self.blocking(move |b| b.console(&cid)).await?;
                json_ok(
                    request_id,
                    StatusCode::OK,
                    &api::ConsoleOutput {
                        instance_id: id.to_string(),
                        output,
                    },
                )
            }
            ApiRequest::AttachNetwork {
                id,
                epoch,
                sealed_key,
            } => {
                let net_endpoint = self
                    .blocking(move |b| b.attach_network(&id, epoch, sealed_key))
                    .await?;
                json_ok(
                    request_id,
                    StatusCode::OK,
                    &api::NetworkAttached {
                        request_id: request_id.to_string(),
                        net_endpoint,
                    },
                )
            }
            ApiRequest::SetNetworkRoutes { id, routes } => {
                self.blocking(move |b| b.set_net_routes(&id, &routes))
                    .await?;
                ack("routes_replaced")
            }
            ApiRequest::SetNetworkRules { id, allow } => {
                self.blocking(move |b| b.set_net_rules(&id, &allow)).await?;
                ack("rules_replaced")
            }
        })
    }
}

impl Controller {
    /// One deploy step's audit record (`DeployRelease:<step>` about `release:v<N>` and the
    /// instance it touched), durable before the next step runs.
    async fn audit_step(&self, step: &str, version: u64, instance: Option<&str>, code: &str) {
        let mut resources = vec![format!("release:v{version}")];
        if let Some(i) = instance {
            resources.push(format!("instance:{i}"));
        }
        if let Err(e) = self
            .audit_lifecycle_about(&format!("DeployRelease:{step}"), resources, code)
            .await
        {
            tracing::error!(error = %e, step, "audit of a deploy step failed");
        }
    }

    /// One card-update step's audit record (`DeployRelease:<step>` about `release:v<N>`, the
    /// instance and the volume), durable before the next step runs.
    async fn audit_card_step(
        &self,
        step: &str,
        version: u64,
        instance: &str,
        volume: &str,
        code: &str,
    ) {
        let resources = vec![
            format!("release:v{version}"),
            format!("instance:{instance}"),
            format!("volume:{volume}"),
        ];
        if let Err(e) = self
            .audit_lifecycle_about(&format!("DeployRelease:{step}"), resources, code)
            .await
        {
            tracing::error!(error = %e, step, "audit of a deploy step failed");
        }
    }

    /// DeployRelease: verify, install, self-test, live-update every running hypervisor, update
    /// every attached block card and every running net card when the release carries one (each
    /// moved back on the first failure), record. See [`crate::deploy`].
    async fn deploy_release(
        &self,
        request_id: &str,
        raw: String,
    ) -> Result<api::ReleaseDeployed, Refusal> {
        use crate::deploy::DeployError;
        let store = self.releases.clone().ok_or(DeployError::Unavailable)?;
        let _one = self.deploying.lock().await;
        let active = self.instances.active_release();
        let floor = active.as_ref().map_or(0, |r| r.version);
        let m = store.verify(&raw, floor, unix_now())?;
        let v = m.version;
        if active.as_ref().is_some_and(|r| r.version == v) {
            return Err(DeployError::AlreadyActive(v).into());
        }
        self.audit_step("verified", v, None, "ok").await;
        let (st, man, signed) = (Arc::clone(&store), m.clone(), raw.clone());
        let installed = tokio::task::spawn_blocking(move || st.install(&man, &signed))
            .await
            .map_err(|_| Refusal::Internal)?;
        if let Err(e) = installed {
            self.audit_step("install", v, None, e.code()).await;
            return Err(e.into());
        }
        self.audit_step("install", v, None, "ok").await;
        let passed = self.blocking(move |b| b.release_self_test(v)).await?;
        if !passed {
            let e = DeployError::SelfTestFailed;
            self.audit_step("self-test", v, None, e.code()).await;
            return Err(e.into());
        }
        self.audit_step("self-test", v, None, "ok").await;
        let record = {
            let (st, man) = (Arc::clone(&store), m.clone());
            tokio::task::spawn_blocking(move || st.record_of(&man))
                .await
                .map_err(|_| Refusal::Internal)??
        };
        let previous_card = active
            .as_ref()
            .filter(|r| r.carries(crate::launcher::RELEASE_BLOCKCARD))
            .map(|r| r.version);
        let previous = active.map(|r| r.version);
        let ids = self.blocking(|b| Ok(b.running_hypervisors())).await?;
        let mut moved: Vec<api::HypervisorMoved> = Vec::new();
        let mut failure: Option<DeployError> = None;
        for id in ids {
            let iid = id.clone();
            match self.blocking(move |b| b.live_update(&iid, Some(v))).await {
                Ok(mv) => {
                    self.audit_step("live-update", v, Some(id.as_str()), "ok")
                        .await;
                    moved.push(mv);
                }
                // Stopped or terminated meanwhile: nothing to move.
                Err(Refusal::Backend(BackendError::WrongState | BackendError::NoSuchInstance)) => {}
                Err(r) => {
                    let code = r.code();
                    self.audit_step("live-update", v, Some(id.as_str()), code)
                        .await;
                    failure = Some(DeployError::LiveUpdateFailed {
                        instance: id.to_string(),
                        code,
                    });
                    break;
                }
            }
        }
        // The release's block card, if it carries one: every attached volume's card moves to it.
        let mut cards: Vec<api::CardMoved> = Vec::new();
        if failure.is_none() && record.carries(crate::launcher::RELEASE_BLOCKCARD) {
            let attached = self.blocking(|b| Ok(b.attached_cards())).await?;
            for (id, vol, local) in attached {
                if !local {
                    // A network volume's card is not updated yet: it keeps its binary (audited).
                    self.audit_card_step(
                        "card_update",
                        v,
                        id.as_str(),
                        &vol,
                        "skipped_network_volume",
                    )
                    .await;
                    continue;
                }
                let (iid, v2) = (id.clone(), vol.clone());
                match self
                    .blocking(move |b| b.update_card(&iid, &v2, Some(v)))
                    .await
                {
                    Ok(mv) => {
                        self.audit_card_step("card_update", v, id.as_str(), &vol, "ok")
                            .await;
                        cards.push(mv);
                    }
                    // Detached, stopped or terminated meanwhile: nothing to move.
                    Err(Refusal::Backend(
                        BackendError::WrongState
                        | BackendError::NoSuchInstance
                        | BackendError::NoSuchVolume,
                    )) => {}
                    Err(r) => {
                        let code = r.code();
                        self.audit_card_step("card_update", v, id.as_str(), &vol, code)
                            .await;
                        failure = Some(DeployError::CardUpdateFailed {
                            instance: id.to_string(),
                            volume: vol,
                            code,
                        });
                        break;
                    }
                }
            }
        }
        // The release's net card, if it carries one: every running guest's card moves to it.
        let mut net_moved = Vec::new();
        if failure.is_none() {
            failure = self.deploy_net_cards(&record, v, &mut net_moved).await?;
        }
        if failure.is_none() {
            let rec = record.clone();
            if let Err(r) = self.blocking(move |b| b.set_active_release(rec)).await {
                self.audit_step("record", v, None, r.code()).await;
                failure = Some(DeployError::Record);
            }
        }
        if let Some(e) = failure {
            self.roll_back_net_cards(&net_moved, v).await;
            // Cards back to the card binary they ran before (the previous release's, if it
            // carried one), the last moved first.
            for mv in cards.iter().rev() {
                let id = api::ResourceId::parse(&mv.instance_id).map_err(|_| Refusal::Internal)?;
                let vol = mv.volume_id.clone();
                let back = self
                    .blocking(move |b| b.update_card(&id, &vol, previous_card))
                    .await;
                let code = match &back {
                    Ok(_) => "ok",
                    Err(r) => r.code(),
                };
                self.audit_card_step("card_roll-back", v, &mv.instance_id, &mv.volume_id, code)
                    .await;
            }
            // Back to the binary they ran before, the last moved first.
            for mv in moved.iter().rev() {
                let id = api::ResourceId::parse(&mv.instance_id).map_err(|_| Refusal::Internal)?;
                let back = self.blocking(move |b| b.live_update(&id, previous)).await;
                let code = match &back {
                    Ok(_) => "ok",
                    Err(r) => r.code(),
                };
                self.audit_step("roll-back", v, Some(&mv.instance_id), code)
                    .await;
            }
            return Err(e.into());
        }
        self.audit_step("activate", v, None, "ok").await;
        self.measure_applied_release(&m).await;
        let controller_restart = self.schedule_controller_restart(&record, v).await;
        tracing::info!(version = v, moved = moved.len(), "release deployed");
        Ok(api::ReleaseDeployed {
            request_id: request_id.to_string(),
            version: v,
            hypervisor: crate::launcher::release_path(&store.dir, v)
                .join(crate::launcher::RELEASE_HYPERVISOR)
                .display()
                .to_string(),
            moved,
            cards,
            net_cards: net_moved.into_iter().map(|m| m.moved).collect(),
            controller_restart,
        })
    }
}

/// Runs a backend call on the blocking pool: the real backend waits on processes and channels.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Refusal::Internal)?
        .map_err(Refusal::from)
}

impl Controller {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn InstanceBackend) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, Refusal> {
        let b = Arc::clone(&self.instances);
        blocking(move || f(b.as_ref())).await
    }
}

/// Random request identifier (hex).
pub fn new_request_id() -> String {
    let mut b = [0u8; 12];
    // Fall back to time if the OS RNG fails; ids need to be unique, not secret.
    if getrandom_fill(&mut b).is_err() {
        let t = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&t.to_le_bytes()[..12]);
    }
    hex::encode(b)
}

fn getrandom_fill(buf: &mut [u8]) -> Result<(), ()> {
    // SAFETY: `buf` is a valid, writable slice of `buf.len()` bytes for the duration of the call.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if usize::try_from(n).ok() == Some(buf.len()) {
        Ok(())
    } else {
        Err(())
    }
}

/// The axum handler: every request lands here (the router has only a fallback), with the TLS
/// peer's identity attached by the connection layer.
pub async fn dispatch(
    State(ctrl): State<Arc<Controller>>,
    Extension(peer): Extension<Arc<Identity>>,
    req: Request,
) -> Response {
    ctrl.handle(&peer, req).await
}

/// The router. Routing is done by [`ApiRequest::parse`] over [`api::ROUTES`].
pub fn router(ctrl: Arc<Controller>) -> axum::Router {
    axum::Router::new().fallback(dispatch).with_state(ctrl)
}

impl Controller {
    /// DeployRelease's last step: the release is measured into the host's TPM (the attestation
    /// agent extends the measurement PCR with a `release-applied` event), so the host attests
    /// with it from now on. Audited as `DeployRelease:measure`; a host without an agent cannot
    /// attest at all (`attestation_unavailable`). The release stays active either way: a
    /// deployer that then fails to attest the host rolls it back.
    async fn measure_applied_release(&self, m: &bulkhead_rot::release::Manifest) {
        let v = m.version;
        let code = match m.expected_pcr_value() {
            Err(_) => "release_bad_manifest",
            Ok(pcr) => {
                let applied = bulkhead_rot_proto::AppliedRelease {
                    version: v,
                    manifest_sha384: bulkhead_rot::measure::release_applied_digest(v, &pcr),
                };
                let link = Arc::clone(&self.attest);
                match tokio::task::spawn_blocking(move || link.measure_release(applied)).await {
                    Ok(Ok(())) => "ok",
                    Ok(Err(e)) => e.code(),
                    Err(_) => "internal",
                }
            }
        };
        if code != "ok" {
            tracing::warn!(version = v, code, "the applied release was not measured");
        }
        self.audit_step("measure", v, None, code).await;
    }
}
