//! The controller's side of the block card's control protocol (the card's `src/control.rs` is
//! the reference; a unit test checks every message below against the card's own parser).
//!
//! The controller only ever sends `Attach` (with the sealed blob as opaque bytes — it never opens
//! it) and `Detach`, and parses three replies: `Attached`, `Detached` and `Error`. Frame:
//! `len: u32 LE` (1..=4096) then `len` body bytes; body: `version = 1`, `kind`, payload.
//!
//! The card's protocol lives inside the card crate today; the controller does not link the card
//! (a separate trust domain with its own crypto and vhost-user stack), so this small codec is
//! written against the documented format. Moving the format into a shared no-I/O wire crate
//! (like `bulkhead-channel`) would remove the duplication.

use std::io::{Read, Write};

use crate::api::{ResourceId, SealedKeyBlob};

/// Largest frame body the card sends or accepts.
pub const MAX_FRAME: u32 = 4096;
const VERSION: u8 = 1;
const ATTACH: u8 = 0x01;
const DETACH: u8 = 0x02;
const ATTACHED: u8 = 0x81;
const DETACHED: u8 = 0x82;
const ERROR: u8 = 0xFF;
/// Key kind "sealed" in an Attach message.
const KEY_SEALED: u8 = 2;
/// Crypto sector size: 512 bytes (`plain64` with 512-byte sectors).
const SECTOR_SHIFT_512: u8 = 9;
/// Length of a sealed blob the card accepts (`bulkhead-sealing`'s fixed format).
pub const SEALED_BLOB_LEN: usize = 126;

/// Card error codes the controller distinguishes.
pub const CARD_KEY_REFUSED: u16 = 4;

#[derive(Debug, thiserror::Error)]
pub enum CardControlError {
    #[error("card control I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("card sent a frame of {0} bytes")]
    FrameSize(u32),
    #[error("card sent a malformed message")]
    Malformed,
    #[error("sealed key blob has {0} bytes, the card takes exactly {SEALED_BLOB_LEN}")]
    BlobLength(usize),
}

/// A reply from the card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CardReply {
    Attached {
        capacity_sectors: u64,
        encrypted: bool,
    },
    Detached,
    Error {
        code: u16,
    },
}

/// Encodes `Attach` for a volume with its sealed key (copied through unopened).
pub fn encode_attach(
    volume: &ResourceId,
    sealed: &SealedKeyBlob,
) -> Result<Vec<u8>, CardControlError> {
    if sealed.0.len() != SEALED_BLOB_LEN {
        return Err(CardControlError::BlobLength(sealed.0.len()));
    }
    let vid = volume.as_str().as_bytes();
    let vid_len = u8::try_from(vid.len()).map_err(|_| CardControlError::Malformed)?;
    let blob_len = u16::try_from(sealed.0.len()).map_err(|_| CardControlError::Malformed)?;
    let mut out = Vec::with_capacity(8 + vid.len() + sealed.0.len());
    out.extend_from_slice(&[VERSION, ATTACH, vid_len]);
    out.extend_from_slice(vid);
    out.extend_from_slice(&[SECTOR_SHIFT_512, KEY_SEALED]);
    out.extend_from_slice(&blob_len.to_le_bytes());
    out.extend_from_slice(&sealed.0);
    Ok(out)
}

/// Encodes `Detach`.
pub fn encode_detach() -> Vec<u8> {
    vec![VERSION, DETACH]
}

/// Parses one reply body (the only parser of what crosses from a card into the controller).
pub fn parse_reply(body: &[u8]) -> Result<CardReply, CardControlError> {
    let bad = || CardControlError::Malformed;
    match body {
        [VERSION, ATTACHED, rest @ ..] => {
            let (cap, enc) = rest.split_first_chunk::<8>().ok_or_else(bad)?;
            let encrypted = match enc {
                [0] => false,
                [1] => true,
                _ => return Err(bad()),
            };
            Ok(CardReply::Attached {
                capacity_sectors: u64::from_le_bytes(*cap),
                encrypted,
            })
        }
        [VERSION, DETACHED] => Ok(CardReply::Detached),
        [VERSION, ERROR, rest @ ..] => {
            let (code, rest) = rest.split_first_chunk::<2>().ok_or_else(bad)?;
            let (len, msg) = rest.split_first().ok_or_else(bad)?;
            if msg.len() != usize::from(*len) {
                return Err(bad());
            }
            Ok(CardReply::Error {
                code: u16::from_le_bytes(*code),
            })
        }
        _ => Err(bad()),
    }
}

/// Sends one request body and reads one reply.
pub fn call(stream: &mut (impl Read + Write), body: &[u8]) -> Result<CardReply, CardControlError> {
    let len = u32::try_from(body.len()).map_err(|_| CardControlError::Malformed)?;
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame)?;
    stream.flush()?;
    let mut hdr = [0u8; 4];
    stream.read_exact(&mut hdr)?;
    let n = u32::from_le_bytes(hdr);
    if n == 0 || n > MAX_FRAME {
        return Err(CardControlError::FrameSize(n));
    }
    let mut reply = vec![0u8; usize::try_from(n).map_err(|_| CardControlError::FrameSize(n))?];
    stream.read_exact(&mut reply)?;
    parse_reply(&reply)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bulkhead_blockcard::control::{ControlRequest, ControlResponse, ErrorCode, KeySource};

    #[test]
    fn attach_matches_the_cards_parser() {
        let blob = SealedKeyBlob((0..126u8).collect());
        let body = encode_attach(&ResourceId::parse("vol-A.1_x").unwrap(), &blob).unwrap();
        match ControlRequest::parse(&body).unwrap() {
            ControlRequest::Attach(a) => {
                assert_eq!(a.volume_id.as_str(), "vol-A.1_x");
                assert_eq!(a.sector_size.bytes(), 512);
                match a.key {
                    KeySource::Sealed(b) => assert_eq!(&b[..], &blob.0[..]),
                    other => panic!("key kind {other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ControlRequest::parse(&encode_detach()).unwrap(),
            ControlRequest::Detach
        );
        assert!(matches!(
            encode_attach(
                &ResourceId::parse("v").unwrap(),
                &SealedKeyBlob(vec![1; 10])
            ),
            Err(CardControlError::BlobLength(10))
        ));
    }

    #[test]
    fn replies_match_the_cards_encoder() {
        let cases = [
            (
                ControlResponse::Attached {
                    capacity_sectors: 131072,
                    encrypted: true,
                },
                CardReply::Attached {
                    capacity_sectors: 131072,
                    encrypted: true,
                },
            ),
            (ControlResponse::Detached, CardReply::Detached),
            (
                ControlResponse::Error {
                    code: ErrorCode::KeyRefused,
                    message: "key refused: bad tag".into(),
                },
                CardReply::Error {
                    code: CARD_KEY_REFUSED,
                },
            ),
        ];
        for (card, ours) in cases {
            assert_eq!(parse_reply(&card.encode()).unwrap(), ours);
        }
        for bad in [
            &[][..],
            &[1],
            &[2, 0x82],
            &[1, 0x81, 0],
            &[1, 0x82, 0],
            &[1, 0xFF, 4, 0, 3, b'a'],
        ] {
            assert!(parse_reply(bad).is_err(), "{bad:?}");
        }
    }
}
