//! The sealed key blob: what the KMS seals to one host (HPKE, `bulkhead-sealing`) and only that
//! host's card opens. Typed once here, so a blob of the wrong length is refused where it is
//! read, not passed on.

use ::base64::engine::general_purpose::STANDARD as B64;
use ::base64::Engine as _;
use bulkhead_sealing::SEALED_BLOB_LEN;

/// Exactly one sealed blob ([`SEALED_BLOB_LEN`] bytes). Opaque to everyone but the card.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedBlob(Box<[u8; SEALED_BLOB_LEN]>);

impl std::fmt::Debug for SealedBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealedBlob({SEALED_BLOB_LEN} bytes)")
    }
}

impl SealedBlob {
    /// The blob, if `b` is exactly one.
    pub fn from_slice(b: &[u8]) -> Option<SealedBlob> {
        <[u8; SEALED_BLOB_LEN]>::try_from(b)
            .ok()
            .map(|a| SealedBlob(Box::new(a)))
    }
    pub fn as_bytes(&self) -> &[u8; SEALED_BLOB_LEN] {
        &self.0
    }
    pub fn from_hex(s: &str) -> Option<SealedBlob> {
        if s.len() != SEALED_BLOB_LEN * 2 {
            return None;
        }
        ::hex::decode(s).ok().and_then(|b| Self::from_slice(&b))
    }
    pub fn to_hex(&self) -> String {
        ::hex::encode(self.0.as_slice())
    }
    pub fn from_base64(s: &str) -> Option<SealedBlob> {
        // 126 bytes are 168 base64 characters.
        if s.len() > SEALED_BLOB_LEN.div_ceil(3) * 4 {
            return None;
        }
        B64.decode(s).ok().and_then(|b| Self::from_slice(&b))
    }
    pub fn to_base64(&self) -> String {
        B64.encode(self.0.as_slice())
    }
}

/// `#[serde(with = "sealed::hex")]`: the blob as lower-case hex.
pub mod hex {
    use super::SealedBlob;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &SealedBlob, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&b.to_hex())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SealedBlob, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        SealedBlob::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("not one sealed blob in hex"))
    }
}

/// `#[serde(with = "sealed::base64")]`: the blob as standard base64.
pub mod base64 {
    use super::SealedBlob;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &SealedBlob, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&b.to_base64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SealedBlob, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        SealedBlob::from_base64(&s)
            .ok_or_else(|| serde::de::Error::custom("not one sealed blob in base64"))
    }
}
