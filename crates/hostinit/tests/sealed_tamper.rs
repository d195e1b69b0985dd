//! Issue 17: a one-byte tamper of the kernel or of a Bulkhead binary in the initramfs, and a
//! swapped command line, boot — and are refused by the scheduler's and the KMS's boot-chain
//! checks, naming the PCRs that differ.
//!
//! The image script flips one byte of the staged copy of a part (`BULKHEAD_HOST_TAMPER`, tests
//! only; the cached kernel is untouched) in a string nothing reads at run time, so the tampered
//! host still boots, serves its controller and quotes: the refusal is the attestation's, not a
//! crash. Three images, each booted in turn (QEMU TCG + OVMF + a swtpm made by a manufacturer,
//! one VM at a time, stopped as soon as its evidence is taken):
//!
//! | tamper | what changes | PCRs that differ (by the event-log rules of `scripts/build-host-image.sh`) |
//! |---|---|---|
//! | `kernel` | one byte of the bzImage (the UKI's `.linux`) | 4 (the UKI's and the kernel's Authenticode hashes), 11 (systemd-stub's `.linux`); not 9: command line and initrd are unchanged |
//! | `binary` | one byte of `bulkhead-controller` in the initramfs (`.initrd`) | 4 (the UKI's Authenticode), 9 (the kernel stub's initrd), 11 (`.initrd`); the kernel is unchanged |
//! | `init=/bin/sh` appended to the command line (`.cmdline`) | the command line | 4 (the UKI's Authenticode), 9 (the kernel stub's load options), 11 (`.cmdline`) |
//!
//! PCR 12 (zero: no command line replaced the UKI's) and 23 (the configuration disk) differ in
//! none. Each set is checked three ways: the good and the tampered manifests' build-time
//! values differ in exactly it; the booted host's evidence, verified against the GOOD image's
//! manifest, is refused with `PcrMismatch` naming exactly it:
//!
//! - by the scheduler's check: `bulkhead_rot::boot::verify_boot` with the control plane's nonce
//!   and its expectations (`ExpectedPcrs::from_manifest(..).with_config(disk)`, as
//!   `crates/control/src/sealed.rs` builds them);
//! - by the KMS's check: the verifier `bulkhead-kms --attest-config` loads
//!   (`bulkhead_rot::policy::load_verifier`, a sealed enrolment of the good manifest), a nonce
//!   from its `challenge`, the host's quote bound to an instance, `verify_boot_for_instance`:
//!   refused (`boot_pcr_mismatch`), so the KMS has no host key to seal a volume key to, and the
//!   nonce is consumed.
//!
//! The same host's evidence is accepted against its own (tampered) image's manifest, by both
//! checks — the KMS's then names the enrolled host key — so the refusal is the manifest's exact
//! PCRs and nothing else.

mod common;

use std::path::Path;
use std::time::Instant;

use bulkhead_devcluster::sealed::{build_image_tampered, Tamper};
use bulkhead_rot::attest::{qualifying_data, AttestError, Verifier};
use bulkhead_rot::boot::{verify_boot, BootChainError, ExpectedPcrs};
use bulkhead_rot::endorsement::LocalManufacturer;
use bulkhead_rot::policy::{load_verifier, AttestConfig, SealedEnrollmentFile};
use bulkhead_rot::release::{ReleaseKey, TrustRoot};
use bulkhead_rot::tpm::AkPublic;
use common::attest::{boot, curl_present, rand_nonce, TempDir};
use common::HostNet;

/// The instance the KMS's quotes are bound to (the customer's AttachVolume names it).
const INSTANCE: &str = "i-tamper";
/// The host key of the sealed enrolment: what the KMS would seal a volume key to.
const HOST_PUBLIC: &str = "5eal";

struct Case {
    name: &'static str,
    tamper: Option<Tamper>,
    cmdline: Option<String>,
    /// The PCRs that must differ from the good image's, ascending.
    pcrs: &'static [u8],
}

/// The KMS's verifier as `bulkhead-kms --attest-config` loads it: environment `dev`, no
/// releases, one sealed enrolment (host-1, `ak`, the image manifest at `manifest`, the
/// configuration disk's SHA-256).
fn kms_verifier(dir: &Path, manifest: &Path, ak: &AkPublic, config_sha256: &[u8; 32]) -> Verifier {
    std::fs::create_dir_all(dir).expect("policy dir");
    let key = ReleaseKey::generate().expect("release key");
    let root = TrustRoot::new(1, vec![key.public()]).expect("trust root");
    let write = |name: &str, v: Vec<u8>| std::fs::write(dir.join(name), v).expect("policy file");
    write("root.json", serde_json::to_vec(&root).expect("root"));
    let sealed = SealedEnrollmentFile {
        host: "host-1".into(),
        environment: "dev".into(),
        ak: ak.0.clone(),
        image_manifest: manifest.to_path_buf(),
        config_sha256: hex::encode(config_sha256),
        host_public: HOST_PUBLIC.into(),
    };
    write(
        "sealed-host-1.json",
        serde_json::to_vec(&sealed).expect("sealed"),
    );
    let cfg = AttestConfig {
        environment: "dev".into(),
        pcr: 23,
        trust_root: "root.json".into(),
        releases: Vec::new(),
        enrollments: Vec::new(),
        sealed: vec!["sealed-host-1.json".into()],
    };
    write("attest.json", serde_json::to_vec(&cfg).expect("config"));
    load_verifier(&dir.join("attest.json")).expect("the KMS's attestation policy loads")
}

/// Byte positions where `a` and `b` differ (same length required).
fn differing_bytes(a: &Path, b: &Path) -> Vec<usize> {
    let (a, b) = (
        std::fs::read(a).expect("part"),
        std::fs::read(b).expect("part"),
    );
    assert_eq!(a.len(), b.len(), "a one-byte tamper keeps the length");
    a.iter()
        .zip(&b)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect()
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
        .expect("manifest JSON")
}

#[test]
fn tampered_images_boot_and_are_refused_by_the_scheduler_and_the_kms() {
    if let Some(why) = common::missing_resource() {
        bulkhead_testkit::skip_or_fail(&why);
        return;
    }
    if !curl_present() {
        bulkhead_testkit::skip_or_fail("curl is not installed");
        return;
    }
    let started = Instant::now();
    let tmp = std::env::temp_dir().join(format!("bulkhead-tamper-{}", std::process::id()));
    let _keep = TempDir(tmp.clone());
    std::fs::create_dir_all(&tmp).expect("tmp");
    let good_dir = tmp.join("good");
    if let Err(why) = common::build_image(&good_dir, None) {
        bulkhead_testkit::skip_or_fail(&why);
        return;
    }
    let good_cmdline = std::fs::read_to_string(good_dir.join("cmdline")).expect("cmdline");
    let cases = [
        Case {
            name: "kernel",
            tamper: Some(Tamper::Kernel),
            cmdline: None,
            pcrs: &[4, 11],
        },
        Case {
            name: "binary",
            tamper: Some(Tamper::Binary),
            cmdline: None,
            pcrs: &[4, 9, 11],
        },
        Case {
            name: "init-sh",
            tamper: None,
            cmdline: Some(format!("{good_cmdline} init=/bin/sh")),
            pcrs: &[4, 9, 11],
        },
    ];
    let good_manifest = std::fs::read(good_dir.join("manifest.json")).expect("manifest");
    let good_m = manifest(&good_dir);
    for c in &cases {
        let dir = tmp.join(c.name);
        assert!(
            build_image_tampered(&common::repo(), &dir, c.cmdline.as_deref(), c.tamper)
                .expect("build the tampered image"),
            "the host kernel is cached (the good image was built)"
        );
        // Exactly the intended change, and nothing else.
        let part = |f: &str| differing_bytes(&good_dir.join(f), &dir.join(f)).len();
        let m = manifest(&dir);
        let changed_files: Vec<String> = good_m["initramfs"]
            .as_array()
            .expect("files")
            .iter()
            .zip(m["initramfs"].as_array().expect("files"))
            .filter(|(a, b)| a != b)
            .map(|(a, _)| a["name"].as_str().unwrap_or_default().to_string())
            .collect();
        match c.tamper {
            Some(Tamper::Kernel) => {
                assert_eq!((part("bzImage"), part("initramfs.cpio")), (1, 0));
                assert!(changed_files.is_empty(), "{changed_files:?}");
            }
            Some(Tamper::Binary) => {
                assert_eq!((part("bzImage"), part("initramfs.cpio")), (0, 1));
                assert_eq!(changed_files, ["/usr/bin/bulkhead-controller"]);
            }
            None => {
                assert_eq!((part("bzImage"), part("initramfs.cpio")), (0, 0));
                assert_eq!(
                    std::fs::read_to_string(dir.join("cmdline")).expect("cmdline"),
                    format!("{good_cmdline} init=/bin/sh")
                );
            }
        }
        assert_eq!(
            m.get("tamper").is_some(),
            c.tamper.is_some(),
            "the manifest names a flipped byte"
        );
        // The build-time rule already says which PCRs move.
        let mut moved: Vec<u8> = good_m["expected_pcrs"]
            .as_object()
            .expect("expected_pcrs")
            .iter()
            .filter(|(k, v)| m["expected_pcrs"][k.as_str()] != **v)
            .map(|(k, _)| k.parse().expect("PCR index"))
            .collect();
        moved.sort_unstable();
        assert_eq!(
            moved, c.pcrs,
            "{}: PCRs the manifest computes differently",
            c.name
        );
    }
    let builds_s = started.elapsed().as_secs_f64();

    let pki = tmp.join("pki");
    let net = HostNet::new("x");
    let manufacturer = LocalManufacturer::new(&tmp.join("manufacturer")).expect("manufacturer");
    let mut report = Vec::new();
    for c in &cases {
        let t0 = Instant::now();
        let dir = tmp.join(c.name);
        let host = boot(
            &tmp,
            c.name,
            &dir.join("bulkhead-host.efi"),
            &pki,
            &net,
            &manufacturer,
        );
        let ak = host.ak.clone();
        let disk = bulkhead_hostinit::config::measured_digest(
            &std::fs::read(tmp.join(format!("{}-config.img", c.name))).expect("disk"),
        )
        .expect("digest");
        let tampered_manifest = std::fs::read(dir.join("manifest.json")).expect("manifest");
        let refusal = |who: &str, e: &BootChainError| match e {
            BootChainError::PcrMismatch { pcr, all, .. } => {
                assert_eq!(*pcr, c.pcrs[0], "{}: {who}: first PCR", c.name);
                assert_eq!(all, c.pcrs, "{}: {who}: every PCR that differs", c.name);
                assert_eq!(e.code(), "boot_pcr_mismatch");
            }
            other => panic!(
                "{}: {who}: refused, but not by PCR: {other:?}\nconsole:\n{}",
                c.name,
                host.console()
            ),
        };

        // --- the scheduler's check (the control plane's nonce and expectations) ------------
        let scheduler = ExpectedPcrs::from_manifest(&good_manifest)
            .expect("good manifest")
            .with_config(&disk);
        let own = ExpectedPcrs::from_manifest(&tampered_manifest)
            .expect("tampered manifest")
            .with_config(&disk);
        let nonce = rand_nonce();
        let ev = host.attest(&nonce, None);
        if let Err(e) = verify_boot(&ev, &ak, &nonce, &own) {
            panic!(
                "{}: the tampered host does not attest as its own image ({e:?}): the boot, not the manifest, differs\nconsole:\n{}",
                c.name,
                host.console()
            );
        }
        match verify_boot(&ev, &ak, &nonce, &scheduler) {
            Err(e) => refusal("scheduler", &e),
            Ok(()) => panic!("{}: the scheduler's check accepted a tampered boot", c.name),
        }

        // --- the KMS's check: its verifier, its nonce, a quote bound to the instance --------
        let mut kms = kms_verifier(
            &tmp.join(format!("kms-{}-good", c.name)),
            &good_dir.join("manifest.json"),
            &ak,
            &disk,
        );
        let n = kms.challenge("host-1").expect("KMS nonce");
        // The controller asks the agent for an instance-bound quote only for an instance its
        // backend runs (this image's detached backend runs none): the bound qualifying data,
        // SHA-256(nonce || instance), is sent as the nonce: the same quote the agent makes
        // for a bound call.
        let ev_k = host.attest(&qualifying_data(&n, Some(INSTANCE)), None);
        match kms.verify_boot_for_instance(&ev_k, INSTANCE) {
            Err(AttestError::BootChain(e)) => refusal("KMS", &e),
            Err(other) => panic!("{}: KMS refused, but not by PCR: {other:?}", c.name),
            Ok(a) => panic!(
                "{}: the KMS released to a tampered host (key {})",
                c.name, a.host_public
            ),
        }
        assert_eq!(
            kms.verify_boot_for_instance(&ev_k, INSTANCE).map(|_| ()),
            Err(AttestError::NotBoundToInstance(INSTANCE.into())),
            "{}: the refused quote's nonce is consumed",
            c.name
        );
        // Enrolled with its own image's manifest instead, the same host gets its key.
        let mut kms_own = kms_verifier(
            &tmp.join(format!("kms-{}-own", c.name)),
            &dir.join("manifest.json"),
            &ak,
            &disk,
        );
        let n = kms_own.challenge("host-1").expect("KMS nonce");
        let ev_o = host.attest(&qualifying_data(&n, Some(INSTANCE)), None);
        let ok = kms_own
            .verify_boot_for_instance(&ev_o, INSTANCE)
            .unwrap_or_else(|e| panic!("{}: own manifest refused: {e:?}", c.name));
        assert_eq!(ok.host_public, HOST_PUBLIC);
        let ready_s = host.ready_s;
        drop(host);
        eprintln!(
            "tamper {}: booted, controller ready {ready_s:.1} s after QEMU start; refused by the scheduler's and the KMS's checks: PCRs {:?} differ; accepted against its own manifest ({:.1} s for this boot)",
            c.name,
            c.pcrs,
            t0.elapsed().as_secs_f64()
        );
        report.push((c.name, t0.elapsed().as_secs_f64()));
    }
    eprintln!(
        "sealed tamper: images built in {builds_s:.1} s, boots {report:?}, {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}
