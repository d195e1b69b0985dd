//! `bulkhead-card-proto`: the control protocol between the controller and a block card, over
//! the card's local unix socket. The card only listens; the controller connects. Both ends use
//! this crate: every message, constant and parser exists once. It does no I/O of its own
//! (the frame helpers take any `Read`/`Write`).
//!
//! Frame: `len: u32 LE` (1..=[`MAX_FRAME`]) then `len` bytes of body.
//! Body: `version: u8 = 1`, `kind: u8`, payload. Nothing may follow the payload.
//!
//! Requests (controller -> card):
//! * `0x01 Attach`: `vid_len: u8` (1..=64), `volume_id` (ASCII `[A-Za-z0-9._-]`),
//!   `sector_shift: u8` (9 = 512-byte or 12 = 4096-byte crypto sectors),
//!   `key_kind: u8` (0 = plain/unencrypted, 1 = ephemeral, 2 = sealed),
//!   and for sealed: `blob_len: u16 LE` (= 126) + the sealed blob (`bulkhead-sealing`).
//! * `0x02 Detach`: empty. The card zeroizes the key, answers, and exits.
//! * `0x03 GetMetrics`: empty.
//! * `0x04 HandOver`: empty; one end of a socketpair rides beside the frame (SCM_RIGHTS, on
//!   the frame's first byte). An attached card sends its volume state (key included) to the
//!   card at the other end (card update, `bulkhead-blockcard`'s `handover` module), answers
//!   `HandedOver` once that card has keyed itself, and from then on zeroizes its key and exits
//!   as soon as its vhost-user frontend leaves. The controller only passes the fd.
//! * `0x05 TakeOver`: empty; the other end of that socketpair rides beside the frame. A card
//!   waiting for `Attach` takes the volume state from the card at the other end instead
//!   (card update) and answers `Attached` like an attach, or `Error` (and keeps waiting).
//! * `0x06 CancelHandOver`: empty. The card update failed after the old card answered
//!   `HandedOver` (the new card never took the device): the old card drops its "exit when the
//!   frontend leaves" mark, keeps its key and serves on (a later `HandOver` may follow). Answered
//!   `HandOverCancelled`, or `Error{NoHandOver}` (none pending), `Error{FrontendGone}` (its
//!   frontend already left: it is exiting, keys erased) or `Error{NotAttached}`.
//!
//! Responses (card -> controller):
//! * `0x81 Attached`: `capacity: u64 LE` (512-byte sectors), `encrypted: u8` (0/1).
//! * `0x82 Detached`: empty.
//! * `0x84 HandedOver`: empty.
//! * `0x85 HandOverCancelled`: empty.
//! * `0x83 Metrics`: `count: u8`, then `count` x (`name_len: u8`, name ASCII, `value: u64 LE`).
//! * `0xFF Error`: `code: u16 LE` ([`ErrorCode`]), `msg_len: u8`, message (UTF-8).
//!
//! Kind bytes are pinned by a unit test: a new message takes the next free byte, and a byte
//! once used is never given another meaning.

use bulkhead_sealing::{MAX_VOLUME_ID_LEN, SEALED_BLOB_LEN};
use std::io::{Read, Write};

/// Largest frame body.
pub const MAX_FRAME: u32 = 4096;
/// Protocol version.
pub const VERSION: u8 = 1;

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

mod kind {
    pub const ATTACH: u8 = 0x01;
    pub const DETACH: u8 = 0x02;
    pub const GET_METRICS: u8 = 0x03;
    pub const HAND_OVER: u8 = 0x04;
    pub const TAKE_OVER: u8 = 0x05;
    pub const CANCEL_HAND_OVER: u8 = 0x06;
    pub const ATTACHED: u8 = 0x81;
    pub const DETACHED: u8 = 0x82;
    pub const METRICS: u8 = 0x83;
    pub const HANDED_OVER: u8 = 0x84;
    pub const HAND_OVER_CANCELLED: u8 = 0x85;
    pub const ERROR: u8 = 0xFF;
}

/// Control protocol errors.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is empty or larger than {MAX_FRAME}")]
    FrameSize(u32),
    #[error("message truncated")]
    Truncated,
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("unsupported protocol version {0}")]
    Version(u8),
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("volume id must be 1..={MAX_VOLUME_ID_LEN} bytes of [A-Za-z0-9._-]")]
    VolumeId,
    #[error("crypto sector shift {0} is not 9 or 12")]
    SectorShift(u8),
    #[error("unknown key kind {0}")]
    KeyKind(u8),
    #[error("sealed blob has {0} bytes, want {SEALED_BLOB_LEN}")]
    BlobLength(usize),
    #[error("bad metric or error text")]
    Text,
    #[error("too many metrics")]
    TooMany,
}

/// A validated volume id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeId(String);

impl VolumeId {
    /// Checks length and alphabet.
    pub fn new(s: &str) -> Result<Self, ControlError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_VOLUME_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ControlError::VolumeId)
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where the volume's data key comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Unencrypted volume (explicit opt-out, never a fallback).
    Plain,
    /// Instance storage: a random key made inside the card, dropped at detach (crypto-erase).
    Ephemeral,
    /// The volume key sealed to this host's key by the KMS.
    Sealed(Box<[u8; SEALED_BLOB_LEN]>),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plain => write!(f, "Plain"),
            Self::Ephemeral => write!(f, "Ephemeral"),
            Self::Sealed(_) => write!(f, "Sealed(..)"),
        }
    }
}

/// Attach parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachSpec {
    pub volume_id: VolumeId,
    pub sector_size: CryptoSectorSize,
    pub key: KeySource,
}

/// Controller -> card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlRequest {
    Attach(AttachSpec),
    Detach,
    GetMetrics,
    /// Card update: send the volume state to the card at the other end of the socketpair
    /// that rides beside this frame.
    HandOver,
    /// Card update, on the new card: take the volume state from the card at the other end of
    /// the socketpair that rides beside this frame, instead of an `Attach`.
    TakeOver,
    /// Card update, on the old card after `HandedOver`: the update failed, keep the key and
    /// serve on instead of exiting when the frontend leaves.
    CancelHandOver,
}

/// Error codes carried in [`ControlResponse::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    AlreadyAttached,
    NotAttached,
    KeyRefused,
    Internal,
    /// `CancelHandOver` on a card with no hand-over pending.
    NoHandOver,
    /// `CancelHandOver` too late: the card's frontend left after its hand-over, the card is
    /// erasing its keys and exiting.
    FrontendGone,
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            Self::BadRequest => 1,
            Self::AlreadyAttached => 2,
            Self::NotAttached => 3,
            Self::KeyRefused => 4,
            Self::Internal => 5,
            Self::NoHandOver => 6,
            Self::FrontendGone => 7,
            Self::Other(v) => v,
        }
    }

    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::BadRequest,
            2 => Self::AlreadyAttached,
            3 => Self::NotAttached,
            4 => Self::KeyRefused,
            5 => Self::Internal,
            6 => Self::NoHandOver,
            7 => Self::FrontendGone,
            v => Self::Other(v),
        }
    }
}

/// Card -> controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlResponse {
    Attached {
        capacity_sectors: u64,
        encrypted: bool,
    },
    Detached,
    Metrics(Vec<(String, u64)>),
    /// The new card took the volume state; this card exits once its frontend has left.
    HandedOver,
    /// A pending hand-over was cancelled: this card keeps its key and serves on.
    HandOverCancelled,
    Error {
        code: ErrorCode,
        message: String,
    },
}

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ControlError> {
        if self.buf.len() < n {
            return Err(ControlError::Truncated);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ControlError> {
        self.take(1)?
            .first()
            .copied()
            .ok_or(ControlError::Truncated)
    }
    fn u16(&mut self) -> Result<u16, ControlError> {
        let b = self.take(2)?;
        let arr: [u8; 2] = b.try_into().map_err(|_| ControlError::Truncated)?;
        Ok(u16::from_le_bytes(arr))
    }
    fn u64(&mut self) -> Result<u64, ControlError> {
        let b = self.take(8)?;
        let arr: [u8; 8] = b.try_into().map_err(|_| ControlError::Truncated)?;
        Ok(u64::from_le_bytes(arr))
    }
    fn finish(self) -> Result<(), ControlError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ControlError::Trailing(self.buf.len()))
        }
    }
}

fn header(raw: &[u8]) -> Result<(u8, Cursor<'_>), ControlError> {
    let mut c = Cursor { buf: raw };
    let v = c.u8()?;
    if v != VERSION {
        return Err(ControlError::Version(v));
    }
    let k = c.u8()?;
    Ok((k, c))
}

fn short_text(c: &mut Cursor<'_>) -> Result<String, ControlError> {
    let n = c.u8()?;
    let b = c.take(usize::from(n))?;
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| ControlError::Text)
}

fn put_short_text(out: &mut Vec<u8>, s: &str) {
    // Truncate on a char boundary to at most 255 bytes.
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let t = s.get(..end).unwrap_or("");
    out.push(u8::try_from(t.len()).unwrap_or(0));
    out.extend_from_slice(t.as_bytes());
}

impl ControlRequest {
    /// Parses one frame body.
    pub fn parse(raw: &[u8]) -> Result<Self, ControlError> {
        let (k, mut c) = header(raw)?;
        let msg = match k {
            kind::ATTACH => {
                let vid_len = c.u8()?;
                let vid = c.take(usize::from(vid_len))?;
                let vid = std::str::from_utf8(vid).map_err(|_| ControlError::VolumeId)?;
                let volume_id = VolumeId::new(vid)?;
                let shift = c.u8()?;
                let sector_size =
                    CryptoSectorSize::from_shift(shift).ok_or(ControlError::SectorShift(shift))?;
                let key = match c.u8()? {
                    0 => KeySource::Plain,
                    1 => KeySource::Ephemeral,
                    2 => {
                        let n = usize::from(c.u16()?);
                        if n != SEALED_BLOB_LEN {
                            return Err(ControlError::BlobLength(n));
                        }
                        let b = c.take(n)?;
                        let mut blob = Box::new([0u8; SEALED_BLOB_LEN]);
                        blob.copy_from_slice(b);
                        KeySource::Sealed(blob)
                    }
                    other => return Err(ControlError::KeyKind(other)),
                };
                Self::Attach(AttachSpec {
                    volume_id,
                    sector_size,
                    key,
                })
            }
            kind::DETACH => Self::Detach,
            kind::GET_METRICS => Self::GetMetrics,
            kind::HAND_OVER => Self::HandOver,
            kind::TAKE_OVER => Self::TakeOver,
            kind::CANCEL_HAND_OVER => Self::CancelHandOver,
            other => return Err(ControlError::UnknownKind(other)),
        };
        c.finish()?;
        Ok(msg)
    }

    /// Encodes the frame body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        match self {
            Self::Attach(a) => {
                out.push(kind::ATTACH);
                put_short_text(&mut out, a.volume_id.as_str());
                out.push(a.sector_size.shift());
                match &a.key {
                    KeySource::Plain => out.push(0),
                    KeySource::Ephemeral => out.push(1),
                    KeySource::Sealed(b) => {
                        out.push(2);
                        out.extend_from_slice(&u16::try_from(b.len()).unwrap_or(0).to_le_bytes());
                        out.extend_from_slice(&b[..]);
                    }
                }
            }
            Self::Detach => out.push(kind::DETACH),
            Self::GetMetrics => out.push(kind::GET_METRICS),
            Self::HandOver => out.push(kind::HAND_OVER),
            Self::TakeOver => out.push(kind::TAKE_OVER),
            Self::CancelHandOver => out.push(kind::CANCEL_HAND_OVER),
        }
        out
    }
}

/// Most metrics in one response.
pub const MAX_METRICS: usize = 64;

impl ControlResponse {
    /// Parses one frame body.
    pub fn parse(raw: &[u8]) -> Result<Self, ControlError> {
        let (k, mut c) = header(raw)?;
        let msg = match k {
            kind::ATTACHED => {
                let capacity_sectors = c.u64()?;
                let encrypted = match c.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(ControlError::Truncated),
                };
                Self::Attached {
                    capacity_sectors,
                    encrypted,
                }
            }
            kind::DETACHED => Self::Detached,
            kind::HANDED_OVER => Self::HandedOver,
            kind::HAND_OVER_CANCELLED => Self::HandOverCancelled,
            kind::METRICS => {
                let n = usize::from(c.u8()?);
                if n > MAX_METRICS {
                    return Err(ControlError::TooMany);
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = short_text(&mut c)?;
                    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    {
                        return Err(ControlError::Text);
                    }
                    v.push((name, c.u64()?));
                }
                Self::Metrics(v)
            }
            kind::ERROR => {
                let code = ErrorCode::from_u16(c.u16()?);
                let message = short_text(&mut c)?;
                Self::Error { code, message }
            }
            other => return Err(ControlError::UnknownKind(other)),
        };
        c.finish()?;
        Ok(msg)
    }

    /// Encodes the frame body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        match self {
            Self::Attached {
                capacity_sectors,
                encrypted,
            } => {
                out.push(kind::ATTACHED);
                out.extend_from_slice(&capacity_sectors.to_le_bytes());
                out.push(u8::from(*encrypted));
            }
            Self::Detached => out.push(kind::DETACHED),
            Self::HandedOver => out.push(kind::HANDED_OVER),
            Self::HandOverCancelled => out.push(kind::HAND_OVER_CANCELLED),
            Self::Metrics(v) => {
                out.push(kind::METRICS);
                let n = v.len().min(MAX_METRICS);
                out.push(u8::try_from(n).unwrap_or(0));
                for (name, val) in v.iter().take(n) {
                    put_short_text(&mut out, name);
                    out.extend_from_slice(&val.to_le_bytes());
                }
            }
            Self::Error { code, message } => {
                out.push(kind::ERROR);
                out.extend_from_slice(&code.to_u16().to_le_bytes());
                put_short_text(&mut out, message);
            }
        }
        out
    }
}

/// Reads one frame body (length-checked before anything is buffered).
/// Returns `Ok(None)` on a clean end of stream before a frame starts.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Vec<u8>>, ControlError> {
    let mut len = [0u8; 4];
    let mut got = 0usize;
    while got < 4 {
        let slot = len.get_mut(got..).ok_or(ControlError::Truncated)?;
        match r.read(slot) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ControlError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ControlError::Io(e)),
        }
    }
    let n = u32::from_le_bytes(len);
    if n == 0 || n > MAX_FRAME {
        return Err(ControlError::FrameSize(n));
    }
    let mut body = vec![0u8; usize::try_from(n).map_err(|_| ControlError::FrameSize(n))?];
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ControlError::Truncated
        } else {
            ControlError::Io(e)
        }
    })?;
    Ok(Some(body))
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> Result<(), ControlError> {
    let n = u32::try_from(body.len()).map_err(|_| ControlError::FrameSize(u32::MAX))?;
    if n == 0 || n > MAX_FRAME {
        return Err(ControlError::FrameSize(n));
    }
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&n.to_le_bytes());
    frame.extend_from_slice(body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// One whole frame (length prefix and body) for `body`, for a sender that must put it in one
/// `sendmsg` (`HandOver`, whose fd rides on the frame's first byte).
pub fn frame(body: &[u8]) -> Result<Vec<u8>, ControlError> {
    let n = u32::try_from(body.len()).map_err(|_| ControlError::FrameSize(u32::MAX))?;
    if n == 0 || n > MAX_FRAME {
        return Err(ControlError::FrameSize(n));
    }
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&n.to_le_bytes());
    frame.extend_from_slice(body);
    Ok(frame)
}

/// Sends a request and reads the response (the controller's side; also used by tests).
pub fn call(
    stream: &mut (impl Read + Write),
    req: &ControlRequest,
) -> Result<ControlResponse, ControlError> {
    write_frame(stream, &req.encode())?;
    let body = read_frame(stream)?.ok_or(ControlError::Truncated)?;
    ControlResponse::parse(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach(key: KeySource) -> ControlRequest {
        ControlRequest::Attach(AttachSpec {
            volume_id: VolumeId::new("vol-1").expect("vid"),
            sector_size: CryptoSectorSize::S4096,
            key,
        })
    }

    #[test]
    fn requests_roundtrip() {
        for r in [
            attach(KeySource::Plain),
            attach(KeySource::Ephemeral),
            attach(KeySource::Sealed(Box::new([7u8; SEALED_BLOB_LEN]))),
            ControlRequest::Detach,
            ControlRequest::GetMetrics,
            ControlRequest::HandOver,
            ControlRequest::TakeOver,
            ControlRequest::CancelHandOver,
        ] {
            assert_eq!(ControlRequest::parse(&r.encode()).expect("parse"), r);
        }
    }

    #[test]
    fn responses_roundtrip() {
        for r in [
            ControlResponse::Attached {
                capacity_sectors: 1 << 30,
                encrypted: true,
            },
            ControlResponse::Detached,
            ControlResponse::HandedOver,
            ControlResponse::HandOverCancelled,
            ControlResponse::Metrics(vec![("reads".into(), 3), ("io_errors".into(), 0)]),
            ControlResponse::Error {
                code: ErrorCode::KeyRefused,
                message: "sealed blob failed".into(),
            },
        ] {
            assert_eq!(ControlResponse::parse(&r.encode()).expect("parse"), r);
        }
    }

    /// The wire bytes of every kind and error code: a byte never changes meaning.
    #[test]
    fn kinds_and_codes_are_pinned() {
        let req = [
            (ControlRequest::Detach, 0x02),
            (ControlRequest::GetMetrics, 0x03),
            (ControlRequest::HandOver, 0x04),
            (ControlRequest::TakeOver, 0x05),
            (ControlRequest::CancelHandOver, 0x06),
        ];
        for (r, k) in req {
            assert_eq!(r.encode(), vec![VERSION, k], "{r:?}");
        }
        assert_eq!(attach(KeySource::Plain).encode().get(1), Some(&0x01));
        let resp = [
            (ControlResponse::Detached, 0x82),
            (ControlResponse::HandedOver, 0x84),
            (ControlResponse::HandOverCancelled, 0x85),
        ];
        for (r, k) in resp {
            assert_eq!(r.encode(), vec![VERSION, k], "{r:?}");
        }
        for (c, v) in [
            (ErrorCode::BadRequest, 1),
            (ErrorCode::AlreadyAttached, 2),
            (ErrorCode::NotAttached, 3),
            (ErrorCode::KeyRefused, 4),
            (ErrorCode::Internal, 5),
            (ErrorCode::NoHandOver, 6),
            (ErrorCode::FrontendGone, 7),
        ] {
            assert_eq!(c.to_u16(), v);
            assert_eq!(ErrorCode::from_u16(v), c);
        }
        assert_eq!(ErrorCode::from_u16(8), ErrorCode::Other(8));
        // The bodiless messages take no payload.
        assert!(matches!(
            ControlRequest::parse(&[VERSION, 0x06, 0]),
            Err(ControlError::Trailing(1))
        ));
        assert!(matches!(
            ControlResponse::parse(&[VERSION, 0x85, 0]),
            Err(ControlError::Trailing(1))
        ));
        assert!(matches!(
            ControlRequest::parse(&[VERSION, 0x85]),
            Err(ControlError::UnknownKind(0x85))
        ));
        assert!(matches!(
            ControlResponse::parse(&[VERSION, 0x06]),
            Err(ControlError::UnknownKind(0x06))
        ));
    }

    #[test]
    fn malformed_requests_rejected() {
        let good = attach(KeySource::Sealed(Box::new([7u8; SEALED_BLOB_LEN]))).encode();
        // Every truncation fails.
        for n in 0..good.len() {
            assert!(
                ControlRequest::parse(&good[..n]).is_err(),
                "truncated at {n} accepted"
            );
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(
            ControlRequest::parse(&trailing),
            Err(ControlError::Trailing(1))
        ));
        assert!(matches!(
            ControlRequest::parse(&[2, 2]),
            Err(ControlError::Version(2))
        ));
        assert!(matches!(
            ControlRequest::parse(&[1, 0x42]),
            Err(ControlError::UnknownKind(0x42))
        ));
        assert!(matches!(
            ControlRequest::parse(&[1, 1, 2, b'a', b'/', 9, 0]),
            Err(ControlError::VolumeId)
        ));
        assert!(matches!(
            ControlRequest::parse(&[1, 1, 1, b'a', 10, 0]),
            Err(ControlError::SectorShift(10))
        ));
        assert!(matches!(
            ControlRequest::parse(&[1, 1, 1, b'a', 9, 5]),
            Err(ControlError::KeyKind(5))
        ));
        assert!(matches!(
            ControlRequest::parse(&[1, 1, 1, b'a', 9, 2, 5, 0]),
            Err(ControlError::BlobLength(5))
        ));
    }

    #[test]
    fn frames_are_bounded() {
        let mut big = Vec::new();
        big.extend_from_slice(&(MAX_FRAME + 1).to_le_bytes());
        assert!(matches!(
            read_frame(&mut &big[..]),
            Err(ControlError::FrameSize(_))
        ));
        assert!(matches!(
            read_frame(&mut &[0u8, 0, 0, 0][..]),
            Err(ControlError::FrameSize(0))
        ));
        assert!(matches!(
            read_frame(&mut &[5u8, 0, 0, 0, 1][..]),
            Err(ControlError::Truncated)
        ));
        assert!(matches!(read_frame(&mut &[][..]), Ok(None)));
        let mut buf = Vec::new();
        write_frame(&mut buf, &ControlRequest::Detach.encode()).expect("write");
        let body = read_frame(&mut &buf[..]).expect("read").expect("frame");
        assert_eq!(
            ControlRequest::parse(&body).expect("parse"),
            ControlRequest::Detach
        );
    }
}
