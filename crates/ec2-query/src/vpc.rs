//! The VPC, subnet and security-group actions of the Query API: their typed requests (parsed
//! with the same strict rules as [`crate::form`]) and their XML answers.

use crate::form::{Ec2Request, Filter, GroupId, Page, Params, QueryError, SubnetId, VpcId};
use crate::xml::XmlWriter;

/// Longest CIDR text accepted (`255.255.255.255/32` is 18).
const MAX_CIDR_LEN: usize = 18;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVpc {
    pub cidr_block: String,
    pub client_token: Option<String>,
}

/// DescribeVpcs / DescribeSubnets: ids, filters, a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Describe<Id> {
    pub ids: Vec<Id>,
    pub filters: Vec<Filter>,
    pub page: Page,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSubnet {
    pub vpc_id: VpcId,
    pub cidr_block: String,
    pub availability_zone: Option<String>,
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSecurityGroup {
    pub group_name: String,
    /// `GroupDescription` on the wire (EC2 requires it).
    pub description: String,
    pub vpc_id: VpcId,
}

/// One `IpPermissions.N`: protocol, optional ports (`-1` is "none"), and its `IpRanges.M.CidrIp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpPermission {
    pub ip_protocol: String,
    pub from_port: Option<i32>,
    pub to_port: Option<i32>,
    pub cidr_ips: Vec<String>,
}

/// Authorize/RevokeSecurityGroupIngress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressChange {
    pub group_id: GroupId,
    pub permissions: Vec<IpPermission>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeSecurityGroups {
    pub group_ids: Vec<GroupId>,
    pub group_names: Vec<String>,
    pub filters: Vec<Filter>,
    pub page: Page,
}

type ActionParser = fn(&mut Params) -> Result<Ec2Request, QueryError>;

/// The parser of a VPC action, `None` for any other name.
pub(crate) fn parser(action: &str) -> Option<ActionParser> {
    let p: ActionParser = match action {
        "CreateVpc" => |p| {
            Ok(Ec2Request::CreateVpc(CreateVpc {
                cidr_block: p.required_text("CidrBlock", MAX_CIDR_LEN)?,
                client_token: p.text("ClientToken", 64)?,
            }))
        },
        "DescribeVpcs" => |p| {
            Ok(Ec2Request::DescribeVpcs(describe(
                p,
                "VpcId",
                VpcId::parse,
            )?))
        },
        "DeleteVpc" => |p| {
            Ok(Ec2Request::DeleteVpc {
                vpc_id: VpcId::parse(&p.required_text("VpcId", 64)?)?,
            })
        },
        "CreateSubnet" => |p| {
            Ok(Ec2Request::CreateSubnet(CreateSubnet {
                vpc_id: VpcId::parse(&p.required_text("VpcId", 64)?)?,
                cidr_block: p.required_text("CidrBlock", MAX_CIDR_LEN)?,
                availability_zone: p.text("AvailabilityZone", 64)?,
                client_token: p.text("ClientToken", 64)?,
            }))
        },
        "DescribeSubnets" => |p| {
            Ok(Ec2Request::DescribeSubnets(describe(
                p,
                "SubnetId",
                SubnetId::parse,
            )?))
        },
        "DeleteSubnet" => |p| {
            Ok(Ec2Request::DeleteSubnet {
                subnet_id: SubnetId::parse(&p.required_text("SubnetId", 64)?)?,
            })
        },
        "CreateSecurityGroup" => |p| {
            Ok(Ec2Request::CreateSecurityGroup(CreateSecurityGroup {
                group_name: p.required_text("GroupName", 255)?,
                description: p.required_text("GroupDescription", 255)?,
                vpc_id: VpcId::parse(&p.required_text("VpcId", 64)?)?,
            }))
        },
        "AuthorizeSecurityGroupIngress" => {
            |p| Ok(Ec2Request::AuthorizeSecurityGroupIngress(ingress(p)?))
        }
        "RevokeSecurityGroupIngress" => |p| Ok(Ec2Request::RevokeSecurityGroupIngress(ingress(p)?)),
        "DescribeSecurityGroups" => |p| {
            let d = describe(p, "GroupId", GroupId::parse)?;
            Ok(Ec2Request::DescribeSecurityGroups(DescribeSecurityGroups {
                group_ids: d.ids,
                group_names: p.list("GroupName", 255)?,
                filters: d.filters,
                page: d.page,
            }))
        },
        _ => return None,
    };
    Some(p)
}

fn describe<Id>(
    p: &mut Params,
    id_name: &'static str,
    parse: fn(&str) -> Result<Id, QueryError>,
) -> Result<Describe<Id>, QueryError> {
    let ids = p
        .list(id_name, 64)?
        .iter()
        .map(|v| parse(v))
        .collect::<Result<Vec<_>, _>>()?;
    let page = p.page(5, 1000)?;
    if !ids.is_empty() && page.max_results.is_some() {
        return Err(QueryError::Combination(id_name, "MaxResults"));
    }
    Ok(Describe {
        ids,
        filters: p.filters()?,
        page,
    })
}

/// A port: decimal, optionally `-1`, in `-1..=65535`.
fn port(p: &mut Params, key: &str, name: &'static str) -> Result<Option<i32>, QueryError> {
    let Some(v) = p.take(key)? else {
        return Ok(None);
    };
    let digits = v.strip_prefix('-').unwrap_or(&v);
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(QueryError::InvalidValue(name));
    }
    let n: i32 = v.parse().map_err(|_| QueryError::InvalidValue(name))?;
    if !(-1..=65_535).contains(&n) {
        return Err(QueryError::InvalidValue(name));
    }
    Ok(Some(n))
}

/// `GroupId` and `IpPermissions.N.{IpProtocol,FromPort,ToPort,IpRanges.M.CidrIp}`.
fn ingress(p: &mut Params) -> Result<IngressChange, QueryError> {
    const NAME: &str = "IpPermissions";
    let group_id = GroupId::parse(&p.required_text("GroupId", 64)?)?;
    let mut permissions = Vec::new();
    for n in 1.. {
        let base = format!("{NAME}.{n}.");
        if !p.0.keys().any(|k| k.starts_with(&base)) {
            break;
        }
        if n > 100 {
            return Err(QueryError::IndexTooLarge(NAME));
        }
        let ip_protocol = p
            .take(&format!("{base}IpProtocol"))?
            .ok_or(QueryError::MissingParameter("IpPermissions.N.IpProtocol"))?;
        crate::form::check_text(&ip_protocol, NAME, 16)?;
        let from_port = port(p, &format!("{base}FromPort"), "FromPort")?;
        let to_port = port(p, &format!("{base}ToPort"), "ToPort")?;
        let mut cidr_ips = Vec::new();
        for m in 1.. {
            let key = format!("{base}IpRanges.{m}.CidrIp");
            let Some(c) = p.take(&key)? else {
                break;
            };
            if m > 100 {
                return Err(QueryError::IndexTooLarge(NAME));
            }
            crate::form::check_text(&c, NAME, MAX_CIDR_LEN)?;
            // A rule description is accepted and not kept.
            if let Some(d) = p.take(&format!("{base}IpRanges.{m}.Description"))? {
                crate::form::check_text(&d, NAME, 255)?;
            }
            cidr_ips.push(c);
        }
        // Anything else under this permission (groups, prefix lists, IPv6, a gap in IpRanges) is
        // not supported: left over, it is refused as UnknownParameter.
        permissions.push(IpPermission {
            ip_protocol,
            from_port,
            to_port,
            cidr_ips,
        });
    }
    if permissions.is_empty() {
        return Err(QueryError::MissingParameter("IpPermissions"));
    }
    Ok(IngressChange {
        group_id,
        permissions,
    })
}

/// One `vpcSet` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcItem {
    pub vpc_id: String,
    pub cidr_block: String,
    pub is_default: bool,
    pub owner_id: String,
}

/// One `subnetSet` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetItem {
    pub subnet_id: String,
    pub vpc_id: String,
    pub cidr_block: String,
    pub availability_zone: String,
    pub available_ip_address_count: u64,
    pub default_for_az: bool,
    pub owner_id: String,
}

/// One `securityGroupInfo` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupItem {
    pub group_id: String,
    pub group_name: String,
    pub description: String,
    pub vpc_id: String,
    pub owner_id: String,
    pub ingress: Vec<IpPermission>,
}

/// A successful answer to a VPC action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VpcResponse {
    CreateVpc(VpcItem),
    DescribeVpcs {
        vpcs: Vec<VpcItem>,
        next_token: Option<String>,
    },
    DeleteVpc,
    CreateSubnet(SubnetItem),
    DescribeSubnets {
        subnets: Vec<SubnetItem>,
        next_token: Option<String>,
    },
    DeleteSubnet,
    CreateSecurityGroup {
        group_id: String,
    },
    AuthorizeSecurityGroupIngress,
    RevokeSecurityGroupIngress,
    DescribeSecurityGroups {
        groups: Vec<GroupItem>,
        next_token: Option<String>,
    },
}

impl VpcResponse {
    pub fn action(&self) -> &'static str {
        match self {
            Self::CreateVpc(_) => "CreateVpc",
            Self::DescribeVpcs { .. } => "DescribeVpcs",
            Self::DeleteVpc => "DeleteVpc",
            Self::CreateSubnet(_) => "CreateSubnet",
            Self::DescribeSubnets { .. } => "DescribeSubnets",
            Self::DeleteSubnet => "DeleteSubnet",
            Self::CreateSecurityGroup { .. } => "CreateSecurityGroup",
            Self::AuthorizeSecurityGroupIngress => "AuthorizeSecurityGroupIngress",
            Self::RevokeSecurityGroupIngress => "RevokeSecurityGroupIngress",
            Self::DescribeSecurityGroups { .. } => "DescribeSecurityGroups",
        }
    }

    pub(crate) fn body(&self, w: &mut XmlWriter) {
        match self {
            Self::CreateVpc(v) => {
                w.open("vpc");
                vpc_body(w, v);
                w.close("vpc");
            }
            Self::DescribeVpcs { vpcs, next_token } => {
                w.set("vpcSet", vpcs, vpc_body);
                w.leaf_opt("nextToken", next_token.as_deref());
            }
            Self::CreateSubnet(s) => {
                w.open("subnet");
                subnet_body(w, s);
                w.close("subnet");
            }
            Self::DescribeSubnets {
                subnets,
                next_token,
            } => {
                w.set("subnetSet", subnets, subnet_body);
                w.leaf_opt("nextToken", next_token.as_deref());
            }
            Self::CreateSecurityGroup { group_id } => {
                w.leaf("return", "true");
                w.leaf("groupId", group_id);
            }
            Self::DescribeSecurityGroups { groups, next_token } => {
                w.set("securityGroupInfo", groups, group_body);
                w.leaf_opt("nextToken", next_token.as_deref());
            }
            Self::DeleteVpc
            | Self::DeleteSubnet
            | Self::AuthorizeSecurityGroupIngress
            | Self::RevokeSecurityGroupIngress => w.leaf("return", "true"),
        }
    }
}

fn bool_text(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

fn vpc_body(w: &mut XmlWriter, v: &VpcItem) {
    w.leaf("vpcId", &v.vpc_id);
    w.leaf("ownerId", &v.owner_id);
    w.leaf("state", "available");
    w.leaf("cidrBlock", &v.cidr_block);
    w.leaf("dhcpOptionsId", "default");
    w.leaf("instanceTenancy", "default");
    w.leaf("isDefault", bool_text(v.is_default));
}

fn subnet_body(w: &mut XmlWriter, s: &SubnetItem) {
    w.leaf("subnetId", &s.subnet_id);
    w.leaf("ownerId", &s.owner_id);
    w.leaf("state", "available");
    w.leaf("vpcId", &s.vpc_id);
    w.leaf("cidrBlock", &s.cidr_block);
    w.leaf(
        "availableIpAddressCount",
        &s.available_ip_address_count.to_string(),
    );
    w.leaf("availabilityZone", &s.availability_zone);
    w.leaf("defaultForAz", bool_text(s.default_for_az));
    w.leaf("mapPublicIpOnLaunch", "false");
}

fn permission_body(w: &mut XmlWriter, p: &IpPermission) {
    w.leaf("ipProtocol", &p.ip_protocol);
    if let Some(f) = p.from_port {
        w.leaf("fromPort", &f.to_string());
    }
    if let Some(t) = p.to_port {
        w.leaf("toPort", &t.to_string());
    }
    w.set::<String>("groups", &[], |_, _| {});
    w.set("ipRanges", &p.cidr_ips, |w, c| w.leaf("cidrIp", c));
}

fn group_body(w: &mut XmlWriter, g: &GroupItem) {
    w.leaf("ownerId", &g.owner_id);
    w.leaf("groupId", &g.group_id);
    w.leaf("groupName", &g.group_name);
    w.leaf("groupDescription", &g.description);
    w.leaf("vpcId", &g.vpc_id);
    w.set("ipPermissions", &g.ingress, permission_body);
    let all = IpPermission {
        ip_protocol: "-1".into(),
        from_port: None,
        to_port: None,
        cidr_ips: vec!["0.0.0.0/0".into()],
    };
    w.set("ipPermissionsEgress", &[all], permission_body);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::code::Ec2ErrorCode;
    use crate::form::Ec2Call;

    fn parse(s: &str) -> Result<Ec2Call, QueryError> {
        Ec2Request::parse(format!("Version=2016-11-15&{s}").as_bytes())
    }

    fn code(s: &str) -> &'static str {
        match parse(s) {
            Ok(_) => "ok",
            Err(e) => e.code().as_str(),
        }
    }

    #[test]
    fn vpc_subnet_and_group_actions_parse() {
        let c = parse("Action=CreateVpc&CidrBlock=10.1.0.0%2F16").unwrap();
        assert_eq!(
            c.request,
            Ec2Request::CreateVpc(CreateVpc {
                cidr_block: "10.1.0.0/16".into(),
                client_token: None
            })
        );
        let Ec2Request::DescribeSubnets(d) = parse("Action=DescribeSubnets&Filter.1.Name=vpc-id&Filter.1.Value.1=vpc-1&MaxResults=5&NextToken=t").unwrap().request else {
            panic!()
        };
        assert_eq!(d.filters[0].name, "vpc-id");
        assert_eq!(d.page.max_results, Some(5));
        let Ec2Request::AuthorizeSecurityGroupIngress(i) = parse("Action=AuthorizeSecurityGroupIngress&GroupId=sg-1&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.FromPort=22&IpPermissions.1.ToPort=22&IpPermissions.1.IpRanges.1.CidrIp=10.0.0.0%2F8&IpPermissions.1.IpRanges.2.CidrIp=10.1.0.0%2F16&IpPermissions.2.IpProtocol=-1").unwrap().request else {
            panic!()
        };
        assert_eq!(i.permissions.len(), 2);
        assert_eq!(i.permissions[0].cidr_ips, ["10.0.0.0/8", "10.1.0.0/16"]);
        assert_eq!(i.permissions[0].from_port, Some(22));
        assert_eq!(i.permissions[1].ip_protocol, "-1");
        let Ec2Request::CreateSecurityGroup(g) = parse(
            "Action=CreateSecurityGroup&GroupName=web&GroupDescription=front+end&VpcId=vpc-9",
        )
        .unwrap()
        .request
        else {
            panic!()
        };
        assert_eq!(g.description, "front end");
        assert_eq!(code("Action=DeleteVpc&VpcId=vpc-1"), "ok");
        assert_eq!(code("Action=DeleteSubnet&SubnetId=subnet-1"), "ok");
        assert_eq!(
            code("Action=DescribeSecurityGroups&GroupName.1=default&GroupId.1=sg-2"),
            "ok"
        );
    }

    #[test]
    fn vpc_refusals_carry_ec2_codes() {
        for (body, want) in [
            ("Action=CreateVpc", "MissingParameter"),
            ("Action=CreateVpc&CidrBlock=10.0.0.0%2F16%2F16%2F16%2F16", Ec2ErrorCode::InvalidParameterValue.as_str()),
            ("Action=DeleteVpc&VpcId=subnet-1", "InvalidVpcID.Malformed"),
            ("Action=DeleteSubnet&SubnetId=vpc-1", "InvalidSubnetID.Malformed"),
            ("Action=DescribeVpcs&VpcId.1=vpc-1&MaxResults=5", "InvalidParameterCombination"),
            ("Action=DescribeVpcs&VpcId.2=vpc-1", "InvalidParameter"),
            ("Action=CreateSubnet&VpcId=vpc-1", "MissingParameter"),
            ("Action=CreateSecurityGroup&GroupName=a&VpcId=vpc-1", "MissingParameter"),
            ("Action=AuthorizeSecurityGroupIngress&GroupId=sg-1", "MissingParameter"),
            ("Action=AuthorizeSecurityGroupIngress&GroupId=vpc-1&IpPermissions.1.IpProtocol=tcp", "InvalidGroupId.Malformed"),
            ("Action=AuthorizeSecurityGroupIngress&GroupId=sg-1&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.FromPort=99999", "InvalidParameterValue"),
            ("Action=AuthorizeSecurityGroupIngress&GroupId=sg-1&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.FromPort=%2B1", "InvalidParameterValue"),
            ("Action=AuthorizeSecurityGroupIngress&GroupId=sg-1&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.UserIdGroupPairs.1.GroupId=sg-2", "UnknownParameter"),
            ("Action=RevokeSecurityGroupIngress&GroupId=sg-1&IpPermissions.2.IpProtocol=tcp", "MissingParameter"),
            ("Action=RevokeSecurityGroupIngress&GroupId=sg-1&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.IpRanges.2.CidrIp=10.0.0.0%2F8", "UnknownParameter"),
        ] {
            assert_eq!(code(body), want, "{body}");
        }
    }

    #[test]
    fn vpc_answers_are_ec2_xml() {
        let x = crate::xml::Ec2Response::Vpc(VpcResponse::DescribeSecurityGroups {
            groups: vec![GroupItem {
                group_id: "sg-1".into(),
                group_name: "web<".into(),
                description: "d".into(),
                vpc_id: "vpc-1".into(),
                owner_id: "t".into(),
                ingress: vec![IpPermission {
                    ip_protocol: "tcp".into(),
                    from_port: Some(22),
                    to_port: Some(22),
                    cidr_ips: vec!["10.0.0.0/8".into()],
                }],
            }],
            next_token: Some("n".into()),
        })
        .to_xml("r-1");
        assert!(x.contains("<DescribeSecurityGroupsResponse xmlns="), "{x}");
        assert!(x.contains("<groupName>web&lt;</groupName>"), "{x}");
        assert!(x.contains("<ipRanges><item><cidrIp>10.0.0.0/8</cidrIp></item></ipRanges>"));
        assert!(x.contains("<nextToken>n</nextToken>"));
        let x = crate::xml::Ec2Response::Vpc(VpcResponse::CreateSecurityGroup {
            group_id: "sg-2".into(),
        })
        .to_xml("r-2");
        assert!(x.contains("<groupId>sg-2</groupId>"));
    }
}
