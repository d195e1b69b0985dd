//! The token service's request body: the one parser of `POST /v1/Mint`, here so that the
//! service, its tests and the fuzzer share it without the service's network stack.

use std::time::Duration;

use serde::Deserialize;

use crate::{Identity, MintRequest, Operation, ResourcePattern};

/// Most hosts, operations or resources in one request.
pub const MAX_ITEMS: usize = 64;

/// The mint request as it arrives (parsed strictly; unknown fields refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MintBody {
    pub hosts: Vec<String>,
    pub operations: Vec<String>,
    #[serde(default)]
    pub resources: Option<Vec<String>>,
    pub ttl_secs: u64,
}

/// Why a body is not a mint request. Codes are stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintParseError {
    #[error("not a mint request: {0}")]
    BadBody(String),
    #[error("unknown operation {0}")]
    UnknownOperation(String),
    #[error("bad resource pattern {0}")]
    BadResource(String),
}

impl MintParseError {
    pub fn code(&self) -> &'static str {
        match self {
            MintParseError::BadBody(_) => "bad_request",
            MintParseError::UnknownOperation(_) => "unknown_operation",
            MintParseError::BadResource(_) => "bad_resource",
        }
    }
}

/// Parses a body into a [`MintRequest`] for `caller` (the identity its certificate names; a
/// caller named in the body is an unknown field, refused).
pub fn parse_mint(caller: &Identity, body: &[u8]) -> Result<MintRequest, MintParseError> {
    let b: MintBody =
        serde_json::from_slice(body).map_err(|e| MintParseError::BadBody(e.to_string()))?;
    if b.hosts.len() > MAX_ITEMS
        || b.operations.len() > MAX_ITEMS
        || b.resources.as_ref().is_some_and(|r| r.len() > MAX_ITEMS)
    {
        return Err(MintParseError::BadBody("too many items".into()));
    }
    let operations = b
        .operations
        .iter()
        .map(|o| Operation::from_name(o).ok_or_else(|| MintParseError::UnknownOperation(o.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let resources = match b.resources {
        None => None,
        Some(rs) => Some(
            rs.iter()
                .map(|r| {
                    ResourcePattern::parse(r).map_err(|_| MintParseError::BadResource(r.clone()))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(MintRequest {
        caller: caller.clone(),
        hosts: b.hosts,
        operations,
        resources,
        ttl: Duration::from_secs(b.ttl_secs),
    })
}
