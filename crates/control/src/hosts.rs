//! Calls from the control plane to host controllers: mutual TLS 1.3 with the control plane's
//! certificate, and for every call a fresh token from the token service (`bulkhead-tokens`)
//! naming just that host, that one operation and those resources, valid for one minute. Each
//! call accepts only the certificate of the host it names (role `host`, CN = the host id): no
//! other certificate of the cluster's CA — another host's, the KMS's — is taken for it.

use std::time::Duration;

use bulkhead_controller_proto::{ControllerCall, ErrorBody, WireResponse};
use bulkhead_mtls::{HttpResponse, HttpsClient};
use bulkhead_tokens::pki::ServerIdentity;
use bulkhead_tokens::{Identity, MintRequest, ResourcePattern, TokenService};

use crate::{upstream_code, ControlError};

/// The code of a host's 2xx answer that does not parse as its operation's answer.
pub const ANSWER_MALFORMED: &str = "host_answer_malformed";

/// Lifetime of a per-call host token.
pub const HOST_TOKEN_TTL: Duration = Duration::from_secs(60);

/// Where host tokens come from.
pub enum TokenSource {
    /// The token service process, over mTLS with the control plane's certificate: the normal
    /// deployment (the control plane never holds the signing key).
    Remote { addr: String, https: HttpsClient },
    /// In-process minting with a key on disk (`bulkhead-control serve --dev` without a token
    /// service).
    Local(Box<TokenService>),
}

impl TokenSource {
    async fn mint(&self, req: &MintRequest) -> Result<(String, String), ControlError> {
        match self {
            TokenSource::Local(t) => t
                .mint(req)
                .map(|(token, claims)| (token, claims.token_id))
                .map_err(|e| {
                    tracing::error!(error = %e, "token service refused");
                    ControlError::Host("token_refused")
                }),
            TokenSource::Remote { addr, https } => {
                let body = serde_json::json!({
                    "hosts": req.hosts,
                    "operations": req.operations.iter().map(|o| o.name()).collect::<Vec<_>>(),
                    "resources": req.resources.as_ref().map(|rs| rs.iter().map(|r| r.as_str().to_owned()).collect::<Vec<_>>()),
                    "ttl_secs": req.ttl.as_secs(),
                });
                let r = https
                    .request(
                        addr,
                        "POST",
                        "/v1/Mint",
                        &[("content-type", "application/json")],
                        body.to_string().into_bytes(),
                    )
                    .await
                    .map_err(|e| {
                        tracing::warn!(error = %e, "token service unreachable");
                        ControlError::Upstream
                    })?;
                let v: serde_json::Value =
                    serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
                match (r.status, v["token"].as_str(), v["token_id"].as_str()) {
                    (200, Some(t), Some(id)) => Ok((t.to_owned(), id.to_owned())),
                    _ => {
                        tracing::error!(status = r.status, code = %v["error"]["code"], "token service refused");
                        Err(ControlError::Host("token_refused"))
                    }
                }
            }
        }
    }
}

pub struct HostClient {
    https: HttpsClient,
    tokens: TokenSource,
    identity: Identity,
}

impl HostClient {
    pub fn new(https: HttpsClient, tokens: TokenSource, identity: Identity) -> HostClient {
        HostClient {
            https,
            tokens,
            identity,
        }
    }

    /// Calls one controller operation on `host_id` at `addr`: the typed request of
    /// `bulkhead-controller-proto` (its method, path, body and the resources its token names
    /// all come from it), that operation's typed answer out. A non-2xx answer becomes
    /// [`ControlError::Host`] with the controller's refusal code; a 2xx answer that does not
    /// parse as the operation's answer is [`ANSWER_MALFORMED`].
    pub async fn call<C: ControllerCall>(
        &self,
        host_id: &str,
        addr: &str,
        call: &C,
    ) -> Result<C::Response, ControlError> {
        let resources = call
            .resources()
            .iter()
            .map(|r| ResourcePattern::parse(r).map_err(|_| ControlError::Internal))
            .collect::<Result<Vec<_>, _>>()?;
        let (token, token_id) = self
            .tokens
            .mint(&MintRequest {
                caller: self.identity.clone(),
                hosts: vec![host_id.to_string()],
                operations: vec![C::OP],
                resources: Some(resources),
                ttl: HOST_TOKEN_TTL,
            })
            .await?;
        let auth = format!("Bearer {token}");
        let mut headers = vec![("authorization", auth.as_str())];
        let payload = match call.encode_body().map_err(|_| ControlError::Internal)? {
            Some(b) => {
                headers.push(("content-type", "application/json"));
                b
            }
            None => Vec::new(),
        };
        let https = self
            .https
            .expecting(ServerIdentity::host(host_id))
            .map_err(|e| {
                tracing::error!(error = %e, "no CA to pin host {host_id} with");
                ControlError::Internal
            })?;
        let r: HttpResponse = https
            .request(addr, C::METHOD.as_str(), &call.path(), &headers, payload)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, host = host_id, "host unreachable");
                ControlError::Upstream
            })?;
        let op = C::OP;
        tracing::debug!(host = host_id, op = %op, token_id = %token_id, status = r.status, "host call");
        if (200..300).contains(&r.status) {
            C::Response::decode(&r.body).map_err(|e| {
                tracing::error!(host = host_id, op = %op, error = %e, "the host answered 2xx with a body that does not parse");
                ControlError::Host(ANSWER_MALFORMED)
            })
        } else {
            let code = ErrorBody::decode(&r.body).map(|e| e.error.code);
            let code = code.as_deref().unwrap_or("");
            tracing::debug!(host = host_id, op = %op, status = r.status, code, "host refused");
            Err(ControlError::Host(upstream_code(code)))
        }
    }
}
