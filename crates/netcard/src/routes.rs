//! The VPC routing table of one card: which peer card (and at which host UDP address) owns each
//! guest address of the VPC, pushed by the control plane (today: `--route` at start).
//!
//! * Guest → peer: the inner IPv4 destination picks the peer card and its host address. A
//!   destination that is in no entry is dropped and counted (`unknown_destination`); the card
//!   never floods, never falls back to a host bridge. Two cards on one host are two entries with
//!   the same host IP and different ports: same-host traffic takes the same sealed path.
//! * Peer → guest: a datagram is accepted only from the host address the table names for the
//!   sender card id in its header (the source is pinned before any crypto; a mismatch counts as
//!   `forged_source`), and the opened frame's IPv4 source must be an address the table gives to
//!   that same sender card (`peer_spoofed` otherwise), so a compromised peer card cannot speak
//!   for another instance of the VPC.

use crate::encap::CardId;
use crate::{NetcardError, Result};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};

/// Where a peer card is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub card: CardId,
    pub host: SocketAddr,
}

/// One VPC's routing table as seen from one card.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    by_ip: HashMap<Ipv4Addr, Route>,
    by_card: HashMap<CardId, SocketAddr>,
    /// Single-peer mode (`--peer`/`--peer-card-id`, the benchmark's point-to-point tunnel):
    /// every subnet destination goes to this card.
    default: Option<Route>,
}

fn bad(value: &str, why: &'static str) -> NetcardError {
    NetcardError::Config {
        what: "--route",
        value: value.to_owned(),
        why,
    }
}

impl RouteTable {
    /// An empty table for card `local`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `ip → card @ host`. Refuses the local card, a second entry for one IP and a card
    /// that would be at two host addresses (the pin must be unambiguous).
    pub fn add(&mut self, local: CardId, ip: Ipv4Addr, route: Route) -> Result<()> {
        let text = format!("{ip}={}@{}", route.card.0, route.host);
        if route.card == local {
            return Err(bad(&text, "a route to the card itself"));
        }
        if self.by_ip.contains_key(&ip) {
            return Err(bad(&text, "two routes for one guest address"));
        }
        match self.by_card.get(&route.card) {
            Some(h) if *h != route.host => {
                return Err(bad(&text, "one card at two host addresses"));
            }
            _ => {}
        }
        self.by_card.insert(route.card, route.host);
        self.by_ip.insert(ip, route);
        Ok(())
    }

    /// Parses and adds `IP=CARD@HOST:PORT`.
    pub fn add_text(&mut self, local: CardId, text: &str) -> Result<()> {
        let (ip, rest) = text
            .split_once('=')
            .ok_or(bad(text, "want IP=CARD@HOST:PORT"))?;
        let (card, host) = rest
            .split_once('@')
            .ok_or(bad(text, "want IP=CARD@HOST:PORT"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| bad(text, "bad guest IPv4 address"))?;
        let card: u32 = card.parse().map_err(|_| bad(text, "bad card id"))?;
        let host: SocketAddr = host.parse().map_err(|_| bad(text, "bad host address"))?;
        self.add(
            local,
            ip,
            Route {
                card: CardId(card),
                host,
            },
        )
    }

    /// Single-peer mode: every destination goes to `route`, and `route` may send any source.
    pub fn set_default(&mut self, local: CardId, route: Route) -> Result<()> {
        if route.card == local {
            return Err(bad(&route.card.0.to_string(), "a route to the card itself"));
        }
        if let Some(h) = self.by_card.get(&route.card) {
            if *h != route.host {
                return Err(bad(
                    &route.host.to_string(),
                    "one card at two host addresses",
                ));
            }
        }
        self.by_card.insert(route.card, route.host);
        self.default = Some(route);
        Ok(())
    }

    /// The single-peer default route, if set (`--peer`).
    pub fn default_route(&self) -> Option<Route> {
        self.default
    }

    /// The peer for an inner destination, if any.
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<Route> {
        self.by_ip.get(&dst).copied().or(self.default)
    }

    /// The pinned host address of a sender card.
    pub fn pinned(&self, card: CardId) -> Option<SocketAddr> {
        self.by_card.get(&card).copied()
    }

    /// Whether the sender card may use inner source `src`.
    pub fn owns(&self, card: CardId, src: Ipv4Addr) -> bool {
        match self.by_ip.get(&src) {
            Some(r) => r.card == card,
            None => self.default.is_some_and(|d| d.card == card),
        }
    }

    /// Every peer card (each needs its own direction keys).
    pub fn peers(&self) -> impl Iterator<Item = CardId> + '_ {
        self.by_card.keys().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.by_card.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_pin_and_ownership() {
        let me = CardId(1);
        let mut t = RouteTable::new();
        t.add_text(me, "10.0.1.12=2@192.168.1.1:4790")
            .expect("same host");
        t.add_text(me, "10.0.1.13=3@192.168.1.2:4789")
            .expect("other host");
        t.add_text(me, "10.0.1.14=3@192.168.1.2:4789")
            .expect("second ip, same card");
        assert_eq!(
            t.lookup("10.0.1.12".parse().expect("ip")).map(|r| r.card),
            Some(CardId(2))
        );
        assert_eq!(t.lookup("10.0.1.99".parse().expect("ip")), None);
        assert_eq!(
            t.pinned(CardId(3)),
            Some("192.168.1.2:4789".parse().expect("addr"))
        );
        assert_eq!(t.pinned(CardId(9)), None);
        assert!(t.owns(CardId(3), "10.0.1.14".parse().expect("ip")));
        assert!(!t.owns(CardId(2), "10.0.1.13".parse().expect("ip")));
        assert!(!t.owns(CardId(2), "10.0.1.99".parse().expect("ip")));
        let mut peers: Vec<u32> = t.peers().map(|c| c.0).collect();
        peers.sort_unstable();
        assert_eq!(peers, [2, 3]);
    }

    #[test]
    fn ambiguous_or_bad_entries_refused() {
        let me = CardId(1);
        let mut t = RouteTable::new();
        t.add_text(me, "10.0.1.12=2@192.168.1.1:4790").expect("ok");
        for bad in [
            "10.0.1.12=3@192.168.1.2:4789", // second route for one ip
            "10.0.1.13=2@192.168.1.9:4790", // card 2 at another host
            "10.0.1.14=1@192.168.1.1:4789", // itself
            "10.0.1.15=x@192.168.1.1:4789",
            "10.0.1.15=4@nowhere",
            "10.0.1.15",
            "300.0.1.15=4@192.168.1.1:1",
        ] {
            assert!(t.add_text(me, bad).is_err(), "{bad} accepted");
        }
    }
}
