//! The customer API's HTTP surface (TLS 1.3, server-authenticated; customers authenticate by
//! signature). Every request goes to [`ControlPlane::handle`]; the body is capped before it is
//! buffered.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use crate::api::MAX_BODY_BYTES;
use crate::service::{ControlPlane, RawRequest};
use crate::ControlError;

fn header(req: &Request<Body>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn handle(cp: Arc<ControlPlane>, req: Request<Body>) -> Response {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let host = header(&req, "host").unwrap_or_default();
    let date = header(&req, "x-bh-date");
    let authorization = header(&req, "authorization");
    let nonce = header(&req, "x-bh-nonce");
    let reply = |e: ControlError| {
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
        Err(_) => return reply(ControlError::BodyTooLarge),
    };
    let Ok(body) = String::from_utf8(bytes.to_vec()) else {
        return reply(ControlError::BadBody);
    };
    let (status, v) = cp
        .handle(RawRequest {
            method,
            path,
            query,
            host,
            date,
            authorization,
            nonce,
            body,
        })
        .await;
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(v),
    )
        .into_response()
}

pub fn router(cp: Arc<ControlPlane>) -> axum::Router {
    axum::Router::new().fallback(move |req: Request<Body>| {
        let cp = Arc::clone(&cp);
        async move { handle(cp, req).await }
    })
}
