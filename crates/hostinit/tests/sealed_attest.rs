//! A sealed host attests its boot chain through its controller, and a tampered image is refused
//! naming the PCR.
//!
//! Boot 1 (the image as built): a nonce goes to `POST /v1/host/attest` over mTLS with an
//! operator token; the agent's quote covers SHA-256 PCRs 4, 9, 11, 12, 23; the verifier in
//! `bulkhead_rot::boot` accepts it against PCRs 4, 9, 11 and 12 exactly as the image manifest
//! computed them at build time (from the parts, by the event-log rules: nothing is recorded from
//! a boot) and PCR 23 computed from this host's configuration disk. The same evidence is refused
//! for another nonce, another AK, or an edited PCR value.
//!
//! The same boot also has its AK certified against its TPM's endorsement key, as the control
//! plane does before it enrols a sealed host's AK (`bulkhead_rot::endorsement`): the TPM was
//! made by a local manufacturer (`swtpm_setup --create-ek-cert`); the evidence carries its EK
//! certificate, which chains to that manufacturer's CA; a credential made for that EK and the
//! AK the host printed goes through the controller to the agent, whose TPM activates it (the
//! secret comes back, and the quote of that round still verifies); a credential made for an AK
//! that is not in this TPM is not activated (`ActivationRefused`); evidence without an EK
//! certificate is `NoEkCertificate`.
//!
//! Boot 2 (the image rebuilt with `lockdown=none` for `lockdown=confidentiality` on its
//! command line, everything else identical, on a TPM made by another, untrusted manufacturer):
//! its evidence is refused with `PcrMismatch { pcr: 4, .. }` and PCRs 9 and 11 among the
//! mismatches, PCR 12 and 23 not; its EK certificate does not chain to the trusted CA.
//!
//! Two boots (QEMU TCG). Needs what `sealed_host.rs` needs, plus curl.

mod common;

use bulkhead_rot::boot::{verify_boot, BootChainError, ExpectedPcrs};
use bulkhead_rot::endorsement::{challenge_boot_ak, EndorsementError, LocalManufacturer};
use bulkhead_rot::tpm::AkPublic;
use common::attest::{boot, rand_nonce, TempDir};
use common::HostNet;

#[test]
fn sealed_host_attests_and_a_tampered_image_is_refused() {
    if let Some(why) = common::attest::preflight() {
        bulkhead_testkit::skip_or_fail(&why);
        return;
    }
    let tmp = std::env::temp_dir().join(format!("bulkhead-attest-{}", std::process::id()));
    let _keep = TempDir(tmp.clone());
    std::fs::create_dir_all(&tmp).expect("tmp");
    if let Err(why) = common::build_image(&tmp.join("good"), None) {
        bulkhead_testkit::skip_or_fail(&why);
        return;
    }
    let good_cmdline = std::fs::read_to_string(tmp.join("good/cmdline")).expect("cmdline");
    let bad_cmdline = good_cmdline.replace("lockdown=confidentiality", "lockdown=none");
    assert_ne!(good_cmdline, bad_cmdline);
    common::build_image(&tmp.join("bad"), Some(&bad_cmdline)).expect("tampered image");
    let manifest = std::fs::read(tmp.join("good/manifest.json")).expect("manifest");
    let from_manifest = ExpectedPcrs::from_manifest(&manifest).expect("expected_pcrs");
    assert_eq!(
        from_manifest.0.keys().copied().collect::<Vec<_>>(),
        vec![4, 9, 11, 12],
        "the manifest computes every image PCR"
    );

    let pki = tmp.join("pki");
    let net = HostNet::new("t");
    let manufacturer = LocalManufacturer::new(&tmp.join("manufacturer")).expect("manufacturer");
    let rogue = LocalManufacturer::new(&tmp.join("rogue")).expect("rogue manufacturer");

    // --- boot 1: the image as built ----------------------------------------------------------
    let nonce: [u8; 32] = rand_nonce();
    let good = boot(
        &tmp,
        "good",
        &tmp.join("good/bulkhead-host.efi"),
        &pki,
        &net,
        &manufacturer,
    );
    let ev = good.attest(&nonce, None);
    let (ak, ready_s, console) = (good.ak.clone(), good.ready_s, good.console());
    let config_digest = bulkhead_hostinit::config::measured_digest(
        &std::fs::read(tmp.join("good-config.img")).expect("disk"),
    )
    .expect("digest");
    // Every value from the manifest (computed at build time), PCR 23 from the disk.
    let expected = from_manifest.clone().with_config(&config_digest);
    for p in [4u8, 9, 11] {
        assert_ne!(expected.0[&p], [0; 32], "PCR {p} expected zero");
    }
    if let Err(e) = verify_boot(&ev, &ak, &nonce, &expected) {
        panic!(
            "the image as built does not attest: {e:?}\nevidence: {}\nconsole:\n{console}",
            serde_json::to_string(&ev).unwrap_or_default()
        );
    }
    assert_eq!(
        verify_boot(&ev, &ak, &rand_nonce(), &expected),
        Err(BootChainError::NonceMismatch)
    );
    let other_ak = AkPublic(format!("04{}", "11".repeat(64)));
    assert_eq!(
        verify_boot(&ev, &other_ak, &nonce, &expected),
        Err(BootChainError::UnknownAk)
    );
    let mut edited = ev.clone();
    edited
        .pcrs
        .insert(11, hex::encode(expected.0[&11].map(|b| b ^ 1)));
    assert_eq!(
        verify_boot(&edited, &ak, &nonce, &expected),
        Err(BootChainError::ValuesDoNotMatchQuote)
    );

    // --- the AK certified against the TPM's EK (what the control plane runs to enrol it) -----
    let trust = manufacturer.trust().expect("the manufacturer's CA");
    let now = bulkhead_rot::unix_now();
    let (challenge, check) =
        challenge_boot_ak(&ev, &ak, &trust, now).expect("the EK certificate chains to the CA");
    let nonce_c = rand_nonce();
    let ev_c = good.attest(&nonce_c, Some(&challenge));
    let ek = check
        .finish_boot(&ev_c)
        .expect("the host's TPM activates a credential for its own AK");
    assert_eq!(
        verify_boot(&ev_c, &ak, &nonce_c, &expected),
        Ok(()),
        "the quote of the activation round"
    );
    // A credential for an AK that is not in this TPM (its name differs): the TPM refuses it.
    let (foreign, check) = challenge_boot_ak(&ev, &other_ak, &trust, now).expect("credential");
    let ev_f = good.attest(&rand_nonce(), Some(&foreign));
    assert_eq!(
        ev_f.activated, None,
        "the TPM activated a foreign AK's credential"
    );
    assert_eq!(
        check.finish_boot(&ev_f).map(|_| ()),
        Err(EndorsementError::ActivationRefused)
    );
    // The secret of one credential does not open another.
    let (_, check) = challenge_boot_ak(&ev, &ak, &trust, now).expect("credential");
    assert_eq!(
        check.finish_boot(&ev_c).map(|_| ()),
        Err(EndorsementError::WrongSecret)
    );
    let mut no_cert = ev.clone();
    no_cert.ek_certificate = None;
    assert_eq!(
        challenge_boot_ak(&no_cert, &ak, &trust, now).map(|_| ()),
        Err(EndorsementError::NoEkCertificate)
    );
    eprintln!("AK endorsed by EK {}", ek.fingerprint());
    drop(good);

    // --- boot 2: the same image with `lockdown=none` on its command line --------------------
    let nonce2 = rand_nonce();
    let bad = boot(
        &tmp,
        "bad",
        &tmp.join("bad/bulkhead-host.efi"),
        &pki,
        &net,
        &rogue,
    );
    let ev2 = bad.attest(&nonce2, None);
    let (ak2, ready2_s) = (bad.ak.clone(), bad.ready_s);
    // Its TPM's EK certificate chains to the rogue CA (same name, other key), not the trusted one.
    match challenge_boot_ak(&ev2, &ak2, &trust, bulkhead_rot::unix_now()) {
        Err(EndorsementError::BadSignature { .. } | EndorsementError::UntrustedIssuer { .. }) => {}
        other => panic!(
            "a rogue manufacturer's EK was not refused: {:?}",
            other.map(|_| ())
        ),
    }
    challenge_boot_ak(
        &ev2,
        &ak2,
        &rogue.trust().expect("rogue CA"),
        bulkhead_rot::unix_now(),
    )
    .expect("the rogue CA's own chain verifies (the refusal is the trust, not the format)");
    match verify_boot(&ev2, &ak2, &nonce2, &expected) {
        Err(BootChainError::PcrMismatch { pcr, all, .. }) => {
            assert_eq!(pcr, 4, "first mismatch");
            assert!(all.contains(&9) && all.contains(&11), "mismatches {all:?}");
            assert!(
                !all.contains(&12) && !all.contains(&23),
                "mismatches {all:?}"
            );
            eprintln!("tampered command line refused: PCRs {all:?} differ");
        }
        other => panic!("a tampered command line was not refused by PCR: {other:?}"),
    }
    eprintln!(
        "sealed attest: controller ready {ready_s:.1} s / {ready2_s:.1} s after QEMU start; PCRs 4/9/11/12 computed at build time matched the boot"
    );
}
