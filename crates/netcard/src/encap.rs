//! The encapsulation between hosts: each guest frame sealed with AES-256-GCM and carried in one
//! UDP datagram.
//!
//! ```text
//!  0       1       2               4               8              12              16..24
//! +-------+-------+---------------+---------------+---------------+---------------+--------
//! | ver=1 | kind  |  reserved=0   |    VPC id     |   key epoch   |  sender card  | sequence (u64)
//! +-------+-------+---------------+---------------+---------------+---------------+--------
//! | ciphertext of the guest's Ethernet frame ...                        | 16-byte GCM tag |
//! ```
//!
//! All integers big-endian. The 24 header bytes are the AEAD's associated data; the nonce is
//! `epoch (4) || sequence (8)`. The key is per VPC, epoch and *direction*: HKDF-SHA256 of the
//! VPC's epoch key with `info = "bulkhead-netcard v1" || vpc || epoch || sender || receiver`,
//! so every (key, nonce) pair is used once as long as a sender never repeats a sequence number
//! within an epoch (it starts at 1 and refuses to wrap). The receiver checks version, kind, VPC,
//! epoch and sender before any crypto, then the sequence number against a 2048-bit sliding
//! window, then the tag; only an authentic datagram moves the window.
//!
//! Key material never touches the heap: the epoch key, the derived direction keys and both
//! AWS-LC `EVP_AEAD_CTX`s (whose AES-GCM key schedule is stored inline) live in one
//! [`LockedSecret`] page (mlock'd, `MADV_DONTDUMP`, `MADV_WIPEONFORK`), zeroized and checked on
//! drop.

use crate::frame::MAX_FRAME;
use crate::{NetcardError, Result};
use aws_lc_sys as ffi;
use bulkhead_sealing::LockedSecret;
use std::io::Read;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use zeroize::Zeroize;

/// Wire format version.
pub const VERSION: u8 = 1;
/// Header length (the AEAD's associated data).
pub const HEADER_LEN: usize = 24;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Nonce length.
pub const NONCE_LEN: usize = 12;
/// Epoch key length.
pub const KEY_LEN: usize = 32;
/// Largest datagram the card sends or accepts.
pub const MAX_DATAGRAM: usize = HEADER_LEN + MAX_FRAME + TAG_LEN;
/// Replay window width in sequence numbers.
pub const REPLAY_WINDOW: u64 = 2048;
/// HKDF salt and info prefix.
pub const KDF_LABEL: &[u8] = b"bulkhead-netcard v1";

/// A VPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VpcId(pub u32);
/// A key epoch of a VPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyEpoch(pub u32);
/// A card (one interface's end of the tunnel), unique within a VPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CardId(pub u32);

/// Whether the payload is sealed or (benchmark-only) plain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadKind {
    Sealed,
    /// The frame in clear, no tag: only for measuring the cost of the crypto. A card in sealed
    /// mode refuses these.
    Plain,
}

impl PayloadKind {
    fn code(self) -> u8 {
        match self {
            PayloadKind::Sealed => 1,
            PayloadKind::Plain => 2,
        }
    }
}

/// Why a datagram from the host network was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DropReason {
    #[error("shorter than header and tag")]
    Truncated,
    #[error("larger than the card accepts")]
    Oversized,
    #[error("unknown version")]
    BadVersion,
    #[error("payload kind not accepted by this card")]
    BadKind,
    #[error("reserved bits set")]
    Reserved,
    #[error("another VPC")]
    WrongVpc,
    #[error("unknown key epoch")]
    UnknownEpoch,
    #[error("unknown sender card")]
    UnknownSender,
    #[error("sequence number 0")]
    ZeroSequence,
    #[error("sequence number already seen")]
    Replayed,
    #[error("sequence number older than the replay window")]
    TooOld,
    #[error("authentication tag does not verify")]
    Forged,
}

/// The datagram header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncapHeader {
    pub kind: PayloadKind,
    pub vpc: VpcId,
    pub epoch: KeyEpoch,
    pub sender: CardId,
    pub seq: u64,
}

fn arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = b.get(at..at + N) {
        out.copy_from_slice(s);
    }
    out
}

impl EncapHeader {
    /// Splits a datagram into its header and body. Checks only what needs no key.
    pub fn parse(raw: &[u8]) -> Result<(Self, &[u8]), DropReason> {
        if raw.len() < HEADER_LEN {
            return Err(DropReason::Truncated);
        }
        if raw.len() > MAX_DATAGRAM {
            return Err(DropReason::Oversized);
        }
        if raw.first() != Some(&VERSION) {
            return Err(DropReason::BadVersion);
        }
        let kind = match raw.get(1) {
            Some(1) => PayloadKind::Sealed,
            Some(2) => PayloadKind::Plain,
            _ => return Err(DropReason::BadKind),
        };
        if arr::<2>(raw, 2) != [0, 0] {
            return Err(DropReason::Reserved);
        }
        let hdr = EncapHeader {
            kind,
            vpc: VpcId(u32::from_be_bytes(arr(raw, 4))),
            epoch: KeyEpoch(u32::from_be_bytes(arr(raw, 8))),
            sender: CardId(u32::from_be_bytes(arr(raw, 12))),
            seq: u64::from_be_bytes(arr(raw, 16)),
        };
        Ok((hdr, raw.get(HEADER_LEN..).unwrap_or_default()))
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = VERSION;
        b[1] = self.kind.code();
        b[4..8].copy_from_slice(&self.vpc.0.to_be_bytes());
        b[8..12].copy_from_slice(&self.epoch.0.to_be_bytes());
        b[12..16].copy_from_slice(&self.sender.0.to_be_bytes());
        b[16..24].copy_from_slice(&self.seq.to_be_bytes());
        b
    }

    /// `epoch || seq`.
    pub fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut n = [0u8; NONCE_LEN];
        n[..4].copy_from_slice(&self.epoch.0.to_be_bytes());
        n[4..].copy_from_slice(&self.seq.to_be_bytes());
        n
    }
}

const WORDS: usize = 32;
const _: () = assert!(WORDS as u64 * 64 == REPLAY_WINDOW);

/// A sliding window over the last [`REPLAY_WINDOW`] sequence numbers (RFC 6479 style bitmap).
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    highest: u64,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    pub fn new() -> Self {
        ReplayWindow {
            highest: 0,
            bits: [0; WORDS],
        }
    }

    fn slot(seq: u64) -> (usize, u64) {
        let bit = seq % REPLAY_WINDOW;
        // `bit / 64 < WORDS`, so the conversion is exact.
        (usize::try_from(bit / 64).unwrap_or(0), 1u64 << (bit % 64))
    }

    /// Whether `seq` may be accepted (does not change the window).
    pub fn check(&self, seq: u64) -> Result<(), DropReason> {
        if seq == 0 {
            return Err(DropReason::ZeroSequence);
        }
        if seq > self.highest {
            return Ok(());
        }
        if self.highest - seq >= REPLAY_WINDOW {
            return Err(DropReason::TooOld);
        }
        let (w, m) = Self::slot(seq);
        if self.bits.get(w).is_some_and(|x| x & m != 0) {
            return Err(DropReason::Replayed);
        }
        Ok(())
    }

    /// Marks `seq` seen (call only after [`check`](Self::check) and authentication).
    pub fn accept(&mut self, seq: u64) {
        if seq > self.highest {
            let jump = seq - self.highest;
            if jump >= REPLAY_WINDOW {
                self.bits = [0; WORDS];
            } else {
                for s in self.highest + 1..seq {
                    let (w, m) = Self::slot(s);
                    if let Some(x) = self.bits.get_mut(w) {
                        *x &= !m;
                    }
                }
            }
            self.highest = seq;
        }
        let (w, m) = Self::slot(seq);
        if let Some(x) = self.bits.get_mut(w) {
            *x |= m;
        }
    }
}

/// A VPC epoch key in its own locked page.
pub struct EpochKey(LockedSecret<KEY_LEN>);

impl EpochKey {
    pub fn from_bytes(key: &[u8; KEY_LEN]) -> Result<Self> {
        let mut s = LockedSecret::<KEY_LEN>::new()?;
        s.as_mut().copy_from_slice(key);
        Ok(EpochKey(s))
    }

    /// Reads exactly 32 raw bytes from `path` straight into the locked page.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let err = |source| NetcardError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(err)?;
        let mut s = LockedSecret::<KEY_LEN>::new()?;
        f.read_exact(s.as_mut()).map_err(err)?;
        let mut extra = [0u8; 1];
        match f.read(&mut extra) {
            Ok(0) => Ok(EpochKey(s)),
            Ok(_) => Err(err(std::io::Error::other("longer than 32 bytes"))),
            Err(e) => Err(err(e)),
        }
    }
}

impl EpochKey {
    /// A second copy in its own locked page (the key ring keeps one per live epoch so that
    /// peers added by a route update get their direction keys without a new sealed blob).
    pub fn duplicate(&self) -> Result<Self> {
        let mut s = LockedSecret::<KEY_LEN>::new()?;
        s.as_mut().copy_from_slice(self.0.as_ref());
        Ok(EpochKey(s))
    }
}

impl Drop for EpochKey {
    fn drop(&mut self) {
        self.0.as_mut().zeroize();
    }
}

/// Layout of the key page.
const PAGE: usize = 4096;
const SEAL_CTX: usize = 0;
const OPEN_CTX: usize = 1024;
const SCRATCH: usize = 2048;
const _: () = assert!(std::mem::size_of::<ffi::EVP_AEAD_CTX>() <= OPEN_CTX - SEAL_CTX);
const _: () = assert!(std::mem::size_of::<ffi::EVP_AEAD_CTX>() <= SCRATCH - OPEN_CTX);

static KEY_PAGES_WIPED: AtomicU64 = AtomicU64::new(0);

/// How many tunnel key pages were zeroized and read back as zeros on drop (for tests).
pub fn key_pages_wiped() -> u64 {
    KEY_PAGES_WIPED.load(Ordering::Relaxed)
}

/// The two direction keys of one tunnel end (seal: local → peer, open: peer → local), as
/// AES-256-GCM contexts inside one locked page.
pub struct TunnelKeys {
    seal: NonNull<ffi::EVP_AEAD_CTX>,
    open: NonNull<ffi::EVP_AEAD_CTX>,
    page: LockedSecret<PAGE>,
}

// SAFETY: the contexts point into `page`, which this value owns; after `new` they are only
// passed to EVP_AEAD_CTX_seal/open, which take them as `const` and are safe to call from
// several threads at once (AWS-LC does not mutate an AEAD context while sealing or opening).
unsafe impl Send for TunnelKeys {}
// SAFETY: as above: shared use is read-only.
unsafe impl Sync for TunnelKeys {}

/// Tunnel parameters of one card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelParams {
    pub vpc: VpcId,
    pub epoch: KeyEpoch,
    pub local: CardId,
    pub peer: CardId,
    pub kind: PayloadKind,
}

/// The direction key `sender → receiver` for `vpc`/`epoch` (also what an independent decryptor
/// computes): HKDF-SHA256(ikm = epoch key, salt = [`KDF_LABEL`], info = label || vpc || epoch
/// || sender || receiver).
fn kdf_info(vpc: VpcId, epoch: KeyEpoch, sender: CardId, receiver: CardId) -> Vec<u8> {
    let mut info = KDF_LABEL.to_vec();
    for v in [vpc.0, epoch.0, sender.0, receiver.0] {
        info.extend_from_slice(&v.to_be_bytes());
    }
    info
}

impl TunnelKeys {
    pub fn new(key: &EpochKey, p: &TunnelParams) -> Result<Self> {
        if p.local == p.peer {
            return Err(NetcardError::Config {
                what: "card ids",
                value: format!("{}", p.local.0),
                why: "local and peer card ids must differ (the two directions need two keys)",
            });
        }
        let mut page = LockedSecret::<PAGE>::new()?;
        let base = page.as_mut().as_mut_ptr();
        let init = |ctx_off: usize, sender: CardId, receiver: CardId| -> Result<NonNull<_>> {
            let info = kdf_info(p.vpc, p.epoch, sender, receiver);
            // SAFETY: `base` is a zeroed, page-aligned PAGE-byte mapping owned by `page`, which
            // outlives this closure; SCRATCH + KEY_LEN and ctx_off + size_of(EVP_AEAD_CTX) are in
            // bounds and disjoint (asserted above), ctx_off is a multiple of 1024 (aligned).
            // HKDF writes KEY_LEN bytes to the scratch slot; EVP_AEAD_CTX_init initialises the
            // context in place (the AES-GCM state is inline in the context) and copies the key.
            unsafe {
                let scratch = base.add(SCRATCH);
                let ctx = base.add(ctx_off).cast::<ffi::EVP_AEAD_CTX>();
                let ok = ffi::HKDF(
                    scratch,
                    KEY_LEN,
                    ffi::EVP_sha256(),
                    key.0.as_ref().as_ptr(),
                    KEY_LEN,
                    KDF_LABEL.as_ptr(),
                    KDF_LABEL.len(),
                    info.as_ptr(),
                    info.len(),
                );
                let res = if ok != 1 {
                    Err(NetcardError::Crypto { op: "HKDF" })
                } else if ffi::EVP_AEAD_CTX_init(
                    ctx,
                    ffi::EVP_aead_aes_256_gcm(),
                    scratch,
                    KEY_LEN,
                    TAG_LEN,
                    std::ptr::null_mut(),
                ) != 1
                {
                    Err(NetcardError::Crypto {
                        op: "EVP_AEAD_CTX_init",
                    })
                } else {
                    NonNull::new(ctx).ok_or(NetcardError::Crypto {
                        op: "EVP_AEAD_CTX_init",
                    })
                };
                std::slice::from_raw_parts_mut(scratch, KEY_LEN).zeroize();
                res
            }
        };
        let seal = init(SEAL_CTX, p.local, p.peer)?;
        let open = init(OPEN_CTX, p.peer, p.local)?;
        Ok(TunnelKeys { seal, open, page })
    }

    /// Seals `frame` under `hdr` into `out` (header, ciphertext, tag).
    pub fn seal(&self, hdr: &EncapHeader, frame: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let ad = hdr.encode();
        let nonce = hdr.nonce();
        out.clear();
        out.extend_from_slice(&ad);
        out.resize(HEADER_LEN + frame.len() + TAG_LEN, 0);
        let mut written = 0usize;
        let body = out.get_mut(HEADER_LEN..).unwrap_or_default();
        // SAFETY: `seal` is an initialised context in our page (see `new`); `body` has
        // frame.len() + TAG_LEN writable bytes and does not overlap `frame`, `nonce` or `ad`.
        let ok = unsafe {
            ffi::EVP_AEAD_CTX_seal(
                self.seal.as_ptr(),
                body.as_mut_ptr(),
                &mut written,
                body.len(),
                nonce.as_ptr(),
                NONCE_LEN,
                frame.as_ptr(),
                frame.len(),
                ad.as_ptr(),
                HEADER_LEN,
            )
        };
        if ok != 1 || written != frame.len() + TAG_LEN {
            return Err(NetcardError::Crypto {
                op: "EVP_AEAD_CTX_seal",
            });
        }
        Ok(())
    }

    /// Opens `body` (ciphertext and tag) under `raw_header` into `out`.
    pub(crate) fn open(
        &self,
        hdr: &EncapHeader,
        raw_header: &[u8],
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), DropReason> {
        if body.len() < TAG_LEN {
            return Err(DropReason::Truncated);
        }
        let nonce = hdr.nonce();
        out.clear();
        out.resize(body.len(), 0);
        let mut written = 0usize;
        // SAFETY: `open` is an initialised context in our page; `out` has body.len() writable
        // bytes (at least the plaintext length) and does not overlap the inputs.
        let ok = unsafe {
            ffi::EVP_AEAD_CTX_open(
                self.open.as_ptr(),
                out.as_mut_ptr(),
                &mut written,
                out.len(),
                nonce.as_ptr(),
                NONCE_LEN,
                body.as_ptr(),
                body.len(),
                raw_header.as_ptr(),
                raw_header.len(),
            )
        };
        if ok != 1 {
            // SAFETY: clears this thread's AWS-LC error queue; no preconditions.
            unsafe { ffi::ERR_clear_error() };
            out.clear();
            return Err(DropReason::Forged);
        }
        out.truncate(written);
        Ok(())
    }
}

impl Drop for TunnelKeys {
    fn drop(&mut self) {
        // SAFETY: both contexts were initialised in `new` and are not used after this.
        unsafe {
            ffi::EVP_AEAD_CTX_cleanup(self.seal.as_ptr());
            ffi::EVP_AEAD_CTX_cleanup(self.open.as_ptr());
        }
        let page = self.page.as_mut();
        page.zeroize();
        let clean = page.iter().all(|b| {
            // SAFETY: `b` is a valid reference into the live page.
            unsafe { std::ptr::read_volatile(b) == 0 }
        });
        if clean {
            KEY_PAGES_WIPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The sending half: numbers and seals frames for the peer.
pub struct Sealer {
    keys: std::sync::Arc<TunnelKeys>,
    params: TunnelParams,
    next_seq: u64,
}

impl Sealer {
    pub fn new(keys: std::sync::Arc<TunnelKeys>, params: TunnelParams) -> Self {
        Sealer {
            keys,
            params,
            next_seq: 1,
        }
    }

    /// Encapsulates `frame` into `out`.
    pub fn seal_frame(&mut self, frame: &[u8], out: &mut Vec<u8>) -> Result<()> {
        if frame.len() > MAX_FRAME {
            return Err(NetcardError::TooLarge {
                len: frame.len(),
                limit: MAX_FRAME,
            });
        }
        let seq = self.next_seq;
        self.next_seq = seq.checked_add(1).ok_or(NetcardError::SequenceExhausted)?;
        let hdr = EncapHeader {
            kind: self.params.kind,
            vpc: self.params.vpc,
            epoch: self.params.epoch,
            sender: self.params.local,
            seq,
        };
        match self.params.kind {
            PayloadKind::Sealed => self.keys.seal(&hdr, frame, out),
            PayloadKind::Plain => {
                out.clear();
                out.extend_from_slice(&hdr.encode());
                out.extend_from_slice(frame);
                Ok(())
            }
        }
    }
}

/// The receiving half: checks and opens datagrams from the peer.
pub struct Opener {
    keys: std::sync::Arc<TunnelKeys>,
    params: TunnelParams,
    window: ReplayWindow,
}

impl Opener {
    pub fn new(keys: std::sync::Arc<TunnelKeys>, params: TunnelParams) -> Self {
        Opener {
            keys,
            params,
            window: ReplayWindow::new(),
        }
    }

    /// Opens one datagram from the host network into `out` (the peer guest's frame).
    pub fn open_datagram(&mut self, raw: &[u8], out: &mut Vec<u8>) -> Result<(), DropReason> {
        let (hdr, body) = EncapHeader::parse(raw)?;
        if hdr.kind != self.params.kind {
            return Err(DropReason::BadKind);
        }
        if hdr.vpc != self.params.vpc {
            return Err(DropReason::WrongVpc);
        }
        if hdr.epoch != self.params.epoch {
            return Err(DropReason::UnknownEpoch);
        }
        if hdr.sender != self.params.peer {
            return Err(DropReason::UnknownSender);
        }
        if hdr.kind == PayloadKind::Sealed && body.len() < TAG_LEN {
            return Err(DropReason::Truncated);
        }
        self.window.check(hdr.seq)?;
        match hdr.kind {
            PayloadKind::Sealed => {
                let raw_header = raw.get(..HEADER_LEN).unwrap_or_default();
                self.keys.open(&hdr, raw_header, body, out)?;
            }
            PayloadKind::Plain => {
                out.clear();
                out.extend_from_slice(body);
            }
        }
        self.window.accept(hdr.seq);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn params(local: u32, peer: u32) -> TunnelParams {
        TunnelParams {
            vpc: VpcId(7),
            epoch: KeyEpoch(3),
            local: CardId(local),
            peer: CardId(peer),
            kind: PayloadKind::Sealed,
        }
    }

    fn pair() -> (Sealer, Opener) {
        let key = EpochKey::from_bytes(&[0x42; 32]).expect("key page");
        let a = Arc::new(TunnelKeys::new(&key, &params(1, 2)).expect("a"));
        let b = Arc::new(TunnelKeys::new(&key, &params(2, 1)).expect("b"));
        (Sealer::new(a, params(1, 2)), Opener::new(b, params(2, 1)))
    }

    #[test]
    fn seal_open_round_trip_and_ciphertext_differs() {
        let (mut s, mut o) = pair();
        let frame = b"\x02\0\0\0\0\x0b\x02\0\0\0\0\x0a\x08\x00 MARKER-PLAINTEXT";
        let mut dg = Vec::new();
        s.seal_frame(frame, &mut dg).expect("seal");
        assert_eq!(dg.len(), HEADER_LEN + frame.len() + TAG_LEN);
        assert!(!dg.windows(6).any(|w| w == b"MARKER"));
        let mut out = Vec::new();
        o.open_datagram(&dg, &mut out).expect("open");
        assert_eq!(out, frame);
    }

    #[test]
    fn replay_truncation_and_bit_flips_dropped() {
        let (mut s, mut o) = pair();
        let mut dg = Vec::new();
        s.seal_frame(b"frame one", &mut dg).expect("seal");
        let mut out = Vec::new();
        o.open_datagram(&dg, &mut out).expect("first");
        assert_eq!(o.open_datagram(&dg, &mut out), Err(DropReason::Replayed));
        // A truncated copy is counted as truncated, not as a replay.
        assert_eq!(
            o.open_datagram(&dg[..HEADER_LEN + 5], &mut out),
            Err(DropReason::Truncated)
        );
        let mut dg2 = Vec::new();
        s.seal_frame(b"frame two", &mut dg2).expect("seal");
        for n in [0, 10, HEADER_LEN - 1] {
            assert_eq!(
                o.open_datagram(&dg2[..n], &mut out),
                Err(DropReason::Truncated)
            );
        }
        assert_eq!(
            o.open_datagram(&dg2[..dg2.len() - 1], &mut out),
            Err(DropReason::Forged)
        );
        // Every single-bit flip in the body or in the header is refused.
        for i in 0..dg2.len() {
            for bit in [0u8, 7] {
                let mut f = dg2.clone();
                f[i] ^= 1 << bit;
                assert!(o.open_datagram(&f, &mut out).is_err(), "flip {i}.{bit}");
            }
        }
        // The genuine datagram still opens after all the forgeries.
        o.open_datagram(&dg2, &mut out).expect("genuine");
        assert_eq!(out, b"frame two");
    }

    #[test]
    fn reordering_within_window_ok_beyond_window_dropped() {
        let (mut s, mut o) = pair();
        let dgs: Vec<Vec<u8>> = (0..REPLAY_WINDOW + 10)
            .map(|_| {
                let mut d = Vec::new();
                s.seal_frame(b"x", &mut d).expect("seal");
                d
            })
            .collect();
        let mut out = Vec::new();
        let last = dgs.len() - 1;
        o.open_datagram(&dgs[last], &mut out).expect("newest");
        o.open_datagram(&dgs[last - 5], &mut out)
            .expect("reordered inside the window");
        assert_eq!(
            o.open_datagram(&dgs[last - 5], &mut out),
            Err(DropReason::Replayed)
        );
        assert_eq!(o.open_datagram(&dgs[0], &mut out), Err(DropReason::TooOld));
    }

    #[test]
    fn wrong_vpc_epoch_sender_and_plain_refused() {
        let key = EpochKey::from_bytes(&[0x42; 32]).expect("key");
        let mut other = params(1, 2);
        other.vpc = VpcId(8);
        let k = Arc::new(TunnelKeys::new(&key, &other).expect("k"));
        let mut s = Sealer::new(k, other);
        let (_, mut o) = pair();
        let mut dg = Vec::new();
        let mut out = Vec::new();
        s.seal_frame(b"x", &mut dg).expect("seal");
        assert_eq!(o.open_datagram(&dg, &mut out), Err(DropReason::WrongVpc));
        let mut plain = params(1, 2);
        plain.kind = PayloadKind::Plain;
        let k = Arc::new(TunnelKeys::new(&key, &plain).expect("k"));
        let mut s = Sealer::new(k, plain);
        s.seal_frame(b"x", &mut dg).expect("plain");
        assert_eq!(o.open_datagram(&dg, &mut out), Err(DropReason::BadKind));
        // A different epoch key: same ids, tag fails.
        let key2 = EpochKey::from_bytes(&[0x43; 32]).expect("key");
        let k = Arc::new(TunnelKeys::new(&key2, &params(1, 2)).expect("k"));
        let mut s = Sealer::new(k, params(1, 2));
        s.seal_frame(b"x", &mut dg).expect("seal");
        assert_eq!(o.open_datagram(&dg, &mut out), Err(DropReason::Forged));
    }

    #[test]
    fn same_card_ids_refused() {
        let key = EpochKey::from_bytes(&[1; 32]).expect("key");
        assert!(TunnelKeys::new(&key, &params(1, 1)).is_err());
    }

    #[test]
    fn key_pages_are_wiped_on_drop() {
        let before = key_pages_wiped();
        drop(pair());
        assert!(key_pages_wiped() >= before + 2);
    }

    #[test]
    fn window_edges() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.check(0), Err(DropReason::ZeroSequence));
        w.accept(REPLAY_WINDOW * 3);
        assert_eq!(w.check(REPLAY_WINDOW * 2), Err(DropReason::TooOld));
        assert_eq!(w.check(REPLAY_WINDOW * 2 + 1), Ok(()));
        w.accept(u64::MAX);
        assert_eq!(w.check(u64::MAX), Err(DropReason::Replayed));
        assert_eq!(w.check(u64::MAX - 1), Ok(()));
    }

    /// Known-answer vector for independent decryptors (the tunnel test's Python one uses the
    /// same construction).
    #[test]
    fn header_encoding_is_stable() {
        let h = EncapHeader {
            kind: PayloadKind::Sealed,
            vpc: VpcId(0x01020304),
            epoch: KeyEpoch(5),
            sender: CardId(6),
            seq: 7,
        };
        let e = h.encode();
        assert_eq!(
            e,
            [1, 1, 0, 0, 1, 2, 3, 4, 0, 0, 0, 5, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        assert_eq!(EncapHeader::parse(&e).expect("parse").0, h);
        assert_eq!(h.nonce(), [0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 7]);
    }
}
