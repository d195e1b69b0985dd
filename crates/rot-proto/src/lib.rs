//! Wire types of the root of trust, shared by every process that carries attestation evidence:
//! the attestation agent (makes it), the controller (relays it), and the control plane and the
//! KMS (send it to the verifier). No I/O and no TPM stack: `bulkhead-rot` makes and verifies
//! quotes; this crate only says what they look like on the wire.
//!
//! * [`HostEvidence`]: what a host presents, either [`Evidence`] (a quote of its measurement PCR
//!   over a verifier's nonce, and the event log that replays to it) or, from a sealed host,
//!   [`BootEvidence`] (a quote over its boot PCRs and their values); [`RawQuote`],
//!   [`AkPublic`].
//! * [`qualifying_data`]: what a quote is made over, optionally bound to an instance.
//! * The agent's line protocol, one JSON object per line each way: a request
//!   ([`AgentRequest`], at most [`MAX_REQUEST_LINE`] bytes, parsed only by [`parse_request`]
//!   into an [`AgentCall`]), and an answer, the [`Evidence`] or an [`AgentFailure`] (at most
//!   [`MAX_EVIDENCE_BYTES`], parsed only by [`parse_reply`]).
//! * Endorsement of a sealed host's attestation key: its [`BootEvidence`] carries the TPM's EK
//!   certificate, and a request may carry a [`CredentialChallenge`] (TPM2_MakeCredential's
//!   output, made by the verifier for the AK it is asked to enrol) that the agent opens with
//!   TPM2_ActivateCredential; the secret comes back in the evidence (`activated`).
//! * A release applied on the host ([`AppliedRelease`]: its version and the SHA-384 its signed
//!   manifest is measured as): a request may carry one for the agent to extend into the
//!   measurement PCR (a typed `release-applied` event) before it quotes, so the evidence shows
//!   the release the host now runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A verifier's nonce, and the quote's qualifying data: 32 bytes.
pub const MAX_NONCE_LEN: usize = 32;
/// Longest agent request line, newline included (a request with a credential to activate is
/// about 800 bytes: an RSA 2048 encrypted seed and the credential blob, in hex).
pub const MAX_REQUEST_LINE: usize = 2048;
/// Longest `id_object` or `encrypted_secret` of a [`CredentialChallenge`], in bytes (an RSA
/// 4096 EK's encrypted seed is 512 bytes).
pub const MAX_CREDENTIAL_PART: usize = 512;
/// Longest agent answer line (evidence), newline included.
pub const MAX_EVIDENCE_BYTES: usize = 64 * 1024;

/// A raw quote as the TPM produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuote {
    /// Marshalled `TPMS_ATTEST`, hex: exactly the bytes the AK signed.
    pub attest: String,
    /// ECDSA signature, `r || s`, 32 bytes each, hex.
    pub signature: String,
}

/// What a host presents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    pub host: String,
    pub quote: RawQuote,
    /// JSON-lines event log (see `bulkhead_rot::measure`).
    pub event_log: String,
}

/// An attestation key's public half: ECC P-256 point, uncompressed SEC1 (`04 || x || y`), hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AkPublic(pub String);

/// An attestation key that is not hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("attestation key is not hex")]
pub struct MalformedKey;

impl AkPublic {
    /// SEC1 bytes.
    pub fn sec1(&self) -> Result<Vec<u8>, MalformedKey> {
        hex::decode(&self.0).map_err(|_| MalformedKey)
    }

    /// Short, stable name: first 8 bytes of SHA-256 of the SEC1 point, hex.
    pub fn key_id(&self) -> String {
        let d = Sha256::digest(self.0.as_bytes());
        hex::encode(d.get(..8).unwrap_or(&[]))
    }
}

/// The boot evidence format string.
pub const EVIDENCE_FORMAT: &str = "bulkhead-boot-evidence/1";

/// What a sealed host's attestation agent answers (relayed by the controller unmodified); the
/// verifier is `bulkhead_rot::boot::verify_boot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootEvidence {
    /// [`EVIDENCE_FORMAT`].
    pub format: String,
    pub host: String,
    /// The AK that signed the quote (its enrolment is the verifier's business).
    pub ak: AkPublic,
    pub quote: RawQuote,
    /// The quoted PCRs' SHA-256 values, hex, by index.
    pub pcrs: BTreeMap<u8, String>,
    /// The TPM's RSA 2048 EK certificate (DER, hex), when its manufacturer stored one: what a
    /// verifier checks against the manufacturer CAs it trusts before enrolling the AK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_certificate: Option<String>,
    /// The secret of the [`CredentialChallenge`] the request carried, as the TPM's
    /// ActivateCredential returned it (hex); absent when none was sent or the TPM refused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated: Option<String>,
}

/// A credential the verifier sends to a TPM (TPM2_MakeCredential's output): only the TPM
/// holding the EK can open it, and only for the AK whose name it was made for. Made and checked
/// by `bulkhead_rot::endorsement`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialChallenge {
    /// `TPM2B_ID_OBJECT` contents (`TPM2B_DIGEST` integrity HMAC || encrypted credential), hex.
    pub id_object: String,
    /// `TPM2B_ENCRYPTED_SECRET` contents (the RSA-OAEP-wrapped seed), hex.
    pub encrypted_secret: String,
}

impl CredentialChallenge {
    /// Both parts are hex of 1 to [`MAX_CREDENTIAL_PART`] bytes.
    pub fn well_formed(&self) -> bool {
        let ok = |h: &str| {
            hex::decode(h)
                .map(|b| !b.is_empty() && b.len() <= MAX_CREDENTIAL_PART)
                .unwrap_or(false)
        };
        ok(&self.id_object) && ok(&self.encrypted_secret)
    }
}

/// Either kind of evidence a host's agent answers with (the shapes are disjoint: each refuses
/// the other's fields; boot evidence is the one with a `format`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum HostEvidence {
    /// A host of host processes: the measurement PCR and its event log.
    Measured(Evidence),
    /// A sealed host: the boot chain's PCRs.
    Boot(BootEvidence),
}

// Not `#[serde(untagged)]` for reading: serde's untagged buffering cannot read the integer keys
// of `BootEvidence::pcrs` back from JSON's string keys. The shape is chosen by the `format`
// field, then parsed strictly.
impl<'de> Deserialize<'de> for HostEvidence {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let v = serde_json::Value::deserialize(d)?;
        if v.get("format").is_some() {
            serde_json::from_value(v).map(HostEvidence::Boot)
        } else {
            serde_json::from_value(v).map(HostEvidence::Measured)
        }
        .map_err(D::Error::custom)
    }
}

impl HostEvidence {
    /// The host the evidence names.
    pub fn host(&self) -> &str {
        match self {
            HostEvidence::Measured(e) => &e.host,
            HostEvidence::Boot(e) => &e.host,
        }
    }
}

/// The quote's qualifying data: the verifier's nonce, or, bound to an instance,
/// SHA-256(nonce || instance id). The attestation agent quotes over it; the host's controller
/// asks for the bound form only for an instance it runs; a verifier expecting an instance
/// recomputes it.
pub fn qualifying_data(nonce: &[u8; MAX_NONCE_LEN], instance: Option<&str>) -> [u8; MAX_NONCE_LEN] {
    match instance {
        None => *nonce,
        Some(id) => {
            let mut h = Sha256::new();
            h.update(nonce);
            h.update(id.as_bytes());
            h.finalize().into()
        }
    }
}

/// An instance identifier as the controller accepts it: 1-64 of `A-Za-z0-9-_.`.
pub fn valid_instance_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// One challenge to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRequest {
    /// The verifier's nonce, hex (exactly 32 bytes).
    pub nonce: String,
    /// The instance the quote is bound to, if any (a resource id: 1-64 of `A-Za-z0-9-_.`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// A credential for the agent's TPM to activate before it quotes (endorsement of the AK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialChallenge>,
    /// A release the host applied, for the agent to measure before it quotes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_applied: Option<AppliedReleaseWire>,
}

/// [`AppliedRelease`] on the wire: the digest in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedReleaseWire {
    pub version: u64,
    /// 96 hex characters.
    pub manifest_sha384: String,
}

/// A release the host applied (a `DeployRelease`): its version, and the measurement of its
/// signed manifest (`bulkhead-rot`'s `release_applied_digest` of the manifest text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedRelease {
    pub version: u64,
    pub manifest_sha384: [u8; 48],
}

impl AgentRequest {
    /// The request line for `nonce` (bound to `instance` if given), without its newline.
    pub fn encode(nonce: &[u8; MAX_NONCE_LEN], instance: Option<&str>) -> String {
        Self::encode_call(&AgentCall {
            nonce: *nonce,
            instance: instance.map(str::to_string),
            credential: None,
            release_applied: None,
        })
    }

    /// The request line for a whole call (what [`parse_request`] reads back), without its
    /// newline.
    pub fn encode_call(call: &AgentCall) -> String {
        let r = AgentRequest {
            nonce: hex::encode(call.nonce),
            instance: call.instance.clone(),
            credential: call.credential.clone(),
            release_applied: call.release_applied.map(|r| AppliedReleaseWire {
                version: r.version,
                manifest_sha384: hex::encode(r.manifest_sha384),
            }),
        };
        // A struct of strings always serializes.
        serde_json::to_string(&r).unwrap_or_default()
    }
}

/// A checked agent request: what the quote's qualifying data is made of (the nonce, and the
/// instance it is bound to, if any) and a credential to activate first, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCall {
    pub nonce: [u8; MAX_NONCE_LEN],
    pub instance: Option<String>,
    pub credential: Option<CredentialChallenge>,
    /// A release to measure (extend into the PCR) before the quote.
    pub release_applied: Option<AppliedRelease>,
}

/// Why the agent refused a request line. Codes are stable: they are the `error` of the
/// [`AgentFailure`] it answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("request line longer than {MAX_REQUEST_LINE} bytes")]
    TooLong,
    #[error("request is not the expected JSON")]
    BadRequest,
    #[error("nonce must be {MAX_NONCE_LEN} bytes of hex")]
    BadNonce,
    #[error("instance id must be 1-64 of A-Za-z0-9-_.")]
    BadInstance,
    #[error("credential parts must be hex of 1-{MAX_CREDENTIAL_PART} bytes")]
    BadCredential,
    #[error("this agent activates no credentials")]
    CredentialUnsupported,
    #[error("the TPM could not quote")]
    QuoteFailed,
    #[error("an applied release must name a version of at least 1 and a 48-byte hex digest")]
    BadRelease,
    #[error("the TPM could not measure the applied release")]
    MeasureFailed,
}

impl AgentError {
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::TooLong => "agent_line_too_long",
            AgentError::BadRequest => "agent_bad_request",
            AgentError::BadNonce => "agent_bad_nonce",
            AgentError::BadInstance => "agent_bad_instance",
            AgentError::BadCredential => "agent_bad_credential",
            AgentError::CredentialUnsupported => "agent_credential_unsupported",
            AgentError::BadRelease => "agent_bad_release",
            AgentError::MeasureFailed => "agent_measure_failed",
            AgentError::QuoteFailed => "agent_quote_failed",
        }
    }
}

/// The only parser of the agent's input (a line without its newline).
pub fn parse_request(line: &[u8]) -> Result<AgentCall, AgentError> {
    if line.len() > MAX_REQUEST_LINE {
        return Err(AgentError::TooLong);
    }
    let r: AgentRequest = serde_json::from_slice(line).map_err(|_| AgentError::BadRequest)?;
    let raw = hex::decode(r.nonce).map_err(|_| AgentError::BadNonce)?;
    let nonce = raw.try_into().map_err(|_| AgentError::BadNonce)?;
    if let Some(i) = &r.instance {
        if !valid_instance_id(i) {
            return Err(AgentError::BadInstance);
        }
    }
    if let Some(c) = &r.credential {
        if !c.well_formed() {
            return Err(AgentError::BadCredential);
        }
    }
    let release_applied = match r.release_applied {
        None => None,
        Some(w) => {
            let d = hex::decode(&w.manifest_sha384).map_err(|_| AgentError::BadRelease)?;
            let manifest_sha384 = d.try_into().map_err(|_| AgentError::BadRelease)?;
            if w.version == 0 {
                return Err(AgentError::BadRelease);
            }
            Some(AppliedRelease {
                version: w.version,
                manifest_sha384,
            })
        }
    };
    Ok(AgentCall {
        nonce,
        instance: r.instance,
        credential: r.credential,
        release_applied,
    })
}

/// The agent's answer when it made no quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFailure {
    /// An [`AgentError::code`].
    pub error: String,
}

/// The agent's answer line (without its newline) for `result`.
pub fn encode_reply(result: &Result<HostEvidence, AgentError>) -> String {
    let failure = |e: &AgentError| AgentFailure {
        error: e.code().to_string(),
    };
    let line = match result {
        Ok(ev) => serde_json::to_string(ev),
        Err(e) => serde_json::to_string(&failure(e)),
    };
    // Structs of strings always serialize; keep a well-formed answer regardless.
    line.unwrap_or_else(|_| r#"{"error":"agent_quote_failed"}"#.to_string())
}

/// Why an answer from the agent gave no evidence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("the agent's answer is neither evidence nor a refusal")]
    Malformed,
    #[error("the agent refused: {0}")]
    Refused(String),
}

/// Longest refusal code kept from an agent's answer.
pub const MAX_REFUSAL_CODE: usize = 64;

/// The only parser of the agent's answer (a line without its newline).
pub fn parse_reply(line: &[u8]) -> Result<HostEvidence, ReplyError> {
    if line.len() > MAX_EVIDENCE_BYTES {
        return Err(ReplyError::Malformed);
    }
    let v: serde_json::Value = serde_json::from_slice(line).map_err(|_| ReplyError::Malformed)?;
    if v.get("error").is_some() {
        let f: AgentFailure = serde_json::from_value(v).map_err(|_| ReplyError::Malformed)?;
        return Err(ReplyError::Refused(
            f.error.chars().take(MAX_REFUSAL_CODE).collect(),
        ));
    }
    serde_json::from_value(v).map_err(|_| ReplyError::Malformed)
}

/// Fuzz entry point: both parsers on arbitrary bytes; what parses re-encodes and parses the
/// same.
pub fn fuzz_wire(data: &[u8]) {
    if let Ok(call) = parse_request(data) {
        let line = AgentRequest::encode_call(&call);
        assert_eq!(parse_request(line.as_bytes()), Ok(call));
    }
    match parse_reply(data) {
        Ok(ev) => {
            let line = encode_reply(&Ok(ev.clone()));
            assert_eq!(parse_reply(line.as_bytes()), Ok(ev));
        }
        Err(ReplyError::Refused(code)) => assert!(code.chars().count() <= MAX_REFUSAL_CODE),
        Err(ReplyError::Malformed) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quote() -> RawQuote {
        RawQuote {
            attest: "ff54434780180022".into(),
            signature: "00".repeat(64),
        }
    }

    fn evidence() -> HostEvidence {
        HostEvidence::Measured(Evidence {
            host: "host-1".into(),
            quote: quote(),
            event_log: "{\"pcr\":23}\n".into(),
        })
    }

    fn boot_evidence() -> HostEvidence {
        HostEvidence::Boot(BootEvidence {
            format: EVIDENCE_FORMAT.into(),
            host: "host-2".into(),
            ak: AkPublic(format!("04{}", "11".repeat(64))),
            quote: quote(),
            pcrs: [(4, "aa".repeat(32)), (23, "bb".repeat(32))]
                .into_iter()
                .collect(),
            ek_certificate: Some("3082".into()),
            activated: Some("cc".repeat(32)),
        })
    }

    fn credential() -> CredentialChallenge {
        CredentialChallenge {
            id_object: "00".repeat(68),
            encrypted_secret: "ab".repeat(256),
        }
    }

    #[test]
    fn requests_round_trip_and_bad_ones_are_typed() {
        let n = [7u8; 32];
        for inst in [None, Some("i-0123")] {
            let line = AgentRequest::encode(&n, inst);
            let call = parse_request(line.as_bytes()).expect("parses");
            assert_eq!((call.nonce, call.instance), (n, inst.map(str::to_string)));
            assert_eq!(call.credential, None);
        }
        // A credential to activate fits in one request line and comes back as sent.
        let call = AgentCall {
            nonce: n,
            instance: None,
            credential: Some(credential()),
            release_applied: None,
        };
        let line = AgentRequest::encode_call(&call);
        assert!(line.len() < MAX_REQUEST_LINE);
        assert_eq!(parse_request(line.as_bytes()), Ok(call));
        for (id, secret) in [
            ("", "ab"),
            ("zz", "ab"),
            ("00", ""),
            ("00", &*"ab".repeat(MAX_CREDENTIAL_PART + 1)),
        ] {
            let bad = format!(
                r#"{{"nonce":"{}","credential":{{"id_object":"{id}","encrypted_secret":"{secret}"}}}}"#,
                hex::encode(n)
            );
            let want = if bad.len() > MAX_REQUEST_LINE {
                AgentError::TooLong
            } else {
                AgentError::BadCredential
            };
            assert_eq!(parse_request(bad.as_bytes()), Err(want), "{id} {secret}");
        }
        let extra = format!(
            r#"{{"nonce":"{}","credential":{{"id_object":"00","encrypted_secret":"00","x":1}}}}"#,
            hex::encode(n)
        );
        assert_eq!(parse_request(extra.as_bytes()), Err(AgentError::BadRequest));
        assert_eq!(
            AgentRequest::encode(&n, None),
            format!("{{\"nonce\":\"{}\"}}", hex::encode(n))
        );
        let long = vec![b' '; MAX_REQUEST_LINE + 1];
        assert_eq!(parse_request(&long), Err(AgentError::TooLong));
        assert_eq!(parse_request(b"{}"), Err(AgentError::BadRequest));
        assert_eq!(
            parse_request(br#"{"nonce":"00","extra":1}"#),
            Err(AgentError::BadRequest)
        );
        assert_eq!(
            parse_request(br#"{"nonce":"0011"}"#),
            Err(AgentError::BadNonce)
        );
        let bad_inst = format!(r#"{{"nonce":"{}","instance":"a/b"}}"#, hex::encode(n));
        assert_eq!(
            parse_request(bad_inst.as_bytes()),
            Err(AgentError::BadInstance)
        );
    }

    #[test]
    fn replies_round_trip_and_anything_else_is_malformed() {
        for ev in [evidence(), boot_evidence()] {
            let line = encode_reply(&Ok(ev.clone()));
            assert_eq!(parse_reply(line.as_bytes()), Ok(ev));
        }
        assert_eq!(boot_evidence().host(), "host-2");
        // Nested in another body (the controller relays it inside its answer).
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Wrapper {
            evidence: HostEvidence,
        }
        let w = Wrapper {
            evidence: boot_evidence(),
        };
        let json = serde_json::to_vec(&w).expect("serialize");
        assert_eq!(serde_json::from_slice::<Wrapper>(&json).ok(), Some(w));
        assert_eq!(
            AkPublic("0g".into()).sec1(),
            Err(MalformedKey),
            "a key that is not hex"
        );
        let line = encode_reply(&Err(AgentError::QuoteFailed));
        assert_eq!(line, r#"{"error":"agent_quote_failed"}"#);
        assert_eq!(
            parse_reply(line.as_bytes()),
            Err(ReplyError::Refused("agent_quote_failed".into()))
        );
        let long_code = format!(r#"{{"error":"{}"}}"#, "x".repeat(500));
        assert_eq!(
            parse_reply(long_code.as_bytes()),
            Err(ReplyError::Refused("x".repeat(MAX_REFUSAL_CODE)))
        );
        for bad in [
            &b""[..],
            b"[]",
            b"{}",
            b"null",
            br#"{"host":"h","quote":{"attest":"","signature":""}}"#,
            br#"{"host":"h","quote":{"attest":"","signature":"","x":1},"event_log":""}"#,
            br#"{"host":"h","quote":{"attest":"","signature":""},"event_log":"","x":1}"#,
            br#"{"error":"e","x":1}"#,
            br#"{"error":7}"#,
            // A mix of the two shapes is neither.
            br#"{"host":"h","quote":{"attest":"","signature":""},"event_log":"","pcrs":{}}"#,
            br#"{"format":"f","host":"h","ak":"04","quote":{"attest":"","signature":""}}"#,
        ] {
            assert_eq!(parse_reply(bad), Err(ReplyError::Malformed), "{bad:?}");
        }
        let huge = vec![b' '; MAX_EVIDENCE_BYTES + 1];
        assert_eq!(parse_reply(&huge), Err(ReplyError::Malformed));
    }

    #[test]
    fn qualifying_data_binds_the_instance() {
        let n = [1u8; 32];
        assert_eq!(qualifying_data(&n, None), n);
        let a = qualifying_data(&n, Some("i-a"));
        assert_ne!(a, n);
        assert_ne!(a, qualifying_data(&n, Some("i-b")));
        assert!(valid_instance_id("i-0.a_b"));
        assert!(!valid_instance_id(""));
        assert!(!valid_instance_id(&"a".repeat(65)));
    }

    #[test]
    fn an_applied_release_round_trips_and_bad_ones_are_typed() {
        let call = AgentCall {
            nonce: [1; 32],
            instance: Some("i-9".into()),
            credential: None,
            release_applied: Some(AppliedRelease {
                version: 3,
                manifest_sha384: [0xab; 48],
            }),
        };
        let line = AgentRequest::encode_call(&call);
        assert_eq!(parse_request(line.as_bytes()), Ok(call));
        let n = "01".repeat(32);
        for bad in [
            format!(
                r#"{{"nonce":"{n}","release_applied":{{"version":0,"manifest_sha384":"{}"}}}}"#,
                "ab".repeat(48)
            ),
            format!(
                r#"{{"nonce":"{n}","release_applied":{{"version":2,"manifest_sha384":"{}"}}}}"#,
                "ab".repeat(47)
            ),
            format!(
                r#"{{"nonce":"{n}","release_applied":{{"version":2,"manifest_sha384":"{}"}}}}"#,
                "zz".repeat(48)
            ),
        ] {
            assert_eq!(
                parse_request(bad.as_bytes()),
                Err(AgentError::BadRelease),
                "{bad}"
            );
        }
        let extra = format!(
            r#"{{"nonce":"{n}","release_applied":{{"version":2,"manifest_sha384":"{}","x":1}}}}"#,
            "ab".repeat(48)
        );
        assert_eq!(parse_request(extra.as_bytes()), Err(AgentError::BadRequest));
    }

    #[test]
    fn fuzz_entry_accepts_the_seeds() {
        for seed in [
            encode_reply(&Ok(evidence())),
            encode_reply(&Ok(boot_evidence())),
            encode_reply(&Err(AgentError::BadNonce)),
            AgentRequest::encode(&[9; 32], Some("i-1")),
            AgentRequest::encode_call(&AgentCall {
                nonce: [3; 32],
                instance: None,
                credential: Some(credential()),
                release_applied: None,
            }),
            AgentRequest::encode_call(&AgentCall {
                nonce: [3; 32],
                instance: None,
                credential: None,
                release_applied: Some(AppliedRelease {
                    version: 2,
                    manifest_sha384: [5; 48],
                }),
            }),
        ] {
            fuzz_wire(seed.as_bytes());
        }
    }
}
