//! The control plane's operations. Order for every customer call: authenticate the signature
//! (date window, replay), parse, audit the decision (durably, before acting), honour the
//! idempotency token, act, audit the outcome.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bulkhead_audit::{AuditEntry, AuditLog, Decision, EntryKind};
use bulkhead_kms::crypto::Key32;
use bulkhead_kms::sigv::{self, Authorization, ForwardedRequest, SignedParts};
use bulkhead_kms::tls::HttpsClient;
use bulkhead_rot::attest::Verifier;
use bulkhead_tokens::Operation;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::api::{self, ControlRequest};
use crate::hosts::HostClient;
use crate::repo::{HostRow, InstanceRow, Repository, VolumeRow};
use crate::state::{InstanceState, VolumeState};
use crate::{upstream_code, ControlError};

/// Test-only switch: with this variable naming a file in the control plane's own environment,
/// every KMS exchange is appended to that file as one JSON line
/// `{"op", "status", "request", "response_b64"}`: the decrypted traffic of the control
/// plane↔KMS link as the control plane sent and received it, so a test can check what crossed
/// that link instead of grepping TLS ciphertext. Off unless set; read once; no API,
/// configuration file or token can set it.
pub const KMS_DUMP_ENV: &str = "BULKHEAD_TEST_DUMP_KMS_BODIES";

fn kms_dump(op: &str, request: &Value, status: u16, response: &[u8]) {
    static DUMP: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let Some(path) = DUMP.get_or_init(|| std::env::var_os(KMS_DUMP_ENV).map(Into::into)) else {
        return;
    };
    let line = json!({
        "op": op,
        "status": status,
        "request": request,
        "response_b64": B64.encode(response),
    });
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
    if let Err(e) = written {
        tracing::warn!(error = %e, "{KMS_DUMP_ENV}: writing the KMS body dump failed");
    }
}

/// Allowed clock difference for a customer's signed request.
pub const REQUEST_WINDOW_SECS: u64 = 300;
/// SMT threads per physical core: instances get whole cores.
pub const THREADS_PER_CORE: u32 = 2;

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    let _ = bulkhead_sealing::fill_random(&mut b);
    format!("{prefix}-{}", hex::encode(b))
}

pub fn secret_aad(akid: &str) -> Vec<u8> {
    let mut a = b"bulkhead control customer secret v1\0".to_vec();
    a.extend_from_slice(akid.as_bytes());
    a
}

/// An incoming HTTP request, before anything is trusted.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub host: String,
    pub date: Option<String>,
    pub authorization: Option<String>,
    pub nonce: Option<String>,
    pub body: String,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: String,
    pub access_key_id: String,
    /// The signed request, forwarded to the KMS as the customer's own authorization.
    pub forwarded: ForwardedRequest,
}

pub struct ControlPlane {
    pub repo: Arc<dyn Repository>,
    root: Key32,
    kms: HttpsClient,
    kms_addr: String,
    hosts: HostClient,
    /// host id → 38-byte host public key file.
    host_keys: BTreeMap<String, Vec<u8>>,
    audit: AuditLog,
    placement: tokio::sync::Mutex<()>,
    /// When set, instances are placed only on hosts that attested (fresh TPM quote of a signed
    /// release's measurements) within [`ATTESTATION_TTL`].
    attestation: Option<std::sync::Mutex<Verifier>>,
    attested: std::sync::Mutex<HashMap<String, Instant>>,
    /// host id → the key its audit checkpoints must verify under (fleet monitoring).
    audit_keys: BTreeMap<String, bulkhead_audit::CheckpointKey>,
    /// Hosts whose pulled audit failed a check, and the rule (their pulls stop).
    flagged: std::sync::Mutex<HashMap<String, &'static str>>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long a host's successful attestation lets the scheduler place work on it.
pub const ATTESTATION_TTL: Duration = Duration::from_secs(60);

fn instance_json(i: &InstanceRow) -> Value {
    json!({
        "InstanceId": i.instance_id,
        "ImageId": i.image_id,
        "State": i.state.as_str(),
        "VcpuCount": i.vcpus,
        "MemoryMiB": i.memory_mib,
        "Cores": i.cores,
        "Tenancy": if i.dedicated { "dedicated" } else { "default" },
    })
}

fn volume_json(v: &VolumeRow) -> Value {
    json!({
        "VolumeId": v.volume_id,
        "SizeGiB": v.size_gib,
        "Encrypted": true,
        "KmsKeyId": v.kms_key_id,
        "State": v.state.as_str(),
        "InstanceId": v.instance_id,
    })
}

impl ControlPlane {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        repo: Arc<dyn Repository>,
        root: Key32,
        kms: HttpsClient,
        kms_addr: String,
        hosts: HostClient,
        host_keys: BTreeMap<String, Vec<u8>>,
        audit: AuditLog,
    ) -> ControlPlane {
        ControlPlane {
            repo,
            root,
            kms,
            kms_addr,
            hosts,
            host_keys,
            audit,
            placement: tokio::sync::Mutex::new(()),
            attestation: None,
            attested: std::sync::Mutex::new(HashMap::new()),
            audit_keys: BTreeMap::new(),
            flagged: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Places instances only on hosts that attest against `verifier` (the same policy the KMS
    /// enforces before releasing a volume key).
    pub fn with_attestation(mut self, verifier: Verifier) -> ControlPlane {
        self.attestation = Some(std::sync::Mutex::new(verifier));
        self
    }

    /// Attests `host` unless it did within [`ATTESTATION_TTL`]: a nonce from this control plane's
    /// verifier, the host's quote over it (relayed by its controller), verified here.
    async fn ensure_attested(&self, host: &HostRow) -> Result<(), ControlError> {
        let Some(v) = &self.attestation else {
            return Ok(());
        };
        let fresh = lock(&self.attested)
            .get(&host.host_id)
            .is_some_and(|t| t.elapsed() < ATTESTATION_TTL);
        if fresh {
            return Ok(());
        }
        let nonce = lock(v)
            .challenge(&host.host_id)
            .map_err(|_| ControlError::Internal)?;
        let ev = self
            .hosts
            .call(
                &host.host_id,
                &host.addr,
                Operation::AttestHost,
                &["host".to_string()],
                "POST",
                "/v1/host/attest",
                Some(json!({ "nonce": hex::encode(nonce) })),
            )
            .await?;
        let ev: bulkhead_rot::attest::Evidence =
            serde_json::from_value(ev).map_err(|_| ControlError::Host("attest_malformed"))?;
        if ev.host != host.host_id {
            return Err(ControlError::Host("evidence_for_another_host"));
        }
        let ok = lock(v).verify(&ev).map_err(|e| {
            tracing::warn!(host = %host.host_id, code = e.code(), "host failed attestation: no work placed on it");
            ControlError::Host(crate::upstream_code(e.code()))
        })?;
        tracing::info!(host = %host.host_id, release = ok.release_version, "host attested for placement");
        lock(&self.attested).insert(host.host_id.clone(), Instant::now());
        Ok(())
    }

    fn authenticate(&self, r: &RawRequest) -> Result<Caller, ControlError> {
        let header = r
            .authorization
            .as_deref()
            .ok_or(ControlError::Auth(sigv::SigError::Missing))?;
        let auth = Authorization::parse(header).map_err(ControlError::Auth)?;
        let cust = self
            .repo
            .customer(&auth.access_key_id)?
            .ok_or(ControlError::Auth(sigv::SigError::UnknownAccessKey))?;
        let secret = bulkhead_kms::crypto::unwrap::<32>(
            &self.root,
            &secret_aad(&cust.access_key_id),
            &cust.wrapped_secret,
        )
        .map_err(|_| ControlError::Internal)?;
        let parts = SignedParts {
            method: r.method.clone(),
            path: r.path.clone(),
            query: r.query.clone(),
            host: r.host.clone(),
            date: r
                .date
                .clone()
                .ok_or(ControlError::Auth(sigv::SigError::BadDate))?,
            body: r.body.clone(),
            nonce: r.nonce.clone().unwrap_or_default(),
        };
        let t = now();
        sigv::verify(&auth, secret.as_ref(), &parts, t, REQUEST_WINDOW_SECS)
            .map_err(ControlError::Auth)?;
        if !self.repo.first_use_of_signature(
            &hex::encode(auth.signature),
            t,
            t.saturating_sub(2 * REQUEST_WINDOW_SECS),
        )? {
            return Err(ControlError::Replayed);
        }
        Ok(Caller {
            tenant: cust.tenant_id,
            access_key_id: cust.access_key_id,
            forwarded: ForwardedRequest {
                authorization: header.to_string(),
                parts,
            },
        })
    }

    /// The control plane's own audit log (refusals of its listeners are queued into it).
    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn audit(
        &self,
        kind: EntryKind,
        request_id: &str,
        who: (&str, &str),
        op: &str,
        res: Vec<String>,
        // The body is never recorded (claim 2); callers still say what they were sent.
        _body: Option<&str>,
        code: &str,
    ) -> Result<(), ControlError> {
        let entry = AuditEntry {
            kind,
            request_id: request_id.to_string(),
            caller: who.0.to_string(),
            cert_sha256: None,
            token_id: Some(who.1.to_string()).filter(|s| !s.is_empty()),
            op: op.to_string(),
            resources: res,
            // Claim 2: a customer's request body (user data, …) leaves no digest, length or
            // prefix in a record an operator can read.
            params_sha256: None,
            decision: match kind {
                EntryKind::Request if code == "ok" => Decision::Allow,
                EntryKind::Request => Decision::Deny,
                _ => Decision::None,
            },
            code: code.to_string(),
        };
        if kind == EntryKind::Request {
            self.audit
                .append(entry)
                .await
                .map_err(|_| ControlError::AuditUnavailable)?;
        } else {
            self.audit.append_queued(entry);
        }
        Ok(())
    }

    /// A central alert (fleet monitoring), durable before this returns.
    pub(crate) async fn audit_alert(
        &self,
        request_id: &str,
        rule: &str,
        host: &str,
        evidence: &str,
    ) -> Result<u64, bulkhead_audit::AuditError> {
        self.audit
            .append(AuditEntry {
                kind: EntryKind::Alert,
                request_id: request_id.to_string(),
                caller: host.to_string(),
                cert_sha256: None,
                token_id: None,
                op: rule.to_string(),
                resources: vec![format!("host:{host}")],
                params_sha256: None,
                decision: Decision::None,
                code: evidence.chars().take(512).collect(),
            })
            .await
    }

    pub(crate) fn flagged_hosts(&self) -> std::sync::MutexGuard<'_, HashMap<String, &'static str>> {
        lock(&self.flagged)
    }

    /// Checkpoint keys (the hosts' certificates) to verify pulled audit chains with.
    pub fn with_audit_keys(
        mut self,
        keys: BTreeMap<String, bulkhead_audit::CheckpointKey>,
    ) -> Self {
        self.audit_keys = keys;
        self
    }

    /// The central alerts recorded so far (newest last), at most `limit`.
    pub fn alerts(&self, limit: usize) -> Vec<Value> {
        let lines =
            bulkhead_audit::read_after(self.audit.path(), 0, usize::MAX).unwrap_or_default();
        let mut out: Vec<Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<bulkhead_audit::AuditRecord>(l).ok())
            .filter(|r| r.entry.kind == EntryKind::Alert)
            .map(|r| {
                json!({
                    "rule": r.entry.op,
                    "host": r.entry.caller,
                    "evidence": r.entry.code,
                    "time_ms": r.time_ms,
                    "seq": r.seq,
                })
            })
            .collect();
        let skip = out.len().saturating_sub(limit);
        out.drain(..skip);
        out
    }

    /// Handles one customer request end to end. Returns (status, JSON body).
    pub async fn handle(&self, r: RawRequest) -> (u16, Value) {
        let request_id = new_id("req");
        let op_name = r
            .path
            .strip_prefix("/v1/")
            .unwrap_or("-")
            .chars()
            .take(40)
            .collect::<String>();
        let decided = self.authenticate(&r).and_then(|c| {
            let req = ControlRequest::parse(&r.method, &r.path, &r.body)?;
            Ok((c, req))
        });
        let (caller, req) = match decided {
            Ok(x) => x,
            Err(e) => {
                let _ = self
                    .audit(
                        EntryKind::Request,
                        &request_id,
                        ("-", ""),
                        &op_name,
                        vec![],
                        Some(&r.body),
                        e.code(),
                    )
                    .await;
                return error_body(&e, &request_id);
            }
        };
        let who = (caller.tenant.clone(), caller.access_key_id.clone());
        let who = (who.0.as_str(), who.1.as_str());
        if let Err(e) = self
            .audit(
                EntryKind::Request,
                &request_id,
                who,
                req.action(),
                vec![format!("tenant:{}", caller.tenant)],
                Some(&r.body),
                "ok",
            )
            .await
        {
            return error_body(&e, &request_id);
        }
        let idem = req.client_token().map(|t| {
            (
                t.to_string(),
                hex::encode(Sha256::digest(r.body.as_bytes())),
            )
        });
        if let Some((token, hash)) = &idem {
            match self.repo.idempotency(&caller.tenant, req.action(), token) {
                Ok(Some((h, resp))) if &h == hash => {
                    let v = serde_json::from_str(&resp).unwrap_or(Value::Null);
                    let _ = self
                        .audit(
                            EntryKind::Outcome,
                            &request_id,
                            who,
                            req.action(),
                            vec![],
                            None,
                            "idempotent_replay",
                        )
                        .await;
                    return (200, v);
                }
                Ok(Some(_)) => return error_body(&ControlError::IdempotencyMismatch, &request_id),
                Ok(None) => {}
                Err(e) => return error_body(&ControlError::Repo(e), &request_id),
            }
        }
        let action = req.action();
        let result = self.execute(&caller, req).await;
        let code = match &result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        let _ = self
            .audit(
                EntryKind::Outcome,
                &request_id,
                who,
                action,
                vec![],
                None,
                code,
            )
            .await;
        match result {
            Ok(v) => {
                if let Some((token, hash)) = idem {
                    if let Err(e) = self.repo.put_idempotency(
                        &caller.tenant,
                        action,
                        &token,
                        &hash,
                        &v.to_string(),
                    ) {
                        tracing::error!(error = %e, "idempotency record not stored");
                    }
                }
                tracing::info!(tenant = %caller.tenant, action, request_id, "ok");
                (200, v)
            }
            Err(e) => {
                tracing::info!(tenant = %caller.tenant, action, request_id, code = e.code(), "refused");
                error_body(&e, &request_id)
            }
        }
    }

    async fn execute(&self, c: &Caller, req: ControlRequest) -> Result<Value, ControlError> {
        match req {
            ControlRequest::RunInstances(r) => self.run_instance(c, r).await,
            ControlRequest::DescribeInstances(r) => {
                let all = self.repo.instances(&c.tenant)?;
                for id in &r.instance_ids {
                    if !all.iter().any(|i| &i.instance_id == id) {
                        return Err(ControlError::NoSuchInstance);
                    }
                }
                let out: Vec<Value> = all
                    .iter()
                    .filter(|i| {
                        r.instance_ids.is_empty() || r.instance_ids.contains(&i.instance_id)
                    })
                    .map(instance_json)
                    .collect();
                Ok(json!({ "Instances": out }))
            }
            ControlRequest::StopInstances(r) => {
                self.lifecycle(
                    c,
                    &r.instance_ids,
                    Operation::StopInstance,
                    "stop",
                    InstanceState::Stopped,
                )
                .await
            }
            ControlRequest::StartInstances(r) => {
                self.lifecycle(
                    c,
                    &r.instance_ids,
                    Operation::StartInstance,
                    "start",
                    InstanceState::Running,
                )
                .await
            }
            ControlRequest::TerminateInstances(r) => {
                self.lifecycle(
                    c,
                    &r.instance_ids,
                    Operation::TerminateInstance,
                    "terminate",
                    InstanceState::Terminated,
                )
                .await
            }
            ControlRequest::CreateVolume(r) => {
                let volume_id = new_id("vol");
                let body = json!({
                    "key_id": r.kms_key_id,
                    "volume_id": volume_id,
                    "customer_request": c.forwarded,
                });
                let v = self.kms_call("GenerateDataKey", &body).await?;
                let blob = v["ciphertext_blob"]
                    .as_str()
                    .and_then(|b| B64.decode(b).ok())
                    .ok_or(ControlError::Internal)?;
                let key_id = v["key_id"]
                    .as_str()
                    .ok_or(ControlError::Internal)?
                    .to_string();
                let row = VolumeRow {
                    volume_id,
                    tenant_id: c.tenant.clone(),
                    size_gib: r.size_gib,
                    kms_key_id: key_id,
                    ciphertext_blob: blob,
                    state: VolumeState::Available,
                    instance_id: None,
                    host_id: None,
                    created: now(),
                };
                self.repo.insert_volume(&row)?;
                Ok(volume_json(&row))
            }
            ControlRequest::DescribeVolumes(r) => {
                let all = self.repo.volumes(&c.tenant)?;
                for id in &r.volume_ids {
                    if !all.iter().any(|v| &v.volume_id == id) {
                        return Err(ControlError::NoSuchVolume);
                    }
                }
                let out: Vec<Value> = all
                    .iter()
                    .filter(|v| r.volume_ids.is_empty() || r.volume_ids.contains(&v.volume_id))
                    .map(volume_json)
                    .collect();
                Ok(json!({ "Volumes": out }))
            }
            ControlRequest::AttachVolume(r) => self.attach(c, &r.volume_id, &r.instance_id).await,
            ControlRequest::DetachVolume(r) => self.detach(c, &r.volume_id).await,
            ControlRequest::DeleteVolume(r) => {
                let v = self
                    .repo
                    .volume(&c.tenant, &r.volume_id)?
                    .ok_or(ControlError::NoSuchVolume)?;
                if v.state != VolumeState::Available
                    || !self.repo.delete_volume(&c.tenant, &r.volume_id)?
                {
                    return Err(ControlError::VolumeInUse);
                }
                Ok(json!({ "VolumeId": r.volume_id, "State": "deleted" }))
            }
            ControlRequest::GetConsoleOutput(r) => {
                let i = self
                    .repo
                    .instance(&c.tenant, &r.instance_id)?
                    .ok_or(ControlError::NoSuchInstance)?;
                let host = self.host(&i.host_id)?;
                let v = self
                    .hosts
                    .call(
                        &host.host_id,
                        &host.addr,
                        Operation::GetConsole,
                        &[format!("instance:{}", i.instance_id)],
                        "GET",
                        &format!("/v1/instances/{}/console", i.instance_id),
                        None,
                    )
                    .await?;
                Ok(json!({ "InstanceId": i.instance_id, "Output": v["output"].clone() }))
            }
            ControlRequest::CreateKey(_) => {
                let v = self
                    .kms_call("CreateKey", &json!({ "customer_request": c.forwarded }))
                    .await?;
                Ok(json!({ "KeyId": v["key_id"] }))
            }
            ControlRequest::RevokeGrant(r) => {
                let v = self
                    .kms_call("RevokeGrant", &json!({ "key_id": r.key_id, "volume_id": r.volume_id, "customer_request": c.forwarded }))
                    .await?;
                Ok(json!({ "KeyId": r.key_id, "VolumeId": r.volume_id, "Revoked": v["revoked"] }))
            }
        }
    }

    /// One call to the KMS (JSON in, JSON out; non-200 becomes a typed upstream error).
    async fn kms_call(&self, op: &str, body: &Value) -> Result<Value, ControlError> {
        let r = self
            .kms
            .request(
                &self.kms_addr,
                "POST",
                &format!("/v1/{op}"),
                &[("content-type", "application/json")],
                body.to_string().into_bytes(),
            )
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "kms unreachable");
                ControlError::Upstream
            })?;
        kms_dump(op, body, r.status, &r.body);
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        if r.status == 200 {
            Ok(v)
        } else {
            Err(ControlError::Kms(upstream_code(
                v["error"]["code"].as_str().unwrap_or(""),
            )))
        }
    }

    /// Registers a customer with the KMS (its copy of the signing secret lives wrapped there).
    pub async fn register_with_kms(
        &self,
        tenant: &str,
        akid: &str,
        secret: &[u8],
    ) -> Result<(), ControlError> {
        self.kms_call(
            "RegisterCustomer",
            &json!({"tenant_id": tenant, "access_key_id": akid, "secret": B64.encode(secret)}),
        )
        .await
        .map(|_| ())
    }

    fn host(&self, host_id: &str) -> Result<HostRow, ControlError> {
        self.repo
            .hosts()?
            .into_iter()
            .find(|h| h.host_id == host_id)
            .ok_or(ControlError::Internal)
    }

    /// Chooses a host with `cores` free whole cores. Dedicated: a host with no other tenant's
    /// live instance, then reserved for this tenant; default: never a host reserved for another.
    pub fn place(
        hosts: &[HostRow],
        live: &[InstanceRow],
        tenant: &str,
        cores: u32,
        dedicated: bool,
    ) -> Option<(String, bool)> {
        let mut best: Option<(u32, &HostRow)> = None;
        for h in hosts {
            let on: Vec<&InstanceRow> = live.iter().filter(|i| i.host_id == h.host_id).collect();
            let used: u32 = on.iter().map(|i| i.cores).sum();
            let free = h.cores.saturating_sub(used);
            let others = on.iter().any(|i| i.tenant_id != tenant);
            let reserved_for_other = on.iter().any(|i| i.dedicated && i.tenant_id != tenant)
                || (h.dedicated_tenant.as_deref().is_some_and(|t| t != tenant) && !on.is_empty());
            let ok = free >= cores && !reserved_for_other && (!dedicated || !others);
            if ok && best.is_none_or(|(f, _)| free > f) {
                best = Some((free, h));
            }
        }
        best.map(|(_, h)| (h.host_id.clone(), dedicated))
    }

    async fn run_instance(&self, c: &Caller, r: api::RunInstances) -> Result<Value, ControlError> {
        let cores = r.vcpus.div_ceil(THREADS_PER_CORE);
        let dedicated = r.tenancy.as_deref() == Some("dedicated");
        let row = {
            let _g = self.placement.lock().await;
            let mut hosts = self.repo.hosts()?;
            let live = self.repo.live_instances()?;
            // The best host with room that attests; a host that fails is left out and the
            // next best is tried.
            let mut refused = 0;
            let host_id = loop {
                let Some((host_id, _)) = Self::place(&hosts, &live, &c.tenant, cores, dedicated)
                else {
                    return Err(if refused > 0 {
                        ControlError::NoAttestedHost
                    } else {
                        ControlError::NoCapacity
                    });
                };
                let h = hosts
                    .iter()
                    .find(|h| h.host_id == host_id)
                    .cloned()
                    .ok_or(ControlError::Internal)?;
                match self.ensure_attested(&h).await {
                    Ok(()) => break host_id,
                    Err(e) => {
                        tracing::warn!(host = %host_id, code = e.code(), "not placing on a host that did not attest");
                        refused += 1;
                        hosts.retain(|x| x.host_id != host_id);
                    }
                }
            };
            let row = InstanceRow {
                instance_id: new_id("i"),
                tenant_id: c.tenant.clone(),
                host_id: host_id.clone(),
                image_id: r.image_id.clone(),
                vcpus: r.vcpus,
                memory_mib: r.memory_mib,
                cores,
                dedicated,
                state: InstanceState::Pending,
                created: now(),
            };
            self.repo.insert_instance(&row)?;
            self.repo
                .set_host_dedicated(&host_id, if dedicated { Some(&c.tenant) } else { None })?;
            row
        };
        let host = self.host(&row.host_id)?;
        let res = [format!("instance:{}", row.instance_id)];
        let created = async {
            self.hosts
                .call(
                    &host.host_id,
                    &host.addr,
                    Operation::CreateInstance,
                    &res,
                    "POST",
                    "/v1/instances",
                    Some(create_body(&row, r.user_data.as_deref())),
                )
                .await?;
            self.hosts
                .call(
                    &host.host_id,
                    &host.addr,
                    Operation::StartInstance,
                    &res,
                    "POST",
                    &format!("/v1/instances/{}/start", row.instance_id),
                    None,
                )
                .await
        }
        .await;
        if let Err(e) = created {
            // Release the reservation; the instance never ran.
            let _ = self
                .hosts
                .call(
                    &host.host_id,
                    &host.addr,
                    Operation::TerminateInstance,
                    &res,
                    "POST",
                    &format!("/v1/instances/{}/terminate", row.instance_id),
                    None,
                )
                .await;
            self.repo.set_instance_state(
                &c.tenant,
                &row.instance_id,
                InstanceState::Pending,
                InstanceState::Terminated,
            )?;
            return Err(e);
        }
        self.repo.set_instance_state(
            &c.tenant,
            &row.instance_id,
            InstanceState::Pending,
            InstanceState::Running,
        )?;
        let mut out = row;
        out.state = InstanceState::Running;
        Ok(json!({ "Instances": [instance_json(&out)] }))
    }

    async fn lifecycle(
        &self,
        c: &Caller,
        ids: &[String],
        op: Operation,
        verb: &str,
        to: InstanceState,
    ) -> Result<Value, ControlError> {
        if ids.is_empty() {
            return Err(ControlError::BadShape);
        }
        let mut rows = Vec::new();
        for id in ids {
            rows.push(
                self.repo
                    .instance(&c.tenant, id)?
                    .ok_or(ControlError::NoSuchInstance)?,
            );
        }
        let mut out = Vec::new();
        for i in rows {
            if !i.state.can_become(to) {
                return Err(ControlError::WrongState);
            }
            let host = self.host(&i.host_id)?;
            if op == Operation::TerminateInstance {
                for v in self
                    .repo
                    .volumes(&c.tenant)?
                    .into_iter()
                    .filter(|v| v.instance_id.as_deref() == Some(&i.instance_id))
                {
                    let _ = self.detach(c, &v.volume_id).await;
                }
            }
            self.hosts
                .call(
                    &host.host_id,
                    &host.addr,
                    op,
                    &[format!("instance:{}", i.instance_id)],
                    "POST",
                    &format!("/v1/instances/{}/{verb}", i.instance_id),
                    None,
                )
                .await?;
            self.repo
                .set_instance_state(&c.tenant, &i.instance_id, i.state, to)?;
            out.push(json!({
                "InstanceId": i.instance_id,
                "PreviousState": i.state.as_str(),
                "CurrentState": to.as_str(),
            }));
        }
        Ok(json!({ "Instances": out }))
    }

    /// The attach flow: volume + instance owned by the caller → mark attaching → KMS re-wraps
    /// the data key to the instance's host key under the customer's forwarded AttachVolume →
    /// the host controller hands the sealed blob to the block card → in-use. Any failure rolls
    /// the volume back to available (and asks the host to drop the key).
    async fn attach(
        &self,
        c: &Caller,
        volume_id: &str,
        instance_id: &str,
    ) -> Result<Value, ControlError> {
        let v = self
            .repo
            .volume(&c.tenant, volume_id)?
            .ok_or(ControlError::NoSuchVolume)?;
        let i = self
            .repo
            .instance(&c.tenant, instance_id)?
            .ok_or(ControlError::NoSuchInstance)?;
        if !matches!(i.state, InstanceState::Running | InstanceState::Stopped) {
            return Err(ControlError::WrongState);
        }
        if v.state != VolumeState::Available {
            return Err(ControlError::VolumeInUse);
        }
        let host = self.host(&i.host_id)?;
        let host_pub = self
            .host_keys
            .get(&host.host_id)
            .ok_or(ControlError::Internal)?;
        self.repo
            .transition_volume(
                &c.tenant,
                volume_id,
                VolumeState::Available,
                VolumeState::Attaching,
                Some(instance_id),
                Some(&host.host_id),
            )
            .map_err(|_| ControlError::VolumeInUse)?;
        let res = [
            format!("instance:{instance_id}"),
            format!("volume:{volume_id}"),
        ];
        let flow = async {
            // Host attestation: a one-time KMS nonce, quoted by the host's TPM (relayed by its
            // controller), checked by the KMS before it releases the key.
            let challenge = self
                .kms_call("Challenge", &json!({ "host_id": host.host_id }))
                .await?;
            let evidence = if challenge["required"] == true {
                let nonce = challenge["nonce"].as_str().ok_or(ControlError::Internal)?;
                Some(
                    self.hosts
                        .call(
                            &host.host_id,
                            &host.addr,
                            Operation::AttestHost,
                            &["host".to_string(), format!("instance:{instance_id}")],
                            "POST",
                            "/v1/host/attest",
                            // Bound to the instance: the host quotes only if it runs it, and the
                            // KMS recomputes the binding from the customer's signed request.
                            Some(json!({ "nonce": nonce, "instance_id": instance_id })),
                        )
                        .await?,
                )
            } else {
                None
            };
            let sealed = self
                .kms_call(
                    "DecryptForHost",
                    &json!({
                        "volume_id": volume_id,
                        "ciphertext_blob": B64.encode(&v.ciphertext_blob),
                        "host_id": host.host_id,
                        "host_public_key": B64.encode(host_pub),
                        "customer_request": c.forwarded,
                        "evidence": evidence,
                    }),
                )
                .await?;
            let sealed_key = sealed["sealed_key"]
                .as_str()
                .ok_or(ControlError::Internal)?
                .to_string();
            self.hosts
                .call(
                    &host.host_id,
                    &host.addr,
                    Operation::AttachVolume,
                    &res,
                    "POST",
                    &format!("/v1/instances/{instance_id}/volumes"),
                    Some(json!({"volume_id": volume_id, "sealed_key": sealed_key})),
                )
                .await
        }
        .await;
        match flow {
            Ok(_) => {
                self.repo.transition_volume(
                    &c.tenant,
                    volume_id,
                    VolumeState::Attaching,
                    VolumeState::InUse,
                    Some(instance_id),
                    Some(&host.host_id),
                )?;
                Ok(json!({"VolumeId": volume_id, "InstanceId": instance_id, "State": "attached"}))
            }
            Err(e) => {
                if matches!(e, ControlError::Upstream | ControlError::Host(_)) {
                    let _ = self
                        .hosts
                        .call(
                            &host.host_id,
                            &host.addr,
                            Operation::DetachVolume,
                            &res,
                            "DELETE",
                            &format!("/v1/instances/{instance_id}/volumes/{volume_id}"),
                            None,
                        )
                        .await;
                }
                self.repo.transition_volume(
                    &c.tenant,
                    volume_id,
                    VolumeState::Attaching,
                    VolumeState::Available,
                    None,
                    None,
                )?;
                Err(e)
            }
        }
    }

    async fn detach(&self, c: &Caller, volume_id: &str) -> Result<Value, ControlError> {
        let v = self
            .repo
            .volume(&c.tenant, volume_id)?
            .ok_or(ControlError::NoSuchVolume)?;
        if v.state != VolumeState::InUse {
            return Err(ControlError::WrongState);
        }
        let (Some(instance_id), Some(host_id)) = (v.instance_id.clone(), v.host_id.clone()) else {
            return Err(ControlError::Internal);
        };
        self.repo
            .transition_volume(
                &c.tenant,
                volume_id,
                VolumeState::InUse,
                VolumeState::Detaching,
                Some(&instance_id),
                Some(&host_id),
            )
            .map_err(|_| ControlError::WrongState)?;
        let host = self.host(&host_id)?;
        let r = self
            .hosts
            .call(
                &host.host_id,
                &host.addr,
                Operation::DetachVolume,
                &[
                    format!("instance:{instance_id}"),
                    format!("volume:{volume_id}"),
                ],
                "DELETE",
                &format!("/v1/instances/{instance_id}/volumes/{volume_id}"),
                None,
            )
            .await;
        match r {
            Ok(_)
            | Err(ControlError::Host("no_such_volume"))
            | Err(ControlError::Host("no_such_instance")) => {
                self.repo.transition_volume(
                    &c.tenant,
                    volume_id,
                    VolumeState::Detaching,
                    VolumeState::Available,
                    None,
                    None,
                )?;
                Ok(json!({"VolumeId": volume_id, "InstanceId": instance_id, "State": "detached"}))
            }
            Err(e) => {
                self.repo.transition_volume(
                    &c.tenant,
                    volume_id,
                    VolumeState::Detaching,
                    VolumeState::InUse,
                    Some(&instance_id),
                    Some(&host_id),
                )?;
                Err(e)
            }
        }
    }

    /// Start-up convergence after a crash: volumes caught mid-attach or mid-detach are detached
    /// on their host (dropping any key the card got) and made available again; instances caught
    /// mid-launch are terminated.
    pub async fn reconcile(&self) -> Result<usize, ControlError> {
        let mut n = 0;
        for v in self.repo.volumes_in_transition()? {
            if let (Some(inst), Some(host_id)) = (&v.instance_id, &v.host_id) {
                if let Ok(host) = self.host(host_id) {
                    let _ = self
                        .hosts
                        .call(
                            &host.host_id,
                            &host.addr,
                            Operation::DetachVolume,
                            &[
                                format!("instance:{inst}"),
                                format!("volume:{}", v.volume_id),
                            ],
                            "DELETE",
                            &format!("/v1/instances/{inst}/volumes/{}", v.volume_id),
                            None,
                        )
                        .await;
                }
            }
            self.repo.transition_volume(
                &v.tenant_id,
                &v.volume_id,
                v.state,
                VolumeState::Available,
                None,
                None,
            )?;
            tracing::warn!(volume = %v.volume_id, from = %v.state, "rolled back interrupted volume transition");
            n += 1;
        }
        for i in self
            .repo
            .live_instances()?
            .into_iter()
            .filter(|i| i.state == InstanceState::Pending)
        {
            if let Ok(host) = self.host(&i.host_id) {
                let _ = self
                    .hosts
                    .call(
                        &host.host_id,
                        &host.addr,
                        Operation::TerminateInstance,
                        &[format!("instance:{}", i.instance_id)],
                        "POST",
                        &format!("/v1/instances/{}/terminate", i.instance_id),
                        None,
                    )
                    .await;
            }
            self.repo.set_instance_state(
                &i.tenant_id,
                &i.instance_id,
                InstanceState::Pending,
                InstanceState::Terminated,
            )?;
            n += 1;
        }
        Ok(n)
    }

    /// When a host reports fewer instances than the records place on it (its controller was
    /// killed and restarted: its guests and cards died with it), the instances it no longer
    /// knows are marked terminated and their volumes released, so the state converges and the
    /// volumes can be attached again. Returns how many instances were lost.
    async fn reconcile_lost(&self, h: &HostRow, reported: u64) -> Result<usize, ControlError> {
        let recorded: Vec<InstanceRow> = self
            .repo
            .live_instances()?
            .into_iter()
            .filter(|i| {
                i.host_id == h.host_id
                    && matches!(i.state, InstanceState::Running | InstanceState::Stopped)
            })
            .collect();
        if u64::try_from(recorded.len()).unwrap_or(0) <= reported {
            return Ok(0);
        }
        let mut lost = 0;
        for i in recorded {
            let r = self
                .hosts
                .call(
                    &h.host_id,
                    &h.addr,
                    Operation::DescribeInstance,
                    &[format!("instance:{}", i.instance_id)],
                    "GET",
                    &format!("/v1/instances/{}", i.instance_id),
                    None,
                )
                .await;
            if !matches!(r, Err(ControlError::Host("no_such_instance"))) {
                continue;
            }
            for v in self.repo.volumes(&i.tenant_id)?.into_iter().filter(|v| {
                v.instance_id.as_deref() == Some(&i.instance_id) && v.state == VolumeState::InUse
            }) {
                self.repo.transition_volume(
                    &i.tenant_id,
                    &v.volume_id,
                    VolumeState::InUse,
                    VolumeState::Available,
                    None,
                    None,
                )?;
            }
            self.repo.set_instance_state(
                &i.tenant_id,
                &i.instance_id,
                i.state,
                InstanceState::Terminated,
            )?;
            tracing::warn!(host = %h.host_id, instance = %i.instance_id, "instance lost with its host's controller: marked terminated, volumes released");
            lost += 1;
        }
        Ok(lost)
    }

    /// One polling round (pull, never push): each host's description and its new audit records
    /// after the stored cursor. Returns how many audit records were pulled.
    pub async fn poll_hosts(&self) -> Result<u64, ControlError> {
        let mut pulled = 0u64;
        for h in self.repo.hosts()? {
            let described = self
                .hosts
                .call(
                    &h.host_id,
                    &h.addr,
                    Operation::DescribeHost,
                    &["host".into()],
                    "GET",
                    "/v1/host",
                    None,
                )
                .await;
            let v = match described {
                Ok(v) => {
                    self.repo
                        .set_host_status(&h.host_id, &v.to_string(), now())?;
                    let reported = v["instances"].as_u64().unwrap_or(u64::MAX);
                    if let Err(e) = self.reconcile_lost(&h, reported).await {
                        tracing::warn!(host = %h.host_id, code = e.code(), "reconciling lost instances failed");
                    }
                    v
                }
                Err(e) => {
                    tracing::warn!(host = %h.host_id, code = e.code(), "poll failed");
                    continue;
                }
            };
            pulled += self.pull_host_audit(&h, &v).await?;
        }
        Ok(pulled)
    }
}

impl ControlPlane {
    /// Pulls `h`'s audit records after the last stored one and stores them only if they
    /// continue its chain (see [`crate::fleet`]). `described` is the host's `DescribeHost`
    /// answer of this round (its audit head). Returns how many records were stored.
    async fn pull_host_audit(&self, h: &HostRow, described: &Value) -> Result<u64, ControlError> {
        use crate::fleet;
        if self.flagged(&h.host_id).is_some() {
            return Ok(0);
        }
        let anchor = fleet::stored_anchor(self.repo.as_ref(), &h.host_id)?;
        if let Ok(head) =
            serde_json::from_value::<bulkhead_audit::Head>(described["audit_head"].clone())
        {
            if let Some(f) = fleet::check_head(&h.host_id, anchor.as_ref(), &head) {
                if self.flag(&h.host_id, f.rule) {
                    self.raise(&f).await;
                }
                return Ok(0);
            }
        }
        let after = anchor.as_ref().map_or(0, |a| a.seq);
        let path = format!("/v1/audit?after={after}&limit=500");
        let Ok(v) = self
            .hosts
            .call(
                &h.host_id,
                &h.addr,
                Operation::ReadAudit,
                &["host".into()],
                "GET",
                &path,
                None,
            )
            .await
        else {
            return Ok(0);
        };
        let lines = fleet::lines_of(&v);
        let (keep, found) = fleet::check_page(
            &h.host_id,
            anchor.as_ref(),
            self.audit_keys.get(&h.host_id),
            &lines,
        );
        for f in &found {
            if f.rule == fleet::rule::CHAIN_BROKEN && !self.flag(&h.host_id, f.rule) {
                continue;
            }
            self.raise(f).await;
        }
        if keep.is_empty() {
            return Ok(0);
        }
        self.repo.append_host_audit(&h.host_id, &keep)?;
        Ok(u64::try_from(keep.len()).unwrap_or(0))
    }
}

fn error_body(e: &ControlError, request_id: &str) -> (u16, Value) {
    (
        e.status(),
        json!({"error": {"code": e.code(), "message": e.to_string(), "request_id": request_id}}),
    )
}

/// The controller's CreateInstance body; `user_data` only when the customer gave one.
fn create_body(row: &InstanceRow, user_data: Option<&str>) -> Value {
    let mut body = json!({
        "instance_id": row.instance_id,
        "image": row.image_id,
        "vcpus": row.vcpus,
        "memory_mib": row.memory_mib,
    });
    if let (Some(u), Some(o)) = (user_data, body.as_object_mut()) {
        o.insert("user_data".into(), Value::String(u.to_owned()));
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, cores: u32) -> HostRow {
        HostRow {
            host_id: id.into(),
            addr: String::new(),
            cores,
            dedicated_tenant: None,
        }
    }

    fn inst(host: &str, tenant: &str, cores: u32, dedicated: bool) -> InstanceRow {
        InstanceRow {
            instance_id: new_id("i"),
            tenant_id: tenant.into(),
            host_id: host.into(),
            image_id: "img".into(),
            vcpus: cores * 2,
            memory_mib: 128,
            cores,
            dedicated,
            state: InstanceState::Running,
            created: 0,
        }
    }

    #[test]
    fn placement_whole_cores_and_dedicated_hosts() {
        let hosts = [host("h1", 2), host("h2", 2)];
        // Spreads to the host with most free cores.
        let live = [inst("h1", "a", 1, false)];
        assert_eq!(
            ControlPlane::place(&hosts, &live, "b", 1, false).map(|p| p.0),
            Some("h2".into())
        );
        // Two cores needed: only h2 has them.
        assert_eq!(
            ControlPlane::place(&hosts, &live, "a", 2, false).map(|p| p.0),
            Some("h2".into())
        );
        // Dedicated for b: h1 runs a's instance, so only h2.
        assert_eq!(
            ControlPlane::place(&hosts, &live, "b", 1, true).map(|p| p.0),
            Some("h2".into())
        );
        // A host dedicated to a takes nobody else, even with free cores.
        let live = [inst("h1", "a", 1, true), inst("h2", "c", 2, false)];
        assert_eq!(ControlPlane::place(&hosts, &live, "b", 1, false), None);
        assert_eq!(
            ControlPlane::place(&hosts, &live, "a", 1, false).map(|p| p.0),
            Some("h1".into())
        );
        // Never more cores than the host has.
        assert_eq!(ControlPlane::place(&hosts, &[], "a", 3, false), None);
    }
}
