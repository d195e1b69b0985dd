//! The sealed host's PID 1, as a library: the per-host configuration disk (the one typed parser
//! of the only per-host input), the hardening sysctls, and the TPM command that measures the
//! configuration into PCR 23. `src/main.rs` (`bulkhead-init`) does the system calls.
//!
//! The image (kernel, initramfs, command line) is the same bytes on every host, so it measures
//! to the same PCR 4/9/11 everywhere; what makes a host *this* host (its name, address and mTLS
//! identity) comes from a second drive, the configuration disk, which `bulkhead-init` reads
//! raw (no filesystem), parses with [`config::parse_disk`] and measures into PCR 23.

pub mod config;
pub mod sysctl;
pub mod tpm;
