//! `bulkhead-devcluster`: a whole Bulkhead cluster on one machine, for development, tests,
//! benchmarks and the quickstart — never a production path. [`cluster::start`] provisions a CA,
//! the KMS, the token service, N host controllers (each in its own network namespace and with
//! its own swtpm and signed release when the machine allows, see [`netns`]) and the control
//! plane (or several replicas on PostgreSQL), each a separate process of the real binaries.
//! With [`cluster::ReplicaOptions::sealed`] each host is instead the sealed host image booted
//! under QEMU with OVMF and its own swtpm ([`sealed`]), attested by its whole boot chain.
//! It lives outside `bulkhead-control` so the service crate holds only the service.

pub mod cluster;
pub mod netns;
pub mod sealed;
