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
    }
}
