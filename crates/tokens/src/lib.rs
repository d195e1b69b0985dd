//! `bulkhead-tokens`: the token service and everything a controller needs to re-check its work.
//!
//! - [`ops`]: the closed set of operations, the operator and customer planes, caller roles.
//! - [`policy`]: the parser for the reviewed rights policy (`policy/rights.toml`).
//! - [`token`]: Biscuit token minting (only what the policy grants) and verification
//!   (signature, revocation, expiry, audience, certificate binding, operation, resource).
//! - [`quota`]: sliding-window quotas the controller enforces locally.
//! - [`pki`]: the Bulkhead CA (certificates carry name in CN and role in OU).
//! - [`statedir`]: the on-disk layout shared by the controller and the `bulkhead` CLI.

pub mod clock;
pub mod ops;
#[cfg(feature = "rustls")]
pub mod pinned;
pub mod pki;
pub mod policy;
pub mod quota;
pub mod statedir;
pub mod token;
pub mod wire;

pub use ops::{Operation, Plane, ResourcePattern, Role};
pub use pki::Identity;
pub use policy::Policy;
pub use token::{
    Claims, MintError, MintRequest, RevocationList, TokenError, TokenService, Verifier,
};
