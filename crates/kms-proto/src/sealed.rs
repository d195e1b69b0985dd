//! The sealed key blob: what the KMS seals to one host (HPKE, `bulkhead-sealing`) and only that
//! host's card opens. Typed once here, so a blob of the wrong length is refused where it is
//! read, not passed on.

// The type is the sealing format's own (the controller and the card carry it too); this module
// adds how the KMS API writes it.
pub use bulkhead_sealing::SealedBlob;

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
