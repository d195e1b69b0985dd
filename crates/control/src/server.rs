//! The customer API's HTTP surface (TLS 1.3, server-authenticated; customers authenticate by
//! signature): the JSON API under `/v1/` and the EC2 Query API at `/` ([`crate::query`]). Every request goes to [`ControlPlane::handle`]; the body is capped before it is
//! buffered. A body refused before that (too large, not UTF-8) and everything the TLS server
//! loop refuses on either listener (handshakes, caps, malformed HTTP) is audited into the
//! control plane's own log through [`ControlRefusals`], rate-summarised; never the body.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_mtls::{Refusal, RefusalSink, Refusals, Stage, Summary};
use http_body_util::BodyExt;

use crate::api::MAX_BODY_BYTES;
use crate::service::{new_id, ControlPlane, RawRequest};
use crate::ControlError;

/// Writes refusals of the control plane's listeners into its own audit log, queued.
pub struct ControlRefusals(pub Arc<ControlPlane>);

impl RefusalSink for ControlRefusals {
    fn record(&self, r: &Refusal) {
        self.0
            .audit_log()
            .append_queued(r.audit_entry(new_id("ref")));
    }
    fn summary(&self, s: &Summary) {
        self.0
            .audit_log()
            .append_queued(s.audit_entry(new_id("ref")));
    }
}

/// The refusal hub of a control plane (shared by both listeners and [`router`]).
pub fn refusals(cp: &Arc<ControlPlane>) -> Arc<Refusals> {
    Refusals::new(Arc::new(ControlRefusals(Arc::clone(cp))))
}

fn header(req: &Request<Body>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn handle(cp: Arc<ControlPlane>, refusals: Arc<Refusals>, req: Request<Body>) -> Response {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let host = header(&req, "host").unwrap_or_default();
    let date = header(&req, "x-bh-date");
    let authorization = header(&req, "authorization");
    let nonce = header(&req, "x-bh-nonce");
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let query_api = path == "/";
    let refused = Refusal::new(Stage::Handler, "").at(&method, &path);
    let reply = |e: ControlError| {
        if query_api {
            let (status, xml) = crate::query::query_error(&e, "-", &new_id("req"));
            return xml_response(status, xml);
        }
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
        (
            status,
            axum::Json(serde_json::json!({"error": {"code": e.code(), "message": e.to_string()}})),
        )
            .into_response()
    };
    let bytes = match http_body_util::Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let e = ControlError::BodyTooLarge;
            refusals.refuse(Refusal {
                code: e.code(),
                ..refused
            });
            return reply(e);
        }
    };
    let Ok(body) = String::from_utf8(bytes.to_vec()) else {
        let e = ControlError::BadBody;
        refusals.refuse(Refusal {
            code: e.code(),
            ..refused
        });
        return reply(e);
    };
    let raw = RawRequest {
        method,
        path,
        query,
        host,
        date,
        authorization,
        nonce,
        headers,
        body,
    };
    if query_api {
        let (status, xml) = cp.handle_query(raw).await;
        return xml_response(status, xml);
    }
    let (status, v) = cp.handle(raw).await;
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(v),
    )
        .into_response()
}

fn xml_response(status: u16, xml: String) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(
            axum::http::header::CONTENT_TYPE,
            crate::query::XML_CONTENT_TYPE,
        )],
        xml,
    )
        .into_response()
}

/// The customer API (the JSON API under `/v1/`, the EC2 Query API at `/`); refusals before [`ControlPlane::handle`] go to `refusals`.
pub fn router(cp: Arc<ControlPlane>, refusals: Arc<Refusals>) -> axum::Router {
    axum::Router::new().fallback(move |req: Request<Body>| {
        let cp = Arc::clone(&cp);
        let refusals = Arc::clone(&refusals);
        async move { handle(cp, refusals, req).await }
    })
}
