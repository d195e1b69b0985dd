//! Key wrapping inside the KMS (embedded default; a PKCS#11 token would hold the root key in
//! production).
//!
//! * The **root key** (32 bytes, file mode 0600) wraps every customer master key (CMK) and every
//!   customer signing secret with AES-256-GCM; the AAD names what is wrapped, so a wrapped CMK
//!   cannot be swapped for another key's row.
//! * A **CMK** (32 bytes) encrypts data keys with AES-256-GCM. The data-key ciphertext blob
//!   ([`DataKeyBlob`]) names its CMK and is bound (AAD) to the volume it was generated for.
//! * Plaintext CMKs and data keys live only in [`LockedSecret`] pages and in the AES key schedule
//!   for the duration of one call.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use bulkhead_sealing::{fill_random, LockedSecret, VolumeKey, VOLUME_KEY_LEN};
use std::path::Path;
use zeroize::Zeroizing;

const TAG_LEN: usize = 16;
const DK_MAGIC: &[u8; 4] = b"BHDK";
const DK_VERSION: u8 = 1;
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
}

/// A 32-byte AES-256 key in locked memory.
pub type Key32 = LockedSecret<32>;

fn aead(key: &Key32) -> Result<LessSafeKey, CryptoError> {
    let k = UnboundKey::new(&AES_256_GCM, key.as_ref()).map_err(|_| CryptoError::Wrap)?;
    Ok(LessSafeKey::new(k))
}

/// `nonce || ciphertext || tag` of `plain` under `key`, bound to `aad`.
pub fn wrap(key: &Key32, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce)?;
    let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let body = out.get_mut(NONCE_LEN..).ok_or(CryptoError::Wrap)?;
    let tag = aead(key)?
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
        .map_err(|_| CryptoError::Wrap)?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens a [`wrap`]ped value of exactly `N` bytes into a locked page.
pub fn unwrap<const N: usize>(
    key: &Key32,
    aad: &[u8],
    wrapped: &[u8],
) -> Result<LockedSecret<N>, CryptoError> {
    if wrapped.len() != NONCE_LEN + N + TAG_LEN {
        return Err(CryptoError::Unwrap);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(wrapped.get(..NONCE_LEN).ok_or(CryptoError::Unwrap)?);
    let mut buf = Zeroizing::new(
        wrapped
            .get(NONCE_LEN..)
            .ok_or(CryptoError::Unwrap)?
            .to_vec(),
    );
    let plain = aead(key)?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            buf.as_mut_slice(),
        )
        .map_err(|_| CryptoError::Unwrap)?;
    let mut out = LockedSecret::<N>::new()?;
    if plain.len() != N {
        return Err(CryptoError::Unwrap);
    }
    out.as_mut().copy_from_slice(plain);
    Ok(out)
}

/// Fresh random secret in a locked page.
pub fn random_secret<const N: usize>() -> Result<LockedSecret<N>, CryptoError> {
    let mut s = LockedSecret::<N>::new()?;
    fill_random(s.as_mut())?;
    Ok(s)
}

/// Reads (or, if `create`, creates) the root key file.
pub fn load_root_key(path: &Path, create: bool) -> Result<Key32, CryptoError> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    if create && !path.exists() {
        let key = random_secret::<32>()?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(CryptoError::RootKeyIo)?;
        f.write_all(key.as_ref()).map_err(CryptoError::RootKeyIo)?;
        f.sync_all().map_err(CryptoError::RootKeyIo)?;
        return Ok(key);
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_nofollow())
        .open(path)
        .map_err(CryptoError::RootKeyIo)?;
    let meta = f.metadata().map_err(CryptoError::RootKeyIo)?;
    if !meta.is_file() || meta.len() != 32 || meta.mode() & 0o077 != 0 {
        return Err(CryptoError::RootKeyFormat);
    }
    let mut key = LockedSecret::<32>::new()?;
    f.read_exact(key.as_mut()).map_err(CryptoError::RootKeyIo)?;
    Ok(key)
}

fn libc_o_nofollow() -> i32 {
    0o400_000 // O_NOFOLLOW on Linux
}

/// The data-key ciphertext the control plane stores for a volume:
/// `BHDK | version | key_id_len | key_id | nonce(12) | ciphertext(64) | tag(16)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataKeyBlob {
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
        if raw.get(..4) != Some(&DK_MAGIC[..]) || raw.get(4) != Some(&DK_VERSION) {
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
            key_id,
            wrapped: raw.get(6 + n..).ok_or(CryptoError::BadBlob)?.to_vec(),
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = DK_MAGIC.to_vec();
        out.push(DK_VERSION);
        out.push(u8::try_from(self.key_id.len()).unwrap_or(0));
        out.extend_from_slice(self.key_id.as_bytes());
        out.extend_from_slice(&self.wrapped);
        out
    }

    /// Generates a fresh data key for `volume_id` and encrypts it under `cmk`. The plaintext is
    /// dropped (zeroized) before returning.
    /// A fresh data key, sealed under CMK `key_id` by `keys` (`stored`: the store's record of
    /// the CMK), bound to `volume_id`.
    pub fn generate(
        keys: &dyn crate::keystore::KeyStore,
        stored: &[u8],
        key_id: &str,
        volume_id: &str,
    ) -> Result<Self, CryptoError> {
        if key_id.is_empty() || key_id.len() > MAX_KEY_ID_LEN {
            return Err(CryptoError::BadBlob);
        }
        let dk: VolumeKey = random_secret::<VOLUME_KEY_LEN>()?;
        let wrapped = keys.seal(key_id, stored, &dk_aad(key_id, volume_id), dk.as_ref())?;
        Ok(DataKeyBlob {
            key_id: key_id.to_string(),
            wrapped,
        })
    }

    /// The data key, for `volume_id` only.
    pub fn open(
        &self,
        keys: &dyn crate::keystore::KeyStore,
        stored: &[u8],
        volume_id: &str,
    ) -> Result<VolumeKey, CryptoError> {
        keys.open(
            &self.key_id,
            stored,
            &dk_aad(&self.key_id, volume_id),
            &self.wrapped,
        )
    }
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
        let b = DataKeyBlob::generate(&keys, &cmk, "key-1", "vol-1").unwrap();
        let raw = b.to_bytes();
        let back = DataKeyBlob::parse(&raw).unwrap();
        assert_eq!(back, b);
        assert!(back.open(&keys, &cmk, "vol-1").is_ok());
        assert!(back.open(&keys, &cmk, "vol-2").is_err());
        let other = keys.create("key-1").unwrap();
        assert!(back.open(&keys, &other, "vol-1").is_err());
        let elsewhere = Embedded::new(random_secret::<32>().unwrap());
        assert!(back.open(&elsewhere, &cmk, "vol-1").is_err());
        assert!(DataKeyBlob::parse(&raw[..raw.len() - 1]).is_err());
        assert!(DataKeyBlob::parse(b"BHDK").is_err());
    }

    #[test]
    fn root_key_file_permissions() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("root.key");
        let k = load_root_key(&p, true).unwrap();
        let k2 = load_root_key(&p, false).unwrap();
        assert_eq!(k.as_ref(), k2.as_ref());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_root_key(&p, false).is_err());
    }
}
