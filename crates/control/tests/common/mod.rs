//! Helpers shared by the cluster test files: the workspace binaries, a two-host cluster on the
//! detached backend, customers that sign their calls.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bulkhead_devcluster::cluster::{self, Cluster, StartOptions};
use bulkhead_ec2_query::bh1::{self as sigv, SignedParts};
use bulkhead_kms_proto::ForwardedRequest;
use bulkhead_mtls::{client_config, HttpsClient};
use serde_json::{json, Value};

pub mod aws;

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
            nonce: bulkhead_sealing::random_nonce(),
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

/// A client presenting `name`'s certificate from the cluster's CA directory.
pub fn client_as(c: &Cluster, name: &str) -> HttpsClient {
    let ca = c.dir.join("ca");
    HttpsClient::new(
        client_config(
            &ca.join("ca.pem"),
            Some((
                &ca.join(format!("{name}.pem")),
                &ca.join(format!("{name}.key")),
            )),
        )
        .unwrap(),
    )
}

/// A client with the control plane's certificate (what the KMS and the token service accept).
pub fn as_control_plane(c: &Cluster) -> HttpsClient {
    client_as(c, "control-plane")
}

pub fn post(
    client: &HttpsClient,
    addr: &str,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let r = rt
        .block_on(client.request(addr, "POST", path, &headers, body.to_string().into_bytes()))
        .unwrap();
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

/// What the control plane does before DecryptForHost: a KMS nonce for `host`, quoted by the
/// host's TPM through its controller (with a token minted for AttestHost on that host).
/// `None` when the cluster's KMS does not require attestation.
pub fn evidence(c: &Cluster, host: &str, instance: &str) -> Option<Value> {
    let cp = as_control_plane(c);
    let (st, ch) = post(
        &cp,
        &c.kms_addr,
        "/v1/Challenge",
        None,
        &json!({"host_id": host}),
    );
    assert_eq!(st, 200, "{ch}");
    if ch["required"] != true {
        return None;
    }
    Some(quote_for(
        c,
        host,
        ch["nonce"].as_str().unwrap(),
        Some(instance),
    ))
}

/// The host's evidence over `nonce`, through its controller.
/// `host`'s quote over `nonce`, bound to `instance` if given (as the control plane asks for it
/// before DecryptForHost).
pub fn quote_for(c: &Cluster, host: &str, nonce: &str, instance: Option<&str>) -> Value {
    let (st, ev) = quote_status(c, host, nonce, instance);
    assert_eq!(st, 200, "{ev}");
    ev
}

pub fn quote_status(c: &Cluster, host: &str, nonce: &str, instance: Option<&str>) -> (u16, Value) {
    let cp = as_control_plane(c);
    let mut resources = vec!["host".to_string()];
    let mut body = json!({"nonce": nonce});
    if let Some(i) = instance {
        resources.push(format!("instance:{i}"));
        body["instance_id"] = json!(i);
    }
    let (st, t) = post(
        &cp,
        &c.token_addr,
        "/v1/Mint",
        None,
        &json!({"hosts": [host], "operations": ["AttestHost"], "resources": resources, "ttl_secs": 60}),
    );
    assert_eq!(st, 200, "{t}");
    let addr = &c.host_addrs.iter().find(|(h, _)| h == host).unwrap().1;
    post(&cp, addr, "/v1/host/attest", t["token"].as_str(), &body)
}

/// The test guest (`make guest`), or `None` after a loud skip when it or /dev/kvm is absent.
pub fn guest_dir_or_skip(test: &str) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let d = match std::env::var_os("BULKHEAD_GUEST_DIR").map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        Some(p) => root.join(p),
        None => root.join("target/guest"),
    };
    if !Path::new("/dev/kvm").exists() || !d.join("vmlinux").is_file() {
        bulkhead_testkit::skip_or_fail(&format!(
            "{test}: needs /dev/kvm and the test guest in {} (make guest)",
            d.display()
        ));
        return None;
    }
    Some(d.canonicalize().unwrap())
}

impl Customer {
    /// Polls GetConsoleOutput until `needle` shows up (software KVM boots take minutes).
    pub fn wait_console(&self, instance: &str, needle: &str) -> String {
        let started = std::time::Instant::now();
        loop {
            let v = self.ok("GetConsoleOutput", json!({"InstanceId": instance}));
            let out = v["Output"].as_str().unwrap_or("").to_string();
            if out.contains(needle) {
                return out;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(900),
                "no {needle:?} on {instance}'s console:\n{out}"
            );
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    }
}

/// The KMS's answer to a DecryptForHost for volume `va` on instance `ia`'s host, as the control
/// plane would ask it (the test holds the control plane's certificate and the customer's
/// forwarded AttachVolume), and that host's id.
pub fn decrypt_for_host(
    c: &Cluster,
    a: &Customer,
    va: &str,
    ia: &str,
    blob: &[u8],
) -> ((u16, Value), String) {
    let dir = &c.dir;
    let db = rusqlite::Connection::open(dir.join("control/control.db")).unwrap();
    let host_of: String = db
        .query_row(
            "SELECT host_id FROM instances WHERE instance_id = ?1",
            [ia],
            |r| r.get(0),
        )
        .unwrap();
    let host_dir = dir.join(&host_of);
    let kms = HttpsClient::new(
        client_config(
            &dir.join("ca/ca.pem"),
            Some((
                &dir.join("ca/control-plane.pem"),
                &dir.join("ca/control-plane.key"),
            )),
        )
        .unwrap(),
    );
    let body = json!({
        "volume_id": va,
        "ciphertext_blob": B64.encode(blob),
        "host_id": host_of,
        "host_public_key": B64.encode(std::fs::read(host_dir.join("host.pub")).unwrap()),
        "customer_request": a.forwarded("AttachVolume", json!({"VolumeId": va, "InstanceId": ia})),
        "evidence": evidence(c, &host_of, ia),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt
        .block_on(kms.request(
            &c.kms_addr,
            "POST",
            "/v1/DecryptForHost",
            &[],
            body.to_string().into_bytes(),
        ))
        .unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    ((r.status, v), host_of)
}

/// The KMS ciphertext blob of volume `va`'s data key, as the control plane stores it.
pub fn volume_blob(c: &Cluster, va: &str) -> Vec<u8> {
    let db = rusqlite::Connection::open(c.dir.join("control/control.db")).unwrap();
    db.query_row(
        "SELECT ciphertext_blob FROM volumes WHERE volume_id = ?1",
        [va],
        |r| r.get(0),
    )
    .unwrap()
}

/// Volume `va`'s data key, opened with the host key of instance `ia`'s host (what that host's
/// block card holds), and that host's id: an independent decryptor for tests.
pub fn data_key(c: &Cluster, a: &Customer, va: &str, ia: &str) -> (Vec<u8>, String) {
    let ((status, v), host_of) = decrypt_for_host(c, a, va, ia, &volume_blob(c, va));
    assert_eq!(status, 200, "{v}");
    let sealed = B64.decode(v["sealed_key"].as_str().unwrap()).unwrap();
    let host_key =
        bulkhead_sealing::HostKey::read_file(&c.dir.join(&host_of).join("host.key")).unwrap();
    let dk = bulkhead_sealing::open_volume_key(&host_key, va, &sealed).unwrap();
    (dk.as_ref().to_vec(), host_of)
}
