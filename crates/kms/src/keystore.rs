//! Where customer master keys live, and the only code that uses them.
//!
//! * [`Embedded`] (the default): a CMK is 32 random bytes, AES-256-GCM-wrapped under the KMS root
//!   key and stored (wrapped) in the KMS's SQLite store; it is unwrapped into locked memory for
//!   one operation and zeroized.
//! * [`Pkcs11`]: a CMK is an AES-256 secret-key object created **inside** a PKCS#11 token (an HSM;
//!   SoftHSM2 in tests) as `CKA_TOKEN`, `CKA_SENSITIVE`, not `CKA_EXTRACTABLE`, labelled with the
//!   key id. Data keys are encrypted and decrypted by the token (`CKM_AES_GCM`); the CMK's bytes
//!   never exist outside it. The KMS store keeps only a marker for the key.
//!
//! Both produce the same data-key ciphertext layout (`nonce(12) || ciphertext || tag(16)`), with
//! the same associated data binding it to the key id and the volume.

use std::path::Path;
use std::sync::Mutex;

use bulkhead_sealing::{VolumeKey, VOLUME_KEY_LEN};
use cryptoki::context::{CInitializeArgs, Pkcs11 as Module};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::crypto::{self, CryptoError, Key32};

/// What the store keeps for a CMK held by a PKCS#11 token.
pub const PKCS11_MARKER: &[u8] = b"pkcs11:v1";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// The CMK operations the KMS needs. There is no export.
pub trait KeyStore: Send + Sync {
    /// `embedded` or `pkcs11`.
    fn kind(&self) -> &'static str;
    /// Creates the CMK `key_id`; returns what the store records for it.
    fn create(&self, key_id: &str) -> Result<Vec<u8>, CryptoError>;
    /// Encrypts a data key under CMK `key_id` (`stored` = what [`KeyStore::create`] returned).
    fn seal(
        &self,
        key_id: &str,
        stored: &[u8],
        aad: &[u8],
        data_key: &[u8],
    ) -> Result<Vec<u8>, CryptoError>;
    /// Decrypts a data key sealed by [`KeyStore::seal`].
    fn open(
        &self,
        key_id: &str,
        stored: &[u8],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<VolumeKey, CryptoError>;
}

fn cmk_aad(key_id: &str) -> Vec<u8> {
    let mut a = b"bulkhead cmk v1\0".to_vec();
    a.extend_from_slice(key_id.as_bytes());
    a
}

/// CMKs wrapped under the KMS root key.
pub struct Embedded {
    root: Key32,
}

impl Embedded {
    pub fn new(root: Key32) -> Self {
        Embedded { root }
    }

    fn cmk(&self, key_id: &str, stored: &[u8]) -> Result<Key32, CryptoError> {
        crypto::unwrap::<32>(&self.root, &cmk_aad(key_id), stored)
    }
}

impl KeyStore for Embedded {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn create(&self, key_id: &str) -> Result<Vec<u8>, CryptoError> {
        let cmk = crypto::random_secret::<32>()?;
        crypto::wrap(&self.root, &cmk_aad(key_id), cmk.as_ref())
    }

    fn seal(
        &self,
        key_id: &str,
        stored: &[u8],
        aad: &[u8],
        data_key: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        crypto::wrap(&self.cmk(key_id, stored)?, aad, data_key)
    }

    fn open(
        &self,
        key_id: &str,
        stored: &[u8],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<VolumeKey, CryptoError> {
        crypto::unwrap::<VOLUME_KEY_LEN>(&self.cmk(key_id, stored)?, aad, sealed)
    }
}

/// Why the PKCS#11 token could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Pkcs11Error {
    #[error("PKCS#11 module {0}: {1}")]
    Module(String, cryptoki::error::Error),
    #[error("no token labelled {0:?}")]
    NoToken(String),
    #[error("PKCS#11: {0}")]
    Token(#[from] cryptoki::error::Error),
    #[error("PIN file {0}: {1}")]
    Pin(String, std::io::Error),
}

/// CMKs inside a PKCS#11 token, one logged-in read-write session (the token is one device:
/// operations are serialized).
pub struct Pkcs11 {
    session: Mutex<Session>,
    _module: Module,
}

impl Pkcs11 {
    /// Opens `module`, finds the token labelled `token_label`, logs in as the user with the PIN
    /// in `pin_file` (its first line).
    pub fn open(module: &Path, token_label: &str, pin_file: &Path) -> Result<Self, Pkcs11Error> {
        let m = Module::new(module)
            .map_err(|e| Pkcs11Error::Module(module.display().to_string(), e))?;
        m.initialize(CInitializeArgs::OsThreads)
            .map_err(|e| Pkcs11Error::Module(module.display().to_string(), e))?;
        let mut slot = None;
        for s in m.get_slots_with_token()? {
            if m.get_token_info(s)?.label().trim_end() == token_label {
                slot = Some(s);
                break;
            }
        }
        let slot = slot.ok_or_else(|| Pkcs11Error::NoToken(token_label.to_string()))?;
        let text = Zeroizing::new(
            std::fs::read_to_string(pin_file)
                .map_err(|e| Pkcs11Error::Pin(pin_file.display().to_string(), e))?,
        );
        let pin = AuthPin::from(text.lines().next().unwrap_or("").to_string());
        let session = m.open_rw_session(slot)?;
        session.login(UserType::User, Some(&pin))?;
        tracing::info!(token = token_label, "PKCS#11 token opened; CMKs live in it");
        Ok(Pkcs11 {
            session: Mutex::new(session),
            _module: m,
        })
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn find(s: &Session, key_id: &str) -> Result<ObjectHandle, CryptoError> {
        let found = s
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(key_id.as_bytes().to_vec()),
            ])
            .map_err(|e| token_err("find", &e))?;
        match found.as_slice() {
            [one] => Ok(*one),
            // None, or an ambiguous label: refuse rather than guess.
            _ => Err(CryptoError::Unwrap),
        }
    }
}

fn token_err(what: &str, e: &cryptoki::error::Error) -> CryptoError {
    tracing::warn!(error = %e, "PKCS#11 {what} failed");
    CryptoError::Wrap
}

impl KeyStore for Pkcs11 {
    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    fn create(&self, key_id: &str) -> Result<Vec<u8>, CryptoError> {
        let s = self.session();
        if Self::find(&s, key_id).is_ok() {
            return Err(CryptoError::Wrap);
        }
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Label(key_id.as_bytes().to_vec()),
        ];
        s.generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(|e| token_err("generate", &e))?;
        Ok(PKCS11_MARKER.to_vec())
    }

    fn seal(
        &self,
        key_id: &str,
        stored: &[u8],
        aad: &[u8],
        data_key: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        if stored != PKCS11_MARKER {
            return Err(CryptoError::Wrap);
        }
        let s = self.session();
        let key = Self::find(&s, key_id)?;
        let mut nonce = [0u8; NONCE_LEN];
        bulkhead_sealing::fill_random(&mut nonce)?;
        let mut iv = nonce;
        let params = GcmParams::new(&mut iv, aad, 128.into()).map_err(|e| token_err("gcm", &e))?;
        let ct = s
            .encrypt(&Mechanism::AesGcm(params), key, data_key)
            .map_err(|e| token_err("encrypt", &e))?;
        if ct.len() != data_key.len() + TAG_LEN {
            return Err(CryptoError::Wrap);
        }
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn open(
        &self,
        key_id: &str,
        stored: &[u8],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<VolumeKey, CryptoError> {
        if stored != PKCS11_MARKER || sealed.len() != NONCE_LEN + VOLUME_KEY_LEN + TAG_LEN {
            return Err(CryptoError::Unwrap);
        }
        let s = self.session();
        let key = Self::find(&s, key_id)?;
        let mut iv = [0u8; NONCE_LEN];
        iv.copy_from_slice(sealed.get(..NONCE_LEN).ok_or(CryptoError::Unwrap)?);
        let params = GcmParams::new(&mut iv, aad, 128.into()).map_err(|_| CryptoError::Unwrap)?;
        let plain = Zeroizing::new(
            s.decrypt(
                &Mechanism::AesGcm(params),
                key,
                sealed.get(NONCE_LEN..).ok_or(CryptoError::Unwrap)?,
            )
            .map_err(|_| CryptoError::Unwrap)?,
        );
        let mut out = bulkhead_sealing::LockedSecret::<VOLUME_KEY_LEN>::new()?;
        if plain.len() != VOLUME_KEY_LEN {
            return Err(CryptoError::Unwrap);
        }
        out.as_mut().copy_from_slice(&plain);
        Ok(out)
    }
}
