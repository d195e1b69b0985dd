//! Key wrapping inside the KMS (embedded default; a PKCS#11 token would hold the root key in
//! production).
//!
//! * The **root key** (32 bytes, file mode 0600) wraps every customer master key (CMK) and every
//!   customer signing secret with AES-256-GCM; the AAD names what is wrapped, so a wrapped CMK
//!   cannot be swapped for another key's row.
//! * A **CMK** (32 bytes) encrypts data keys with AES-256-GCM. The data-key ciphertext blob
//!   ([`DataKeyBlob`]) names its CMK and is bound (AAD) to the volume it was generated for.
//! * **Crypto-erase** (blob version 2): the CMK wraps only a *key half*; the volume key is
//!   HKDF-SHA256 over that half and a per-volume secret that exists only in the KMS's store
//!   (wrapped under the root key). Destroying the secret makes the blob useless to anyone,
//!   the KMS and a holder of the CMK included ([`DataKeyBlob::open`] needs both).
//! * Plaintext CMKs and data keys live only in [`LockedSecret`] pages and in the AES key schedule
//!   for the duration of one call.

use aws_lc_rs::aead::NONCE_LEN;
use bulkhead_sealing::wrap::{self as sw, WrapError};
use bulkhead_sealing::{LockedSecret, VolumeKey, VOLUME_KEY_LEN};
use std::path::Path;
use zeroize::Zeroizing;

const TAG_LEN: usize = 16;
const DK_MAGIC: &[u8; 4] = b"BHDK";
/// Version 1: the CMK wraps the volume key itself (volumes made before crypto-erase; they can be
/// tombstoned but not erased).
const DK_VERSION_1: u8 = 1;
/// Version 2: the CMK wraps a key half; the volume key also needs the per-volume secret.
const DK_VERSION_2: u8 = 2;
/// Length of the per-volume secret of a version-2 blob.
pub const VOLUME_SECRET_LEN: usize = 32;
/// Longest CMK identifier.
pub const MAX_KEY_ID_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("root key file: {0}")]
    RootKeyIo(#[source] std::io::Error),
    #[error("root key file must be 32 bytes with mode 0600")]
    RootKeyFormat,
    #[error("locked memory: {0}")]
    Locked(#[from] bulkhead_sealing::LockedSecretError),
    #[error("random source: {0}")]
    Random(#[from] bulkhead_sealing::SealingError),
    #[error("ciphertext failed authentication")]
    Unwrap,
    #[error("encryption failed")]
    Wrap,
    #[error("data key blob is malformed")]
    BadBlob,
    #[error("the volume's data key was destroyed (crypto-erased)")]
    Destroyed,
}

impl From<WrapError> for CryptoError {
    fn from(e: WrapError) -> Self {
        match e {
            WrapError::RootKeyIo(e) => CryptoError::RootKeyIo(e),
            WrapError::RootKeyFormat => CryptoError::RootKeyFormat,
            WrapError::Locked(e) => CryptoError::Locked(e),
            WrapError::Random(e) => CryptoError::Random(e),
            WrapError::Unwrap => CryptoError::Unwrap,
            WrapError::Wrap => CryptoError::Wrap,
        }
    }
}

/// A 32-byte AES-256 key in locked memory.
pub use bulkhead_sealing::wrap::Key32;

/// `nonce || ciphertext || tag` of `plain` under `key`, bound to `aad` ([`sw::wrap`]).
pub fn wrap(key: &Key32, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, CryptoError> {
    Ok(sw::wrap(key, aad, plain)?)
}

/// Opens a [`wrap`]ped value of exactly `N` bytes into a locked page ([`sw::unwrap`]).
pub fn unwrap<const N: usize>(
    key: &Key32,
    aad: &[u8],
    wrapped: &[u8],
) -> Result<LockedSecret<N>, CryptoError> {
    Ok(sw::unwrap(key, aad, wrapped)?)
}

/// Fresh random secret in a locked page.
pub fn random_secret<const N: usize>() -> Result<LockedSecret<N>, CryptoError> {
    Ok(sw::random_secret()?)
}

/// Reads (or, if `create`, creates) the root key file ([`sw::load_root_key`]).
pub fn load_root_key(path: &Path, create: bool) -> Result<Key32, CryptoError> {
    Ok(sw::load_root_key(path, create)?)
}

/// The data-key ciphertext the control plane stores for a volume:
/// `BHDK | version | key_id_len | key_id | nonce(12) | ciphertext(64) | tag(16)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataKeyBlob {
    /// 1 or 2 (see the module notes).
    pub version: u8,
    pub key_id: String,
    /// `nonce || ciphertext || tag`.
    pub wrapped: Vec<u8>,
}

pub(crate) fn dk_aad(key_id: &str, volume_id: &str) -> Vec<u8> {
    let mut aad = b"bulkhead data key v1\0".to_vec();
    aad.extend_from_slice(key_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(volume_id.as_bytes());
    aad
}

impl DataKeyBlob {
    pub fn parse(raw: &[u8]) -> Result<Self, CryptoError> {
        let want_tail = NONCE_LEN + VOLUME_KEY_LEN + TAG_LEN;
        if raw.get(..4) != Some(&DK_MAGIC[..]) {
            return Err(CryptoError::BadBlob);
        }
        let version = *raw.get(4).ok_or(CryptoError::BadBlob)?;
        if version != DK_VERSION_1 && version != DK_VERSION_2 {
            return Err(CryptoError::BadBlob);
        }
        let n = usize::from(*raw.get(5).ok_or(CryptoError::BadBlob)?);
        if n == 0 || n > MAX_KEY_ID_LEN || raw.len() != 6 + n + want_tail {
            return Err(CryptoError::BadBlob);
        }
        let key_id = std::str::from_utf8(raw.get(6..6 + n).ok_or(CryptoError::BadBlob)?)
            .map_err(|_| CryptoError::BadBlob)?
            .to_string();
        if !crate::valid_id(&key_id) {
            return Err(CryptoError::BadBlob);
        }
        Ok(DataKeyBlob {
            version,
            key_id,
            wrapped: raw.get(6 + n..).ok_or(CryptoError::BadBlob)?.to_vec(),
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = DK_MAGIC.to_vec();
        out.push(self.version);
        out.push(u8::try_from(self.key_id.len()).unwrap_or(0));
        out.extend_from_slice(self.key_id.as_bytes());
        out.extend_from_slice(&self.wrapped);
        out
    }

    /// A fresh version-2 data key for `volume_id` under CMK `key_id` (`stored`: the store's
    /// record of the CMK, opened by `keys`): the blob, and the per-volume secret the caller
    /// must keep (wrapped) for the key to be usable. No plaintext outlives the call but the
    /// secret's locked page.
    pub fn generate(
        keys: &dyn crate::keystore::KeyStore,
        stored: &[u8],
        key_id: &str,
        volume_id: &str,
    ) -> Result<(Self, LockedSecret<VOLUME_SECRET_LEN>), CryptoError> {
        if key_id.is_empty() || key_id.len() > MAX_KEY_ID_LEN {
            return Err(CryptoError::BadBlob);
        }
        let half: VolumeKey = random_secret::<VOLUME_KEY_LEN>()?;
        let secret = random_secret::<VOLUME_SECRET_LEN>()?;
        let wrapped = keys.seal(key_id, stored, &dk_aad(key_id, volume_id), half.as_ref())?;
        Ok((
            DataKeyBlob {
                version: DK_VERSION_2,
                key_id: key_id.to_string(),
                wrapped,
            },
            secret,
        ))
    }

    /// The volume key, for `volume_id` only. A version-2 blob needs the volume's secret
    /// (`None`: destroyed or never made → [`CryptoError::Destroyed`]).
    pub fn open(
        &self,
        keys: &dyn crate::keystore::KeyStore,
        stored: &[u8],
        volume_id: &str,
        secret: Option<&[u8; VOLUME_SECRET_LEN]>,
    ) -> Result<VolumeKey, CryptoError> {
        let inner = keys.open(
            &self.key_id,
            stored,
            &dk_aad(&self.key_id, volume_id),
            &self.wrapped,
        )?;
        if self.version == DK_VERSION_1 {
            return Ok(inner);
        }
        let secret = secret.ok_or(CryptoError::Destroyed)?;
        derive_volume_key(inner.as_ref(), secret, volume_id)
    }
}

/// HKDF-SHA256(salt = label, ikm = half || secret, info = volume id) → the 64-byte XTS key.
fn derive_volume_key(
    half: &[u8; VOLUME_KEY_LEN],
    secret: &[u8; VOLUME_SECRET_LEN],
    volume_id: &str,
) -> Result<VolumeKey, CryptoError> {
    use aws_lc_rs::hkdf::{KeyType, Salt, HKDF_SHA256};
    struct Len;
    impl KeyType for Len {
        fn len(&self) -> usize {
            VOLUME_KEY_LEN
        }
    }
    let mut ikm = Zeroizing::new([0u8; VOLUME_KEY_LEN + VOLUME_SECRET_LEN]);
    ikm[..VOLUME_KEY_LEN].copy_from_slice(half);
    ikm[VOLUME_KEY_LEN..].copy_from_slice(secret);
    let prk = Salt::new(HKDF_SHA256, b"bulkhead volume key v2").extract(ikm.as_ref());
    let info = [volume_id.as_bytes()];
    let okm = prk.expand(&info, Len).map_err(|_| CryptoError::Wrap)?;
    let mut key = LockedSecret::<VOLUME_KEY_LEN>::new()?;
    okm.fill(key.as_mut()).map_err(|_| CryptoError::Wrap)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn data_key_roundtrip_and_binding() {
        use crate::keystore::{Embedded, KeyStore};
        let keys = Embedded::new(random_secret::<32>().unwrap());
        let cmk = keys.create("key-1").unwrap();
        let (b, secret) = DataKeyBlob::generate(&keys, &cmk, "key-1", "vol-1").unwrap();
        let s = Some(secret.as_ref());
        let raw = b.to_bytes();
        let back = DataKeyBlob::parse(&raw).unwrap();
        assert_eq!(back, b);
        let k1 = back.open(&keys, &cmk, "vol-1", s).unwrap();
        assert_eq!(
            k1.as_ref(),
            back.open(&keys, &cmk, "vol-1", s).unwrap().as_ref()
        );
        assert!(back.open(&keys, &cmk, "vol-2", s).is_err());
        let other = keys.create("key-1").unwrap();
        assert!(back.open(&keys, &other, "vol-1", s).is_err());
        let elsewhere = Embedded::new(random_secret::<32>().unwrap());
        assert!(back.open(&elsewhere, &cmk, "vol-1", s).is_err());
        assert!(DataKeyBlob::parse(&raw[..raw.len() - 1]).is_err());
        assert!(DataKeyBlob::parse(b"BHDK").is_err());
        let mut v9 = raw.clone();
        v9[4] = 9;
        assert!(DataKeyBlob::parse(&v9).is_err());
    }

    #[test]
    fn without_its_secret_a_blob_opens_to_nothing() {
        use crate::keystore::{Embedded, KeyStore};
        let keys = Embedded::new(random_secret::<32>().unwrap());
        let cmk = keys.create("key-1").unwrap();
        let (b, secret) = DataKeyBlob::generate(&keys, &cmk, "key-1", "vol-1").unwrap();
        assert!(matches!(
            b.open(&keys, &cmk, "vol-1", None),
            Err(CryptoError::Destroyed)
        ));
        // Another secret (a guess) gives another key, never this volume's.
        let good = b.open(&keys, &cmk, "vol-1", Some(secret.as_ref())).unwrap();
        let guess = random_secret::<VOLUME_SECRET_LEN>().unwrap();
        let bad = b.open(&keys, &cmk, "vol-1", Some(guess.as_ref())).unwrap();
        assert_ne!(good.as_ref(), bad.as_ref());
        // The CMK alone yields only the half, which is not the volume key.
        let half = keys
            .open("key-1", &cmk, &dk_aad("key-1", "vol-1"), &b.wrapped)
            .unwrap();
        assert_ne!(half.as_ref(), good.as_ref());
    }
}
