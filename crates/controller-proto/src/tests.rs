#![allow(clippy::unwrap_used)]

use super::*;
use crate::calls::*;
use serde_json::json;

/// Encodes with serde, decodes with [`decode_body`], and checks the value is unchanged and the
/// JSON is the same as `expected`.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    v: &T,
    expected: serde_json::Value,
) {
    let bytes = serde_json::to_vec(v).unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
        expected
    );
    assert_eq!(&decode_body::<T>(&bytes).unwrap(), v);
}

fn network() -> NetworkRequest {
    NetworkRequest {
        vpc: 7,
        card_id: 1,
        mac: "02:00:00:00:01:05".into(),
        ip: "10.0.1.5".into(),
        prefix: 24,
        gateway: None,
        mtu: Some(1400),
        allow: vec!["tcp:7000:10.0.0.0/16".into()],
        routes: vec!["10.0.1.6=2@10.77.0.2:40007".into()],
    }
}

#[test]
fn every_request_body_round_trips_with_its_json() {
    round_trip(&DrainRequest { reason: None }, json!({"reason": null}));
    round_trip(
        &DrainRequest {
            reason: Some("maintenance".into()),
        },
        json!({"reason": "maintenance"}),
    );
    round_trip(
        &AttestRequest {
            nonce: "00".repeat(32),
            instance_id: Some("i-1".into()),
            credential: None,
        },
        json!({"nonce": "00".repeat(32), "instance_id": "i-1"}),
    );
    round_trip(
        &AttestRequest {
            nonce: "ab".into(),
            instance_id: None,
            credential: None,
        },
        json!({"nonce": "ab"}),
    );
    round_trip(
        &AttestRequest {
            nonce: "ab".into(),
            instance_id: None,
            credential: Some(bulkhead_rot_proto::CredentialChallenge {
                id_object: "00".into(),
                encrypted_secret: "11".into(),
            }),
        },
        json!({"nonce": "ab", "credential": {"id_object": "00", "encrypted_secret": "11"}}),
    );
    let mut create = CreateInstanceRequest {
        instance_id: "i-1".into(),
        image: "test-guest".into(),
        vcpus: 2,
        memory_mib: 256,
        user_data: None,
        network: None,
        instance_storage_gib: None,
    };
    // Optional fields absent are not sent (as the control plane always sent them).
    round_trip(
        &create,
        json!({"instance_id": "i-1", "image": "test-guest", "vcpus": 2, "memory_mib": 256}),
    );
    create.user_data = Some("echo hi".into());
    create.instance_storage_gib = Some(4);
    create.network = Some(network());
    round_trip(
        &create,
        json!({"instance_id": "i-1", "image": "test-guest", "vcpus": 2, "memory_mib": 256,
            "user_data": "echo hi", "instance_storage_gib": 4,
            "network": {"vpc": 7, "card_id": 1, "mac": "02:00:00:00:01:05", "ip": "10.0.1.5",
                "prefix": 24, "mtu": 1400, "allow": ["tcp:7000:10.0.0.0/16"],
                "routes": ["10.0.1.6=2@10.77.0.2:40007"]}}),
    );
    round_trip(
        &AttachVolumeRequest {
            volume_id: "vol-1".into(),
            sealed_key: "AAEC".into(),
            storage: None,
        },
        json!({"volume_id": "vol-1", "sealed_key": "AAEC"}),
    );
    round_trip(
        &AttachVolumeRequest {
            volume_id: "vol-1".into(),
            sealed_key: "AAEC".into(),
            storage: Some(VolumeStorageRequest {
                node: "storage-1".into(),
                nbd_addr: "10.0.0.9:10809".into(),
            }),
        },
        json!({"volume_id": "vol-1", "sealed_key": "AAEC",
            "storage": {"node": "storage-1", "nbd_addr": "10.0.0.9:10809"}}),
    );
    round_trip(
        &AttachNetworkRequest {
            epoch: 3,
            sealed_epoch_key: "ab".into(),
        },
        json!({"epoch": 3, "sealed_epoch_key": "ab"}),
    );
    round_trip(
        &NetworkRoutesRequest {
            routes: vec!["r".into()],
        },
        json!({"routes": ["r"]}),
    );
    round_trip(
        &NetworkRulesRequest {
            allow: vec!["all:0.0.0.0/0".into()],
        },
        json!({"allow": ["all:0.0.0.0/0"]}),
    );
}

#[test]
fn every_answer_round_trips() {
    fn rt<T: Serialize + WireResponse + PartialEq + std::fmt::Debug>(v: &T) {
        let bytes = serde_json::to_vec(v).unwrap();
        assert_eq!(&T::decode(&bytes).unwrap(), v);
    }
    let head = bulkhead_audit::Head {
        seq: 9,
        hash: "ab".into(),
        checkpoint: 1,
    };
    rt(&HostDescription {
        host_id: "h1".into(),
        controller_version: "0.1.0".into(),
        backend: "host".into(),
        draining: false,
        vcpus_total: 8,
        vcpus_free: 4,
        memory_mib_total: 1024,
        memory_mib_free: 512,
        instances: 1,
        audit_head: head.clone(),
    });
    rt(&Health {
        status: "ok".into(),
        audit_records: 3,
        audit_writable: true,
        alerts: 0,
        audit_head: head,
        release: Some(2),
        controller_release: None,
        net_cards: vec![NetCardRelease {
            instance_id: "i-1".into(),
            pid: 42,
            release: Some(2),
        }],
    });
    let mut d = InstanceDescription {
        instance_id: "i-1".into(),
        image: "test-guest".into(),
        vcpus: 1,
        memory_mib: 128,
        state: InstanceState::Running,
        volumes: vec!["vol-1".into()],
        instance_storage_gib: None,
        net_endpoint: None,
    };
    rt(&d);
    let v = serde_json::to_value(&d).unwrap();
    assert!(v.get("net_endpoint").is_none() && v["state"] == "running");
    d.net_endpoint = Some("10.0.0.1:4000".into());
    d.instance_storage_gib = Some(2);
    rt(&d);
    rt(&ConsoleOutput {
        instance_id: "i-1".into(),
        output: "boot\n".into(),
    });
    rt(&AuditPage {
        records: vec!["{}".into()],
        next_after: 1,
    });
    rt(&AlertList {
        alerts: vec![Alert {
            id: 1,
            rule: "r".into(),
            subject: "s".into(),
            detail: "d".into(),
            time: 5,
        }],
    });
    rt(&Ack {
        request_id: "x".into(),
        status: "attached".into(),
    });
    rt(&NetworkAttached {
        request_id: "x".into(),
        net_endpoint: "10.0.0.1:4000".into(),
    });
    rt(&RelayedEvidence(
        bulkhead_rot_proto::HostEvidence::Measured(bulkhead_rot_proto::Evidence {
            host: "h1".into(),
            quote: bulkhead_rot_proto::RawQuote {
                attest: "ff54".into(),
                signature: "00".into(),
            },
            event_log: String::new(),
        }),
    ));
    rt(&ErrorBody {
        error: ErrorDetail {
            code: "no_such_instance".into(),
            message: "m".into(),
            request_id: "x".into(),
        },
    });
    assert_eq!(
        MetricsText::decode(b"a 1\n").unwrap(),
        MetricsText("a 1\n".into())
    );
    assert_eq!(MetricsText::decode(b"\xff"), Err(ResponseError::NotUtf8));
    assert_eq!(Ack::decode(b"{}"), Err(ResponseError::Malformed));
}

#[test]
fn bodies_refuse_unknown_fields_bad_types_and_oversize() {
    let code = |r: Result<CreateInstanceRequest, RequestError>| r.unwrap_err().code();
    assert_eq!(
        code(decode_body(
            br#"{"instance_id":"i","image":"x","vcpus":1,"memory_mib":128,"debug":true}"#
        )),
        "body_unknown_field"
    );
    assert_eq!(
        code(decode_body(
            br#"{"instance_id":"i","image":"x","vcpus":"1","memory_mib":128}"#
        )),
        "body_invalid"
    );
    assert_eq!(
        code(decode_body(br#"{"instance_id":"i","image":"x","vcpus":1}"#)),
        "body_invalid"
    );
    assert_eq!(code(decode_body(b"{")), "body_malformed");
    assert_eq!(code(decode_body(b"\xff\xfe")), "body_not_utf8");
    assert_eq!(
        code(decode_body(&vec![b' '; MAX_BODY_BYTES + 1])),
        "body_too_large"
    );
    // Nested objects are strict too.
    let r: Result<AttachVolumeRequest, _> = decode_body(
        br#"{"volume_id":"v","sealed_key":"AA","storage":{"node":"n","nbd_addr":"a","x":1}}"#,
    );
    assert_eq!(r.unwrap_err().code(), "body_unknown_field");
    let r: Result<DrainRequest, _> = decode_body(br#"{"reason":"x","force":true}"#);
    assert_eq!(r.unwrap_err().code(), "body_unknown_field");
    // A refusal needs only its code.
    assert_eq!(
        ErrorBody::decode(br#"{"error":{"code":"quota_exceeded"}}"#).map(|e| e.error.code),
        Some("quota_exceeded".to_string())
    );
    assert_eq!(ErrorBody::decode(br#"{"error":{"message":"m"}}"#), None);
    assert_eq!(ErrorBody::decode(b"busy"), None);
    // Answers are read leniently: a newer controller may add fields.
    assert!(Ack::decode(br#"{"request_id":"r","status":"ok","extra":1}"#).is_ok());
}

#[test]
fn every_operation_has_one_route_and_routes_resolve() {
    for op in Operation::ALL {
        assert_eq!(ROUTES.iter().filter(|r| r.op == *op).count(), 1, "{op}");
    }
    assert_eq!(ROUTES.len(), Operation::ALL.len());
    let (r, ids) = find_route("DELETE", "/v1/instances/i-1/volumes/vol-2").unwrap();
    assert_eq!((r.op, ids), (Operation::DetachVolume, vec!["i-1", "vol-2"]));
    assert_eq!(
        find_route("DELETE", "/v1/host").unwrap_err(),
        RequestError::MethodNotAllowed
    );
    assert_eq!(
        find_route("GET", "/v1/exec").unwrap_err(),
        RequestError::NoSuchRoute
    );
}

/// A call's method, path and body are what the route table says: each one built is routed by
/// [`find_route`] to its own operation, and its body decodes as that route's body.
#[test]
fn calls_build_the_paths_the_route_table_routes() {
    fn check<C: ControllerCall>(c: &C, path: &str, resources: &[&str]) {
        assert_eq!(c.path(), path);
        let (p, q) = path.split_once('?').unwrap_or((path, ""));
        let (route, _) = find_route(C::METHOD.as_str(), p).unwrap();
        assert_eq!(route.op, C::OP);
        assert_eq!(route_of(C::OP).map(|r| r.path), Some(C::PATH));
        assert_eq!(route.body == BodyKind::None, c.body().is_none(), "{path}");
        if C::OP == Operation::ReadAudit {
            assert!(parse_audit_query(Some(q)).is_ok());
        }
        assert_eq!(c.resources(), resources);
    }
    let id = || "i-1".to_string();
    check(&DescribeHost, "/v1/host", &["host"]);
    check(&GetHealth, "/v1/health", &["host"]);
    check(&GetMetrics, "/v1/metrics", &["host"]);
    check(&ListAlerts, "/v1/alerts", &["host"]);
    check(
        &ReadAudit {
            after: 5,
            limit: 500,
        },
        "/v1/audit?after=5&limit=500",
        &["host"],
    );
    check(&DrainHost::default(), "/v1/host/drain", &["host"]);
    let up = UploadArtefact {
        sha256: "ab".repeat(32),
        bytes: vec![1, 2, 3],
    };
    assert_eq!(up.raw_body(), Some(&[1u8, 2, 3][..]));
    assert_eq!(up.path(), format!("/v1/host/artefacts/{}", "ab".repeat(32)));
    assert_eq!(up.resources(), vec!["host".to_string()]);
    check(
        &DeployRelease(DeployReleaseRequest {
            release: "{}".into(),
        }),
        "/v1/host/releases",
        &["host"],
    );
    check(
        &AttestHost(AttestRequest {
            nonce: "00".into(),
            instance_id: Some(id()),
            credential: None,
        }),
        "/v1/host/attest",
        &["host", "instance:i-1"],
    );
    check(
        &CreateInstance(CreateInstanceRequest {
            instance_id: id(),
            image: "g".into(),
            vcpus: 1,
            memory_mib: 128,
            user_data: None,
            network: None,
            instance_storage_gib: None,
        }),
        "/v1/instances",
        &["instance:i-1"],
    );
    let i = || "instance:i-1";
    check(
        &DescribeInstance { instance_id: id() },
        "/v1/instances/i-1",
        &[i()],
    );
    check(
        &StartInstance { instance_id: id() },
        "/v1/instances/i-1/start",
        &[i()],
    );
    check(
        &StopInstance { instance_id: id() },
        "/v1/instances/i-1/stop",
        &[i()],
    );
    check(
        &RebootInstance { instance_id: id() },
        "/v1/instances/i-1/reboot",
        &[i()],
    );
    check(
        &TerminateInstance { instance_id: id() },
        "/v1/instances/i-1/terminate",
        &[i()],
    );
    check(
        &GetConsole { instance_id: id() },
        "/v1/instances/i-1/console",
        &[i()],
    );
    check(
        &AttachVolume {
            instance_id: id(),
            body: AttachVolumeRequest {
                volume_id: "vol-1".into(),
                sealed_key: "AA".into(),
                storage: None,
            },
        },
        "/v1/instances/i-1/volumes",
        &[i(), "volume:vol-1"],
    );
    check(
        &DetachVolume {
            instance_id: id(),
            volume_id: "vol-1".into(),
        },
        "/v1/instances/i-1/volumes/vol-1",
        &[i(), "volume:vol-1"],
    );
    check(
        &AttachNetwork {
            instance_id: id(),
            body: AttachNetworkRequest {
                epoch: 1,
                sealed_epoch_key: "ab".into(),
            },
        },
        "/v1/instances/i-1/network",
        &[i()],
    );
    check(
        &SetNetworkRoutes {
            instance_id: id(),
            body: NetworkRoutesRequest { routes: vec![] },
        },
        "/v1/instances/i-1/network/routes",
        &[i()],
    );
    check(
        &SetNetworkRules {
            instance_id: id(),
            body: NetworkRulesRequest { allow: vec![] },
        },
        "/v1/instances/i-1/network/rules",
        &[i()],
    );
}

#[test]
fn audit_query_is_bounded() {
    assert_eq!(parse_audit_query(None), Ok((0, DEFAULT_AUDIT_PAGE)));
    assert_eq!(parse_audit_query(Some("after=5&limit=10")), Ok((5, 10)));
    for bad in [
        "limit=0",
        "limit=1001",
        "after=-1",
        "x=1",
        "after",
        "after=1&debug=1",
    ] {
        assert_eq!(
            parse_audit_query(Some(bad)),
            Err(RequestError::BadQuery),
            "{bad}"
        );
    }
}

#[test]
fn fuzz_entry_takes_the_seeds() {
    for seed in [
        &b"\x02{\"instance_id\":\"i\",\"image\":\"x\",\"vcpus\":1,\"memory_mib\":128}"[..],
        b"\x03{\"volume_id\":\"v\",\"sealed_key\":\"AA\"}",
        b"\x07after=1&limit=2",
        b"\x0bGET /v1/instances/i-1",
        b"",
        b"\x00\xff",
    ] {
        fuzz_body(seed);
    }
}
