//! Calls from the control plane to the KMS (JSON over mutual TLS), and the test-only dump of
//! what crossed that link.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use super::ControlPlane;
use crate::{upstream_code, ControlError};

/// Test-only switch: with this variable naming a file in the control plane's own environment,
/// every KMS exchange is appended to that file as one JSON line
/// `{"op", "status", "request", "response_b64"}`: the decrypted traffic of the control
/// plane↔KMS link as the control plane sent and received it, so a test can check what crossed
/// that link instead of grepping TLS ciphertext. Off unless set; read once; no API,
/// configuration file or token can set it.
pub const KMS_DUMP_ENV: &str = "BULKHEAD_TEST_DUMP_KMS_BODIES";

fn kms_dump(op: &str, request: &Value, status: u16, response: &[u8]) {
    static DUMP: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let Some(path) = DUMP.get_or_init(|| std::env::var_os(KMS_DUMP_ENV).map(Into::into)) else {
        return;
    };
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
    /// One call to the KMS (JSON in, JSON out; non-200 becomes a typed upstream error).
    pub(crate) async fn kms_call(&self, op: &str, body: &Value) -> Result<Value, ControlError> {
        let r = self
            .kms
            .request(
                &self.kms_addr,
                "POST",
                &format!("/v1/{op}"),
                &[("content-type", "application/json")],
                body.to_string().into_bytes(),
            )
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "kms unreachable");
                ControlError::Upstream
            })?;
        kms_dump(op, body, r.status, &r.body);
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        if r.status == 200 {
            Ok(v)
        } else {
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
        self.kms_call(
            "RegisterCustomer",
            &json!({"tenant_id": tenant, "access_key_id": akid, "secret": B64.encode(secret)}),
        )
        .await
        .map(|_| ())
    }
}
