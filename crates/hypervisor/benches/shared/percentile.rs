//! The one percentile the hypervisor benches report (`card_update`, `live_update`).

/// The `p`th percentile (`p` in 0..=100) by nearest rank: the value at rank
/// `ceil(p * n / 100)` (at least 1) of the sorted values, so of 20 values p50 is the 10th and
/// p99 the 20th (the largest). NaN for no values.
pub fn pct(v: &[f64], p: usize) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let r = (p.min(100) * v.len()).div_ceil(100).max(1);
    v.get(r - 1).copied().unwrap_or(f64::NAN)
}
