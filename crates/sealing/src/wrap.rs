//! AES-256-GCM wrapping of small secrets under a 32-byte key held in locked memory, and the
//! root key file that key is read from: what the KMS wraps its master keys and customer secrets
//! with, and what the control plane opens its own copies of customer secrets with.
//!
//! A wrapped value is `nonce(12) || ciphertext || tag(16)`; the AAD names what is wrapped, so a
//! wrapped value cannot be swapped for another's. Plaintexts come back in [`LockedSecret`] pages.

use std::path::Path;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use zeroize::Zeroizing;

use crate::{fill_random, LockedSecret, LockedSecretError, SealingError};

const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    #[error("root key file: {0}")]
    RootKeyIo(#[source] std::io::Error),
    #[error("root key file must be 32 bytes with mode 0600")]
    RootKeyFormat,
    #[error("locked memory: {0}")]
    Locked(#[from] LockedSecretError),
    #[error("random source: {0}")]
    Random(#[from] SealingError),
    #[error("ciphertext failed authentication")]
    Unwrap,
    #[error("encryption failed")]
    Wrap,
}

/// A 32-byte AES-256 key in locked memory.
pub type Key32 = LockedSecret<32>;

fn aead(key: &Key32) -> Result<LessSafeKey, WrapError> {
    let k = UnboundKey::new(&AES_256_GCM, key.as_ref()).map_err(|_| WrapError::Wrap)?;
    Ok(LessSafeKey::new(k))
}

/// `nonce || ciphertext || tag` of `plain` under `key`, bound to `aad`.
pub fn wrap(key: &Key32, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, WrapError> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce)?;
    let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let body = out.get_mut(NONCE_LEN..).ok_or(WrapError::Wrap)?;
    let tag = aead(key)?
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
        .map_err(|_| WrapError::Wrap)?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens a [`wrap`]ped value of exactly `N` bytes into a locked page.
pub fn unwrap<const N: usize>(
    key: &Key32,
    aad: &[u8],
    wrapped: &[u8],
) -> Result<LockedSecret<N>, WrapError> {
    if wrapped.len() != NONCE_LEN + N + TAG_LEN {
        return Err(WrapError::Unwrap);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(wrapped.get(..NONCE_LEN).ok_or(WrapError::Unwrap)?);
    let mut buf = Zeroizing::new(wrapped.get(NONCE_LEN..).ok_or(WrapError::Unwrap)?.to_vec());
    let plain = aead(key)?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            buf.as_mut_slice(),
        )
        .map_err(|_| WrapError::Unwrap)?;
    let mut out = LockedSecret::<N>::new()?;
    if plain.len() != N {
        return Err(WrapError::Unwrap);
    }
    out.as_mut().copy_from_slice(plain);
    Ok(out)
}

/// Fresh random secret in a locked page.
pub fn random_secret<const N: usize>() -> Result<LockedSecret<N>, WrapError> {
    let mut s = LockedSecret::<N>::new()?;
    fill_random(s.as_mut())?;
    Ok(s)
}

/// Reads (or, if `create`, creates) a root key file: exactly 32 bytes, mode 0600, not a
/// symbolic link.
pub fn load_root_key(path: &Path, create: bool) -> Result<Key32, WrapError> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    if create && !path.exists() {
        let key = random_secret::<32>()?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(WrapError::RootKeyIo)?;
        f.write_all(key.as_ref()).map_err(WrapError::RootKeyIo)?;
        f.sync_all().map_err(WrapError::RootKeyIo)?;
        return Ok(key);
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(WrapError::RootKeyIo)?;
    let meta = f.metadata().map_err(WrapError::RootKeyIo)?;
    if !meta.is_file() || meta.len() != 32 || meta.mode() & 0o077 != 0 {
        return Err(WrapError::RootKeyFormat);
    }
    let mut key = LockedSecret::<32>::new()?;
    f.read_exact(key.as_mut()).map_err(WrapError::RootKeyIo)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn wrap_roundtrip_is_bound_to_key_and_aad() {
        let k = random_secret::<32>().unwrap();
        let w = wrap(&k, b"aad", &[7u8; 32]).unwrap();
        assert_eq!(unwrap::<32>(&k, b"aad", &w).unwrap().as_ref(), &[7u8; 32]);
        assert!(matches!(
            unwrap::<32>(&k, b"other", &w),
            Err(WrapError::Unwrap)
        ));
        let k2 = random_secret::<32>().unwrap();
        assert!(matches!(
            unwrap::<32>(&k2, b"aad", &w),
            Err(WrapError::Unwrap)
        ));
        assert!(matches!(
            unwrap::<16>(&k, b"aad", &w),
            Err(WrapError::Unwrap)
        ));
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
        assert!(matches!(
            load_root_key(&p, false),
            Err(WrapError::RootKeyFormat)
        ));
    }
}
