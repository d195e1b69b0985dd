//! Calls from the control plane to the KMS (JSON over mutual TLS), and the test-only dump of
//! what crossed that link.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use bulkhead_kms_proto::{KmsCall, RegisterCustomerRequest};

use super::ControlPlane;
use crate::{upstream_code, ControlError};

/// Test-only switch: with this variable naming a file in the control plane's own environment,
/// every KMS exchange is appended to that file as one JSON line
/// `{"op", "status", "request", "response_b64"}`: the decrypted traffic of the control
/// plane↔KMS link as the control plane sent and received it, so a test can check what crossed
/// that link instead of grepping TLS ciphertext. Off unless set; read once; no API,
/// configuration file or token can set it.
pub const KMS_DUMP_ENV: &str = "BULKHEAD_TEST_DUMP_KMS_BODIES";

fn kms_dump(op: &str, request: &impl serde::Serialize, status: u16, response: &[u8]) {
    static DUMP: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let Some(path) = DUMP.get_or_init(|| std::env::var_os(KMS_DUMP_ENV).map(Into::into)) else {
        return;
    };
    let request = serde_json::to_value(request).unwrap_or(Value::Null);
    let line = json!({
        "op": op,
        "status": status,
        "request": request,
        "response_b64": B64.encode(response),
    });
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
    if let Err(e) = written {
        tracing::warn!(error = %e, "{KMS_DUMP_ENV}: writing the KMS body dump failed");
    }
}

impl ControlPlane {
    /// One call to the KMS: the typed request of one operation in, that operation's typed
    /// answer out (the structs the KMS itself parses and writes, `bulkhead-kms-proto`); non-200
    /// becomes a typed upstream error, an answer that does not parse an internal one.
    pub(crate) async fn kms<R: KmsCall>(&self, req: &R) -> Result<R::Response, ControlError> {
        let op = R::OP.name();
        let body = serde_json::to_vec(req).map_err(|_| ControlError::Internal)?;
        let r = self
            .kms
            .request(
                &self.kms_addr,
                "POST",
                &format!("/v1/{op}"),
                &[("content-type", "application/json")],
                body,
            )
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "kms unreachable");
                ControlError::Upstream
            })?;
        kms_dump(op, req, r.status, &r.body);
        if r.status == 200 {
            serde_json::from_slice(&r.body).map_err(|e| {
                tracing::error!(op, error = %e, "the KMS answered 200 with a body that does not parse");
                ControlError::Internal
            })
        } else {
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            Err(ControlError::Kms(upstream_code(
                v["error"]["code"].as_str().unwrap_or(""),
            )))
        }
    }

    /// Registers a customer with the KMS (its copy of the signing secret lives wrapped there).
    pub async fn register_with_kms(
        &self,
        tenant: &str,
        akid: &str,
        secret: &[u8],
    ) -> Result<(), ControlError> {
        self.kms(&RegisterCustomerRequest {
            tenant_id: tenant.to_string(),
            access_key_id: akid.to_string(),
            secret: B64.encode(secret),
        })
        .await
        .map(|_| ())
    }
}
