//! AES-256-XTS with the `plain64` tweak of dm-crypt: the tweak of a crypto sector is its
//! sector number (in units of the crypto sector size) as a 16-byte little-endian integer.
//!
//! The cipher is AWS-LC's EVP AES-256-XTS (AES-NI / VAES code paths), the library rustls already
//! brings into the tree through aws-lc-rs. One [`XtsCipher`] per queue: the key schedule is
//! expanded once into an encrypt and a decrypt context, and each sector only sets a new tweak.

use aws_lc_sys as ffi;
use std::ptr::NonNull;

/// Size of a crypto sector (the XTS data unit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CryptoSectorSize {
    /// 512 bytes (dm-crypt default).
    S512,
    /// 4096 bytes (`cryptsetup --sector-size 4096`).
    S4096,
}

impl CryptoSectorSize {
    /// Bytes per crypto sector.
    pub fn bytes(self) -> u64 {
        match self {
            Self::S512 => 512,
            Self::S4096 => 4096,
        }
    }

    /// Bytes per crypto sector as usize.
    pub fn bytes_usize(self) -> usize {
        match self {
            Self::S512 => 512,
            Self::S4096 => 4096,
        }
    }

    /// log2 of the size, as carried in the control protocol.
    pub fn shift(self) -> u8 {
        match self {
            Self::S512 => 9,
            Self::S4096 => 12,
        }
    }

    /// From log2 of the size.
    pub fn from_shift(shift: u8) -> Option<Self> {
        match shift {
            9 => Some(Self::S512),
            12 => Some(Self::S4096),
            _ => None,
        }
    }
}

/// XTS errors.
#[derive(Debug, thiserror::Error)]
pub enum XtsError {
    #[error("AWS-LC AES-256-XTS {op} failed (error {code:#x})")]
    Crypto { op: &'static str, code: u32 },
    #[error("buffer of {len} bytes is not a whole number of {sector}-byte sectors")]
    Unaligned { len: usize, sector: usize },
    #[error("XTS key halves are equal; refusing the key")]
    WeakKey,
    #[error("sector number overflows")]
    SectorOverflow,
}

fn crypto_err(op: &'static str) -> XtsError {
    // SAFETY: ERR_get_error only reads this thread's error queue.
    let code = unsafe { ffi::ERR_get_error() };
    XtsError::Crypto { op, code }
}

/// An owned `EVP_CIPHER_CTX` keyed for AES-256-XTS in one direction.
struct Ctx(NonNull<ffi::EVP_CIPHER_CTX>);

// SAFETY: the context is exclusively owned and only used through `&mut self`; AWS-LC cipher
// contexts have no thread affinity.
unsafe impl Send for Ctx {}

impl Ctx {
    fn new(key: &[u8; 64], encrypt: bool) -> Result<Self, XtsError> {
        // SAFETY: EVP_CIPHER_CTX_new has no preconditions; NULL is checked.
        let raw = unsafe { ffi::EVP_CIPHER_CTX_new() };
        let ctx = Self(NonNull::new(raw).ok_or_else(|| crypto_err("context allocation"))?);
        // SAFETY: `ctx` is a live context; EVP_aes_256_xts returns a static cipher; `key` points
        // to the 64 bytes AES-256-XTS reads; no IV yet (NULL is allowed).
        let rc = unsafe {
            ffi::EVP_CipherInit_ex(
                ctx.0.as_ptr(),
                ffi::EVP_aes_256_xts(),
                std::ptr::null_mut(),
                key.as_ptr(),
                std::ptr::null(),
                i32::from(encrypt),
            )
        };
        if rc != 1 {
            return Err(crypto_err("key setup"));
        }
        Ok(ctx)
    }

    /// Processes one data unit in place with `tweak`.
    fn unit(&mut self, data: &mut [u8], tweak: &[u8; 16]) -> Result<(), XtsError> {
        let len = i32::try_from(data.len()).map_err(|_| XtsError::SectorOverflow)?;
        // SAFETY: live keyed context; `tweak` is 16 readable bytes; cipher/key NULL and enc -1
        // keep the cipher, key schedule and direction and only load the IV.
        let rc = unsafe {
            ffi::EVP_CipherInit_ex(
                self.0.as_ptr(),
                std::ptr::null(),
                std::ptr::null_mut(),
                std::ptr::null(),
                tweak.as_ptr(),
                -1,
            )
        };
        if rc != 1 {
            return Err(crypto_err("tweak setup"));
        }
        let mut out_len: i32 = 0;
        // SAFETY: `data` is valid for reads and writes of `len` bytes; XTS (block size 1, no
        // buffering) writes exactly `len` bytes, in place (`out == in` is allowed).
        let rc = unsafe {
            ffi::EVP_CipherUpdate(
                self.0.as_ptr(),
                data.as_mut_ptr(),
                &mut out_len,
                data.as_ptr(),
                len,
            )
        };
        if rc != 1 || out_len != len {
            return Err(crypto_err("update"));
        }
        Ok(())
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: the context was created by EVP_CIPHER_CTX_new and is freed once; AWS-LC
        // cleanses the key schedule (OPENSSL_free zeroizes) when freeing it.
        unsafe { ffi::EVP_CIPHER_CTX_free(self.0.as_ptr()) };
    }
}

/// A keyed AES-256-XTS engine for one queue.
pub struct XtsCipher {
    enc: Ctx,
    dec: Ctx,
    sector: CryptoSectorSize,
}

impl std::fmt::Debug for XtsCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XtsCipher")
            .field("sector", &self.sector)
            .finish_non_exhaustive()
    }
}

impl XtsCipher {
    /// Expands `key` (two AES-256 keys) into encrypt and decrypt contexts. AWS-LC keeps the key
    /// schedules in its own context memory and cleanses them when the contexts are freed.
    pub fn new(key: &[u8; 64], sector: CryptoSectorSize) -> Result<Self, XtsError> {
        if key[..32] == key[32..] {
            return Err(XtsError::WeakKey);
        }
        Ok(Self {
            enc: Ctx::new(key, true)?,
            dec: Ctx::new(key, false)?,
            sector,
        })
    }

    /// The crypto sector size.
    pub fn sector_size(&self) -> CryptoSectorSize {
        self.sector
    }

    /// Encrypts `buf` in place; `buf[0]` is the start of crypto sector `first_sector`.
    pub fn encrypt(&mut self, buf: &mut [u8], first_sector: u64) -> Result<(), XtsError> {
        Self::run(&mut self.enc, self.sector, buf, first_sector)
    }

    /// Decrypts `buf` in place; `buf[0]` is the start of crypto sector `first_sector`.
    pub fn decrypt(&mut self, buf: &mut [u8], first_sector: u64) -> Result<(), XtsError> {
        Self::run(&mut self.dec, self.sector, buf, first_sector)
    }

    fn run(
        ctx: &mut Ctx,
        sector: CryptoSectorSize,
        buf: &mut [u8],
        first_sector: u64,
    ) -> Result<(), XtsError> {
        let n = sector.bytes_usize();
        if !buf.len().is_multiple_of(n) {
            return Err(XtsError::Unaligned {
                len: buf.len(),
                sector: n,
            });
        }
        let mut tweak = [0u8; 16];
        for (i, chunk) in buf.chunks_exact_mut(n).enumerate() {
            let idx = u64::try_from(i).map_err(|_| XtsError::SectorOverflow)?;
            let s = first_sector
                .checked_add(idx)
                .ok_or(XtsError::SectorOverflow)?;
            tweak[..8].copy_from_slice(&s.to_le_bytes());
            ctx.unit(chunk, &tweak)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hexd(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// IEEE 1619-2007 XTS-AES-256 vector 10: key1 = 2718..., key2 = 3141..., data unit 0xff,
    /// 512 bytes of 00..ff,00..ff. Checks the tweak layout (little-endian sector number).
    #[test]
    fn ieee1619_vector_10() {
        let mut key = [0u8; 64];
        key[..32].copy_from_slice(&hexd(
            "2718281828459045235360287471352662497757247093699959574966967627",
        ));
        key[32..].copy_from_slice(&hexd(
            "3141592653589793238462643383279502884197169399375105820974944592",
        ));
        let mut x = XtsCipher::new(&key, CryptoSectorSize::S512).expect("cipher");
        let mut buf: Vec<u8> = (0..512u32)
            .map(|i| u8::try_from(i % 256).unwrap_or(0))
            .collect();
        let plain = buf.clone();
        x.encrypt(&mut buf, 0xff).expect("enc");
        assert_eq!(
            &buf[..32],
            &hexd("1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b")[..]
        );
        x.decrypt(&mut buf, 0xff).expect("dec");
        assert_eq!(buf, plain);
    }

    #[test]
    fn sectors_use_distinct_tweaks_and_4k_roundtrips() {
        let mut key = [7u8; 64];
        key[40] = 9;
        let mut x = XtsCipher::new(&key, CryptoSectorSize::S4096).expect("cipher");
        let mut buf = vec![0u8; 8192];
        x.encrypt(&mut buf, 10).expect("enc");
        assert_ne!(buf[..4096], buf[4096..]);
        let mut one = vec![0u8; 4096];
        x.encrypt(&mut one, 11).expect("enc");
        assert_eq!(one[..], buf[4096..]);
        x.decrypt(&mut buf, 10).expect("dec");
        assert!(buf.iter().all(|b| *b == 0));
        assert!(matches!(
            x.encrypt(&mut [0u8; 100], 0),
            Err(XtsError::Unaligned { .. })
        ));
        assert!(matches!(
            XtsCipher::new(&[1u8; 64], CryptoSectorSize::S512),
            Err(XtsError::WeakKey)
        ));
    }
}
