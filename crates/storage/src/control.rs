//! The control API: `POST /v1/<Op>` with a JSON body (`bulkhead-storage-proto`), served
//! behind the shared mutual-TLS loop (`bulkhead-mtls`) to the control plane's certificate only.
//!
//! Every request is audited before it runs (hash-chained, fsync'd) and its outcome after;
//! every refusal (another role, unknown route, oversized or malformed body) is audited too.
//! A request record shows the route (`op`) and the volume and host it names (`resources`:
//! `volume:…`, `host:…`) in clear; the rest of the body (a size, a snapshot source, a
//! generation) appears only in its digest, keyed with the node's `ParamsKey` (HMAC-SHA256, key
//! drawn at start and held in memory), so whoever reads the log cannot confirm a guess of those
//! fields; equal bodies give equal digests until the node restarts.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_audit::{Decision, EntryKind};
use bulkhead_mtls::{Peer, Refusal, RefusalSink, Refusals, Stage, Summary};
use bulkhead_storage_proto::{
    ErrorBody, ErrorCode, ErrorDetail, Request as ControlRequest, MAX_BODY_BYTES,
};
use bulkhead_tokens::{Identity, Role};
use http_body_util::BodyExt;

use crate::node::{entry, request_id, Node};

fn refusal(code: ErrorCode, message: String) -> Response {
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        axum::Json(ErrorBody {
            error: ErrorDetail { code, message },
        }),
    )
        .into_response()
}

/// Writes refusals (server loop and handler) into the node's audit log, rate-summarised.
pub struct NodeRefusals(pub bulkhead_audit::AuditLog);

impl RefusalSink for NodeRefusals {
    fn record(&self, r: &Refusal) {
        self.0.append_queued(r.audit_entry(request_id()));
    }
    fn summary(&self, s: &Summary) {
        self.0.append_queued(s.audit_entry(request_id()));
    }
}

fn code_str(c: ErrorCode) -> &'static str {
    c.as_str()
}

async fn handle(node: Arc<Node>, refusals: Arc<Refusals>, req: Request<Body>) -> Response {
    let peer: Option<Arc<Identity>> = req.extensions().get::<Peer>().and_then(|p| p.0.clone());
    let refused = Refusal::new(Stage::Handler, "")
        .by(peer.clone())
        .at(req.method().as_str(), req.uri().path());
    let caller = match &peer {
        Some(p) if p.role == Role::ControlPlane => Arc::clone(p),
        _ => {
            let c = ErrorCode::NotControlPlane;
            refusals.refuse(Refusal {
                code: code_str(c),
                ..refused
            });
            return refusal(c, "only the control plane's certificate is served".into());
        }
    };
    if req.method() != Method::POST
        || bulkhead_storage_proto::Op::from_path(req.uri().path()).is_none()
    {
        let c = ErrorCode::NoSuchRoute;
        refusals.refuse(Refusal {
            code: code_str(c),
            ..refused
        });
        return refusal(c, "no such route".into());
    }
    let path = req.uri().path().to_string();
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let c = ErrorCode::BodyTooLarge;
            refusals.refuse(Refusal {
                code: code_str(c),
                ..refused
            });
            return refusal(c, format!("body larger than {MAX_BODY_BYTES} bytes"));
        }
    };
    let rid = request_id();
    let params = node.params_key.digest(&body);
    let parsed = ControlRequest::parse(&path, &body);
    let op_name = path.trim_start_matches("/v1/").to_string();
    let resources: Vec<String> = match &parsed {
        Ok(r) => r
            .volume_id()
            .map(|v| format!("volume:{v}"))
            .into_iter()
            .chain(match r {
                ControlRequest::Grant(g) => Some(format!("host:{}", g.host)),
                _ => None,
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    let (decision, code) = match &parsed {
        Ok(_) => (Decision::Allow, "ok"),
        Err(e) => (Decision::Deny, code_str(e.code())),
    };
    let mut record = entry(
        EntryKind::Request,
        &rid,
        Some(&caller),
        &op_name,
        resources.clone(),
        decision,
        code,
    );
    record.params_sha256 = Some(params);
    if node.audit(record).await.is_err() {
        return refusal(
            ErrorCode::AuditUnavailable,
            "audit log unavailable; nothing was done".into(),
        );
    }
    let req = match parsed {
        Ok(r) => r,
        Err(e) => return refusal(e.code(), e.to_string()),
    };
    let result = match &req {
        ControlRequest::CreateVolume(r) => node.create(r).await.map(|v| json(&v)),
        ControlRequest::CreateSnapshot(r) => node.snapshot(r).await.map(|v| json(&v)),
        ControlRequest::Grant(r) => node.grant(r).await.map(|v| json(&v)),
        ControlRequest::Revoke(r) => node.revoke(r).await.map(|v| json(&v)),
        ControlRequest::DeleteVolume(r) => node.delete(r).await.map(|v| json(&v)),
        ControlRequest::ListVolumes(_) => Ok(json(&node.list().await)),
    };
    let (code, resp) = match result {
        Ok(body) => ("ok", (StatusCode::OK, body).into_response()),
        Err(e) => {
            tracing::warn!(op = %op_name, error = %e, "control request failed");
            (code_str(e.code()), refusal(e.code(), e.to_string()))
        }
    };
    node.audit.append_queued(entry(
        EntryKind::Outcome,
        &rid,
        Some(&caller),
        &op_name,
        resources,
        Decision::None,
        code,
    ));
    resp
}

fn json<T: serde::Serialize>(v: &T) -> Response {
    axum::Json(v).into_response()
}

/// The HTTP surface: every route goes through [`handle`].
pub fn router(node: Arc<Node>, refusals: Arc<Refusals>) -> axum::Router {
    axum::Router::new().fallback(move |req: Request<Body>| {
        let node = Arc::clone(&node);
        let refusals = Arc::clone(&refusals);
        async move { handle(node, refusals, req).await }
    })
}
