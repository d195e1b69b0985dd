//! Sealing of volume data keys to a host key (HPKE, RFC 9180), and the host key file format.
//!
//! The KMS seals a volume's 64-byte AES-256-XTS data key to the public half of a host key; only
//! the block card on that host can open it. The controller passes the blob through without being
//! able to read it.
//!
//! * Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM, base mode.
//! * `info` = `"bulkhead volume data key v1\0" || volume_id`, so a blob sealed for one volume does
//!   not open for another.
//! * `aad` = the blob's 14-byte header, so the header cannot be altered.
//!
//! Sealed blob (fixed size, [`SEALED_BLOB_LEN`] = 126 bytes):
//!
//! | offset | len | field                                                    |
//! |-------:|----:|----------------------------------------------------------|
//! | 0      | 4   | magic `BHSB`                                             |
//! | 4      | 1   | version, 1                                               |
//! | 5      | 1   | suite, 1 (the one above)                                 |
//! | 6      | 8   | host key id: first 8 bytes of SHA-256(host public key)   |
//! | 14     | 32  | HPKE encapsulated key                                    |
//! | 46     | 16  | AES-GCM tag                                              |
//! | 62     | 64  | ciphertext of the 64-byte XTS key                        |
//!
//! Host key file (70 bytes, mode 0600, owned by the reading user, no symlink):
//! `BHHK` | version 1 | suite 1 | X25519 secret (32) | X25519 public (32).
//! Host public key file (38 bytes): `BHHP` | version 1 | suite 1 | X25519 public (32).
//!
//! Plaintext keys only ever live in [`LockedSecret`] pages (mlock'd, `MADV_DONTDUMP`, zeroized on
//! drop). The only I/O here is [`HostKey::read_file`] and [`wrap::load_root_key`].
//!
//! [`wrap`]: AES-256-GCM wrapping of small secrets under a 32-byte root key (the KMS's master
//! keys and customer secrets; the control plane's copies of customer secrets).

mod blob;
mod locked;
pub mod wrap;

pub use blob::SealedBlob;
pub use locked::{LockedSecret, LockedSecretError};

use hpke::aead::{AeadTag, AesGcm256};
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as KemTrait, OpModeR, OpModeS, Serializable};
use sha2::{Digest, Sha256};
use std::os::fd::AsRawFd;
use std::path::Path;

type Kem = X25519HkdfSha256;

/// Length of a volume data key: two AES-256 keys for XTS.
pub const VOLUME_KEY_LEN: usize = 64;
/// Length of a sealed volume key blob.
pub const SEALED_BLOB_LEN: usize = 126;
/// Length of the host key file.
pub const HOST_KEY_FILE_LEN: usize = 70;
/// Length of the host public key file.
pub const HOST_PUBLIC_KEY_FILE_LEN: usize = 38;
/// Longest accepted volume id.
pub const MAX_VOLUME_ID_LEN: usize = 64;

const BLOB_MAGIC: &[u8; 4] = b"BHSB";
const HOST_KEY_MAGIC: &[u8; 4] = b"BHHK";
const HOST_PUB_MAGIC: &[u8; 4] = b"BHHP";
const VERSION: u8 = 1;
const SUITE_X25519_SHA256_AES256GCM: u8 = 1;
const HEADER_LEN: usize = 14;
const ENC_LEN: usize = 32;
const TAG_LEN: usize = 16;
const INFO_PREFIX: &[u8] = b"bulkhead volume data key v1\0";

/// A 64-byte volume data key in locked memory.
pub type VolumeKey = LockedSecret<VOLUME_KEY_LEN>;

/// Everything that can go wrong while reading keys or sealing/opening blobs.
#[derive(Debug, thiserror::Error)]
pub enum SealingError {
    #[error("host key file: {0}")]
    KeyFileIo(#[source] std::io::Error),
    #[error("host key file is not a regular file")]
    KeyFileNotRegular,
    #[error("host key file has mode {mode:o}; it must not be readable or writable by group or others (want 0600)")]
    KeyFilePermissions { mode: u32 },
    #[error("host key file is owned by uid {owner}, not by the reading uid {reader}")]
    KeyFileOwner { owner: u32, reader: u32 },
    #[error("host key file has {got} bytes, want {want}")]
    KeyFileLength { got: u64, want: usize },
    #[error("bad magic: not a Bulkhead {what}")]
    BadMagic { what: &'static str },
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    #[error("unsupported cipher suite {0}")]
    UnsupportedSuite(u8),
    #[error("host key file's public key does not match its secret key")]
    KeyMismatch,
    #[error("sealed blob has {got} bytes, want {want}")]
    BlobLength { got: usize, want: usize },
    #[error("sealed blob is addressed to host key {blob}, this host's key is {host}")]
    WrongHostKey { blob: String, host: String },
    #[error("volume id must be 1..={MAX_VOLUME_ID_LEN} bytes")]
    VolumeIdLength,
    #[error("sealed blob failed authentication (corrupted, or sealed for another volume or host)")]
    OpenFailed,
    #[error("sealing failed")]
    SealFailed,
    #[error("invalid key material")]
    InvalidKey,
    #[error(transparent)]
    Locked(#[from] LockedSecretError),
}

/// The public half of a host key; what the KMS seals to.
#[derive(Clone, PartialEq, Eq)]
pub struct HostPublicKey([u8; 32]);

impl std::fmt::Debug for HostPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostPublicKey({})", hex8(&self.key_id()))
    }
}

impl HostPublicKey {
    /// First 8 bytes of SHA-256 of the public key; names the key in sealed blobs.
    pub fn key_id(&self) -> [u8; 8] {
        let digest = Sha256::digest(self.0);
        let mut id = [0u8; 8];
        id.copy_from_slice(digest.get(..8).unwrap_or(&[0u8; 8]));
        id
    }

    /// Raw 32-byte X25519 public key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Encodes the 38-byte host public key file.
    pub fn to_file_bytes(&self) -> [u8; HOST_PUBLIC_KEY_FILE_LEN] {
        let mut out = [0u8; HOST_PUBLIC_KEY_FILE_LEN];
        out[..4].copy_from_slice(HOST_PUB_MAGIC);
        out[4] = VERSION;
        out[5] = SUITE_X25519_SHA256_AES256GCM;
        out[6..].copy_from_slice(&self.0);
        out
    }

    /// Parses the 38-byte host public key file.
    pub fn from_file_bytes(raw: &[u8]) -> Result<Self, SealingError> {
        if raw.len() != HOST_PUBLIC_KEY_FILE_LEN {
            return Err(SealingError::KeyFileLength {
                got: u64::try_from(raw.len()).unwrap_or(u64::MAX),
                want: HOST_PUBLIC_KEY_FILE_LEN,
            });
        }
        check_header(raw, HOST_PUB_MAGIC, "host public key")?;
        let mut pk = [0u8; 32];
        pk.copy_from_slice(raw.get(6..38).ok_or(SealingError::InvalidKey)?);
        Ok(Self(pk))
    }
}

/// A host's private key, held in a locked page.
pub struct HostKey {
    secret: LockedSecret<32>,
    public: HostPublicKey,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl HostKey {
    /// Generates a fresh host key from the OS random source.
    pub fn generate() -> Result<Self, SealingError> {
        let mut secret = LockedSecret::<32>::new()?;
        fill_random(secret.as_mut())?;
        Self::from_secret(secret)
    }

    fn from_secret(secret: LockedSecret<32>) -> Result<Self, SealingError> {
        let sk = <Kem as KemTrait>::PrivateKey::from_bytes(secret.as_ref())
            .map_err(|_| SealingError::InvalidKey)?;
        let pk = <Kem as KemTrait>::sk_to_pk(&sk);
        let mut public = [0u8; 32];
        public.copy_from_slice(&pk.to_bytes());
        Ok(Self {
            secret,
            public: HostPublicKey(public),
        })
    }

    /// The public half.
    pub fn public(&self) -> &HostPublicKey {
        &self.public
    }

    /// Encodes the 70-byte host key file into a locked page. The caller writes it with mode 0600.
    pub fn to_file_bytes(&self) -> Result<LockedSecret<HOST_KEY_FILE_LEN>, SealingError> {
        let mut out = LockedSecret::<HOST_KEY_FILE_LEN>::new()?;
        let buf = out.as_mut();
        buf[..4].copy_from_slice(HOST_KEY_MAGIC);
        buf[4] = VERSION;
        buf[5] = SUITE_X25519_SHA256_AES256GCM;
        buf[6..38].copy_from_slice(self.secret.as_ref());
        buf[38..70].copy_from_slice(&self.public.0);
        Ok(out)
    }

    /// Parses the 70-byte host key file contents.
    pub fn from_file_bytes(raw: &[u8]) -> Result<Self, SealingError> {
        if raw.len() != HOST_KEY_FILE_LEN {
            return Err(SealingError::KeyFileLength {
                got: u64::try_from(raw.len()).unwrap_or(u64::MAX),
                want: HOST_KEY_FILE_LEN,
            });
        }
        check_header(raw, HOST_KEY_MAGIC, "host key")?;
        let mut secret = LockedSecret::<32>::new()?;
        secret
            .as_mut()
            .copy_from_slice(raw.get(6..38).ok_or(SealingError::InvalidKey)?);
        let key = Self::from_secret(secret)?;
        if raw.get(38..70) != Some(&key.public.0[..]) {
            return Err(SealingError::KeyMismatch);
        }
        Ok(key)
    }

    /// Reads a host key file: a regular file (no symlink), mode 0600 or stricter, owned by the
    /// effective uid, exactly [`HOST_KEY_FILE_LEN`] bytes. The bytes are read straight into a
    /// locked page.
    pub fn read_file(path: &Path) -> Result<Self, SealingError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(SealingError::KeyFileIo)?;
        let meta = file.metadata().map_err(SealingError::KeyFileIo)?;
        if !meta.file_type().is_file() {
            return Err(SealingError::KeyFileNotRegular);
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SealingError::KeyFilePermissions { mode });
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let reader = unsafe { libc::geteuid() };
        if meta.uid() != reader {
            return Err(SealingError::KeyFileOwner {
                owner: meta.uid(),
                reader,
            });
        }
        if meta.len() != HOST_KEY_FILE_LEN as u64 {
            return Err(SealingError::KeyFileLength {
                got: meta.len(),
                want: HOST_KEY_FILE_LEN,
            });
        }
        let mut raw = LockedSecret::<HOST_KEY_FILE_LEN>::new()?;
        let mut done = 0usize;
        while done < HOST_KEY_FILE_LEN {
            let rest = raw
                .as_mut()
                .get_mut(done..)
                .ok_or(SealingError::InvalidKey)?;
            // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes inside the locked
            // page owned by `raw`; `file` is an open fd for the duration of the call.
            let n = unsafe { libc::read(file.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(SealingError::KeyFileIo(err));
            }
            if n == 0 {
                return Err(SealingError::KeyFileLength {
                    got: u64::try_from(done).unwrap_or(u64::MAX),
                    want: HOST_KEY_FILE_LEN,
                });
            }
            done += usize::try_from(n).map_err(|_| SealingError::InvalidKey)?;
        }
        Self::from_file_bytes(raw.as_ref())
    }
}

fn check_header(raw: &[u8], magic: &[u8; 4], what: &'static str) -> Result<(), SealingError> {
    if raw.get(..4) != Some(&magic[..]) {
        return Err(SealingError::BadMagic { what });
    }
    match raw.get(4) {
        Some(&VERSION) => {}
        Some(&v) => return Err(SealingError::UnsupportedVersion(v)),
        None => return Err(SealingError::BadMagic { what }),
    }
    match raw.get(5) {
        Some(&SUITE_X25519_SHA256_AES256GCM) => Ok(()),
        Some(&s) => Err(SealingError::UnsupportedSuite(s)),
        None => Err(SealingError::BadMagic { what }),
    }
}

fn info_for(volume_id: &str) -> Result<Vec<u8>, SealingError> {
    if volume_id.is_empty() || volume_id.len() > MAX_VOLUME_ID_LEN {
        return Err(SealingError::VolumeIdLength);
    }
    let mut info = Vec::with_capacity(INFO_PREFIX.len() + volume_id.len());
    info.extend_from_slice(INFO_PREFIX);
    info.extend_from_slice(volume_id.as_bytes());
    Ok(info)
}

fn hex8(id: &[u8; 8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seals a 64-byte volume key to `host` for `volume_id`. Used by the KMS (and tests).
pub fn seal_volume_key(
    host: &HostPublicKey,
    volume_id: &str,
    key: &[u8; VOLUME_KEY_LEN],
) -> Result<[u8; SEALED_BLOB_LEN], SealingError> {
    let info = info_for(volume_id)?;
    let pk =
        <Kem as KemTrait>::PublicKey::from_bytes(&host.0).map_err(|_| SealingError::InvalidKey)?;
    let mut blob = [0u8; SEALED_BLOB_LEN];
    blob[..4].copy_from_slice(BLOB_MAGIC);
    blob[4] = VERSION;
    blob[5] = SUITE_X25519_SHA256_AES256GCM;
    blob[6..14].copy_from_slice(&host.key_id());
    let (header, rest) = blob.split_at_mut(HEADER_LEN);
    let (enc_out, rest) = rest.split_at_mut(ENC_LEN);
    let (tag_out, ct) = rest.split_at_mut(TAG_LEN);
    ct.copy_from_slice(key);
    let (enc, tag) = hpke::single_shot_seal_inout_detached::<AesGcm256, HkdfSha256, Kem>(
        &OpModeS::Base,
        &pk,
        &info,
        hpke::inout::InOutBuf::from(&mut ct[..]),
        header,
    )
    .map_err(|_| SealingError::SealFailed)?;
    enc_out.copy_from_slice(&enc.to_bytes());
    tag_out.copy_from_slice(&tag.to_bytes());
    Ok(blob)
}

/// Opens a sealed volume key blob with the host key; the plaintext is decrypted in place inside
/// a locked page and never exists anywhere else.
pub fn open_volume_key(
    host: &HostKey,
    volume_id: &str,
    blob: &[u8],
) -> Result<VolumeKey, SealingError> {
    if blob.len() != SEALED_BLOB_LEN {
        return Err(SealingError::BlobLength {
            got: blob.len(),
            want: SEALED_BLOB_LEN,
        });
    }
    check_header(blob, BLOB_MAGIC, "sealed key blob")?;
    let info = info_for(volume_id)?;
    let host_id = host.public.key_id();
    let blob_id = blob.get(6..14).ok_or(SealingError::OpenFailed)?;
    if blob_id != host_id {
        let mut b = [0u8; 8];
        b.copy_from_slice(blob_id);
        return Err(SealingError::WrongHostKey {
            blob: hex8(&b),
            host: hex8(&host_id),
        });
    }
    let header = blob.get(..HEADER_LEN).ok_or(SealingError::OpenFailed)?;
    let enc_raw = blob
        .get(HEADER_LEN..HEADER_LEN + ENC_LEN)
        .ok_or(SealingError::OpenFailed)?;
    let tag_raw = blob
        .get(HEADER_LEN + ENC_LEN..HEADER_LEN + ENC_LEN + TAG_LEN)
        .ok_or(SealingError::OpenFailed)?;
    let ct = blob
        .get(HEADER_LEN + ENC_LEN + TAG_LEN..)
        .ok_or(SealingError::OpenFailed)?;
    let enc = <Kem as KemTrait>::EncappedKey::from_bytes(enc_raw)
        .map_err(|_| SealingError::OpenFailed)?;
    let tag = AeadTag::<AesGcm256>::from_bytes(tag_raw).map_err(|_| SealingError::OpenFailed)?;
    let sk = <Kem as KemTrait>::PrivateKey::from_bytes(host.secret.as_ref())
        .map_err(|_| SealingError::InvalidKey)?;
    let mut out = VolumeKey::new()?;
    out.as_mut().copy_from_slice(ct);
    let res = hpke::single_shot_open_inout_detached::<AesGcm256, HkdfSha256, Kem>(
        &OpModeR::Base,
        &sk,
        &enc,
        &info,
        hpke::inout::InOutBuf::from(out.as_mut().as_mut_slice()),
        header,
        &tag,
    );
    // x25519-dalek zeroizes a StaticSecret when it is dropped.
    drop(sk);
    match res {
        Ok(()) => Ok(out),
        Err(_) => Err(SealingError::OpenFailed),
    }
}

/// Fills `buf` from the kernel's CSPRNG (getrandom(2)), so key bytes never pass through a
/// user-space RNG buffer.
pub fn fill_random(buf: &mut [u8]) -> Result<(), SealingError> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = buf.get_mut(done..).ok_or(SealingError::InvalidKey)?;
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SealingError::KeyFileIo(err));
        }
        done += usize::try_from(n).map_err(|_| SealingError::InvalidKey)?;
    }
    Ok(())
}

/// A fresh request nonce: 32 hex digits from the kernel CSPRNG (a signed request's
/// `x-bh-nonce`). Empty only if the kernel has no randomness to give, which the verifier
/// refuses.
pub fn random_nonce() -> String {
    let mut b = [0u8; 16];
    match fill_random(&mut b) {
        Ok(()) => hex::encode(b),
        Err(_) => String::new(),
    }
}

/// A fresh resource id: `prefix`, a dash and 16 hex digits from the kernel CSPRNG (e.g.
/// `i-0f3a…`, `vol-…`). Only unique, never secret. Should the kernel give no randomness the
/// digits are zeros: a store refuses a duplicate resource id, but request ids and audit
/// references would then repeat (getrandom does not fail on Linux once the pool is ready).
pub fn random_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    let _ = fill_random(&mut b);
    format!("{prefix}-{}", hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> [u8; 64] {
        let mut k = [0u8; 64];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::try_from(i).unwrap_or(0) ^ 0x5a;
        }
        k
    }

    #[test]
    fn seal_open_roundtrip() {
        let host = HostKey::generate().expect("gen");
        let blob = seal_volume_key(host.public(), "vol-1", &key()).expect("seal");
        assert_eq!(blob.len(), SEALED_BLOB_LEN);
        assert!(
            !blob.windows(16).any(|w| w == &key()[..16]),
            "plaintext visible in blob"
        );
        let opened = open_volume_key(&host, "vol-1", &blob).expect("open");
        assert_eq!(opened.as_ref(), &key());
    }

    #[test]
    fn wrong_volume_or_host_or_corruption_is_refused() {
        let host = HostKey::generate().expect("gen");
        let other = HostKey::generate().expect("gen");
        let blob = seal_volume_key(host.public(), "vol-1", &key()).expect("seal");
        assert!(matches!(
            open_volume_key(&host, "vol-2", &blob),
            Err(SealingError::OpenFailed)
        ));
        assert!(matches!(
            open_volume_key(&other, "vol-1", &blob),
            Err(SealingError::WrongHostKey { .. })
        ));
        for i in 0..SEALED_BLOB_LEN {
            let mut bad = blob;
            bad[i] ^= 0x01;
            assert!(
                open_volume_key(&host, "vol-1", &bad).is_err(),
                "flip at {i} accepted"
            );
        }
        assert!(matches!(
            open_volume_key(&host, "vol-1", &blob[..100]),
            Err(SealingError::BlobLength { .. })
        ));
    }

    #[test]
    fn host_key_file_roundtrip_and_permissions() {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let host = HostKey::generate().expect("gen");
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("host.key");
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(host.to_file_bytes().expect("enc").as_ref())
            .expect("write");
        drop(f);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            HostKey::read_file(&path),
            Err(SealingError::KeyFilePermissions { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let back = HostKey::read_file(&path).expect("read");
        assert_eq!(back.public(), host.public());
        let pubf = host.public().to_file_bytes();
        assert_eq!(
            HostPublicKey::from_file_bytes(&pubf).expect("pub"),
            *host.public()
        );
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        assert!(matches!(
            HostKey::read_file(&link),
            Err(SealingError::KeyFileIo(_))
        ));
    }

    #[test]
    fn host_key_file_mismatch_refused() {
        let host = HostKey::generate().expect("gen");
        let mut raw = [0u8; HOST_KEY_FILE_LEN];
        raw.copy_from_slice(host.to_file_bytes().expect("enc").as_ref());
        raw[69] ^= 1;
        assert!(matches!(
            HostKey::from_file_bytes(&raw),
            Err(SealingError::KeyMismatch)
        ));
        raw[0] = b'X';
        assert!(matches!(
            HostKey::from_file_bytes(&raw),
            Err(SealingError::BadMagic { .. })
        ));
    }

    #[test]
    fn random_ids_carry_their_prefix_and_differ() {
        let a = super::random_id("vol");
        let b = super::random_id("vol");
        assert!(a.starts_with("vol-"), "{a}");
        assert_eq!(a.len(), "vol-".len() + 16);
        assert!(a["vol-".len()..].bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
