//! The controller's side of the block card's control protocol. The format itself — messages,
//! constants, the one parser — is `bulkhead-card-proto`, shared with the card, so it exists
//! once; this module only maps the controller's types onto it.
//!
//! The controller only ever sends `Attach` (with the sealed blob as opaque bytes — it never opens
//! it) and `Detach`, and takes three replies: `Attached`, `Detached` and `Error`.

use std::io::{Read, Write};

use bulkhead_card_proto::{
    self as proto, AttachSpec, ControlRequest, ControlResponse, CryptoSectorSize, KeySource,
    VolumeId,
};
pub use bulkhead_sealing::SEALED_BLOB_LEN;

use crate::api::{ResourceId, SealedBlob};

/// Card error code for a sealed key the card could not open (`ErrorCode::KeyRefused`; a test
/// pins the two together).
pub const CARD_KEY_REFUSED: u16 = 4;

#[derive(Debug, thiserror::Error)]
pub enum CardControlError {
    #[error("card control: {0}")]
    Protocol(#[from] proto::ControlError),
    #[error("card sent a message the controller does not take")]
    Malformed,
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

/// Encodes `Attach` for a volume with its sealed key (copied through unopened), 512-byte
/// crypto sectors (`plain64`, what standard tools read).
pub fn encode_attach(
    volume: &ResourceId,
    sealed: &SealedBlob,
) -> Result<Vec<u8>, CardControlError> {
    let spec = AttachSpec {
        volume_id: VolumeId::new(volume.as_str())?,
        sector_size: CryptoSectorSize::S512,
        key: KeySource::Sealed(sealed.clone().into_boxed()),
    };
    Ok(ControlRequest::Attach(spec).encode())
}

/// Encodes `Attach` for an instance's instance-storage disk: the card makes the key itself
/// (`KeySource::Ephemeral`); it never leaves the card and dies with it at `Detach`. The
/// instance id names the disk in the card's logs. 512-byte crypto sectors, as for volumes.
pub fn encode_attach_ephemeral(instance: &ResourceId) -> Result<Vec<u8>, CardControlError> {
    let spec = AttachSpec {
        volume_id: VolumeId::new(instance.as_str())?,
        sector_size: CryptoSectorSize::S512,
        key: KeySource::Ephemeral,
    };
    Ok(ControlRequest::Attach(spec).encode())
}

/// Encodes `Detach`.
pub fn encode_detach() -> Vec<u8> {
    ControlRequest::Detach.encode()
}

/// Parses one reply body (through the shared parser).
pub fn parse_reply(body: &[u8]) -> Result<CardReply, CardControlError> {
    Ok(match ControlResponse::parse(body)? {
        ControlResponse::Attached {
            capacity_sectors,
            encrypted,
        } => CardReply::Attached {
            capacity_sectors,
            encrypted,
        },
        ControlResponse::Detached => CardReply::Detached,
        ControlResponse::Error { code, .. } => CardReply::Error {
            code: code.to_u16(),
        },
        ControlResponse::Metrics(_)
        | ControlResponse::HandedOver
        | ControlResponse::HandOverCancelled => return Err(CardControlError::Malformed),
    })
}

/// Sends one request body and reads one reply.
pub fn call(stream: &mut (impl Read + Write), body: &[u8]) -> Result<CardReply, CardControlError> {
    proto::write_frame(stream, body)?;
    let reply = proto::read_frame(stream)?.ok_or(proto::ControlError::Truncated)?;
    parse_reply(&reply)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bulkhead_blockcard::control::{ControlRequest, ControlResponse, ErrorCode, KeySource};

    #[test]
    fn attach_matches_the_cards_parser() {
        let blob = SealedBlob::from_slice(&(0..126u8).collect::<Vec<_>>()).unwrap();
        let body = encode_attach(&ResourceId::parse("vol-A.1_x").unwrap(), &blob).unwrap();
        match ControlRequest::parse(&body).unwrap() {
            ControlRequest::Attach(a) => {
                assert_eq!(a.volume_id.as_str(), "vol-A.1_x");
                assert_eq!(a.sector_size.bytes(), 512);
                match a.key {
                    KeySource::Sealed(b) => assert_eq!(&b[..], &blob.as_bytes()[..]),
                    other => panic!("key kind {other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ControlRequest::parse(&encode_detach()).unwrap(),
            ControlRequest::Detach
        );
        let eph = encode_attach_ephemeral(&ResourceId::parse("i-store.1").unwrap()).unwrap();
        match ControlRequest::parse(&eph).unwrap() {
            ControlRequest::Attach(a) => {
                assert_eq!(a.volume_id.as_str(), "i-store.1");
                assert_eq!(a.sector_size.bytes(), 512);
                assert!(matches!(a.key, KeySource::Ephemeral), "{:?}", a.key);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn key_refused_code_matches_the_protocol() {
        assert_eq!(ErrorCode::KeyRefused.to_u16(), CARD_KEY_REFUSED);
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
            // (a Metrics reply is well-formed but not one the controller takes)
            assert!(parse_reply(bad).is_err(), "{bad:?}");
        }
    }
}
