//! Issue 12, item 6, against the real `bulkhead-kms`: one signed CreateVolume creates a grant for
//! exactly one volume id. The control plane (whose certificate this test uses) forwards the
//! customer's signed request with a volume id of its choosing; sent again with other volume ids,
//! the same authorization must not create more grants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bulkhead_ec2_query::bh1 as sigv;
use bulkhead_kms_proto::{ForwardedRequest, SignedParts};
use bulkhead_mtls::{client_config, HttpsClient};
use bulkhead_sealing::HostKey;
use bulkhead_tokens::pki::CaDir;
use bulkhead_tokens::Role;
use serde_json::{json, Value};

const AKID: &str = "AKIDTENANTA00001";
const SECRET: [u8; 32] = [7u8; 32];

struct Kms {
    child: Child,
    addr: String,
    client: HttpsClient,
}

impl Drop for Kms {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Kms {
    let ca = CaDir::new(dir.join("ca"));
    ca.init().unwrap();
    ca.issue("control-plane", Role::ControlPlane, false)
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead-kms"))
        .args(["--dev", "--listen", "127.0.0.1:0", "--ca-dir"])
        .arg(dir.join("ca"))
        .arg("--state-dir")
        .arg(dir.join("kms"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("no ready line: {line:?}"));
    Kms {
        child,
        addr: v["listen"].as_str().unwrap().to_string(),
        client: HttpsClient::new(
            client_config(
                &ca.ca_pem(),
                Some((&ca.cert("control-plane"), &ca.key("control-plane"))),
            )
            .unwrap(),
        ),
    }
}

impl Kms {
    fn call(&self, op: &str, body: &Value) -> (u16, Value) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt
            .block_on(self.client.request(
                &self.addr,
                "POST",
                &format!("/v1/{op}"),
                &[("content-type", "application/json")],
                body.to_string().into_bytes(),
            ))
            .unwrap();
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }
}

fn signed(action: &str, body: &Value) -> Value {
    let parts = SignedParts {
        method: "POST".into(),
        path: format!("/v1/{action}"),
        query: String::new(),
        host: "control.example".into(),
        date: sigv::format_date(bulkhead_kms::service::now()),
        body: body.to_string(),
        nonce: bulkhead_sealing::random_nonce(),
    };
    serde_json::to_value(ForwardedRequest {
        authorization: sigv::sign(AKID, &SECRET, &parts),
        parts,
    })
    .unwrap()
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn one_signed_create_volume_grants_one_volume() {
    let dir = tempfile::tempdir().unwrap();
    let k = start(dir.path());
    let (st, v) = k.call(
        "RegisterCustomer",
        &json!({"tenant_id": "tenant-a", "access_key_id": AKID, "secret": B64.encode(SECRET)}),
    );
    assert_eq!(st, 200, "{v}");
    let (st, v) = k.call(
        "CreateKey",
        &json!({"customer_request": signed("CreateKey", &json!({"Description": "a"}))}),
    );
    assert_eq!(st, 200, "{v}");
    let key_id = v["key_id"].as_str().unwrap().to_string();
    let host = HostKey::generate().unwrap();
    std::fs::write(
        dir.path().join("kms/hosts/host-1.pub"),
        host.public().to_file_bytes(),
    )
    .unwrap();

    // The customer signs one CreateVolume.
    let create = signed("CreateVolume", &json!({"SizeGiB": 1, "KmsKeyId": key_id}));
    let (st, v) = k.call(
        "GenerateDataKey",
        &json!({"key_id": key_id, "volume_id": "vol-a", "customer_request": create}),
    );
    assert_eq!(st, 200, "{v}");
    let blob_a = v["ciphertext_blob"].as_str().unwrap().to_string();

    // The control plane forwards the same authorization for more volume ids: refused, and no
    // grant exists for them.
    for other in ["vol-b", "vol-c", "vol-a"] {
        let (st, v) = k.call(
            "GenerateDataKey",
            &json!({"key_id": key_id, "volume_id": other, "customer_request": create}),
        );
        assert_eq!(
            (st, code(&v)),
            (403, "authorization_replayed"),
            "{other}: {v}"
        );
    }
    let attach = |vol: &str| {
        signed(
            "AttachVolume",
            &json!({"VolumeId": vol, "InstanceId": "i-1"}),
        )
    };
    let decrypt = |vol: &str, blob: &str| {
        k.call(
            "DecryptForHost",
            &json!({
                "volume_id": vol,
                "ciphertext_blob": blob,
                "host_id": "host-1",
                "host_public_key": B64.encode(host.public().to_file_bytes()),
                "customer_request": attach(vol),
            }),
        )
    };
    // vol-a's key is usable under its grant ...
    let (st, v) = decrypt("vol-a", &blob_a);
    assert_eq!(st, 200, "{v}");
    // ... and no other volume has a grant: the blob bound to vol-a cannot be presented as vol-b
    // either (the grant check comes first).
    let (st, v) = decrypt("vol-b", &blob_a);
    assert_eq!((st, code(&v)), (403, "no_grant"), "{v}");
    // A second, separately signed CreateVolume makes a second volume.
    let create2 = signed("CreateVolume", &json!({"SizeGiB": 1, "KmsKeyId": key_id}));
    let (st, v) = k.call(
        "GenerateDataKey",
        &json!({"key_id": key_id, "volume_id": "vol-b", "customer_request": create2}),
    );
    assert_eq!(st, 200, "{v}");
}
