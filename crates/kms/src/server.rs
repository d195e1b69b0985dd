//! The KMS's HTTP surface: every request goes to one handler that parses the route into a
//! [`KmsOp`] (anything else is `no_such_route`), caps the body, and calls [`Kms::handle`].

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use crate::service::Kms;
use crate::tls::Peer;
use crate::wire::{ErrorBody, ErrorDetail, KmsOp, MAX_BODY_BYTES};
use crate::KmsError;

fn error(e: &KmsError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = ErrorBody {
        error: ErrorDetail {
            code: e.code().into(),
            message: e.to_string(),
        },
    };
    (status, axum::Json(body)).into_response()
}

async fn handle(kms: Arc<Kms>, req: Request<Body>) -> Response {
    let Some(Peer(Some(peer))) = req.extensions().get::<Peer>().cloned() else {
        return error(&KmsError::CallerNotAllowed);
    };
    let Some(op) = KmsOp::from_path(req.uri().path()) else {
        return error(&KmsError::NoSuchRoute);
    };
    if req.method() != axum::http::Method::POST {
        return error(&KmsError::NoSuchRoute);
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(&KmsError::BodyTooLarge),
    };
    match kms.handle(&peer, op, &body).await {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => error(&e),
    }
}

pub fn router(kms: Arc<Kms>) -> axum::Router {
    axum::Router::new().fallback(move |req: Request<Body>| {
        let kms = Arc::clone(&kms);
        async move { handle(kms, req).await }
    })
}
