//! The contract of a volume made from a snapshot: recorded `creating` before the KMS may add
//! it to the key family, never attached until `available`, and removable only through
//! `deleting` (DeleteVolume, or the undo of a failed create).

use crate::repo::*;

pub(super) fn creating_volumes(r: &dyn Repository) {
    let vol = |id: &str| VolumeRow {
        volume_id: id.into(),
        tenant_id: "t-a".into(),
        size_gib: 2,
        kms_key_id: "key-1".into(),
        ciphertext_blob: vec![4, 5, 6],
        state: VolumeState::Creating,
        instance_id: None,
        host_id: None,
        created: 9,
        storage_node: Some("storage-1".into()),
    };
    r.insert_volume(&vol("vol-cr1")).unwrap();
    r.insert_volume(&vol("vol-cr2")).unwrap();
    assert_eq!(
        r.volume("t-a", "vol-cr1").unwrap().as_ref(),
        Some(&vol("vol-cr1")),
        "the state round-trips"
    );
    assert!(r.volume("t-b", "vol-cr1").unwrap().is_none());
    // Not a transition the reconciler unwinds: a lost KMS answer keeps it for DeleteVolume.
    assert!(r.volumes_in_transition().unwrap().is_empty());
    // Nothing attaches it, and it is not removed while `creating`.
    assert!(matches!(
        r.transition_volume(
            "t-a",
            "vol-cr1",
            VolumeState::Creating,
            VolumeState::Attaching,
            Some("i-1"),
            Some("host-1"),
        ),
        Err(RepoError::Transition(_))
    ));
    assert!(matches!(
        r.transition_volume(
            "t-a",
            "vol-cr1",
            VolumeState::Available,
            VolumeState::Attaching,
            Some("i-1"),
            Some("host-1"),
        ),
        Err(RepoError::Stale)
    ));
    assert!(!r.delete_volume("t-a", "vol-cr1").unwrap());
    // Keyed: `available`, and only once (compare-and-set).
    r.transition_volume(
        "t-a",
        "vol-cr1",
        VolumeState::Creating,
        VolumeState::Available,
        None,
        None,
    )
    .unwrap();
    assert!(matches!(
        r.transition_volume(
            "t-a",
            "vol-cr1",
            VolumeState::Creating,
            VolumeState::Deleting,
            None,
            None,
        ),
        Err(RepoError::Stale)
    ));
    // Another tenant cannot take it; its owner's delete goes through `deleting`.
    assert!(matches!(
        r.transition_volume(
            "t-b",
            "vol-cr2",
            VolumeState::Creating,
            VolumeState::Deleting,
            None,
            None,
        ),
        Err(RepoError::Stale)
    ));
    r.transition_volume(
        "t-a",
        "vol-cr2",
        VolumeState::Creating,
        VolumeState::Deleting,
        None,
        None,
    )
    .unwrap();
    assert!(r.delete_volume("t-a", "vol-cr2").unwrap());
    r.transition_volume(
        "t-a",
        "vol-cr1",
        VolumeState::Available,
        VolumeState::Deleting,
        None,
        None,
    )
    .unwrap();
    assert!(r.delete_volume("t-a", "vol-cr1").unwrap());
    assert!(r.volumes("t-a").unwrap().is_empty());
}
