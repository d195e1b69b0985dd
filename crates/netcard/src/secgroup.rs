//! Stateful security groups: ingress rules by protocol, port range and source CIDR; all egress
//! allowed and tracked, so replies to the guest's own outbound flows pass; a conntrack table
//! with a hard bound on entries (a full table refuses new flows rather than growing).

use crate::frame::{IcmpMessage, Ipv4Packet, Transport};
use crate::{NetcardError, Result};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// An IPv4 CIDR block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse_text(s: &str) -> Result<Self> {
        let bad = |why| NetcardError::Config {
            what: "CIDR",
            value: s.to_owned(),
            why,
        };
        let (a, p) = s.split_once('/').ok_or_else(|| bad("no /prefix"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = p.parse().map_err(|_| bad("prefix is not a number"))?;
        if prefix > 32 {
            return Err(bad("prefix above 32"));
        }
        Ok(Cidr { addr, prefix })
    }

    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(ip) & self.mask()) == (u32::from(self.addr) & self.mask())
    }
}

/// The protocol of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleProtocol {
    Tcp,
    Udp,
    Icmp,
    All,
}

/// One ingress rule: traffic of `protocol` to a port in `ports` (TCP/UDP) from `source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressRule {
    pub protocol: RuleProtocol,
    pub ports: std::ops::RangeInclusive<u16>,
    pub source: Cidr,
}

impl IngressRule {
    /// Parses `tcp:7000:10.0.0.0/16`, `udp:5000-5010:0.0.0.0/0`, `icmp:10.0.1.0/24` or
    /// `all:10.0.0.0/8`.
    pub fn parse_text(s: &str) -> Result<Self> {
        let bad = |why| NetcardError::Config {
            what: "ingress rule",
            value: s.to_owned(),
            why,
        };
        let parts: Vec<&str> = s.split(':').collect();
        let (protocol, ports, cidr) = match parts.as_slice() {
            ["tcp", p, c] => (RuleProtocol::Tcp, Some(*p), *c),
            ["udp", p, c] => (RuleProtocol::Udp, Some(*p), *c),
            ["icmp", c] => (RuleProtocol::Icmp, None, *c),
            ["all", c] => (RuleProtocol::All, None, *c),
            _ => return Err(bad("want tcp|udp:PORT[-PORT]:CIDR or icmp|all:CIDR")),
        };
        let ports = match ports {
            None => 0..=u16::MAX,
            Some(p) => {
                let (lo, hi) = p.split_once('-').unwrap_or((p, p));
                let lo: u16 = lo.parse().map_err(|_| bad("port is not a number"))?;
                let hi: u16 = hi.parse().map_err(|_| bad("port is not a number"))?;
                if lo > hi {
                    return Err(bad("port range is empty"));
                }
                lo..=hi
            }
        };
        Ok(IngressRule {
            protocol,
            ports,
            source: Cidr::parse_text(cidr)?,
        })
    }

    fn allows(&self, src: Ipv4Addr, t: &Transport<'_>) -> bool {
        if !self.source.contains(src) {
            return false;
        }
        match (self.protocol, t) {
            (RuleProtocol::All, _) => true,
            (RuleProtocol::Tcp, Transport::Tcp(s)) => self.ports.contains(&s.dst_port),
            (RuleProtocol::Udp, Transport::Udp(u)) => self.ports.contains(&u.dst_port),
            (RuleProtocol::Icmp, Transport::Icmp(_)) => true,
            _ => false,
        }
    }
}

/// A flow as seen from the guest: (protocol, guest address/port, remote address/port). ICMP
/// echo uses the identifier as the guest "port" and 0 as the remote one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub protocol: u8,
    pub local: (Ipv4Addr, u16),
    pub remote: (Ipv4Addr, u16),
}

/// Why a packet was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No rule admits it and it is no reply to a tracked flow.
    NoRule,
    /// The conntrack table is full of live flows.
    TableFull,
}

/// Security groups plus their conntrack table.
#[derive(Debug)]
pub struct Firewall {
    rules: Vec<IngressRule>,
    flows: HashMap<FlowKey, Instant>,
    max_flows: usize,
    idle: Duration,
}

fn key_of(ip: &Ipv4Packet<'_>, t: &Transport<'_>, outbound: bool) -> Option<FlowKey> {
    let (src_port, dst_port) = match t {
        Transport::Tcp(s) => (s.src_port, s.dst_port),
        Transport::Udp(u) => (u.src_port, u.dst_port),
        Transport::Icmp(IcmpMessage {
            echo_id: Some(id), ..
        }) => (*id, 0),
        _ => return None,
    };
    Some(if outbound {
        FlowKey {
            protocol: ip.protocol,
            local: (ip.src, src_port),
            remote: (ip.dst, dst_port),
        }
    } else if matches!(t, Transport::Icmp(_)) {
        FlowKey {
            protocol: ip.protocol,
            local: (ip.dst, src_port),
            remote: (ip.src, 0),
        }
    } else {
        FlowKey {
            protocol: ip.protocol,
            local: (ip.dst, dst_port),
            remote: (ip.src, src_port),
        }
    })
}

impl Firewall {
    pub fn new(rules: Vec<IngressRule>, max_flows: usize, idle: Duration) -> Self {
        Firewall {
            rules,
            flows: HashMap::new(),
            max_flows,
            idle,
        }
    }

    /// Replaces the ingress rules; tracked flows stay (a reply to a flow the guest opened
    /// still passes, and an admitted inbound flow keeps its entry until it idles out).
    pub fn set_rules(&mut self, rules: Vec<IngressRule>) {
        self.rules = rules;
    }

    pub fn tracked(&self) -> usize {
        self.flows.len()
    }

    fn track(&mut self, key: FlowKey, now: Instant) -> Result<(), Refusal> {
        if let Some(t) = self.flows.get_mut(&key) {
            *t = now;
            return Ok(());
        }
        if self.flows.len() >= self.max_flows {
            let idle = self.idle;
            self.flows.retain(|_, t| now.duration_since(*t) < idle);
            if self.flows.len() >= self.max_flows {
                return Err(Refusal::TableFull);
            }
        }
        self.flows.insert(key, now);
        Ok(())
    }

    /// A packet from the guest: egress is open; the flow is tracked so its replies pass.
    pub fn outbound(
        &mut self,
        ip: &Ipv4Packet<'_>,
        t: &Transport<'_>,
        now: Instant,
    ) -> Result<(), Refusal> {
        match key_of(ip, t, true) {
            // Echo replies the guest sends answer an inbound request; nothing to track.
            Some(_)
                if matches!(
                    t,
                    Transport::Icmp(IcmpMessage {
                        ty: IcmpMessage::ECHO_REPLY,
                        ..
                    })
                ) =>
            {
                Ok(())
            }
            Some(k) => self.track(k, now),
            None => Ok(()),
        }
    }

    /// A packet for the guest: passes if it replies to a tracked flow or a rule admits it (then
    /// its flow is tracked too, so the guest's answers keep the entry alive).
    pub fn inbound(
        &mut self,
        ip: &Ipv4Packet<'_>,
        t: &Transport<'_>,
        now: Instant,
    ) -> Result<(), Refusal> {
        let key = key_of(ip, t, false);
        let is_echo_reply = matches!(
            t,
            Transport::Icmp(IcmpMessage {
                ty: IcmpMessage::ECHO_REPLY,
                ..
            })
        );
        if let Some(k) = key {
            let live = self
                .flows
                .get(&k)
                .is_some_and(|seen| now.duration_since(*seen) < self.idle);
            if live && (is_echo_reply || !matches!(t, Transport::Icmp(_))) {
                self.flows.insert(k, now);
                return Ok(());
            }
        }
        if self.rules.iter().any(|r| r.allows(ip.src, t)) {
            if let (Some(k), false) = (key, matches!(t, Transport::Icmp(_))) {
                self.track(k, now)?;
            }
            return Ok(());
        }
        Err(Refusal::NoRule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{IcmpMessage, TcpSegment, UdpDatagram, PROTO_ICMP, PROTO_TCP, PROTO_UDP};

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
    const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 11);
    const FAR: Ipv4Addr = Ipv4Addr::new(192, 168, 9, 9);

    fn ip(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8) -> Ipv4Packet<'static> {
        Ipv4Packet {
            src,
            dst,
            protocol,
            ttl: 64,
            header_len: 20,
            total_len: 40,
            payload: &[],
        }
    }
    fn tcp(s: u16, d: u16) -> Transport<'static> {
        Transport::Tcp(TcpSegment {
            src_port: s,
            dst_port: d,
            flags: TcpSegment::SYN,
        })
    }

    fn fw(rules: &[&str]) -> Firewall {
        Firewall::new(
            rules
                .iter()
                .map(|r| IngressRule::parse_text(r).expect("rule"))
                .collect(),
            4,
            Duration::from_secs(60),
        )
    }

    #[test]
    fn ingress_by_port_and_cidr() {
        let mut f = fw(&["tcp:7000:10.0.0.0/16"]);
        let now = Instant::now();
        assert_eq!(
            f.inbound(&ip(PEER, GUEST, PROTO_TCP), &tcp(5555, 7000), now),
            Ok(())
        );
        assert_eq!(
            f.inbound(&ip(PEER, GUEST, PROTO_TCP), &tcp(5555, 7001), now),
            Err(Refusal::NoRule)
        );
        assert_eq!(
            f.inbound(&ip(FAR, GUEST, PROTO_TCP), &tcp(5555, 7000), now),
            Err(Refusal::NoRule)
        );
        let udp = Transport::Udp(UdpDatagram {
            src_port: 1,
            dst_port: 7000,
            payload: &[],
        });
        assert_eq!(
            f.inbound(&ip(PEER, GUEST, PROTO_UDP), &udp, now),
            Err(Refusal::NoRule)
        );
    }

    #[test]
    fn replies_to_outbound_flows_pass_and_expire() {
        let mut f = fw(&[]);
        let now = Instant::now();
        f.outbound(&ip(GUEST, PEER, PROTO_TCP), &tcp(40000, 80), now)
            .expect("egress open");
        assert_eq!(
            f.inbound(&ip(PEER, GUEST, PROTO_TCP), &tcp(80, 40000), now),
            Ok(())
        );
        // Another source port of the peer is not a reply.
        assert_eq!(
            f.inbound(&ip(PEER, GUEST, PROTO_TCP), &tcp(81, 40000), now),
            Err(Refusal::NoRule)
        );
        let later = now + Duration::from_secs(61);
        assert_eq!(
            f.inbound(&ip(PEER, GUEST, PROTO_TCP), &tcp(80, 40000), later),
            Err(Refusal::NoRule)
        );
    }

    #[test]
    fn echo_reply_passes_only_for_our_request() {
        let mut f = fw(&[]);
        let now = Instant::now();
        let req = Transport::Icmp(IcmpMessage {
            ty: IcmpMessage::ECHO_REQUEST,
            code: 0,
            echo_id: Some(9),
        });
        let rep = |id| {
            Transport::Icmp(IcmpMessage {
                ty: IcmpMessage::ECHO_REPLY,
                code: 0,
                echo_id: Some(id),
            })
        };
        assert_eq!(
            f.inbound(&ip(PEER, GUEST, PROTO_ICMP), &rep(9), now),
            Err(Refusal::NoRule)
        );
        f.outbound(&ip(GUEST, PEER, PROTO_ICMP), &req, now)
            .expect("out");
        assert_eq!(
            f.inbound(&ip(PEER, GUEST, PROTO_ICMP), &rep(9), now),
            Ok(())
        );
        assert_eq!(
            f.inbound(&ip(PEER, GUEST, PROTO_ICMP), &rep(10), now),
            Err(Refusal::NoRule)
        );
        // An inbound echo request needs a rule.
        assert_eq!(
            f.inbound(&ip(PEER, GUEST, PROTO_ICMP), &req, now),
            Err(Refusal::NoRule)
        );
        let mut g = fw(&["icmp:10.0.1.0/24"]);
        assert_eq!(g.inbound(&ip(PEER, GUEST, PROTO_ICMP), &req, now), Ok(()));
    }

    #[test]
    fn table_is_bounded() {
        let mut f = fw(&[]);
        let now = Instant::now();
        for p in 0..4 {
            f.outbound(&ip(GUEST, PEER, PROTO_TCP), &tcp(1000 + p, 80), now)
                .expect("room");
        }
        assert_eq!(
            f.outbound(&ip(GUEST, PEER, PROTO_TCP), &tcp(2000, 80), now),
            Err(Refusal::TableFull)
        );
        assert_eq!(f.tracked(), 4);
        // Idle entries make room.
        let later = now + Duration::from_secs(61);
        f.outbound(&ip(GUEST, PEER, PROTO_TCP), &tcp(2000, 80), later)
            .expect("expired entries evicted");
        assert_eq!(f.tracked(), 1);
    }

    #[test]
    fn rule_and_cidr_text() {
        assert!(IngressRule::parse_text("tcp:7000-6000:0.0.0.0/0").is_err());
        assert!(IngressRule::parse_text("sctp:1:0.0.0.0/0").is_err());
        assert!(Cidr::parse_text("10.0.0.0/33").is_err());
        let all = Cidr::parse_text("0.0.0.0/0").expect("ok");
        assert!(all.contains(FAR));
        let r = IngressRule::parse_text("udp:5000-5010:10.0.0.0/8").expect("ok");
        assert_eq!(r.ports, 5000..=5010);
    }
}
