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
use bulkhead_kms::forward::CustomerRequest;
use bulkhead_kms::tls::HttpsClient;
use bulkhead_rot::attest::Verifier;
use bulkhead_tokens::Operation;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::api::ControlRequest;
use crate::hosts::HostClient;
use crate::repo::{InstanceRow, Repository, VolumeRow};
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
    /// Every header whose value is visible ASCII, in arrival order (SigV4 signs a chosen set).
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: String,
    pub access_key_id: String,
    /// The signed request, forwarded to the KMS as the customer's own authorization.
    pub forwarded: CustomerRequest,
}

pub struct ControlPlane {
    pub repo: Arc<dyn Repository>,
    pub(crate) root: Key32,
    pub(crate) kms: HttpsClient,
    pub(crate) kms_addr: String,
    pub(crate) hosts: HostClient,
    /// host id → 38-byte host public key file.
    pub(crate) host_keys: BTreeMap<String, Vec<u8>>,
    pub(crate) audit: AuditLog,
    pub(crate) placement: tokio::sync::Mutex<()>,
    /// When set, instances are placed only on hosts that attested (fresh TPM quote of a signed
    /// release's measurements) within [`ATTESTATION_TTL`].
    pub(crate) attestation: Option<std::sync::Mutex<Verifier>>,
    pub(crate) attested: std::sync::Mutex<HashMap<String, Instant>>,
    /// host id → the key its audit checkpoints must verify under (fleet monitoring).
    pub(crate) audit_keys: BTreeMap<String, bulkhead_audit::CheckpointKey>,
    /// Hosts whose pulled audit failed a check, and the rule (their pulls stop).
    pub(crate) fleet: crate::fleet::FleetMonitor,
    /// This replica's id and workflow lease ([`crate::workflow::Lease`]).
    pub(crate) lease: crate::workflow::Lease,
    /// The EC2 Query API's region (what SigV4 scopes must name).
    pub(crate) region: String,
}

pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long a host's successful attestation lets the scheduler place work on it.
pub const ATTESTATION_TTL: Duration = Duration::from_secs(60);

pub(crate) fn instance_json(i: &InstanceRow) -> Value {
    json!({
        "InstanceId": i.instance_id,
        "ImageId": i.image_id,
        "State": i.state.as_str(),
        "LaunchTime": i.created,
        "VcpuCount": i.vcpus,
        "MemoryMiB": i.memory_mib,
        "Cores": i.cores,
        "Tenancy": if i.dedicated { "dedicated" } else { "default" },
    })
}

pub(crate) fn volume_json(v: &VolumeRow) -> Value {
    json!({
        "VolumeId": v.volume_id,
        "SizeGiB": v.size_gib,
        "Encrypted": true,
        "KmsKeyId": v.kms_key_id,
        "State": v.state.as_str(),
        "InstanceId": v.instance_id,
        "CreateTime": v.created,
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
            fleet: crate::fleet::FleetMonitor::default(),
            lease: crate::workflow::Lease::default(),
            region: crate::config::DEFAULT_REGION.to_string(),
        }
    }

    /// The region of the EC2 Query API (SigV4 credential scopes must name it).
    pub fn with_region(mut self, region: &str) -> ControlPlane {
        self.region = region.to_string();
        self
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// Places instances only on hosts that attest against `verifier` (the same policy the KMS
    /// enforces before releasing a volume key).
    pub fn with_attestation(mut self, verifier: Verifier) -> ControlPlane {
        self.attestation = Some(std::sync::Mutex::new(verifier));
        self
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

    /// The central monitoring rules' thresholds (`fleet-rules.toml`).
    pub fn with_fleet_rules(mut self, rules: crate::fleet::Rules) -> Self {
        self.fleet = crate::fleet::FleetMonitor::new(rules);
        self
    }

    /// Prometheus text of the central monitoring (operators' API).
    pub fn fleet_metrics(&self) -> String {
        let hosts: Vec<String> = self
            .repo
            .hosts()
            .unwrap_or_default()
            .into_iter()
            .map(|h| h.host_id)
            .collect();
        self.fleet.render_metrics(&hosts)
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
        match self.perform(&request_id, &caller, req, &r.body).await {
            Ok(v) => (200, v),
            Err(e) => error_body(&e, &request_id),
        }
    }

    /// One authenticated, parsed call, whichever front end it came through (the JSON API or the
    /// EC2 Query API): audit the decision durably, honour the idempotency token (`body` is what
    /// was signed: its hash tells a retry from a different call), act, audit the outcome.
    pub(crate) async fn perform(
        &self,
        request_id: &str,
        caller: &Caller,
        req: ControlRequest,
        body: &str,
    ) -> Result<Value, ControlError> {
        let who = (caller.tenant.as_str(), caller.access_key_id.as_str());
        self.audit(
            EntryKind::Request,
            request_id,
            who,
            req.action(),
            vec![format!("tenant:{}", caller.tenant)],
            Some(body),
            "ok",
        )
        .await?;
        let idem = req
            .client_token()
            .map(|t| (t.to_string(), hex::encode(Sha256::digest(body.as_bytes()))));
        if let Some((token, hash)) = &idem {
            match self.repo.idempotency(&caller.tenant, req.action(), token) {
                Ok(Some((h, resp))) if &h == hash => {
                    let v = serde_json::from_str(&resp).unwrap_or(Value::Null);
                    let _ = self
                        .audit(
                            EntryKind::Outcome,
                            request_id,
                            who,
                            req.action(),
                            vec![],
                            None,
                            "idempotent_replay",
                        )
                        .await;
                    return Ok(v);
                }
                Ok(Some(_)) => return Err(ControlError::IdempotencyMismatch),
                Ok(None) => {}
                Err(e) => return Err(ControlError::Repo(e)),
            }
        }
        let action = req.action();
        let result = self.execute(caller, req).await;
        let code = match &result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        let _ = self
            .audit(
                EntryKind::Outcome,
                request_id,
                who,
                action,
                vec![],
                None,
                code,
            )
            .await;
        match &result {
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
            }
            Err(e) => {
                tracing::info!(tenant = %caller.tenant, action, request_id, code = e.code(), "refused");
            }
        }
        result
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
                let ifs = self.repo.interfaces(&c.tenant)?;
                let groups = self.repo.security_groups(&c.tenant)?;
                let out: Vec<Value> = all
                    .iter()
                    .filter(|i| {
                        r.instance_ids.is_empty() || r.instance_ids.contains(&i.instance_id)
                    })
                    .map(|i| {
                        let mut v = instance_json(i);
                        if let Some(n) = ifs.iter().find(|n| n.instance_id == i.instance_id) {
                            crate::vpcs::add_interface_json(&mut v, n, &groups);
                        }
                        v
                    })
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
            ControlRequest::DetachVolume(r) => self.detach(&c.tenant, &r.volume_id).await,
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
            ControlRequest::CreateVpc(r) => self.create_vpc(c, &r).await,
            ControlRequest::DescribeVpcs(r) => self.describe_vpcs(&c.tenant, &r.vpc_ids),
            ControlRequest::DeleteVpc(r) => self.delete_vpc(&c.tenant, &r.vpc_id),
            ControlRequest::CreateSubnet(r) => self.create_subnet(&c.tenant, &r),
            ControlRequest::DescribeSubnets(r) => self.describe_subnets(&c.tenant, &r.subnet_ids),
            ControlRequest::DeleteSubnet(r) => self.delete_subnet(&c.tenant, &r.subnet_id),
            ControlRequest::CreateSecurityGroup(r) => self.create_security_group(&c.tenant, &r),
            ControlRequest::AuthorizeSecurityGroupIngress(r) => {
                self.change_ingress(&c.tenant, &r, true).await
            }
            ControlRequest::RevokeSecurityGroupIngress(r) => {
                self.change_ingress(&c.tenant, &r, false).await
            }
            ControlRequest::DescribeSecurityGroups(r) => {
                self.describe_security_groups(&c.tenant, &r.group_ids)
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
    pub(crate) async fn kms_call(&self, op: &str, body: &Value) -> Result<Value, ControlError> {
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
}

pub(crate) fn error_body(e: &ControlError, request_id: &str) -> (u16, Value) {
    (
        e.status(),
        json!({"error": {"code": e.code(), "message": e.to_string(), "request_id": request_id}}),
    )
}
