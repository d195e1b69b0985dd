//! Live key epochs of one card, its sequence numbers, and the multi-peer send/receive paths.
//!
//! * **Two live epochs.** A card holds at most two epochs' direction keys (current and next, or
//!   current and previous). It seals under the *send epoch* and opens under any live epoch, so
//!   during a rotation the peers switch one at a time and no frame is lost. A retired epoch's
//!   key pages are zeroized (and read back) at once; datagrams of it are then `unknown_epoch`.
//! * **Sequence numbers never repeat under a key, even across `kill -9`.** One counter per card
//!   numbers every datagram it sends (all peers, all epochs), so the receiver keeps one replay
//!   window per sender card that survives rotations. The counter's start is
//!   `max(persisted floor, wall-clock microseconds) + 1`, and before a sequence number above
//!   the floor is used the floor is advanced by a block (2^20) and `fdatasync`'d. A card killed
//!   at any instant restarts above every number it could have used: no (key, nonce) pair is
//!   reused, and the peers' replay windows need no reset (the restarted card's numbers are
//!   simply higher). Without a state file (`--seq-state` absent) only the clock guards this.

use crate::encap::{
    CardId, DropReason, EncapHeader, EpochKey, KeyEpoch, PayloadKind, ReplayWindow, TunnelKeys,
    TunnelParams, VpcId, HEADER_LEN, TAG_LEN,
};
use crate::frame::MAX_FRAME;
use crate::routes::RouteTable;
use crate::{NetcardError, Result};
use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;

/// Live epochs a card holds at once.
pub const MAX_LIVE_EPOCHS: usize = 2;
/// Sequence numbers reserved per floor write.
pub const SEQ_BLOCK: u64 = 1 << 20;

/// One epoch's direction keys for every peer, and the epoch key itself (in its own locked
/// page) so that a route update can derive keys for a new peer; both are wiped at retire.
struct EpochKeys {
    epoch: KeyEpoch,
    key: EpochKey,
    peers: HashMap<CardId, TunnelKeys>,
}

/// The card's live epochs.
pub struct KeyRing {
    vpc: VpcId,
    local: CardId,
    kind: PayloadKind,
    live: Vec<EpochKeys>,
    send: Option<KeyEpoch>,
}

fn refuse(what: &'static str, epoch: KeyEpoch, why: &'static str) -> NetcardError {
    NetcardError::Config {
        what,
        value: epoch.0.to_string(),
        why,
    }
}

impl KeyRing {
    pub fn new(vpc: VpcId, local: CardId, kind: PayloadKind) -> Self {
        KeyRing {
            vpc,
            local,
            kind,
            live: Vec::new(),
            send: None,
        }
    }

    /// Derives `epoch`'s direction keys for every peer from `key` (which the caller drops, and
    /// so wipes, right after). The first epoch installed becomes the send epoch.
    pub fn install(
        &mut self,
        epoch: KeyEpoch,
        key: &EpochKey,
        peers: impl Iterator<Item = CardId>,
    ) -> Result<()> {
        if self.live.iter().any(|e| e.epoch == epoch) {
            return Err(refuse("epoch", epoch, "already live"));
        }
        if self.live.len() >= MAX_LIVE_EPOCHS {
            return Err(refuse("epoch", epoch, "two epochs live: retire one first"));
        }
        let mut map = HashMap::new();
        for peer in peers {
            map.insert(peer, self.derive(epoch, key, peer)?);
        }
        self.live.push(EpochKeys {
            epoch,
            key: key.duplicate()?,
            peers: map,
        });
        if self.send.is_none() {
            self.send = Some(epoch);
        }
        Ok(())
    }

    fn derive(&self, epoch: KeyEpoch, key: &EpochKey, peer: CardId) -> Result<TunnelKeys> {
        let p = TunnelParams {
            vpc: self.vpc,
            epoch,
            local: self.local,
            peer,
            kind: self.kind,
        };
        TunnelKeys::new(key, &p)
    }

    /// Makes the peer set of every live epoch exactly `peers`: derives direction keys for new
    /// peers (from the kept epoch key) and drops (wipes) the keys of peers no longer listed.
    /// Nothing changes if a derivation fails.
    pub fn set_peers(&mut self, peers: &[CardId]) -> Result<()> {
        let mut added: Vec<Vec<(CardId, TunnelKeys)>> = Vec::with_capacity(self.live.len());
        for e in &self.live {
            let mut new = Vec::new();
            for p in peers {
                if !e.peers.contains_key(p) && new.iter().all(|(q, _)| q != p) {
                    new.push((*p, self.derive(e.epoch, &e.key, *p)?));
                }
            }
            added.push(new);
        }
        for (e, new) in self.live.iter_mut().zip(added) {
            e.peers.retain(|p, _| peers.contains(p));
            e.peers.extend(new);
        }
        Ok(())
    }

    /// Switches sending to `epoch` (which must be live).
    pub fn set_send(&mut self, epoch: KeyEpoch) -> Result<()> {
        if !self.live.iter().any(|e| e.epoch == epoch) {
            return Err(refuse("epoch", epoch, "not live"));
        }
        self.send = Some(epoch);
        Ok(())
    }

    /// Drops `epoch`'s keys (their pages are zeroized now). The send epoch cannot be retired.
    pub fn retire(&mut self, epoch: KeyEpoch) -> Result<()> {
        if self.send == Some(epoch) {
            return Err(refuse("epoch", epoch, "is the send epoch"));
        }
        let before = self.live.len();
        self.live.retain(|e| e.epoch != epoch);
        if self.live.len() == before {
            return Err(refuse("epoch", epoch, "not live"));
        }
        Ok(())
    }

    pub fn send_epoch(&self) -> Option<KeyEpoch> {
        self.send
    }

    pub fn live_epochs(&self) -> Vec<u32> {
        self.live.iter().map(|e| e.epoch.0).collect()
    }

    fn keys(&self, epoch: KeyEpoch, peer: CardId) -> Option<&TunnelKeys> {
        self.live
            .iter()
            .find(|e| e.epoch == epoch)
            .and_then(|e| e.peers.get(&peer))
    }

    /// Seals `frame` for `peer` under the send epoch with sequence number from `seq`.
    pub fn seal_to(
        &self,
        seq: &mut SeqSource,
        peer: CardId,
        frame: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if frame.len() > MAX_FRAME {
            return Err(NetcardError::TooLarge {
                len: frame.len(),
                limit: MAX_FRAME,
            });
        }
        let epoch = self.send.ok_or(NetcardError::NoKey)?;
        let keys = self.keys(epoch, peer).ok_or(NetcardError::NoKey)?;
        let hdr = EncapHeader {
            kind: self.kind,
            vpc: self.vpc,
            epoch,
            sender: self.local,
            seq: seq.take()?,
        };
        match self.kind {
            PayloadKind::Sealed => keys.seal(&hdr, frame, out),
            PayloadKind::Plain => {
                out.clear();
                out.extend_from_slice(&hdr.encode());
                out.extend_from_slice(frame);
                Ok(())
            }
        }
    }
}

/// The card's sequence numbers: strictly increasing across the card's whole life, restarts
/// included (see the module docs).
pub struct SeqSource {
    file: Option<File>,
    next: u64,
    reserved: u64,
    block: u64,
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> NetcardError {
    move |source| NetcardError::Io { op, source }
}

impl SeqSource {
    /// Starts above the floor in `file` (8 bytes big-endian; empty = 0) and above the clock,
    /// and persists the first reservation before returning.
    pub fn open(file: Option<File>, block: u64) -> Result<Self> {
        let block = block.max(1);
        let mut floor = 0u64;
        if let Some(f) = &file {
            let mut b = [0u8; 8];
            match f.read_exact_at(&mut b, 0) {
                Ok(()) => floor = u64::from_be_bytes(b),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                Err(e) => return Err(io("read sequence floor")(e)),
            }
        }
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let start = floor
            .max(clock)
            .checked_add(1)
            .ok_or(NetcardError::SequenceExhausted)?;
        let mut s = SeqSource {
            file,
            next: start,
            reserved: start - 1,
            block,
        };
        s.reserve()?;
        Ok(s)
    }

    fn reserve(&mut self) -> Result<()> {
        let r = self
            .reserved
            .checked_add(self.block)
            .ok_or(NetcardError::SequenceExhausted)?;
        if let Some(f) = &self.file {
            f.write_all_at(&r.to_be_bytes(), 0)
                .map_err(io("write sequence floor"))?;
            f.sync_data().map_err(io("fdatasync sequence floor"))?;
        }
        self.reserved = r;
        Ok(())
    }

    /// The next sequence number; never one used before by this card, restarts included.
    pub fn take(&mut self) -> Result<u64> {
        if self.next > self.reserved {
            self.reserve()?;
        }
        let s = self.next;
        self.next = s.checked_add(1).ok_or(NetcardError::SequenceExhausted)?;
        Ok(s)
    }
}

/// Why a datagram was dropped on receive (the encapsulation's reasons plus the pinned source).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxDrop {
    Encap(DropReason),
    /// From a host address other than the one the routing table names for the sender card.
    ForgedSource,
}

impl From<DropReason> for RxDrop {
    fn from(d: DropReason) -> Self {
        RxDrop::Encap(d)
    }
}

/// The receiving side: one replay window per known sender card.
#[derive(Default)]
pub struct Receiver {
    windows: HashMap<CardId, ReplayWindow>,
}

impl Receiver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks and opens a datagram received from `from`; returns the sender card.
    pub fn open(
        &mut self,
        ring: &KeyRing,
        routes: &RouteTable,
        from: SocketAddr,
        raw: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<CardId, RxDrop> {
        let (hdr, body) = EncapHeader::parse(raw)?;
        if hdr.kind != ring.kind {
            return Err(DropReason::BadKind.into());
        }
        if hdr.vpc != ring.vpc {
            return Err(DropReason::WrongVpc.into());
        }
        let pinned = routes.pinned(hdr.sender).ok_or(DropReason::UnknownSender)?;
        if pinned != from {
            return Err(RxDrop::ForgedSource);
        }
        let keys = ring
            .keys(hdr.epoch, hdr.sender)
            .ok_or(DropReason::UnknownEpoch)?;
        if hdr.kind == PayloadKind::Sealed && body.len() < TAG_LEN {
            return Err(DropReason::Truncated.into());
        }
        let window = self.windows.entry(hdr.sender).or_default();
        window.check(hdr.seq)?;
        match hdr.kind {
            PayloadKind::Sealed => {
                let raw_header = raw.get(..HEADER_LEN).unwrap_or_default();
                keys.open(&hdr, raw_header, body, out)?;
            }
            PayloadKind::Plain => {
                out.clear();
                out.extend_from_slice(body);
            }
        }
        window.accept(hdr.seq);
        Ok(hdr.sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encap::key_pages_wiped;
    use crate::routes::Route;

    const A: &str = "10.0.0.1:4789";
    const B: &str = "10.0.0.2:4789";

    fn ring(local: u32, peer: u32, epochs: &[(u32, u8)]) -> KeyRing {
        let mut r = KeyRing::new(VpcId(7), CardId(local), PayloadKind::Sealed);
        for (e, k) in epochs {
            let key = EpochKey::from_bytes(&[*k; 32]).expect("key");
            r.install(KeyEpoch(*e), &key, [CardId(peer)].into_iter())
                .expect("install");
        }
        r
    }

    fn routes_of_b() -> RouteTable {
        let mut t = RouteTable::new();
        t.add(
            CardId(2),
            "10.0.1.11".parse().expect("ip"),
            Route {
                card: CardId(1),
                host: A.parse().expect("addr"),
            },
        )
        .expect("route");
        t
    }

    fn seq() -> SeqSource {
        SeqSource::open(None, SEQ_BLOCK).expect("seq")
    }

    #[test]
    fn rotation_overlap_switch_and_retire() {
        let from_a: SocketAddr = A.parse().expect("addr");
        let routes = routes_of_b();
        let mut a = ring(1, 2, &[(1, 0x11)]);
        let mut b = ring(2, 1, &[(1, 0x11)]);
        let mut rx = Receiver::new();
        let mut s = seq();
        let (mut dg, mut out) = (Vec::new(), Vec::new());
        a.seal_to(&mut s, CardId(2), b"epoch one", &mut dg)
            .expect("seal");
        let old = dg.clone();
        rx.open(&b, &routes, from_a, &dg, &mut out).expect("e1");

        // The next epoch reaches B first: B accepts both; A still sends epoch 1.
        let k2 = EpochKey::from_bytes(&[0x22; 32]).expect("key");
        b.install(KeyEpoch(2), &k2, [CardId(1)].into_iter())
            .expect("b e2");
        assert_eq!(b.send_epoch(), Some(KeyEpoch(1)));
        a.seal_to(&mut s, CardId(2), b"still one", &mut dg)
            .expect("seal");
        let in_flight_e1 = dg.clone();
        // A gets it and switches; B opens epoch 2, and the epoch-1 datagram still in flight.
        a.install(KeyEpoch(2), &k2, [CardId(2)].into_iter())
            .expect("a e2");
        drop(k2);
        a.set_send(KeyEpoch(2)).expect("switch");
        a.seal_to(&mut s, CardId(2), b"epoch two", &mut dg)
            .expect("seal");
        rx.open(&b, &routes, from_a, &dg, &mut out).expect("e2");
        assert_eq!(out, b"epoch two");
        rx.open(&b, &routes, from_a, &in_flight_e1, &mut out)
            .expect("epoch-1 datagram reordered behind the switch");
        assert_eq!(out, b"still one");

        // A third epoch needs a retirement first; the send epoch cannot be retired.
        let k3 = EpochKey::from_bytes(&[0x33; 32]).expect("key");
        assert!(a
            .install(KeyEpoch(3), &k3, [CardId(2)].into_iter())
            .is_err());
        assert!(a.retire(KeyEpoch(2)).is_err());
        let wiped = key_pages_wiped();
        a.retire(KeyEpoch(1)).expect("retire a");
        b.set_send(KeyEpoch(2)).expect("b switches");
        b.retire(KeyEpoch(1)).expect("retire b");
        assert!(key_pages_wiped() >= wiped + 2, "retired pages wiped");
        assert_eq!(b.live_epochs(), [2]);
        // A datagram of the retired epoch no longer opens.
        assert_eq!(
            rx.open(&b, &routes, from_a, &old, &mut out),
            Err(RxDrop::Encap(DropReason::UnknownEpoch))
        );
    }

    #[test]
    fn pinned_source_and_unknown_sender() {
        let routes = routes_of_b();
        let a = ring(1, 2, &[(1, 0x11)]);
        let b = ring(2, 1, &[(1, 0x11)]);
        let mut rx = Receiver::new();
        let mut s = seq();
        let (mut dg, mut out) = (Vec::new(), Vec::new());
        a.seal_to(&mut s, CardId(2), b"x", &mut dg).expect("seal");
        assert_eq!(
            rx.open(&b, &routes, B.parse().expect("addr"), &dg, &mut out),
            Err(RxDrop::ForgedSource)
        );
        // The forged-source copy did not consume the sequence number.
        rx.open(&b, &routes, A.parse().expect("addr"), &dg, &mut out)
            .expect("genuine");
        let c = ring(3, 2, &[(1, 0x11)]);
        c.seal_to(&mut s, CardId(2), b"x", &mut dg).expect("seal");
        assert_eq!(
            rx.open(&b, &routes, A.parse().expect("addr"), &dg, &mut out),
            Err(RxDrop::Encap(DropReason::UnknownSender))
        );
    }

    #[test]
    fn sequence_numbers_never_repeat_across_a_crash() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("seq");
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .expect("state file")
        };
        // A tiny block, so reservations happen often.
        let mut s = SeqSource::open(Some(open()), 8).expect("seq");
        let mut used: Vec<u64> = (0..20).map(|_| s.take().expect("seq")).collect();
        // "kill -9": the process state is gone, only the file remains.
        drop(s);
        let mut s = SeqSource::open(Some(open()), 8).expect("restart");
        let first = s.take().expect("seq");
        assert!(
            first > *used.iter().max().expect("used"),
            "{first} <= {used:?}"
        );
        used.push(first);
        // Even with the clock far behind the floor (a floor from the future).
        std::fs::write(&path, (u64::MAX / 2).to_be_bytes()).expect("floor");
        let mut s = SeqSource::open(Some(open()), 8).expect("restart");
        assert!(s.take().expect("seq") > u64::MAX / 2);
        // A floor at the very end refuses instead of wrapping.
        std::fs::write(&path, u64::MAX.to_be_bytes()).expect("floor");
        assert!(SeqSource::open(Some(open()), 8).is_err());
        // Without a file the clock alone orders restarts.
        let a = SeqSource::open(None, 8).expect("a").take().expect("n");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = SeqSource::open(None, 8).expect("b").take().expect("n");
        assert!(b > a);
    }
}
