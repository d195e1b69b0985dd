//! Entry points shared by the cargo-fuzz targets (`fuzz/fuzz_targets/`); they must never panic.

use crate::encap::{
    CardId, EpochKey, KeyEpoch, Opener, PayloadKind, TunnelKeys, TunnelParams, VpcId,
};
use crate::frame::{parse_frame, MacAddr};
use crate::responder::{from_guest, to_guest, DhcpMessage, InterfaceConfig};
use crate::secgroup::Cidr;
use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::sync::Arc;

/// The fuzz targets' tunnel parameters (a receiver `2` of sender `1`) and key (32 × 0x42).
pub fn fuzz_params() -> TunnelParams {
    TunnelParams {
        vpc: VpcId(7),
        epoch: KeyEpoch(3),
        local: CardId(2),
        peer: CardId(1),
        kind: PayloadKind::Sealed,
    }
}

/// The fuzz targets' interface.
pub fn fuzz_interface() -> InterfaceConfig {
    InterfaceConfig {
        mac: MacAddr([2, 0, 0, 0, 0, 0x0a]),
        ip: Ipv4Addr::new(10, 0, 1, 10),
        subnet: Cidr {
            addr: Ipv4Addr::new(10, 0, 1, 0),
            prefix: 24,
        },
        gateway_ip: Ipv4Addr::new(10, 0, 1, 1),
        gateway_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        mtu: 1400,
        lease_secs: 3600,
    }
}

thread_local! {
    static OPENER: RefCell<Option<Opener>> = const { RefCell::new(None) };
}

/// A guest frame through every guest-side parser: the frame parser, the responder (ARP, DHCP,
/// anti-spoofing) and the peer-side readdressing.
pub fn guest_frame(data: &[u8]) {
    let _ = parse_frame(data);
    let cfg = fuzz_interface();
    let _ = from_guest(&cfg, data);
    let mut copy = data.to_vec();
    let _ = to_guest(&cfg, &mut copy);
}

/// A DHCP message body.
pub fn dhcp_parse(data: &[u8]) {
    let _ = DhcpMessage::parse(data);
}

/// A datagram from the host network through the opener (header checks, replay window, AEAD).
pub fn encap_open(data: &[u8]) {
    OPENER.with(|o| {
        let mut o = o.borrow_mut();
        if o.is_none() {
            let Ok(key) = EpochKey::from_bytes(&[0x42; 32]) else {
                return;
            };
            let p = fuzz_params();
            let Ok(keys) = TunnelKeys::new(&key, &p) else {
                return;
            };
            *o = Some(Opener::new(Arc::new(keys), p));
        }
        if let Some(op) = o.as_mut() {
            let mut out = Vec::new();
            let _ = op.open_datagram(data, &mut out);
        }
    });
}

thread_local! {
    /// Two regions with a hole between them: 0x1000..0x11000 and 0x20000..0x21000.
    static GUEST: Option<vm_memory::GuestMemoryMmap<()>> = vm_memory::GuestMemoryMmap::from_ranges(&[
        (vm_memory::GuestAddress(0x1000), 0x10000),
        (vm_memory::GuestAddress(0x20000), 0x1000),
    ])
    .ok();
}

/// A virtio-net descriptor chain as a guest could build it, through the TX parser and the RX
/// writer. Input: one byte of descriptor count (1..=8, or 70 to exceed the chain limit), then
/// per descriptor 8 bytes address (LE), 4 bytes length (LE), 1 byte flags (bit 0 =
/// device-writable); the rest is written into guest memory at 0x1000 first.
pub fn virtio_chain(data: &[u8]) {
    use crate::virtio::{read_tx, write_rx, Desc};
    use vm_memory::{Bytes, GuestAddress};
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = if count == 0xff {
        70
    } else {
        usize::from(count % 8) + 1
    };
    let mut descs = Vec::with_capacity(count);
    let mut rest = rest;
    for _ in 0..count {
        let Some((d, tail)) = rest.split_first_chunk::<13>() else {
            break;
        };
        rest = tail;
        let mut a = [0u8; 8];
        a.copy_from_slice(&d[..8]);
        let mut l = [0u8; 4];
        l.copy_from_slice(&d[8..12]);
        descs.push(Desc {
            addr: u64::from_le_bytes(a),
            len: u32::from_le_bytes(l),
            write_only: d[12] & 1 != 0,
        });
    }
    GUEST.with(|g| {
        let Some(mem) = g else { return };
        let n = rest.len().min(0x10000);
        let _ = mem.write_slice(rest.get(..n).unwrap_or_default(), GuestAddress(0x1000));
        let mut out = Vec::new();
        let _ = read_tx(descs.iter().copied(), mem, 1418, &mut out);
        let frame = rest.get(..rest.len().min(1500)).unwrap_or_default();
        let _ = write_rx(descs.iter().copied(), mem, frame);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `encap_open` seed was sealed by Python's `cryptography` (HKDF-SHA256 + AESGCM, see
    /// README.md): an independent implementation of the format opens with the card's opener, and
    /// the guest-frame seeds parse.
    #[test]
    fn seeds_from_an_independent_implementation_open() {
        let key = EpochKey::from_bytes(&[0x42; 32]).expect("key");
        let p = fuzz_params();
        let mut o = Opener::new(Arc::new(TunnelKeys::new(&key, &p).expect("keys")), p);
        let mut out = Vec::new();
        o.open_datagram(include_bytes!("../fuzz/seeds/encap_open/sealed"), &mut out)
            .expect("python-sealed datagram opens");
        assert_eq!(out, include_bytes!("../fuzz/seeds/guest_frame/tcp_syn"));
        for f in [
            &include_bytes!("../fuzz/seeds/guest_frame/arp")[..],
            &include_bytes!("../fuzz/seeds/guest_frame/icmp")[..],
            &include_bytes!("../fuzz/seeds/guest_frame/dhcp")[..],
        ] {
            parse_frame(f).expect("seed parses");
        }
        DhcpMessage::parse(include_bytes!("../fuzz/seeds/dhcp_parse/discover")).expect("dhcp");
        // And the entry points survive them.
        encap_open(include_bytes!("../fuzz/seeds/encap_open/sealed"));
        guest_frame(include_bytes!("../fuzz/seeds/guest_frame/dhcp"));
        virtio_chain(include_bytes!("../fuzz/seeds/virtio_chain/two_descriptors"));
    }
}
