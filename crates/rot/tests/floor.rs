//! The anti-rollback floor lives in a TPM NV counter: editing the host's state file, or deleting
//! and re-defining the counter, does not let an older signed release run again. Real swtpm.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bulkhead_rot::host::FLOOR_NV_INDEX;
use bulkhead_rot::release::ReleaseError;
use bulkhead_rot::RotError;
use common::*;

#[test]
fn rollback_below_the_tpm_counter_is_refused_whatever_the_state_file_says() {
    if skip("rollback_below_the_tpm_counter_is_refused_whatever_the_state_file_says") {
        return;
    }
    let k = keys();
    let e = env("staging");
    let art = Artefacts::new("floor", 0);
    let mut h = SimHost::new("host-floor", &e, &k.root);
    let v1 = art.release(&k, 1, &e, &[0, 1]);
    h.provision(&v1, art.path()).unwrap();
    assert_eq!(h.tpm().counter_read(FLOOR_NV_INDEX).unwrap(), Some(1));
    assert_eq!(h.floor().unwrap(), 1);

    // Release 2 installed, staged and committed: the counter goes to 2.
    let v2 = art.release(&k, 2, &e, &[1, 2]);
    h.install(&v2, art.path()).unwrap();
    assert!(h.boot().accepts_customer_work);
    h.stage(2).unwrap();
    assert!(h.boot().accepts_customer_work);
    h.commit().unwrap();
    assert_eq!(h.tpm().counter_read(FLOOR_NV_INDEX).unwrap(), Some(2));

    // Attack 1: root rewrites the state file back to release 1 and asks for it.
    let state = h.root.path().join("state.json");
    std::fs::write(&state, br#"{"committed_version":1,"active_version":1}"#).unwrap();
    assert_eq!(
        h.floor().unwrap(),
        2,
        "the TPM counter, not the file, is the floor"
    );
    match h.activate(1) {
        Err(RotError::Release(ReleaseError::Rollback { version, current })) => {
            assert_eq!((version, current), (1, 2));
        }
        other => panic!("want Rollback, got {other:?}"),
    }
    assert!(matches!(
        h.install(&v1, art.path()),
        Err(RotError::Release(ReleaseError::Rollback { .. }))
    ));

    // Attack 2: delete the counter and define it again. A TPM counter starts at the highest
    // value any of its counters held, so the floor does not come back down.
    h.tpm().counter_undefine(FLOOR_NV_INDEX).unwrap();
    assert_eq!(h.tpm().counter_read(FLOOR_NV_INDEX).unwrap(), None);
    h.tpm().counter_define(FLOOR_NV_INDEX).unwrap();
    let again = h.tpm().counter_raise_to(FLOOR_NV_INDEX, 1).unwrap();
    assert!(again >= 2, "a re-defined counter restarted at {again}");
    assert!(matches!(
        h.activate(1),
        Err(RotError::Release(ReleaseError::Rollback { .. }))
    ));

    // (Here it restarted above 2: the first increment of the new counter.) Going forward still
    // works from the new floor.
    let floor = h.floor().unwrap();
    let next = art.release(&k, floor, &e, &[0, 2]);
    h.install(&next, art.path()).unwrap();
    h.activate(floor).unwrap();
}
