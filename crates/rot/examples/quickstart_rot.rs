//! Quickstart act for the root of trust (real swtpm): a host's attestation key is enrolled only
//! after its TPM proves it holds an EK a trusted vendor certified; the host attests before the
//! KMS seals it a volume key; the same host with one byte of a binary changed is refused, and a replayed quote
//! is refused.

use bulkhead_rot::attest::{release_volume_key, Verifier};
use bulkhead_rot::endorsement::{make_credential, verify_ek_certificate, LocalManufacturer};
use bulkhead_rot::host::{Host, HostConfig};
use bulkhead_rot::measure::{Environment, EventKind};
use bulkhead_rot::release::{Manifest, ReleaseKey, SignedRelease, TrustRoot};
use bulkhead_rot::swtpm::{swtpm_available, swtpm_setup_available, Swtpm};
use bulkhead_rot::tpm::MeasurePcr;
use bulkhead_rot::RotError;

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn say(s: &str) {
    println!("\n== {s}");
}

fn main() -> R<()> {
    // libtss2 logs expected TPM refusals (a failed unseal) as ERROR on stderr; the typed error
    // says it better. Respect an explicit TSS2_LOG.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
    if !swtpm_available() {
        println!("*** SKIPPED root-of-trust act: swtpm not installed ***");
        return Ok(());
    }
    let env = Environment::parse("production")?;
    let work = tempfile::tempdir()?;
    let src = work.path().join("release");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("bulkhead-blockcard"), "#!/bin/sh\nexit 0\n")?;
    std::fs::write(src.join("host.toml"), "listen = \"0.0.0.0:8443\"\n")?;

    say("Release engineering: 3 release keys, threshold 2; release 1 signed by 2 of them");
    let keys: Vec<ReleaseKey> = (0..3)
        .map(|_| ReleaseKey::generate())
        .collect::<Result<_, RotError>>()?;
    let root = TrustRoot::new(2, keys.iter().map(|k| k.public()).collect())?;
    let m = Manifest::from_files(
        1,
        env.clone(),
        bulkhead_rot::unix_now() + 3600,
        MeasurePcr::DEV,
        &[
            (EventKind::Binary, &src.join("bulkhead-blockcard")),
            (EventKind::Config, &src.join("host.toml")),
        ],
    )?;
    let mut rel = SignedRelease::new(&m)?;
    rel.sign(&keys[0]);
    rel.sign(&keys[2]);
    println!(
        "release 1: expected PCR 23 (SHA-384) = {}…",
        &m.expected_pcr[..32]
    );

    say("Manufacturing: a TPM vendor (here a local CA) makes host-1's TPM and certifies its endorsement key");
    if !swtpm_setup_available() {
        println!("*** SKIPPED root-of-trust act: swtpm_setup not installed (swtpm-tools) ***");
        return Ok(());
    }
    let vendor = LocalManufacturer::new(&work.path().join("vendor"))?;
    vendor.manufacture(&work.path().join("tpm-1"))?;
    let sw = Swtpm::start_with_state(&work.path().join("tpm-1"))?;
    let rogue = LocalManufacturer::new(&work.path().join("rogue-vendor"))?;
    rogue.manufacture(&work.path().join("tpm-x"))?;
    let sw_x = Swtpm::start_with_state(&work.path().join("tpm-x"))?;

    say("Provisioning: host-1 installs release 1, seals a fresh host key to that PCR value; its AK is enrolled only once its TPM proves it holds the certified EK");
    let cfg = HostConfig {
        name: "host-1".into(),
        root: work.path().join("host-1"),
        environment: env.clone(),
        pcr: MeasurePcr::DEV,
        dev_reset_pcr: true,
        trust_root: root,
    };
    let mut host = Host::open(cfg, &sw.tcti())?;
    let enrol = host.provision(&rel, &src)?;
    let trust = vendor.trust()?;
    let ek = verify_ek_certificate(&host.ek_certificate()?, &trust, bulkhead_rot::unix_now())?;
    let (challenge, check) = make_credential(&ek, &enrol.ak)?;
    let secret = host.activate_credential(&challenge)?;
    let ek = check.finish(&secret)?;
    println!(
        "EK certificate chains to the vendor's root; the TPM opened the credential made for AK {}: EK {}…",
        enrol.ak.key_id(),
        &ek.fingerprint()[..16]
    );
    let mut tpm_x = bulkhead_rot::tpm::Tpm::open(&sw_x.tcti())?;
    match verify_ek_certificate(&tpm_x.ek_certificate()?, &trust, bulkhead_rot::unix_now()) {
        Err(e) => println!(
            "a TPM made by another vendor is refused: [{}] {e}",
            e.code()
        ),
        Ok(_) => return Err("a rogue vendor's TPM was accepted".into()),
    }
    let ak_x = tpm_x.ak_public()?;
    let (challenge, _) = make_credential(&ek, &ak_x)?;
    match tpm_x.activate_credential(&challenge) {
        Err(e) => println!(
            "another TPM's AK under host-1's EK is refused: [{}] {e}",
            e.code()
        ),
        Ok(_) => return Err("a foreign AK was endorsed".into()),
    }
    println!(
        "enrolled host-1 in {}: AK {}",
        enrol.environment,
        enrol.ak.key_id()
    );
    let mut kms = Verifier::new(env.clone(), MeasurePcr::DEV);
    kms.enroll(enrol);
    kms.accept_release(&m);

    say("host-1 starts: measured start → unseal → self-tests");
    println!("{}", host.boot().summary());

    say("KMS: challenge host-1, verify its quote, only then seal vol-1's key to host-1's key");
    let nonce = kms.challenge("host-1")?;
    let evidence = host.attest(&nonce)?;
    let volume_key = [0x42u8; 64];
    let blob = release_volume_key(&mut kms, &evidence, "vol-1", &volume_key)?;
    let key = host.host_key().ok_or("no host key")?;
    let opened = bulkhead_sealing::open_volume_key(key, "vol-1", &blob)?;
    println!(
        "sealed blob {} bytes; host-1's block card opened it: {}",
        blob.len(),
        opened.as_ref() == &volume_key
    );

    say("Someone replays that quote to get another key");
    match release_volume_key(&mut kms, &evidence, "vol-2", &volume_key) {
        Err(e) => println!("refused: [{}] {e}", e.code()),
        Ok(_) => return Err("replayed quote was accepted".into()),
    }

    say("Someone copies a modified bulkhead-blockcard onto host-1 by hand, and it restarts");
    let bin = host.release_dir(1).join("bulkhead-blockcard");
    let mut b = std::fs::read(&bin)?;
    if let Some(x) = b.get_mut(10) {
        *x ^= 1;
    }
    std::fs::write(&bin, b)?;
    let health = host.boot();
    println!("{}", health.summary());
    println!("health API: {}", serde_json::to_string(&health)?);

    say("KMS: challenge host-1 again");
    let nonce = kms.challenge("host-1")?;
    let evidence = host.attest(&nonce)?;
    match release_volume_key(&mut kms, &evidence, "vol-1", &volume_key) {
        Err(e) => println!("refused: [{}] {e}", e.code()),
        Ok(_) => return Err("tampered host got a key".into()),
    }
    Ok(())
}
