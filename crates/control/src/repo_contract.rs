//! The repository contract: one test suite every backend (`SqliteRepo`, `PgRepo`) must pass,
//! so both keep exactly the same semantics (tenant isolation, compare-and-set transitions,
//! cursors, workflows, leases, atomic reservation).

#![allow(clippy::unwrap_used)]

use crate::repo::*;

mod creating;

/// The repository contract, run against every backend (`SqliteRepo` here; the PostgreSQL
/// backend is to run the same function).
#[doc(hidden)]
#[allow(clippy::unwrap_used)]
pub fn contract_suite(r: &dyn Repository) {
    snapshots(r);
    creating::creating_volumes(r);
    r.put_customer(&CustomerRow {
        access_key_id: "AKIDA0000001".into(),
        tenant_id: "t-a".into(),
        wrapped_secret: vec![1, 2],
    })
    .unwrap();
    assert!(matches!(
        r.put_customer(&CustomerRow {
            access_key_id: "AKIDA0000001".into(),
            tenant_id: "t-b".into(),
            wrapped_secret: vec![]
        }),
        Err(RepoError::Conflict)
    ));
    assert_eq!(
        r.customer("AKIDA0000001").unwrap().unwrap().tenant_id,
        "t-a"
    );
    assert!(r.first_use_of_signature("s1", 100, 0).unwrap());
    assert!(!r.first_use_of_signature("s1", 101, 0).unwrap());
    assert!(
        r.first_use_of_signature("s1", 500, 400).unwrap(),
        "old signatures are forgotten"
    );
    r.put_idempotency("t-a", "RunInstances", "tok", "h1", "{\"x\":1}")
        .unwrap();
    assert_eq!(
        r.idempotency("t-a", "RunInstances", "tok")
            .unwrap()
            .unwrap()
            .0,
        "h1"
    );
    assert!(r
        .idempotency("t-b", "RunInstances", "tok")
        .unwrap()
        .is_none());
    r.upsert_host(&HostRow {
        host_id: "host-1".into(),
        addr: "127.0.0.1:1".into(),
        cores: 4,
        dedicated_tenant: None,
    })
    .unwrap();
    r.set_host_dedicated("host-1", Some("t-a")).unwrap();
    assert_eq!(
        r.hosts().unwrap()[0].dedicated_tenant.as_deref(),
        Some("t-a")
    );
    r.append_host_audit("host-1", &[(1, "a".into()), (2, "b".into())])
        .unwrap();
    r.append_host_audit("host-1", &[(2, "b".into())]).unwrap();
    assert_eq!(r.host_audit_cursor("host-1").unwrap(), 2);
    assert_eq!(r.host_audit_count("host-1").unwrap(), 2);
    assert_eq!(
        r.host_audit_after("host-1", 0, 10).unwrap(),
        vec![(1, "a".to_string()), (2, "b".to_string())]
    );
    assert_eq!(
        r.host_audit_after("host-1", 1, 10).unwrap(),
        vec![(2, "b".to_string())]
    );
    assert_eq!(r.host_audit_after("host-1", 0, 1).unwrap().len(), 1);
    assert!(r.host_audit_after("host-2", 0, 10).unwrap().is_empty());
    let inst = InstanceRow {
        instance_id: "i-1".into(),
        tenant_id: "t-a".into(),
        host_id: "host-1".into(),
        image_id: "img".into(),
        vcpus: 2,
        memory_mib: 128,
        cores: 1,
        dedicated: false,
        state: InstanceState::Running,
        created: 1,
        instance_storage_gib: Some(4),
    };
    r.insert_instance(&inst).unwrap();
    assert!(
        r.instance("t-b", "i-1").unwrap().is_none(),
        "tenant isolation"
    );
    assert_eq!(r.instances("t-a").unwrap(), vec![inst.clone()]);
    assert!(r.instances("t-b").unwrap().is_empty());
    assert!(matches!(
        r.set_instance_state(
            "t-b",
            "i-1",
            InstanceState::Running,
            InstanceState::Terminated
        ),
        Err(RepoError::Stale)
    ));
    assert_eq!(
        r.instance("t-a", "i-1").unwrap().unwrap().state,
        InstanceState::Running,
        "other tenant cannot change it"
    );
    // Not in the table: refused before the database is asked.
    assert!(matches!(
        r.set_instance_state("t-a", "i-1", InstanceState::Running, InstanceState::Pending),
        Err(RepoError::Transition(_))
    ));
    // From a state it is no longer in: stale.
    assert!(matches!(
        r.set_instance_state("t-a", "i-1", InstanceState::Stopped, InstanceState::Running),
        Err(RepoError::Stale)
    ));
    assert_eq!(r.live_instances().unwrap().len(), 1);
    let vol = VolumeRow {
        volume_id: "vol-1".into(),
        tenant_id: "t-a".into(),
        size_gib: 1,
        kms_key_id: "key-1".into(),
        ciphertext_blob: vec![9; 10],
        state: VolumeState::Available,
        instance_id: None,
        host_id: None,
        created: 1,
        storage_node: Some("storage-1".into()),
    };
    r.insert_volume(&vol).unwrap();
    assert_eq!(
        r.volume("t-a", "vol-1")
            .unwrap()
            .unwrap()
            .storage_node
            .as_deref(),
        Some("storage-1")
    );
    assert!(r.volume("t-b", "vol-1").unwrap().is_none());
    assert!(matches!(
        r.transition_volume(
            "t-b",
            "vol-1",
            VolumeState::Available,
            VolumeState::Attaching,
            None,
            None
        ),
        Err(RepoError::Stale)
    ));
    r.transition_volume(
        "t-a",
        "vol-1",
        VolumeState::Available,
        VolumeState::Attaching,
        Some("i-1"),
        Some("host-1"),
    )
    .unwrap();
    assert!(matches!(
        r.transition_volume(
            "t-a",
            "vol-1",
            VolumeState::Available,
            VolumeState::Attaching,
            None,
            None
        ),
        Err(RepoError::Stale)
    ));
    assert_eq!(r.volumes_in_transition().unwrap().len(), 1);
    assert!(
        !r.delete_volume("t-a", "vol-1").unwrap(),
        "attached volume cannot be deleted"
    );
    r.transition_volume(
        "t-a",
        "vol-1",
        VolumeState::Attaching,
        VolumeState::Available,
        None,
        None,
    )
    .unwrap();
    // Only a volume DeleteVolume took (`deleting`) is removed; an available one is not.
    assert!(!r.delete_volume("t-a", "vol-1").unwrap());
    r.transition_volume(
        "t-a",
        "vol-1",
        VolumeState::Available,
        VolumeState::Deleting,
        None,
        None,
    )
    .unwrap();
    // Nothing attaches a volume being deleted.
    assert!(r
        .transition_volume(
            "t-a",
            "vol-1",
            VolumeState::Available,
            VolumeState::Attaching,
            Some("i-1"),
            Some("h-1"),
        )
        .is_err());
    assert!(!r.delete_volume("t-b", "vol-1").unwrap());
    assert!(r.delete_volume("t-a", "vol-1").unwrap());
    assert!(r.volumes("t-a").unwrap().is_empty());
    reserve_contract(r);
    net_contract(r);
    crate::workflow::store::contract(r);
}

fn refused<T>(e: Result<T, RepoError>) -> crate::net_store::NetRefusal {
    match e {
        Err(RepoError::Refused(n)) => n,
        Err(e) => panic!("want a refusal, got {e:?}"),
        Ok(_) => panic!("want a refusal, got success"),
    }
}

/// VPCs, subnets, groups and interfaces: tenant scoping, the checks, atomic allocation and
/// release, and that a refused change writes nothing.
#[allow(clippy::unwrap_used)]
fn net_contract(r: &dyn Repository) {
    use crate::net::*;
    use crate::net_store::NetRefusal;
    let cidr = |s: &str| Cidr::parse(s).unwrap();
    let vpc = |id: &str, tenant: &str, block: &str, default: bool| VpcRow {
        vpc_id: id.into(),
        tenant_id: tenant.into(),
        cidr: cidr(block),
        vpc_number: 0,
        epoch: 1,
        is_default: default,
        created: 1,
    };
    let group = |id: &str, tenant: &str, vpc: &str, name: &str| SecurityGroupRow {
        group_id: id.into(),
        tenant_id: tenant.into(),
        vpc_id: vpc.into(),
        group_name: name.into(),
        description: String::new(),
        is_default: name == "default",
        ingress: vec![],
        created: 1,
    };
    let subnet = |id: &str, tenant: &str, vpc: &str, block: &str| SubnetRow {
        subnet_id: id.into(),
        tenant_id: tenant.into(),
        vpc_id: vpc.into(),
        cidr: cidr(block),
        is_default: false,
        created: 1,
    };
    let a = r
        .create_vpc(
            &vpc("vpc-a", "t-na", "10.0.0.0/16", false),
            None,
            &group("sg-a0", "t-na", "vpc-a", "default"),
        )
        .unwrap();
    let b = r
        .create_vpc(
            &vpc("vpc-b", "t-nb", "10.0.0.0/16", false),
            None,
            &group("sg-b0", "t-nb", "vpc-b", "default"),
        )
        .unwrap();
    assert!(
        a.vpc_number >= 1 && b.vpc_number > a.vpc_number,
        "fresh VPC numbers"
    );
    assert_eq!(r.vpcs("t-na").unwrap(), vec![a.clone()]);
    assert!(
        r.vpc("t-nb", "vpc-a").unwrap().is_none(),
        "tenant isolation"
    );
    // One default VPC per tenant.
    let d = r
        .create_vpc(
            &vpc("vpc-d", "t-na", "172.31.0.0/16", true),
            Some(&SubnetRow {
                is_default: true,
                ..subnet("subnet-d", "t-na", "vpc-d", "172.31.0.0/20")
            }),
            &SecurityGroupRow {
                ingress: vec![IngressRule::new(Protocol::All, None, cidr("172.31.0.0/16")).unwrap()],
                ..group("sg-d0", "t-na", "vpc-d", "default")
            },
        )
        .unwrap();
    let d0 = r
        .security_groups("t-na")
        .unwrap()
        .into_iter()
        .find(|g| g.group_id == "sg-d0")
        .unwrap();
    assert_eq!(
        d0.ingress.len(),
        1,
        "a new VPC's group keeps the rules it was made with"
    );
    assert_eq!(r.default_vpc("t-na").unwrap(), Some(d.clone()));
    assert!(r.default_vpc("t-nb").unwrap().is_none());
    assert_eq!(
        refused(r.create_vpc(
            &vpc("vpc-d2", "t-na", "172.31.0.0/16", true),
            None,
            &group("sg-d2", "t-na", "vpc-d2", "default")
        )),
        NetRefusal::DefaultExists
    );
    assert!(
        r.vpc("t-na", "vpc-d2").unwrap().is_none(),
        "nothing written"
    );

    // Subnets: inside the VPC, no overlap, the tenant's VPC only.
    r.create_subnet(&subnet("subnet-a1", "t-na", "vpc-a", "10.0.1.0/24"))
        .unwrap();
    assert_eq!(
        refused(r.create_subnet(&subnet("subnet-x", "t-na", "vpc-a", "10.0.1.128/25"))),
        NetRefusal::Overlap
    );
    assert_eq!(
        refused(r.create_subnet(&subnet("subnet-x", "t-na", "vpc-a", "10.1.0.0/24"))),
        NetRefusal::OutsideVpc
    );
    assert_eq!(
        refused(r.create_subnet(&subnet("subnet-x", "t-nb", "vpc-a", "10.0.2.0/24"))),
        NetRefusal::NoSuchVpc,
        "another tenant's VPC does not exist for it"
    );
    // The same block in another tenant's VPC is fine.
    r.create_subnet(&subnet("subnet-b1", "t-nb", "vpc-b", "10.0.1.0/24"))
        .unwrap();
    r.create_subnet(&subnet("subnet-a2", "t-na", "vpc-a", "10.0.3.0/28"))
        .unwrap();
    assert_eq!(r.subnets("t-nb").unwrap().len(), 1);
    assert!(r
        .subnets("t-na")
        .unwrap()
        .iter()
        .all(|s| s.subnet_id != "subnet-x"));

    // Groups: names unique per VPC, the tenant's VPC only.
    r.create_security_group(&group("sg-a1", "t-na", "vpc-a", "web"))
        .unwrap();
    assert_eq!(
        refused(r.create_security_group(&group("sg-a2", "t-na", "vpc-a", "web"))),
        NetRefusal::DuplicateGroupName
    );
    r.create_security_group(&group("sg-b1", "t-nb", "vpc-b", "web"))
        .unwrap();
    assert_eq!(
        refused(r.create_security_group(&group("sg-x", "t-nb", "vpc-a", "db"))),
        NetRefusal::NoSuchVpc
    );
    let tcp = IngressRule::new(
        Protocol::Tcp,
        Some(PortRange::new(7000, 7000).unwrap()),
        cidr("10.0.0.0/16"),
    )
    .unwrap();
    let icmp = IngressRule::new(Protocol::Icmp, None, cidr("0.0.0.0/0")).unwrap();
    let g = r
        .change_ingress("t-na", "sg-a1", &[tcp, icmp], true)
        .unwrap();
    assert_eq!(g.ingress, vec![tcp, icmp]);
    assert_eq!(
        refused(r.change_ingress("t-na", "sg-a1", &[tcp], true)),
        NetRefusal::DuplicateRule
    );
    assert_eq!(
        refused(r.change_ingress("t-nb", "sg-a1", &[icmp], false)),
        NetRefusal::NoSuchGroup,
        "another tenant cannot revoke"
    );
    let udp = IngressRule::new(
        Protocol::Udp,
        Some(PortRange::new(53, 54).unwrap()),
        cidr("10.0.0.0/8"),
    )
    .unwrap();
    assert_eq!(
        refused(r.change_ingress("t-na", "sg-a1", &[udp, tcp], false)),
        NetRefusal::NoSuchRule,
        "all or nothing"
    );
    let g = r.change_ingress("t-na", "sg-a1", &[tcp], false).unwrap();
    assert_eq!(g.ingress, vec![icmp]);
    let groups = r.security_groups("t-na").unwrap();
    assert!(groups.iter().all(|g| g.tenant_id == "t-na"));
    assert_eq!(
        groups
            .iter()
            .find(|g| g.group_id == "sg-a1")
            .unwrap()
            .ingress,
        vec![icmp]
    );

    // Interfaces: lowest free usable address, unique card ids and MACs, released and reused.
    let n1 = r
        .allocate_interface("t-na", "i-n1", "subnet-a1", &["sg-a1".into()])
        .unwrap();
    let n2 = r
        .allocate_interface("t-na", "i-n2", "subnet-a1", &[])
        .unwrap();
    assert_eq!(n1.ip.to_string(), "10.0.1.4");
    assert_eq!(n2.ip.to_string(), "10.0.1.5");
    assert_ne!(n1.card_id, n2.card_id);
    assert_ne!(n1.mac, n2.mac);
    assert_eq!(n1.mac, Mac::for_card(n1.card_id));
    assert_eq!(n1.vpc_id, "vpc-a");
    let nb = r
        .allocate_interface("t-nb", "i-nb", "subnet-b1", &["sg-b1".into()])
        .unwrap();
    assert_eq!(nb.ip.to_string(), "10.0.1.4", "addresses are per subnet");
    assert_ne!(nb.card_id, n1.card_id, "card ids are global");
    assert_eq!(
        refused(r.allocate_interface("t-nb", "i-x", "subnet-a1", &[])),
        NetRefusal::NoSuchSubnet
    );
    assert_eq!(
        refused(r.allocate_interface("t-na", "i-x", "subnet-a1", &["sg-b1".into()])),
        NetRefusal::NoSuchGroup
    );
    assert_eq!(
        refused(r.allocate_interface("t-na", "i-x", "subnet-a1", &["sg-d0".into()])),
        NetRefusal::GroupInOtherVpc
    );
    assert!(r
        .interfaces("t-na")
        .unwrap()
        .iter()
        .all(|n| n.instance_id != "i-x"));
    // A /28 holds 11 instances; the 12th is refused.
    for k in 0..11 {
        r.allocate_interface("t-na", &format!("i-s{k}"), "subnet-a2", &[])
            .unwrap();
    }
    assert_eq!(
        refused(r.allocate_interface("t-na", "i-s11", "subnet-a2", &[])),
        NetRefusal::NoFreeAddress
    );
    assert!(r.release_interface("t-na", "i-s3").unwrap());
    let again = r
        .allocate_interface("t-na", "i-s11", "subnet-a2", &[])
        .unwrap();
    assert_eq!(
        again.ip.to_string(),
        "10.0.3.7",
        "a released address is reused"
    );
    for k in (0..12).filter(|k| *k != 3) {
        assert!(r.release_interface("t-na", &format!("i-s{k}")).unwrap());
    }
    assert!(
        !r.release_interface("t-nb", "i-n1").unwrap(),
        "not another tenant's"
    );
    r.set_interface_endpoint("t-na", "i-n1", "10.77.0.2:40001")
        .unwrap();
    assert!(matches!(
        r.set_interface_endpoint("t-nb", "i-n1", "10.0.0.9:1"),
        Err(RepoError::Stale)
    ));
    let ifs = r.interfaces("t-na").unwrap();
    let got = ifs.iter().find(|n| n.instance_id == "i-n1").unwrap();
    assert_eq!(got.endpoint.as_deref(), Some("10.77.0.2:40001"));
    assert_eq!(got.groups, vec!["sg-a1".to_string()]);

    // Deletes: a subnet in use and a VPC with subnets are refused; another tenant's are absent.
    assert_eq!(
        refused(r.delete_subnet("t-na", "subnet-a1")),
        NetRefusal::SubnetInUse
    );
    assert_eq!(
        refused(r.delete_subnet("t-nb", "subnet-a1")),
        NetRefusal::NoSuchSubnet
    );
    assert_eq!(
        refused(r.delete_vpc("t-na", "vpc-a")),
        NetRefusal::VpcHasSubnets
    );
    assert_eq!(
        refused(r.delete_vpc("t-nb", "vpc-a")),
        NetRefusal::NoSuchVpc
    );
    assert!(r.release_interface("t-na", "i-n1").unwrap());
    assert!(r.release_interface("t-na", "i-n2").unwrap());
    r.delete_subnet("t-na", "subnet-a1").unwrap();
    r.delete_subnet("t-na", "subnet-a2").unwrap();
    r.delete_vpc("t-na", "vpc-a").unwrap();
    assert!(r.vpc("t-na", "vpc-a").unwrap().is_none());
    assert!(
        r.security_groups("t-na")
            .unwrap()
            .iter()
            .all(|g| g.vpc_id != "vpc-a"),
        "its groups went with it"
    );
    assert_eq!(
        r.vpcs("t-nb").unwrap().len(),
        1,
        "the other tenant's VPC is untouched"
    );
}

/// Placement + insert is one step: a full host is seen full by the next reservation.
#[allow(clippy::unwrap_used)]
fn reserve_contract(r: &dyn Repository) {
    r.upsert_host(&HostRow {
        host_id: "h-res".into(),
        addr: "127.0.0.1:1".into(),
        cores: 3,
        dedicated_tenant: None,
    })
    .unwrap();
    let row = |id: &str| InstanceRow {
        instance_id: id.into(),
        tenant_id: "t-r".into(),
        host_id: String::new(),
        image_id: "img".into(),
        vcpus: 4,
        memory_mib: 64,
        cores: 2,
        dedicated: false,
        state: InstanceState::Pending,
        created: 1,
        instance_storage_gib: None,
    };
    let fits = || -> Chooser {
        Box::new(|hosts: &[HostRow], live: &[InstanceRow]| {
            let h = hosts.iter().find(|h| h.host_id == "h-res")?;
            let used: u32 = live
                .iter()
                .filter(|i| i.host_id == h.host_id)
                .map(|i| i.cores)
                .sum();
            (h.cores.saturating_sub(used) >= 2).then(|| h.host_id.clone())
        })
    };
    assert_eq!(
        r.reserve_instance(&row("i-r1"), fits()).unwrap().as_deref(),
        Some("h-res")
    );
    assert_eq!(r.instance("t-r", "i-r1").unwrap().unwrap().host_id, "h-res");
    assert_eq!(r.reserve_instance(&row("i-r2"), fits()).unwrap(), None);
    assert!(r.instance("t-r", "i-r2").unwrap().is_none());
}

/// Snapshots: tenant-scoped, compare-and-set states, only a `deleting` one is removed.
fn snapshots(r: &dyn Repository) {
    let snap = SnapshotRow {
        snapshot_id: "snap-c1".into(),
        tenant_id: "t-a".into(),
        volume_id: "vol-c1".into(),
        size_gib: 2,
        kms_key_id: "key-1".into(),
        ciphertext_blob: vec![1, 2, 3],
        state: SnapshotState::Pending,
        storage_node: Some("storage-1".into()),
        created: 7,
    };
    r.insert_snapshot(&snap).unwrap();
    assert!(r.insert_snapshot(&snap).is_err(), "one row per id");
    assert_eq!(r.snapshot("t-a", "snap-c1").unwrap().as_ref(), Some(&snap));
    assert!(r.snapshot("t-b", "snap-c1").unwrap().is_none());
    assert!(r.snapshots("t-b").unwrap().is_empty());
    assert!(matches!(
        r.transition_snapshot(
            "t-a",
            "snap-c1",
            SnapshotState::Completed,
            SnapshotState::Deleting
        ),
        Err(RepoError::Stale)
    ));
    assert!(matches!(
        r.transition_snapshot(
            "t-a",
            "snap-c1",
            SnapshotState::Deleting,
            SnapshotState::Completed
        ),
        Err(RepoError::Transition(_))
    ));
    r.transition_snapshot(
        "t-a",
        "snap-c1",
        SnapshotState::Pending,
        SnapshotState::Completed,
    )
    .unwrap();
    assert!(
        !r.delete_snapshot("t-a", "snap-c1").unwrap(),
        "completed stays"
    );
    assert!(matches!(
        r.transition_snapshot(
            "t-b",
            "snap-c1",
            SnapshotState::Completed,
            SnapshotState::Deleting
        ),
        Err(RepoError::Stale)
    ));
    r.transition_snapshot(
        "t-a",
        "snap-c1",
        SnapshotState::Completed,
        SnapshotState::Deleting,
    )
    .unwrap();
    assert!(!r.delete_snapshot("t-b", "snap-c1").unwrap());
    assert!(r.delete_snapshot("t-a", "snap-c1").unwrap());
    assert!(r.snapshots("t-a").unwrap().is_empty());
}
