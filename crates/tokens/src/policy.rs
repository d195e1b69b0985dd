//! `policy/rights.toml`: the reviewed rights policy. Groups of callers → operations → resource
//! sets, with quotas. Parsed once into a checked [`Policy`]; nothing else reads the file.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;

use crate::clock::parse_duration;
use crate::ops::{Operation, ResourcePattern, Role};

/// The policy file as written. Unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: u32,
    max_ttl: String,
    #[serde(rename = "group")]
    groups: Vec<RawGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: String,
    role: String,
    members: Vec<String>,
    hosts: Vec<String>,
    /// Longest token lifetime for this group (at most the policy's `max_ttl`).
    #[serde(default)]
    max_ttl: Option<String>,
    /// The fleet-wide right: tokens for audience `*` (every host). Off unless granted.
    #[serde(default)]
    fleet: bool,
    operations: Vec<String>,
    resources: Vec<String>,
    #[serde(default)]
    quotas: Vec<RawQuota>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    operation: String,
    max: u32,
    per: String,
}

/// At most `max` calls of `operation` per caller in any window of `per`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub operation: Operation,
    pub max: u32,
    pub per: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub role: Role,
    pub members: BTreeSet<String>,
    /// Host names, or `*` for any one host (each token still names its hosts).
    pub hosts: BTreeSet<String>,
    /// Longest lifetime (`expires - issued`) of a token minted through this group: the group's
    /// own `max_ttl`, or the policy's.
    pub max_ttl: Duration,
    /// Whether the group holds the fleet-wide right: tokens whose audience is `*`, valid on
    /// every host. Without it a token must name its hosts.
    pub fleet: bool,
    pub operations: BTreeSet<Operation>,
    pub resources: Vec<ResourcePattern>,
    pub quotas: Vec<Quota>,
}

impl Group {
    /// Whether a token of this group may name `host` in its audience. The audience `*` (every
    /// host) needs the separately granted fleet right, whatever `hosts` says.
    pub fn allows_host(&self, host: &str) -> bool {
        if host == FLEET_AUDIENCE {
            return self.fleet;
        }
        self.hosts.contains("*") || self.hosts.contains(host)
    }

    /// Whether a token with these claims is within what this group may hold: its lifetime
    /// within the group's cap, and a fleet-wide audience only with the fleet right.
    pub fn admits(&self, claims: &crate::token::Claims) -> Result<(), crate::token::TokenError> {
        use crate::token::TokenError;
        let lifetime = claims.expires.saturating_sub(claims.issued);
        if claims.expires < claims.issued || lifetime > self.max_ttl.as_secs() {
            return Err(TokenError::LifetimeTooLong);
        }
        if claims.audience.iter().any(|h| h == FLEET_AUDIENCE) && !self.fleet {
            return Err(TokenError::FleetNotGranted);
        }
        Ok(())
    }

    /// Whether some resource pattern of the group covers `r`.
    pub fn covers_resource(&self, r: &str) -> bool {
        self.resources.iter().any(|p| p.covers(r))
    }
}

/// A checked policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub max_ttl: Duration,
    pub groups: Vec<Group>,
}

/// The audience naming every host. Only a group with `fleet = true` may mint it.
pub const FLEET_AUDIENCE: &str = "*";

/// Longest token lifetime any policy may allow.
pub const MAX_TTL_CEILING: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy is not valid TOML for the schema: {0}")]
    Syntax(#[from] toml::de::Error),
    #[error("unsupported policy version {0}")]
    Version(u32),
    #[error("max_ttl: {0}")]
    MaxTtl(crate::clock::BadDuration),
    #[error("max_ttl exceeds the one-hour ceiling")]
    MaxTtlTooLong,
    #[error("group {group}: unknown role {role:?}")]
    UnknownRole { group: String, role: String },
    #[error("group {group}: unknown operation {op:?}")]
    UnknownOperation { group: String, op: String },
    #[error("group {group}: role {role} may not hold {op}, a {plane:?}-plane operation")]
    PlaneViolation {
        group: String,
        role: Role,
        op: Operation,
        plane: crate::ops::Plane,
    },
    #[error("group {group}: bad resource {resource:?}")]
    BadResource { group: String, resource: String },
    #[error("group {group}: quota on {op:?}, which the group does not hold")]
    QuotaWithoutGrant { group: String, op: String },
    #[error("group {group}: bad quota window: {source}")]
    QuotaWindow {
        group: String,
        source: crate::clock::BadDuration,
    },
    #[error("group {group}: is empty (members, hosts and operations must be non-empty)")]
    EmptyGroup { group: String },
    #[error("group {group}: max_ttl: {source}")]
    GroupMaxTtl {
        group: String,
        source: crate::clock::BadDuration,
    },
    #[error("group {group}: max_ttl exceeds the policy's max_ttl")]
    GroupMaxTtlTooLong { group: String },
    #[error("group {group}: fleet = true needs hosts = [\"*\"]")]
    FleetWithoutAllHosts { group: String },
    #[error("duplicate group name {0}")]
    DuplicateGroup(String),
}

impl PolicyError {
    pub fn code(&self) -> &'static str {
        "policy_invalid"
    }
}

impl Policy {
    /// Parses and checks `rights.toml`.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let raw: RawPolicy = toml::from_str(text)?;
        if raw.version != 1 {
            return Err(PolicyError::Version(raw.version));
        }
        let max_ttl = parse_duration(&raw.max_ttl).map_err(PolicyError::MaxTtl)?;
        if max_ttl > MAX_TTL_CEILING {
            return Err(PolicyError::MaxTtlTooLong);
        }
        let mut names = BTreeSet::new();
        let mut groups = Vec::new();
        for g in raw.groups {
            if !names.insert(g.name.clone()) {
                return Err(PolicyError::DuplicateGroup(g.name));
            }
            groups.push(check_group(g, max_ttl)?);
        }
        Ok(Policy { max_ttl, groups })
    }

    /// Groups `caller` belongs to.
    pub fn groups_of<'a>(&'a self, caller: &'a str) -> impl Iterator<Item = &'a Group> + 'a {
        self.groups
            .iter()
            .filter(move |g| g.members.contains(caller))
    }

    /// A controller's check of a verified token against this host's own copy of the policy:
    /// the group the token names must exist, hold the caller (with the certificate's role),
    /// and admit the token's lifetime and audience ([`Group::admits`]). A token minted under an
    /// older, looser policy, or forged by a compromised token service, stops here.
    pub fn admits_token(
        &self,
        peer: &crate::pki::Identity,
        claims: &crate::token::Claims,
    ) -> Result<(), crate::token::TokenError> {
        use crate::token::TokenError;
        let lifetime = claims.expires.saturating_sub(claims.issued);
        if lifetime > self.max_ttl.as_secs() {
            return Err(TokenError::LifetimeTooLong);
        }
        let group = self
            .groups_of(&peer.name)
            .find(|g| g.name == claims.group && g.role == peer.role)
            .ok_or(TokenError::GroupNotGranted)?;
        group.admits(claims)
    }

    /// Tightest quota on `op` for `caller` across its groups.
    pub fn quota_for<'a>(&'a self, caller: &'a str, op: Operation) -> Option<&'a Quota> {
        self.groups_of(caller)
            .flat_map(|g| g.quotas.iter())
            .filter(|q| q.operation == op)
            .min_by_key(|q| q.max)
    }
}

fn check_group(g: RawGroup, policy_max_ttl: Duration) -> Result<Group, PolicyError> {
    let role = Role::from_name(&g.role).ok_or_else(|| PolicyError::UnknownRole {
        group: g.name.clone(),
        role: g.role.clone(),
    })?;
    if g.members.is_empty() || g.hosts.is_empty() || g.operations.is_empty() {
        return Err(PolicyError::EmptyGroup { group: g.name });
    }
    if g.fleet && !g.hosts.iter().any(|h| h == "*") {
        return Err(PolicyError::FleetWithoutAllHosts { group: g.name });
    }
    let max_ttl = match &g.max_ttl {
        None => policy_max_ttl,
        Some(t) => {
            let t = parse_duration(t).map_err(|source| PolicyError::GroupMaxTtl {
                group: g.name.clone(),
                source,
            })?;
            if t > policy_max_ttl {
                return Err(PolicyError::GroupMaxTtlTooLong { group: g.name });
            }
            t
        }
    };
    let mut operations = BTreeSet::new();
    for name in &g.operations {
        let op = Operation::from_name(name).ok_or_else(|| PolicyError::UnknownOperation {
            group: g.name.clone(),
            op: name.clone(),
        })?;
        if !role.may_hold(op) {
            return Err(PolicyError::PlaneViolation {
                group: g.name.clone(),
                role,
                op,
                plane: op.plane(),
            });
        }
        operations.insert(op);
    }
    let mut resources = Vec::new();
    for r in &g.resources {
        resources.push(
            ResourcePattern::parse(r).map_err(|_| PolicyError::BadResource {
                group: g.name.clone(),
                resource: r.clone(),
            })?,
        );
    }
    let mut quotas = Vec::new();
    for q in g.quotas {
        let op = Operation::from_name(&q.operation)
            .filter(|op| operations.contains(op))
            .ok_or_else(|| PolicyError::QuotaWithoutGrant {
                group: g.name.clone(),
                op: q.operation.clone(),
            })?;
        let per = parse_duration(&q.per).map_err(|source| PolicyError::QuotaWindow {
            group: g.name.clone(),
            source,
        })?;
        quotas.push(Quota {
            operation: op,
            max: q.max,
            per,
        });
    }
    Ok(Group {
        name: g.name,
        role,
        members: g.members.into_iter().collect(),
        hosts: g.hosts.into_iter().collect(),
        max_ttl,
        fleet: g.fleet,
        operations,
        resources,
        quotas,
    })
}

/// The default reviewed policy, the same text as `policy/rights.toml` in the repository.
pub const DEFAULT_RIGHTS_TOML: &str = include_str!("../../../policy/rights.toml");

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn default_policy_parses() {
        let p = Policy::parse(DEFAULT_RIGHTS_TOML).unwrap();
        assert!(p.groups_of("operator").count() >= 1);
        for g in p.groups_of("operator") {
            assert!(g
                .operations
                .iter()
                .all(|o| Role::Operator.may_use(o.plane())));
        }
    }

    #[test]
    fn operator_group_with_customer_op_is_refused() {
        let t = r#"
version = 1
max_ttl = "15m"
[[group]]
name = "ops"
role = "operator"
members = ["alice"]
hosts = ["*"]
operations = ["DescribeHost", "GetConsole"]
resources = ["host"]
"#;
        assert!(matches!(
            Policy::parse(t),
            Err(PolicyError::PlaneViolation { .. })
        ));
    }

    #[test]
    fn deploy_operations_are_the_deployers_alone() {
        for role in ["operator", "control-plane", "customer"] {
            let t = format!(
                r#"
version = 1
max_ttl = "15m"
[[group]]
name = "g"
role = "{role}"
members = ["alice"]
hosts = ["*"]
operations = ["DeployRelease"]
resources = ["host"]
"#
            );
            assert!(
                matches!(Policy::parse(&t), Err(PolicyError::PlaneViolation { .. })),
                "{role}"
            );
        }
        let p = Policy::parse(DEFAULT_RIGHTS_TOML).unwrap();
        for g in &p.groups {
            if g.operations.contains(&Operation::DeployRelease) {
                assert_eq!(g.role, Role::Deployer, "{}", g.name);
            }
        }
        assert!(p
            .groups_of("deployer")
            .any(|g| g.operations.contains(&Operation::DeployRelease)));
    }

    #[test]
    fn unknown_keys_and_ops_are_refused() {
        let base = r#"
version = 1
max_ttl = "15m"
[[group]]
name = "ops"
role = "operator"
members = ["alice"]
hosts = ["*"]
operations = ["DescribeHost"]
resources = ["host"]
"#;
        assert!(Policy::parse(base).is_ok());
        assert!(Policy::parse(&format!("{base}\nbreak_glass = true\n")).is_err());
        assert!(Policy::parse(&base.replace("DescribeHost", "ExecShell")).is_err());
        assert!(Policy::parse(&base.replace("15m", "2h")).is_err());
    }
}
