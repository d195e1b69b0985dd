//! `bulkhead-controller`: the host's only management door (the Nitro Controller's role).
//!
//! - [`api`]: the route table and the one parser of the HTTP boundary.
//! - [`attest`]: the link to the host's attestation agent (quotes relayed, never made here).
//! - [`controller`]: parse → token check → host policy re-check → quota → durable audit → act.
//! - [`server`]: TLS 1.3 mutual-TLS listener (rustls + aws-lc-rs).
//! - [`backend`]: `InstanceBackend` / `VolumeBackend` traits and `DetachedBackend` (the explicit
//!   no-guest fallback); [`host`]: `HostBackend`, the real one (hypervisor and block-card
//!   processes); [`launcher`]: the pre-sandbox process that starts them; [`card_control`]: the
//!   block card's control messages.
//! - [`cores`]: whole-core isolation (host topology from sysfs, reserved host cores, whole cores
//!   per instance, the host processes confined to the host cores).
//! - [`record`]: the host's durable, versioned record of its instances and attachments, which a
//!   restarted controller adopts them from.
//! - [`deploy`]: DeployRelease: content-addressed artefact uploads, a signed release verified
//!   with rot's checker, installed per version, self-tested, applied by hypervisor live update
//!   (rolled back on failure), recorded as the host's active release.
//! - [`durable`]: the one durable small-file write (temporary file, fsync, rename, fsync of
//!   the directory).
//! - [`monitor`]: alert rules over the audit stream; [`metrics`]: Prometheus text.
//! - [`sandbox`]: no_new_privs, non-dumpable, seccomp blocking outbound connections.
//! - [`openapi`]: the OpenAPI document generated from the route table.

pub mod api;
pub mod attest;
pub mod backend;
pub mod card_control;
pub mod config;
pub mod controller;
pub mod cores;
pub mod deploy;
pub mod durable;
pub mod host;
pub mod launcher;
pub mod metrics;
pub mod monitor;
pub mod openapi;
pub mod record;
pub mod sandbox;
pub mod server;
pub mod supervisor;
