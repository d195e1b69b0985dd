//! VPCs, subnets, security groups and network interfaces in both repositories.
//!
//! The logic is written once ([`NetStore`]'s methods are thin wrappers around the functions
//! here) over a minimal SQL executor ([`Db`]) that both engines implement, so SQLite and
//! PostgreSQL cannot drift: the same statements (numbered `?N` parameters; PostgreSQL gets `$N`),
//! the same checks, in one transaction each. Every mutation runs under the store's network lock
//! (the connection's mutex on SQLite, a transaction-scoped advisory lock on PostgreSQL shared by
//! every replica), and the unique indexes (one address per subnet, one MAC and one card id per
//! interface, one default VPC per tenant, one group name per VPC) back it up: two replicas never
//! hand out the same private address.
//!
//! Every query is scoped by tenant: there is no call that reads or changes another tenant's
//! VPC, subnet, group or interface.

use crate::net::{
    first_free, Cidr, IngressRule, InterfaceRow, Ipv4, Mac, PortRange, Protocol, SecurityGroupRow,
    SubnetRow, VpcRow, MAX_RULES_PER_GROUP,
};
use crate::pg::{pg_err, PgRepo};
use crate::repo::{RepoError, SqliteRepo};

/// The migration that adds the network tables (listed in [`crate::schema`]).
pub const SCHEMA: &str = "CREATE TABLE vpcs (
        vpc_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, cidr TEXT NOT NULL,
        vpc_number {INT} NOT NULL UNIQUE, epoch {INT} NOT NULL, is_default {BOOL} NOT NULL,
        created {INT} NOT NULL);
     CREATE INDEX vpcs_by_tenant ON vpcs(tenant_id);
     CREATE UNIQUE INDEX vpcs_one_default ON vpcs(tenant_id) WHERE is_default;
     CREATE TABLE subnets (
        subnet_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, vpc_id TEXT NOT NULL,
        cidr TEXT NOT NULL, is_default {BOOL} NOT NULL, created {INT} NOT NULL);
     CREATE INDEX subnets_by_tenant ON subnets(tenant_id);
     CREATE TABLE security_groups (
        group_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, vpc_id TEXT NOT NULL,
        group_name TEXT NOT NULL, description TEXT NOT NULL, is_default {BOOL} NOT NULL,
        created {INT} NOT NULL, UNIQUE (vpc_id, group_name));
     CREATE INDEX security_groups_by_tenant ON security_groups(tenant_id);
     CREATE TABLE sg_ingress (
        group_id TEXT NOT NULL, seq {INT} NOT NULL, protocol TEXT NOT NULL,
        from_port {INT} NOT NULL, to_port {INT} NOT NULL, cidr TEXT NOT NULL,
        PRIMARY KEY (group_id, protocol, from_port, to_port, cidr));
     CREATE TABLE interfaces (
        instance_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, vpc_id TEXT NOT NULL,
        subnet_id TEXT NOT NULL, ip {INT} NOT NULL, mac TEXT NOT NULL UNIQUE,
        card_id {INT} NOT NULL UNIQUE, endpoint TEXT, UNIQUE (subnet_id, ip));
     CREATE INDEX interfaces_by_tenant ON interfaces(tenant_id);
     CREATE TABLE interface_groups (
        instance_id TEXT NOT NULL, group_id TEXT NOT NULL, PRIMARY KEY (instance_id, group_id));";

/// Why a network change was refused (nothing was written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NetRefusal {
    #[error("no such VPC")]
    NoSuchVpc,
    #[error("no such subnet")]
    NoSuchSubnet,
    #[error("no such security group")]
    NoSuchGroup,
    #[error("the VPC still has subnets")]
    VpcHasSubnets,
    #[error("the subnet still has instances")]
    SubnetInUse,
    #[error("the block is not inside the VPC")]
    OutsideVpc,
    #[error("the block overlaps another subnet of the VPC")]
    Overlap,
    #[error("the subnet has no free address")]
    NoFreeAddress,
    #[error("the security group belongs to another VPC")]
    GroupInOtherVpc,
    #[error("a security group of that name exists in the VPC")]
    DuplicateGroupName,
    #[error("the rule already exists")]
    DuplicateRule,
    #[error("no such rule")]
    NoSuchRule,
    #[error("too many rules")]
    TooManyRules,
    #[error("the tenant already has a default VPC")]
    DefaultExists,
}

impl NetRefusal {
    /// The stable code the customer sees.
    pub fn code(self) -> &'static str {
        match self {
            NetRefusal::NoSuchVpc => "no_such_vpc",
            NetRefusal::NoSuchSubnet => "no_such_subnet",
            NetRefusal::NoSuchGroup => "no_such_security_group",
            NetRefusal::VpcHasSubnets => "vpc_has_subnets",
            NetRefusal::SubnetInUse => "subnet_in_use",
            NetRefusal::OutsideVpc => "cidr_outside_vpc",
            NetRefusal::Overlap => "cidr_conflict",
            NetRefusal::NoFreeAddress => "no_free_address",
            NetRefusal::GroupInOtherVpc => "security_group_in_other_vpc",
            NetRefusal::DuplicateGroupName => "duplicate_group_name",
            NetRefusal::DuplicateRule => "duplicate_rule",
            NetRefusal::NoSuchRule => "no_such_rule",
            NetRefusal::TooManyRules => "rules_limit_exceeded",
            NetRefusal::DefaultExists => "default_vpc_exists",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            NetRefusal::NoSuchVpc | NetRefusal::NoSuchSubnet | NetRefusal::NoSuchGroup => 404,
            NetRefusal::OutsideVpc
            | NetRefusal::GroupInOtherVpc
            | NetRefusal::NoSuchRule
            | NetRefusal::TooManyRules => 400,
            NetRefusal::VpcHasSubnets
            | NetRefusal::SubnetInUse
            | NetRefusal::Overlap
            | NetRefusal::NoFreeAddress
            | NetRefusal::DuplicateGroupName
            | NetRefusal::DuplicateRule
            | NetRefusal::DefaultExists => 409,
        }
    }
}

/// Network state; a part of every [`crate::repo::Repository`].
pub trait NetStore {
    /// Stores a new VPC with its default security group (and, for a default VPC, its default
    /// subnet), giving it the next free VPC number; returns the row as stored.
    fn create_vpc(
        &self,
        v: &VpcRow,
        subnet: Option<&SubnetRow>,
        group: &SecurityGroupRow,
    ) -> Result<VpcRow, RepoError>;
    fn vpcs(&self, tenant: &str) -> Result<Vec<VpcRow>, RepoError>;
    fn vpc(&self, tenant: &str, id: &str) -> Result<Option<VpcRow>, RepoError>;
    fn default_vpc(&self, tenant: &str) -> Result<Option<VpcRow>, RepoError>;
    /// Deletes a VPC and its security groups; refused while it has subnets.
    fn delete_vpc(&self, tenant: &str, id: &str) -> Result<(), RepoError>;

    /// Stores a subnet: its VPC must be the tenant's and contain it, and no other subnet of the
    /// VPC may overlap it.
    fn create_subnet(&self, s: &SubnetRow) -> Result<(), RepoError>;
    fn subnets(&self, tenant: &str) -> Result<Vec<SubnetRow>, RepoError>;
    /// Deletes a subnet; refused while an interface uses it.
    fn delete_subnet(&self, tenant: &str, id: &str) -> Result<(), RepoError>;

    /// Stores a group (no rules) in the tenant's VPC; names are unique per VPC.
    fn create_security_group(&self, g: &SecurityGroupRow) -> Result<(), RepoError>;
    fn security_groups(&self, tenant: &str) -> Result<Vec<SecurityGroupRow>, RepoError>;
    /// Adds (`add`) or removes ingress rules, all or none: adding one that exists or removing
    /// one that does not is refused. Returns the group as changed.
    fn change_ingress(
        &self,
        tenant: &str,
        group: &str,
        rules: &[IngressRule],
        add: bool,
    ) -> Result<SecurityGroupRow, RepoError>;

    /// Gives `instance` an interface in the tenant's `subnet`, in `groups` (the tenant's, of the
    /// subnet's VPC): the lowest free usable address, a fresh card id and its MAC, atomically.
    fn allocate_interface(
        &self,
        tenant: &str,
        instance: &str,
        subnet: &str,
        groups: &[String],
    ) -> Result<InterfaceRow, RepoError>;
    fn interfaces(&self, tenant: &str) -> Result<Vec<InterfaceRow>, RepoError>;
    fn set_interface_endpoint(
        &self,
        tenant: &str,
        instance: &str,
        endpoint: &str,
    ) -> Result<(), RepoError>;
    /// Frees the instance's address, MAC and card id (`false` when it had none).
    fn release_interface(&self, tenant: &str, instance: &str) -> Result<bool, RepoError>;
}

/// One SQL value, whichever the engine.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum V {
    I(i64),
    T(String),
    B(bool),
    N,
}

impl V {
    fn int(&self) -> i64 {
        match self {
            V::I(i) => *i,
            V::B(b) => i64::from(*b),
            _ => 0,
        }
    }
    fn text(&self) -> String {
        match self {
            V::T(s) => s.clone(),
            _ => String::new(),
        }
    }
    fn opt_text(&self) -> Option<String> {
        match self {
            V::T(s) => Some(s.clone()),
            _ => None,
        }
    }
    fn boolean(&self) -> bool {
        self.int() != 0
    }
}

fn t(s: &str) -> V {
    V::T(s.to_string())
}

fn u32_of(v: &V) -> u32 {
    u32::try_from(v.int()).unwrap_or(0)
}

/// A transaction of either engine.
pub(crate) trait Db {
    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64, RepoError>;
    fn query(&mut self, sql: &str, params: &[V]) -> Result<Vec<Vec<V>>, RepoError>;
}

struct Lite<'a>(&'a rusqlite::Transaction<'a>);

fn lite_params(p: &[V]) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value as L;
    p.iter()
        .map(|v| match v {
            V::I(i) => L::Integer(*i),
            V::T(s) => L::Text(s.clone()),
            V::B(b) => L::Integer(i64::from(*b)),
            V::N => L::Null,
        })
        .collect()
}

impl Db for Lite<'_> {
    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64, RepoError> {
        let n = self
            .0
            .execute(sql, rusqlite::params_from_iter(lite_params(params)))
            .map_err(lite_err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn query(&mut self, sql: &str, params: &[V]) -> Result<Vec<Vec<V>>, RepoError> {
        use rusqlite::types::ValueRef;
        let mut s = self.0.prepare(sql)?;
        let cols = s.column_count();
        let rows = s.query_map(rusqlite::params_from_iter(lite_params(params)), |r| {
            (0..cols)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        ValueRef::Integer(n) => V::I(n),
                        ValueRef::Text(b) => V::T(String::from_utf8_lossy(b).into_owned()),
                        _ => V::N,
                    })
                })
                .collect::<rusqlite::Result<Vec<V>>>()
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}

fn lite_err(e: rusqlite::Error) -> RepoError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            RepoError::Conflict
        }
        e => RepoError::Sqlite(e),
    }
}

struct Pg<'a, 'b>(&'a mut postgres::Transaction<'b>);

/// `?N` → `$N`.
fn pg_sql(sql: &str) -> String {
    sql.replace('?', "$")
}

impl Db for Pg<'_, '_> {
    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64, RepoError> {
        let boxed = pg_params(params);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            boxed.iter().map(|b| b.as_ref()).collect();
        self.0.execute(&pg_sql(sql), &refs).map_err(pg_err)
    }

    fn query(&mut self, sql: &str, params: &[V]) -> Result<Vec<Vec<V>>, RepoError> {
        use postgres::types::Type;
        let boxed = pg_params(params);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            boxed.iter().map(|b| b.as_ref()).collect();
        let rows = self.0.query(&pg_sql(sql), &refs).map_err(pg_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut row = Vec::with_capacity(r.len());
            for (i, c) in r.columns().iter().enumerate() {
                let v = match *c.type_() {
                    Type::INT8 => r.get::<_, Option<i64>>(i).map_or(V::N, V::I),
                    Type::INT4 => r.get::<_, Option<i32>>(i).map_or(V::N, |n| V::I(n.into())),
                    Type::BOOL => r.get::<_, Option<bool>>(i).map_or(V::N, V::B),
                    Type::TEXT | Type::VARCHAR => r.get::<_, Option<String>>(i).map_or(V::N, V::T),
                    _ => V::N,
                };
                row.push(v);
            }
            out.push(row);
        }
        Ok(out)
    }
}

fn pg_params(p: &[V]) -> Vec<Box<dyn postgres::types::ToSql + Sync>> {
    p.iter()
        .map(|v| -> Box<dyn postgres::types::ToSql + Sync> {
            match v {
                V::I(i) => Box::new(*i),
                V::T(s) => Box::new(s.clone()),
                V::B(b) => Box::new(*b),
                V::N => Box::new(Option::<String>::None),
            }
        })
        .collect()
}

/// The advisory lock every replica takes around a network change (transaction-scoped).
const NET_LOCK: i64 = 0x6275_6c6b_0002;

impl SqliteRepo {
    fn net<T>(&self, f: impl FnOnce(&mut dyn Db) -> Result<T, RepoError>) -> Result<T, RepoError> {
        let mut out = None;
        self.with(|c| {
            let tx = c.transaction()?;
            let r = f(&mut Lite(&tx));
            if r.is_ok() {
                tx.commit()?;
            }
            out = Some(r);
            Ok(())
        })?;
        out.unwrap_or(Err(RepoError::Poisoned))
    }
}

impl SqliteRepo {
    /// A read: the same transaction (SQLite has one connection anyway).
    fn net_read<T>(
        &self,
        f: impl FnOnce(&mut dyn Db) -> Result<T, RepoError>,
    ) -> Result<T, RepoError> {
        self.net(f)
    }
}

impl PgRepo {
    /// A change: one transaction under the network lock every replica takes.
    fn net<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Db) -> Result<T, RepoError> + Send + 'static,
    ) -> Result<T, RepoError> {
        self.net_tx(true, f)
    }

    /// A read: one transaction (a consistent view), without the lock.
    fn net_read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Db) -> Result<T, RepoError> + Send + 'static,
    ) -> Result<T, RepoError> {
        self.net_tx(false, f)
    }

    fn net_tx<T: Send + 'static>(
        &self,
        lock: bool,
        f: impl FnOnce(&mut dyn Db) -> Result<T, RepoError> + Send + 'static,
    ) -> Result<T, RepoError> {
        self.run(move |c| {
            let mut tx = c.transaction().map_err(pg_err)?;
            if lock {
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&NET_LOCK])
                    .map_err(pg_err)?;
            }
            let r = f(&mut Pg(&mut tx))?;
            tx.commit().map_err(pg_err)?;
            Ok(r)
        })
    }
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn refused(r: NetRefusal) -> RepoError {
    RepoError::Refused(r)
}

const VPC_COLS: &str = "vpc_id, tenant_id, cidr, vpc_number, epoch, is_default, created";
const SUBNET_COLS: &str = "subnet_id, tenant_id, vpc_id, cidr, is_default, created";
const GROUP_COLS: &str =
    "group_id, tenant_id, vpc_id, group_name, description, is_default, created";
const IF_COLS: &str = "instance_id, tenant_id, vpc_id, subnet_id, ip, mac, card_id, endpoint";

fn cidr_of(v: &V) -> Result<Cidr, RepoError> {
    Cidr::parse(&v.text()).map_err(|_| RepoError::Corrupt("cidr"))
}

fn vpc_row(r: &[V]) -> Result<VpcRow, RepoError> {
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

fn subnet_row(r: &[V]) -> Result<SubnetRow, RepoError> {
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

fn rule_of(r: &[V]) -> Result<IngressRule, RepoError> {
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

fn rule_params(group: &str, r: &IngressRule) -> Vec<V> {
    let (from, to) = r.ports.map_or((0, 0), |p| (p.from, p.to));
    vec![
        t(group),
        t(r.protocol.as_str()),
        V::I(from.into()),
        V::I(to.into()),
        t(&r.source.cidr().to_string()),
    ]
}

fn groups_where(
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

fn interfaces_where(
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

fn insert_group(db: &mut dyn Db, g: &SecurityGroupRow) -> Result<(), RepoError> {
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

fn insert_subnet(db: &mut dyn Db, s: &SubnetRow) -> Result<(), RepoError> {
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

fn one_vpc(db: &mut dyn Db, tenant: &str, id: &str) -> Result<Option<VpcRow>, RepoError> {
    db.query(
        &format!("SELECT {VPC_COLS} FROM vpcs WHERE tenant_id = ?1 AND vpc_id = ?2"),
        &[t(tenant), t(id)],
    )?
    .first()
    .map(|r| vpc_row(r))
    .transpose()
}

fn subnets_where(db: &mut dyn Db, cond: &str, params: &[V]) -> Result<Vec<SubnetRow>, RepoError> {
    db.query(
        &format!("SELECT {SUBNET_COLS} FROM subnets WHERE {cond} ORDER BY created, subnet_id"),
        params,
    )?
    .iter()
    .map(|r| subnet_row(r))
    .collect()
}

fn create_vpc(
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

fn delete_vpc(db: &mut dyn Db, tenant: &str, id: &str) -> Result<(), RepoError> {
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

fn create_subnet(db: &mut dyn Db, s: &SubnetRow) -> Result<(), RepoError> {
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

fn delete_subnet(db: &mut dyn Db, tenant: &str, id: &str) -> Result<(), RepoError> {
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

fn create_group(db: &mut dyn Db, g: &SecurityGroupRow) -> Result<(), RepoError> {
    if one_vpc(db, &g.tenant_id, &g.vpc_id)?.is_none() {
        return Err(refused(NetRefusal::NoSuchVpc));
    }
    insert_group(db, g)
}

fn change_ingress(
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

fn allocate(
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

fn release(db: &mut dyn Db, tenant: &str, instance: &str) -> Result<bool, RepoError> {
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

fn set_endpoint(db: &mut dyn Db, tenant: &str, instance: &str, ep: &str) -> Result<(), RepoError> {
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

fn vpcs_where(db: &mut dyn Db, cond: &str, params: &[V]) -> Result<Vec<VpcRow>, RepoError> {
    db.query(
        &format!("SELECT {VPC_COLS} FROM vpcs WHERE {cond} ORDER BY created, vpc_id"),
        params,
    )?
    .iter()
    .map(|r| vpc_row(r))
    .collect()
}

/// Implements [`NetStore`] for a repository type with a `net` transaction runner.
macro_rules! net_store {
    ($t:ty) => {
        impl NetStore for $t {
            fn create_vpc(
                &self,
                v: &VpcRow,
                subnet: Option<&SubnetRow>,
                group: &SecurityGroupRow,
            ) -> Result<VpcRow, RepoError> {
                let (v, s, g) = (v.clone(), subnet.cloned(), group.clone());
                self.net(move |db| create_vpc(db, &v, s.as_ref(), &g))
            }
            fn vpcs(&self, tenant: &str) -> Result<Vec<VpcRow>, RepoError> {
                let tn = t(tenant);
                self.net_read(move |db| vpcs_where(db, "tenant_id = ?1", &[tn]))
            }
            fn vpc(&self, tenant: &str, id: &str) -> Result<Option<VpcRow>, RepoError> {
                let (tn, id) = (tenant.to_string(), id.to_string());
                self.net_read(move |db| one_vpc(db, &tn, &id))
            }
            fn default_vpc(&self, tenant: &str) -> Result<Option<VpcRow>, RepoError> {
                let tn = t(tenant);
                self.net_read(move |db| {
                    Ok(
                        vpcs_where(db, "tenant_id = ?1 AND is_default = ?2", &[tn, V::B(true)])?
                            .into_iter()
                            .next(),
                    )
                })
            }
            fn delete_vpc(&self, tenant: &str, id: &str) -> Result<(), RepoError> {
                let (tn, id) = (tenant.to_string(), id.to_string());
                self.net(move |db| delete_vpc(db, &tn, &id))
            }
            fn create_subnet(&self, s: &SubnetRow) -> Result<(), RepoError> {
                let s = s.clone();
                self.net(move |db| create_subnet(db, &s))
            }
            fn subnets(&self, tenant: &str) -> Result<Vec<SubnetRow>, RepoError> {
                let tn = t(tenant);
                self.net_read(move |db| subnets_where(db, "tenant_id = ?1", &[tn]))
            }
            fn delete_subnet(&self, tenant: &str, id: &str) -> Result<(), RepoError> {
                let (tn, id) = (tenant.to_string(), id.to_string());
                self.net(move |db| delete_subnet(db, &tn, &id))
            }
            fn create_security_group(&self, g: &SecurityGroupRow) -> Result<(), RepoError> {
                let g = g.clone();
                self.net(move |db| create_group(db, &g))
            }
            fn security_groups(&self, tenant: &str) -> Result<Vec<SecurityGroupRow>, RepoError> {
                let tn = t(tenant);
                self.net_read(move |db| groups_where(db, "tenant_id = ?1", &[tn]))
            }
            fn change_ingress(
                &self,
                tenant: &str,
                group: &str,
                rules: &[IngressRule],
                add: bool,
            ) -> Result<SecurityGroupRow, RepoError> {
                let (tn, g, rules) = (tenant.to_string(), group.to_string(), rules.to_vec());
                self.net(move |db| change_ingress(db, &tn, &g, &rules, add))
            }
            fn allocate_interface(
                &self,
                tenant: &str,
                instance: &str,
                subnet: &str,
                groups: &[String],
            ) -> Result<InterfaceRow, RepoError> {
                let (tn, inst, s, gs) = (
                    tenant.to_string(),
                    instance.to_string(),
                    subnet.to_string(),
                    groups.to_vec(),
                );
                self.net(move |db| allocate(db, &tn, &inst, &s, &gs))
            }
            fn interfaces(&self, tenant: &str) -> Result<Vec<InterfaceRow>, RepoError> {
                let tn = t(tenant);
                self.net_read(move |db| interfaces_where(db, "tenant_id = ?1", &[tn]))
            }
            fn set_interface_endpoint(
                &self,
                tenant: &str,
                instance: &str,
                endpoint: &str,
            ) -> Result<(), RepoError> {
                let (tn, inst, ep) = (
                    tenant.to_string(),
                    instance.to_string(),
                    endpoint.to_string(),
                );
                self.net(move |db| set_endpoint(db, &tn, &inst, &ep))
            }
            fn release_interface(&self, tenant: &str, instance: &str) -> Result<bool, RepoError> {
                let (tn, inst) = (tenant.to_string(), instance.to_string());
                self.net(move |db| release(db, &tn, &inst))
            }
        }
    };
}

net_store!(SqliteRepo);
net_store!(PgRepo);
