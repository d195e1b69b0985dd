//! Instance storage through the control plane's real daemons (a two-host cluster on the
//! detached backend): RunInstances' `InstanceStorageGiB` is checked (typed refusals, nothing
//! created), stored with the instance, shown by DescribeInstances and handed to the chosen
//! host's controller in CreateInstance. The disk itself (card, key, crypto-erase) is tested with
//! a real guest in `crates/controller/tests/instance_storage.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};

/// The host controller's own DescribeInstance of `id` on `host` (with a control-plane token),
/// or `None` if that host does not know it.
fn on_host(c: &bulkhead_devcluster::cluster::Cluster, host: &str, id: &str) -> Option<Value> {
    let cp = as_control_plane(c);
    let (st, t) = post(
        &cp,
        &c.token_addr,
        "/v1/Mint",
        None,
        &json!({"hosts": [host], "operations": ["DescribeInstance"],
                "resources": [format!("instance:{id}")], "ttl_secs": 60}),
    );
    assert_eq!(st, 200, "{t}");
    let addr = &c.host_addrs.iter().find(|(h, _)| h == host).unwrap().1;
    let auth = format!("Bearer {}", t["token"].as_str().unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt
        .block_on(cp.request(
            addr,
            "GET",
            &format!("/v1/instances/{id}"),
            &[("authorization", auth.as_str())],
            Vec::new(),
        ))
        .unwrap();
    (r.status == 200).then(|| serde_json::from_slice(&r.body).unwrap())
}

#[test]
fn run_instances_carries_instance_storage_to_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let c = up(dir.path(), false);
    let a = customer(&c, "t-store");

    // Out of range or not a number: a typed refusal, and nothing exists afterwards.
    for (v, want) in [
        (json!(0), "bad_instance_storage"),
        (json!(65), "bad_instance_storage"),
        (json!("4"), "body_malformed"),
        (json!(-1), "body_malformed"),
    ] {
        let (st, r) = a.call(
            "RunInstances",
            json!({"ImageId": "img-1", "InstanceStorageGiB": v}),
        );
        assert_eq!((st, code(&r)), (400, want), "{v}: {r}");
    }
    let list = a.ok("DescribeInstances", json!({}));
    assert_eq!(list["Instances"].as_array().unwrap().len(), 0, "{list}");

    let v = a.ok(
        "RunInstances",
        json!({"ImageId": "img-1", "InstanceStorageGiB": 2}),
    );
    let id = v["Instances"][0]["InstanceId"]
        .as_str()
        .unwrap()
        .to_string();
    let list = a.ok("DescribeInstances", json!({"InstanceIds": [id]}));
    assert_eq!(list["Instances"][0]["InstanceStorageGiB"], 2, "{list}");

    // The host that runs it was told (and only that host knows the instance).
    let seen: Vec<Value> = c
        .host_addrs
        .iter()
        .filter_map(|(h, _)| on_host(&c, h, &id))
        .collect();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["instance_storage_gib"], 2, "{}", seen[0]);

    // An instance without it shows none, here and on its host.
    let plain = run(&a);
    let list = a.ok("DescribeInstances", json!({"InstanceIds": [plain]}));
    assert!(list["Instances"][0].get("InstanceStorageGiB").is_none());
    let seen: Vec<Value> = c
        .host_addrs
        .iter()
        .filter_map(|(h, _)| on_host(&c, h, &plain))
        .collect();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].get("instance_storage_gib").is_none(), "{}", seen[0]);
}
