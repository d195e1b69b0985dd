//! Helpers shared by the cluster test files: the workspace binaries, a two-host cluster on the
//! detached backend, customers that sign their calls.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bulkhead_devcluster::cluster::{self, Cluster, StartOptions};
use bulkhead_kms::sigv::{self, ForwardedRequest, SignedParts};
use bulkhead_kms::tls::{client_config, HttpsClient};
use serde_json::{json, Value};

pub fn bins() -> PathBuf {
    let b = Path::new(env!("CARGO_BIN_EXE_bulkhead-control"))
        .parent()
        .unwrap()
        .to_path_buf();
    for n in [
        "bulkhead-kms",
        "bulkhead-token-service",
        "bulkhead-controller",
    ] {
        assert!(
            b.join(n).is_file(),
            "{n} missing in {}: run `cargo build --release --workspace --bins` first",
            b.display()
        );
    }
    b
}

pub fn backend_args(bins: &Path) -> Vec<String> {
    let help = Command::new(bins.join("bulkhead-controller"))
        .arg("--help")
        .output()
        .unwrap();
    if String::from_utf8_lossy(&help.stdout).contains("--backend") {
        vec!["--backend".into(), "detached".into()]
    } else {
        Vec::new()
    }
}

pub fn up(dir: &Path, record: bool) -> Cluster {
    let b = bins();
    let c = cluster::start(
        dir,
        &StartOptions {
            hosts: 2,
            controller_args: backend_args(&b),
            bins: b,
            record,
            poll_interval_ms: 200,
            database_url: None,
            attest: None,
            netns: None,
        },
    )
    .unwrap();
    ran_fully(&c, 2);
    c
}

/// The cluster falls back to unattested hosts without swtpm and to loopback without root; with
/// `BULKHEAD_REQUIRE_ALL=1` (make test) a test that would silently have used either fails.
pub fn ran_fully(c: &Cluster, hosts: usize) {
    bulkhead_testkit::require(
        c.attested,
        "the cluster ran attested (measured start on swtpm, the KMS requiring attestation)",
    );
    bulkhead_testkit::require(
        c.nets.len() == hosts,
        "each host of the cluster ran in its own network namespace",
    );
}

pub struct Customer {
    pub akid: String,
    pub secret: Vec<u8>,
    pub endpoint: String,
    pub client: HttpsClient,
}

pub fn customer(c: &Cluster, tenant: &str) -> Customer {
    let out = c.dir.join(format!("{tenant}.json"));
    let st = Command::new(bins().join("bulkhead-control"))
        .args(["create-customer", "--config"])
        .arg(c.dir.join("control.toml"))
        .args(["--tenant", tenant, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    Customer {
        akid: v["access_key_id"].as_str().unwrap().into(),
        secret: B64.decode(v["secret"].as_str().unwrap()).unwrap(),
        endpoint: c.control_addr.clone(),
        client: HttpsClient::new(client_config(&c.dir.join("ca/ca.pem"), None).unwrap()),
    }
}

pub fn now() -> u64 {
    bulkhead_control::service::now()
}

impl Customer {
    pub fn parts(&self, action: &str, body: &str, at: u64) -> SignedParts {
        SignedParts {
            method: "POST".into(),
            path: format!("/v1/{action}"),
            query: String::new(),
            host: self.endpoint.clone(),
            date: sigv::format_date(at),
            body: body.into(),
            nonce: sigv::new_nonce(),
        }
    }

    /// One signed request; `None` when the connection failed (the control plane died).
    pub fn try_send(&self, p: &SignedParts, auth: &str) -> Option<(u16, Value)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt
            .block_on(self.client.request(
                &self.endpoint,
                &p.method,
                &p.path,
                &[
                    ("authorization", auth),
                    ("x-bh-date", &p.date),
                    ("x-bh-nonce", &p.nonce),
                    ("content-type", "application/json"),
                ],
                p.body.clone().into_bytes(),
            ))
            .ok()?;
        Some((
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        ))
    }

    pub fn send(&self, p: &SignedParts, auth: &str) -> (u16, Value) {
        self.try_send(p, auth).unwrap()
    }

    pub fn try_call(&self, action: &str, body: Value) -> Option<(u16, Value)> {
        let p = self.parts(action, &body.to_string(), now());
        let auth = sigv::sign(&self.akid, &self.secret, &p);
        self.try_send(&p, &auth)
    }

    pub fn call(&self, action: &str, body: Value) -> (u16, Value) {
        let p = self.parts(action, &body.to_string(), now());
        let auth = sigv::sign(&self.akid, &self.secret, &p);
        self.send(&p, &auth)
    }

    pub fn ok(&self, action: &str, body: Value) -> Value {
        let (st, v) = self.call(action, body);
        assert_eq!(st, 200, "{action}: {v}");
        v
    }

    /// A signed request in the form the control plane forwards to the KMS.
    pub fn forwarded(&self, action: &str, body: Value) -> Value {
        let p = self.parts(action, &body.to_string(), now());
        serde_json::to_value(ForwardedRequest {
            authorization: sigv::sign(&self.akid, &self.secret, &p),
            parts: p,
        })
        .unwrap()
    }
}

pub fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

pub fn run(c: &Customer) -> String {
    c.ok("RunInstances", json!({"ImageId": "img-1"}))["Instances"][0]["InstanceId"]
        .as_str()
        .unwrap()
        .to_string()
}

pub fn volume(c: &Customer) -> String {
    c.ok("CreateVolume", json!({"SizeGiB": 1}))["VolumeId"]
        .as_str()
        .unwrap()
        .to_string()
}
