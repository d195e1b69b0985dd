//! Measured start, sealed identity and attestation against a real swtpm.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bulkhead_rot::attest::{release_volume_key, AttestError, Verifier};
use bulkhead_rot::identity::HealthReason;
use bulkhead_rot::measure::{EventKind, EventLog};
use bulkhead_rot::tpm::{MeasurePcr, Tpm};
use bulkhead_rot::RotError;
use common::*;

/// A provisioned, booted, enrolled staging host and a staging verifier that accepts its release.
fn healthy_host(name: &str) -> (Keys, Artefacts, SimHost, Verifier) {
    let k = keys();
    let staging = env("staging");
    let art = Artefacts::new("v1", 0);
    let rel = art.release(&k, 1, &staging, &[0, 1]);
    let mut h = SimHost::new(name, &staging, &k.root);
    let enrol = h.provision(&rel, art.path()).expect("provision");
    let health = h.boot();
    assert!(health.accepts_customer_work, "{}", health.summary());
    let mut v = Verifier::new(staging.clone(), MeasurePcr::DEV);
    v.enroll(enrol);
    v.accept_release(&rel.unverified_manifest().unwrap());
    (k, art, h, v)
}

#[test]
fn pcr_policy_and_extend_match_the_tpm() {
    if skip("pcr_policy_and_extend_match_the_tpm") {
        return;
    }
    let sw = bulkhead_rot::swtpm::Swtpm::start().unwrap();
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    let pcr = MeasurePcr::DEV;
    tpm.pcr_reset(pcr).unwrap();
    let d = [0x5au8; 48];
    tpm.pcr_extend(pcr, &d).unwrap();
    let want = bulkhead_rot::tpm::extend(&[0u8; 48], &d);
    assert_eq!(tpm.pcr_read(pcr).unwrap(), want);
    // Sealed to the current value (policy digest computed in software): unseals.
    let blob = tpm.seal(pcr, &want, b"secret").unwrap();
    assert_eq!(tpm.unseal(&blob).unwrap().as_slice(), b"secret");
    // Sealed to a future value: refused now, unseals once the PCR gets there.
    let next = bulkhead_rot::tpm::extend(&want, &d);
    let blob2 = tpm.seal(pcr, &next, b"later").unwrap();
    assert!(matches!(
        tpm.unseal(&blob2),
        Err(RotError::UnsealRefused(_))
    ));
    tpm.pcr_extend(pcr, &d).unwrap();
    assert_eq!(tpm.unseal(&blob2).unwrap().as_slice(), b"later");
    assert!(matches!(tpm.unseal(&blob), Err(RotError::UnsealRefused(_))));
}

#[test]
fn tampered_binary_unseal_fails_host_refuses_and_kms_refuses_keys() {
    if skip("tampered_binary_unseal_fails_host_refuses_and_kms_refuses_keys") {
        return;
    }
    let (_k, _art, mut h, mut v) = healthy_host("host-a");
    let alerts = tempfile::tempdir().unwrap();
    let alert_log = alerts.path().join("audit.log");
    h.set_audit(bulkhead_audit::AuditLog::open(&alert_log).unwrap().0);

    // Healthy: the KMS seals a volume key to the attested host, and the host's unsealed key opens it.
    let vk = [7u8; 64];
    let nonce = v.challenge("host-a").unwrap();
    let ev = h.attest(&nonce).unwrap();
    let blob = release_volume_key(&mut v, &ev, "vol-1", &vk).expect("key for a good host");
    let opened = bulkhead_sealing::open_volume_key(h.host_key().unwrap(), "vol-1", &blob).unwrap();
    assert_eq!(opened.as_ref(), &vk);

    // Flip one byte of a measured binary, as someone copying a binary by hand would.
    let active = h.versions().unwrap().0.unwrap();
    let bin = h.release_dir(active).join("bulkhead-blockcard");
    let mut bytes = std::fs::read(&bin).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x01;
    std::fs::write(&bin, &bytes).unwrap();

    let health = h.boot();
    eprintln!("{}", health.summary());
    assert!(!health.accepts_customer_work);
    assert!(h.host_key().is_none(), "identity must not be available");
    let codes: Vec<&str> = health.reasons.iter().map(|r| r.code()).collect();
    assert!(codes.contains(&"artefact_mismatch"), "{codes:?}");
    assert!(codes.contains(&"unseal_failed"), "{codes:?}");
    assert!(codes.contains(&"measurement_mismatch"), "{codes:?}");
    assert!(health
        .reasons
        .iter()
        .any(|r| matches!(r, HealthReason::ArtefactMismatch { detail } if detail.contains("bulkhead-blockcard"))));
    // The health verdict serializes for the controller's health API.
    let json = serde_json::to_string(&health).unwrap();
    assert!(json.contains("\"accepts_customer_work\":false") && json.contains("unseal_failed"));

    // The refusal was raised as alerts in the host's audit log.
    let alert_codes: Vec<String> = std::fs::read_to_string(&alert_log)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["entry"]["code"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        alert_codes.iter().any(|c| c == "artefact_mismatch"),
        "{alert_codes:?}"
    );

    // The KMS refuses: its verifier sees measurements no signed release has.
    let nonce = v.challenge("host-a").unwrap();
    let ev = h.attest(&nonce).unwrap();
    let err = release_volume_key(&mut v, &ev, "vol-1", &vk).unwrap_err();
    assert!(
        matches!(
            err,
            RotError::Attest(AttestError::UnknownMeasurements { .. })
        ),
        "{err}"
    );

    // Putting the original byte back restores the host.
    bytes[last] ^= 0x01;
    std::fs::write(&bin, &bytes).unwrap();
    assert!(h.boot().accepts_customer_work);
}

#[test]
fn replayed_quote_is_refused() {
    if skip("replayed_quote_is_refused") {
        return;
    }
    let (_k, _art, mut h, mut v) = healthy_host("host-a");
    let nonce = v.challenge("host-a").unwrap();
    let ev = h.attest(&nonce).unwrap();
    let ok = v.verify(&ev).expect("fresh quote");
    assert_eq!(ok.release_version, 1);
    assert_eq!(v.verify(&ev), Err(AttestError::NonceUnknownOrReplayed));
    // A nonce the verifier never issued.
    let ev2 = h.attest(&[9u8; 32]).unwrap();
    assert_eq!(v.verify(&ev2), Err(AttestError::NonceUnknownOrReplayed));
    // A nonce issued to another host.
    let other = v.challenge("host-b").unwrap();
    let ev3 = h.attest(&other).unwrap();
    assert_eq!(v.verify(&ev3), Err(AttestError::NonceUnknownOrReplayed));
    // An expired nonce.
    let mut v2 =
        Verifier::new(env("staging"), MeasurePcr::DEV).with_nonce_ttl(std::time::Duration::ZERO);
    v2.enroll(v.enrollment("host-a").unwrap().clone());
    let n = v2.challenge("host-a").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let ev4 = h.attest(&n).unwrap();
    assert_eq!(v2.verify(&ev4), Err(AttestError::NonceExpired));
    // An event log that does not match the quote.
    let n = v.challenge("host-a").unwrap();
    let mut ev5 = h.attest(&n).unwrap();
    let log = EventLog::parse(&ev5.event_log).unwrap();
    ev5.event_log = log
        .to_jsonl()
        .unwrap()
        .lines()
        .take(2)
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(v.verify(&ev5), Err(AttestError::LogDoesNotMatchQuote));
}

#[test]
fn quote_from_another_hosts_ak_is_refused() {
    if skip("quote_from_another_hosts_ak_is_refused") {
        return;
    }
    let (k, art, _a, mut v) = healthy_host("host-a");
    // Host B: same release, its own TPM (so its own AK), enrolled too.
    let staging = env("staging");
    let rel = art.release(&k, 1, &staging, &[1, 2]);
    let mut b = SimHost::new("host-b", &staging, &k.root);
    let enrol_b = b.provision(&rel, art.path()).unwrap();
    assert_ne!(
        enrol_b.ak,
        v.enrollment("host-a").unwrap().ak,
        "distinct TPMs, distinct AKs"
    );
    v.enroll(enrol_b);
    assert!(b.boot().accepts_customer_work);
    // B answers a challenge issued to A, claiming to be A.
    let nonce = v.challenge("host-a").unwrap();
    let mut ev = b.attest(&nonce).unwrap();
    ev.host = "host-a".into();
    assert_eq!(
        v.verify(&ev),
        Err(AttestError::BadSignature("host-a".into()))
    );
    // A host nobody enrolled.
    ev.host = "host-z".into();
    assert_eq!(
        v.verify(&ev),
        Err(AttestError::UnknownHost("host-z".into()))
    );
    // A tampered attest structure under a valid signature.
    let nonce = v.challenge("host-b").unwrap();
    let mut ev = b.attest(&nonce).unwrap();
    let mut raw = hex::decode(&ev.quote.attest).unwrap();
    let n = raw.len() - 1;
    raw[n] ^= 1;
    ev.quote.attest = hex::encode(raw);
    assert_eq!(
        v.verify(&ev),
        Err(AttestError::BadSignature("host-b".into()))
    );
}

#[test]
fn staging_identity_is_refused_in_production_and_reprovisioning_changes_the_ak() {
    if skip("staging_identity_is_refused_in_production_and_reprovisioning_changes_the_ak") {
        return;
    }
    let (k, art, mut h, v_staging) = healthy_host("host-a");
    let enrol = v_staging.enrollment("host-a").unwrap().clone();
    let production = env("production");
    let prod_rel = art.release(&k, 1, &production, &[0, 2]);
    let mut v = Verifier::new(production.clone(), MeasurePcr::DEV);
    v.accept_release(&prod_rel.unverified_manifest().unwrap());

    // The staging enrolment presented to production.
    v.enroll(enrol.clone());
    let nonce = v.challenge("host-a").unwrap();
    let ev = h.attest(&nonce).unwrap();
    assert!(matches!(
        v.verify(&ev),
        Err(AttestError::EnvironmentMismatch { .. })
    ));

    // Even with an enrolment record rewritten to say "production", the measured environment
    // (first event, bound into the quoted PCR) still says staging.
    let mut forged = enrol.clone();
    forged.environment = production.clone();
    v.enroll(forged);
    let nonce = v.challenge("host-a").unwrap();
    let ev = h.attest(&nonce).unwrap();
    match v.verify(&ev) {
        Err(AttestError::EnvironmentMismatch {
            enrolled, verifier, ..
        }) => {
            assert_eq!(
                (enrolled.as_str(), verifier.as_str()),
                ("staging", "production")
            );
        }
        other => panic!("want EnvironmentMismatch, got {other:?}"),
    }
    // And a host configured for staging refuses to install a production release.
    let err = h.install(&prod_rel, art.path()).unwrap_err();
    assert!(matches!(
        err,
        RotError::Release(bulkhead_rot::release::ReleaseError::WrongEnvironment { .. })
    ));

    // Re-provisioning: clearing the identity gives a new AK; the old sealed identity is gone.
    h.clear_identity().unwrap();
    let h2 = h.boot();
    assert!(!h2.accepts_customer_work);
    assert_eq!(h2.reasons, vec![HealthReason::NotProvisioned]);
    // The TPM's anti-rollback counter outlives the clear (a new counter starts above every
    // value an old one held): re-provisioning with the same release 1 is a rollback ...
    let rel = art.release(&k, 1, &env("staging"), &[0, 1]);
    assert!(matches!(
        h.provision(&rel, art.path()),
        Err(RotError::Release(
            bulkhead_rot::release::ReleaseError::Rollback { .. }
        ))
    ));
    // ... and a newer release provisions.
    let rel = art.release(&k, 2, &env("staging"), &[0, 1]);
    let re = h.provision(&rel, art.path()).unwrap();
    assert_ne!(
        re.ak, enrol.ak,
        "re-provisioned host has a new attestation key"
    );
    assert_ne!(re.host_public, enrol.host_public, "and a new host key");
    assert!(h.boot().accepts_customer_work);
}

#[test]
fn live_update_replaces_a_component_without_restart_and_attests() {
    if skip("live_update_replaces_a_component_without_restart_and_attests") {
        return;
    }
    let (k, art, mut h, mut v) = healthy_host("host-a");
    let staging = env("staging");
    let base = art.manifest(1, &staging, 0);
    // Release 2: the same set with a new "hypervisor" (here the block card binary), as a live
    // update of release 1.
    let new = Artefacts::new("v1", 0);
    std::fs::write(
        new.path().join("bulkhead-blockcard"),
        "#!/bin/sh\n# live-updated build\nexit 0\n",
    )
    .unwrap();
    let mut m2 = new.manifest(2, &staging, bulkhead_rot::unix_now() + 3600);
    m2.make_live_update(&base, "bulkhead-blockcard").unwrap();
    let rel2 = sign(&m2, &k, &[0, 2]);
    v.accept_release(&m2);

    h.live_update(&rel2, new.path()).expect("live update");
    assert!(
        h.host_key().is_some(),
        "identity still available, nothing restarted"
    );
    let nonce = v.challenge("host-a").unwrap();
    let ok = v
        .verify(&h.attest(&nonce).unwrap())
        .expect("attests after live update");
    assert_eq!(ok.release_version, 2);
    assert_eq!(
        ok.pcr_value,
        m2.live_update.as_ref().unwrap().expected_pcr_after
    );
    // The next cold start measures the new set and unseals the cold-boot identity.
    let health = h.boot();
    assert!(health.accepts_customer_work, "{}", health.summary());
    assert_eq!(health.pcr_value.as_deref(), Some(m2.expected_pcr.as_str()));
    let nonce = v.challenge("host-a").unwrap();
    assert_eq!(
        v.verify(&h.attest(&nonce).unwrap())
            .unwrap()
            .release_version,
        2
    );
}

/// The KMS's check of a sealed host (issue 17): boot evidence from a real TPM, verified by the
/// same `Verifier` the KMS runs (`verify_boot_for_instance`, which calls
/// `bulkhead_rot::boot::verify_boot`): accepted when every boot PCR is exactly the enrolment's
/// (image manifest + configuration disk), bound to the instance and over a nonce issued to the
/// host; refused — so no key is released — when the manifest's PCR 4 differs, when PCR 23 was
/// not extended with the enrolled disk, for another instance, on replay, and for a host not
/// enrolled as sealed.
#[test]
fn the_kms_verifier_releases_to_a_sealed_host_only_on_its_exact_boot_pcrs() {
    use bulkhead_rot::attest::SealedEnrollment;
    use bulkhead_rot::boot::{
        BootChainError, BootEvidence, ExpectedPcrs, BOOT_PCRS, EVIDENCE_FORMAT,
    };
    use bulkhead_rot::swtpm::Swtpm;
    use tss_esapi::handles::PcrHandle;
    use tss_esapi::interface_types::algorithm::HashingAlgorithm;
    use tss_esapi::structures::{Digest, DigestValues};

    if skip("sealed KMS verifier") {
        return;
    }
    let swtpm = Swtpm::start().expect("swtpm");
    let disk_digest = [0x5a; 32];
    // What the image's PID 1 does: extend SHA-256 PCR 23 with the configuration disk's digest.
    let extend_23 = |digest: [u8; 32]| {
        let tcti = std::str::FromStr::from_str(&swtpm.tcti()).expect("tcti");
        let mut ctx = tss_esapi::Context::new(tcti).expect("context");
        let mut v = DigestValues::new();
        v.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).unwrap(),
        );
        ctx.execute_with_nullauth_session(|c| c.pcr_extend(PcrHandle::Pcr23, v))
            .expect("extend");
    };
    extend_23(disk_digest);
    let mut tpm = Tpm::open(&swtpm.tcti()).expect("open");
    let ak = tpm.ak_public().expect("ak");
    let dev = env("dev");
    let mut v = Verifier::new(dev.clone(), MeasurePcr::DEV);
    // The image manifest: this TPM's PCRs 4, 9, 11, 12 (no firmware here: all zero), exactly.
    let manifest = |pcr4: &str| {
        format!(
            r#"{{"expected_pcrs":{{"4":"{pcr4}","9":"{z}","11":"{z}","12":"{z}"}}}}"#,
            z = "00".repeat(32)
        )
    };
    let expected = ExpectedPcrs::for_host(manifest(&"00".repeat(32)).as_bytes(), &disk_digest)
        .expect("expectations");
    v.enroll_sealed(SealedEnrollment {
        host: "sealed-1".into(),
        environment: dev.clone(),
        ak: ak.clone(),
        expected,
        host_public: "aa".into(),
    });
    // Same TPM, enrolled with a manifest whose PCR 4 is another image's.
    let other_image = ExpectedPcrs::for_host(manifest(&"01".repeat(32)).as_bytes(), &disk_digest)
        .expect("expectations");
    v.enroll_sealed(SealedEnrollment {
        host: "sealed-2".into(),
        environment: dev.clone(),
        ak: ak.clone(),
        expected: other_image,
        host_public: "bb".into(),
    });
    // Same TPM, enrolled with another configuration disk.
    let other_disk = ExpectedPcrs::for_host(manifest(&"00".repeat(32)).as_bytes(), &[0x5b; 32])
        .expect("expectations");
    v.enroll_sealed(SealedEnrollment {
        host: "sealed-3".into(),
        environment: dev,
        ak: ak.clone(),
        expected: other_disk,
        host_public: "cc".into(),
    });
    let mut quote = |host: &str, nonce: &[u8; 32], instance: &str| -> BootEvidence {
        let qd = bulkhead_rot::attest::qualifying_data(nonce, Some(instance));
        let (quote, values) = tpm.quote_sha256_pcrs(&BOOT_PCRS, &qd).expect("quote");
        BootEvidence {
            format: EVIDENCE_FORMAT.into(),
            host: host.into(),
            ak: ak.clone(),
            quote,
            pcrs: BOOT_PCRS
                .iter()
                .copied()
                .zip(values.iter().map(hex::encode))
                .collect(),
            ek_certificate: None,
            activated: None,
        }
    };

    let n = v.challenge("sealed-1").unwrap();
    let ev = quote("sealed-1", &n, "i-1");
    let ok = v
        .verify_boot_for_instance(&ev, "i-1")
        .expect("exact boot PCRs");
    assert_eq!(ok.host_public, "aa");
    // Replayed: the nonce was consumed.
    assert_eq!(
        v.verify_boot_for_instance(&ev, "i-1"),
        Err(AttestError::NotBoundToInstance("i-1".into()))
    );
    // Bound to another instance than the one the customer named.
    let n = v.challenge("sealed-1").unwrap();
    let ev = quote("sealed-1", &n, "i-2");
    assert_eq!(
        v.verify_boot_for_instance(&ev, "i-1"),
        Err(AttestError::NotBoundToInstance("i-1".into()))
    );
    // The release manifest's PCR 4 differs from the boot: refused naming PCR 4.
    let n = v.challenge("sealed-2").unwrap();
    let ev = quote("sealed-2", &n, "i-1");
    match v.verify_boot_for_instance(&ev, "i-1") {
        Err(AttestError::BootChain(BootChainError::PcrMismatch { pcr: 4, all, .. })) => {
            assert_eq!(all, vec![4]);
        }
        other => panic!("another image's PCR 4 was not refused: {other:?}"),
    }
    // Another configuration disk: PCR 23 differs.
    let n = v.challenge("sealed-3").unwrap();
    let ev = quote("sealed-3", &n, "i-1");
    match v.verify_boot_for_instance(&ev, "i-1") {
        Err(e @ AttestError::BootChain(BootChainError::PcrMismatch { pcr: 23, .. })) => {
            assert_eq!(e.code(), "boot_pcr_mismatch");
        }
        other => panic!("another configuration disk was not refused: {other:?}"),
    }
    // Not enrolled as sealed.
    let ev = quote("sealed-9", &[0; 32], "i-1");
    assert_eq!(
        v.verify_boot_for_instance(&ev, "i-1"),
        Err(AttestError::UnknownHost("sealed-9".into()))
    );
}

/// A release applied on the running host (`DeployRelease`) is measured by the agent before it
/// quotes: the evidence then shows the boot release and the applied one, each signed; a host
/// that claims a release it did not apply, or applied one the verifier never accepted, or under
/// another version's name, is refused.
#[test]
fn an_applied_release_is_measured_by_the_agent_and_attests_claims_fail() {
    use bulkhead_rot::measure::release_applied_digest;
    use bulkhead_rot_proto::{parse_reply, AgentCall, AgentRequest, AppliedRelease, HostEvidence};
    use std::io::{BufRead, BufReader, Write};
    if skip("an_applied_release_is_measured_by_the_agent_and_attests_claims_fail") {
        return;
    }
    let (_k, _art, mut h, mut v) = healthy_host("host-a");
    let staging = env("staging");
    let dep = Artefacts::new("deploy-v2", 0);
    let m2 = dep.manifest(2, &staging, bulkhead_rot::unix_now() + 3600);
    let d2 = release_applied_digest(2, &m2.expected_pcr_value().unwrap());
    v.accept_release(&m2);

    // A claim: the log names release 2 applied, the PCR was never extended with it.
    let nonce = v.challenge("host-a").unwrap();
    let mut ev = h.attest(&nonce).unwrap();
    let mut log = EventLog::parse(&ev.event_log).unwrap();
    log.push_release_applied(2, &d2);
    ev.event_log = log.to_jsonl().unwrap();
    assert_eq!(
        v.verify(&ev).unwrap_err(),
        AttestError::LogDoesNotMatchQuote
    );

    // Through the agent's line protocol: measure release 2, then quote.
    let ask = |h: &mut SimHost, call: &AgentCall| -> HostEvidence {
        std::thread::scope(|s| {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            s.spawn(move || bulkhead_rot::agent::serve_connection(h, b));
            let mut w = a.try_clone().unwrap();
            writeln!(w, "{}", AgentRequest::encode_call(call)).unwrap();
            let mut line = String::new();
            BufReader::new(&a).read_line(&mut line).unwrap();
            a.shutdown(std::net::Shutdown::Both).unwrap();
            parse_reply(line.trim_end().as_bytes()).unwrap()
        })
    };
    let nonce = v.challenge("host-a").unwrap();
    let call = AgentCall {
        nonce,
        instance: None,
        credential: None,
        release_applied: Some(AppliedRelease {
            version: 2,
            manifest_sha384: d2,
        }),
    };
    let HostEvidence::Measured(ev) = ask(&mut h, &call) else {
        panic!("want measured evidence")
    };
    let ok = v.verify(&ev).expect("attests with the applied release");
    assert_eq!((ok.release_version, ok.applied_release), (1, Some(2)));
    let log = EventLog::parse(&ev.event_log).unwrap();
    let last = log.events().last().unwrap();
    assert_eq!(
        (last.kind, last.name.as_str()),
        (EventKind::ReleaseApplied, "v2")
    );

    // The same evidence under another version's name: refused.
    let nonce = v.challenge("host-a").unwrap();
    let mut ev = h.attest(&nonce).unwrap();
    ev.event_log = ev.event_log.replace(r#""name":"v2""#, r#""name":"v3""#);
    assert_eq!(
        v.verify(&ev).unwrap_err().code(),
        "attest_unknown_applied_release"
    );
    // A verifier that no longer accepts release 2 (recalled): refused, typed.
    v.retire_release(&m2);
    let nonce = v.challenge("host-a").unwrap();
    assert_eq!(
        v.verify(&h.attest(&nonce).unwrap()).unwrap_err(),
        AttestError::UnknownAppliedRelease { name: "v2".into() }
    );
}
