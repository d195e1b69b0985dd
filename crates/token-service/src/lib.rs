//! `bulkhead-token-service`: the token service as its own process.
//!
//! It alone holds the token signing key. A caller authenticates with its client certificate
//! (mutual TLS 1.3); the caller a token is minted for is the one that certificate names (name,
//! role, certificate hash) — never a name in the request — and the reviewed policy
//! (`rights.toml`) decides whether that caller may have those operations on those hosts and
//! resources. Every request is audited (hash-chained, fsync'd) before it is answered; the log
//! never holds a token, only its id.
//!
//! One route: `POST /v1/Mint` with `{"hosts": [...], "operations": [...], "resources": [...]?,
//! "ttl_secs": N}` → `{"token", "token_id", "expires"}`. Refusals carry the token library's
//! stable codes (`mint_plane_violation`, `mint_not_granted`, ...). Every other route, an
//! oversized body, and everything the TLS server loop refuses (handshakes, caps, malformed
//! HTTP) is audited too, rate-summarised ([`MinterRefusals`]).
//!
//! A mint record shows in clear the caller, the operations (`op`, e.g. `Mint:DrainHost`) and the
//! hosts (`resources`, e.g. `host:host-3`); anyone who reads the log reads those. The rest of
//! the body (the TTL, any resource patterns) appears only in the record's digest of the whole
//! body, which is keyed with the service's [`ParamsKey`] (HMAC-SHA256; the key is drawn when the
//! process starts and held only in memory), never a plain SHA-256: those fields are low-entropy,
//! and whoever reads the log, taking the clear fields from the record, must not be able to
//! confirm guesses of them. Equal bodies give equal digests until the service restarts.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_audit::{AuditEntry, AuditLog, Decision, EntryKind, ParamsKey};
use bulkhead_mtls::Peer;
use bulkhead_mtls::{Refusal, RefusalSink, Refusals, Stage, Summary};
use bulkhead_tokens::{Identity, TokenService};
use http_body_util::BodyExt;
use serde_json::{json, Value};

/// Largest request body.
pub const MAX_BODY_BYTES: usize = 8 * 1024;
pub use bulkhead_tokens::wire::{parse_mint as parse, MintBody, MintParseError};

/// Why a request was refused before the policy was asked.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no client certificate")]
    NoCertificate,
    #[error(transparent)]
    Parse(#[from] MintParseError),
    #[error("route not found")]
    NoSuchRoute,
    #[error("body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("audit log unavailable")]
    AuditUnavailable,
}

impl RequestError {
    fn code(&self) -> &'static str {
        match self {
            RequestError::NoCertificate => "caller_unknown",
            RequestError::Parse(e) => e.code(),
            RequestError::NoSuchRoute => "no_such_route",
            RequestError::TooLarge => "body_too_large",
            RequestError::AuditUnavailable => "audit_unavailable",
        }
    }
    fn status(&self) -> StatusCode {
        match self {
            RequestError::NoCertificate => StatusCode::UNAUTHORIZED,
            RequestError::NoSuchRoute => StatusCode::NOT_FOUND,
            RequestError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RequestError::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

fn refusal(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// The service: the signing key (inside [`TokenService`]), the audit log and the key its
/// records' body digests are made with.
pub struct Minter {
    pub tokens: TokenService,
    pub audit: AuditLog,
    /// Keys `params_sha256` (see `bulkhead_audit::params`); never logged or handed out.
    pub params_key: ParamsKey,
}

impl Minter {
    async fn mint(&self, peer: Option<&Identity>, body: &[u8]) -> Response {
        let request_id = request_id();
        let parsed = match peer {
            None => Err(RequestError::NoCertificate),
            Some(p) => parse(p, body).map_err(RequestError::from),
        };
        let (decision, code, minted) = match &parsed {
            Err(e) => (Decision::Deny, e.code().to_string(), None),
            Ok(req) => match self.tokens.mint(req) {
                Ok(t) => (Decision::Allow, "ok".to_string(), Some(Ok(t))),
                Err(e) => (Decision::Deny, e.code().to_string(), Some(Err(e))),
            },
        };
        let (resources, ops) = match &parsed {
            Ok(r) => (
                r.hosts.iter().map(|h| format!("host:{h}")).collect(),
                r.operations
                    .iter()
                    .map(|o| o.name())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            Err(_) => (Vec::new(), String::new()),
        };
        let token_id = match &minted {
            Some(Ok((_, claims))) => Some(claims.token_id.clone()),
            _ => None,
        };
        let entry = AuditEntry {
            kind: EntryKind::Request,
            request_id: request_id.clone(),
            caller: peer.map(|p| p.name.clone()).unwrap_or_else(|| "-".into()),
            cert_sha256: peer.map(|p| p.cert_sha256.clone()),
            token_id,
            op: if ops.is_empty() {
                "Mint".into()
            } else {
                format!("Mint:{ops}")
            },
            resources,
            params_sha256: Some(self.params_key.digest(body)),
            decision,
            code: code.clone(),
        };
        // Audited before answering: no token leaves without its record.
        if let Err(e) = self.audit.append(entry).await {
            tracing::error!(error = %e, "audit log unavailable: refusing");
            let e = RequestError::AuditUnavailable;
            return refusal(e.status(), e.code(), e.to_string());
        }
        tracing::info!(request_id, caller = ?peer.map(|p| &p.name), %code, "mint");
        match (parsed, minted) {
            (Err(e), _) => refusal(e.status(), e.code(), e.to_string()),
            (Ok(_), Some(Ok((token, claims)))) => (
                StatusCode::OK,
                axum::Json(json!({
                    "token": token,
                    "token_id": claims.token_id,
                    "expires": claims.expires,
                })),
            )
                .into_response(),
            (Ok(_), Some(Err(e))) => refusal(StatusCode::FORBIDDEN, e.code(), e.to_string()),
            (Ok(_), None) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal", String::new()),
        }
    }
}

/// Writes the token service's refusals (server loop and handlers) into its own audit log,
/// queued: a refusal mints nothing.
pub struct MinterRefusals(pub Arc<Minter>);

impl RefusalSink for MinterRefusals {
    fn record(&self, r: &Refusal) {
        self.0.audit.append_queued(r.audit_entry(request_id()));
    }
    fn summary(&self, s: &Summary) {
        self.0.audit.append_queued(s.audit_entry(request_id()));
    }
}

/// The refusal hub of a token service (shared by its listener and [`router`]).
pub fn refusals(m: &Arc<Minter>) -> Arc<Refusals> {
    Refusals::new(Arc::new(MinterRefusals(Arc::clone(m))))
}

fn request_id() -> String {
    format!("tok-{}", hex::encode(rand::random::<[u8; 8]>()))
}

async fn handle(m: Arc<Minter>, refusals: Arc<Refusals>, req: Request<Body>) -> Response {
    let peer = req.extensions().get::<Peer>().and_then(|p| p.0.clone());
    // Recorded for every refusal before the mint pipeline: the route (escaped, bounded) and
    // the caller, never the body.
    let refused = Refusal::new(Stage::Handler, "")
        .by(peer.clone())
        .at(req.method().as_str(), req.uri().path());
    if req.uri().path() != "/v1/Mint" || req.method() != axum::http::Method::POST {
        let e = RequestError::NoSuchRoute;
        refusals.refuse(Refusal {
            code: e.code(),
            ..refused
        });
        return refusal(e.status(), e.code(), e.to_string());
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let e = RequestError::TooLarge;
            refusals.refuse(Refusal {
                code: e.code(),
                ..refused
            });
            return refusal(e.status(), e.code(), e.to_string());
        }
    };
    m.mint(peer.as_deref(), &body).await
}

/// The HTTP surface: one route, everything else `no_such_route` (audited through `refusals`).
pub fn router(m: Arc<Minter>, refusals: Arc<Refusals>) -> axum::Router {
    axum::Router::new().fallback(move |req: Request<Body>| {
        let m = Arc::clone(&m);
        let refusals = Arc::clone(&refusals);
        async move { handle(m, refusals, req).await }
    })
}

/// Parses a mint response body into the token.
pub fn token_from_response(v: &Value) -> Option<String> {
    v["token"].as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_tokens::{Operation, Role};

    fn caller() -> Identity {
        Identity {
            name: "control-plane".into(),
            role: Role::ControlPlane,
            cert_sha256: "00".repeat(32),
        }
    }

    #[test]
    fn parses_strictly_and_takes_the_caller_from_the_certificate() {
        let r = parse(
            &caller(),
            br#"{"hosts":["host-1"],"operations":["GetConsole"],"resources":["instance:i-1"],"ttl_secs":60}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.caller.name, "control-plane");
        assert_eq!(r.operations, vec![Operation::GetConsole]);
        for bad in [
            &br#"{"hosts":["h"],"operations":["GetConsole"],"ttl_secs":60,"caller":"operator"}"#[..],
            br#"{"hosts":["h"],"operations":["Shell"],"ttl_secs":60}"#,
            br#"{"hosts":["h"],"operations":[],"resources":["??"],"ttl_secs":60}"#,
            br#"[1,2"#,
        ] {
            assert!(
                parse(&caller(), bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
