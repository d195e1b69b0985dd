//! AES-256-XTS with the `plain64` tweak of dm-crypt: the tweak of a crypto sector is its
//! sector number (in units of the crypto sector size) as a 16-byte little-endian integer.
//!
//! The cipher is AWS-LC's EVP AES-256-XTS (AES-NI / VAES code paths), the library rustls already
//! brings into the tree through aws-lc-rs. One [`XtsCipher`] per queue: the key schedule is
//! expanded once into an encrypt and a decrypt context, and each sector only sets a new tweak.
//!
//! Key schedules never touch the heap: each [`XtsCipher`] owns one secret page (a private
//! anonymous mapping, `mlock`'d, `MADV_DONTDUMP`, `MADV_WIPEONFORK`: [`LockedSecret`]) that holds
//! both `EVP_CIPHER_CTX`s and both expanded key schedules (`cipher_data`). AWS-LC allocates
//! `cipher_data` itself when a cipher is set, so the context is first set up *without* a key,
//! the (keyless) heap block is freed and replaced by a slot of the page, and only then is the
//! key expanded, straight into the page. On drop the contexts are released, the page is zeroized
//! and checked to read back as zeros, counted in [`key_pages_wiped`], and unmapped.
use aws_lc_sys as ffi;
use bulkhead_sealing::{LockedSecret, LockedSecretError};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use zeroize::Zeroize;

/// One secret page per [`XtsCipher`].
const PAGE: usize = 4096;
/// Offset of the decrypt `EVP_CIPHER_CTX` in the page (the encrypt one is at 0).
const DEC_CTX: usize = 512;
/// Offsets of the two `cipher_data` slots (AWS-LC's `EVP_AES_XTS_CTX`: two `AES_KEY`s of 244
/// bytes, each padded to 248, an `XTS128_CONTEXT` of 32 and a counter: 536 bytes in 0.47).
const ENC_DATA: usize = 1024;
const DEC_DATA: usize = 2048;
const SLOT: usize = 1024;
/// A pattern in the last bytes of each slot, checked after the key is expanded: a future AWS-LC
/// whose XTS context outgrew the slot is refused instead of writing past it.
const CANARY: [u8; 16] = *b"bulkhead-xts-end";

static KEY_PAGES_WIPED: AtomicU64 = AtomicU64::new(0);

/// How many key pages this process has zeroized (and verified as zero) and unmapped so far.
pub fn key_pages_wiped() -> u64 {
    KEY_PAGES_WIPED.load(Ordering::Relaxed)
}

/// The locked page; on drop it is zeroized, verified, counted, then unmapped.
struct KeyPage(LockedSecret<PAGE>);

impl Drop for KeyPage {
    fn drop(&mut self) {
        let page = self.0.as_mut();
        page.zeroize();
        // A volatile read-back, so the check cannot be folded into the zeroize above.
        let clean = page.iter().all(|b| {
            // SAFETY: `b` is a valid reference into the live page.
            unsafe { std::ptr::read_volatile(b) == 0 }
        });
        if clean {
            KEY_PAGES_WIPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Size of a crypto sector (the XTS data unit); part of the card's control protocol.
pub use bulkhead_card_proto::CryptoSectorSize;

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
    #[error("secret page for the key schedules: {0}")]
    Locked(#[from] LockedSecretError),
    #[error("AWS-LC's AES-256-XTS context does not fit its {SLOT}-byte slot in the key page")]
    SlotTooSmall,
}

fn crypto_err(op: &'static str) -> XtsError {
    // SAFETY: ERR_get_error only reads this thread's error queue.
    let code = unsafe { ffi::ERR_get_error() };
    XtsError::Crypto { op, code }
}

/// An `EVP_CIPHER_CTX` keyed for AES-256-XTS in one direction, living in a [`KeyPage`] together
/// with its key schedule. The page outlives it (field order in [`XtsCipher`]).
struct Ctx {
    ctx: NonNull<ffi::EVP_CIPHER_CTX>,
    /// The slot of the page that holds this context's key schedule.
    slot: *mut u8,
}

// SAFETY: the context is exclusively owned and only used through `&mut self`; AWS-LC cipher
// contexts have no thread affinity.
unsafe impl Send for Ctx {}

impl Ctx {
    /// Sets up a context at `ctx` whose key schedule lives at `data` (`SLOT` bytes).
    ///
    /// # Safety
    /// `ctx` and `data` point into a live, zeroed, exclusively owned page that outlives the
    /// returned value; `ctx` is aligned for `EVP_CIPHER_CTX` and has room for one, `data` is
    /// 16-byte aligned with `SLOT` bytes of room, and the two do not overlap.
    unsafe fn new_in(
        ctx: *mut ffi::EVP_CIPHER_CTX,
        data: *mut u8,
        key: &[u8; 64],
        encrypt: bool,
    ) -> Result<Self, XtsError> {
        let raw = NonNull::new(ctx).ok_or(XtsError::SlotTooSmall)?;
        // SAFETY: `ctx` is valid for writes of one EVP_CIPHER_CTX (caller).
        unsafe { ffi::EVP_CIPHER_CTX_init(ctx) };
        // From here `Drop` releases whatever AWS-LC allocated.
        let this = Self {
            ctx: raw,
            slot: data,
        };
        // SAFETY: `ctx` is an initialised context; no key and no IV: AWS-LC allocates the
        // (keyless) cipher_data on the heap and runs the XTS init, which returns at once
        // without a key or an IV.
        let rc = unsafe {
            ffi::EVP_CipherInit_ex(
                ctx,
                ffi::EVP_aes_256_xts(),
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
                i32::from(encrypt),
            )
        };
        if rc != 1 {
            return Err(crypto_err("context setup"));
        }
        // SAFETY: `data` has SLOT writable bytes (caller); the canary sits in the slot's tail.
        unsafe { std::ptr::copy_nonoverlapping(CANARY.as_ptr(), data.add(SLOT - 16), 16) };
        // SAFETY: `ctx` is a live context set up above. Its heap cipher_data holds no key yet
        // (only the NULL key pointers of the XTS init ctrl); it is freed (OPENSSL_free
        // cleanses) and replaced by the zeroed slot of the locked page, in which the same key
        // pointers read as NULL.
        unsafe {
            ffi::OPENSSL_free((*ctx).cipher_data);
            (*ctx).cipher_data = data.cast();
        }
        // SAFETY: live context with its cipher set; cipher NULL keeps it, `key` points to the
        // 64 bytes AES-256-XTS reads, no IV yet; the schedule is expanded into the slot.
        let rc = unsafe {
            ffi::EVP_CipherInit_ex(
                ctx,
                std::ptr::null(),
                std::ptr::null_mut(),
                key.as_ptr(),
                std::ptr::null(),
                i32::from(encrypt),
            )
        };
        if rc != 1 {
            return Err(crypto_err("key setup"));
        }
        let mut tail = [0u8; 16];
        // SAFETY: as above: the slot's last 16 bytes are readable.
        unsafe { std::ptr::copy_nonoverlapping(data.add(SLOT - 16), tail.as_mut_ptr(), 16) };
        if tail != CANARY {
            return Err(XtsError::SlotTooSmall);
        }
        Ok(this)
    }

    /// Processes one data unit in place with `tweak`.
    fn unit(&mut self, data: &mut [u8], tweak: &[u8; 16]) -> Result<(), XtsError> {
        let len = i32::try_from(data.len()).map_err(|_| XtsError::SectorOverflow)?;
        // SAFETY: live keyed context; `tweak` is 16 readable bytes; cipher/key NULL and enc -1
        // keep the cipher, key schedule and direction and only load the IV.
        let rc = unsafe {
            ffi::EVP_CipherInit_ex(
                self.ctx.as_ptr(),
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
                self.ctx.as_ptr(),
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
        let ctx = self.ctx.as_ptr();
        // SAFETY: `ctx` is the live context set up in `new_in`, inside the page that outlives
        // it. cipher_data is either the page's slot (not AWS-LC's to free: detached first) or
        // the keyless heap block of a failed set-up (freed by the cleanup). AES-XTS has no
        // cleanup hook, so the cleanup only frees cipher_data and clears the context.
        unsafe {
            if (*ctx).cipher_data.cast::<u8>() == self.slot {
                (*ctx).cipher_data = std::ptr::null_mut();
            }
            ffi::EVP_CIPHER_CTX_cleanup(ctx);
        }
    }
}

/// A keyed AES-256-XTS engine for one queue.
pub struct XtsCipher {
    // Field order is drop order: both contexts are released before their page is wiped.
    enc: Ctx,
    dec: Ctx,
    sector: CryptoSectorSize,
    _page: KeyPage,
}

impl std::fmt::Debug for XtsCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XtsCipher")
            .field("sector", &self.sector)
            .finish_non_exhaustive()
    }
}

impl XtsCipher {
    /// Expands `key` (two AES-256 keys) into encrypt and decrypt contexts, both (context and key
    /// schedule) inside one fresh locked, `MADV_DONTDUMP` page that is zeroized on drop.
    pub fn new(key: &[u8; 64], sector: CryptoSectorSize) -> Result<Self, XtsError> {
        const {
            assert!(std::mem::size_of::<ffi::EVP_CIPHER_CTX>() <= DEC_CTX);
            assert!(DEC_CTX + std::mem::size_of::<ffi::EVP_CIPHER_CTX>() <= ENC_DATA);
            assert!(DEC_DATA + SLOT <= PAGE);
        }
        if key[..32] == key[32..] {
            return Err(XtsError::WeakKey);
        }
        let mut page = KeyPage(LockedSecret::<PAGE>::new()?);
        // The page is a page-aligned mapping that does not move while `page` lives; the raw
        // pointer is taken once and every later access goes through it.
        let base = page.0.as_mut().as_mut_ptr();
        // SAFETY: `base` is a zeroed, page-aligned, exclusively owned PAGE-byte mapping; the
        // four regions (two contexts at 0 and DEC_CTX, two slots at ENC_DATA and DEC_DATA) are
        // disjoint and in bounds (checked above) and suitably aligned (multiples of 512).
        // `page` is stored after both contexts in `Self`, so it outlives them; on an error here
        // the contexts built so far drop before `page` does.
        let (enc, dec) = unsafe {
            let enc = Ctx::new_in(base.cast(), base.add(ENC_DATA), key, true)?;
            let dec = Ctx::new_in(base.add(DEC_CTX).cast(), base.add(DEC_DATA), key, false)?;
            (enc, dec)
        };
        Ok(Self {
            enc,
            dec,
            sector,
            _page: page,
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
