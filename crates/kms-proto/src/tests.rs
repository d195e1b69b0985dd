#![allow(clippy::unwrap_used)]

use super::*;
use bulkhead_sealing::SEALED_BLOB_LEN;
use serde_json::json;

fn blob() -> SealedBlob {
    let b: Vec<u8> = (0..SEALED_BLOB_LEN)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    SealedBlob::from_slice(&b).unwrap()
}

#[test]
fn sealed_blobs_are_exactly_one_blob_in_either_encoding() {
    let b = blob();
    assert_eq!(SealedBlob::from_hex(&b.to_hex()), Some(b.clone()));
    assert_eq!(SealedBlob::from_base64(&b.to_base64()), Some(b.clone()));
    let short = &b.as_bytes()[1..];
    for bad in [
        ::hex::encode(short),
        ::hex::encode([b.as_bytes().as_slice(), &[0]].concat()),
        "zz".repeat(SEALED_BLOB_LEN),
        String::new(),
    ] {
        assert_eq!(SealedBlob::from_hex(&bad), None, "{bad}");
    }
    assert_eq!(SealedBlob::from_slice(short), None);
    assert_eq!(SealedBlob::from_base64("AAEC"), None);
    assert_eq!(SealedBlob::from_base64(&"A".repeat(100_000)), None);
    assert_eq!(
        format!("{b:?}"),
        format!("SealedBlob({SEALED_BLOB_LEN} bytes)")
    );
}

#[test]
fn answers_with_a_sealed_key_round_trip_with_the_same_json() {
    let b = blob();
    let d = DecryptForHostResponse {
        sealed_key: b.clone(),
        grant_id: "g-1".into(),
    };
    let v = serde_json::to_value(&d).unwrap();
    assert_eq!(v, json!({"sealed_key": b.to_base64(), "grant_id": "g-1"}));
    let back: DecryptForHostResponse = serde_json::from_value(v).unwrap();
    assert_eq!(back.sealed_key, b);
    let s = SealVpcKeyResponse {
        vpc_number: 7,
        epoch: 2,
        sealed_epoch_key: b.clone(),
    };
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(
        v,
        json!({"vpc_number": 7, "epoch": 2, "sealed_epoch_key": b.to_hex()})
    );
    let back: SealVpcKeyResponse = serde_json::from_value(v).unwrap();
    assert_eq!(back.sealed_epoch_key, b);
    // An answer whose blob is not one whole blob does not parse.
    assert!(serde_json::from_value::<SealVpcKeyResponse>(
        json!({"vpc_number": 7, "epoch": 2, "sealed_epoch_key": "abcd"})
    )
    .is_err());
    assert!(serde_json::from_value::<DecryptForHostResponse>(
        json!({"sealed_key": "AAEC", "grant_id": "g"})
    )
    .is_err());
}

fn forwarded() -> CustomerRequest {
    CustomerRequest::from(ForwardedRequest {
        authorization: "BH1-HMAC-SHA256 Credential=X".into(),
        parts: SignedParts {
            method: "POST".into(),
            path: "/v1/AttachVolume".into(),
            query: String::new(),
            host: "cp:8443".into(),
            date: "20261205T000000Z".into(),
            body: "{}".into(),
            nonce: "abcdefabcdefabcdef".into(),
        },
    })
}

#[test]
fn requests_round_trip_and_refuse_unknown_fields() {
    fn rt<T: Serialize + serde::de::DeserializeOwned + std::fmt::Debug>(v: &T) {
        let a = serde_json::to_value(v).unwrap();
        let back: T = serde_json::from_value(a.clone()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), a);
    }
    rt(&DecryptForHostRequest {
        volume_id: "vol-1".into(),
        ciphertext_blob: "AA".into(),
        host_id: "h1".into(),
        host_public_key: "AA".into(),
        customer_request: forwarded(),
        evidence: None,
    });
    rt(&SealVpcKeyRequest {
        customer_request: CustomerRequest::from(SigV4Forwarded {
            method: "POST".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![("host".into(), "cp".into())],
            body: "Action=RunInstances".into(),
        }),
        vpc_id: "vpc-1".into(),
        epoch: 1,
        instance_id: "i-1".into(),
        host_id: "h1".into(),
        host_public_key: "AA".into(),
        evidence: None,
    });
    rt(&GenerateDataKeyRequest {
        key_id: None,
        volume_id: "vol-1".into(),
        customer_request: forwarded(),
    });
    rt(&ChallengeRequest {
        host_id: "h1".into(),
    });
    for bad in [
        json!({"host_id": "h1", "extra": 1}),
        json!({"host_id": 5}),
        json!({}),
    ] {
        assert!(serde_json::from_value::<ChallengeRequest>(bad).is_err());
    }
    let mut v = serde_json::to_value(RevokeGrantRequest {
        key_id: "k".into(),
        volume_id: "v".into(),
        customer_request: forwarded(),
    })
    .unwrap();
    v["customer_request"]["parts"]["debug"] = json!(true);
    assert!(serde_json::from_value::<RevokeGrantRequest>(v).is_err());
}

#[test]
fn every_call_names_its_own_operation() {
    fn op<C: KmsCall>(_: &C) -> KmsOp {
        C::OP
    }
    assert_eq!(
        op(&ChallengeRequest {
            host_id: "h".into()
        }),
        KmsOp::Challenge
    );
    for o in KmsOp::ALL {
        assert_eq!(KmsOp::from_path(&format!("/v1/{}", o.name())), Some(*o));
    }
    assert_eq!(KmsOp::from_path("/v1/Export"), None);
    assert_eq!(vpc_sealing_id(7, 2), "netcard-vpc-7-epoch-2");
}

#[test]
fn fuzz_entry_takes_the_seeds() {
    let sealed = format!(
        "\x0a{{\"vpc_number\":7,\"epoch\":1,\"sealed_epoch_key\":\"{}\"}}",
        blob().to_hex()
    );
    for seed in [
        &b"\x06{\"host_id\":\"h1\"}"[..],
        b"\x0b/v1/Challenge",
        sealed.as_bytes(),
        b"",
        b"\x03\xff",
    ] {
        fuzz_body(seed);
    }
}
