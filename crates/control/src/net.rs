//! The VPC model as typed values: IPv4 CIDR blocks, ingress rules, and the VPC, subnet,
//! security-group and network-interface rows both repositories store.
//!
//! Addresses are `u32` ([`Ipv4`]), blocks are checked on parse ([`Cidr::parse`]: network
//! address only, no host bits), rules are an enum of protocols with checked port ranges, so the
//! service and the repositories never see a free-form string for any of them. Reserved
//! addresses follow AWS: in every subnet the network address, the next three (.1 gateway, .2
//! DNS, .3 reserved) and the broadcast address are never handed to an instance.

use std::fmt;
use std::net::Ipv4Addr;

/// Smallest and largest VPC and subnet blocks (AWS: /16 to /28).
pub const MIN_PREFIX: u8 = 16;
pub const MAX_PREFIX: u8 = 28;
/// The default VPC's block (AWS's).
pub const DEFAULT_VPC_CIDR: &str = "172.31.0.0/16";
/// The default subnet's block, inside [`DEFAULT_VPC_CIDR`].
pub const DEFAULT_SUBNET_CIDR: &str = "172.31.0.0/20";
/// The default security group's name (AWS's).
pub const DEFAULT_GROUP_NAME: &str = "default";
/// The MTU the net card offers its guest (the UDP encapsulation's overhead below 1500).
pub const GUEST_MTU: u16 = 1400;
/// Most ingress rules per security group.
pub const MAX_RULES_PER_GROUP: usize = 60;
/// Most security groups on one instance.
pub const MAX_GROUPS_PER_INSTANCE: usize = 5;

/// Why a network value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("not an IPv4 CIDR block")]
    BadCidr,
    #[error("the block has host bits set")]
    HostBits,
    #[error("prefix length must be between /16 and /28")]
    PrefixOutOfRange,
    #[error("unknown protocol")]
    BadProtocol,
    #[error("bad port range")]
    BadPorts,
    #[error("bad MAC address")]
    BadMac,
}

/// An IPv4 address as a number (stored as an integer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4(pub u32);

impl Ipv4 {
    pub fn parse(s: &str) -> Result<Ipv4, NetError> {
        s.parse::<Ipv4Addr>()
            .map(|a| Ipv4(u32::from(a)))
            .map_err(|_| NetError::BadCidr)
    }
}

impl fmt::Display for Ipv4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Ipv4Addr::from(self.0).fmt(f)
    }
}

/// An IPv4 block `a.b.c.d/p`: `addr` is the network address (no host bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: u32,
    prefix: u8,
}

impl Cidr {
    /// Any block `/0`..`/32` with no host bits (rule sources).
    pub fn parse(s: &str) -> Result<Cidr, NetError> {
        let (a, p) = s.split_once('/').ok_or(NetError::BadCidr)?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(NetError::BadCidr);
        }
        let prefix: u8 = p.parse().map_err(|_| NetError::BadCidr)?;
        if prefix > 32 {
            return Err(NetError::BadCidr);
        }
        let addr = Ipv4::parse(a)?.0;
        let c = Cidr { addr, prefix };
        if addr & c.mask() != addr {
            return Err(NetError::HostBits);
        }
        Ok(c)
    }

    /// A VPC or subnet block: as [`Cidr::parse`], and /16../28.
    pub fn parse_block(s: &str) -> Result<Cidr, NetError> {
        let c = Cidr::parse(s)?;
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&c.prefix) {
            return Err(NetError::PrefixOutOfRange);
        }
        Ok(c)
    }

    pub fn prefix(self) -> u8 {
        self.prefix
    }

    pub fn mask(self) -> u32 {
        match self.prefix {
            0 => 0,
            p => u32::MAX << (32 - u32::from(p)),
        }
    }

    pub fn network(self) -> Ipv4 {
        Ipv4(self.addr)
    }

    pub fn broadcast(self) -> Ipv4 {
        Ipv4(self.addr | !self.mask())
    }

    pub fn contains_ip(self, ip: Ipv4) -> bool {
        ip.0 & self.mask() == self.addr
    }

    /// `other` lies wholly inside this block.
    pub fn contains(self, other: Cidr) -> bool {
        other.prefix >= self.prefix && self.contains_ip(other.network())
    }

    pub fn overlaps(self, other: Cidr) -> bool {
        self.contains(other) || other.contains(self)
    }

    /// The subnet's router: the first address after the network address (AWS's `.1`).
    pub fn gateway(self) -> Ipv4 {
        Ipv4(self.addr.saturating_add(1))
    }

    /// The addresses an instance may get: network+4 ..= broadcast-1 (AWS reserves the first
    /// four and the last).
    pub fn usable(self) -> std::ops::RangeInclusive<u32> {
        self.addr.saturating_add(4)..=self.broadcast().0.saturating_sub(1)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4(self.addr), self.prefix)
    }
}

/// An ingress rule's protocol (EC2's `IpProtocol`: `tcp`, `udp`, `icmp`, or `-1`/`all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    All,
}

impl Protocol {
    pub fn parse(s: &str) -> Result<Protocol, NetError> {
        match s {
            "tcp" | "6" => Ok(Protocol::Tcp),
            "udp" | "17" => Ok(Protocol::Udp),
            "icmp" | "1" => Ok(Protocol::Icmp),
            "all" | "-1" => Ok(Protocol::All),
            _ => Err(NetError::BadProtocol),
        }
    }

    /// The stored name (and the net card's rule spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::All => "all",
        }
    }

    /// EC2's `IpProtocol` value.
    pub fn ec2_name(self) -> &'static str {
        match self {
            Protocol::All => "-1",
            p => p.as_str(),
        }
    }

    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

/// A port range `from..=to` (both 1..=65535, `from <= to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub from: u16,
    pub to: u16,
}

impl PortRange {
    pub fn new(from: u16, to: u16) -> Result<PortRange, NetError> {
        if from == 0 || from > to {
            return Err(NetError::BadPorts);
        }
        Ok(PortRange { from, to })
    }

    /// `7000` or `7000-7100`.
    pub fn parse(s: &str) -> Result<PortRange, NetError> {
        let num = |p: &str| -> Result<u16, NetError> {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(NetError::BadPorts);
            }
            p.parse().map_err(|_| NetError::BadPorts)
        };
        match s.split_once('-') {
            Some((a, b)) => PortRange::new(num(a)?, num(b)?),
            None => {
                let p = num(s)?;
                PortRange::new(p, p)
            }
        }
    }
}

/// One ingress rule: traffic of `protocol` (to `ports`, for tcp/udp) from `source` is let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IngressRule {
    pub protocol: Protocol,
    /// `Some` exactly for tcp and udp.
    pub ports: Option<PortRange>,
    pub source: CidrKey,
}

/// A [`Cidr`] ordered by (address, prefix), for rule sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrKey(pub u32, pub u8);

impl From<Cidr> for CidrKey {
    fn from(c: Cidr) -> CidrKey {
        CidrKey(c.addr, c.prefix)
    }
}

impl CidrKey {
    pub fn cidr(self) -> Cidr {
        Cidr {
            addr: self.0,
            prefix: self.1,
        }
    }
}

impl IngressRule {
    pub fn new(
        protocol: Protocol,
        ports: Option<PortRange>,
        source: Cidr,
    ) -> Result<IngressRule, NetError> {
        match (protocol.has_ports(), ports) {
            (true, Some(_)) | (false, None) => Ok(IngressRule {
                protocol,
                ports,
                source: source.into(),
            }),
            _ => Err(NetError::BadPorts),
        }
    }

    /// The net card's `--allow` spelling: `tcp:7000:10.0.0.0/16`, `udp:53-54:…`, `icmp:…`,
    /// `all:…` (crates/netcard `IngressRule::parse_text`).
    pub fn card_text(&self) -> String {
        let src = self.source.cidr();
        match self.ports {
            Some(p) if p.from == p.to => format!("{}:{}:{src}", self.protocol.as_str(), p.from),
            Some(p) => format!("{}:{}-{}:{src}", self.protocol.as_str(), p.from, p.to),
            None => format!("{}:{src}", self.protocol.as_str()),
        }
    }

    /// EC2's `IpPermissions` entry.
    pub fn ec2_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "IpProtocol": self.protocol.ec2_name(),
            "IpRanges": [{ "CidrIp": self.source.cidr().to_string() }],
        });
        if let (Some(p), Some(o)) = (self.ports, v.as_object_mut()) {
            o.insert("FromPort".into(), p.from.into());
            o.insert("ToPort".into(), p.to.into());
        }
        v
    }
}

/// A locally administered unicast MAC (`02:42:…`), derived one-to-one from the card id. The
/// `02:00:…` range is the cards' own (their gateway answers as `02:00:00:00:00:01`), so no
/// instance can ever be given the gateway's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub fn for_card(card_id: u32) -> Mac {
        let b = card_id.to_be_bytes();
        Mac([0x02, 0x42, b[0], b[1], b[2], b[3]])
    }

    pub fn parse(s: &str) -> Result<Mac, NetError> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut out {
            let p = parts.next().ok_or(NetError::BadMac)?;
            if p.len() != 2 {
                return Err(NetError::BadMac);
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| NetError::BadMac)?;
        }
        if parts.next().is_some() {
            return Err(NetError::BadMac);
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A tenant's VPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcRow {
    pub vpc_id: String,
    pub tenant_id: String,
    pub cidr: Cidr,
    /// The VPC's number on the wire (the net card's `--vpc`, the KMS key id's), unique.
    pub vpc_number: u32,
    /// The VPC's current key epoch (1 at creation).
    pub epoch: u32,
    pub is_default: bool,
    pub created: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetRow {
    pub subnet_id: String,
    pub tenant_id: String,
    pub vpc_id: String,
    pub cidr: Cidr,
    pub is_default: bool,
    pub created: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityGroupRow {
    pub group_id: String,
    pub tenant_id: String,
    pub vpc_id: String,
    pub group_name: String,
    pub description: String,
    pub is_default: bool,
    /// Ingress rules, in order (egress is open).
    pub ingress: Vec<IngressRule>,
    pub created: u64,
}

/// An instance's network interface: its address in the subnet, MAC, card id, groups, and the
/// card's UDP endpoint once the host launched it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceRow {
    pub instance_id: String,
    pub tenant_id: String,
    pub vpc_id: String,
    pub subnet_id: String,
    pub ip: Ipv4,
    pub mac: Mac,
    pub card_id: u32,
    pub groups: Vec<String>,
    /// `HOSTIP:PORT` of the instance's net card (set by the Network step).
    pub endpoint: Option<String>,
}

/// The lowest address of `subnet` that is usable and not in `taken`.
pub fn first_free(subnet: Cidr, taken: &[Ipv4]) -> Option<Ipv4> {
    subnet.usable().map(Ipv4).find(|ip| !taken.contains(ip))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cidr_blocks_are_checked() {
        let c = Cidr::parse_block("10.0.0.0/16").unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/16");
        assert_eq!(Cidr::parse_block("10.0.0.1/16"), Err(NetError::HostBits));
        assert_eq!(
            Cidr::parse_block("10.0.0.0/8"),
            Err(NetError::PrefixOutOfRange)
        );
        assert_eq!(
            Cidr::parse_block("10.0.0.0/29"),
            Err(NetError::PrefixOutOfRange)
        );
        for bad in [
            "",
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0/16",
            "10.0.0.0/+1",
            "a/16",
            "10.0.0.0/016x",
            "10.0.0.0/16/1",
            "300.0.0.0/16",
        ] {
            assert!(Cidr::parse_block(bad).is_err(), "{bad}");
        }
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().mask(), 0);
        assert!(Cidr::parse("10.0.0.5/32").is_ok());
    }

    #[test]
    fn containment_overlap_and_reserved_addresses() {
        let vpc = Cidr::parse("10.0.0.0/16").unwrap();
        let a = Cidr::parse("10.0.1.0/24").unwrap();
        let b = Cidr::parse("10.0.1.128/25").unwrap();
        let c = Cidr::parse("10.0.2.0/24").unwrap();
        assert!(vpc.contains(a) && vpc.contains(c) && !a.contains(vpc));
        assert!(a.overlaps(b) && b.overlaps(a) && !a.overlaps(c));
        assert!(!vpc.contains(Cidr::parse("10.1.0.0/24").unwrap()));
        assert_eq!(a.gateway().to_string(), "10.0.1.1");
        assert_eq!(
            (Ipv4(*a.usable().start()), Ipv4(*a.usable().end())),
            (
                Ipv4::parse("10.0.1.4").unwrap(),
                Ipv4::parse("10.0.1.254").unwrap()
            )
        );
        // A /28 has 16 addresses, 11 of them usable.
        let small = Cidr::parse_block("10.0.3.0/28").unwrap();
        assert_eq!(small.usable().count(), 11);
        let taken: Vec<Ipv4> = small.usable().map(Ipv4).collect();
        assert_eq!(first_free(small, &taken), None);
        assert_eq!(
            first_free(small, &taken[1..]),
            Some(Ipv4::parse("10.0.3.4").unwrap())
        );
    }

    #[test]
    fn rules_have_ports_exactly_for_tcp_and_udp_and_render_for_the_card() {
        let src = Cidr::parse("10.0.0.0/16").unwrap();
        let r =
            IngressRule::new(Protocol::Tcp, Some(PortRange::parse("7000").unwrap()), src).unwrap();
        assert_eq!(r.card_text(), "tcp:7000:10.0.0.0/16");
        let r =
            IngressRule::new(Protocol::Udp, Some(PortRange::parse("53-54").unwrap()), src).unwrap();
        assert_eq!(r.card_text(), "udp:53-54:10.0.0.0/16");
        assert_eq!(
            IngressRule::new(Protocol::Icmp, None, src)
                .unwrap()
                .card_text(),
            "icmp:10.0.0.0/16"
        );
        assert!(IngressRule::new(Protocol::Tcp, None, src).is_err());
        assert!(
            IngressRule::new(Protocol::Icmp, Some(PortRange::new(1, 1).unwrap()), src).is_err()
        );
        assert_eq!(PortRange::parse("0"), Err(NetError::BadPorts));
        assert_eq!(PortRange::parse("9-8"), Err(NetError::BadPorts));
        assert_eq!(PortRange::parse("70000"), Err(NetError::BadPorts));
        assert_eq!(PortRange::parse("-1"), Err(NetError::BadPorts));
        assert_eq!(Protocol::parse("-1"), Ok(Protocol::All));
        assert_eq!(Protocol::parse("sctp"), Err(NetError::BadProtocol));
    }

    #[test]
    fn macs_are_local_unicast_and_one_per_card() {
        let m = Mac::for_card(0x0102_0304);
        assert_eq!(m.to_string(), "02:42:01:02:03:04");
        assert_eq!(Mac::parse(&m.to_string()), Ok(m));
        assert_ne!(Mac::for_card(1), Mac::for_card(2));
        // The net card's gateway MAC is never an instance's.
        let gateway = Mac::parse("02:00:00:00:00:01").unwrap();
        for id in [0, 1, 2, u32::MAX] {
            assert_ne!(Mac::for_card(id), gateway);
        }
        assert_eq!(m.0[0] & 0x03, 0x02, "locally administered, unicast");
        assert!(Mac::parse("02:00:01:02:03").is_err());
        assert!(Mac::parse("02:00:01:02:03:04:05").is_err());
        assert!(Mac::parse("02:00:01:02:03:zz").is_err());
    }
}
