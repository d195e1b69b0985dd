//! [`SealedBlob`]: one sealed key, typed once for every process that carries it unopened (the
//! KMS that makes it, the control plane, the controller, the card's control protocol), so a
//! blob of the wrong length is refused where it is first read, not passed on.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::SEALED_BLOB_LEN;

/// Exactly one sealed blob ([`SEALED_BLOB_LEN`] bytes). Opaque to everyone but the card.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedBlob(Box<[u8; SEALED_BLOB_LEN]>);

impl std::fmt::Debug for SealedBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealedBlob({SEALED_BLOB_LEN} bytes)")
    }
}

impl From<Box<[u8; SEALED_BLOB_LEN]>> for SealedBlob {
    fn from(b: Box<[u8; SEALED_BLOB_LEN]>) -> Self {
        SealedBlob(b)
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
    /// The bytes, for a protocol that carries them as an array (the card's control protocol).
    pub fn into_boxed(self) -> Box<[u8; SEALED_BLOB_LEN]> {
        self.0
    }
    /// From hex (either case); `None` unless it is exactly one blob.
    pub fn from_hex(s: &str) -> Option<SealedBlob> {
        if s.len() != SEALED_BLOB_LEN * 2 {
            return None;
        }
        hex::decode(s).ok().and_then(|b| Self::from_slice(&b))
    }
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_slice())
    }
    /// From standard base64; `None` unless it is exactly one blob.
    pub fn from_base64(s: &str) -> Option<SealedBlob> {
        // 126 bytes are 168 base64 characters.
        if s.len() > SEALED_BLOB_LEN.div_ceil(3) * 4 {
            return None;
        }
        B64.decode(s).ok().and_then(|b| Self::from_slice(&b))
    }
    /// Standard base64.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_blob_in_either_encoding() {
        let b = SealedBlob::from_slice(&[7u8; SEALED_BLOB_LEN]).expect("one blob");
        assert_eq!(SealedBlob::from_hex(&b.to_hex()), Some(b.clone()));
        assert_eq!(
            SealedBlob::from_hex(&b.to_hex().to_uppercase()),
            Some(b.clone())
        );
        assert_eq!(SealedBlob::from_base64(&b.to_base64()), Some(b.clone()));
        assert_eq!(b.to_base64().len(), 168);
        assert_eq!(format!("{b:?}"), "SealedBlob(126 bytes)");
        for n in [0, 1, SEALED_BLOB_LEN - 1, SEALED_BLOB_LEN + 1, 4096] {
            let v = vec![7u8; n];
            assert_eq!(SealedBlob::from_slice(&v), None, "{n} bytes");
            assert_eq!(SealedBlob::from_hex(&hex::encode(&v)), None, "{n} bytes");
            assert_eq!(SealedBlob::from_base64(&B64.encode(&v)), None, "{n} bytes");
        }
        assert_eq!(SealedBlob::from_hex(&"zz".repeat(SEALED_BLOB_LEN)), None);
        assert_eq!(SealedBlob::from_base64("not base64!"), None);
        let boxed = b.clone().into_boxed();
        assert_eq!(SealedBlob::from(boxed), b);
    }
}
