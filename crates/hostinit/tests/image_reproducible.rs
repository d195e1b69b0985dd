//! `make host-image` is reproducible: two builds from the same inputs give the same UKI digest,
//! the same manifest and byte-identical parts; a different command line gives another digest.
//! Needs the host kernel in its cache (`make host-image` builds it once, ~30 min here) and the
//! release binaries (`cargo build --release --workspace --bins`, as `make test` does first).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the build script into `out`; `None` (after skip_or_fail) when the kernel is not cached.
fn build(out: &Path, cmdline: Option<&str>) -> Option<()> {
    let mut cmd = Command::new(repo().join("scripts/build-host-image.sh"));
    cmd.arg(out)
        .env("BULKHEAD_HOST_NO_CARGO", "1")
        .env("BULKHEAD_HOST_REQUIRE_CACHE", "1")
        // Only the arguments shape the image, not the caller's environment.
        .env_remove("BULKHEAD_HOST_TAMPER")
        .env_remove("BULKHEAD_HOST_CMDLINE")
        .env_remove("BULKHEAD_TEST_ONLY");
    if let Some(c) = cmdline {
        // A replaced command line is a test image: the script wants it said.
        cmd.env("BULKHEAD_HOST_CMDLINE", c)
            .env("BULKHEAD_TEST_ONLY", "1");
    }
    let o = cmd.output().expect("run build-host-image.sh");
    if o.status.code() == Some(3) {
        bulkhead_testkit::skip_or_fail("the host kernel is not built: run `make host-image`");
        return None;
    }
    assert!(
        o.status.success(),
        "build-host-image.sh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(())
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn same_inputs_same_digest() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    if !target.join("release/bulkhead-controller").is_file() {
        bulkhead_testkit::skip_or_fail(
            "no release bulkhead-controller: cargo build --release --workspace --bins",
        );
        return;
    }
    let tmp = std::env::temp_dir().join(format!("bulkhead-host-image-{}", std::process::id()));
    let (a, b, c) = (tmp.join("a"), tmp.join("b"), tmp.join("c"));
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(tmp.clone());
    let t0 = std::time::Instant::now();
    if build(&a, None).is_none() {
        return;
    }
    let one_build = t0.elapsed();
    // A second build, a moment later (another second on the clock, another directory).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    build(&b, None).expect("second build");
    for f in [
        "bulkhead-host.efi",
        "initramfs.cpio",
        "bzImage",
        "cmdline",
        "manifest.json",
        "digest",
    ] {
        assert!(
            read(&a.join(f)) == read(&b.join(f)),
            "{f} differs between two builds"
        );
    }
    let digest = String::from_utf8(read(&a.join("digest"))).expect("utf8");
    let digest = digest.trim();
    assert_eq!(digest.len(), 64);
    // The digest is the UKI's SHA-256, and the manifest lists it and every part.
    let manifest: serde_json::Value =
        serde_json::from_slice(&read(&a.join("manifest.json"))).expect("manifest is JSON");
    assert_eq!(manifest["uki_sha256"], digest);
    let parts = manifest["parts"].as_array().expect("parts");
    for name in [
        "bulkhead-host.efi",
        "bzImage",
        "initramfs.cpio",
        "cmdline",
        "os-release",
        "stub",
    ] {
        assert!(
            parts.iter().any(|p| p["name"] == name),
            "manifest lacks {name}"
        );
    }
    let files = manifest["initramfs"].as_array().expect("initramfs list");
    let names: Vec<&str> = files.iter().filter_map(|f| f["name"].as_str()).collect();
    assert!(names.contains(&"/init") && names.contains(&"/usr/bin/bulkhead-controller"));
    assert!(
        names.iter().any(|n| n.contains("libc.so")),
        "no libc in {names:?}"
    );
    for bad in ["sh", "busybox", "bash", "login", "getty", "sshd"] {
        assert!(
            !names.iter().any(|n| n.rsplit('/').next() == Some(bad)),
            "{bad} is in the initramfs: {names:?}"
        );
    }
    // Another command line is another image.
    build(
        &c,
        Some("console=ttyS0,115200 panic=-1 quiet lockdown=none rdinit=/init"),
    )
    .expect("third build");
    assert_ne!(read(&c.join("digest")), read(&a.join("digest")));
    // ... and other expected PCRs: 4 (the UKI's hash), 9 (the command line), 11 (its section);
    // not 12.
    let other: serde_json::Value =
        serde_json::from_slice(&read(&c.join("manifest.json"))).expect("manifest is JSON");
    // The image as built carries no test marker; the one with another command line is marked
    // (and names it), so no verifier takes its manifest as expectations.
    assert_eq!(manifest.get("cmdline_override"), None);
    assert_eq!(manifest.get("tamper"), None);
    assert_eq!(other["cmdline_override"], true);
    assert_eq!(
        bulkhead_rot::boot::ExpectedPcrs::from_manifest(&read(&c.join("manifest.json"))),
        Err(bulkhead_rot::boot::BootChainError::TestImage(
            "cmdline_override"
        ))
    );
    assert!(
        bulkhead_rot::boot::ExpectedPcrs::from_manifest(&read(&a.join("manifest.json"))).is_ok()
    );
    assert_eq!(
        other["cmdline"],
        "console=ttyS0,115200 panic=-1 quiet lockdown=none rdinit=/init"
    );
    for p in ["4", "9", "11", "12"] {
        let (x, y) = (&manifest["expected_pcrs"][p], &other["expected_pcrs"][p]);
        assert!(x.as_str().is_some_and(|v| v.len() == 64), "PCR {p}: {x}");
        assert_eq!(x == y, p == "12", "PCR {p}: {x} vs {y}");
    }
    eprintln!(
        "host image: digest {digest}, UKI {} bytes, initramfs {} bytes, one build {:.1} s",
        read(&a.join("bulkhead-host.efi")).len(),
        read(&a.join("initramfs.cpio")).len(),
        one_build.as_secs_f64()
    );
}
