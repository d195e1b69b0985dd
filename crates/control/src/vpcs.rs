//! The VPC operations: CreateVpc … DescribeSecurityGroups, the default VPC, and what the host's
//! net cards are told (routes and ingress rules). Each customer operation is one method of
//! [`ControlPlane`] taking the caller and the checked request, so every front end (the JSON API
//! here, the EC2 Query API later) calls the same code; every read and write is scoped to the
//! caller's tenant by the repository.

use std::collections::BTreeSet;

use bulkhead_controller_proto::{calls, ControllerCall, NetworkRoutesRequest, NetworkRulesRequest};
use bulkhead_kms_proto::CreateVpcKeyRequest;
use serde_json::{json, Value};

use crate::api::{GroupCreate, IngressChange, SubnetCreate, VpcCreate};
use crate::net::{
    Cidr, IngressRule, InterfaceRow, Protocol, SecurityGroupRow, SubnetRow, VpcRow,
    DEFAULT_GROUP_NAME, DEFAULT_SUBNET_CIDR, DEFAULT_VPC_CIDR,
};
use crate::net_store::NetRefusal;
use crate::repo::RepoError;
use crate::service::{new_id, now, Caller, ControlPlane};
use crate::ControlError;

pub(crate) fn vpc_json(v: &VpcRow) -> Value {
    json!({
        "VpcId": v.vpc_id,
        "CidrBlock": v.cidr.to_string(),
        "State": "available",
        "IsDefault": v.is_default,
        "InstanceTenancy": "default",
    })
}

pub(crate) fn subnet_json(s: &SubnetRow, used: usize) -> Value {
    let usable = s.cidr.usable().count();
    json!({
        "SubnetId": s.subnet_id,
        "VpcId": s.vpc_id,
        "CidrBlock": s.cidr.to_string(),
        "State": "available",
        "DefaultForAz": s.is_default,
        "AvailableIpAddressCount": usable.saturating_sub(used),
    })
}

pub(crate) fn group_json(g: &SecurityGroupRow) -> Value {
    json!({
        "GroupId": g.group_id,
        "GroupName": g.group_name,
        "Description": g.description,
        "VpcId": g.vpc_id,
        "IpPermissions": g.ingress.iter().map(|r| r.ec2_json()).collect::<Vec<_>>(),
        "IpPermissionsEgress": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
    })
}

/// The network fields DescribeInstances adds to an instance with an interface.
pub(crate) fn add_interface_json(out: &mut Value, i: &InterfaceRow, groups: &[SecurityGroupRow]) {
    let Some(o) = out.as_object_mut() else {
        return;
    };
    o.insert("PrivateIpAddress".into(), json!(i.ip.to_string()));
    o.insert("SubnetId".into(), json!(i.subnet_id));
    o.insert("VpcId".into(), json!(i.vpc_id));
    o.insert("MacAddress".into(), json!(i.mac.to_string()));
    let sgs: Vec<Value> = i
        .groups
        .iter()
        .map(|id| {
            let name = groups
                .iter()
                .find(|g| &g.group_id == id)
                .map(|g| g.group_name.as_str())
                .unwrap_or("");
            json!({ "GroupId": id, "GroupName": name })
        })
        .collect();
    o.insert("SecurityGroups".into(), Value::Array(sgs));
}

/// A VPC's `default` group. AWS's default group lets in all traffic from its own members; the
/// net card filters by source block, not group, so here it lets in all traffic from the VPC's
/// own block (only this tenant's instances can have an address there: other VPCs' frames never
/// reach the card, as their keys differ).
fn default_group(tenant: &str, vpc: &VpcRow) -> SecurityGroupRow {
    SecurityGroupRow {
        group_id: new_id("sg"),
        tenant_id: tenant.to_string(),
        vpc_id: vpc.vpc_id.clone(),
        group_name: DEFAULT_GROUP_NAME.to_string(),
        description: "default VPC security group".to_string(),
        is_default: true,
        ingress: IngressRule::new(Protocol::All, None, vpc.cidr)
            .into_iter()
            .collect(),
        created: vpc.created,
    }
}

fn not_found(ids: &[String], have: &[&str], missing: NetRefusal) -> Result<(), ControlError> {
    match ids.iter().any(|id| !have.contains(&id.as_str())) {
        true => Err(RepoError::Refused(missing).into()),
        false => Ok(()),
    }
}

/// A card endpoint peers can send to (`HOSTIP:PORT`, neither unspecified nor port 0); a
/// backend without real cards reports `0.0.0.0:0`, which no route may name.
pub(crate) fn routable(ep: &str) -> Option<std::net::SocketAddrV4> {
    ep.parse::<std::net::SocketAddrV4>()
        .ok()
        .filter(|a| !a.ip().is_unspecified() && a.port() != 0)
}

impl ControlPlane {
    /// The KMS makes the VPC's epoch key under the customer's forwarded request (CreateVpc, or
    /// the RunInstances that made a default VPC).
    async fn create_vpc_key(&self, c: &Caller, v: &VpcRow) -> Result<(), ControlError> {
        self.kms(&CreateVpcKeyRequest {
            customer_request: c.forwarded.clone(),
            vpc_id: v.vpc_id.clone(),
            vpc_number: v.vpc_number,
        })
        .await
        .map(|_| ())
    }

    /// Stores `v` (and its default group, and `subnet`), then has the KMS make its key; when
    /// the KMS refuses, the VPC is removed again (nothing is left behind).
    async fn store_vpc(
        &self,
        c: &Caller,
        v: VpcRow,
        subnet: Option<SubnetRow>,
    ) -> Result<VpcRow, ControlError> {
        let group = default_group(&v.tenant_id, &v);
        let row = self.repo.create_vpc(&v, subnet.as_ref(), &group)?;
        if let Err(e) = self.create_vpc_key(c, &row).await {
            if let Some(s) = &subnet {
                let _ = self.repo.delete_subnet(&c.tenant, &s.subnet_id);
            }
            if let Err(d) = self.repo.delete_vpc(&c.tenant, &row.vpc_id) {
                tracing::error!(vpc = %row.vpc_id, error = %d, "VPC without a key not removed");
            }
            return Err(e);
        }
        Ok(row)
    }

    /// CreateVpc.
    pub async fn create_vpc(&self, c: &Caller, r: &VpcCreate) -> Result<Value, ControlError> {
        let v = VpcRow {
            vpc_id: new_id("vpc"),
            tenant_id: c.tenant.clone(),
            cidr: r.cidr,
            vpc_number: 0,
            epoch: 1,
            is_default: false,
            created: now(),
        };
        let row = self.store_vpc(c, v, None).await?;
        Ok(json!({ "Vpc": vpc_json(&row) }))
    }

    /// DescribeVpcs (all of the caller's, or the ids given: an id not the caller's is
    /// `no_such_vpc`, whoever owns it).
    pub fn describe_vpcs(&self, tenant: &str, ids: &[String]) -> Result<Value, ControlError> {
        let all = self.repo.vpcs(tenant)?;
        let have: Vec<&str> = all.iter().map(|v| v.vpc_id.as_str()).collect();
        not_found(ids, &have, NetRefusal::NoSuchVpc)?;
        let out: Vec<Value> = all
            .iter()
            .filter(|v| ids.is_empty() || ids.contains(&v.vpc_id))
            .map(vpc_json)
            .collect();
        Ok(json!({ "Vpcs": out }))
    }

    /// DeleteVpc (refused while it has subnets; its security groups go with it).
    pub fn delete_vpc(&self, tenant: &str, id: &str) -> Result<Value, ControlError> {
        self.repo.delete_vpc(tenant, id)?;
        Ok(json!({ "Return": true }))
    }

    /// CreateSubnet (inside the caller's VPC, overlapping none of its subnets).
    pub fn create_subnet(&self, tenant: &str, r: &SubnetCreate) -> Result<Value, ControlError> {
        let s = SubnetRow {
            subnet_id: new_id("subnet"),
            tenant_id: tenant.to_string(),
            vpc_id: r.vpc_id.clone(),
            cidr: r.cidr,
            is_default: false,
            created: now(),
        };
        self.repo.create_subnet(&s)?;
        Ok(json!({ "Subnet": subnet_json(&s, 0) }))
    }

    pub fn describe_subnets(&self, tenant: &str, ids: &[String]) -> Result<Value, ControlError> {
        let all = self.repo.subnets(tenant)?;
        let have: Vec<&str> = all.iter().map(|s| s.subnet_id.as_str()).collect();
        not_found(ids, &have, NetRefusal::NoSuchSubnet)?;
        let ifs = self.repo.interfaces(tenant)?;
        let out: Vec<Value> = all
            .iter()
            .filter(|s| ids.is_empty() || ids.contains(&s.subnet_id))
            .map(|s| {
                let used = ifs.iter().filter(|i| i.subnet_id == s.subnet_id).count();
                subnet_json(s, used)
            })
            .collect();
        Ok(json!({ "Subnets": out }))
    }

    /// DeleteSubnet (refused while an instance's interface is in it).
    pub fn delete_subnet(&self, tenant: &str, id: &str) -> Result<Value, ControlError> {
        self.repo.delete_subnet(tenant, id)?;
        Ok(json!({ "Return": true }))
    }

    /// CreateSecurityGroup (no ingress rules; egress open).
    pub fn create_security_group(
        &self,
        tenant: &str,
        r: &GroupCreate,
    ) -> Result<Value, ControlError> {
        let g = SecurityGroupRow {
            group_id: new_id("sg"),
            tenant_id: tenant.to_string(),
            vpc_id: r.vpc_id.clone(),
            group_name: r.group_name.clone(),
            description: r.description.clone(),
            is_default: false,
            ingress: Vec::new(),
            created: now(),
        };
        self.repo.create_security_group(&g)?;
        Ok(json!({ "GroupId": g.group_id }))
    }

    pub fn describe_security_groups(
        &self,
        tenant: &str,
        ids: &[String],
    ) -> Result<Value, ControlError> {
        let all = self.repo.security_groups(tenant)?;
        let have: Vec<&str> = all.iter().map(|g| g.group_id.as_str()).collect();
        not_found(ids, &have, NetRefusal::NoSuchGroup)?;
        let out: Vec<Value> = all
            .iter()
            .filter(|g| ids.is_empty() || ids.contains(&g.group_id))
            .map(group_json)
            .collect();
        Ok(json!({ "SecurityGroups": out }))
    }

    /// Authorize (`add`) or RevokeSecurityGroupIngress: the rules change atomically, then every
    /// running instance of the group gets its new rule set on its card (no restart).
    pub async fn change_ingress(
        &self,
        tenant: &str,
        r: &IngressChange,
        add: bool,
    ) -> Result<Value, ControlError> {
        self.repo
            .change_ingress(tenant, &r.group_id, &r.rules, add)?;
        let pushed = self.push_rules(tenant, &r.group_id).await;
        tracing::info!(tenant, group = %r.group_id, add, pushed, "ingress rules changed");
        Ok(json!({ "Return": true }))
    }

    /// The subnet and groups a RunInstances uses: the ones it names (the caller's, checked when
    /// the interface is allocated), or the tenant's default subnet and group, the default VPC
    /// being made on first use.
    pub(crate) async fn network_for(
        &self,
        c: &Caller,
        subnet: Option<&str>,
        groups: &[String],
    ) -> Result<(String, Vec<String>), ControlError> {
        let subnet = match subnet {
            Some(s) => s.to_string(),
            None => self.default_subnet(c).await?.subnet_id,
        };
        if !groups.is_empty() {
            return Ok((subnet, groups.to_vec()));
        }
        let s = self
            .repo
            .subnets(&c.tenant)?
            .into_iter()
            .find(|s| s.subnet_id == subnet)
            .ok_or(RepoError::Refused(NetRefusal::NoSuchSubnet))?;
        let g = self
            .repo
            .security_groups(&c.tenant)?
            .into_iter()
            .find(|g| g.vpc_id == s.vpc_id && g.is_default)
            .ok_or(RepoError::Refused(NetRefusal::NoSuchGroup))?;
        Ok((subnet, vec![g.group_id]))
    }

    /// The tenant's default subnet, making the default VPC (172.31.0.0/16), subnet and group
    /// when the tenant has none.
    async fn default_subnet(&self, c: &Caller) -> Result<SubnetRow, ControlError> {
        let find = |vpc: &VpcRow| -> Result<Option<SubnetRow>, ControlError> {
            Ok(self
                .repo
                .subnets(&c.tenant)?
                .into_iter()
                .find(|s| s.vpc_id == vpc.vpc_id && s.is_default))
        };
        if let Some(v) = self.repo.default_vpc(&c.tenant)? {
            return find(&v)?.ok_or(RepoError::Refused(NetRefusal::NoSuchSubnet).into());
        }
        let t = now();
        let vpc_id = new_id("vpc");
        let cidr = |s| Cidr::parse_block(s).map_err(ControlError::BadNetwork);
        let v = VpcRow {
            vpc_id: vpc_id.clone(),
            tenant_id: c.tenant.clone(),
            cidr: cidr(DEFAULT_VPC_CIDR)?,
            vpc_number: 0,
            epoch: 1,
            is_default: true,
            created: t,
        };
        let s = SubnetRow {
            subnet_id: new_id("subnet"),
            tenant_id: c.tenant.clone(),
            vpc_id,
            cidr: cidr(DEFAULT_SUBNET_CIDR)?,
            is_default: true,
            created: t,
        };
        match self.store_vpc(c, v, Some(s.clone())).await {
            Ok(_) => {
                tracing::info!(tenant = %c.tenant, subnet = %s.subnet_id, "default VPC made");
                Ok(s)
            }
            // Another call made it first.
            Err(ControlError::Repo(RepoError::Refused(NetRefusal::DefaultExists))) => {
                let v = self
                    .repo
                    .default_vpc(&c.tenant)?
                    .ok_or(ControlError::Internal)?;
                find(&v)?.ok_or(RepoError::Refused(NetRefusal::NoSuchSubnet).into())
            }
            Err(e) => Err(e),
        }
    }

    /// The card's ingress rules for `i`: the union of its groups' rules, in the card's spelling.
    pub(crate) fn allow_for(&self, i: &InterfaceRow, groups: &[SecurityGroupRow]) -> Vec<String> {
        let mut out = BTreeSet::new();
        for g in groups.iter().filter(|g| i.groups.contains(&g.group_id)) {
            for r in &g.ingress {
                out.insert(r.card_text());
            }
        }
        out.into_iter().collect()
    }

    /// The card's routes for `i`: every other interface of its VPC whose card is up,
    /// `IP=CARD@HOST:PORT`.
    pub(crate) fn routes_for(&self, i: &InterfaceRow, all: &[InterfaceRow]) -> Vec<String> {
        all.iter()
            .filter(|o| o.vpc_id == i.vpc_id && o.instance_id != i.instance_id)
            .filter_map(|o| {
                let ep = routable(o.endpoint.as_deref()?)?;
                Some(format!("{}={}@{ep}", o.ip, o.card_id))
            })
            .collect()
    }

    /// One `PUT /v1/instances/{id}/network/{what}` to the host of `i` (best effort: the
    /// database is the truth, a card that missed an update gets the whole set with the next).
    async fn put_network<C: ControllerCall>(&self, i: &InterfaceRow, what: &str, call: &C) -> bool {
        let host = match self.repo.instance(&i.tenant_id, &i.instance_id) {
            Ok(Some(row)) if row.state.is_live() => row.host_id,
            _ => return false,
        };
        match self.on_host(&host, call).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(instance = %i.instance_id, what, code = e.code(), "net card update failed");
                false
            }
        }
    }

    /// Pushes the rule sets of every instance in `group` whose card is up; how many took it.
    pub(crate) async fn push_rules(&self, tenant: &str, group: &str) -> usize {
        let (Ok(ifs), Ok(groups)) = (
            self.repo.interfaces(tenant),
            self.repo.security_groups(tenant),
        ) else {
            return 0;
        };
        let mut n = 0;
        for i in ifs
            .iter()
            .filter(|i| i.endpoint.is_some() && i.groups.iter().any(|g| g == group))
        {
            let call = calls::SetNetworkRules {
                instance_id: i.instance_id.clone(),
                body: NetworkRulesRequest {
                    allow: self.allow_for(i, &groups),
                },
            };
            if self.put_network(i, "rules", &call).await {
                n += 1;
            }
        }
        n
    }

    /// Pushes the routing table of every other instance of `vpc` whose card is up (after
    /// `changed` got or lost its card); how many took it.
    pub(crate) async fn push_routes(&self, tenant: &str, vpc: &str, changed: &str) -> usize {
        let Ok(ifs) = self.repo.interfaces(tenant) else {
            return 0;
        };
        let mut n = 0;
        for i in ifs
            .iter()
            .filter(|i| i.vpc_id == vpc && i.instance_id != changed && i.endpoint.is_some())
        {
            let call = calls::SetNetworkRoutes {
                instance_id: i.instance_id.clone(),
                body: NetworkRoutesRequest {
                    routes: self.routes_for(i, &ifs),
                },
            };
            if self.put_network(i, "routes", &call).await {
                n += 1;
            }
        }
        n
    }
}
