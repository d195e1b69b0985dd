//! Card update: what an attached card hands to its successor over a private socketpair.
//!
//! The controller creates a socketpair, starts the new card with one end
//! (`--receive-state-fd`), and sends the other end to the old card beside a `HandOver` control
//! request (SCM_RIGHTS). The old card writes one [`VolumeState`] frame on it; the new card
//! checks it against its own backing store, keys its cipher contexts from it, locks itself
//! down, and answers with one [`Reply`] frame. Nothing else ever sees these bytes: the
//! controller holds the other end only until it has passed it on, and never reads it.
//!
//! Frames are those of the control protocol (`len: u32 LE`, 1..=4096, then the body). Bodies:
//!
//! * `State` (old → new): `version: u8 = 1`, `kind: u8 = 0x90`, `vid_len: u8` (1..=64),
//!   volume id (`[A-Za-z0-9._-]`), `sector_shift: u8` (9 or 12), `key_kind: u8` (0 plain,
//!   1 AES-256-XTS), for XTS the 64-byte key, `capacity: u64 LE` (512-byte sectors, > 0),
//!   `read_only: u8` (0/1). Nothing may follow.
//! * `Taken` (new → old): `version`, `kind = 0x91`.
//! * `Refused` (new → old): `version`, `kind = 0x92`, `reason: u8` ([`RefusalReason`]).
//!
//! Every byte of a `State` body is untrusted to the parser (it only ever comes from the card
//! the controller paired with this one, but a fuzz target covers it: `fuzz/handover_parse`).
//! Buffers that held the key are zeroized when dropped.

use crate::control::{CryptoSectorSize, VolumeId, MAX_FRAME};
use bulkhead_sealing::{SealingError, VolumeKey, VOLUME_KEY_LEN};
use std::io::{Read, Write};
use zeroize::Zeroizing;

/// Body version.
pub const VERSION: u8 = 1;
const KIND_STATE: u8 = 0x90;
const KIND_TAKEN: u8 = 0x91;
const KIND_REFUSED: u8 = 0x92;

/// Why a hand-over message was refused or could not be moved.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the other card closed the hand-over socket")]
    Closed,
    #[error("hand-over frame of {0} bytes is empty or larger than {MAX_FRAME}")]
    FrameSize(u32),
    #[error("hand-over message truncated")]
    Truncated,
    #[error("{0} trailing bytes after the hand-over message")]
    Trailing(usize),
    #[error("unsupported hand-over version {0}")]
    Version(u8),
    #[error("unexpected hand-over message kind {0:#04x}")]
    Kind(u8),
    #[error("bad volume id")]
    VolumeId,
    #[error("crypto sector shift {0} is not 9 or 12")]
    SectorShift(u8),
    #[error("unknown key kind {0}")]
    KeyKind(u8),
    #[error("capacity 0")]
    Capacity,
    #[error("read-only flag {0} is not 0 or 1")]
    Flag(u8),
    #[error("unknown refusal reason {0}")]
    Reason(u8),
    #[error("locked key page: {0}")]
    Key(#[from] SealingError),
    #[error("the new card did not answer in time")]
    Timeout,
    #[error("HandOver came without a socket beside it")]
    NoSocket,
    #[error("the key was already erased")]
    KeyErased,
    #[error("volume state refused by the new card: {0:?}")]
    Refused(RefusalReason),
}

/// Why the new card refused a state (carried in `Refused`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// The state could not be parsed.
    Malformed,
    /// Its backing store has another size for that sector size, or another read-only mode.
    Geometry,
    /// Keying the cipher contexts failed.
    Cipher,
}

impl RefusalReason {
    fn to_u8(self) -> u8 {
        match self {
            Self::Malformed => 1,
            Self::Geometry => 2,
            Self::Cipher => 3,
        }
    }

    fn from_u8(v: u8) -> Result<Self, HandoverError> {
        match v {
            1 => Ok(Self::Malformed),
            2 => Ok(Self::Geometry),
            3 => Ok(Self::Cipher),
            other => Err(HandoverError::Reason(other)),
        }
    }
}

/// Everything a new card needs to serve the volume the old one serves.
pub struct VolumeState {
    pub volume_id: VolumeId,
    pub sector_size: CryptoSectorSize,
    /// `None`: an unencrypted (plain) volume.
    pub key: Option<VolumeKey>,
    /// Capacity in 512-byte sectors (the backing store rounded down to the sector size).
    pub capacity_sectors: u64,
    pub read_only: bool,
}

impl std::fmt::Debug for VolumeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeState")
            .field("volume_id", &self.volume_id)
            .field("sector_size", &self.sector_size)
            .field("encrypted", &self.key.is_some())
            .field("capacity_sectors", &self.capacity_sectors)
            .field("read_only", &self.read_only)
            .finish()
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HandoverError> {
        if self.0.len() < n {
            return Err(HandoverError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, HandoverError> {
        self.take(1)?
            .first()
            .copied()
            .ok_or(HandoverError::Truncated)
    }
    fn finish(self) -> Result<(), HandoverError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(HandoverError::Trailing(self.0.len()))
        }
    }
}

fn header(raw: &[u8]) -> Result<(u8, Cursor<'_>), HandoverError> {
    let mut c = Cursor(raw);
    let v = c.u8()?;
    if v != VERSION {
        return Err(HandoverError::Version(v));
    }
    let k = c.u8()?;
    Ok((k, c))
}

impl VolumeState {
    /// Parses a `State` body; the key goes straight into a locked page.
    pub fn parse(raw: &[u8]) -> Result<Self, HandoverError> {
        let (k, mut c) = header(raw)?;
        if k != KIND_STATE {
            return Err(HandoverError::Kind(k));
        }
        let n = c.u8()?;
        let vid = c.take(usize::from(n))?;
        let vid = std::str::from_utf8(vid).map_err(|_| HandoverError::VolumeId)?;
        let volume_id = VolumeId::new(vid).map_err(|_| HandoverError::VolumeId)?;
        let shift = c.u8()?;
        let sector_size =
            CryptoSectorSize::from_shift(shift).ok_or(HandoverError::SectorShift(shift))?;
        let key = match c.u8()? {
            0 => None,
            1 => {
                let b = c.take(VOLUME_KEY_LEN)?;
                let mut key = VolumeKey::new().map_err(SealingError::from)?;
                key.as_mut().copy_from_slice(b);
                Some(key)
            }
            other => return Err(HandoverError::KeyKind(other)),
        };
        let cap: [u8; 8] = c
            .take(8)?
            .try_into()
            .map_err(|_| HandoverError::Truncated)?;
        let capacity_sectors = u64::from_le_bytes(cap);
        if capacity_sectors == 0 {
            return Err(HandoverError::Capacity);
        }
        let read_only = match c.u8()? {
            0 => false,
            1 => true,
            other => return Err(HandoverError::Flag(other)),
        };
        c.finish()?;
        Ok(Self {
            volume_id,
            sector_size,
            key,
            capacity_sectors,
            read_only,
        })
    }

    /// Encodes the `State` body (zeroized when dropped).
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        encode_state(
            &self.volume_id,
            self.sector_size,
            self.key.as_ref().map(|k| k.as_ref()),
            self.capacity_sectors,
            self.read_only,
        )
    }
}

/// Encodes a `State` body from borrowed parts (the old card encodes straight from the key page
/// it keeps: once sandboxed it has no locked-memory budget for a copy). Zeroized when dropped.
pub fn encode_state(
    volume_id: &VolumeId,
    sector_size: CryptoSectorSize,
    key: Option<&[u8; VOLUME_KEY_LEN]>,
    capacity_sectors: u64,
    read_only: bool,
) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(2 + 1 + 64 + 2 + VOLUME_KEY_LEN + 9));
    out.push(VERSION);
    out.push(KIND_STATE);
    let vid = volume_id.as_str().as_bytes();
    out.push(u8::try_from(vid.len()).unwrap_or(0));
    out.extend_from_slice(vid);
    out.push(sector_size.shift());
    match key {
        None => out.push(0),
        Some(k) => {
            out.push(1);
            out.extend_from_slice(k);
        }
    }
    out.extend_from_slice(&capacity_sectors.to_le_bytes());
    out.push(u8::from(read_only));
    out
}

/// The new card's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Taken,
    Refused(RefusalReason),
}

impl Reply {
    /// Parses a reply body.
    pub fn parse(raw: &[u8]) -> Result<Self, HandoverError> {
        let (k, mut c) = header(raw)?;
        let r = match k {
            KIND_TAKEN => Self::Taken,
            KIND_REFUSED => Self::Refused(RefusalReason::from_u8(c.u8()?)?),
            other => return Err(HandoverError::Kind(other)),
        };
        c.finish()?;
        Ok(r)
    }

    /// Encodes the reply body.
    pub fn encode(self) -> Vec<u8> {
        match self {
            Self::Taken => vec![VERSION, KIND_TAKEN],
            Self::Refused(r) => vec![VERSION, KIND_REFUSED, r.to_u8()],
        }
    }
}

/// Reads one frame; the buffer is zeroized when dropped. EOF before a frame is `Closed`.
pub fn read_frame(r: &mut impl Read) -> Result<Zeroizing<Vec<u8>>, HandoverError> {
    let mut len = [0u8; 4];
    let mut got = 0usize;
    while got < 4 {
        let slot = len.get_mut(got..).ok_or(HandoverError::Truncated)?;
        match r.read(slot) {
            Ok(0) if got == 0 => return Err(HandoverError::Closed),
            Ok(0) => return Err(HandoverError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HandoverError::Io(e)),
        }
    }
    let n = u32::from_le_bytes(len);
    if n == 0 || n > MAX_FRAME {
        return Err(HandoverError::FrameSize(n));
    }
    let size = usize::try_from(n).map_err(|_| HandoverError::FrameSize(n))?;
    let mut body = Zeroizing::new(vec![0u8; size]);
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            HandoverError::Truncated
        } else {
            HandoverError::Io(e)
        }
    })?;
    Ok(body)
}

/// Writes one frame in one `write` (the buffer is zeroized when dropped).
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> Result<(), HandoverError> {
    let n = u32::try_from(body.len()).map_err(|_| HandoverError::FrameSize(u32::MAX))?;
    if n == 0 || n > MAX_FRAME {
        return Err(HandoverError::FrameSize(n));
    }
    let mut frame = Zeroizing::new(Vec::with_capacity(body.len() + 4));
    frame.extend_from_slice(&n.to_le_bytes());
    frame.extend_from_slice(body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Longest the old card waits for the new card's answer (it keys one cipher context pair per
/// I/O lane and locks itself down first).
pub const REPLY_TIMEOUT_MS: i32 = 30_000;

/// Waits until `fd` is readable (or hung up), at most `ms` milliseconds (`poll`, which the
/// card's sandbox allows; a socket timeout would need `setsockopt`, which it does not).
fn wait_readable(fd: std::os::fd::RawFd, ms: i32) -> Result<(), HandoverError> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, count 1; poll writes only its `revents`.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        match n {
            0 => return Err(HandoverError::Timeout),
            n if n > 0 => return Ok(()),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(HandoverError::Io(e));
                }
            }
        }
    }
}

/// The old card's side: sends an encoded `State` body, waits at most `timeout_ms` (the card
/// uses [`REPLY_TIMEOUT_MS`]) for the answer. `Ok` only for `Taken`.
pub fn send_state(
    sock: &mut (impl Read + Write + std::os::fd::AsRawFd),
    body: &[u8],
    timeout_ms: i32,
) -> Result<(), HandoverError> {
    write_frame(sock, body)?;
    wait_readable(sock.as_raw_fd(), timeout_ms)?;
    let body = read_frame(sock)?;
    match Reply::parse(&body)? {
        Reply::Taken => Ok(()),
        Reply::Refused(r) => Err(HandoverError::Refused(r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(key: bool) -> VolumeState {
        let key = key.then(|| {
            let mut k = VolumeKey::new().expect("locked page");
            for (i, b) in k.as_mut().iter_mut().enumerate() {
                *b = u8::try_from(i).unwrap_or(0);
            }
            k
        });
        VolumeState {
            volume_id: VolumeId::new("vol-1").expect("vid"),
            sector_size: CryptoSectorSize::S4096,
            key,
            capacity_sectors: 32768,
            read_only: false,
        }
    }

    /// The unit vectors are the fuzz target's seeds (`fuzz/seeds/handover_parse/`).
    #[test]
    fn seeds_are_the_unit_vectors() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/handover_parse/");
        for (name, want) in [
            ("state_xts", state(true).encode().to_vec()),
            ("state_plain", state(false).encode().to_vec()),
            ("taken", Reply::Taken.encode()),
            ("refused", Reply::Refused(RefusalReason::Geometry).encode()),
        ] {
            let got = std::fs::read(format!("{dir}{name}")).expect("seed");
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn state_round_trips() {
        for enc in [true, false] {
            let s = state(enc);
            let p = VolumeState::parse(&s.encode()).expect("parse");
            assert_eq!(p.volume_id, s.volume_id);
            assert_eq!(p.sector_size, s.sector_size);
            assert_eq!(p.capacity_sectors, 32768);
            assert!(!p.read_only);
            assert_eq!(
                p.key.as_ref().map(|k| *k.as_ref()),
                s.key.as_ref().map(|k| *k.as_ref())
            );
        }
        for r in [
            Reply::Taken,
            Reply::Refused(RefusalReason::Malformed),
            Reply::Refused(RefusalReason::Geometry),
            Reply::Refused(RefusalReason::Cipher),
        ] {
            assert_eq!(Reply::parse(&r.encode()).expect("reply"), r);
        }
    }

    #[test]
    fn malformed_states_are_refused() {
        let good = state(true).encode();
        for n in 0..good.len() {
            assert!(
                VolumeState::parse(&good[..n]).is_err(),
                "truncated at {n} accepted"
            );
        }
        let mut t = good.to_vec();
        t.push(0);
        assert!(matches!(
            VolumeState::parse(&t),
            Err(HandoverError::Trailing(1))
        ));
        let at = |i: usize, v: u8| {
            let mut b = good.to_vec();
            b[i] = v;
            VolumeState::parse(&b)
        };
        assert!(matches!(at(0, 2), Err(HandoverError::Version(2))));
        assert!(matches!(at(1, 0x91), Err(HandoverError::Kind(0x91))));
        assert!(matches!(at(3, b'/'), Err(HandoverError::VolumeId)));
        assert!(matches!(at(8, 10), Err(HandoverError::SectorShift(10))));
        assert!(matches!(at(9, 7), Err(HandoverError::KeyKind(7))));
        let last = good.len() - 1;
        assert!(matches!(at(last, 2), Err(HandoverError::Flag(2))));
        let mut zero_cap = good.to_vec();
        zero_cap[last - 8..last].fill(0);
        assert!(matches!(
            VolumeState::parse(&zero_cap),
            Err(HandoverError::Capacity)
        ));
        assert!(matches!(
            Reply::parse(&[1, 0x92, 9]),
            Err(HandoverError::Reason(9))
        ));
        assert!(matches!(
            Reply::parse(&[1, 0x91, 0]),
            Err(HandoverError::Trailing(1))
        ));
    }

    #[test]
    fn frames_are_bounded_and_eof_is_closed() {
        assert!(matches!(
            read_frame(&mut &[][..]),
            Err(HandoverError::Closed)
        ));
        let big = (MAX_FRAME + 1).to_le_bytes();
        assert!(matches!(
            read_frame(&mut &big[..]),
            Err(HandoverError::FrameSize(_))
        ));
        let mut buf = Vec::new();
        write_frame(&mut buf, &Reply::Taken.encode()).expect("write");
        let body = read_frame(&mut &buf[..]).expect("read");
        assert_eq!(Reply::parse(&body).expect("parse"), Reply::Taken);
    }

    #[test]
    fn a_socketpair_hand_over_moves_the_key() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let t = std::thread::spawn(move || {
            let body = read_frame(&mut b).expect("state");
            let s = VolumeState::parse(&body).expect("parse");
            write_frame(&mut b, &Reply::Taken.encode()).expect("reply");
            s.key.map(|k| *k.as_ref())
        });
        let s = state(true);
        send_state(&mut a, &s.encode(), 10_000).expect("taken");
        let got = t.join().expect("peer");
        assert_eq!(got, s.key.as_ref().map(|k| *k.as_ref()));
        // A peer that dies before answering is `Closed`.
        let (mut a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        drop(b);
        assert!(send_state(&mut a, &s.encode(), 10_000).is_err());
        // A peer that takes the state and never answers is a timeout, not a hang.
        let (mut a, _silent) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert!(matches!(
            send_state(&mut a, &s.encode(), 100),
            Err(HandoverError::Timeout)
        ));
    }
}
