//! The operators' read-only view of what the control plane pulled from the hosts (pull, never
//! push): host state and capacity, and each host's audit records, behind mutual TLS on its own
//! listener (`operator_listen`). Only a certificate whose role is `operator` gets an answer;
//! every request, refusals included, is written to the control plane's audit log first.
//!
//! Routes (GET only; there are no others):
//!
//! * `/v1/operator/hosts` → `[{host_id, addr, cores, dedicated_tenant, last_polled, status,
//!   audit_records_pulled}]`
//! * `/v1/operator/hosts/{host_id}/audit?after=N&limit=M` → `{records: [<audit line JSON>],
//!   next_after}` (`limit` ≤ 500, default 100)
//! * `/v1/operator/alerts` → `{alerts: [{rule, host, evidence, time_ms, seq}]}`: the central
//!   alerts of fleet monitoring ([`crate::fleet`]), newest last, at most 1000
//! * `/v1/operator/metrics` → Prometheus text (`text/plain; version=0.0.4`): central alerts per
//!   rule, flagged hosts
//!
//! Nothing here reaches a customer's content: host descriptions hold capacity and counts, audit
//! records hold operation names, resource ids, decisions and digests — never bodies or keys.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_audit::EntryKind;
use bulkhead_mtls::Peer;
use bulkhead_tokens::Role;
use serde_json::{json, Value};

use crate::repo::Repository;
use crate::service::ControlPlane;
use crate::ControlError;

/// Largest page of audit records.
pub const MAX_AUDIT_PAGE: u32 = 500;

/// Why an operator request was refused. Codes are stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorError {
    #[error("only an operator certificate may use this API")]
    NotOperator,
    #[error("no such route")]
    NoSuchRoute,
    #[error("bad query: after=N&limit=M (limit 1..=500)")]
    BadQuery,
    #[error("no such host")]
    NoSuchHost,
    #[error("audit log unavailable; refusing")]
    AuditUnavailable,
    #[error("internal error")]
    Internal,
}

impl OperatorError {
    pub fn code(&self) -> &'static str {
        match self {
            OperatorError::NotOperator => "operator_only",
            OperatorError::NoSuchRoute => "no_such_route",
            OperatorError::BadQuery => "bad_query",
            OperatorError::NoSuchHost => "no_such_host",
            OperatorError::AuditUnavailable => "audit_unavailable",
            OperatorError::Internal => "internal_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            OperatorError::NotOperator => StatusCode::FORBIDDEN,
            OperatorError::NoSuchRoute | OperatorError::NoSuchHost => StatusCode::NOT_FOUND,
            OperatorError::BadQuery => StatusCode::BAD_REQUEST,
            OperatorError::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            OperatorError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A parsed operator request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorRequest {
    ListHosts,
    ListAlerts,
    Metrics,
    HostAudit {
        host_id: String,
        after: u64,
        limit: u32,
    },
}

impl OperatorRequest {
    /// The one parser of this boundary.
    pub fn parse(method: &Method, path: &str, query: Option<&str>) -> Result<Self, OperatorError> {
        if method != Method::GET {
            return Err(OperatorError::NoSuchRoute);
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["", "v1", "operator", "hosts"] => {
                if query.is_some_and(|q| !q.is_empty()) {
                    return Err(OperatorError::BadQuery);
                }
                Ok(OperatorRequest::ListHosts)
            }
            ["", "v1", "operator", "alerts"] => {
                if query.is_some_and(|q| !q.is_empty()) {
                    return Err(OperatorError::BadQuery);
                }
                Ok(OperatorRequest::ListAlerts)
            }
            ["", "v1", "operator", "metrics"] => {
                if query.is_some_and(|q| !q.is_empty()) {
                    return Err(OperatorError::BadQuery);
                }
                Ok(OperatorRequest::Metrics)
            }
            ["", "v1", "operator", "hosts", host, "audit"]
                if bulkhead_tokens::pki::valid_name(host) =>
            {
                let (after, limit) = parse_query(query.unwrap_or(""))?;
                Ok(OperatorRequest::HostAudit {
                    host_id: (*host).to_string(),
                    after,
                    limit,
                })
            }
            _ => Err(OperatorError::NoSuchRoute),
        }
    }

    fn op(&self) -> &'static str {
        match self {
            OperatorRequest::ListHosts => "Operator:ListHosts",
            OperatorRequest::ListAlerts => "Operator:ListAlerts",
            OperatorRequest::Metrics => "Operator:Metrics",
            OperatorRequest::HostAudit { .. } => "Operator:HostAudit",
        }
    }
}

fn parse_query(q: &str) -> Result<(u64, u32), OperatorError> {
    let (mut after, mut limit) = (None, None);
    for kv in q.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or(OperatorError::BadQuery)?;
        let ok = v.len() <= 20 && !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
        match (k, ok) {
            ("after", true) if after.is_none() => {
                after = Some(v.parse::<u64>().map_err(|_| OperatorError::BadQuery)?);
            }
            ("limit", true) if limit.is_none() => {
                limit = Some(v.parse::<u32>().map_err(|_| OperatorError::BadQuery)?);
            }
            _ => return Err(OperatorError::BadQuery),
        }
    }
    let limit = limit.unwrap_or(100);
    if !(1..=MAX_AUDIT_PAGE).contains(&limit) {
        return Err(OperatorError::BadQuery);
    }
    Ok((after.unwrap_or(0), limit))
}

/// The operator view of every host (also what `bulkhead-control hosts` prints).
pub fn host_list(
    repo: &dyn Repository,
    flagged: impl Fn(&str) -> Option<&'static str>,
) -> Result<Value, ControlError> {
    let mut out = Vec::new();
    for h in repo.hosts()? {
        let status = repo.host_status(&h.host_id)?;
        out.push(json!({
            "host_id": h.host_id,
            "addr": h.addr,
            "cores": h.cores,
            "dedicated_tenant": h.dedicated_tenant,
            "last_polled": status.as_ref().map(|s| s.1),
            "status": status.and_then(|s| serde_json::from_str::<Value>(&s.0).ok()),
            "audit_records_pulled": repo.host_audit_count(&h.host_id)?,
            "flagged": flagged(&h.host_id),
        }));
    }
    Ok(Value::Array(out))
}

fn answer(cp: &ControlPlane, req: &OperatorRequest) -> Result<Value, OperatorError> {
    let internal = |e: ControlError| {
        tracing::error!(code = e.code(), "operator view failed");
        OperatorError::Internal
    };
    match req {
        OperatorRequest::ListHosts => {
            let mut v = host_list(cp.repo.as_ref(), |h| cp.flagged(h)).map_err(internal)?;
            // Sealed hosts: the last verdict on their boot chain (null for other hosts).
            if let Value::Array(hosts) = &mut v {
                for h in hosts.iter_mut() {
                    let id = h["host_id"].as_str().unwrap_or("").to_string();
                    if let Some(o) = h.as_object_mut() {
                        o.insert("boot_attestation".into(), cp.boot_attestation_json(&id));
                    }
                }
            }
            Ok(v)
        }
        OperatorRequest::ListAlerts => Ok(json!({ "alerts": cp.alerts(1000) })),
        OperatorRequest::Metrics => Ok(Value::String(cp.fleet_metrics())),
        OperatorRequest::HostAudit {
            host_id,
            after,
            limit,
        } => {
            let recs = cp
                .repo
                .host_audit_after(host_id, *after, *limit)
                .map_err(|e| internal(e.into()))?;
            let next = recs.last().map_or(*after, |r| r.0);
            let records: Vec<Value> = recs
                .iter()
                .map(|(_, line)| serde_json::from_str(line).unwrap_or(Value::Null))
                .collect();
            Ok(json!({ "records": records, "next_after": next }))
        }
    }
}

/// A host named in the request must be one the control plane knows (decided before auditing,
/// so the refusal is in the record).
fn known_host(cp: &ControlPlane, req: &OperatorRequest) -> Result<(), OperatorError> {
    let OperatorRequest::HostAudit { host_id, .. } = req else {
        return Ok(());
    };
    let hosts = cp.repo.hosts().map_err(|_| OperatorError::Internal)?;
    if hosts.iter().any(|h| &h.host_id == host_id) {
        Ok(())
    } else {
        Err(OperatorError::NoSuchHost)
    }
}

async fn handle(cp: Arc<ControlPlane>, req: Request<Body>) -> Response {
    let peer = req.extensions().get::<Peer>().and_then(|p| p.0.clone());
    let (caller, role) = peer
        .as_ref()
        .map_or(("-".to_string(), None), |p| (p.name.clone(), Some(p.role)));
    let parsed = OperatorRequest::parse(req.method(), req.uri().path(), req.uri().query());
    let decided = match (&parsed, role) {
        (_, r) if r != Some(Role::Operator) => Err(OperatorError::NotOperator),
        (Err(e), _) => Err(e.clone()),
        (Ok(r), _) => known_host(&cp, r).map(|()| r.clone()),
    };
    let op = parsed.as_ref().map_or("Operator:-", OperatorRequest::op);
    let res = match &parsed {
        Ok(OperatorRequest::HostAudit { host_id, .. }) => vec![format!("host:{host_id}")],
        _ => Vec::new(),
    };
    let code = decided.as_ref().err().map_or("ok", OperatorError::code);
    let request_id = crate::service::new_id("op");
    let reply = |e: OperatorError| {
        (
            e.status(),
            axum::Json(json!({"error": {"code": e.code(), "message": e.to_string()}})),
        )
            .into_response()
    };
    if cp
        .audit(
            EntryKind::Request,
            &request_id,
            (&caller, ""),
            op,
            res,
            None,
            code,
        )
        .await
        .is_err()
    {
        return reply(OperatorError::AuditUnavailable);
    }
    match decided.and_then(|r| answer(&cp, &r)) {
        // Metrics are Prometheus text, everything else JSON.
        Ok(Value::String(text)) => (
            StatusCode::OK,
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            text,
        )
            .into_response(),
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => reply(e),
    }
}

/// The operator API (serve behind `bulkhead_mtls::serve` with client certificates required).
pub fn router(cp: Arc<ControlPlane>) -> axum::Router {
    axum::Router::new().fallback(move |req: Request<Body>| {
        let cp = Arc::clone(&cp);
        async move { handle(cp, req).await }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_two_read_only_routes_parse() {
        let get = Method::GET;
        assert_eq!(
            OperatorRequest::parse(&get, "/v1/operator/hosts", None),
            Ok(OperatorRequest::ListHosts)
        );
        assert_eq!(
            OperatorRequest::parse(
                &get,
                "/v1/operator/hosts/host-1/audit",
                Some("after=5&limit=2")
            ),
            Ok(OperatorRequest::HostAudit {
                host_id: "host-1".into(),
                after: 5,
                limit: 2
            })
        );
        for (m, p, q) in [
            (Method::POST, "/v1/operator/hosts", None),
            (Method::DELETE, "/v1/operator/hosts/host-1/audit", None),
            (get.clone(), "/v1/operator/hosts/", None),
            (get.clone(), "/v1/operator/hosts/../audit", None),
            (get.clone(), "/v1/operator/hosts/host-1/console", None),
            (get.clone(), "/v1/operator/instances", None),
        ] {
            assert_eq!(
                OperatorRequest::parse(&m, p, q),
                Err(OperatorError::NoSuchRoute),
                "{m} {p}"
            );
        }
        for q in [
            "limit=0",
            "limit=501",
            "after=-1",
            "after=1&after=2",
            "x=1",
            "after",
            "limit=1e3",
        ] {
            assert_eq!(
                OperatorRequest::parse(&get, "/v1/operator/hosts/h/audit", Some(q)),
                Err(OperatorError::BadQuery),
                "{q}"
            );
        }
        assert_eq!(
            OperatorRequest::parse(&get, "/v1/operator/hosts", Some("a=1")),
            Err(OperatorError::BadQuery)
        );
    }
}
