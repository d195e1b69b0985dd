//! Signed releases and the deployment service against a fleet of swtpm-backed hosts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bulkhead_audit::AuditLog;
use bulkhead_rot::attest::Verifier;
use bulkhead_rot::deploy::{deploy, DeployError, DeployerAuth, Deployment};
use bulkhead_rot::host::Host;
use bulkhead_rot::release::ReleaseError;
use bulkhead_rot::tpm::MeasurePcr;
use bulkhead_rot::RotError;
use common::*;

struct Fleet {
    k: Keys,
    v1: Artefacts,
    hosts: Vec<SimHost>,
    verifier: Verifier,
    audit_dir: tempfile::TempDir,
    audit: AuditLog,
    tok: Tokens,
}

/// `n` staging hosts provisioned and enrolled at release `base_version`.
fn fleet(n: usize, base_version: u64) -> Fleet {
    let k = keys();
    let staging = env("staging");
    let v1 = Artefacts::new("base", 0);
    let rel = v1.release(&k, base_version, &staging, &[0, 1]);
    let mut verifier = Verifier::new(staging.clone(), MeasurePcr::DEV);
    verifier.accept_release(&rel.unverified_manifest().unwrap());
    let mut hosts = Vec::new();
    for i in 0..n {
        let mut h = SimHost::new(&format!("host-{i}"), &staging, &k.root);
        verifier.enroll(h.provision(&rel, v1.path()).unwrap());
        assert!(h.boot().accepts_customer_work);
        hosts.push(h);
    }
    let audit_dir = tempfile::tempdir().unwrap();
    let (audit, _) = AuditLog::open(&audit_dir.path().join("audit.log")).unwrap();
    Fleet {
        k,
        v1,
        hosts,
        verifier,
        audit_dir,
        audit,
        tok: tokens(),
    }
}

impl Fleet {
    fn run(
        &mut self,
        rel: &bulkhead_rot::release::SignedRelease,
        src: &std::path::Path,
        customer: bool,
    ) -> Result<bulkhead_rot::deploy::DeployReport, RotError> {
        let (identity, token) = if customer {
            (&self.tok.customer, self.tok.customer_token.as_str())
        } else {
            (&self.tok.operator, self.tok.operator_token.as_str())
        };
        let auth = DeployerAuth {
            token,
            identity,
            tokens: &self.tok.verifier,
            revoked: &self.tok.revoked,
        };
        let mut d = Deployment {
            audit: &self.audit,
            root: &self.k.root,
            environment: env("staging"),
            verifier: &mut self.verifier,
        };
        let mut hosts: Vec<&mut Host> = self.hosts.iter_mut().map(|h| &mut h.host).collect();
        deploy(&mut d, &auth, rel, src, &mut hosts)
    }

    fn audit_path(&self) -> std::path::PathBuf {
        self.audit_dir.path().join("audit.log")
    }

    fn last_code(&self) -> (String, String) {
        audit_codes(&self.audit_path()).last().cloned().unwrap()
    }
}

fn release_err(r: Result<bulkhead_rot::deploy::DeployReport, RotError>) -> ReleaseError {
    match r {
        Err(RotError::Deploy(DeployError::Release(e))) => e,
        other => panic!("want a release refusal, got {other:?}"),
    }
}

#[test]
fn bad_releases_and_deployers_are_refused_with_typed_errors_and_audited() {
    if skip("bad_releases_and_deployers_are_refused_with_typed_errors_and_audited") {
        return;
    }
    let mut f = fleet(2, 2);
    let staging = env("staging");
    let v3 = Artefacts::new("v3", 0);

    // Unsigned.
    let unsigned = v3.release(&f.k, 3, &staging, &[]);
    assert_eq!(
        release_err(f.run(&unsigned, v3.path(), false)),
        ReleaseError::Unsigned
    );
    assert_eq!(f.last_code(), ("Deploy".into(), "release_unsigned".into()));

    // One of three.
    let one = v3.release(&f.k, 3, &staging, &[2]);
    assert_eq!(
        release_err(f.run(&one, v3.path(), false)),
        ReleaseError::TooFewSignatures {
            valid: 1,
            threshold: 2
        }
    );
    assert_eq!(f.last_code().1, "release_too_few_signatures");

    // Signed by two keys that are not in the trust root.
    let strangers = keys();
    let foreign = v3.release(&strangers, 3, &staging, &[0, 1]);
    assert!(matches!(
        release_err(f.run(&foreign, v3.path(), false)),
        ReleaseError::TooFewSignatures { valid: 0, .. }
    ));

    // Expired.
    let old = sign(
        &v3.manifest(3, &staging, bulkhead_rot::unix_now() - 1),
        &f.k,
        &[0, 1],
    );
    assert!(matches!(
        release_err(f.run(&old, v3.path(), false)),
        ReleaseError::Expired { .. }
    ));
    assert_eq!(f.last_code().1, "release_expired");

    // Downgrade below the fleet's committed version (2).
    let down = v3.release(&f.k, 1, &staging, &[0, 1]);
    assert_eq!(
        release_err(f.run(&down, v3.path(), false)),
        ReleaseError::Rollback {
            version: 1,
            current: 2
        }
    );
    assert_eq!(f.last_code().1, "release_rollback");

    // Artefact differing from the manifest (a binary swapped after signing).
    let good = v3.release(&f.k, 3, &staging, &[0, 1]);
    let swapped = Artefacts::new("v3", 0);
    std::fs::write(
        swapped.path().join("bulkhead-controller"),
        b"#!/bin/sh\necho pwned\n",
    )
    .unwrap();
    assert!(matches!(
        release_err(f.run(&good, swapped.path(), false)),
        ReleaseError::ArtefactDigestMismatch { ref name, .. } if name == "bulkhead-controller"
    ));
    assert_eq!(f.last_code().1, "release_artefact_mismatch");

    // A customer's token never authorizes a deploy.
    match f.run(&good, v3.path(), true) {
        Err(RotError::Deploy(DeployError::Unauthorized { code, .. })) => {
            assert_eq!(code, "plane_violation");
        }
        other => panic!("want Unauthorized, got {other:?}"),
    }
    assert_eq!(f.last_code(), ("Deploy".into(), "plane_violation".into()));

    // No host was touched by any of the above.
    for h in &f.hosts {
        assert_eq!(h.versions().unwrap(), (Some(2), 2));
        assert!(!h.release_dir(3).exists() && !h.release_dir(1).join("release.json").exists());
    }
    // The hosts refuse the same bad releases on their own too (double check).
    let h = &mut f.hosts[0];
    assert!(matches!(
        h.install(&unsigned, v3.path()),
        Err(RotError::Release(ReleaseError::Unsigned))
    ));
    assert!(matches!(
        h.install(&down, v3.path()),
        Err(RotError::Release(ReleaseError::Rollback { .. }))
    ));
    assert_eq!(
        audit_codes(&f.audit_path())
            .iter()
            .filter(|(op, _)| op == "Deploy")
            .count(),
        7
    );
    bulkhead_audit::verify(&f.audit_path()).expect("audit chain intact");
}

#[test]
fn failed_wave_one_rolls_back_and_leaves_later_waves_untouched_then_good_release_rolls_out() {
    if skip(
        "failed_wave_one_rolls_back_and_leaves_later_waves_untouched_then_good_release_rolls_out",
    ) {
        return;
    }
    let mut f = fleet(5, 1);
    let staging = env("staging");
    // Release 2 is correctly signed but its controller fails its self-test.
    let broken = Artefacts::new("v2-broken", 1);
    let rel2 = broken.release(&f.k, 2, &staging, &[0, 2]);
    match f.run(&rel2, broken.path(), false) {
        Err(RotError::Deploy(DeployError::WaveFailed {
            wave,
            host,
            code,
            rolled_back,
        })) => {
            assert_eq!((wave, host.as_str(), rolled_back), (1, "host-0", 1));
            assert_eq!(code, "health_service_unhealthy");
        }
        other => panic!("want WaveFailed, got {other:?}"),
    }
    // Host 0 is back on release 1 and healthy; hosts 1..4 never saw release 2.
    let h0 = &f.hosts[0];
    assert_eq!(h0.versions().unwrap(), (Some(1), 1));
    assert!(h0.health().unwrap().accepts_customer_work);
    for h in &f.hosts[1..] {
        assert_eq!(h.versions().unwrap(), (Some(1), 1));
        assert!(!h.release_dir(2).exists(), "{} was touched", h.name());
    }
    let codes = audit_codes(&f.audit_path());
    assert!(codes.contains(&("DeployHost".into(), "health_service_unhealthy".into())));
    assert!(codes.contains(&("Rollback".into(), "ok".into())));
    assert_eq!(
        codes.last().unwrap(),
        &("Deploy".into(), "rolled_back_wave_1".into())
    );
    assert!(!codes.iter().any(|(op, _)| op == "DeployWave2"));

    // A good release 3 goes through all three waves (1, 1, 3 hosts), attested after each.
    let good = Artefacts::new("v3", 0);
    let rel3 = good.release(&f.k, 3, &staging, &[1, 2]);
    let report = f.run(&rel3, good.path(), false).expect("deploy v3");
    assert_eq!(
        report.waves.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![1, 1, 3]
    );
    for h in &f.hosts {
        assert_eq!(h.versions().unwrap(), (Some(3), 3));
        assert!(h.health().unwrap().accepts_customer_work);
        // The committed host can no longer unseal its identity under release 1.
        assert!(!h.root.path().join("identity-v1.json").exists());
        assert!(h.root.path().join("identity-v3.json").exists());
    }
    // Old release 1 is now a downgrade for the whole fleet.
    let rel1 = f.v1.release(&f.k, 1, &staging, &[0, 1]);
    let v1_dir = f.v1.path().to_path_buf();
    assert!(matches!(
        release_err(f.run(&rel1, &v1_dir, false)),
        ReleaseError::Rollback { .. }
    ));
    bulkhead_audit::verify(&f.audit_path()).expect("audit chain intact");
}
