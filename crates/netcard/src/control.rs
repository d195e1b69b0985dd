//! Key delivery and rotation: the card's VPC epoch keys arrive HPKE-sealed to the host key
//! (the `bulkhead-sealing` blob the KMS makes for volume keys), over the card's control socket
//! (or, for the first epoch, as a sealed blob file given at start). The plaintext epoch key
//! exists only in a locked page inside the card, for the time it takes to derive the direction
//! keys; it is never on disk and never passes through the controller in clear.
//!
//! Sealed epoch key: a [`bulkhead_sealing`] blob of 64 bytes sealed for the id
//! `netcard-vpc-{vpc}-epoch-{epoch}` (so a blob opens only for its VPC and epoch); bytes
//! 0..32 are the epoch key, bytes 32..64 are reserved and must be zero.
//!
//! Control protocol: one JSON object per line, one request per connection, one JSON reply line.
//! * `{"op":"install","epoch":N,"sealed":"<hex blob>"}`: open and derive epoch N's keys for
//!   every peer of the routing table (at most two epochs live).
//! * `{"op":"send","epoch":N}`: seal under epoch N from now on.
//! * `{"op":"retire","epoch":N}`: drop epoch N; its key pages are zeroized at once.
//! * `{"op":"counters"}`: the flow counters.
//!
//!   Every reply carries `ok`, the live epochs and the send epoch (or `error`).

use crate::encap::{EpochKey, KeyEpoch, VpcId, KEY_LEN};
use crate::keyring::KeyRing;
use crate::routes::RouteTable;
use crate::{NetcardError, Result};
use bulkhead_sealing::{HostKey, HostPublicKey, SEALED_BLOB_LEN, VOLUME_KEY_LEN};
use zeroize::Zeroize;

/// The sealing id binding a blob to one VPC and epoch.
pub fn sealed_key_id(vpc: VpcId, epoch: KeyEpoch) -> String {
    format!("netcard-vpc-{}-epoch-{}", vpc.0, epoch.0)
}

/// Seals an epoch key to a host (what the KMS does; used by tests).
pub fn seal_epoch_key(
    host: &HostPublicKey,
    vpc: VpcId,
    epoch: KeyEpoch,
    key: &[u8; KEY_LEN],
) -> Result<[u8; SEALED_BLOB_LEN]> {
    let mut padded = [0u8; VOLUME_KEY_LEN];
    padded[..KEY_LEN].copy_from_slice(key);
    let blob = bulkhead_sealing::seal_volume_key(host, &sealed_key_id(vpc, epoch), &padded);
    padded.zeroize();
    Ok(blob?)
}

/// Opens a sealed epoch key with the host key, straight into a locked page.
pub fn open_epoch_key(
    host: &HostKey,
    vpc: VpcId,
    epoch: KeyEpoch,
    blob: &[u8],
) -> Result<EpochKey> {
    let opened = bulkhead_sealing::open_volume_key(host, &sealed_key_id(vpc, epoch), blob)?;
    let raw = opened.as_ref();
    if raw.get(KEY_LEN..).is_none_or(|r| r.iter().any(|b| *b != 0)) {
        return Err(NetcardError::SealedKeyReserved);
    }
    let mut key = [0u8; KEY_LEN];
    key.copy_from_slice(raw.get(..KEY_LEN).unwrap_or(&[0u8; KEY_LEN]));
    let out = EpochKey::from_bytes(&key);
    key.zeroize();
    out
    // `opened` (a locked page) is zeroized on drop.
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 2 * SEALED_BLOB_LEN {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// What a request did, for the counters.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    Installed,
    Retired,
    Other,
}

fn epoch_of(req: &serde_json::Value) -> Result<KeyEpoch> {
    req.get("epoch")
        .and_then(serde_json::Value::as_u64)
        .and_then(|e| u32::try_from(e).ok())
        .map(KeyEpoch)
        .ok_or(NetcardError::Control("want a numeric \"epoch\"".into()))
}

/// Applies one key request (`install`, `send`, `retire`) to `ring`.
pub fn apply(
    req: &serde_json::Value,
    ring: &mut KeyRing,
    host: Option<&HostKey>,
    vpc: VpcId,
    routes: &RouteTable,
) -> Result<Effect> {
    match req.get("op").and_then(serde_json::Value::as_str) {
        Some("install") => {
            let epoch = epoch_of(req)?;
            let host = host.ok_or(NetcardError::Control("the card has no host key".into()))?;
            let blob = req
                .get("sealed")
                .and_then(serde_json::Value::as_str)
                .and_then(hex_decode)
                .ok_or(NetcardError::Control("want \"sealed\": hex blob".into()))?;
            let key = open_epoch_key(host, vpc, epoch, &blob)?;
            ring.install(epoch, &key, routes.peers())?;
            // `key` is dropped (wiped) here: only the direction keys stay.
            Ok(Effect::Installed)
        }
        Some("send") => {
            ring.set_send(epoch_of(req)?)?;
            Ok(Effect::Other)
        }
        Some("retire") => {
            ring.retire(epoch_of(req)?)?;
            Ok(Effect::Retired)
        }
        _ => Err(NetcardError::Control("unknown op".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encap::{CardId, PayloadKind};
    use crate::routes::Route;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn sealed_key_opens_only_for_its_host_vpc_and_epoch() {
        let host = HostKey::generate().expect("host");
        let other = HostKey::generate().expect("other host");
        let key = [0x5a; 32];
        let blob = seal_epoch_key(host.public(), VpcId(7), KeyEpoch(2), &key).expect("seal");
        open_epoch_key(&host, VpcId(7), KeyEpoch(2), &blob).expect("opens");
        assert!(open_epoch_key(&other, VpcId(7), KeyEpoch(2), &blob).is_err());
        assert!(open_epoch_key(&host, VpcId(8), KeyEpoch(2), &blob).is_err());
        assert!(open_epoch_key(&host, VpcId(7), KeyEpoch(3), &blob).is_err());
        let mut flipped = blob;
        flipped[100] ^= 1;
        assert!(open_epoch_key(&host, VpcId(7), KeyEpoch(2), &flipped).is_err());
        // Reserved bytes set: refused.
        let mut padded = [0u8; 64];
        padded[40] = 1;
        let odd = bulkhead_sealing::seal_volume_key(
            host.public(),
            &sealed_key_id(VpcId(7), KeyEpoch(2)),
            &padded,
        )
        .expect("seal");
        assert!(matches!(
            open_epoch_key(&host, VpcId(7), KeyEpoch(2), &odd),
            Err(NetcardError::SealedKeyReserved)
        ));
    }

    #[test]
    fn control_requests_install_switch_retire() {
        let host = HostKey::generate().expect("host");
        let mut routes = RouteTable::new();
        routes
            .add(
                CardId(1),
                "10.0.1.12".parse().expect("ip"),
                Route {
                    card: CardId(2),
                    host: "10.0.0.2:4789".parse().expect("addr"),
                },
            )
            .expect("route");
        let mut ring = KeyRing::new(VpcId(7), CardId(1), PayloadKind::Sealed);
        let req = |op: &str, e: u32, blob: Option<&[u8]>| {
            let mut v = serde_json::json!({"op": op, "epoch": e});
            if let Some(b) = blob {
                v["sealed"] = hex(b).into();
            }
            v
        };
        let b1 = seal_epoch_key(host.public(), VpcId(7), KeyEpoch(1), &[1; 32]).expect("b1");
        let b2 = seal_epoch_key(host.public(), VpcId(7), KeyEpoch(2), &[2; 32]).expect("b2");
        let mut run = |v: serde_json::Value| apply(&v, &mut ring, Some(&host), VpcId(7), &routes);
        assert_eq!(
            run(req("install", 1, Some(&b1))).expect("e1"),
            Effect::Installed
        );
        // Epoch 2's blob presented as epoch 3: refused (the id binds the epoch).
        assert!(run(req("install", 3, Some(&b2))).is_err());
        assert!(run(req("install", 2, Some(&b1[..50]))).is_err());
        assert!(run(serde_json::json!({"op": "install", "epoch": 2, "sealed": "zz"})).is_err());
        run(req("install", 2, Some(&b2))).expect("e2");
        assert!(run(req("send", 3, None)).is_err());
        run(req("send", 2, None)).expect("switch");
        assert!(run(req("retire", 2, None)).is_err(), "send epoch retired");
        assert_eq!(
            run(req("retire", 1, None)).expect("retire"),
            Effect::Retired
        );
        assert!(run(serde_json::json!({"op": "dump-keys"})).is_err());
        assert_eq!(ring.live_epochs(), [2]);
        assert_eq!(ring.send_epoch(), Some(KeyEpoch(2)));
        // No host key: nothing can be installed.
        let mut r2 = KeyRing::new(VpcId(7), CardId(1), PayloadKind::Sealed);
        assert!(apply(
            &req("install", 1, Some(&b1)),
            &mut r2,
            None,
            VpcId(7),
            &routes
        )
        .is_err());
    }
}
