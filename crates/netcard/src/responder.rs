//! The card's own network services for its guest, and anti-spoofing.
//!
//! The card is the guest's whole network, modelled on a VPC's virtual router: it answers ARP
//! for every other address of the subnet (the gateway and the peers alike) with the gateway's
//! MAC, so all the guest's traffic is addressed to the card; it serves DHCP (address, mask,
//! router, MTU, lease time) for exactly the interface's own address; it drops any frame whose
//! source MAC or IPv4 address is not the interface's own. Frames for peers leave here as
//! [`GuestVerdict::Forward`]; the caller applies the security groups and seals them.

use crate::frame::{
    build_ethernet, build_ipv4_udp, parse_frame, ArpOp, ArpPacket, EtherType, Ipv4Packet, MacAddr,
    Parsed, Transport, ETH_HEADER,
};
use crate::secgroup::Cidr;
use crate::{NetcardError, Result};
use std::net::Ipv4Addr;

/// One interface's addressing, fixed when the card starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub subnet: Cidr,
    pub gateway_ip: Ipv4Addr,
    pub gateway_mac: MacAddr,
    pub mtu: u16,
    pub lease_secs: u32,
}

impl InterfaceConfig {
    pub fn check(&self) -> Result<()> {
        let bad = |why| NetcardError::Config {
            what: "interface",
            value: format!("{} in {}/{}", self.ip, self.subnet.addr, self.subnet.prefix),
            why,
        };
        if !self.subnet.contains(self.ip) || !self.subnet.contains(self.gateway_ip) {
            return Err(bad("address and gateway must be inside the subnet"));
        }
        if self.ip == self.gateway_ip {
            return Err(bad("address equals the gateway"));
        }
        if self.mac == self.gateway_mac || self.mac.0[0] & 1 != 0 {
            return Err(bad("MAC is the gateway's or multicast"));
        }
        if self.mtu < 576 {
            return Err(bad("MTU below 576"));
        }
        Ok(())
    }
}

/// Why a guest frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestDrop {
    /// Did not parse.
    Malformed,
    /// Source MAC or IP not the interface's own.
    Spoofed,
    /// IPv6 or another EtherType the card does not carry.
    Unsupported,
    /// Destination outside the subnet or a broadcast the card does not serve.
    NoRoute,
}

/// What to do with a frame from the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum GuestVerdict<'a> {
    /// Write this frame back to the guest (ARP or DHCP answer).
    Reply(Vec<u8>),
    /// Send to the peer (after the security groups).
    Forward(Ipv4Packet<'a>, Transport<'a>),
    /// Handled, nothing to send (gratuitous ARP, ARP probe, DHCP RELEASE).
    Consumed,
    Drop(GuestDrop),
}

/// Classifies one frame from the guest.
pub fn from_guest<'a>(cfg: &InterfaceConfig, raw: &'a [u8]) -> GuestVerdict<'a> {
    let Ok((eth, parsed)) = parse_frame(raw) else {
        return GuestVerdict::Drop(GuestDrop::Malformed);
    };
    if eth.src != cfg.mac {
        return GuestVerdict::Drop(GuestDrop::Spoofed);
    }
    match parsed {
        Parsed::Arp(arp) => arp_from_guest(cfg, &arp),
        Parsed::Ipv4(ip, t) => {
            if let Transport::Udp(u) = t {
                if u.src_port == 68 && u.dst_port == 67 {
                    return dhcp_from_guest(cfg, &ip, u.payload);
                }
            }
            if ip.src != cfg.ip {
                return GuestVerdict::Drop(GuestDrop::Spoofed);
            }
            if ip.dst == cfg.ip || ip.dst == cfg.gateway_ip || !cfg.subnet.contains(ip.dst) {
                return GuestVerdict::Drop(GuestDrop::NoRoute);
            }
            let bcast = Ipv4Addr::from(u32::from(cfg.subnet.addr) | !cfg.subnet.mask());
            if ip.dst == bcast || eth.dst != cfg.gateway_mac {
                return GuestVerdict::Drop(GuestDrop::NoRoute);
            }
            GuestVerdict::Forward(ip, t)
        }
        Parsed::Ipv6 | Parsed::Other(_) => GuestVerdict::Drop(GuestDrop::Unsupported),
    }
}

fn arp_from_guest<'a>(cfg: &InterfaceConfig, arp: &ArpPacket) -> GuestVerdict<'a> {
    if arp.sender_mac != cfg.mac {
        return GuestVerdict::Drop(GuestDrop::Spoofed);
    }
    // A probe (RFC 5227) has sender address 0.0.0.0; anything else must be the guest's own.
    let probe = arp.sender_ip == Ipv4Addr::UNSPECIFIED;
    if !probe && arp.sender_ip != cfg.ip {
        return GuestVerdict::Drop(GuestDrop::Spoofed);
    }
    if arp.op != ArpOp::Request
        || probe
        || arp.target_ip == cfg.ip
        || !cfg.subnet.contains(arp.target_ip)
    {
        return GuestVerdict::Consumed;
    }
    let reply = ArpPacket {
        op: ArpOp::Reply,
        sender_mac: cfg.gateway_mac,
        sender_ip: arp.target_ip,
        target_mac: cfg.mac,
        target_ip: cfg.ip,
    };
    GuestVerdict::Reply(build_ethernet(
        cfg.mac,
        cfg.gateway_mac,
        EtherType::Arp,
        &reply.encode(),
    ))
}

/// DHCP message types the card handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DhcpType {
    Discover,
    Offer,
    Request,
    Decline,
    Ack,
    Nak,
    Release,
    Inform,
}

impl DhcpType {
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => DhcpType::Discover,
            2 => DhcpType::Offer,
            3 => DhcpType::Request,
            4 => DhcpType::Decline,
            5 => DhcpType::Ack,
            6 => DhcpType::Nak,
            7 => DhcpType::Release,
            8 => DhcpType::Inform,
            _ => return None,
        })
    }
    fn code(self) -> u8 {
        match self {
            DhcpType::Discover => 1,
            DhcpType::Offer => 2,
            DhcpType::Request => 3,
            DhcpType::Decline => 4,
            DhcpType::Ack => 5,
            DhcpType::Nak => 6,
            DhcpType::Release => 7,
            DhcpType::Inform => 8,
        }
    }
}

/// A client's DHCP message (BOOTP request with DHCP options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DhcpMessage {
    pub xid: u32,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub chaddr: MacAddr,
    pub msg_type: DhcpType,
    pub requested_ip: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
}

const BOOTP_LEN: usize = 236;
const COOKIE: [u8; 4] = [99, 130, 83, 99];

impl DhcpMessage {
    /// Parses a client's message (op = BOOTREQUEST, Ethernet hardware addresses).
    pub fn parse(raw: &[u8]) -> Result<Self> {
        if raw.len() < BOOTP_LEN + 4 {
            return Err(NetcardError::Truncated {
                what: "DHCP message",
                got: raw.len(),
                want: BOOTP_LEN + 4,
            });
        }
        let field = |field, value: u8| NetcardError::BadField {
            what: "DHCP",
            field,
            value: u64::from(value),
        };
        let byte = |i: usize| raw.get(i).copied().unwrap_or(0);
        let ip = |i: usize| Ipv4Addr::new(byte(i), byte(i + 1), byte(i + 2), byte(i + 3));
        if byte(0) != 1 {
            return Err(field("op", byte(0)));
        }
        if byte(1) != 1 || byte(2) != 6 {
            return Err(field("htype/hlen", byte(1)));
        }
        if raw.get(BOOTP_LEN..BOOTP_LEN + 4) != Some(&COOKIE[..]) {
            return Err(field("magic cookie", byte(BOOTP_LEN)));
        }
        let mut chaddr = [0u8; 6];
        if let Some(s) = raw.get(28..34) {
            chaddr.copy_from_slice(s);
        }
        let mut msg_type = None;
        let mut requested_ip = None;
        let mut server_id = None;
        let mut i = BOOTP_LEN + 4;
        // Each step advances `i` by at least one, so the loop is bounded by the length.
        while let Some(&code) = raw.get(i) {
            match code {
                0 => {
                    i += 1;
                    continue;
                }
                255 => break,
                _ => {}
            }
            let len = usize::from(raw.get(i + 1).copied().ok_or(NetcardError::Truncated {
                what: "DHCP option",
                got: raw.len(),
                want: i + 2,
            })?);
            let val = raw.get(i + 2..i + 2 + len).ok_or(NetcardError::Truncated {
                what: "DHCP option",
                got: raw.len(),
                want: i + 2 + len,
            })?;
            let ip4 = |v: &[u8]| match v {
                [a, b, c, d] => Some(Ipv4Addr::new(*a, *b, *c, *d)),
                _ => None,
            };
            match (code, val) {
                (53, [t]) => msg_type = Some(DhcpType::from_code(*t).ok_or(field("type", *t))?),
                (53, _) => return Err(field("type length", code)),
                (50, v) => requested_ip = Some(ip4(v).ok_or(field("requested ip", code))?),
                (54, v) => server_id = Some(ip4(v).ok_or(field("server id", code))?),
                _ => {}
            }
            i += 2 + len;
        }
        Ok(DhcpMessage {
            xid: u32::from_be_bytes([byte(4), byte(5), byte(6), byte(7)]),
            flags: u16::from_be_bytes([byte(10), byte(11)]),
            ciaddr: ip(12),
            chaddr: MacAddr(chaddr),
            msg_type: msg_type.ok_or(field("no message type", 53))?,
            requested_ip,
            server_id,
        })
    }
}

fn dhcp_reply(cfg: &InterfaceConfig, req: &DhcpMessage, ty: DhcpType) -> Vec<u8> {
    let mut b = vec![0u8; BOOTP_LEN];
    b[0] = 2;
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&req.xid.to_be_bytes());
    b[10..12].copy_from_slice(&req.flags.to_be_bytes());
    if ty != DhcpType::Nak {
        b[16..20].copy_from_slice(&cfg.ip.octets());
    }
    b[20..24].copy_from_slice(&cfg.gateway_ip.octets());
    b[28..34].copy_from_slice(&req.chaddr.0);
    b.extend_from_slice(&COOKIE);
    b.extend_from_slice(&[53, 1, ty.code()]);
    b.extend_from_slice(&[54, 4]);
    b.extend_from_slice(&cfg.gateway_ip.octets());
    if ty != DhcpType::Nak {
        b.extend_from_slice(&[51, 4]);
        b.extend_from_slice(&cfg.lease_secs.to_be_bytes());
        b.extend_from_slice(&[1, 4]);
        b.extend_from_slice(&cfg.subnet.mask().to_be_bytes());
        b.extend_from_slice(&[3, 4]);
        b.extend_from_slice(&cfg.gateway_ip.octets());
        b.extend_from_slice(&[26, 2]);
        b.extend_from_slice(&cfg.mtu.to_be_bytes());
    }
    b.push(255);
    b
}

fn dhcp_from_guest<'a>(cfg: &InterfaceConfig, ip: &Ipv4Packet<'_>, raw: &[u8]) -> GuestVerdict<'a> {
    if ip.src != Ipv4Addr::UNSPECIFIED && ip.src != cfg.ip {
        return GuestVerdict::Drop(GuestDrop::Spoofed);
    }
    let Ok(msg) = DhcpMessage::parse(raw) else {
        return GuestVerdict::Drop(GuestDrop::Malformed);
    };
    if msg.chaddr != cfg.mac {
        return GuestVerdict::Drop(GuestDrop::Spoofed);
    }
    let ty = match msg.msg_type {
        DhcpType::Discover => DhcpType::Offer,
        DhcpType::Request => {
            let wanted = msg.requested_ip.unwrap_or(msg.ciaddr);
            let ours = msg.server_id.is_none_or(|s| s == cfg.gateway_ip);
            if !ours {
                return GuestVerdict::Consumed;
            }
            if wanted == cfg.ip {
                DhcpType::Ack
            } else {
                DhcpType::Nak
            }
        }
        _ => return GuestVerdict::Consumed,
    };
    let body = dhcp_reply(cfg, &msg, ty);
    match build_ipv4_udp(cfg.gateway_ip, Ipv4Addr::BROADCAST, 67, 68, &body) {
        Ok(pkt) => GuestVerdict::Reply(build_ethernet(
            MacAddr::BROADCAST,
            cfg.gateway_mac,
            EtherType::Ipv4,
            &pkt,
        )),
        Err(_) => GuestVerdict::Drop(GuestDrop::Malformed),
    }
}

/// Checks a frame opened from the peer and readdresses it for the guest: it must be IPv4 to the
/// interface's address from inside the subnet. Returns the parsed packet for the security
/// groups; `frame`'s MACs are rewritten in place (gateway → guest).
pub fn to_guest<'a>(
    cfg: &InterfaceConfig,
    frame: &'a mut [u8],
) -> Result<(Ipv4Packet<'a>, Transport<'a>), GuestDrop> {
    if frame.len() < ETH_HEADER {
        return Err(GuestDrop::Malformed);
    }
    frame[0..6].copy_from_slice(&cfg.mac.0);
    frame[6..12].copy_from_slice(&cfg.gateway_mac.0);
    let frame: &'a [u8] = frame;
    match parse_frame(frame) {
        Ok((_, Parsed::Ipv4(ip, t))) => {
            if ip.dst != cfg.ip || !cfg.subnet.contains(ip.src) || ip.src == cfg.ip {
                return Err(GuestDrop::NoRoute);
            }
            Ok((ip, t))
        }
        Ok(_) => Err(GuestDrop::Unsupported),
        Err(_) => Err(GuestDrop::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{EthernetFrame, UdpDatagram};

    pub(crate) fn cfg() -> InterfaceConfig {
        InterfaceConfig {
            mac: MacAddr([2, 0, 0, 0, 0, 0x0a]),
            ip: Ipv4Addr::new(10, 0, 1, 10),
            subnet: Cidr::parse_text("10.0.1.0/24").expect("cidr"),
            gateway_ip: Ipv4Addr::new(10, 0, 1, 1),
            gateway_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            mtu: 1400,
            lease_secs: 3600,
        }
    }

    fn arp_request(sender_mac: MacAddr, sender_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let a = ArpPacket {
            op: ArpOp::Request,
            sender_mac,
            sender_ip,
            target_mac: MacAddr([0; 6]),
            target_ip: target,
        };
        build_ethernet(MacAddr::BROADCAST, sender_mac, EtherType::Arp, &a.encode())
    }

    #[test]
    fn arp_for_gateway_and_peers_answered_with_gateway_mac() {
        let c = cfg();
        for target in [c.gateway_ip, Ipv4Addr::new(10, 0, 1, 11)] {
            let req = arp_request(c.mac, c.ip, target);
            let GuestVerdict::Reply(r) = from_guest(&c, &req) else {
                panic!("no reply for {target}")
            };
            let eth = EthernetFrame::parse(&r).expect("eth");
            let a = ArpPacket::parse(eth.payload).expect("arp");
            assert_eq!(a.op, ArpOp::Reply);
            assert_eq!(a.sender_ip, target);
            assert_eq!(a.sender_mac, c.gateway_mac);
            assert_eq!(eth.dst, c.mac);
        }
        // Outside the subnet or for the guest's own address: no answer.
        let req = arp_request(c.mac, c.ip, Ipv4Addr::new(10, 0, 2, 1));
        assert_eq!(from_guest(&c, &req), GuestVerdict::Consumed);
        let req = arp_request(c.mac, c.ip, c.ip);
        assert_eq!(from_guest(&c, &req), GuestVerdict::Consumed);
    }

    #[test]
    fn spoofed_arp_and_ip_dropped() {
        let c = cfg();
        let other = MacAddr([2, 0, 0, 0, 0, 0x0b]);
        let req = arp_request(other, c.ip, c.gateway_ip);
        assert_eq!(from_guest(&c, &req), GuestVerdict::Drop(GuestDrop::Spoofed));
        let req = arp_request(c.mac, Ipv4Addr::new(10, 0, 1, 99), c.gateway_ip);
        assert_eq!(from_guest(&c, &req), GuestVerdict::Drop(GuestDrop::Spoofed));
        let pkt = build_ipv4_udp(
            Ipv4Addr::new(10, 0, 1, 99),
            Ipv4Addr::new(10, 0, 1, 11),
            1,
            2,
            b"x",
        )
        .expect("pkt");
        let f = build_ethernet(c.gateway_mac, c.mac, EtherType::Ipv4, &pkt);
        assert_eq!(from_guest(&c, &f), GuestVerdict::Drop(GuestDrop::Spoofed));
        let pkt = build_ipv4_udp(c.ip, Ipv4Addr::new(10, 0, 1, 11), 1, 2, b"x").expect("pkt");
        let f = build_ethernet(c.gateway_mac, other, EtherType::Ipv4, &pkt);
        assert_eq!(from_guest(&c, &f), GuestVerdict::Drop(GuestDrop::Spoofed));
        let f = build_ethernet(c.gateway_mac, c.mac, EtherType::Ipv4, &pkt);
        assert!(matches!(from_guest(&c, &f), GuestVerdict::Forward(..)));
    }

    fn dhcp_request(c: &InterfaceConfig, ty: u8, requested: Option<Ipv4Addr>) -> Vec<u8> {
        let mut b = vec![0u8; BOOTP_LEN];
        b[0] = 1;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        b[28..34].copy_from_slice(&c.mac.0);
        b.extend_from_slice(&COOKIE);
        b.extend_from_slice(&[53, 1, ty]);
        if let Some(r) = requested {
            b.extend_from_slice(&[50, 4]);
            b.extend_from_slice(&r.octets());
        }
        b.push(255);
        let pkt =
            build_ipv4_udp(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, 68, 67, &b).expect("pkt");
        build_ethernet(MacAddr::BROADCAST, c.mac, EtherType::Ipv4, &pkt)
    }

    fn reply_options(r: &[u8]) -> (Ipv4Addr, Vec<u8>) {
        let eth = EthernetFrame::parse(r).expect("eth");
        let ip = Ipv4Packet::parse(eth.payload).expect("ip");
        let u = UdpDatagram::parse(ip.payload).expect("udp");
        assert_eq!((u.src_port, u.dst_port), (67, 68));
        let p = u.payload;
        (
            Ipv4Addr::new(p[16], p[17], p[18], p[19]),
            p[BOOTP_LEN + 4..].to_vec(),
        )
    }

    #[test]
    fn dhcp_discover_offer_request_ack() {
        let c = cfg();
        let GuestVerdict::Reply(r) = from_guest(&c, &dhcp_request(&c, 1, None)) else {
            panic!("no offer")
        };
        let (yiaddr, opts) = reply_options(&r);
        assert_eq!(yiaddr, c.ip);
        assert_eq!(&opts[..3], &[53, 1, 2]);
        assert!(opts.windows(6).any(|w| w == [1, 4, 255, 255, 255, 0]));
        assert!(opts.windows(6).any(|w| w == [3, 4, 10, 0, 1, 1]));
        assert!(opts.windows(4).any(|w| w == [26, 2, 0x05, 0x78]));
        let GuestVerdict::Reply(r) = from_guest(&c, &dhcp_request(&c, 3, Some(c.ip))) else {
            panic!("no ack")
        };
        assert_eq!(&reply_options(&r).1[..3], &[53, 1, 5]);
        let GuestVerdict::Reply(r) =
            from_guest(&c, &dhcp_request(&c, 3, Some(Ipv4Addr::new(10, 0, 1, 50))))
        else {
            panic!("no nak")
        };
        assert_eq!(&reply_options(&r).1[..3], &[53, 1, 6]);
    }

    #[test]
    fn dhcp_parse_refuses_bad_messages() {
        let c = cfg();
        let f = dhcp_request(&c, 1, None);
        let body_start = ETH_HEADER + 20 + 8;
        let body = &f[body_start..];
        assert!(DhcpMessage::parse(body).is_ok());
        for n in 0..body.len() - 1 {
            let _ = DhcpMessage::parse(&body[..n]);
        }
        let mut bad = body.to_vec();
        bad[BOOTP_LEN] = 0;
        assert!(DhcpMessage::parse(&bad).is_err());
        let mut bad = body.to_vec();
        bad[BOOTP_LEN + 5] = 9; // option 53 length 9 runs past the end
        assert!(DhcpMessage::parse(&bad).is_err());
    }

    #[test]
    fn to_guest_rewrites_and_checks_destination() {
        let c = cfg();
        let pkt = build_ipv4_udp(Ipv4Addr::new(10, 0, 1, 11), c.ip, 1, 2, b"x").expect("pkt");
        let mut f = build_ethernet(
            c.gateway_mac,
            MacAddr([2, 0, 0, 0, 0, 0x0b]),
            EtherType::Ipv4,
            &pkt,
        );
        to_guest(&c, &mut f).expect("for us");
        let eth = EthernetFrame::parse(&f).expect("eth");
        assert_eq!((eth.dst, eth.src), (c.mac, c.gateway_mac));
        let pkt = build_ipv4_udp(
            Ipv4Addr::new(10, 0, 1, 11),
            Ipv4Addr::new(10, 0, 1, 12),
            1,
            2,
            b"x",
        )
        .expect("pkt");
        let mut f = build_ethernet(c.gateway_mac, c.mac, EtherType::Ipv4, &pkt);
        assert_eq!(to_guest(&c, &mut f).err(), Some(GuestDrop::NoRoute));
    }
}
