//! What the tests that boot real guests under the real controller share: where the test guest
//! and the release binaries are, how long a boot may take, whether this machine can boot at all
//! (a loud skip otherwise), and a sealing host key for the dev-mode controller.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulkhead_sealing::HostKey;

use super::controller_bin;

pub const MIN10: Duration = Duration::from_secs(600);

/// A guest boot takes 1-5 minutes on the development machines' software KVM under load (more
/// when several engineers boot at once): 10 minutes, or `BULKHEAD_TEST_BOOT_TIMEOUT_SECS`.
pub fn boot_timeout() -> Duration {
    std::env::var("BULKHEAD_TEST_BOOT_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(MIN10)
}

/// The release directory the controller was built in (its hypervisor and cards are there).
pub fn release_dir() -> PathBuf {
    Path::new(controller_bin())
        .parent()
        .expect("release dir")
        .to_path_buf()
}

/// The target directory above it.
pub fn target_dir() -> PathBuf {
    release_dir().parent().expect("target dir").to_path_buf()
}

/// The guest: `BULKHEAD_TEST_GUEST_DIR` if set, else `target/guest`.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("BULKHEAD_TEST_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest"))
}

/// Whether this machine can boot the test guest with the binaries `bins` built next to the
/// controller; prints the loud skip line if not (`make test` turns it into a failure).
pub fn can_boot_with(test: &str, bins: &[&str]) -> bool {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let g = guest_dir();
    let guest = g.join("vmlinux").is_file() && g.join("initramfs.cpio").is_file();
    let missing: Vec<&str> = bins
        .iter()
        .copied()
        .filter(|b| !release_dir().join(b).is_file())
        .collect();
    if !kvm || !guest || !missing.is_empty() {
        bulkhead_testkit::skip_or_fail(&format!(
            "{test}: needs /dev/kvm ({}), the test guest in {} ({}; run `make guest`) and \
             {bins:?} next to the controller (missing: {missing:?})",
            if kvm { "present" } else { "ABSENT" },
            g.display(),
            if guest { "present" } else { "ABSENT" },
        ));
        return false;
    }
    true
}

/// Writes a fresh sealing host key to `dir/host.key` (0600), where the dev-mode controller
/// picks it up and hands its path to every card. The controller never reads it.
pub fn host_key(dir: &Path) -> HostKey {
    let host = HostKey::generate().unwrap();
    let p = dir.join("host.key");
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(host.to_file_bytes().unwrap().as_ref()).unwrap();
    drop(f);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    host
}

/// A deterministic 64-byte AES-256-XTS volume key per `seed` (test data only).
pub fn volume_key(seed: u8) -> [u8; 64] {
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::try_from(i).unwrap().wrapping_mul(37).wrapping_add(seed) ^ 0x5c;
    }
    k
}
