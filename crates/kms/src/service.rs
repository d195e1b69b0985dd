//! The KMS operations. Each call is decided first (read-only checks), the decision is written to
//! the audit log and made durable, and only then is anything created, revoked or sealed.

use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bulkhead_audit::{AuditEntry, AuditLog, Decision, EntryKind};
use bulkhead_sealing::{seal_volume_key, HostPublicKey};
use bulkhead_tokens::{Identity, Role};
use serde_json::Value;

use crate::crypto::{self, DataKeyBlob, Key32};
use crate::forward::{CustomerRequest, SigV4Forwarded};
use crate::keystore::{Embedded, KeyStore};
use crate::store::{CmkRow, GrantRow, Store, VolumeSecret, VpcRow};
use crate::wire::*;
use crate::KmsError;
use bulkhead_ec2_query::bh1::{self as sigv, Authorization};
use bulkhead_kms_proto::ForwardedRequest;
use bulkhead_rot::attest::Verifier;
use bulkhead_rot_proto::HostEvidence;

/// How old a forwarded customer request may be: a forward-access session lasts minutes.
pub const FORWARD_WINDOW_SECS: u64 = 300;

pub struct Kms {
    store: Store,
    /// Wraps customer signing secrets (never CMKs when a token holds them).
    root: Key32,
    /// Where the CMKs live: wrapped under the root key (default) or in a PKCS#11 token.
    keys: Box<dyn KeyStore>,
    audit: AuditLog,
    /// `HOST_ID.pub` files (38-byte host public key files), enrolled out of band.
    hosts_dir: PathBuf,
    window_secs: u64,
    /// When set, `DecryptForHost` requires the host's fresh attestation evidence, and the key
    /// is sealed to the host key of the attested enrolment.
    attestation: Option<std::sync::Mutex<Verifier>>,
}

/// A fresh resource id, `prefix-` and 16 hex digits.
pub(crate) use bulkhead_sealing::random_id as new_id;
/// Seconds since the Unix epoch (request windows, record times).
pub use bulkhead_tokens::clock::unix_now as now;

/// Binds a wrapped VPC epoch key to its VPC and epoch.
fn vpc_aad(vpc_id: &str, epoch: u32) -> Vec<u8> {
    let mut a = b"bulkhead vpc epoch key v1\0".to_vec();
    a.extend_from_slice(vpc_id.as_bytes());
    a.push(0);
    a.extend_from_slice(&epoch.to_be_bytes());
    a
}

/// The single-use mark of a forwarded `RunInstances` authorization sealing a VPC key for one
/// instance (kept apart from the marks of volume-key authorizations).
fn vpc_seal_mark(signature: &str, instance: &str) -> String {
    format!("{signature}/seal-vpc-key/{instance}")
}

/// AAD of a volume's crypto-erase secret, wrapped under the root key.
fn volume_secret_aad(volume_id: &str) -> Vec<u8> {
    let mut aad = b"bulkhead volume secret v1\0".to_vec();
    aad.extend_from_slice(volume_id.as_bytes());
    aad
}

fn cust_aad(akid: &str) -> Vec<u8> {
    let mut a = b"bulkhead customer secret v1\0".to_vec();
    a.extend_from_slice(akid.as_bytes());
    a
}

/// For a refused call's audit record: the (well-formed) identifiers the body claims to be about.
fn claimed_resources(body: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    [
        ("key_id", "key"),
        ("volume_id", "volume"),
        ("host_id", "host"),
        ("tenant_id", "tenant"),
        ("vpc_id", "vpc"),
        ("instance_id", "instance"),
    ]
    .iter()
    .filter_map(|(field, kind)| {
        let id = v.get(field)?.as_str()?;
        crate::valid_id(id).then(|| format!("{kind}:{id}"))
    })
    .collect()
}

/// `vpc-` and then an identifier.
fn valid_vpc_id(s: &str) -> bool {
    s.starts_with("vpc-") && crate::valid_id(s)
}

/// A customer authenticated by a forwarded signed request.
#[derive(Debug)]
struct Customer {
    tenant: String,
    /// The action the customer signed (one of those the call allows).
    action: String,
    body: Value,
    /// The request signature, hex: what makes one authorization single-use.
    signature: String,
}

/// What a decided request will do once audited.
enum Plan {
    Register {
        akid: String,
        tenant: String,
        wrapped: Vec<u8>,
    },
    CreateKey {
        tenant: String,
        description: String,
    },
    Generate {
        tenant: String,
        key: Option<CmkRow>,
        volume: String,
        /// The customer's CreateVolume signature: used once, for this one volume.
        authorization: String,
    },
    Decrypt {
        blob: DataKeyBlob,
        cmk: CmkRow,
        volume: String,
        host: HostPublicKey,
        grant_id: String,
        /// Consumed atomically before the key is opened.
        authorization: String,
    },
    Challenge {
        host: String,
    },
    /// `member` joins `source`'s key family (a snapshot, or a volume made from one).
    Share {
        tenant: String,
        blob: DataKeyBlob,
        cmk: CmkRow,
        source: String,
        member: String,
        /// The customer's CreateSnapshot / CreateVolume signature: used once.
        authorization: String,
    },
    /// Crypto-erase of one volume's data key.
    Destroy {
        tenant: String,
        volume: String,
        authorization: String,
        /// Nothing named the id when decided: it is tombstoned for `tenant` (so a late
        /// `ShareDataKey` or `GenerateDataKey` for it is refused, whatever the clocks say) and
        /// answered `no_grant` as before. Ids are random, and a tombstone only stops a future key
        /// for that one id, never an existing one: no other tenant can be blocked by it.
        unknown: bool,
    },
    Revoke {
        key_id: String,
        tenant: String,
        volume: String,
    },
    CreateVpc {
        row: VpcRow,
    },
    /// A retried `CreateVpcKey` for a VPC this tenant already has: answered, nothing made.
    VpcExisting {
        row: VpcRow,
    },
    SealVpc {
        vpc_number: u32,
        vpc_id: String,
        epoch: u32,
        wrapped: Vec<u8>,
        host: HostPublicKey,
        /// [`vpc_seal_mark`]: consumed atomically before the key is opened.
        mark: String,
    },
}

/// The id a verified key-family action names, by the action signed: the volume of a
/// CreateSnapshot or DeleteVolume, the snapshot of a CreateVolume (from a snapshot) or
/// DeleteSnapshot. `None` for any other action or a body without that field.
fn family_target(c: &Customer) -> Option<String> {
    let field = match c.action.as_str() {
        "CreateSnapshot" | "DeleteVolume" => "VolumeId",
        "CreateVolume" | "DeleteSnapshot" => "SnapshotId",
        _ => return None,
    };
    c.body
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Who may crypto-erase an id: its owner, nobody but another tenant, or nobody yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EraseOwner {
    Owner,
    Other,
    /// No member, secret, tombstone or grant of the signer's names it.
    Unknown,
}

impl Kms {
    pub fn new(
        store: Store,
        root: Key32,
        audit: AuditLog,
        hosts_dir: PathBuf,
    ) -> Result<Kms, KmsError> {
        let mut copy = Key32::new().map_err(crypto::CryptoError::from)?;
        copy.as_mut().copy_from_slice(root.as_ref());
        Ok(Kms {
            store,
            keys: Box::new(Embedded::new(copy)),
            root,
            audit,
            hosts_dir,
            window_secs: FORWARD_WINDOW_SECS,
            attestation: None,
        })
    }

    /// Keeps CMKs in `keys` (e.g. a PKCS#11 token) instead of the embedded store.
    pub fn with_keystore(mut self, keys: Box<dyn KeyStore>) -> Kms {
        self.keys = keys;
        self
    }

    /// Requires attestation for every `DecryptForHost`, checked by `verifier` (its enrolments
    /// and accepted releases).
    pub fn with_attestation(mut self, verifier: Verifier) -> Kms {
        self.attestation = Some(std::sync::Mutex::new(verifier));
        self
    }

    fn verifier(&self) -> Option<std::sync::MutexGuard<'_, Verifier>> {
        self.attestation
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Shortens the forward-access window (tests).
    pub fn with_window(mut self, secs: u64) -> Kms {
        self.window_secs = secs;
        self
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Handles one parsed call from an authenticated peer. Returns the JSON response.
    pub async fn handle(&self, peer: &Identity, op: KmsOp, body: &[u8]) -> Result<Value, KmsError> {
        let request_id = new_id("req");
        // Claim 2: bodies carry customers' forwarded requests; no digest of them is recorded.
        let params_sha256: Option<String> = None;
        let decided = if peer.role != Role::ControlPlane {
            Err(KmsError::CallerNotAllowed)
        } else {
            self.decide(op, body)
        };
        let (resources, code) = match &decided {
            Ok((res, _)) => (res.clone(), "ok".to_string()),
            Err(e) => (claimed_resources(body), e.code().to_string()),
        };
        let entry = AuditEntry {
            kind: EntryKind::Request,
            request_id: request_id.clone(),
            caller: peer.name.clone(),
            cert_sha256: Some(peer.cert_sha256.clone()),
            token_id: None,
            op: op.name().to_string(),
            resources: resources.clone(),
            params_sha256,
            decision: if decided.is_ok() {
                Decision::Allow
            } else {
                Decision::Deny
            },
            code,
        };
        if let Err(e) = self.audit.append(entry.clone()).await {
            tracing::error!(error = %e, "audit log unavailable: refusing");
            return Err(KmsError::AuditUnavailable);
        }
        let (_, plan) = decided?;
        let result = self.execute(plan);
        self.audit.append_queued(AuditEntry {
            kind: EntryKind::Outcome,
            decision: Decision::None,
            code: match &result {
                Ok(_) => "ok".into(),
                Err(e) => e.code().into(),
            },
            params_sha256: None,
            ..entry
        });
        tracing::info!(op = op.name(), caller = %peer.name, request_id, ok = result.is_ok(), "kms call");
        result
    }

    /// Spends a customer's forwarded authorization (atomically, once); its time is `now`.
    fn spend(&self, authorization: &str) -> Result<u64, KmsError> {
        let t = now();
        let forget = t.saturating_sub(self.window_secs.saturating_mul(2));
        if !self.store.consume_authorization(authorization, t, forget)? {
            return Err(KmsError::AuthorizationReplayed);
        }
        Ok(t)
    }

    fn forwarded(&self, f: &CustomerRequest, action: &str) -> Result<Customer, KmsError> {
        self.forwarded_any(f, &[action])
    }

    /// A forwarded signed request for any one of `actions`, of either protocol.
    fn forwarded_any(&self, f: &CustomerRequest, actions: &[&str]) -> Result<Customer, KmsError> {
        match f {
            CustomerRequest::Bh1(f) => self.forwarded_bh1(f, actions),
            CustomerRequest::SigV4(e) => self.forwarded_sigv4(&e.sigv4, actions),
        }
    }

    /// A customer's secret, unwrapped, by access key id (`None`: unknown key).
    fn customer_secret(&self, akid: &str) -> Result<Option<(String, Key32)>, KmsError> {
        let Some((tenant, wrapped)) = self.store.customer(akid)? else {
            return Ok(None);
        };
        let secret = crypto::unwrap::<32>(&self.root, &cust_aad(akid), &wrapped)?;
        Ok(Some((tenant, secret)))
    }

    /// An EC2 Query request signed with SigV4, verified here with the KMS's own copy of the
    /// signer's secret (`crate::forward`).
    fn forwarded_sigv4(&self, f: &SigV4Forwarded, actions: &[&str]) -> Result<Customer, KmsError> {
        let akid = crate::forward::access_key_of(f).map_err(KmsError::ForwardedSigV4)?;
        let (tenant, secret) = self
            .customer_secret(&akid)?
            .ok_or(KmsError::ForwardedSigV4(
                crate::forward::ForwardError::Signature(
                    bulkhead_ec2_query::SigV4Error::UnknownAccessKey,
                ),
            ))?;
        let v = crate::forward::verify(
            f,
            bulkhead_ec2_query::SecretKey::from_raw_secret(secret.as_ref()),
            now(),
            self.window_secs,
            actions,
        )
        .map_err(|e| match e {
            crate::forward::ForwardError::Signature(
                bulkhead_ec2_query::SigV4Error::OutsideWindow { .. },
            ) => KmsError::AuthorizationNotRecent,
            e => KmsError::ForwardedSigV4(e),
        })?;
        Ok(Customer {
            tenant,
            action: v.action.to_string(),
            body: v.body,
            signature: hex::encode(v.signature),
        })
    }

    fn forwarded_bh1(&self, f: &ForwardedRequest, actions: &[&str]) -> Result<Customer, KmsError> {
        let auth = Authorization::parse(&f.authorization).map_err(KmsError::Signature)?;
        let (tenant, secret) = self
            .customer_secret(&auth.access_key_id)?
            .ok_or(KmsError::Signature(sigv::SigError::UnknownAccessKey))?;
        sigv::verify(&auth, secret.as_ref(), &f.parts, now(), self.window_secs).map_err(
            |e| match e {
                sigv::SigError::Stale => KmsError::AuthorizationNotRecent,
                e => KmsError::Signature(e),
            },
        )?;
        let action = actions
            .iter()
            .find(|action| f.parts.path == format!("/v1/{action}"))
            .filter(|_| f.parts.method == "POST")
            .ok_or(KmsError::WrongCustomerAction)?;
        let body: Value =
            serde_json::from_str(&f.parts.body).map_err(|_| KmsError::WrongCustomerAction)?;
        Ok(Customer {
            tenant,
            action: (*action).to_string(),
            body,
            signature: hex::encode(auth.signature),
        })
    }

    /// Whether `tenant` owns `volume_id` for a crypto-erase.
    fn erase_owner(&self, tenant: &str, volume_id: &str) -> Result<EraseOwner, KmsError> {
        Ok(match self.store.volume_secret(volume_id)? {
            VolumeSecret::Live { tenant_id, .. } | VolumeSecret::Destroyed { tenant_id } => {
                if tenant_id == tenant {
                    EraseOwner::Owner
                } else {
                    EraseOwner::Other
                }
            }
            // A volume keyed before families has only grants.
            VolumeSecret::Unknown if self.store.tenant_has_volume_grant(tenant, volume_id)? => {
                EraseOwner::Owner
            }
            VolumeSecret::Unknown => EraseOwner::Unknown,
        })
    }

    fn owned_key(&self, key_id: &str, tenant: &str) -> Result<CmkRow, KmsError> {
        match self.store.cmk(key_id)? {
            Some(k) if k.tenant_id == tenant => Ok(k),
            // Another tenant's key is indistinguishable from a missing one.
            _ => Err(KmsError::NoSuchKey),
        }
    }

    fn presented_key(&self, presented_b64: &str) -> Result<HostPublicKey, KmsError> {
        let presented = B64
            .decode(presented_b64)
            .map_err(|_| KmsError::BadRequest("host_public_key"))?;
        HostPublicKey::from_file_bytes(&presented)
            .map_err(|_| KmsError::BadRequest("host_public_key"))
    }

    /// Without attestation: the presented key must be the one enrolled out of band.
    fn host_key(&self, host_id: &str, presented_b64: &str) -> Result<HostPublicKey, KmsError> {
        if !bulkhead_tokens::pki::valid_name(host_id) {
            return Err(KmsError::BadRequest("host_id"));
        }
        let presented = self.presented_key(presented_b64)?;
        let enrolled = std::fs::read(self.hosts_dir.join(format!("{host_id}.pub")))
            .ok()
            .and_then(|raw| HostPublicKey::from_file_bytes(&raw).ok())
            .ok_or(KmsError::UnknownHost)?;
        if enrolled != presented {
            return Err(KmsError::HostKeyMismatch);
        }
        Ok(presented)
    }

    /// The host key a key may be sealed to for `instance` on `host_id`. With attestation: the
    /// host's fresh quote must verify and be bound to `instance` (qualifying data =
    /// SHA-256(nonce || instance), which the host's controller quotes only for an instance it
    /// runs), and the key is that of the attested enrolment. Without: the enrolled key file.
    ///
    /// A sealed host presents boot evidence: the same nonce and instance binding, and its whole
    /// boot chain must match its enrolment's exact PCR values (image manifest and configuration
    /// disk) under its EK-certified AK (`Verifier::verify_boot_for_instance`); a mismatch
    /// releases nothing.
    fn host_for_instance(
        &self,
        evidence: Option<&HostEvidence>,
        host_id: &str,
        presented_b64: &str,
        instance: &str,
    ) -> Result<HostPublicKey, KmsError> {
        match self.verifier() {
            Some(mut v) => {
                let ev = evidence.ok_or(KmsError::AttestationRequired)?;
                if ev.host() != host_id {
                    return Err(KmsError::EvidenceForAnotherHost);
                }
                let ok = match ev {
                    HostEvidence::Measured(ev) => v.verify_for_instance(ev, instance),
                    HostEvidence::Boot(ev) => v.verify_boot_for_instance(ev, instance),
                }
                .map_err(KmsError::Attestation)?;
                let enrolled = hex::decode(&ok.host_public)
                    .ok()
                    .and_then(|raw| HostPublicKey::from_file_bytes(&raw).ok())
                    .ok_or(KmsError::Internal)?;
                if self.presented_key(presented_b64)? != enrolled {
                    return Err(KmsError::HostKeyMismatch);
                }
                Ok(enrolled)
            }
            None => self.host_key(host_id, presented_b64),
        }
    }

    fn decide(&self, op: KmsOp, body: &[u8]) -> Result<(Vec<String>, Plan), KmsError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(KmsError::BodyTooLarge);
        }
        fn parse<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, KmsError> {
            serde_json::from_slice(b).map_err(|_| KmsError::BadBody)
        }
        let str_field = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        match op {
            KmsOp::RegisterCustomer => {
                let r: RegisterCustomerRequest = parse(body)?;
                if !crate::valid_id(&r.tenant_id) || !crate::valid_akid(&r.access_key_id) {
                    return Err(KmsError::BadRequest("tenant_id/access_key_id"));
                }
                let secret = zeroize::Zeroizing::new(
                    B64.decode(&r.secret)
                        .map_err(|_| KmsError::BadRequest("secret"))?,
                );
                if secret.len() != 32 {
                    return Err(KmsError::BadRequest("secret"));
                }
                if self.store.customer(&r.access_key_id)?.is_some()
                    || self.store.tenant_has_customer(&r.tenant_id)?
                {
                    return Err(KmsError::CustomerExists);
                }
                let wrapped = crypto::wrap(&self.root, &cust_aad(&r.access_key_id), &secret)?;
                Ok((
                    vec![
                        format!("tenant:{}", r.tenant_id),
                        format!("access_key:{}", r.access_key_id),
                    ],
                    Plan::Register {
                        akid: r.access_key_id,
                        tenant: r.tenant_id,
                        wrapped,
                    },
                ))
            }
            KmsOp::CreateKey => {
                let r: CreateKeyRequest = parse(body)?;
                let c = self.forwarded(&r.customer_request, "CreateKey")?;
                let description = str_field(&c.body, "Description").unwrap_or_default();
                if description.len() > 256 {
                    return Err(KmsError::BadRequest("Description"));
                }
                Ok((
                    vec![format!("tenant:{}", c.tenant)],
                    Plan::CreateKey {
                        tenant: c.tenant,
                        description,
                    },
                ))
            }
            KmsOp::GenerateDataKey => {
                let r: GenerateDataKeyRequest = parse(body)?;
                if !crate::valid_id(&r.volume_id) {
                    return Err(KmsError::BadRequest("volume_id"));
                }
                let c = self.forwarded(&r.customer_request, "CreateVolume")?;
                // A CreateVolume from a snapshot joins the snapshot's family (ShareDataKey); it
                // never authorizes a fresh data key.
                if c.body.get("SnapshotId").is_some() {
                    return Err(KmsError::WrongCustomerAction);
                }
                // One signed CreateVolume, one volume: the authorization is used once (below,
                // atomically), so it creates a grant for exactly the one volume id it came with.
                if self.store.authorization_used(&c.signature)? {
                    return Err(KmsError::AuthorizationReplayed);
                }
                let signed_key = str_field(&c.body, "KmsKeyId");
                if signed_key != r.key_id {
                    return Err(KmsError::WrongCustomerAction);
                }
                let key = match &r.key_id {
                    Some(k) => Some(self.owned_key(k, &c.tenant)?),
                    None => None,
                };
                let mut res = vec![
                    format!("tenant:{}", c.tenant),
                    format!("volume:{}", r.volume_id),
                ];
                if let Some(k) = &key {
                    res.push(format!("key:{}", k.key_id));
                }
                Ok((
                    res,
                    Plan::Generate {
                        tenant: c.tenant,
                        key,
                        volume: r.volume_id,
                        authorization: c.signature,
                    },
                ))
            }
            KmsOp::DecryptForHost => {
                let r: DecryptForHostRequest = parse(body)?;
                if !crate::valid_id(&r.volume_id) {
                    return Err(KmsError::BadRequest("volume_id"));
                }
                let c = self.forwarded(&r.customer_request, "AttachVolume")?;
                if str_field(&c.body, "VolumeId").as_deref() != Some(r.volume_id.as_str()) {
                    return Err(KmsError::WrongCustomerAction);
                }
                let raw = B64
                    .decode(&r.ciphertext_blob)
                    .map_err(|_| KmsError::BadRequest("ciphertext_blob"))?;
                let blob = DataKeyBlob::parse(&raw)?;
                let cmk = self.owned_key(&blob.key_id, &c.tenant)?;
                if matches!(
                    self.store.volume_secret(&r.volume_id)?,
                    VolumeSecret::Destroyed { .. }
                ) {
                    return Err(KmsError::KeyDestroyed);
                }
                let grant_id = self
                    .store
                    .active_grant(&cmk.key_id, &c.tenant, &r.volume_id)?
                    .ok_or(KmsError::NoGrant)?;
                if self.store.authorization_used(&c.signature)? {
                    return Err(KmsError::AuthorizationReplayed);
                }
                // The key goes to the host that runs the instance the customer named in the
                // signed AttachVolume.
                let host = if self.attestation.is_some() {
                    let instance =
                        str_field(&c.body, "InstanceId").ok_or(KmsError::WrongCustomerAction)?;
                    self.host_for_instance(
                        r.evidence.as_ref(),
                        &r.host_id,
                        &r.host_public_key,
                        &instance,
                    )?
                } else {
                    self.host_key(&r.host_id, &r.host_public_key)?
                };
                Ok((
                    vec![
                        format!("tenant:{}", c.tenant),
                        format!("key:{}", cmk.key_id),
                        format!("volume:{}", r.volume_id),
                        format!("host:{}", r.host_id),
                        format!("grant:{grant_id}"),
                    ],
                    Plan::Decrypt {
                        blob,
                        cmk,
                        volume: r.volume_id,
                        host,
                        grant_id,
                        authorization: c.signature,
                    },
                ))
            }
            KmsOp::Challenge => {
                let r: ChallengeRequest = parse(body)?;
                if !bulkhead_tokens::pki::valid_name(&r.host_id) {
                    return Err(KmsError::BadRequest("host_id"));
                }
                if let Some(v) = self.verifier() {
                    if !v.is_enrolled(&r.host_id) {
                        return Err(KmsError::UnknownHost);
                    }
                }
                Ok((
                    vec![format!("host:{}", r.host_id)],
                    Plan::Challenge { host: r.host_id },
                ))
            }
            KmsOp::CreateVpcKey => {
                let r: CreateVpcKeyRequest = parse(body)?;
                if !valid_vpc_id(&r.vpc_id) {
                    return Err(KmsError::BadRequest("vpc_id"));
                }
                if r.vpc_number == 0 {
                    return Err(KmsError::BadRequest("vpc_number"));
                }
                let c = self.forwarded_any(&r.customer_request, CREATE_VPC_ACTIONS)?;
                let row = VpcRow {
                    vpc_id: r.vpc_id,
                    vpc_number: r.vpc_number,
                    tenant_id: c.tenant,
                };
                let res = vec![
                    format!("tenant:{}", row.tenant_id),
                    format!("vpc:{}", row.vpc_id),
                ];
                match self.store.vpc(&row.vpc_id, row.vpc_number)? {
                    // The control plane retrying the same VPC for the same owner.
                    Some(v) if v == row => Ok((res, Plan::VpcExisting { row })),
                    Some(_) => Err(KmsError::VpcExists),
                    None => Ok((res, Plan::CreateVpc { row })),
                }
            }
            KmsOp::SealVpcKey => {
                let r: SealVpcKeyRequest = parse(body)?;
                if !valid_vpc_id(&r.vpc_id) {
                    return Err(KmsError::BadRequest("vpc_id"));
                }
                if !crate::valid_id(&r.instance_id) {
                    return Err(KmsError::BadRequest("instance_id"));
                }
                let c = self.forwarded(&r.customer_request, "RunInstances")?;
                // Another tenant's VPC is indistinguishable from a missing one.
                let vpc = self
                    .store
                    .vpc_by_id(&r.vpc_id)?
                    .filter(|v| v.tenant_id == c.tenant)
                    .ok_or(KmsError::NoSuchVpc)?;
                let wrapped = self
                    .store
                    .vpc_epoch(&vpc.vpc_id, r.epoch)?
                    .ok_or(KmsError::NoSuchEpoch)?;
                // One signed RunInstances seals the VPC key once per instance it launches.
                let mark = vpc_seal_mark(&c.signature, &r.instance_id);
                if self.store.authorization_used(&mark)? {
                    return Err(KmsError::AuthorizationReplayed);
                }
                let host = self.host_for_instance(
                    r.evidence.as_ref(),
                    &r.host_id,
                    &r.host_public_key,
                    &r.instance_id,
                )?;
                Ok((
                    vec![
                        format!("tenant:{}", c.tenant),
                        format!("vpc:{}", vpc.vpc_id),
                        format!("epoch:{}", r.epoch),
                        format!("instance:{}", r.instance_id),
                        format!("host:{}", r.host_id),
                    ],
                    Plan::SealVpc {
                        vpc_number: vpc.vpc_number,
                        vpc_id: vpc.vpc_id,
                        epoch: r.epoch,
                        wrapped,
                        host,
                        mark,
                    },
                ))
            }
            KmsOp::ShareDataKey => {
                let r: ShareDataKeyRequest = parse(body)?;
                if !crate::valid_id(&r.source_id) {
                    return Err(KmsError::BadRequest("source_id"));
                }
                if !crate::valid_id(&r.member_id) || r.member_id == r.source_id {
                    return Err(KmsError::BadRequest("member_id"));
                }
                let c = self.forwarded_any(&r.customer_request, SHARE_DATA_KEY_ACTIONS)?;
                if family_target(&c).as_deref() != Some(r.source_id.as_str()) {
                    return Err(KmsError::WrongCustomerAction);
                }
                if self.store.authorization_used(&c.signature)? {
                    return Err(KmsError::AuthorizationReplayed);
                }
                let raw = B64
                    .decode(&r.ciphertext_blob)
                    .map_err(|_| KmsError::BadRequest("ciphertext_blob"))?;
                let blob = DataKeyBlob::parse(&raw)?;
                let cmk = self.owned_key(&blob.key_id, &c.tenant)?;
                // The source must be a live member the signer owns: a destroyed one is gone for
                // everybody (410), another tenant's is no grant.
                match self.store.volume_secret(&r.source_id)? {
                    VolumeSecret::Live { tenant_id, .. } if tenant_id == c.tenant => {}
                    VolumeSecret::Destroyed { .. } => return Err(KmsError::KeyDestroyed),
                    _ => return Err(KmsError::NoGrant),
                }
                Ok((
                    vec![
                        format!("tenant:{}", c.tenant),
                        format!("key:{}", cmk.key_id),
                        format!("source:{}", r.source_id),
                        format!("member:{}", r.member_id),
                    ],
                    Plan::Share {
                        tenant: c.tenant,
                        blob,
                        cmk,
                        source: r.source_id,
                        member: r.member_id,
                        authorization: c.signature,
                    },
                ))
            }
            KmsOp::DestroyDataKey => {
                let r: DestroyDataKeyRequest = parse(body)?;
                if !crate::valid_id(&r.volume_id) {
                    return Err(KmsError::BadRequest("volume_id"));
                }
                // A snapshot (a key-family member) goes on its owner's signed DeleteSnapshot.
                let c = self.forwarded_any(&r.customer_request, DESTROY_DATA_KEY_ACTIONS)?;
                if family_target(&c).as_deref() != Some(r.volume_id.as_str()) {
                    return Err(KmsError::WrongCustomerAction);
                }
                // Only the volume's owner erases it; a repeat by the owner is answered again. An
                // id nothing names is tombstoned for the signer (see `Plan::Destroy::unknown`).
                let owner = self.erase_owner(&c.tenant, &r.volume_id)?;
                if owner == EraseOwner::Other {
                    return Err(KmsError::NoGrant);
                }
                if self.store.authorization_used(&c.signature)? {
                    return Err(KmsError::AuthorizationReplayed);
                }
                Ok((
                    vec![
                        format!("tenant:{}", c.tenant),
                        format!("volume:{}", r.volume_id),
                    ],
                    Plan::Destroy {
                        tenant: c.tenant,
                        volume: r.volume_id,
                        authorization: c.signature,
                        unknown: owner == EraseOwner::Unknown,
                    },
                ))
            }
            KmsOp::RevokeGrant => {
                let r: RevokeGrantRequest = parse(body)?;
                let c = self.forwarded(&r.customer_request, "RevokeGrant")?;
                if str_field(&c.body, "KeyId").as_deref() != Some(r.key_id.as_str())
                    || str_field(&c.body, "VolumeId").as_deref() != Some(r.volume_id.as_str())
                {
                    return Err(KmsError::WrongCustomerAction);
                }
                let key = self.owned_key(&r.key_id, &c.tenant)?;
                Ok((
                    vec![
                        format!("tenant:{}", c.tenant),
                        format!("key:{}", key.key_id),
                        format!("volume:{}", r.volume_id),
                    ],
                    Plan::Revoke {
                        key_id: key.key_id,
                        tenant: c.tenant,
                        volume: r.volume_id,
                    },
                ))
            }
        }
    }

    fn create_cmk(&self, tenant: &str, description: &str) -> Result<CmkRow, KmsError> {
        let key_id = new_id("key");
        let row = CmkRow {
            wrapped: self.keys.create(&key_id)?,
            key_id,
            tenant_id: tenant.to_string(),
            description: description.to_string(),
            created: now(),
        };
        self.store.insert_cmk(&row)?;
        Ok(row)
    }

    fn execute(&self, plan: Plan) -> Result<Value, KmsError> {
        match plan {
            Plan::Register {
                akid,
                tenant,
                wrapped,
            } => {
                if !self
                    .store
                    .insert_customer(&akid, &tenant, &wrapped, now())?
                {
                    return Err(KmsError::CustomerExists);
                }
                Ok(serde_json::json!({}))
            }
            Plan::CreateKey {
                tenant,
                description,
            } => {
                let row = self.create_cmk(&tenant, &description)?;
                Ok(
                    serde_json::to_value(CreateKeyResponse { key_id: row.key_id })
                        .map_err(|_| KmsError::Internal)?,
                )
            }
            Plan::Generate {
                tenant,
                key,
                volume,
                authorization,
            } => {
                self.spend(&authorization)?;
                let key = match key {
                    Some(k) => k,
                    None => self.default_key(&tenant)?,
                };
                let (blob, secret) =
                    DataKeyBlob::generate(self.keys.as_ref(), &key.wrapped, &key.key_id, &volume)?;
                let wrapped_secret =
                    crypto::wrap(&self.root, &volume_secret_aad(&volume), secret.as_ref())?;
                drop(secret);
                if !self
                    .store
                    .insert_volume_secret(&volume, &tenant, &wrapped_secret, now())?
                {
                    return Err(KmsError::BadRequest("volume_id"));
                }
                let grant_id = match self.store.active_grant(&key.key_id, &tenant, &volume)? {
                    Some(g) => g,
                    None => {
                        let g = GrantRow {
                            grant_id: new_id("grant"),
                            key_id: key.key_id.clone(),
                            tenant_id: tenant,
                            volume_id: volume,
                            revoked: false,
                        };
                        self.store.insert_grant(&g, now())?;
                        g.grant_id
                    }
                };
                Ok(serde_json::to_value(GenerateDataKeyResponse {
                    key_id: key.key_id,
                    ciphertext_blob: B64.encode(blob.to_bytes()),
                    grant_id,
                })
                .map_err(|_| KmsError::Internal)?)
            }
            Plan::Decrypt {
                blob,
                cmk,
                volume,
                host,
                grant_id,
                authorization,
            } => {
                self.spend(&authorization)?;
                // A volume made from a snapshot opens its family's blob (bound to the family id)
                // and gets the key sealed for its own id.
                let (family, secret) = match self.store.volume_secret(&volume)? {
                    VolumeSecret::Live {
                        tenant_id,
                        family_id,
                        wrapped,
                    } if tenant_id == cmk.tenant_id => {
                        let s = crypto::unwrap::<{ crypto::VOLUME_SECRET_LEN }>(
                            &self.root,
                            &volume_secret_aad(&family_id),
                            &wrapped,
                        )?;
                        (family_id, Some(s))
                    }
                    VolumeSecret::Live { .. } => return Err(KmsError::NoGrant),
                    VolumeSecret::Destroyed { .. } => return Err(KmsError::KeyDestroyed),
                    VolumeSecret::Unknown => (volume.clone(), None),
                };
                let dk = blob.open(
                    self.keys.as_ref(),
                    &cmk.wrapped,
                    &family,
                    secret.as_ref().map(|s| s.as_ref()),
                )?;
                drop(secret);
                let sealed =
                    seal_volume_key(&host, &volume, dk.as_ref()).map_err(|_| KmsError::Internal)?;
                drop(dk);
                let sealed_key = SealedBlob::from_slice(&sealed).ok_or(KmsError::Internal)?;
                Ok(serde_json::to_value(DecryptForHostResponse {
                    sealed_key,
                    grant_id,
                })
                .map_err(|_| KmsError::Internal)?)
            }
            Plan::Challenge { host } => {
                let resp = match self.verifier() {
                    Some(mut v) => ChallengeResponse {
                        nonce: hex::encode(v.challenge(&host).map_err(|_| KmsError::Internal)?),
                        required: true,
                    },
                    None => ChallengeResponse {
                        nonce: String::new(),
                        required: false,
                    },
                };
                Ok(serde_json::to_value(resp).map_err(|_| KmsError::Internal)?)
            }
            Plan::Share {
                tenant,
                blob,
                cmk,
                source,
                member,
                authorization,
            } => {
                self.spend(&authorization)?;
                // The blob must be the family's: it opens with the family's secret.
                let VolumeSecret::Live {
                    tenant_id,
                    family_id,
                    wrapped,
                } = self.store.volume_secret(&source)?
                else {
                    return Err(KmsError::KeyDestroyed);
                };
                if tenant_id != tenant {
                    return Err(KmsError::NoGrant);
                }
                let secret = crypto::unwrap::<{ crypto::VOLUME_SECRET_LEN }>(
                    &self.root,
                    &volume_secret_aad(&family_id),
                    &wrapped,
                )?;
                let dk = blob.open(
                    self.keys.as_ref(),
                    &cmk.wrapped,
                    &family_id,
                    Some(secret.as_ref()),
                )?;
                drop(dk);
                drop(secret);
                let grant = GrantRow {
                    grant_id: new_id("grant"),
                    key_id: cmk.key_id.clone(),
                    tenant_id: tenant.clone(),
                    volume_id: member.clone(),
                    revoked: false,
                };
                let family_id =
                    self.store
                        .add_family_member(&source, &member, &tenant, &grant, now())?;
                tracing::info!(source = %source, member = %member, family = %family_id, "key family member added");
                Ok(serde_json::to_value(ShareDataKeyResponse {
                    member_id: member,
                    family_id,
                    key_id: cmk.key_id,
                    grant_id: grant.grant_id,
                })
                .map_err(|_| KmsError::Internal)?)
            }
            Plan::Destroy {
                tenant,
                volume,
                authorization,
                unknown,
            } => {
                let t = self.spend(&authorization)?;
                if unknown {
                    if self.store.tombstone_unknown(&volume, &tenant, t)? {
                        tracing::info!(volume = %volume, tenant = %tenant, "destroy of an id never keyed: tombstoned");
                        return Err(KmsError::NoGrant);
                    }
                    // Named since decide (a racing ShareDataKey landed first): decide again.
                    match self.erase_owner(&tenant, &volume)? {
                        EraseOwner::Owner => {}
                        EraseOwner::Other | EraseOwner::Unknown => return Err(KmsError::NoGrant),
                    }
                }
                let erased = !matches!(self.store.volume_secret(&volume)?, VolumeSecret::Unknown);
                let left = self.store.destroy_volume_secret(&volume, &tenant, t)?;
                tracing::info!(volume = %volume, family_members_left = left, "data key destroyed");
                Ok(serde_json::to_value(DestroyDataKeyResponse {
                    volume_id: volume,
                    erased,
                    family_members_left: left,
                })
                .map_err(|_| KmsError::Internal)?)
            }
            Plan::Revoke {
                key_id,
                tenant,
                volume,
            } => {
                let n = self.store.revoke_grants(&key_id, &tenant, &volume, now())?;
                Ok(serde_json::to_value(RevokeGrantResponse { revoked: n })
                    .map_err(|_| KmsError::Internal)?)
            }
            Plan::CreateVpc { row } => {
                const FIRST_EPOCH: u32 = 1;
                let key = crypto::random_secret::<32>()?;
                let wrapped =
                    crypto::wrap(&self.root, &vpc_aad(&row.vpc_id, FIRST_EPOCH), key.as_ref())?;
                drop(key);
                if !self.store.insert_vpc(&row, FIRST_EPOCH, &wrapped, now())? {
                    return Err(KmsError::VpcExists);
                }
                Ok(serde_json::to_value(CreateVpcKeyResponse {
                    vpc_id: row.vpc_id,
                    vpc_number: row.vpc_number,
                    epoch: FIRST_EPOCH,
                })
                .map_err(|_| KmsError::Internal)?)
            }
            Plan::VpcExisting { row } => {
                let epoch = self
                    .store
                    .vpc_latest_epoch(&row.vpc_id)?
                    .ok_or(KmsError::Internal)?;
                Ok(serde_json::to_value(CreateVpcKeyResponse {
                    vpc_id: row.vpc_id,
                    vpc_number: row.vpc_number,
                    epoch,
                })
                .map_err(|_| KmsError::Internal)?)
            }
            Plan::SealVpc {
                vpc_number,
                vpc_id,
                epoch,
                wrapped,
                host,
                mark,
            } => {
                let t = now();
                let forget = t.saturating_sub(self.window_secs.saturating_mul(2));
                if !self.store.consume_authorization(&mark, t, forget)? {
                    return Err(KmsError::AuthorizationReplayed);
                }
                let key = crypto::unwrap::<32>(&self.root, &vpc_aad(&vpc_id, epoch), &wrapped)?;
                // The net card's sealed-key layout: bytes 0..32 the epoch key, 32..64 zero.
                let mut padded =
                    bulkhead_sealing::LockedSecret::<{ bulkhead_sealing::VOLUME_KEY_LEN }>::new()
                        .map_err(crypto::CryptoError::from)?;
                padded.as_mut().fill(0);
                if let Some(head) = padded.as_mut().get_mut(..32) {
                    head.copy_from_slice(key.as_ref());
                }
                drop(key);
                let sealed =
                    seal_volume_key(&host, &vpc_sealing_id(vpc_number, epoch), padded.as_ref())
                        .map_err(|_| KmsError::Internal)?;
                drop(padded);
                let sealed_epoch_key = SealedBlob::from_slice(&sealed).ok_or(KmsError::Internal)?;
                Ok(serde_json::to_value(SealVpcKeyResponse {
                    vpc_number,
                    epoch,
                    sealed_epoch_key,
                })
                .map_err(|_| KmsError::Internal)?)
            }
        }
    }

    /// The tenant's default (oldest) key, created on first use.
    fn default_key(&self, tenant: &str) -> Result<CmkRow, KmsError> {
        let id = format!("default-{tenant}");
        let id = if id.len() > crypto::MAX_KEY_ID_LEN {
            new_id("default")
        } else {
            id
        };
        if let Some(k) = self.store.cmk(&id)? {
            return Ok(k);
        }
        let row = CmkRow {
            wrapped: self.keys.create(&id)?,
            key_id: id,
            tenant_id: tenant.to_string(),
            description: "default volume key".into(),
            created: now(),
        };
        self.store.insert_cmk(&row)?;
        Ok(row)
    }
}
