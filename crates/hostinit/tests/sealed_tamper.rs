//! Issue 17: a one-byte tamper of the kernel or of a Bulkhead binary in the initramfs, and a
//! changed command line, boot — and are refused by the scheduler's and the KMS's boot-chain
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
//! | `init-sh` | a changed command line (`init=/bin/sh` added, which this image ignores: it has no shell; `rdinit=/init` runs), the UKI's `.cmdline` | 4 (the UKI's Authenticode), 9 (the kernel stub's load options), 11 (`.cmdline`) |
//!
//! The `init-sh` case shows that the command line is measured, not that a way in is refused:
//! the image has no shell to be let into.
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
//! Each tampered image's own manifest marks it a test image (`tamper`, `cmdline_override`), and
//! both checks refuse it as expectations (`BootChainError::TestImage`: the control plane's
//! `ExpectedPcrs::from_manifest`, the KMS's `load_verifier`). The control: a copy of that
//! manifest with the marker removed accepts the same host's evidence, by both checks — the
//! KMS's then names the enrolled host key — so the refusal is the manifest's exact PCRs and
//! nothing else.
//!
//! The good image is `$CARGO_TARGET_DIR/host-image` (what `make test` builds) when it is there,
//! unmarked and newer than every input it packs; otherwise — or when the kernel-tampered image,
//! built from the same inputs, differs from it in more than that byte — this test builds it.

mod common;

use std::path::Path;
use std::time::Instant;

use bulkhead_devcluster::sealed::{build_image_tampered, Tamper};
use bulkhead_rot::attest::{qualifying_data, AttestError, Attested};
use bulkhead_rot::boot::{verify_boot, BootChainError, ExpectedPcrs, TEST_IMAGE_MARKERS};
use bulkhead_rot::endorsement::LocalManufacturer;
use bulkhead_rot::policy::{load_verifier, AttestConfig, AttestConfigError, SealedEnrollmentFile};
use bulkhead_rot::release::{ReleaseKey, TrustRoot};
use bulkhead_rot::tpm::AkPublic;
use common::attest::{boot, rand_nonce, Booted, TempDir};
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

impl Case {
    /// The test-image marker its manifest carries.
    fn marker(&self) -> &'static str {
        if self.tamper.is_some() {
            "tamper"
        } else {
            "cmdline_override"
        }
    }
}

/// The KMS's attestation policy as `bulkhead-kms --attest-config` loads it: environment `dev`,
/// no releases, one sealed enrolment (host-1, `ak`, the image manifest at `manifest`, the
/// configuration disk's SHA-256); its `attest.json`, or why `load_verifier` refused it.
fn kms_verifier(
    dir: &Path,
    manifest: &Path,
    ak: &AkPublic,
    config_sha256: &[u8; 32],
) -> Result<bulkhead_rot::attest::Verifier, AttestConfigError> {
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
    load_verifier(&dir.join("attest.json"))
}

/// The KMS's check of `host` enrolled with the image manifest at `manifest`: its verifier, a
/// nonce from its `challenge`, the host's quote bound to [`INSTANCE`], `verify_boot_for_instance`.
/// Returns the verifier (to try the same evidence again), the evidence and the verdict.
fn kms_check(
    dir: &Path,
    manifest: &Path,
    host: &Booted<'_>,
    config_sha256: &[u8; 32],
) -> (
    bulkhead_rot::attest::Verifier,
    bulkhead_rot::boot::BootEvidence,
    Result<Attested, AttestError>,
) {
    let mut kms = kms_verifier(dir, manifest, &host.ak, config_sha256)
        .expect("the KMS's attestation policy loads");
    let n = kms.challenge("host-1").expect("KMS nonce");
    // The controller asks the agent for an instance-bound quote only for an instance its
    // backend runs (this image's detached backend runs none): the bound qualifying data,
    // SHA-256(nonce || instance), is sent as the nonce: the same quote the agent makes for a
    // bound call.
    let ev = host.attest(&qualifying_data(&n, Some(INSTANCE)), None);
    let verdict = kms.verify_boot_for_instance(&ev, INSTANCE);
    (kms, ev, verdict)
}

/// The good image: `$CARGO_TARGET_DIR/host-image` when it is there, carries no test marker and
/// is newer than every input it packs (the release binaries, `host/`, the script); else built
/// into `fresh`. `Err(reason)` when it cannot be built here.
fn good_image(fresh: &Path) -> Result<std::path::PathBuf, String> {
    let built = common::target_dir().join("host-image");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let reusable = std::fs::read(built.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|m| TEST_IMAGE_MARKERS.iter().all(|k| m.get(*k).is_none()))
        && modified(&built.join("manifest.json")).is_some_and(|t| {
            let release = common::target_dir().join("release");
            let repo = common::repo();
            [
                release.join("bulkhead-init"),
                release.join("bulkhead-controller"),
                release.join("bulkhead-host-agent"),
                repo.join("host/cmdline"),
                repo.join("host/os-release"),
                repo.join("host/kernel.config"),
                repo.join("scripts/build-host-image.sh"),
            ]
            .iter()
            .all(|input| modified(input).is_some_and(|i| i <= t))
        });
    if reusable {
        eprintln!("sealed tamper: good image {} (reused)", built.display());
        return Ok(built);
    }
    common::build_image(fresh, None)?;
    Ok(fresh.to_path_buf())
}

/// Whether `tampered` (the kernel tamper) is `good` but for one byte of the bzImage: the same
/// initramfs, command line and os-release, a bzImage of the same length differing in one byte.
fn same_but_one_kernel_byte(good: &Path, tampered: &Path) -> bool {
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).ok();
    let same = ["initramfs.cpio", "cmdline", "os-release"]
        .iter()
        .all(|f| read(good, f).is_some_and(|g| Some(g) == read(tampered, f)));
    let kernel_bytes = match (read(good, "bzImage"), read(tampered, "bzImage")) {
        (Some(a), Some(b)) if a.len() == b.len() => {
            a.iter().zip(&b).filter(|(x, y)| x != y).count()
        }
        _ => 0,
    };
    same && kernel_bytes == 1
}

/// A copy of a test image's manifest without its marker, written to `out`: the control that
/// shows the refusal is the PCRs (a marked manifest is refused before any PCR is compared).
fn unmarked_copy(manifest: &serde_json::Value, out: &Path) -> Vec<u8> {
    let mut m = manifest.clone();
    let obj = m.as_object_mut().expect("manifest object");
    for k in TEST_IMAGE_MARKERS {
        obj.remove(k);
    }
    obj.remove("cmdline");
    let bytes = serde_json::to_vec_pretty(&m).expect("manifest JSON");
    std::fs::write(out, &bytes).expect("unmarked manifest");
    bytes
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
    if let Some(why) = common::attest::preflight() {
        bulkhead_testkit::skip_or_fail(&why);
        return;
    }
    let started = Instant::now();
    let tmp = std::env::temp_dir().join(format!("bulkhead-tamper-{}", std::process::id()));
    let _keep = TempDir(tmp.clone());
    std::fs::create_dir_all(&tmp).expect("tmp");
    let good_dir = match good_image(&tmp.join("good")) {
        Ok(d) => d,
        Err(why) => {
            bulkhead_testkit::skip_or_fail(&why);
            return;
        }
    };
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
        // A changed command line: `init=/bin/sh` added, which this image ignores (an initramfs
        // boot runs `rdinit=/init`, and there is no shell): it shows the command line is
        // measured, not that a way in is refused.
        Case {
            name: "init-sh",
            tamper: None,
            cmdline: Some(format!("{good_cmdline} init=/bin/sh")),
            pcrs: &[4, 9, 11],
        },
    ];
    for c in &cases {
        assert!(
            build_image_tampered(
                &common::repo(),
                &tmp.join(c.name),
                c.cmdline.as_deref(),
                c.tamper
            )
            .expect("build the tampered image"),
            "the host kernel is cached (the good image was built)"
        );
    }
    // A reused good image must be of the same inputs as the tampered ones: the kernel tamper
    // changes one byte of the bzImage and nothing else. If it is older (binaries rebuilt since,
    // by mtimes too close to tell), build the good image here after all.
    let good_dir = if good_dir != tmp.join("good")
        && !same_but_one_kernel_byte(&good_dir, &tmp.join("kernel"))
    {
        eprintln!(
            "sealed tamper: {} is older than its inputs: building the good image",
            good_dir.display()
        );
        let fresh = tmp.join("good");
        common::build_image(&fresh, None).expect("build the good image");
        fresh
    } else {
        good_dir
    };
    let good_manifest = std::fs::read(good_dir.join("manifest.json")).expect("manifest");
    let good_m = manifest(&good_dir);
    for c in &cases {
        let dir = tmp.join(c.name);
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
        assert_eq!(
            m.get("cmdline_override").is_some(),
            c.cmdline.is_some(),
            "the manifest marks a replaced command line"
        );
        // A marked manifest is never an expectation: the control plane's parse refuses it.
        assert_eq!(
            ExpectedPcrs::from_manifest(
                &std::fs::read(dir.join("manifest.json")).expect("manifest")
            ),
            Err(BootChainError::TestImage(c.marker())),
            "{}: the test image's own manifest",
            c.name
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
        // The control: the tampered image's manifest with its marker removed (the marked one is
        // refused as expectations before any PCR is compared; without the marker, the same
        // host's evidence is accepted: the refusal below is the PCRs).
        let own_manifest = tmp.join(format!("{}-unmarked-manifest.json", c.name));
        let tampered_manifest = unmarked_copy(&manifest(&dir), &own_manifest);
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
            .expect("the unmarked copy of the tampered manifest")
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
        let (mut kms, ev_k, verdict) = kms_check(
            &tmp.join(format!("kms-{}-good", c.name)),
            &good_dir.join("manifest.json"),
            &host,
            &disk,
        );
        match verdict {
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
        // Its own (marked) image manifest does not even load as the KMS's policy ...
        match kms_verifier(
            &tmp.join(format!("kms-{}-marked", c.name)),
            &dir.join("manifest.json"),
            &ak,
            &disk,
        ) {
            Err(AttestConfigError::Boot(_, e)) => {
                assert_eq!(e, BootChainError::TestImage(c.marker()), "{}", c.name);
            }
            Err(other) => panic!("{}: marked manifest refused otherwise: {other:?}", c.name),
            Ok(_) => panic!("{}: the KMS enrolled a test image's manifest", c.name),
        }
        // ... and enrolled with its unmarked copy (the control), the same host gets its key.
        let (_, _, verdict) = kms_check(
            &tmp.join(format!("kms-{}-own", c.name)),
            &own_manifest,
            &host,
            &disk,
        );
        let ok = verdict.unwrap_or_else(|e| panic!("{}: own manifest refused: {e:?}", c.name));
        assert_eq!(ok.host_public, HOST_PUBLIC);
        let ready_s = host.ready_s;
        drop(host);
        eprintln!(
            "tamper {}: booted, controller ready {ready_s:.1} s after QEMU start; refused by the scheduler's and the KMS's checks: PCRs {:?} differ; its own manifest refused as a test image, accepted against its unmarked copy ({:.1} s for this boot)",
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
