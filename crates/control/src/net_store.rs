//! VPCs, subnets, security groups and network interfaces in both repositories.
//!
//! The logic is written once ([`NetStore`]'s methods are thin wrappers around the functions
//! here) over a minimal SQL executor (`db::Db`) that both engines implement, so SQLite and
//! PostgreSQL cannot drift: the same statements (numbered `?N` parameters; PostgreSQL gets `$N`),
//! the same checks, in one transaction each. Every mutation runs under the store's network lock
//! (the connection's mutex on SQLite, a transaction-scoped advisory lock on PostgreSQL shared by
//! every replica), and the unique indexes (one address per subnet, one MAC and one card id per
//! interface, one default VPC per tenant, one group name per VPC) back it up: two replicas never
//! hand out the same private address.
//!
//! Every query is scoped by tenant: there is no call that reads or changes another tenant's
//! VPC, subnet, group or interface.
//!
//! This file holds the schema, the refusals and the [`NetStore`] trait with its one
//! implementation for both repositories; `db` the executor and each engine's transaction
//! runner, `rows` the column lists, row decoders and shared queries, `ops` the checked
//! changes (create, delete, ingress, address allocation).

mod db;
mod ops;
mod rows;

use crate::net::{IngressRule, InterfaceRow, SecurityGroupRow, SubnetRow, VpcRow};
use crate::pg::PgRepo;
use crate::repo::{RepoError, SqliteRepo};
use db::{t, V};
use ops::{
    allocate, change_ingress, create_group, create_subnet, create_vpc, delete_subnet, delete_vpc,
    release, set_endpoint,
};
use rows::{groups_where, interfaces_where, one_vpc, subnets_where, vpcs_where};

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
