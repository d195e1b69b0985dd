//! Atomic counters. The data path only increments them; the controller pulls them over the
//! control socket (`GetMetrics`).

use crate::request::BlkParseError;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($($field:ident),* $(,)?) => {
        /// Card counters.
        #[derive(Debug, Default)]
        pub struct BlkMetrics {
            $(pub $field: AtomicU64,)*
        }

        impl BlkMetrics {
            /// `(name, value)` pairs in a fixed order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

metrics!(
    reads,
    writes,
    flushes,
    discards,
    write_zeroes,
    get_ids,
    read_bytes,
    write_bytes,
    io_errors,
    rejected_chain_too_long,
    rejected_chain_too_short,
    rejected_outside_memory,
    rejected_wrong_direction,
    rejected_short_header,
    rejected_empty_status,
    rejected_unknown_type,
    rejected_past_end,
    rejected_too_large,
    rejected_unaligned,
    rejected_overlap,
    rejected_bad_data,
    rejected_read_only,
    rejected_no_status,
    rejected_after_detach,
    nbd_connection_losses,
    nbd_reconnects,
    nbd_resent,
    nbd_reply_errors,
    nbd_protocol_errors,
    nbd_failed_requests,
    nbd_unavailable,
    nbd_fenced,
    nbd_inflight_peak,
    inflight_peak,
);

impl BlkMetrics {
    /// Adds one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a rejected chain under its reason.
    pub fn count_reject(&self, e: &BlkParseError, had_status: bool) {
        let c = match e {
            BlkParseError::ChainTooLong => &self.rejected_chain_too_long,
            BlkParseError::ChainTooShort(_) => &self.rejected_chain_too_short,
            BlkParseError::OutsideMemory => &self.rejected_outside_memory,
            BlkParseError::WrongDirection => &self.rejected_wrong_direction,
            BlkParseError::ShortHeader { .. } => &self.rejected_short_header,
            BlkParseError::EmptyStatus => &self.rejected_empty_status,
            BlkParseError::UnknownType(_) => &self.rejected_unknown_type,
            BlkParseError::PastEnd => &self.rejected_past_end,
            BlkParseError::TooLarge => &self.rejected_too_large,
            BlkParseError::Unaligned => &self.rejected_unaligned,
            BlkParseError::Overlap => &self.rejected_overlap,
            BlkParseError::BadData => &self.rejected_bad_data,
            BlkParseError::ReadOnly => &self.rejected_read_only,
        };
        Self::inc(c);
        if !had_status {
            Self::inc(&self.rejected_no_status);
        }
    }
}
