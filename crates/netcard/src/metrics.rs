//! The card's counters (flow records: numbers only, never addresses or payloads), printed as
//! one JSON object on SIGUSR1 and at exit.

use crate::encap::DropReason;
use crate::responder::GuestDrop;
use std::sync::atomic::{AtomicU64, Ordering};

/// Atomic counters shared by the card's threads.
#[derive(Debug, Default)]
pub struct Counters {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub dropped_secgroup_out: AtomicU64,
    pub dropped_secgroup_in: AtomicU64,
    pub conntrack_full: AtomicU64,
    pub spoofed: AtomicU64,
    pub malformed: AtomicU64,
    pub unsupported: AtomicU64,
    pub no_route: AtomicU64,
    pub arp_replies: AtomicU64,
    pub dhcp_replies: AtomicU64,
    pub replayed: AtomicU64,
    pub too_old: AtomicU64,
    pub forged: AtomicU64,
    pub truncated: AtomicU64,
    pub wrong_vpc: AtomicU64,
    pub bad_header: AtomicU64,
    pub unknown_sender: AtomicU64,
    pub unknown_epoch: AtomicU64,
    pub forged_source: AtomicU64,
    pub unknown_destination: AtomicU64,
    pub peer_spoofed: AtomicU64,
    pub no_key: AtomicU64,
    pub key_installs: AtomicU64,
    pub key_retires: AtomicU64,
    pub key_switches: AtomicU64,
    pub misdelivered: AtomicU64,
    pub io_errors: AtomicU64,
    pub route_updates: AtomicU64,
    pub rule_updates: AtomicU64,
    pub tx_bad_chain: AtomicU64,
    pub tx_oversized: AtomicU64,
    pub tx_short_header: AtomicU64,
    pub tx_bad_header: AtomicU64,
    pub rx_queued: AtomicU64,
    pub rx_no_buffer: AtomicU64,
    pub rx_buffer_too_small: AtomicU64,
    pub rx_bad_chain: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub fn guest_drop(&self, d: GuestDrop) {
        inc(match d {
            GuestDrop::Malformed => &self.malformed,
            GuestDrop::Spoofed => &self.spoofed,
            GuestDrop::Unsupported => &self.unsupported,
            GuestDrop::NoRoute => &self.no_route,
        });
    }

    pub fn tunnel_drop(&self, d: DropReason) {
        inc(match d {
            DropReason::Replayed => &self.replayed,
            DropReason::TooOld => &self.too_old,
            DropReason::Forged => &self.forged,
            DropReason::Truncated => &self.truncated,
            DropReason::WrongVpc => &self.wrong_vpc,
            DropReason::UnknownSender => &self.unknown_sender,
            DropReason::UnknownEpoch => &self.unknown_epoch,
            DropReason::Oversized
            | DropReason::BadVersion
            | DropReason::BadKind
            | DropReason::Reserved
            | DropReason::ZeroSequence => &self.bad_header,
        });
    }

    pub fn add(c: &AtomicU64, bytes: usize) {
        c.fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// One JSON object with every counter.
    pub fn to_json(&self) -> String {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "tx_packets": v(&self.tx_packets),
            "tx_bytes": v(&self.tx_bytes),
            "rx_packets": v(&self.rx_packets),
            "rx_bytes": v(&self.rx_bytes),
            "dropped_secgroup_out": v(&self.dropped_secgroup_out),
            "dropped_secgroup_in": v(&self.dropped_secgroup_in),
            "conntrack_full": v(&self.conntrack_full),
            "spoofed": v(&self.spoofed),
            "malformed": v(&self.malformed),
            "unsupported": v(&self.unsupported),
            "no_route": v(&self.no_route),
            "arp_replies": v(&self.arp_replies),
            "dhcp_replies": v(&self.dhcp_replies),
            "replayed": v(&self.replayed),
            "too_old": v(&self.too_old),
            "forged": v(&self.forged),
            "truncated": v(&self.truncated),
            "wrong_vpc": v(&self.wrong_vpc),
            "bad_header": v(&self.bad_header),
            "unknown_sender": v(&self.unknown_sender),
            "unknown_epoch": v(&self.unknown_epoch),
            "forged_source": v(&self.forged_source),
            "unknown_destination": v(&self.unknown_destination),
            "peer_spoofed": v(&self.peer_spoofed),
            "no_key": v(&self.no_key),
            "key_installs": v(&self.key_installs),
            "key_retires": v(&self.key_retires),
            "key_switches": v(&self.key_switches),
            "misdelivered": v(&self.misdelivered),
            "io_errors": v(&self.io_errors),
            "route_updates": v(&self.route_updates),
            "rule_updates": v(&self.rule_updates),
            "tx_bad_chain": v(&self.tx_bad_chain),
            "tx_oversized": v(&self.tx_oversized),
            "tx_short_header": v(&self.tx_short_header),
            "tx_bad_header": v(&self.tx_bad_header),
            "rx_queued": v(&self.rx_queued),
            "rx_no_buffer": v(&self.rx_no_buffer),
            "rx_buffer_too_small": v(&self.rx_buffer_too_small),
            "rx_bad_chain": v(&self.rx_bad_chain),
            "seccomp_traps": bulkhead_harden::trapped_syscalls(),
        })
        .to_string()
    }
}
