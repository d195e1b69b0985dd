//! Typed parsers for the guest's frames: Ethernet II, ARP (Ethernet/IPv4), IPv4, UDP, TCP, ICMP;
//! and builders for the frames the card itself sends (ARP replies, UDP/IPv4 for DHCP).
//!
//! Every parser takes untrusted bytes and returns a checked value or a [`NetcardError`]; none
//! indexes unchecked. Trailing bytes past an IPv4 packet's total length (Ethernet padding) are
//! ignored; everything inside it is checked.

use crate::{NetcardError, Result};
use std::net::Ipv4Addr;

/// Ethernet header length (no VLAN tag; tagged frames are `EtherType::Other(0x8100)`).
pub const ETH_HEADER: usize = 14;
/// Largest frame the card accepts from its guest or a peer (jumbo frames are not offered).
pub const MAX_FRAME: usize = 9216;

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// Parses `aa:bb:cc:dd:ee:ff`.
    pub fn parse_text(s: &str) -> Result<Self> {
        let bad = |why| NetcardError::Config {
            what: "MAC address",
            value: s.to_owned(),
            why,
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(|| bad("fewer than 6 octets"))?;
            *b = u8::from_str_radix(p, 16).map_err(|_| bad("octet is not hex"))?;
        }
        if parts.next().is_some() {
            return Err(bad("more than 6 octets"));
        }
        Ok(MacAddr(out))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The EtherTypes the card distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EtherType {
    Ipv4,
    Arp,
    Ipv6,
    Other(u16),
}

impl EtherType {
    fn from_u16(v: u16) -> Self {
        match v {
            0x0800 => EtherType::Ipv4,
            0x0806 => EtherType::Arp,
            0x86dd => EtherType::Ipv6,
            o => EtherType::Other(o),
        }
    }
    fn to_u16(self) -> u16 {
        match self {
            EtherType::Ipv4 => 0x0800,
            EtherType::Arp => 0x0806,
            EtherType::Ipv6 => 0x86dd,
            EtherType::Other(o) => o,
        }
    }
}

fn need(what: &'static str, buf: &[u8], want: usize) -> Result<()> {
    if buf.len() < want {
        return Err(NetcardError::Truncated {
            what,
            got: buf.len(),
            want,
        });
    }
    Ok(())
}

fn be16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(&[x, y]) => u16::from_be_bytes([x, y]),
        _ => 0,
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(&[w, x, y, z]) => u32::from_be_bytes([w, x, y, z]),
        _ => 0,
    }
}

fn mac_at(b: &[u8], at: usize) -> MacAddr {
    let mut m = [0u8; 6];
    if let Some(s) = b.get(at..at + 6) {
        m.copy_from_slice(s);
    }
    MacAddr(m)
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::from(be32(b, at))
}

/// An Ethernet II frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthernetFrame<'a> {
    pub dst: MacAddr,
    pub src: MacAddr,
    pub ethertype: EtherType,
    pub payload: &'a [u8],
}

impl<'a> EthernetFrame<'a> {
    pub fn parse(raw: &'a [u8]) -> Result<Self> {
        need("Ethernet frame", raw, ETH_HEADER)?;
        if raw.len() > MAX_FRAME {
            return Err(NetcardError::TooLarge {
                len: raw.len(),
                limit: MAX_FRAME,
            });
        }
        Ok(EthernetFrame {
            dst: mac_at(raw, 0),
            src: mac_at(raw, 6),
            ethertype: EtherType::from_u16(be16(raw, 12)),
            payload: raw.get(ETH_HEADER..).unwrap_or_default(),
        })
    }
}

/// Writes an Ethernet header followed by `payload` into a new buffer.
pub fn build_ethernet(dst: MacAddr, src: MacAddr, ethertype: EtherType, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ETH_HEADER + payload.len());
    out.extend_from_slice(&dst.0);
    out.extend_from_slice(&src.0);
    out.extend_from_slice(&ethertype.to_u16().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// ARP operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArpOp {
    Request,
    Reply,
}

/// An ARP packet for IPv4 over Ethernet (the only kind the card handles).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpPacket {
    pub op: ArpOp,
    pub sender_mac: MacAddr,
    pub sender_ip: Ipv4Addr,
    pub target_mac: MacAddr,
    pub target_ip: Ipv4Addr,
}

/// ARP packet length for Ethernet/IPv4.
pub const ARP_LEN: usize = 28;

impl ArpPacket {
    pub fn parse(raw: &[u8]) -> Result<Self> {
        need("ARP packet", raw, ARP_LEN)?;
        let bad = |field, value: u16| NetcardError::BadField {
            what: "ARP",
            field,
            value: u64::from(value),
        };
        if be16(raw, 0) != 1 {
            return Err(bad("htype", be16(raw, 0)));
        }
        if be16(raw, 2) != 0x0800 {
            return Err(bad("ptype", be16(raw, 2)));
        }
        if be16(raw, 4) != 0x0604 {
            return Err(bad("hlen/plen", be16(raw, 4)));
        }
        let op = match be16(raw, 6) {
            1 => ArpOp::Request,
            2 => ArpOp::Reply,
            o => return Err(bad("op", o)),
        };
        Ok(ArpPacket {
            op,
            sender_mac: mac_at(raw, 8),
            sender_ip: ip_at(raw, 14),
            target_mac: mac_at(raw, 18),
            target_ip: ip_at(raw, 24),
        })
    }

    pub fn encode(&self) -> [u8; ARP_LEN] {
        let mut b = [0u8; ARP_LEN];
        b[0..2].copy_from_slice(&1u16.to_be_bytes());
        b[2..4].copy_from_slice(&0x0800u16.to_be_bytes());
        b[4] = 6;
        b[5] = 4;
        let op: u16 = match self.op {
            ArpOp::Request => 1,
            ArpOp::Reply => 2,
        };
        b[6..8].copy_from_slice(&op.to_be_bytes());
        b[8..14].copy_from_slice(&self.sender_mac.0);
        b[14..18].copy_from_slice(&self.sender_ip.octets());
        b[18..24].copy_from_slice(&self.target_mac.0);
        b[24..28].copy_from_slice(&self.target_ip.octets());
        b
    }
}

/// IP protocol numbers the card looks into.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An IPv4 packet (header checked, payload bounded by the total length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Packet<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub ttl: u8,
    pub header_len: usize,
    pub total_len: usize,
    pub payload: &'a [u8],
}

/// The Internet checksum (RFC 1071) of `data`, folded, not yet complemented.
fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add(u32::from(*last) << 8);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // `acc <= 0xffff` here, so the conversion is exact.
    u16::try_from(acc).unwrap_or(0xffff)
}

/// The one's-complement checksum of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum16(0, data))
}

impl<'a> Ipv4Packet<'a> {
    pub fn parse(raw: &'a [u8]) -> Result<Self> {
        need("IPv4 header", raw, 20)?;
        let vihl = raw.first().copied().unwrap_or(0);
        if vihl >> 4 != 4 {
            return Err(NetcardError::BadField {
                what: "IPv4",
                field: "version",
                value: u64::from(vihl >> 4),
            });
        }
        let header_len = usize::from(vihl & 0x0f) * 4;
        if header_len < 20 {
            return Err(NetcardError::BadField {
                what: "IPv4",
                field: "ihl",
                value: u64::from(vihl & 0x0f),
            });
        }
        let total_len = usize::from(be16(raw, 2));
        if total_len < header_len {
            return Err(NetcardError::BadField {
                what: "IPv4",
                field: "total length",
                value: u64::try_from(total_len).unwrap_or(u64::MAX),
            });
        }
        need("IPv4 packet", raw, total_len)?;
        let header = raw.get(..header_len).unwrap_or_default();
        if internet_checksum(header) != 0 {
            return Err(NetcardError::BadChecksum);
        }
        let frag = be16(raw, 6);
        // More-fragments set or a non-zero offset: a fragment.
        if frag & 0x2000 != 0 || frag & 0x1fff != 0 {
            return Err(NetcardError::Fragment);
        }
        Ok(Ipv4Packet {
            src: ip_at(raw, 12),
            dst: ip_at(raw, 16),
            protocol: raw.get(9).copied().unwrap_or(0),
            ttl: raw.get(8).copied().unwrap_or(0),
            header_len,
            total_len,
            payload: raw.get(header_len..total_len).unwrap_or_default(),
        })
    }
}

/// A UDP datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: &'a [u8],
}

impl<'a> UdpDatagram<'a> {
    pub fn parse(raw: &'a [u8]) -> Result<Self> {
        need("UDP header", raw, 8)?;
        let len = usize::from(be16(raw, 4));
        if len < 8 {
            return Err(NetcardError::BadField {
                what: "UDP",
                field: "length",
                value: u64::try_from(len).unwrap_or(u64::MAX),
            });
        }
        need("UDP datagram", raw, len)?;
        Ok(UdpDatagram {
            src_port: be16(raw, 0),
            dst_port: be16(raw, 2),
            payload: raw.get(8..len).unwrap_or_default(),
        })
    }
}

/// A TCP segment's header fields the security groups need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    pub src_port: u16,
    pub dst_port: u16,
    pub flags: u8,
}

impl TcpSegment {
    pub const SYN: u8 = 0x02;
    pub const ACK: u8 = 0x10;
    pub const RST: u8 = 0x04;
    pub const FIN: u8 = 0x01;

    pub fn parse(raw: &[u8]) -> Result<Self> {
        need("TCP header", raw, 20)?;
        let off = usize::from(raw.get(12).copied().unwrap_or(0) >> 4) * 4;
        if off < 20 {
            return Err(NetcardError::BadField {
                what: "TCP",
                field: "data offset",
                value: u64::try_from(off).unwrap_or(u64::MAX),
            });
        }
        need("TCP header with options", raw, off)?;
        Ok(TcpSegment {
            src_port: be16(raw, 0),
            dst_port: be16(raw, 2),
            flags: raw.get(13).copied().unwrap_or(0),
        })
    }
}

/// An ICMP message's type, code and (for echo) identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpMessage {
    pub ty: u8,
    pub code: u8,
    /// The echo identifier for echo request (8) and reply (0).
    pub echo_id: Option<u16>,
}

impl IcmpMessage {
    pub const ECHO_REPLY: u8 = 0;
    pub const ECHO_REQUEST: u8 = 8;

    pub fn parse(raw: &[u8]) -> Result<Self> {
        need("ICMP header", raw, 8)?;
        let ty = raw.first().copied().unwrap_or(0);
        let echo_id = matches!(ty, Self::ECHO_REPLY | Self::ECHO_REQUEST).then(|| be16(raw, 4));
        Ok(IcmpMessage {
            ty,
            code: raw.get(1).copied().unwrap_or(0),
            echo_id,
        })
    }
}

/// The transport layer of an IPv4 packet, as far as the card looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport<'a> {
    Tcp(TcpSegment),
    Udp(UdpDatagram<'a>),
    Icmp(IcmpMessage),
    Other(u8),
}

impl<'a> Transport<'a> {
    pub fn parse(ip: &Ipv4Packet<'a>) -> Result<Self> {
        Ok(match ip.protocol {
            PROTO_TCP => Transport::Tcp(TcpSegment::parse(ip.payload)?),
            PROTO_UDP => Transport::Udp(UdpDatagram::parse(ip.payload)?),
            PROTO_ICMP => Transport::Icmp(IcmpMessage::parse(ip.payload)?),
            p => Transport::Other(p),
        })
    }
}

/// A whole guest frame parsed down to the transport layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    Arp(ArpPacket),
    Ipv4(Ipv4Packet<'a>, Transport<'a>),
    Ipv6,
    Other(u16),
}

/// Parses a guest frame down to the transport layer.
pub fn parse_frame(raw: &[u8]) -> Result<(EthernetFrame<'_>, Parsed<'_>)> {
    let eth = EthernetFrame::parse(raw)?;
    let parsed = match eth.ethertype {
        EtherType::Arp => Parsed::Arp(ArpPacket::parse(eth.payload)?),
        EtherType::Ipv4 => {
            let ip = Ipv4Packet::parse(eth.payload)?;
            let t = Transport::parse(&ip)?;
            Parsed::Ipv4(ip, t)
        }
        EtherType::Ipv6 => Parsed::Ipv6,
        EtherType::Other(o) => Parsed::Other(o),
    };
    Ok((eth, parsed))
}

/// Builds an IPv4/UDP packet (header checksum and UDP checksum filled in).
pub fn build_ipv4_udp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Result<Vec<u8>> {
    let udp_len = u16::try_from(8 + payload.len()).map_err(|_| NetcardError::TooLarge {
        len: payload.len(),
        limit: 65_000,
    })?;
    let total = udp_len.checked_add(20).ok_or(NetcardError::TooLarge {
        len: payload.len(),
        limit: 65_000,
    })?;
    let mut p = Vec::with_capacity(usize::from(total));
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0]); // id 0, DF
    p.extend_from_slice(&[64, PROTO_UDP, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let csum = internet_checksum(&p);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    let udp_start = p.len();
    p.extend_from_slice(&src_port.to_be_bytes());
    p.extend_from_slice(&dst_port.to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    // Pseudo-header sum, then the UDP header and data.
    let mut acc = sum16(0, &src.octets());
    acc = sum16(acc, &dst.octets());
    acc = acc.wrapping_add(u32::from(PROTO_UDP));
    acc = acc.wrapping_add(u32::from(udp_len));
    acc = sum16(acc, p.get(udp_start..).unwrap_or_default());
    let mut ucsum = !fold(acc);
    if ucsum == 0 {
        ucsum = 0xffff;
    }
    p[udp_start + 6..udp_start + 8].copy_from_slice(&ucsum.to_be_bytes());
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x0a]);
    const B: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x0b]);

    /// A TCP SYN from 10.0.1.10:40000 to 10.0.1.11:7000.
    pub(crate) fn tcp_syn() -> Vec<u8> {
        let mut ip = vec![
            0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 1, 10, 10, 0, 1, 11,
        ];
        let c = internet_checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&7000u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = TcpSegment::SYN;
        ip.extend_from_slice(&tcp);
        build_ethernet(B, A, EtherType::Ipv4, &ip)
    }

    #[test]
    fn tcp_syn_parses() {
        let f = tcp_syn();
        let (eth, p) = parse_frame(&f).expect("parses");
        assert_eq!(eth.src, A);
        let Parsed::Ipv4(ip, Transport::Tcp(t)) = p else {
            panic!("not tcp: {p:?}")
        };
        assert_eq!(ip.src, Ipv4Addr::new(10, 0, 1, 10));
        assert_eq!(t.dst_port, 7000);
        assert_eq!(t.flags, TcpSegment::SYN);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let f = tcp_syn();
        for n in 0..f.len() {
            assert!(parse_frame(&f[..n]).is_err(), "prefix {n} parsed");
        }
    }

    #[test]
    fn bad_checksum_and_bad_lengths_refused() {
        let mut f = tcp_syn();
        f[ETH_HEADER + 8] ^= 1; // ttl changes, checksum no longer matches
        assert!(matches!(parse_frame(&f), Err(NetcardError::BadChecksum)));
        let mut f = tcp_syn();
        f[ETH_HEADER] = 0x44; // ihl 4
        assert!(parse_frame(&f).is_err());
        let mut f = tcp_syn();
        f[ETH_HEADER + 2..ETH_HEADER + 4].copy_from_slice(&400u16.to_be_bytes());
        assert!(matches!(
            parse_frame(&f),
            Err(NetcardError::Truncated { .. }) | Err(NetcardError::BadChecksum)
        ));
    }

    #[test]
    fn fragments_refused() {
        let mut f = tcp_syn();
        let ip = &mut f[ETH_HEADER..ETH_HEADER + 20];
        ip[6] = 0x20; // MF
        ip[10] = 0;
        ip[11] = 0;
        let c = internet_checksum(ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        assert!(matches!(parse_frame(&f), Err(NetcardError::Fragment)));
    }

    #[test]
    fn arp_round_trip() {
        let a = ArpPacket {
            op: ArpOp::Request,
            sender_mac: A,
            sender_ip: Ipv4Addr::new(10, 0, 1, 10),
            target_mac: MacAddr([0; 6]),
            target_ip: Ipv4Addr::new(10, 0, 1, 1),
        };
        assert_eq!(ArpPacket::parse(&a.encode()).expect("parses"), a);
        let mut bad = a.encode();
        bad[7] = 9;
        assert!(ArpPacket::parse(&bad).is_err());
    }

    #[test]
    fn udp_builder_checksums_verify() {
        let p = build_ipv4_udp(
            Ipv4Addr::new(10, 0, 1, 1),
            Ipv4Addr::BROADCAST,
            67,
            68,
            b"hello",
        )
        .expect("builds");
        let ip = Ipv4Packet::parse(&p).expect("parses");
        let u = UdpDatagram::parse(ip.payload).expect("udp");
        assert_eq!(u.payload, b"hello");
        // The UDP checksum verifies over the pseudo-header.
        let mut acc = sum16(0, &ip.src.octets());
        acc = sum16(acc, &ip.dst.octets());
        acc += u32::from(PROTO_UDP) + u32::try_from(ip.payload.len()).expect("small");
        acc = sum16(acc, ip.payload);
        assert_eq!(!fold(acc), 0);
    }

    #[test]
    fn mac_text() {
        assert_eq!(MacAddr::parse_text("02:00:00:00:00:0a").expect("ok"), A);
        assert!(MacAddr::parse_text("02:00:00:00:00").is_err());
        assert!(MacAddr::parse_text("02:00:00:00:00:0a:01").is_err());
        assert_eq!(A.to_string(), "02:00:00:00:00:0a");
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let base = tcp_syn();
        for _ in 0..20_000 {
            let mut f = base.clone();
            let n = rng.gen_range(0..f.len() + 8);
            f.resize(n, 0);
            for _ in 0..rng.gen_range(0..4) {
                if !f.is_empty() {
                    let i = rng.gen_range(0..f.len());
                    f[i] = rng.gen();
                }
            }
            let _ = parse_frame(&f);
        }
    }
}
