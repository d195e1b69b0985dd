//! Minting (token service side) and verifying (controller side) Biscuit bearer tokens.
//!
//! The authority block carries, as Datalog facts: `token_id`, `caller`, `role`, `group`, `cert`
//! (SHA-256 of the caller's certificate DER), one `audience` per host, one `operation` per granted
//! operation, one `resource` per resource pattern, `issued` and `expires` (Unix seconds), plus a
//! Datalog check on `time` so that any Biscuit verifier also refuses it once expired.

use std::collections::HashSet;
use std::time::Duration;

use biscuit_auth::builder::{fact, int, string, Fact};
use biscuit_auth::{AuthorizerBuilder, AuthorizerLimits, Biscuit, KeyPair, PublicKey};

use crate::clock::{rfc3339, unix_now};
use crate::ops::{Operation, ResourcePattern, Role};
use crate::pki::Identity;
use crate::policy::Policy;

/// Longest token accepted, in base64 characters.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Clock skew tolerated on `issued`.
pub const CLOCK_SKEW_SECS: u64 = 30;

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub token_id: String,
    pub caller: String,
    pub role: Role,
    pub group: String,
    pub cert_sha256: String,
    pub audience: Vec<String>,
    pub operations: Vec<Operation>,
    pub resources: Vec<ResourcePattern>,
    pub issued: u64,
    pub expires: u64,
}

/// Why the token service refused to mint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("caller name does not match the certificate's name")]
    CertificateMismatch,
    #[error("no group of the policy grants {caller} ({role}) all of the requested operations on host {host}")]
    NotGranted {
        caller: String,
        role: Role,
        host: String,
    },
    #[error("role {role} may never hold {op}")]
    PlaneViolation { role: Role, op: Operation },
    #[error("requested resource {0} is not in the group's resource set")]
    ResourceNotGranted(String),
    #[error("ttl exceeds the policy's max_ttl for the granting group")]
    TtlTooLong,
    #[error("audience * (every host) needs a group with the fleet right")]
    FleetNotGranted,
    #[error("nothing requested")]
    Empty,
    #[error("token could not be built")]
    Build,
}

impl MintError {
    pub fn code(&self) -> &'static str {
        match self {
            MintError::CertificateMismatch => "mint_certificate_mismatch",
            MintError::NotGranted { .. } => "mint_not_granted",
            MintError::PlaneViolation { .. } => "mint_plane_violation",
            MintError::ResourceNotGranted(_) => "mint_resource_not_granted",
            MintError::TtlTooLong => "mint_ttl_too_long",
            MintError::FleetNotGranted => "mint_fleet_not_granted",
            MintError::Empty => "mint_empty",
            MintError::Build => "mint_failed",
        }
    }
}

/// Why a controller refused a token. Codes are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no bearer token")]
    Missing,
    #[error("token is too large")]
    TooLarge,
    #[error("token is malformed or its signature does not verify")]
    Invalid,
    #[error("token has been revoked")]
    Revoked,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token is for another host")]
    WrongAudience,
    #[error("token is bound to another certificate")]
    CertificateMismatch,
    #[error("token caller or role does not match the certificate")]
    IdentityMismatch,
    #[error("token does not grant this operation")]
    OperationNotGranted,
    #[error("token does not grant this resource")]
    ResourceNotGranted,
    #[error("this role may never use this plane")]
    PlaneViolation,
    #[error("only the deployer role may install software on a host")]
    DeployerOnly,
    #[error("a check in the token failed")]
    CheckFailed,
    #[error("token lifetime exceeds this host's policy cap")]
    LifetimeTooLong,
    #[error("token is valid on every host but its group lacks the fleet right")]
    FleetNotGranted,
    #[error("token names a group that does not grant this caller here")]
    GroupNotGranted,
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Missing => "token_missing",
            TokenError::TooLarge => "token_too_large",
            TokenError::Invalid => "token_invalid",
            TokenError::Revoked => "token_revoked",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::WrongAudience => "token_wrong_host",
            TokenError::CertificateMismatch => "token_cert_mismatch",
            TokenError::IdentityMismatch => "token_identity_mismatch",
            TokenError::OperationNotGranted => "token_operation_not_granted",
            TokenError::ResourceNotGranted => "token_resource_not_granted",
            TokenError::PlaneViolation => "plane_violation",
            TokenError::DeployerOnly => "deployer_only",
            TokenError::CheckFailed => "token_check_failed",
            TokenError::LifetimeTooLong => "token_lifetime_too_long",
            TokenError::FleetNotGranted => "token_fleet_not_granted",
            TokenError::GroupNotGranted => "token_group_not_granted",
        }
    }
}

/// A mint request, after the caller has been authenticated by certificate.
#[derive(Debug, Clone)]
pub struct MintRequest {
    /// The caller's certificate identity (name, role and hash).
    pub caller: Identity,
    pub hosts: Vec<String>,
    pub operations: Vec<Operation>,
    /// `None`: the whole resource set of the granting group.
    pub resources: Option<Vec<ResourcePattern>>,
    pub ttl: Duration,
}

/// The token service: a signing key and the reviewed policy.
pub struct TokenService {
    key: KeyPair,
    policy: Policy,
}

fn limits() -> AuthorizerLimits {
    AuthorizerLimits {
        max_facts: 1000,
        max_iterations: 100,
        max_time: Duration::from_millis(50),
    }
}

impl TokenService {
    pub fn new(key: KeyPair, policy: Policy) -> Self {
        TokenService { key, policy }
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public()
    }

    /// Mints a token if, and only if, one policy group grants everything asked.
    pub fn mint(&self, req: &MintRequest) -> Result<(String, Claims), MintError> {
        if req.operations.is_empty() || req.hosts.is_empty() {
            return Err(MintError::Empty);
        }
        if req.ttl > self.policy.max_ttl || req.ttl.is_zero() {
            return Err(MintError::TtlTooLong);
        }
        let role = req.caller.role;
        for op in &req.operations {
            if !role.may_hold(*op) {
                return Err(MintError::PlaneViolation { role, op: *op });
            }
        }
        let granting = || {
            self.policy
                .groups_of(&req.caller.name)
                .filter(move |g| g.role == role)
                .filter(|g| req.operations.iter().all(|o| g.operations.contains(o)))
        };
        let group = granting()
            .filter(|g| req.hosts.iter().all(|h| g.allows_host(h)))
            .find(|g| req.ttl <= g.max_ttl);
        let group = match group {
            Some(g) => g,
            None if granting().any(|g| req.hosts.iter().all(|h| g.allows_host(h))) => {
                return Err(MintError::TtlTooLong);
            }
            None if req.hosts.iter().any(|h| h == crate::policy::FLEET_AUDIENCE) => {
                return Err(MintError::FleetNotGranted);
            }
            None => {
                return Err(MintError::NotGranted {
                    caller: req.caller.name.clone(),
                    role,
                    host: req.hosts.join(","),
                })
            }
        };
        let resources = match &req.resources {
            None => group.resources.clone(),
            Some(rs) => {
                for r in rs {
                    if !group.covers_resource(r.as_str()) {
                        return Err(MintError::ResourceNotGranted(r.as_str().to_string()));
                    }
                }
                rs.clone()
            }
        };
        let issued = unix_now();
        let expires = issued.saturating_add(req.ttl.as_secs());
        let token_id = hex::encode(rand::random::<[u8; 16]>());
        let mut facts: Vec<Fact> = vec![
            fact("token_id", &[string(&token_id)]),
            fact("caller", &[string(&req.caller.name)]),
            fact("role", &[string(role.name())]),
            fact("group", &[string(&group.name)]),
            fact("cert", &[string(&req.caller.cert_sha256)]),
            fact("issued", &[int(secs_i64(issued))]),
            fact("expires", &[int(secs_i64(expires))]),
        ];
        facts.extend(req.hosts.iter().map(|h| fact("audience", &[string(h)])));
        facts.extend(
            req.operations
                .iter()
                .map(|o| fact("operation", &[string(o.name())])),
        );
        facts.extend(
            resources
                .iter()
                .map(|r| fact("resource", &[string(r.as_str())])),
        );
        let mut b = Biscuit::builder();
        for f in facts {
            b = b.fact(f).map_err(|_| MintError::Build)?;
        }
        b = b
            .code(format!("check if time($t), $t <= {};", rfc3339(expires)))
            .map_err(|_| MintError::Build)?;
        let token = b
            .build(&self.key)
            .and_then(|t| t.to_base64())
            .map_err(|_| MintError::Build)?;
        let claims = Claims {
            token_id,
            caller: req.caller.name.clone(),
            role,
            group: group.name.clone(),
            cert_sha256: req.caller.cert_sha256.clone(),
            audience: req.hosts.clone(),
            operations: req.operations.clone(),
            resources,
            issued,
            expires,
        };
        Ok((token, claims))
    }
}

fn secs_i64(s: u64) -> i64 {
    i64::try_from(s).unwrap_or(i64::MAX)
}

/// Token identifiers that must no longer be accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    ids: HashSet<String>,
}

impl RevocationList {
    /// One hex token id per line; `#` starts a comment. Bad lines are ignored (and counted).
    pub fn parse(text: &str) -> (RevocationList, usize) {
        let mut ids = HashSet::new();
        let mut bad = 0;
        for line in text.lines() {
            let l = line.split('#').next().unwrap_or("").trim();
            if l.is_empty() {
                continue;
            }
            if l.len() <= 256 && l.bytes().all(|b| b.is_ascii_hexdigit()) {
                ids.insert(l.to_ascii_lowercase());
            } else {
                bad += 1;
            }
        }
        (RevocationList { ids }, bad)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// What the request being authorized is.
#[derive(Debug, Clone)]
pub struct RequestContext<'a> {
    /// This host's name.
    pub host: &'a str,
    /// The TLS peer's identity.
    pub peer: &'a Identity,
    pub operation: Operation,
    /// Concrete resources the request touches.
    pub resources: &'a [String],
    pub now: u64,
}

/// Controller side: checks tokens against the token service's public key.
#[derive(Clone)]
pub struct Verifier {
    root: PublicKey,
}

fn query_strings(a: &mut biscuit_auth::Authorizer, rule: &str) -> Result<Vec<String>, TokenError> {
    let v: Vec<(String,)> = a.query(rule).map_err(|_| TokenError::Invalid)?;
    Ok(v.into_iter().map(|(s,)| s).collect())
}

fn query_one_string(a: &mut biscuit_auth::Authorizer, rule: &str) -> Result<String, TokenError> {
    let mut v = query_strings(a, rule)?;
    if v.len() != 1 {
        return Err(TokenError::Invalid);
    }
    v.pop().ok_or(TokenError::Invalid)
}

fn query_one_int(a: &mut biscuit_auth::Authorizer, rule: &str) -> Result<u64, TokenError> {
    let v: Vec<(i64,)> = a.query(rule).map_err(|_| TokenError::Invalid)?;
    match v.as_slice() {
        [(x,)] => u64::try_from(*x).map_err(|_| TokenError::Invalid),
        _ => Err(TokenError::Invalid),
    }
}

impl Verifier {
    pub fn new(root: PublicKey) -> Self {
        Verifier { root }
    }

    /// Checks the signature and reads the claims, without checking them against a request.
    /// Returns the parsed token too, for [`Verifier::authorize`].
    pub fn decode(&self, token: &str) -> Result<(Biscuit, Claims), TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge);
        }
        let biscuit = Biscuit::from_base64(token, self.root).map_err(|_| TokenError::Invalid)?;
        // The protobuf decoder merges concatenated messages and the base64 decoder tolerates
        // some slack, so a token followed by more bytes (even a copy of itself) can decode. A
        // token is accepted only as exactly the bytes its serialization gives back.
        if biscuit.to_base64().map_err(|_| TokenError::Invalid)? != token {
            return Err(TokenError::Invalid);
        }
        let mut a = AuthorizerBuilder::new()
            .set_limits(limits())
            .build(&biscuit)
            .map_err(|_| TokenError::Invalid)?;
        let role_name = query_one_string(&mut a, "x($r) <- role($r)")?;
        let role = Role::from_name(&role_name).ok_or(TokenError::Invalid)?;
        let operations = query_strings(&mut a, "x($o) <- operation($o)")?
            .iter()
            .map(|o| Operation::from_name(o).ok_or(TokenError::Invalid))
            .collect::<Result<Vec<_>, _>>()?;
        let resources = query_strings(&mut a, "x($r) <- resource($r)")?
            .iter()
            .map(|r| ResourcePattern::parse(r).map_err(|_| TokenError::Invalid))
            .collect::<Result<Vec<_>, _>>()?;
        let claims = Claims {
            token_id: query_one_string(&mut a, "x($i) <- token_id($i)")?,
            caller: query_one_string(&mut a, "x($c) <- caller($c)")?,
            role,
            group: query_one_string(&mut a, "x($g) <- group($g)")?,
            cert_sha256: query_one_string(&mut a, "x($c) <- cert($c)")?,
            audience: query_strings(&mut a, "x($h) <- audience($h)")?,
            operations,
            resources,
            issued: query_one_int(&mut a, "x($t) <- issued($t)")?,
            expires: query_one_int(&mut a, "x($t) <- expires($t)")?,
        };
        Ok((biscuit, claims))
    }

    /// Checks the signature once and keeps what later requests need: the claims, the revocation
    /// identifiers, and whether the token is exactly as minted (one authority block whose only
    /// check is the expiry check), in which case the Datalog pass can be skipped because every
    /// condition in it is checked in Rust.
    pub fn verify_signature(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let (biscuit, claims) = self.decode(token)?;
        let revocation_ids = biscuit
            .revocation_identifiers()
            .iter()
            .map(hex::encode)
            .collect();
        let plain = biscuit.block_count() == 1
            && biscuit.print_block_source(0).is_ok_and(|src| {
                let checks: Vec<&str> = src
                    .lines()
                    .map(str::trim)
                    .filter(|l| l.starts_with("check") || l.starts_with("reject"))
                    .collect();
                checks.len() == 1
                    && checks
                        .iter()
                        .all(|c| c.starts_with("check if time($t), $t <= "))
                    && !src.contains("trusting")
            });
        Ok(VerifiedToken {
            claims,
            revocation_ids,
            plain,
        })
    }

    /// Checks an already signature-verified token against one request. The order of checks fixes
    /// which error a token with several faults gets.
    pub fn check(
        &self,
        token: &str,
        vt: &VerifiedToken,
        revoked: &RevocationList,
        ctx: &RequestContext<'_>,
    ) -> Result<(), TokenError> {
        let claims = &vt.claims;
        if revoked.contains(&claims.token_id)
            || vt.revocation_ids.iter().any(|id| revoked.contains(id))
        {
            return Err(TokenError::Revoked);
        }
        if ctx.now > claims.expires {
            return Err(TokenError::Expired);
        }
        if claims.issued > ctx.now.saturating_add(CLOCK_SKEW_SECS) {
            return Err(TokenError::NotYetValid);
        }
        if !claims.audience.iter().any(|h| h == ctx.host || h == "*") {
            return Err(TokenError::WrongAudience);
        }
        if claims.cert_sha256 != ctx.peer.cert_sha256 {
            return Err(TokenError::CertificateMismatch);
        }
        if claims.caller != ctx.peer.name || claims.role != ctx.peer.role {
            return Err(TokenError::IdentityMismatch);
        }
        if ctx.operation.deployer_only() && ctx.peer.role != Role::Deployer {
            return Err(TokenError::DeployerOnly);
        }
        if !ctx.peer.role.may_use(ctx.operation.plane()) {
            return Err(TokenError::PlaneViolation);
        }
        if !claims.operations.contains(&ctx.operation) {
            return Err(TokenError::OperationNotGranted);
        }
        if !ctx
            .resources
            .iter()
            .all(|r| claims.resources.iter().any(|p| p.covers(r)))
        {
            return Err(TokenError::ResourceNotGranted);
        }
        if vt.plain {
            return Ok(());
        }
        // Attenuated or unusual token: let Datalog run every check in every block.
        let biscuit = Biscuit::from_base64(token, self.root).map_err(|_| TokenError::Invalid)?;
        let mut b = AuthorizerBuilder::new()
            .set_limits(limits())
            .time()
            .fact(fact("req_host", &[string(ctx.host)]))
            .and_then(|b| b.fact(fact("req_operation", &[string(ctx.operation.name())])))
            .and_then(|b| b.fact(fact("peer_cert", &[string(&ctx.peer.cert_sha256)])))
            .map_err(|_| TokenError::CheckFailed)?;
        for r in ctx.resources {
            b = b
                .fact(fact("req_resource", &[string(r)]))
                .map_err(|_| TokenError::CheckFailed)?;
        }
        b.policy("allow if true")
            .and_then(|b| b.build(&biscuit))
            .and_then(|mut a| a.authorize())
            .map(|_| ())
            .map_err(|_| TokenError::CheckFailed)
    }

    /// Full check of a token against one request (signature, then [`Verifier::check`]).
    pub fn authorize(
        &self,
        token: &str,
        revoked: &RevocationList,
        ctx: &RequestContext<'_>,
    ) -> Result<Claims, (TokenError, Option<Box<Claims>>)> {
        let vt = self.verify_signature(token).map_err(|e| (e, None))?;
        match self.check(token, &vt, revoked, ctx) {
            Ok(()) => Ok(vt.claims),
            Err(e) => Err((e, Some(Box::new(vt.claims)))),
        }
    }
}

/// A token whose signature has been verified, with its claims.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub claims: Claims,
    revocation_ids: Vec<String>,
    plain: bool,
}

/// Cache of signature-verified tokens keyed by the SHA-256 of the token text. Signature
/// verification and claim extraction depend only on the token bytes and the root key, so a hit
/// is exactly as good as re-verifying; every per-request check still runs on every request.
#[derive(Default)]
pub struct TokenCache {
    map: std::sync::Mutex<std::collections::HashMap<[u8; 32], std::sync::Arc<VerifiedToken>>>,
}

/// Most tokens kept; the cache is emptied when full (tokens live minutes).
pub const TOKEN_CACHE_MAX: usize = 4096;

impl TokenCache {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<[u8; 32], std::sync::Arc<VerifiedToken>>>
    {
        match self.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn get_or_verify(
        &self,
        verifier: &Verifier,
        token: &str,
    ) -> Result<std::sync::Arc<VerifiedToken>, TokenError> {
        use sha2::{Digest, Sha256};
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(v) = self.lock().get(&key) {
            return Ok(std::sync::Arc::clone(v));
        }
        let vt = std::sync::Arc::new(verifier.verify_signature(token)?);
        let mut m = self.lock();
        if m.len() >= TOKEN_CACHE_MAX {
            m.clear();
        }
        m.insert(key, std::sync::Arc::clone(&vt));
        Ok(vt)
    }
}

/// Reads a token-service private key written by [`KeyPair::to_prefixed_string`]-style text.
pub fn keypair_from_text(text: &str) -> Option<KeyPair> {
    let pk: biscuit_auth::PrivateKey = text.trim().parse().ok()?;
    Some(KeyPair::from(&pk))
}

/// Reads a token-service public key (`ed25519/HEX`).
pub fn public_key_from_text(text: &str) -> Option<PublicKey> {
    text.trim().parse().ok()
}

/// Text forms of a key pair: (private, public).
pub fn keypair_to_text(kp: &KeyPair) -> (String, String) {
    (kp.private().to_prefixed_string(), kp.public().to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::policy::DEFAULT_RIGHTS_TOML;

    fn id(name: &str, role: Role, cert: &str) -> Identity {
        Identity {
            name: name.into(),
            role,
            cert_sha256: cert.into(),
        }
    }

    fn service() -> TokenService {
        TokenService::new(KeyPair::new(), Policy::parse(DEFAULT_RIGHTS_TOML).unwrap())
    }

    fn req(caller: Identity, ops: &[Operation]) -> MintRequest {
        MintRequest {
            caller,
            hosts: vec!["host-1".into()],
            operations: ops.to_vec(),
            resources: None,
            ttl: Duration::from_secs(300),
        }
    }

    #[test]
    fn mint_and_verify() {
        let svc = service();
        let v = Verifier::new(svc.public_key());
        let op = id("operator", Role::Operator, "aa");
        let (t, claims) = svc
            .mint(&req(op.clone(), &[Operation::DescribeHost]))
            .unwrap();
        let ctx = RequestContext {
            host: "host-1",
            peer: &op,
            operation: Operation::DescribeHost,
            resources: &["host".to_string()],
            now: unix_now(),
        };
        let none = RevocationList::default();
        assert_eq!(v.authorize(&t, &none, &ctx).unwrap(), claims);
        let e = |c: &RequestContext<'_>, t: &str, r: &RevocationList| {
            v.authorize(t, r, c).unwrap_err().0
        };
        assert_eq!(
            e(
                &RequestContext {
                    host: "host-2",
                    ..ctx.clone()
                },
                &t,
                &none
            ),
            TokenError::WrongAudience
        );
        assert_eq!(
            e(
                &RequestContext {
                    now: claims.expires + 1,
                    ..ctx.clone()
                },
                &t,
                &none
            ),
            TokenError::Expired
        );
        assert_eq!(
            e(
                &RequestContext {
                    operation: Operation::DrainHost,
                    ..ctx.clone()
                },
                &t,
                &none
            ),
            TokenError::OperationNotGranted
        );
        let thief = id("operator", Role::Operator, "bb");
        assert_eq!(
            e(
                &RequestContext {
                    peer: &thief,
                    ..ctx.clone()
                },
                &t,
                &none
            ),
            TokenError::CertificateMismatch
        );
        let (revoked, _) = RevocationList::parse(&claims.token_id);
        assert_eq!(e(&ctx, &t, &revoked), TokenError::Revoked);
        let mut bytes = t.clone().into_bytes();
        let mid = bytes.len() / 2;
        bytes[mid] = if bytes[mid] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            e(&ctx, &String::from_utf8(bytes).unwrap(), &none),
            TokenError::Invalid
        );
        let other = TokenService::new(KeyPair::new(), Policy::parse(DEFAULT_RIGHTS_TOML).unwrap());
        let (foreign, _) = other
            .mint(&req(op.clone(), &[Operation::DescribeHost]))
            .unwrap();
        assert_eq!(e(&ctx, &foreign, &none), TokenError::Invalid);
    }

    #[test]
    fn attenuated_tokens_get_the_datalog_pass() {
        let svc = service();
        let v = Verifier::new(svc.public_key());
        let op = id("operator", Role::Operator, "aa");
        let (t, _) = svc
            .mint(&req(
                op.clone(),
                &[Operation::DescribeHost, Operation::GetHealth],
            ))
            .unwrap();
        let b = Biscuit::from_base64(&t, svc.public_key()).unwrap();
        let narrowed = b
            .append(
                biscuit_auth::BlockBuilder::new()
                    .code("check if req_operation(\"GetHealth\")")
                    .unwrap(),
            )
            .unwrap()
            .to_base64()
            .unwrap();
        let res = ["host".to_string()];
        let ctx = |operation| RequestContext {
            host: "host-1",
            peer: &op,
            operation,
            resources: &res,
            now: unix_now(),
        };
        let none = RevocationList::default();
        assert!(v
            .authorize(&narrowed, &none, &ctx(Operation::GetHealth))
            .is_ok());
        assert_eq!(
            v.authorize(&narrowed, &none, &ctx(Operation::DescribeHost))
                .unwrap_err()
                .0,
            TokenError::CheckFailed
        );
        // The cache returns the same verified claims; per-request checks still run.
        let cache = TokenCache::default();
        let a = cache.get_or_verify(&v, &narrowed).unwrap();
        let b2 = cache.get_or_verify(&v, &narrowed).unwrap();
        assert!(std::sync::Arc::ptr_eq(&a, &b2));
        assert!(v
            .check(&narrowed, &a, &none, &ctx(Operation::DescribeHost))
            .is_err());
        assert!(cache.get_or_verify(&v, "garbage").is_err());
    }

    #[test]
    fn policy_limits_minting() {
        let svc = service();
        let op = id("operator", Role::Operator, "aa");
        assert_eq!(
            svc.mint(&req(op.clone(), &[Operation::GetConsole]))
                .unwrap_err()
                .code(),
            "mint_plane_violation"
        );
        // A customer-role cert named "operator" still cannot use the operators group.
        let fake = id("operator", Role::Customer, "aa");
        assert_eq!(
            svc.mint(&req(fake, &[Operation::StartInstance]))
                .unwrap_err()
                .code(),
            "mint_not_granted"
        );
        let mut long = req(op, &[Operation::DescribeHost]);
        long.ttl = Duration::from_secs(7200);
        assert_eq!(svc.mint(&long).unwrap_err(), MintError::TtlTooLong);
    }
}
