//! Issue 12, item 6: the KMS releases a volume key only to the host that runs the instance the
//! customer named. The control plane's AttestHost call carries the instance id; the host's
//! controller quotes only for an instance its backend runs, with qualifying data
//! SHA-256(nonce || instance id); the KMS recomputes that from the InstanceId of the customer's
//! signed AttachVolume. Acting as a compromised control plane (its certificate, the token
//! service, the KMS), the test tries to steer the one use of an authorization to another host.
//!
//! Needs swtpm and the release binaries (`cargo build --release --workspace --bins`); attested
//! cluster as in `cluster.rs::kms_releases_volume_keys_only_to_freshly_attested_hosts`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bulkhead_devcluster::cluster::{self, Cluster, StartOptions};
use bulkhead_mtls::{client_config, HttpsClient};
use common::{backend_args, bins, code, customer};
use serde_json::{json, Value};

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// What the control plane's certificate can do: the KMS, the token service, every host.
struct ControlPlaneCreds {
    client: HttpsClient,
    kms: String,
    tokens: String,
    hosts: Vec<(String, String)>,
}

impl ControlPlaneCreds {
    fn new(c: &Cluster) -> Self {
        let ca = c.dir.join("ca");
        ControlPlaneCreds {
            client: HttpsClient::new(
                client_config(
                    &ca.join("ca.pem"),
                    Some((&ca.join("control-plane.pem"), &ca.join("control-plane.key"))),
                )
                .unwrap(),
            ),
            kms: c.kms_addr.clone(),
            tokens: c.token_addr.clone(),
            hosts: c.host_addrs.clone(),
        }
    }

    fn post(&self, addr: &str, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        let r = block_on(self.client.request(
            addr,
            "POST",
            path,
            &headers,
            body.to_string().into_bytes(),
        ))
        .unwrap();
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }

    fn challenge(&self, host: &str) -> String {
        let (st, ch) = self.post(&self.kms, "/v1/Challenge", None, &json!({"host_id": host}));
        assert_eq!((st, ch["required"].clone()), (200, json!(true)), "{ch}");
        ch["nonce"].as_str().unwrap().to_string()
    }

    /// `host`'s answer to AttestHost over `nonce`, bound to `instance` if given.
    fn attest(&self, host: &str, nonce: &str, instance: Option<&str>) -> (u16, Value) {
        let mut resources = vec!["host".to_string()];
        let mut body = json!({"nonce": nonce});
        if let Some(i) = instance {
            resources.push(format!("instance:{i}"));
            body["instance_id"] = json!(i);
        }
        let (st, t) = self.post(
            &self.tokens,
            "/v1/Mint",
            None,
            &json!({"hosts": [host], "operations": ["AttestHost"], "resources": resources, "ttl_secs": 60}),
        );
        assert_eq!(st, 200, "{t}");
        let addr = &self.hosts.iter().find(|(h, _)| h == host).unwrap().1;
        self.post(addr, "/v1/host/attest", t["token"].as_str(), &body)
    }

    fn decrypt(
        &self,
        dir: &Path,
        host: &str,
        volume: &str,
        blob: &[u8],
        auth: Value,
        ev: Value,
    ) -> (u16, Value) {
        let pubkey = std::fs::read(dir.join(host).join("host.pub")).unwrap();
        self.post(
            &self.kms,
            "/v1/DecryptForHost",
            None,
            &json!({
                "volume_id": volume,
                "ciphertext_blob": B64.encode(blob),
                "host_id": host,
                "host_public_key": B64.encode(pubkey),
                "customer_request": auth,
                "evidence": ev,
            }),
        )
    }
}

#[test]
fn key_release_is_bound_to_the_host_running_the_named_instance() {
    let b = bins();
    if !cluster::can_attest(&b) {
        bulkhead_testkit::skip_or_fail(
            "key_release_is_bound_to_the_host_running_the_named_instance: swtpm not on PATH or bulkhead-launcher not built",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    cluster::prepare(dir.path(), 2, true, &[]).unwrap();
    cluster::provision_attested(dir.path(), &b, 2).unwrap();
    let c = cluster::start(
        dir.path(),
        &StartOptions {
            hosts: 2,
            controller_args: backend_args(&b),
            bins: b,
            record: false,
            poll_interval_ms: 200,
            database_url: None,
            attest: Some(true),
            netns: None,
        },
    )
    .unwrap();
    let a = customer(&c, "tenant-a");
    // One whole core per host: the two instances land on different hosts.
    let mut placed = Vec::new();
    for _ in 0..2 {
        let r = a.ok("RunInstances", json!({"ImageId": "img-1"}));
        placed.push(
            r["Instances"][0]["InstanceId"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let db = rusqlite::Connection::open(dir.path().join("control/control.db")).unwrap();
    let host_of = |i: &str| -> String {
        db.query_row(
            "SELECT host_id FROM instances WHERE instance_id = ?1",
            [i],
            |r| r.get(0),
        )
        .unwrap()
    };
    let (i1, h1) = (placed[0].clone(), host_of(&placed[0]));
    let (i2, h2) = (placed[1].clone(), host_of(&placed[1]));
    assert_ne!(h1, h2, "both instances on one host");
    let v = a.ok("CreateVolume", json!({"SizeGiB": 1}))["VolumeId"]
        .as_str()
        .unwrap()
        .to_string();
    let blob: Vec<u8> = db
        .query_row(
            "SELECT ciphertext_blob FROM volumes WHERE volume_id = ?1",
            [&v],
            |r| r.get(0),
        )
        .unwrap();
    drop(db);
    let cp = ControlPlaneCreds::new(&c);
    let mut n = 0;
    // The customer attaches v to i1 (on h1): each call a fresh signed AttachVolume.
    let mut attach_i1 = || {
        n += 1;
        a.forwarded(
            "AttachVolume",
            json!({"VolumeId": v, "InstanceId": i1, "ClientToken": format!("t{n}")}),
        )
    };

    // A compromised control plane steers the release to h2. h2's controller will not quote for
    // an instance it does not run.
    let (st, r) = cp.attest(&h2, &cp.challenge(&h2), Some(&i1));
    assert_eq!((st, code(&r)), (404, "no_such_instance"), "{r}");
    // h2's genuine, fresh quote — unbound, or bound to the instance h2 does run — does not
    // release the key of an attach the customer signed for i1.
    let (st, ev) = cp.attest(&h2, &cp.challenge(&h2), None);
    assert_eq!(st, 200, "{ev}");
    let (st, r) = cp.decrypt(dir.path(), &h2, &v, &blob, attach_i1(), ev);
    assert_eq!((st, code(&r)), (403, "attest_not_bound_to_instance"), "{r}");
    let (st, ev) = cp.attest(&h2, &cp.challenge(&h2), Some(&i2));
    assert_eq!(st, 200, "{ev}");
    let (st, r) = cp.decrypt(dir.path(), &h2, &v, &blob, attach_i1(), ev);
    assert_eq!((st, code(&r)), (403, "attest_not_bound_to_instance"), "{r}");
    // Nor does h1's quote bound to another instance id, or unbound.
    let (st, ev) = cp.attest(&h1, &cp.challenge(&h1), None);
    assert_eq!(st, 200, "{ev}");
    let (st, r) = cp.decrypt(dir.path(), &h1, &v, &blob, attach_i1(), ev);
    assert_eq!((st, code(&r)), (403, "attest_not_bound_to_instance"), "{r}");
    let signed_for_i2 = a.forwarded(
        "AttachVolume",
        json!({"VolumeId": v, "InstanceId": i2, "ClientToken": "other"}),
    );
    let (st, ev) = cp.attest(&h1, &cp.challenge(&h1), Some(&i1));
    assert_eq!(st, 200, "{ev}");
    let (st, r) = cp.decrypt(dir.path(), &h1, &v, &blob, signed_for_i2, ev);
    assert_eq!((st, code(&r)), (403, "attest_not_bound_to_instance"), "{r}");

    // The host that runs i1, quoting for i1: released, and the sealed key opens with h1's key.
    let (st, ev) = cp.attest(&h1, &cp.challenge(&h1), Some(&i1));
    assert_eq!(st, 200, "{ev}");
    let (st, r) = cp.decrypt(dir.path(), &h1, &v, &blob, attach_i1(), ev);
    assert_eq!(st, 200, "{r}");
    let sealed = B64.decode(r["sealed_key"].as_str().unwrap()).unwrap();
    let hk = bulkhead_sealing::HostKey::read_file(&dir.path().join(&h1).join("host.key")).unwrap();
    bulkhead_sealing::open_volume_key(&hk, &v, &sealed).unwrap();

    // The real control plane does the same on the customer's AttachVolume.
    let r = a.ok("AttachVolume", json!({"VolumeId": v, "InstanceId": i1}));
    assert_eq!(r["State"], "attached", "{r}");
}
