//! Column lists, row decoders, and the reads and inserts the network changes share.

use super::db::{t, u32_of, Db, V};
use super::NetRefusal;
use crate::net::{
    Cidr, IngressRule, InterfaceRow, Ipv4, Mac, PortRange, Protocol, SecurityGroupRow, SubnetRow,
    VpcRow,
};
use crate::repo::RepoError;

pub(super) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn refused(r: NetRefusal) -> RepoError {
    RepoError::Refused(r)
}

pub(super) const VPC_COLS: &str = "vpc_id, tenant_id, cidr, vpc_number, epoch, is_default, created";
pub(super) const SUBNET_COLS: &str = "subnet_id, tenant_id, vpc_id, cidr, is_default, created";
pub(super) const GROUP_COLS: &str =
    "group_id, tenant_id, vpc_id, group_name, description, is_default, created";
pub(super) const IF_COLS: &str =
    "instance_id, tenant_id, vpc_id, subnet_id, ip, mac, card_id, endpoint";

pub(super) fn cidr_of(v: &V) -> Result<Cidr, RepoError> {
    Cidr::parse(&v.text()).map_err(|_| RepoError::Corrupt("cidr"))
}

pub(super) fn vpc_row(r: &[V]) -> Result<VpcRow, RepoError> {
    let [id, tenant, cidr, num, epoch, def, created] = r else {
        return Err(RepoError::Corrupt("vpc row"));
    };
    Ok(VpcRow {
        vpc_id: id.text(),
        tenant_id: tenant.text(),
        cidr: cidr_of(cidr)?,
        vpc_number: u32_of(num),
        epoch: u32_of(epoch),
        is_default: def.boolean(),
        created: u64::try_from(created.int()).unwrap_or(0),
    })
}

pub(super) fn subnet_row(r: &[V]) -> Result<SubnetRow, RepoError> {
    let [id, tenant, vpc, cidr, def, created] = r else {
        return Err(RepoError::Corrupt("subnet row"));
    };
    Ok(SubnetRow {
        subnet_id: id.text(),
        tenant_id: tenant.text(),
        vpc_id: vpc.text(),
        cidr: cidr_of(cidr)?,
        is_default: def.boolean(),
        created: u64::try_from(created.int()).unwrap_or(0),
    })
}

pub(super) fn rule_of(r: &[V]) -> Result<IngressRule, RepoError> {
    let [proto, from, to, cidr] = r else {
        return Err(RepoError::Corrupt("rule row"));
    };
    let protocol = Protocol::parse(&proto.text()).map_err(|_| RepoError::Corrupt("protocol"))?;
    let ports = if protocol.has_ports() {
        let p = |v: &V| u16::try_from(v.int()).unwrap_or(0);
        Some(PortRange::new(p(from), p(to)).map_err(|_| RepoError::Corrupt("ports"))?)
    } else {
        None
    };
    IngressRule::new(protocol, ports, cidr_of(cidr)?).map_err(|_| RepoError::Corrupt("rule"))
}

pub(super) fn rule_params(group: &str, r: &IngressRule) -> Vec<V> {
    let (from, to) = r.ports.map_or((0, 0), |p| (p.from, p.to));
    vec![
        t(group),
        t(r.protocol.as_str()),
        V::I(from.into()),
        V::I(to.into()),
        t(&r.source.cidr().to_string()),
    ]
}

pub(super) fn groups_where(
    db: &mut dyn Db,
    cond: &str,
    params: &[V],
) -> Result<Vec<SecurityGroupRow>, RepoError> {
    let rows = db.query(
        &format!(
            "SELECT {GROUP_COLS} FROM security_groups WHERE {cond} ORDER BY created, group_id"
        ),
        params,
    )?;
    let mut out = Vec::new();
    for r in rows {
        let [id, tenant, vpc, name, desc, def, created] = r.as_slice() else {
            return Err(RepoError::Corrupt("group row"));
        };
        let ingress = db
            .query(
                "SELECT protocol, from_port, to_port, cidr FROM sg_ingress WHERE group_id = ?1 ORDER BY seq",
                std::slice::from_ref(id),
            )?
            .iter()
            .map(|r| rule_of(r))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(SecurityGroupRow {
            group_id: id.text(),
            tenant_id: tenant.text(),
            vpc_id: vpc.text(),
            group_name: name.text(),
            description: desc.text(),
            is_default: def.boolean(),
            ingress,
            created: u64::try_from(created.int()).unwrap_or(0),
        });
    }
    Ok(out)
}

pub(super) fn interfaces_where(
    db: &mut dyn Db,
    cond: &str,
    params: &[V],
) -> Result<Vec<InterfaceRow>, RepoError> {
    let rows = db.query(
        &format!("SELECT {IF_COLS} FROM interfaces WHERE {cond} ORDER BY card_id"),
        params,
    )?;
    let mut out = Vec::new();
    for r in rows {
        let [inst, tenant, vpc, subnet, ip, mac, card, endpoint] = r.as_slice() else {
            return Err(RepoError::Corrupt("interface row"));
        };
        let groups = db
            .query(
                "SELECT group_id FROM interface_groups WHERE instance_id = ?1 ORDER BY group_id",
                std::slice::from_ref(inst),
            )?
            .iter()
            .filter_map(|g| g.first().map(V::text))
            .collect();
        out.push(InterfaceRow {
            instance_id: inst.text(),
            tenant_id: tenant.text(),
            vpc_id: vpc.text(),
            subnet_id: subnet.text(),
            ip: Ipv4(u32::try_from(ip.int()).map_err(|_| RepoError::Corrupt("ip"))?),
            mac: Mac::parse(&mac.text()).map_err(|_| RepoError::Corrupt("mac"))?,
            card_id: u32_of(card),
            groups,
            endpoint: endpoint.opt_text(),
        });
    }
    Ok(out)
}

pub(super) fn insert_group(db: &mut dyn Db, g: &SecurityGroupRow) -> Result<(), RepoError> {
    match db.exec(
        &format!("INSERT INTO security_groups ({GROUP_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
        &[
            t(&g.group_id),
            t(&g.tenant_id),
            t(&g.vpc_id),
            t(&g.group_name),
            t(&g.description),
            V::B(g.is_default),
            V::I(i(g.created)),
        ],
    ) {
        Err(RepoError::Conflict) => return Err(refused(NetRefusal::DuplicateGroupName)),
        r => r?,
    };
    for (n, r) in g.ingress.iter().enumerate() {
        let mut p = rule_params(&g.group_id, r);
        p.push(V::I(i64::try_from(n).unwrap_or(0).saturating_add(1)));
        db.exec(
            "INSERT INTO sg_ingress (group_id, protocol, from_port, to_port, cidr, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            &p,
        )?;
    }
    Ok(())
}

pub(super) fn insert_subnet(db: &mut dyn Db, s: &SubnetRow) -> Result<(), RepoError> {
    db.exec(
        &format!("INSERT INTO subnets ({SUBNET_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
        &[
            t(&s.subnet_id),
            t(&s.tenant_id),
            t(&s.vpc_id),
            t(&s.cidr.to_string()),
            V::B(s.is_default),
            V::I(i(s.created)),
        ],
    )
    .map(|_| ())
}

pub(super) fn one_vpc(
    db: &mut dyn Db,
    tenant: &str,
    id: &str,
) -> Result<Option<VpcRow>, RepoError> {
    db.query(
        &format!("SELECT {VPC_COLS} FROM vpcs WHERE tenant_id = ?1 AND vpc_id = ?2"),
        &[t(tenant), t(id)],
    )?
    .first()
    .map(|r| vpc_row(r))
    .transpose()
}

pub(super) fn subnets_where(
    db: &mut dyn Db,
    cond: &str,
    params: &[V],
) -> Result<Vec<SubnetRow>, RepoError> {
    db.query(
        &format!("SELECT {SUBNET_COLS} FROM subnets WHERE {cond} ORDER BY created, subnet_id"),
        params,
    )?
    .iter()
    .map(|r| subnet_row(r))
    .collect()
}
pub(super) fn vpcs_where(
    db: &mut dyn Db,
    cond: &str,
    params: &[V],
) -> Result<Vec<VpcRow>, RepoError> {
    db.query(
        &format!("SELECT {VPC_COLS} FROM vpcs WHERE {cond} ORDER BY created, vpc_id"),
        params,
    )?
    .iter()
    .map(|r| vpc_row(r))
    .collect()
}
