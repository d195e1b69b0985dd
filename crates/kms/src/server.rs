//! The KMS's HTTP surface: every request goes to one handler that parses the route into a
//! [`KmsOp`] (anything else is `no_such_route`), caps the body, and calls [`Kms::handle`].
//! Everything refused before [`Kms::handle`] (no identity, unknown route, body too large) and
//! everything the server loop refuses (handshakes, caps, malformed HTTP) is audited through
//! [`KmsRefusals`].

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_mtls::{Refusal, RefusalSink, Refusals, Stage, Summary};
use http_body_util::BodyExt;

use crate::service::{new_id, Kms};
use crate::wire::{ErrorBody, ErrorDetail, KmsOp, MAX_BODY_BYTES};
use crate::KmsError;
use bulkhead_mtls::Peer;

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

/// Writes the KMS's refusals into its own audit log (queued: a refusal acts on nothing).
pub struct KmsRefusals(pub Arc<Kms>);

impl RefusalSink for KmsRefusals {
    fn record(&self, r: &Refusal) {
        self.0.audit().append_queued(r.audit_entry(new_id("ref")));
    }
    fn summary(&self, s: &Summary) {
        self.0.audit().append_queued(s.audit_entry(new_id("ref")));
    }
}

/// The refusal hub of a KMS (shared by its listener and [`router`]).
pub fn refusals(kms: &Arc<Kms>) -> Arc<Refusals> {
    Refusals::new(Arc::new(KmsRefusals(Arc::clone(kms))))
}

async fn handle(kms: Arc<Kms>, refusals: Arc<Refusals>, req: Request<Body>) -> Response {
    let peer = req.extensions().get::<Peer>().and_then(|p| p.0.clone());
    let refuse = |e: KmsError| {
        refusals.refuse(
            Refusal::new(Stage::Handler, e.code())
                .by(peer.clone())
                .at(req.method().as_str(), req.uri().path()),
        );
        error(&e)
    };
    let Some(peer) = peer.clone() else {
        return refuse(KmsError::CallerNotAllowed);
    };
    let Some(op) = KmsOp::from_path(req.uri().path()) else {
        return refuse(KmsError::NoSuchRoute);
    };
    if req.method() != axum::http::Method::POST {
        return refuse(KmsError::NoSuchRoute);
    }
    let too_large = Refusal::new(Stage::Handler, KmsError::BodyTooLarge.code())
        .by(Some(Arc::clone(&peer)))
        .at(req.method().as_str(), req.uri().path());
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            refusals.refuse(too_large);
            return error(&KmsError::BodyTooLarge);
        }
    };
    match kms.handle(&peer, op, &body).await {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => error(&e),
    }
}

/// The KMS's routes; refusals before [`Kms::handle`] go to `refusals`.
pub fn router(kms: Arc<Kms>, refusals: Arc<Refusals>) -> axum::Router {
    axum::Router::new().fallback(move |req: Request<Body>| {
        let kms = Arc::clone(&kms);
        let refusals = Arc::clone(&refusals);
        async move { handle(kms, refusals, req).await }
    })
}
