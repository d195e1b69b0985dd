//! The checked network changes, each run in one transaction by [`super::NetStore`]: VPCs,
//! subnets, security groups and their ingress rules, and interface address allocation.

use super::db::{t, Db, V};
use super::rows::{
    groups_where, i, insert_group, insert_subnet, one_vpc, refused, rule_params, subnets_where,
    IF_COLS, VPC_COLS,
};
use super::NetRefusal;
use crate::net::{
    first_free, IngressRule, InterfaceRow, Ipv4, Mac, SecurityGroupRow, SubnetRow, VpcRow,
    MAX_RULES_PER_GROUP,
};
use crate::repo::RepoError;

pub(super) fn create_vpc(
    db: &mut dyn Db,
    v: &VpcRow,
    subnet: Option<&SubnetRow>,
    group: &SecurityGroupRow,
) -> Result<VpcRow, RepoError> {
    let next = db.query("SELECT COALESCE(MAX(vpc_number), 0) + 1 FROM vpcs", &[])?;
    let num = next
        .first()
        .and_then(|r| r.first())
        .map(V::int)
        .ok_or(RepoError::Corrupt("vpc number"))?;
    let vpc_number = u32::try_from(num).map_err(|_| refused(NetRefusal::NoFreeAddress))?;
    let row = VpcRow {
        vpc_number,
        ..v.clone()
    };
    match db.exec(
        &format!("INSERT INTO vpcs ({VPC_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
        &[
            t(&row.vpc_id),
            t(&row.tenant_id),
            t(&row.cidr.to_string()),
            V::I(num),
            V::I(row.epoch.into()),
            V::B(row.is_default),
            V::I(i(row.created)),
        ],
    ) {
        Err(RepoError::Conflict) if row.is_default => {
            return Err(refused(NetRefusal::DefaultExists))
        }
        r => r?,
    };
    if let Some(s) = subnet {
        insert_subnet(db, s)?;
    }
    insert_group(db, group)?;
    Ok(row)
}

pub(super) fn delete_vpc(db: &mut dyn Db, tenant: &str, id: &str) -> Result<(), RepoError> {
    if one_vpc(db, tenant, id)?.is_none() {
        return Err(refused(NetRefusal::NoSuchVpc));
    }
    if !subnets_where(db, "tenant_id = ?1 AND vpc_id = ?2", &[t(tenant), t(id)])?.is_empty() {
        return Err(refused(NetRefusal::VpcHasSubnets));
    }
    db.exec(
        "DELETE FROM sg_ingress WHERE group_id IN (SELECT group_id FROM security_groups WHERE tenant_id = ?1 AND vpc_id = ?2)",
        &[t(tenant), t(id)],
    )?;
    db.exec(
        "DELETE FROM security_groups WHERE tenant_id = ?1 AND vpc_id = ?2",
        &[t(tenant), t(id)],
    )?;
    db.exec(
        "DELETE FROM vpcs WHERE tenant_id = ?1 AND vpc_id = ?2",
        &[t(tenant), t(id)],
    )?;
    Ok(())
}

pub(super) fn create_subnet(db: &mut dyn Db, s: &SubnetRow) -> Result<(), RepoError> {
    let vpc = one_vpc(db, &s.tenant_id, &s.vpc_id)?.ok_or(refused(NetRefusal::NoSuchVpc))?;
    if !vpc.cidr.contains(s.cidr) {
        return Err(refused(NetRefusal::OutsideVpc));
    }
    let others = subnets_where(
        db,
        "tenant_id = ?1 AND vpc_id = ?2",
        &[t(&s.tenant_id), t(&s.vpc_id)],
    )?;
    if others.iter().any(|o| o.cidr.overlaps(s.cidr)) {
        return Err(refused(NetRefusal::Overlap));
    }
    insert_subnet(db, s)
}

pub(super) fn delete_subnet(db: &mut dyn Db, tenant: &str, id: &str) -> Result<(), RepoError> {
    if subnets_where(db, "tenant_id = ?1 AND subnet_id = ?2", &[t(tenant), t(id)])?.is_empty() {
        return Err(refused(NetRefusal::NoSuchSubnet));
    }
    let used = db.query(
        "SELECT COUNT(*) FROM interfaces WHERE subnet_id = ?1",
        &[t(id)],
    )?;
    if used.first().and_then(|r| r.first()).map_or(0, V::int) > 0 {
        return Err(refused(NetRefusal::SubnetInUse));
    }
    db.exec(
        "DELETE FROM subnets WHERE tenant_id = ?1 AND subnet_id = ?2",
        &[t(tenant), t(id)],
    )?;
    Ok(())
}

pub(super) fn create_group(db: &mut dyn Db, g: &SecurityGroupRow) -> Result<(), RepoError> {
    if one_vpc(db, &g.tenant_id, &g.vpc_id)?.is_none() {
        return Err(refused(NetRefusal::NoSuchVpc));
    }
    insert_group(db, g)
}

pub(super) fn change_ingress(
    db: &mut dyn Db,
    tenant: &str,
    group: &str,
    rules: &[IngressRule],
    add: bool,
) -> Result<SecurityGroupRow, RepoError> {
    let g = groups_where(
        db,
        "tenant_id = ?1 AND group_id = ?2",
        &[t(tenant), t(group)],
    )?
    .into_iter()
    .next()
    .ok_or(refused(NetRefusal::NoSuchGroup))?;
    let mut seen: Vec<IngressRule> = Vec::new();
    for r in rules {
        let present = g.ingress.contains(r);
        if seen.contains(r) || (add && present) {
            return Err(refused(NetRefusal::DuplicateRule));
        }
        if !add && !present {
            return Err(refused(NetRefusal::NoSuchRule));
        }
        seen.push(*r);
    }
    if add && g.ingress.len().saturating_add(rules.len()) > MAX_RULES_PER_GROUP {
        return Err(refused(NetRefusal::TooManyRules));
    }
    let seq0 = db
        .query(
            "SELECT COALESCE(MAX(seq), 0) FROM sg_ingress WHERE group_id = ?1",
            &[t(group)],
        )?
        .first()
        .and_then(|r| r.first())
        .map_or(0, V::int);
    for (n, r) in rules.iter().enumerate() {
        let p = rule_params(group, r);
        if add {
            let mut p = p;
            p.push(V::I(
                seq0.saturating_add(i64::try_from(n).unwrap_or(0))
                    .saturating_add(1),
            ));
            db.exec(
                "INSERT INTO sg_ingress (group_id, protocol, from_port, to_port, cidr, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                &p,
            )?;
        } else {
            db.exec(
                "DELETE FROM sg_ingress WHERE group_id = ?1 AND protocol = ?2 AND from_port = ?3 AND to_port = ?4 AND cidr = ?5",
                &p,
            )?;
        }
    }
    groups_where(
        db,
        "tenant_id = ?1 AND group_id = ?2",
        &[t(tenant), t(group)],
    )?
    .into_iter()
    .next()
    .ok_or(refused(NetRefusal::NoSuchGroup))
}

pub(super) fn allocate(
    db: &mut dyn Db,
    tenant: &str,
    instance: &str,
    subnet: &str,
    groups: &[String],
) -> Result<InterfaceRow, RepoError> {
    let s = subnets_where(
        db,
        "tenant_id = ?1 AND subnet_id = ?2",
        &[t(tenant), t(subnet)],
    )?
    .into_iter()
    .next()
    .ok_or(refused(NetRefusal::NoSuchSubnet))?;
    for g in groups {
        let found = groups_where(db, "tenant_id = ?1 AND group_id = ?2", &[t(tenant), t(g)])?;
        match found.first() {
            None => return Err(refused(NetRefusal::NoSuchGroup)),
            Some(f) if f.vpc_id != s.vpc_id => return Err(refused(NetRefusal::GroupInOtherVpc)),
            Some(_) => {}
        }
    }
    let taken: Vec<Ipv4> = db
        .query(
            "SELECT ip FROM interfaces WHERE subnet_id = ?1",
            &[t(subnet)],
        )?
        .iter()
        .filter_map(|r| r.first())
        .filter_map(|v| u32::try_from(v.int()).ok().map(Ipv4))
        .collect();
    let ip = first_free(s.cidr, &taken).ok_or(refused(NetRefusal::NoFreeAddress))?;
    let next = db
        .query("SELECT COALESCE(MAX(card_id), 0) + 1 FROM interfaces", &[])?
        .first()
        .and_then(|r| r.first())
        .map_or(1, V::int);
    let card_id = u32::try_from(next).map_err(|_| refused(NetRefusal::NoFreeAddress))?;
    let mac = Mac::for_card(card_id);
    db.exec(
        &format!("INSERT INTO interfaces ({IF_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
        &[
            t(instance),
            t(tenant),
            t(&s.vpc_id),
            t(subnet),
            V::I(ip.0.into()),
            t(&mac.to_string()),
            V::I(next),
            V::N,
        ],
    )?;
    let mut gs = groups.to_vec();
    gs.sort();
    gs.dedup();
    for g in &gs {
        db.exec(
            "INSERT INTO interface_groups (instance_id, group_id) VALUES (?1, ?2)",
            &[t(instance), t(g)],
        )?;
    }
    Ok(InterfaceRow {
        instance_id: instance.to_string(),
        tenant_id: tenant.to_string(),
        vpc_id: s.vpc_id,
        subnet_id: subnet.to_string(),
        ip,
        mac,
        card_id,
        groups: gs,
        endpoint: None,
    })
}

pub(super) fn release(db: &mut dyn Db, tenant: &str, instance: &str) -> Result<bool, RepoError> {
    let n = db.exec(
        "DELETE FROM interfaces WHERE tenant_id = ?1 AND instance_id = ?2",
        &[t(tenant), t(instance)],
    )?;
    if n > 0 {
        db.exec(
            "DELETE FROM interface_groups WHERE instance_id = ?1",
            &[t(instance)],
        )?;
    }
    Ok(n > 0)
}

pub(super) fn set_endpoint(
    db: &mut dyn Db,
    tenant: &str,
    instance: &str,
    ep: &str,
) -> Result<(), RepoError> {
    let n = db.exec(
        "UPDATE interfaces SET endpoint = ?3 WHERE tenant_id = ?1 AND instance_id = ?2",
        &[t(tenant), t(instance), t(ep)],
    )?;
    if n == 1 {
        Ok(())
    } else {
        Err(RepoError::Stale)
    }
}
