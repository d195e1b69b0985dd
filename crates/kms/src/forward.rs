//! The customer's own signed request, as the control plane forwards it to the KMS (a
//! forward-access session): either Bulkhead's JSON API signed with `BH1-HMAC-SHA256`
//! ([`ForwardedRequest`]) or an EC2 Query API request signed with AWS Signature Version 4
//! ([`SigV4Forwarded`]), forwarded as the raw parts that were signed (method, path, query,
//! headers, body) and verified here again with `bulkhead_ec2_query::sigv4` and the KMS's own
//! copy of the customer's secret. The control plane alone cannot make either verify.

use bulkhead_ec2_query::sigv4::{Authorization as V4Authorization, SigV4Error};
use bulkhead_ec2_query::{Ec2Request, HttpRequestParts, SecretKey, Verifier};
use serde_json::{json, Value};

pub use bulkhead_kms_proto::{CustomerRequest, ForwardedRequest, SigV4Envelope, SigV4Forwarded};

/// Most headers a forwarded SigV4 request may carry.
pub const MAX_FORWARDED_HEADERS: usize = 40;

/// Why a forwarded SigV4 request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("signature: {0}")]
    Signature(SigV4Error),
    #[error("the signed request is not an EC2 Query request for an allowed action")]
    WrongAction,
    #[error("the forwarded request is malformed")]
    Malformed,
}

/// A forwarded SigV4 request that verified: who signed, the signature (to record once), and
/// the fields of the signed action the KMS checks (`VolumeId`, `InstanceId`, `KmsKeyId`), in
/// the JSON API's names.
#[derive(Debug, Clone)]
pub struct VerifiedForward {
    pub access_key_id: String,
    pub signature: [u8; 32],
    /// The signed action (one of those allowed).
    pub action: &'static str,
    pub body: Value,
}

/// The access key id a forwarded SigV4 request names (before anything is verified).
pub fn access_key_of(f: &SigV4Forwarded) -> Result<String, ForwardError> {
    Ok(authorization(f)?.access_key_id)
}

fn authorization(f: &SigV4Forwarded) -> Result<V4Authorization, ForwardError> {
    let mut it = f
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("authorization"));
    let raw = it
        .next()
        .ok_or(ForwardError::Signature(SigV4Error::MissingAuthorization))?;
    if it.next().is_some() {
        return Err(ForwardError::Signature(SigV4Error::DuplicateAuthorization));
    }
    V4Authorization::parse(raw.1.as_bytes()).map_err(ForwardError::Signature)
}

/// Verifies `f` at `now` within `window_secs` with `secret` (the signer's), and checks that it
/// is a POST of one of `actions` (not a dry run). The region is the one the customer signed
/// for (the control plane checked it against its own).
pub fn verify(
    f: &SigV4Forwarded,
    secret: SecretKey,
    now: u64,
    window_secs: u64,
    actions: &[&str],
) -> Result<VerifiedForward, ForwardError> {
    if f.headers.len() > MAX_FORWARDED_HEADERS {
        return Err(ForwardError::Malformed);
    }
    let auth = authorization(f)?;
    let headers: Vec<(&str, &[u8])> = f
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    let parts = HttpRequestParts {
        method: &f.method,
        path: &f.path,
        query: &f.query,
        headers: &headers,
        body: f.body.as_bytes(),
    };
    let now = i64::try_from(now).map_err(|_| ForwardError::Malformed)?;
    let akid = auth.access_key_id.clone();
    let secret = std::cell::Cell::new(Some(secret));
    let lookup = |k: &str| if k == akid { secret.take() } else { None };
    let v = Verifier::new(auth.region.clone())
        .with_window_secs(window_secs)
        .verify(&parts, now, &lookup)
        .map_err(ForwardError::Signature)?;
    if f.method != "POST" || f.path != "/" {
        return Err(ForwardError::WrongAction);
    }
    let call = Ec2Request::parse(f.body.as_bytes()).map_err(|_| ForwardError::WrongAction)?;
    if call.dry_run || !actions.contains(&call.request.action()) {
        return Err(ForwardError::WrongAction);
    }
    Ok(VerifiedForward {
        access_key_id: v.access_key_id,
        signature: v.signature,
        action: call.request.action(),
        body: checked_fields(&call.request),
    })
}

/// The fields of a signed Query request that the KMS checks, in the JSON API's names (what a
/// BH1-signed JSON body of the same action carries): the volume a CreateSnapshot copies, the
/// snapshot a DeleteSnapshot destroys or a CreateVolume starts from.
fn checked_fields(request: &Ec2Request) -> Value {
    match request {
        Ec2Request::CreateVolume(c) => match &c.snapshot_id {
            Some(s) => json!({ "KmsKeyId": c.kms_key_id, "SnapshotId": s.as_str() }),
            None => json!({ "KmsKeyId": c.kms_key_id }),
        },
        Ec2Request::AttachVolume(a) => {
            json!({ "VolumeId": a.volume_id.as_str(), "InstanceId": a.instance_id.as_str() })
        }
        Ec2Request::DeleteVolume { volume_id } => json!({ "VolumeId": volume_id.as_str() }),
        Ec2Request::CreateSnapshot(c) => json!({ "VolumeId": c.volume_id.as_str() }),
        Ec2Request::DeleteSnapshot { snapshot_id } => {
            json!({ "SnapshotId": snapshot_id.as_str() })
        }
        _ => json!({}),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bh1_and_sigv4_forwards_deserialize_to_their_variant() {
        let v4 = json!({"sigv4": {"method": "POST", "path": "/", "query": "", "headers": [["host", "h"]], "body": "Action=AttachVolume"}});
        assert!(matches!(
            serde_json::from_value::<CustomerRequest>(v4).unwrap(),
            CustomerRequest::SigV4(_)
        ));
        let bh1 = json!({"authorization": "x", "parts": {"method": "POST", "path": "/v1/AttachVolume", "query": "", "host": "h", "date": "d", "body": "{}", "nonce": "n"}});
        assert!(matches!(
            serde_json::from_value::<CustomerRequest>(bh1).unwrap(),
            CustomerRequest::Bh1(_)
        ));
        let extra = json!({"sigv4": {"method": "POST", "path": "/", "query": "", "headers": [], "body": "", "evil": 1}});
        assert!(serde_json::from_value::<CustomerRequest>(extra).is_err());
    }

    /// The snapshot actions name what the KMS checks under the JSON API's names.
    #[test]
    fn snapshot_actions_name_their_volume_or_snapshot() {
        let fields = |body: &str| {
            let call = Ec2Request::parse(format!("Version=2016-11-15&{body}").as_bytes()).unwrap();
            checked_fields(&call.request)
        };
        assert_eq!(
            fields("Action=CreateSnapshot&VolumeId=vol-1&Description=d"),
            json!({"VolumeId": "vol-1"})
        );
        assert_eq!(
            fields("Action=DeleteSnapshot&SnapshotId=snap-2"),
            json!({"SnapshotId": "snap-2"})
        );
        assert_eq!(
            fields("Action=CreateVolume&Size=2&AvailabilityZone=z&SnapshotId=snap-2"),
            json!({"KmsKeyId": null, "SnapshotId": "snap-2"})
        );
        assert_eq!(
            fields("Action=CreateVolume&Size=2&AvailabilityZone=z&Encrypted=true&KmsKeyId=k-1"),
            json!({"KmsKeyId": "k-1"})
        );
        assert_eq!(fields("Action=DescribeSnapshots"), json!({}));
    }

    #[test]
    fn unsigned_or_foreign_forwards_are_refused() {
        let f = SigV4Forwarded {
            method: "POST".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![("host".into(), "h".into())],
            body: "Action=AttachVolume&Version=2016-11-15".into(),
        };
        assert!(matches!(
            verify(
                &f,
                SecretKey::from_raw_secret(b"k"),
                0,
                300,
                &["AttachVolume"]
            ),
            Err(ForwardError::Signature(SigV4Error::MissingAuthorization))
        ));
        let mut g = f.clone();
        g.headers.push((
            "authorization".into(),
            "AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host;x-amz-date, Signature=0000000000000000000000000000000000000000000000000000000000000000".into(),
        ));
        g.headers
            .push(("x-amz-date".into(), "20260101T000000Z".into()));
        assert!(matches!(
            verify(
                &g,
                SecretKey::from_raw_secret(b"k"),
                1_767_225_600,
                300,
                &["AttachVolume"]
            ),
            Err(ForwardError::Signature(SigV4Error::SignatureMismatch))
        ));
    }
}
