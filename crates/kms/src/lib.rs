//! `bulkhead-kms`: the key service above the hosts (the role AWS KMS plays in the EBS attach
//! flow).
//!
//! * Customer master keys never leave the KMS: the embedded default keeps them AES-256-GCM-wrapped
//!   under a root key in the KMS's own SQLite store ([`store`], [`crypto`]).
//! * `GenerateDataKey` returns only the data key's ciphertext; `DecryptForHost` opens it only
//!   when (1) the customer's own signed AttachVolume request is forwarded and recent
//!   (forward-access session, [`service::FORWARD_WINDOW_SECS`]), (2) an unrevoked grant lets that
//!   customer use the key for that volume, (3) the presented host public key is the one enrolled
//!   for that host — and, when the KMS enforces attestation, the host's fresh TPM quote over a
//!   KMS nonce verifies against its enrolment and a signed release (`bulkhead_rot::policy`); each customer
//!   authorization opens a key once, for one host; then it re-wraps the key to the host key with HPKE (`bulkhead-sealing`) and
//!   returns only that sealed blob.
//! * Only the control plane's certificate may call it (mutual TLS 1.3, `bulkhead-mtls`); every call is
//!   written to a hash-chained audit log before anything happens ([`service`]).

pub mod crypto;
pub mod forward;
pub mod keystore;
pub mod server;
pub mod service;
pub mod store;
pub mod wire;

/// Every refusal and failure of the KMS. Codes are stable.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("no such route")]
    NoSuchRoute,
    #[error("request body too large")]
    BodyTooLarge,
    #[error("request body is not the expected JSON")]
    BadBody,
    #[error("bad field {0}")]
    BadRequest(&'static str),
    #[error("only the control plane may call the KMS")]
    CallerNotAllowed,
    #[error("customer signature: {0}")]
    Signature(bulkhead_ec2_query::bh1::SigError),
    #[error("forwarded SigV4 request: {0}")]
    ForwardedSigV4(forward::ForwardError),
    #[error("the forwarded customer authorization is not recent (forward-access session expired)")]
    AuthorizationNotRecent,
    #[error("the forwarded customer request does not authorize this operation")]
    WrongCustomerAction,
    #[error("no such key")]
    NoSuchKey,
    #[error("no grant lets this customer use this key for this volume")]
    NoGrant,
    #[error("host is not enrolled")]
    UnknownHost,
    #[error("presented host key is not the key enrolled for this host")]
    HostKeyMismatch,
    #[error("this customer authorization already opened a data key (one use, one host)")]
    AuthorizationReplayed,
    #[error("this KMS releases volume keys only to hosts with fresh attestation evidence")]
    AttestationRequired,
    #[error("the attestation evidence is another host's")]
    EvidenceForAnotherHost,
    #[error("host attestation refused: {0}")]
    Attestation(bulkhead_rot::attest::AttestError),
    #[error("the volume's data key was destroyed (crypto-erased)")]
    KeyDestroyed,
    #[error("customer or access key already registered")]
    CustomerExists,
    #[error("no such VPC")]
    NoSuchVpc,
    #[error("the VPC has no key of that epoch")]
    NoSuchEpoch,
    #[error("a VPC with that id or number already exists")]
    VpcExists,
    #[error("audit log unavailable; nothing was done")]
    AuditUnavailable,
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    #[error("crypto: {0}")]
    Crypto(#[from] crypto::CryptoError),
    #[error("internal error")]
    Internal,
}

impl KmsError {
    pub fn code(&self) -> &'static str {
        match self {
            KmsError::NoSuchRoute => "no_such_route",
            KmsError::BodyTooLarge => "body_too_large",
            KmsError::BadBody => "body_invalid",
            KmsError::BadRequest(_) => "bad_request",
            KmsError::CallerNotAllowed => "caller_not_allowed",
            KmsError::Signature(e) => e.code(),
            KmsError::ForwardedSigV4(forward::ForwardError::Signature(e)) => match e {
                bulkhead_ec2_query::SigV4Error::SignatureMismatch => "auth_bad_signature",
                bulkhead_ec2_query::SigV4Error::UnknownAccessKey => "auth_unknown_access_key",
                _ => "auth_malformed",
            },
            KmsError::ForwardedSigV4(_) => "wrong_customer_action",
            KmsError::AuthorizationNotRecent => "authorization_not_recent",
            KmsError::WrongCustomerAction => "wrong_customer_action",
            KmsError::NoSuchKey => "no_such_key",
            KmsError::NoGrant => "no_grant",
            KmsError::UnknownHost => "unknown_host",
            KmsError::HostKeyMismatch => "host_key_mismatch",
            KmsError::AuthorizationReplayed => "authorization_replayed",
            KmsError::AttestationRequired => "attestation_required",
            KmsError::EvidenceForAnotherHost => "evidence_for_another_host",
            KmsError::Attestation(e) => e.code(),
            KmsError::KeyDestroyed | KmsError::Crypto(crypto::CryptoError::Destroyed) => {
                "key_destroyed"
            }
            KmsError::CustomerExists => "customer_exists",
            KmsError::NoSuchVpc => "no_such_vpc",
            KmsError::NoSuchEpoch => "no_such_epoch",
            KmsError::VpcExists => "vpc_exists",
            KmsError::AuditUnavailable => "audit_unavailable",
            KmsError::Store(store::StoreError::NotOwner | store::StoreError::NoSuchMember) => {
                "no_grant"
            }
            KmsError::Store(store::StoreError::MemberExists) => "member_exists",
            KmsError::Store(_) => "store_error",
            KmsError::Crypto(crypto::CryptoError::BadBlob) => "bad_ciphertext_blob",
            KmsError::Crypto(crypto::CryptoError::Unwrap) => "ciphertext_rejected",
            KmsError::Crypto(_) => "crypto_error",
            KmsError::Internal => "internal_error",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            KmsError::NoSuchRoute
            | KmsError::NoSuchKey
            | KmsError::UnknownHost
            | KmsError::NoSuchVpc
            | KmsError::NoSuchEpoch => 404,
            KmsError::BodyTooLarge => 413,
            KmsError::BadBody | KmsError::BadRequest(_) => 400,
            KmsError::Crypto(crypto::CryptoError::BadBlob | crypto::CryptoError::Unwrap) => 400,
            KmsError::Signature(_) | KmsError::AuthorizationNotRecent => 401,
            KmsError::ForwardedSigV4(forward::ForwardError::Signature(_)) => 401,
            KmsError::ForwardedSigV4(_) => 403,
            KmsError::CallerNotAllowed
            | KmsError::WrongCustomerAction
            | KmsError::NoGrant
            | KmsError::HostKeyMismatch
            | KmsError::AuthorizationReplayed
            | KmsError::AttestationRequired
            | KmsError::EvidenceForAnotherHost
            | KmsError::Attestation(_)
            | KmsError::Store(store::StoreError::NotOwner | store::StoreError::NoSuchMember) => 403,
            KmsError::CustomerExists
            | KmsError::VpcExists
            | KmsError::Store(store::StoreError::MemberExists) => 409,
            KmsError::KeyDestroyed | KmsError::Crypto(crypto::CryptoError::Destroyed) => 410,
            KmsError::AuditUnavailable => 503,
            _ => 500,
        }
    }
}

/// Tenant, volume and key identifiers: 1-64 of `A-Za-z0-9-_.`.
pub fn valid_id(s: &str) -> bool {
    bulkhead_tokens::ops::valid_resource_id(s)
}

/// Access key ids: 8-40 of `A-Z0-9`.
pub fn valid_akid(s: &str) -> bool {
    (8..=40).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}
