//! The closed set of controller operations, the two planes, and caller roles.

use serde::{Deserialize, Serialize};

/// Which grant set an operation belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Plane {
    /// Capacity, health, drain, metrics, logs. Never touches customer content.
    Operator,
    /// The customer's data path: instances with their images, volumes, console.
    Customer,
}

macro_rules! operations {
    ($($name:ident => $plane:ident),+ $(,)?) => {
        /// Every operation the controller offers. There are no others.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum Operation { $($name),+ }

        impl Operation {
            pub const ALL: &'static [Operation] = &[$(Operation::$name),+];

            pub fn name(self) -> &'static str {
                match self { $(Operation::$name => stringify!($name)),+ }
            }

            pub fn plane(self) -> Plane {
                match self { $(Operation::$name => Plane::$plane),+ }
            }

            pub fn from_name(s: &str) -> Option<Operation> {
                match s { $(stringify!($name) => Some(Operation::$name),)+ _ => None }
            }
        }
    };
}

operations! {
    DescribeHost => Operator,
    GetHealth => Operator,
    GetMetrics => Operator,
    ReadAudit => Operator,
    ListAlerts => Operator,
    DrainHost => Operator,
    AttestHost => Operator,
    UploadArtefact => Operator,
    DeployRelease => Operator,
    CreateInstance => Customer,
    DescribeInstance => Customer,
    StartInstance => Customer,
    StopInstance => Customer,
    RebootInstance => Customer,
    TerminateInstance => Customer,
    AttachVolume => Customer,
    DetachVolume => Customer,
    GetConsole => Customer,
    AttachNetwork => Customer,
    SetNetworkRoutes => Customer,
    SetNetworkRules => Customer,
}

impl Operation {
    /// Operations only the `deployer` role may hold: installing software on a host. No other
    /// role gets them, whatever the policy file says (the parser, the token service and every
    /// controller refuse).
    pub fn deployer_only(self) -> bool {
        matches!(self, Operation::UploadArtefact | Operation::DeployRelease)
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a certificate holder is. Carried in the certificate's OU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Operator,
    Customer,
    ControlPlane,
    Host,
    /// The deployment service: installs signed releases on hosts (`DeployRelease`, and the
    /// content-addressed `UploadArtefact` before it). The only role that may hold those; it
    /// holds no customer-plane operation.
    Deployer,
    /// A service above the hosts (the KMS, the token service, the control plane's API), as a
    /// TLS server; the certificate's CN names which. Holds no plane.
    Service,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Customer => "customer",
            Role::ControlPlane => "control-plane",
            Role::Host => "host",
            Role::Deployer => "deployer",
            Role::Service => "service",
        }
    }

    pub fn from_name(s: &str) -> Option<Role> {
        match s {
            "operator" => Some(Role::Operator),
            "customer" => Some(Role::Customer),
            "control-plane" => Some(Role::ControlPlane),
            "host" => Some(Role::Host),
            "deployer" => Some(Role::Deployer),
            "service" => Some(Role::Service),
            _ => None,
        }
    }

    /// The planes a role may ever hold grants on. An operator can never hold a customer-plane
    /// grant, whatever the policy file says.
    pub fn may_use(self, plane: Plane) -> bool {
        matches!(
            (self, plane),
            (Role::Operator | Role::Deployer, Plane::Operator)
                | (Role::Customer, Plane::Customer)
                | (Role::ControlPlane, _)
        )
    }
}

impl Role {
    /// Whether the role may ever hold `op`: its plane (see [`Role::may_use`]), and the
    /// deployer-only operations for the deployer alone.
    pub fn may_hold(self, op: Operation) -> bool {
        if op.deployer_only() {
            return self == Role::Deployer;
        }
        self.may_use(op.plane())
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A resource name (`host`, `instance:ID`, `volume:ID`) or a pattern ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ResourcePattern(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad resource pattern (want host, instance:ID, volume:ID or a prefix ending in *)")]
pub struct BadResource;

/// Longest resource name or pattern.
pub const MAX_RESOURCE_LEN: usize = 80;

fn valid_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

impl ResourcePattern {
    pub fn parse(s: &str) -> Result<Self, BadResource> {
        if s.is_empty() || s.len() > MAX_RESOURCE_LEN {
            return Err(BadResource);
        }
        if s == "host" || s == "*" {
            return Ok(ResourcePattern(s.to_string()));
        }
        let (kind, rest) = s.split_once(':').ok_or(BadResource)?;
        if kind != "instance" && kind != "volume" {
            return Err(BadResource);
        }
        let body = rest.strip_suffix('*').unwrap_or(rest);
        if !body.chars().all(valid_id_char) || (body.is_empty() && !rest.ends_with('*')) {
            return Err(BadResource);
        }
        Ok(ResourcePattern(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this pattern covers the concrete resource or narrower pattern `other`.
    pub fn covers(&self, other: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => other.starts_with(prefix),
            None => self.0 == other,
        }
    }
}

impl TryFrom<String> for ResourcePattern {
    type Error = BadResource;
    fn try_from(s: String) -> Result<Self, BadResource> {
        ResourcePattern::parse(&s)
    }
}

impl From<ResourcePattern> for String {
    fn from(r: ResourcePattern) -> String {
        r.0
    }
}

/// Checks an instance or volume identifier from a request path.
pub fn valid_resource_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(valid_id_char)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_never_gets_customer_plane() {
        for op in Operation::ALL {
            if op.plane() == Plane::Customer {
                assert!(!Role::Operator.may_use(op.plane()));
            }
        }
        assert!(!Role::Host.may_use(Plane::Operator));
    }

    #[test]
    fn only_the_deployer_holds_deploy_operations() {
        for op in Operation::ALL {
            for role in [
                Role::Operator,
                Role::Customer,
                Role::ControlPlane,
                Role::Host,
                Role::Service,
            ] {
                if op.deployer_only() {
                    assert!(!role.may_hold(*op), "{role} may hold {op}");
                }
            }
            assert_eq!(
                Role::Deployer.may_hold(*op),
                op.plane() == Plane::Operator,
                "{op}"
            );
        }
        assert!(Role::Deployer.may_hold(Operation::DeployRelease));
        assert!(!Role::Operator.may_hold(Operation::DeployRelease));
        assert!(!Role::ControlPlane.may_hold(Operation::UploadArtefact));
        assert_eq!(Role::from_name("deployer"), Some(Role::Deployer));
    }

    #[test]
    fn patterns() {
        let p = ResourcePattern::parse("instance:*").expect("valid");
        assert!(p.covers("instance:i-1"));
        assert!(!p.covers("volume:v-1"));
        assert!(ResourcePattern::parse("instance:").is_err());
        assert!(ResourcePattern::parse("disk:x").is_err());
        assert!(ResourcePattern::parse("instance:a/b").is_err());
        assert!(ResourcePattern::parse("*").expect("valid").covers("host"));
    }
}
