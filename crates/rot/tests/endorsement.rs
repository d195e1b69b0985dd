//! The attestation key is accepted only when it lives in a TPM whose endorsement key chains to a
//! trusted manufacturer: real software TPMs manufactured by `swtpm_setup` with EK certificates
//! from a local CA (one trusted, one rogue), and the TPM's own TPM2_ActivateCredential.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bulkhead_rot::endorsement::{
    ak_name, make_credential, verify_ek_certificate, CredentialChallenge, EndorsementError,
    LocalManufacturer,
};
use bulkhead_rot::swtpm::{swtpm_setup_available, Swtpm};
use bulkhead_rot::tpm::Tpm;

struct Made {
    _swtpm: Swtpm,
    tpm: Tpm,
}

fn manufactured(maker: &LocalManufacturer, state: &std::path::Path) -> Made {
    maker.manufacture(state).expect("manufacture");
    let swtpm = Swtpm::start_with_state(state).expect("swtpm");
    let tpm = Tpm::open(&swtpm.tcti()).expect("open");
    Made { _swtpm: swtpm, tpm }
}

#[test]
fn an_ak_is_endorsed_only_by_its_own_tpm_under_a_trusted_manufacturer() {
    if common::skip("endorsement") {
        return;
    }
    if !swtpm_setup_available() {
        bulkhead_testkit::skip_or_fail("endorsement: swtpm_setup not found (install swtpm-tools)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let maker = LocalManufacturer::new(&dir.path().join("maker")).unwrap();
    let rogue = LocalManufacturer::new(&dir.path().join("rogue")).unwrap();
    let mut a = manufactured(&maker, &dir.path().join("tpm-a"));
    let mut b = manufactured(&maker, &dir.path().join("tpm-b"));
    let mut c = manufactured(&rogue, &dir.path().join("tpm-c"));
    let trust = maker.trust().unwrap();
    let now = bulkhead_rot::unix_now();

    // The happy path: A's EK certificate chains to the manufacturer's root through its issuing
    // CA, and A's TPM returns the secret wrapped for A's AK.
    let ek_cert_a = a.tpm.ek_certificate().unwrap();
    let ek_a = verify_ek_certificate(&ek_cert_a, &trust, now).unwrap();
    let ak_a = a.tpm.ak_public().unwrap();
    // The verifier computes the AK's name from its public key alone; the TPM agrees.
    assert_eq!(ak_name(&ak_a).unwrap(), a.tpm.ak_name().unwrap());
    let (challenge, check) = make_credential(&ek_a, &ak_a).unwrap();
    let secret = a.tpm.activate_credential(&challenge).unwrap();
    let endorsed = check.finish(&secret).unwrap();
    assert_eq!(endorsed, ek_a);

    // A fresh challenge each time: the same AK gets a different credential.
    let (again, _) = make_credential(&ek_a, &ak_a).unwrap();
    assert_ne!(again, challenge);

    // Attack 1: B's AK presented with A's EK certificate (a host borrowing another TPM's
    // endorsement). A's TPM holds the EK but not that AK; B's TPM holds the AK but not the EK.
    let ak_b = b.tpm.ak_public().unwrap();
    assert_ne!(ak_a, ak_b);
    let (borrowed, check) = make_credential(&ek_a, &ak_b).unwrap();
    assert_eq!(
        a.tpm.activate_credential(&borrowed).unwrap_err(),
        EndorsementError::ActivationRefused
    );
    assert_eq!(
        b.tpm.activate_credential(&borrowed).unwrap_err(),
        EndorsementError::ActivationRefused
    );
    // Guessing the secret does not help either.
    assert_eq!(
        check.finish(&[0u8; 32]).unwrap_err(),
        EndorsementError::WrongSecret
    );

    // Attack 2: a TPM whose EK certificate comes from a manufacturer nobody trusts. Both
    // local CAs are named alike ("CN=swtpm-localca"), so the name finds a trusted CA whose key
    // did not sign it.
    let ek_cert_c = c.tpm.ek_certificate().unwrap();
    assert!(matches!(
        verify_ek_certificate(&ek_cert_c, &trust, now),
        Err(EndorsementError::BadSignature { .. })
    ));
    // With only the rogue's issuing CA as an anchor-less intermediate and no root, the chain
    // ends at a CA nobody trusts.
    let partial = bulkhead_rot::endorsement::EkTrust::from_pem_files(
        &[maker.root_cert()],
        &[rogue.issuer_cert()],
    )
    .unwrap();
    assert!(verify_ek_certificate(&ek_cert_c, &partial, now).is_err());
    // ...and the rogue CA's own TPM still works for the rogue's verifier (the check is real).
    let rogue_trust = rogue.trust().unwrap();
    verify_ek_certificate(&ek_cert_c, &rogue_trust, now).unwrap();
    assert!(matches!(
        verify_ek_certificate(&ek_cert_a, &rogue_trust, now),
        Err(EndorsementError::BadSignature { .. })
    ));
    // A verifier whose anchors are unrelated names finds no issuer at all.
    let unrelated_dir = tempfile::tempdir().unwrap();
    let unrelated = unrelated_dir.path().join("root.pem");
    std::fs::write(&unrelated, unrelated_root_pem()).unwrap();
    let unrelated = bulkhead_rot::endorsement::EkTrust::from_pem_files(&[unrelated], &[]).unwrap();
    assert!(matches!(
        verify_ek_certificate(&ek_cert_a, &unrelated, now),
        Err(EndorsementError::UntrustedIssuer { .. })
    ));

    // Attack 3: an EK certificate edited by one byte in its signature, or in its key.
    let mut forged = ek_cert_a.clone();
    let last = forged.len() - 1;
    forged[last] ^= 0x01;
    assert!(matches!(
        verify_ek_certificate(&forged, &trust, now),
        Err(EndorsementError::BadSignature { .. })
    ));
    let mut forged = ek_cert_a.clone();
    let spki = find(&forged, &ek_key_marker(&ek_cert_a)).expect("modulus in certificate");
    forged[spki] ^= 0x01;
    assert!(matches!(
        verify_ek_certificate(&forged, &trust, now),
        Err(EndorsementError::BadSignature { .. }) | Err(EndorsementError::Malformed(_))
    ));

    // Attack 4: outside the validity period (a clock before the certificate was issued).
    assert!(matches!(
        verify_ek_certificate(&ek_cert_a, &trust, 1_000_000),
        Err(EndorsementError::NotValidNow { .. })
    ));

    // Attack 5: a credential edited in transit is refused by the TPM, not silently opened.
    let (challenge, _) = make_credential(&ek_a, &ak_a).unwrap();
    let mut raw = hex::decode(&challenge.id_object).unwrap();
    let n = raw.len() - 1;
    raw[n] ^= 0x80;
    let edited = CredentialChallenge {
        id_object: hex::encode(raw),
        encrypted_secret: challenge.encrypted_secret.clone(),
    };
    assert_eq!(
        a.tpm.activate_credential(&edited).unwrap_err(),
        EndorsementError::ActivationRefused
    );
    let garbage = CredentialChallenge {
        id_object: "zz".into(),
        encrypted_secret: challenge.encrypted_secret,
    };
    assert!(matches!(
        a.tpm.activate_credential(&garbage),
        Err(EndorsementError::Malformed(_))
    ));

    // A TPM nobody manufactured has no EK certificate at all.
    let plain = Swtpm::start().unwrap();
    let mut plain_tpm = Tpm::open(&plain.tcti()).unwrap();
    assert_eq!(
        plain_tpm.ek_certificate().unwrap_err(),
        EndorsementError::NoEkCertificate
    );
}

/// 16 bytes from the middle of the certificate's RSA modulus (to flip a bit of the key).
fn ek_key_marker(cert: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, c) = X509Certificate::from_der(cert).unwrap();
    let key = c.public_key().subject_public_key.data.to_vec();
    key[64..80].to_vec()
}

/// A self-signed CA certificate with another name (made here, for this test).
fn unrelated_root_pem() -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Some Other TPM Vendor Root");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().pem()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
