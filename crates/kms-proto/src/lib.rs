//! `bulkhead-kms-proto`: the KMS API on the wire, shared by the KMS (which parses requests and
//! writes answers) and its one caller, the control plane, so every operation, field and limit
//! exists once. No I/O.
//!
//! `POST /v1/<Operation>` with a strict JSON body, over mutual TLS 1.3. Only the control
//! plane's certificate may call it, and every operation on a customer's key carries that
//! customer's own signed request ([`CustomerRequest`]: [`ForwardedRequest`] or
//! [`SigV4Forwarded`]), which the KMS verifies again itself.
//!
//! [`KmsCall`] ties each request struct to its operation and its typed answer. A sealed key
//! travels as one typed value, [`SealedBlob`] (exactly one `bulkhead-sealing` blob), from the
//! KMS's answer to the control plane.

use serde::{Deserialize, Serialize};

mod sealed;
pub use sealed::SealedBlob;

// ---- the customer's signed request, forwarded --------------------------------------------

/// The parts of an HTTP request that are signed (BH1's, defined once with its signer and
/// verifier).
pub use bulkhead_ec2_query::bh1::SignedParts;

/// A customer's signed request, as forwarded by the control plane to the KMS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardedRequest {
    pub authorization: String,
    pub parts: SignedParts,
}

/// An EC2 Query request exactly as the customer signed it (SigV4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigV4Forwarded {
    pub method: String,
    /// The request path as on the request line (`/`).
    pub path: String,
    /// The raw URL query, or `""`.
    pub query: String,
    /// The signed headers and `authorization`, as received (name, value).
    pub headers: Vec<(String, String)>,
    /// The form body exactly as received.
    pub body: String,
}

/// `{"sigv4": {...}}` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigV4Envelope {
    pub sigv4: SigV4Forwarded,
}

/// A forwarded customer request of either protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CustomerRequest {
    Bh1(ForwardedRequest),
    SigV4(SigV4Envelope),
}

impl From<ForwardedRequest> for CustomerRequest {
    fn from(f: ForwardedRequest) -> Self {
        CustomerRequest::Bh1(f)
    }
}

impl From<SigV4Forwarded> for CustomerRequest {
    fn from(sigv4: SigV4Forwarded) -> Self {
        CustomerRequest::SigV4(SigV4Envelope { sigv4 })
    }
}

// ---- operations ---------------------------------------------------------------------------

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 32 * 1024;

/// Every operation the KMS offers. There are no others (no export, no plaintext decrypt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmsOp {
    RegisterCustomer,
    CreateKey,
    GenerateDataKey,
    DecryptForHost,
    RevokeGrant,
    DestroyDataKey,
    Challenge,
    CreateVpcKey,
    SealVpcKey,
    ShareDataKey,
}

impl KmsOp {
    pub const ALL: &'static [KmsOp] = &[
        KmsOp::RegisterCustomer,
        KmsOp::CreateKey,
        KmsOp::GenerateDataKey,
        KmsOp::DecryptForHost,
        KmsOp::RevokeGrant,
        KmsOp::DestroyDataKey,
        KmsOp::Challenge,
        KmsOp::CreateVpcKey,
        KmsOp::SealVpcKey,
        KmsOp::ShareDataKey,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KmsOp::RegisterCustomer => "RegisterCustomer",
            KmsOp::CreateKey => "CreateKey",
            KmsOp::GenerateDataKey => "GenerateDataKey",
            KmsOp::DecryptForHost => "DecryptForHost",
            KmsOp::RevokeGrant => "RevokeGrant",
            KmsOp::DestroyDataKey => "DestroyDataKey",
            KmsOp::Challenge => "Challenge",
            KmsOp::CreateVpcKey => "CreateVpcKey",
            KmsOp::SealVpcKey => "SealVpcKey",
            KmsOp::ShareDataKey => "ShareDataKey",
        }
    }

    pub fn from_path(path: &str) -> Option<KmsOp> {
        let name = path.strip_prefix("/v1/")?;
        KmsOp::ALL.iter().copied().find(|o| o.name() == name)
    }

    /// The customer-API action whose signed request must be forwarded for this operation.
    pub fn customer_action(self) -> Option<&'static str> {
        match self {
            KmsOp::RegisterCustomer | KmsOp::Challenge => None,
            KmsOp::CreateKey => Some("CreateKey"),
            KmsOp::GenerateDataKey => Some("CreateVolume"),
            KmsOp::DecryptForHost => Some("AttachVolume"),
            KmsOp::RevokeGrant => Some("RevokeGrant"),
            KmsOp::DestroyDataKey => Some("DeleteVolume"),
            // A default VPC is made by the tenant's first RunInstances (see `CREATE_VPC_ACTIONS`).
            KmsOp::CreateVpcKey => Some("CreateVpc"),
            KmsOp::SealVpcKey => Some("RunInstances"),
            // Or a `CreateVolume` naming the snapshot (see `SHARE_DATA_KEY_ACTIONS`).
            KmsOp::ShareDataKey => Some("CreateSnapshot"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterCustomerRequest {
    pub tenant_id: String,
    pub access_key_id: String,
    /// The customer's signing secret, base64. Stored only wrapped under the root key.
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    pub customer_request: CustomerRequest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyResponse {
    pub key_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateDataKeyRequest {
    /// `None`: the tenant's default key (created on first use).
    pub key_id: Option<String>,
    pub volume_id: String,
    pub customer_request: CustomerRequest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateDataKeyResponse {
    pub key_id: String,
    /// The data key encrypted under the CMK, base64. There is no plaintext in the response.
    pub ciphertext_blob: String,
    pub grant_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecryptForHostRequest {
    pub volume_id: String,
    pub ciphertext_blob: String,
    pub host_id: String,
    /// The host's 38-byte public key file, base64.
    pub host_public_key: String,
    pub customer_request: CustomerRequest,
    /// The host's fresh attestation evidence (a TPM quote over a nonce from
    /// [`KmsOp::Challenge`], and its event log; from a sealed host, its boot evidence).
    /// Required when the KMS enforces attestation.
    #[serde(default)]
    pub evidence: Option<bulkhead_rot_proto::HostEvidence>,
}

/// `Challenge`: a one-time nonce for one host's next quote.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {
    pub host_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeResponse {
    /// 32 bytes, hex. Valid for one quote by that host, for a minute.
    pub nonce: String,
    /// Whether this KMS requires attestation evidence in `DecryptForHost`.
    pub required: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecryptForHostResponse {
    /// The data key sealed (HPKE) to the host key for this volume: one sealed blob, base64.
    #[serde(with = "sealed::base64")]
    pub sealed_key: SealedBlob,
    pub grant_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeGrantRequest {
    pub key_id: String,
    pub volume_id: String,
    pub customer_request: CustomerRequest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeGrantResponse {
    pub revoked: usize,
}

/// `DestroyDataKey`: crypto-erase of one volume's data key, on its owner's own signed
/// `DeleteVolume`. Afterwards no data-key blob of the volume opens for anyone.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyDataKeyRequest {
    pub volume_id: String,
    pub customer_request: CustomerRequest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyDataKeyResponse {
    pub volume_id: String,
    /// `false` for a volume keyed before crypto-erase existed (blob version 1): its grants are
    /// revoked and it is tombstoned, but a holder of its CMK could still open its blob.
    pub erased: bool,
    /// Members of the volume's key family still live (snapshots, volumes made from them): the
    /// family's secret was destroyed when this is 0.
    #[serde(default)]
    pub family_members_left: u64,
}

/// The customer actions whose forwarded signed request may destroy a data key: a `DeleteVolume`
/// naming the volume (`VolumeId`), or a `DeleteSnapshot` naming the snapshot (`SnapshotId`).
pub const DESTROY_DATA_KEY_ACTIONS: &[&str] = &["DeleteVolume", "DeleteSnapshot"];

/// The customer actions whose forwarded signed request may add a member to a key family: a
/// `CreateSnapshot` naming the volume (`VolumeId`), or a `CreateVolume` naming the snapshot
/// (`SnapshotId`).
pub const SHARE_DATA_KEY_ACTIONS: &[&str] = &["CreateSnapshot", "CreateVolume"];

/// `ShareDataKey`: `member_id` (a new snapshot, or a new volume made from a snapshot) joins
/// the key family of `source_id`, a live member the signer owns, and gets a grant. Its data key
/// is the source's: the same `ciphertext_blob` opens for it (DecryptForHost with the member's
/// id seals the family's key to the host for the member). The family's secret lives until its
/// last member is destroyed (`DestroyDataKey` on a member drops that member only).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareDataKeyRequest {
    pub source_id: String,
    pub member_id: String,
    /// The source's data-key blob, base64 (checked against the family's secret).
    pub ciphertext_blob: String,
    pub customer_request: CustomerRequest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareDataKeyResponse {
    pub member_id: String,
    /// The family: the volume the blob was generated for.
    pub family_id: String,
    pub key_id: String,
    pub grant_id: String,
}

/// The customer actions whose forwarded signed request may create a VPC's key: an explicit
/// `CreateVpc`, or the first `RunInstances` of a tenant without a VPC (its default VPC).
pub const CREATE_VPC_ACTIONS: &[&str] = &["CreateVpc", "RunInstances"];

/// `CreateVpcKey`: records the VPC's owner (the tenant whose signed request is forwarded) and
/// makes its epoch-1 key, kept only wrapped under the KMS root key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVpcKeyRequest {
    pub customer_request: CustomerRequest,
    /// `vpc-…`: the control plane's VPC id.
    pub vpc_id: String,
    /// The VPC number the net cards carry in their encapsulation header (unique per KMS).
    pub vpc_number: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVpcKeyResponse {
    pub vpc_id: String,
    pub vpc_number: u32,
    /// The newest epoch of the VPC's key (1 for a new VPC).
    pub epoch: u32,
}

/// `SealVpcKey`: one VPC epoch key sealed to the attested host that runs `instance_id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealVpcKeyRequest {
    /// The VPC owner's own signed `RunInstances`, forwarded. One authorization seals a key
    /// once per instance.
    pub customer_request: CustomerRequest,
    pub vpc_id: String,
    pub epoch: u32,
    pub instance_id: String,
    pub host_id: String,
    /// The host's 38-byte public key file, base64.
    pub host_public_key: String,
    /// The host's fresh quote bound to `instance_id` (required when the KMS enforces
    /// attestation), as for `DecryptForHost`.
    #[serde(default)]
    pub evidence: Option<bulkhead_rot_proto::HostEvidence>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealVpcKeyResponse {
    pub vpc_number: u32,
    pub epoch: u32,
    /// The epoch key (64 bytes: the key, then zeros) sealed to the host for id
    /// `netcard-vpc-{vpc_number}-epoch-{epoch}`: one sealed blob, hex (what the controller's
    /// `POST /v1/instances/{id}/network` takes as-is).
    #[serde(with = "sealed::hex")]
    pub sealed_epoch_key: SealedBlob,
}

/// One KMS operation's request body, typed with its operation and its answer, so the control
/// plane (the only caller) cannot send a body to the wrong path or read an answer as another
/// operation's: the KMS parses the same structs it is sent.
pub trait KmsCall: Serialize {
    /// The operation (its path is `/v1/{OP.name()}`).
    const OP: KmsOp;
    /// What the KMS answers with 200.
    type Response: serde::de::DeserializeOwned;
}

/// `RegisterCustomer` answers with a body nobody reads.
pub type Ignored = serde::de::IgnoredAny;

macro_rules! kms_calls {
    ($($req:ty => $op:ident, $resp:ty;)+) => {
        $(impl KmsCall for $req {
            const OP: KmsOp = KmsOp::$op;
            type Response = $resp;
        })+
    };
}

kms_calls! {
    RegisterCustomerRequest => RegisterCustomer, Ignored;
    CreateKeyRequest => CreateKey, CreateKeyResponse;
    GenerateDataKeyRequest => GenerateDataKey, GenerateDataKeyResponse;
    ChallengeRequest => Challenge, ChallengeResponse;
    DecryptForHostRequest => DecryptForHost, DecryptForHostResponse;
    RevokeGrantRequest => RevokeGrant, RevokeGrantResponse;
    DestroyDataKeyRequest => DestroyDataKey, DestroyDataKeyResponse;
    CreateVpcKeyRequest => CreateVpcKey, CreateVpcKeyResponse;
    SealVpcKeyRequest => SealVpcKey, SealVpcKeyResponse;
    ShareDataKeyRequest => ShareDataKey, ShareDataKeyResponse;
}

/// The sealing id of a VPC epoch key: the same bytes as the net card's
/// `bulkhead_netcard::control::sealed_key_id`.
pub fn vpc_sealing_id(vpc_number: u32, epoch: u32) -> String {
    format!("netcard-vpc-{vpc_number}-epoch-{epoch}")
}

/// `{"error":{"code","message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// Fuzz entry point: the first byte picks an operation, the rest is decoded as its request body
/// (and as the answers with a sealed blob); a body that decodes must encode to JSON that decodes
/// to the same value. Never panics on any input.
pub fn fuzz_body(data: &[u8]) {
    fn round<T: Serialize + serde::de::DeserializeOwned>(body: &[u8]) {
        if body.len() > MAX_BODY_BYTES {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<T>(body) {
            let once = serde_json::to_value(&v).ok();
            let again = once
                .clone()
                .and_then(|j| serde_json::from_value::<T>(j).ok())
                .and_then(|t| serde_json::to_value(&t).ok());
            assert_eq!(once, again, "a decoded body must round-trip");
        }
    }
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    match pick % 14 {
        0 => round::<RegisterCustomerRequest>(body),
        1 => round::<CreateKeyRequest>(body),
        2 => round::<GenerateDataKeyRequest>(body),
        3 => round::<DecryptForHostRequest>(body),
        4 => round::<RevokeGrantRequest>(body),
        5 => round::<DestroyDataKeyRequest>(body),
        6 => round::<ChallengeRequest>(body),
        7 => round::<CreateVpcKeyRequest>(body),
        8 => round::<SealVpcKeyRequest>(body),
        9 => round::<DecryptForHostResponse>(body),
        10 => round::<SealVpcKeyResponse>(body),
        // 11 stays the path (the seeds' numbering).
        12 => round::<ShareDataKeyRequest>(body),
        13 => round::<ShareDataKeyResponse>(body),
        _ => {
            let _ = std::str::from_utf8(body).map(KmsOp::from_path);
        }
    }
}

#[cfg(test)]
mod tests;
