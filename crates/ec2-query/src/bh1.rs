//! `BH1-HMAC-SHA256`: how customers sign Bulkhead's JSON API, in the style of AWS SigV4 (an
//! HMAC-SHA256 over a canonical request, with the date, a credential scope and a replay window).
//! It shares its HMAC, its date parser and its calendar with [`crate::sigv4`]; only the
//! canonical form and the key prefix differ. No I/O: the caller supplies the nonce
//! (`bulkhead_sealing::random_nonce`) and the clock.
//!
//! The customer signs every control-plane call. The control plane verifies the signature; for
//! calls that use a customer's key (CreateVolume, AttachVolume, CreateKey, RevokeGrant) it
//! forwards the signed request *unchanged* to the KMS, which verifies it again with its own copy
//! of the customer's secret (a forward-access session): the control plane alone cannot make the
//! KMS use a customer's key.
//!
//! ```text
//! canonical request = METHOD \n PATH \n QUERY \n host:HOST \n x-bh-date:DATE \n
//!                     x-bh-nonce:NONCE \n \n host;x-bh-date;x-bh-nonce \n hex(SHA-256(body))
//! string to sign    = "BH1-HMAC-SHA256" \n DATE \n SCOPE \n hex(SHA-256(canonical request))
//! scope             = YYYYMMDD/SERVICE/bh1_request
//! signing key       = HMAC(HMAC(HMAC("BH1" || secret, YYYYMMDD), SERVICE), "bh1_request")
//! Authorization     = BH1-HMAC-SHA256 Credential=AKID/SCOPE, SignedHeaders=host;x-bh-date;x-bh-nonce, Signature=HEX
//! ```
//! `DATE` is `YYYYMMDDTHHMMSSZ` (UTC) and travels in the `x-bh-date` header.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::sigv4::{civil_from_days, hmac, AmzDate};

type HmacSha256 = Hmac<Sha256>;

pub const ALGORITHM: &str = "BH1-HMAC-SHA256";
pub const SIGNED_HEADERS: &str = "host;x-bh-date;x-bh-nonce";
pub const TERMINATOR: &str = "bh1_request";
/// The service name customers sign for.
pub const SERVICE: &str = "ec2";
/// Longest Authorization header accepted.
pub const MAX_AUTH_LEN: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    #[error("no Authorization header")]
    Missing,
    #[error("Authorization header is malformed")]
    Malformed,
    #[error("x-bh-date is malformed")]
    BadDate,
    #[error("request date is outside the allowed window")]
    Stale,
    #[error("credential scope does not match the request date or service")]
    BadScope,
    #[error("unknown access key")]
    UnknownAccessKey,
    #[error("signature does not match")]
    BadSignature,
}

impl SigError {
    pub fn code(&self) -> &'static str {
        match self {
            SigError::Missing => "auth_missing",
            SigError::Malformed => "auth_malformed",
            SigError::BadDate => "auth_bad_date",
            SigError::Stale => "auth_stale",
            SigError::BadScope => "auth_bad_scope",
            SigError::UnknownAccessKey => "auth_unknown_access_key",
            SigError::BadSignature => "auth_bad_signature",
        }
    }
}

/// The parts of an HTTP request that are signed (on the wire inside the KMS's forwarded
/// request, hence the optional `serde` feature).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct SignedParts {
    pub method: String,
    pub path: String,
    pub query: String,
    pub host: String,
    /// `YYYYMMDDTHHMMSSZ`.
    pub date: String,
    /// The request body, exactly as sent (UTF-8 JSON).
    pub body: String,
    /// `x-bh-nonce`: 16-64 of `A-Za-z0-9`, fresh per request, so that two identical calls in the
    /// same second have different signatures and a replay is recognisable.
    pub nonce: String,
}

/// A parsed Authorization header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub access_key_id: String,
    pub scope_date: String,
    pub service: String,
    pub signature: [u8; 32],
}

fn valid_akid(s: &str) -> bool {
    (8..=40).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

impl Authorization {
    pub fn parse(h: &str) -> Result<Self, SigError> {
        if h.len() > MAX_AUTH_LEN {
            return Err(SigError::Malformed);
        }
        let rest = h
            .strip_prefix(ALGORITHM)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or(SigError::Malformed)?;
        let mut cred = None;
        let mut headers = None;
        let mut sig = None;
        for part in rest.split(", ") {
            let (k, v) = part.split_once('=').ok_or(SigError::Malformed)?;
            let slot = match k {
                "Credential" => &mut cred,
                "SignedHeaders" => &mut headers,
                "Signature" => &mut sig,
                _ => return Err(SigError::Malformed),
            };
            if slot.replace(v).is_some() {
                return Err(SigError::Malformed);
            }
        }
        let (cred, headers, sig) = match (cred, headers, sig) {
            (Some(c), Some(h), Some(s)) => (c, h, s),
            _ => return Err(SigError::Malformed),
        };
        if headers != SIGNED_HEADERS {
            return Err(SigError::Malformed);
        }
        let mut it = cred.split('/');
        let (akid, date, service, term) =
            match (it.next(), it.next(), it.next(), it.next(), it.next()) {
                (Some(a), Some(d), Some(s), Some(t), None) => (a, d, s, t),
                _ => return Err(SigError::Malformed),
            };
        if !valid_akid(akid)
            || term != TERMINATOR
            || date.len() != 8
            || !date.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(SigError::Malformed);
        }
        if service.is_empty()
            || service.len() > 16
            || !service
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(SigError::Malformed);
        }
        let raw = hex::decode(sig).map_err(|_| SigError::Malformed)?;
        let signature: [u8; 32] = raw.try_into().map_err(|_| SigError::Malformed)?;
        Ok(Authorization {
            access_key_id: akid.to_string(),
            scope_date: date.to_string(),
            service: service.to_string(),
            signature,
        })
    }
}

fn signing_key(secret: &[u8], day: &str, service: &str) -> [u8; 32] {
    let mut k = Vec::with_capacity(3 + secret.len());
    k.extend_from_slice(b"BH1");
    k.extend_from_slice(secret);
    let k_date = hmac(&k, day.as_bytes());
    zeroize::Zeroize::zeroize(&mut k);
    let k_service = hmac(k_date.as_slice(), service.as_bytes());
    *hmac(k_service.as_slice(), TERMINATOR.as_bytes())
}

/// The canonical request.
pub fn canonical_request(p: &SignedParts) -> String {
    format!(
        "{}\n{}\n{}\nhost:{}\nx-bh-date:{}\nx-bh-nonce:{}\n\n{}\n{}",
        p.method,
        p.path,
        p.query,
        p.host,
        p.date,
        p.nonce,
        SIGNED_HEADERS,
        hex::encode(Sha256::digest(p.body.as_bytes()))
    )
}

fn string_to_sign(p: &SignedParts, scope: &str) -> String {
    format!(
        "{ALGORITHM}\n{}\n{scope}\n{}",
        p.date,
        hex::encode(Sha256::digest(canonical_request(p).as_bytes()))
    )
}

/// Signs `p` and returns the Authorization header value.
pub fn sign(access_key_id: &str, secret: &[u8], p: &SignedParts) -> String {
    let day = p.date.get(..8).unwrap_or("");
    let scope = format!("{day}/{SERVICE}/{TERMINATOR}");
    let sig = *hmac(
        &signing_key(secret, day, SERVICE),
        string_to_sign(p, &scope).as_bytes(),
    );
    format!(
        "{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={SIGNED_HEADERS}, Signature={}",
        hex::encode(sig)
    )
}

/// Checks the date against `now` (± `window_secs`) and the signature against `secret`.
pub fn verify(
    auth: &Authorization,
    secret: &[u8],
    p: &SignedParts,
    now: u64,
    window_secs: u64,
) -> Result<u64, SigError> {
    if !(16..=64).contains(&p.nonce.len()) || !p.nonce.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(SigError::Malformed);
    }
    let t = parse_date(&p.date)?;
    if t.abs_diff(now) > window_secs {
        return Err(SigError::Stale);
    }
    if p.date.get(..8) != Some(auth.scope_date.as_str()) || auth.service != SERVICE {
        return Err(SigError::BadScope);
    }
    let scope = format!("{}/{}/{TERMINATOR}", auth.scope_date, auth.service);
    let mut m = HmacSha256::new_from_slice(&signing_key(secret, &auth.scope_date, &auth.service))
        .map_err(|_| SigError::BadSignature)?;
    m.update(string_to_sign(p, &scope).as_bytes());
    // Constant-time comparison.
    m.verify_slice(&auth.signature)
        .map_err(|_| SigError::BadSignature)?;
    Ok(t)
}

/// `YYYYMMDDTHHMMSSZ` → Unix seconds ([`AmzDate`]'s parser).
pub fn parse_date(s: &str) -> Result<u64, SigError> {
    let d = AmzDate::parse(s.as_bytes()).map_err(|_| SigError::BadDate)?;
    u64::try_from(d.unix).map_err(|_| SigError::BadDate)
}

/// Unix seconds → `YYYYMMDDTHHMMSSZ`.
pub fn format_date(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let (y, m, d) = civil_from_days(days);
    let rem = secs % 86_400;
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parts(now: u64) -> SignedParts {
        SignedParts {
            method: "POST".into(),
            path: "/v1/AttachVolume".into(),
            query: String::new(),
            host: "127.0.0.1:9000".into(),
            date: format_date(now),
            body: r#"{"VolumeId":"vol-1"}"#.into(),
            nonce: "0123456789abcdef0123456789abcdef".into(),
        }
    }

    #[test]
    fn date_roundtrip() {
        for t in [0u64, 86_399, 1_764_136_800, 951_782_400] {
            assert_eq!(parse_date(&format_date(t)).unwrap(), t);
        }
        assert!(parse_date("2026-11-26T00:00").is_err());
        assert!(parse_date("20260231T000000Z").is_err());
    }

    #[test]
    fn sign_verify_and_tamper() {
        let now = 1_764_136_800;
        let p = parts(now);
        let h = sign("AKIDTEST0001", b"secret", &p);
        let a = Authorization::parse(&h).unwrap();
        assert_eq!(a.access_key_id, "AKIDTEST0001");
        assert!(verify(&a, b"secret", &p, now + 10, 300).is_ok());
        assert_eq!(
            verify(&a, b"other", &p, now, 300),
            Err(SigError::BadSignature)
        );
        assert_eq!(
            verify(&a, b"secret", &p, now + 301, 300),
            Err(SigError::Stale)
        );
        let mut q = p.clone();
        q.body = r#"{"VolumeId":"vol-2"}"#.into();
        assert_eq!(
            verify(&a, b"secret", &q, now, 300),
            Err(SigError::BadSignature)
        );
        assert!(Authorization::parse("Bearer x").is_err());
        assert!(Authorization::parse(&h.replace("host;x-bh-date", "host")).is_err());
    }
}
