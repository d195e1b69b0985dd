//! The repository contract: one test suite every backend (`SqliteRepo`, `PgRepo`) must pass,
//! so both keep exactly the same semantics (tenant isolation, compare-and-set transitions,
//! cursors, workflows, leases, atomic reservation).

#![allow(clippy::unwrap_used)]

use crate::repo::*;

/// The repository contract, run against every backend (`SqliteRepo` here; the PostgreSQL
/// backend is to run the same function).
#[doc(hidden)]
#[allow(clippy::unwrap_used)]
pub fn contract_suite(r: &dyn Repository) {
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
    };
    r.insert_volume(&vol).unwrap();
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
    assert!(!r.delete_volume("t-b", "vol-1").unwrap());
    assert!(r.delete_volume("t-a", "vol-1").unwrap());
    assert!(r.volumes("t-a").unwrap().is_empty());
    reserve_contract(r);
    crate::workflow::store::contract(r);
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
