//! Explicit, intentional bit-field splits (the only truncating casts in the crate).

/// Low 32 bits of `v`.
#[allow(clippy::cast_possible_truncation)]
pub const fn lo32(v: u64) -> u32 {
    v as u32
}

/// High 32 bits of `v`.
#[allow(clippy::cast_possible_truncation)]
pub const fn hi32(v: u64) -> u32 {
    (v >> 32) as u32
}
