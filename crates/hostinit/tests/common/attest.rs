//! A booted sealed host asked for quotes through its controller (`POST /v1/host/attest`, mTLS
//! with the operator's certificate and an operator token), as the control plane and the KMS ask.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bulkhead_rot::boot::BootEvidence;
use bulkhead_rot::endorsement::{CredentialChallenge, LocalManufacturer};
use bulkhead_rot::tpm::AkPublic;

use super::{HostNet, SealedHost, MTLS_PORT};

/// A scratch directory removed on drop (kept with `BULKHEAD_KEEP_TEST_DIR`).
pub struct TempDir(pub std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("BULKHEAD_KEEP_TEST_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A booted sealed host and what its controller needs to be asked for a quote.
pub struct Booted<'a> {
    host: SealedHost,
    pub ak: AkPublic,
    pub ready_s: f64,
    token: String,
    pki: &'a Path,
    net: &'a HostNet,
    tmp: &'a Path,
    name: &'a str,
}

/// Boots `uki` as host-1 on a TPM `manufacturer` made, with its configuration disk at
/// `tmp/<name>-config.img`; returns it once its controller is ready, with the AK it printed.
pub fn boot<'a>(
    tmp: &'a Path,
    name: &'a str,
    uki: &Path,
    pki: &'a Path,
    net: &'a HostNet,
    manufacturer: &LocalManufacturer,
) -> Booted<'a> {
    let disk = tmp.join(format!("{name}-config.img"));
    let _ = super::config_disk(pki, "host-1", net, &disk);
    let mut host = SealedHost::boot(&tmp.join(name), uki, &disk, net, Some(manufacturer));
    host.wait_for("BULKHEAD-HOST-AK ", Duration::from_secs(300));
    let ready = host.wait_for("\"event\":\"ready\"", Duration::from_secs(120));
    let log = host.console_text();
    let ak = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("BULKHEAD-HOST-AK "))
        .expect("AK line")
        .trim()
        .to_string();
    let token = Command::new(super::target_dir().join("release/bulkhead"))
        .args(["token", "mint", "--dev-dir"])
        .arg(pki)
        .args([
            "--caller",
            "operator",
            "--host",
            "host-1",
            "--ops",
            "AttestHost",
            "--ttl",
            "5m",
        ])
        .output()
        .expect("bulkhead token mint");
    assert!(
        token.status.success(),
        "mint: {}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8(token.stdout)
        .expect("token")
        .trim()
        .to_string();
    Booted {
        host,
        ak: AkPublic(ak),
        ready_s: ready.as_secs_f64(),
        token,
        pki,
        net,
        tmp,
        name,
    }
}

impl Booted<'_> {
    /// `POST /v1/host/attest` with `nonce` (and a credential for the TPM to activate first).
    pub fn attest(
        &self,
        nonce: &[u8; 32],
        credential: Option<&CredentialChallenge>,
    ) -> BootEvidence {
        let dir = bulkhead_tokens::statedir::StateDir::new(self.pki);
        let mut body = serde_json::json!({ "nonce": hex::encode(nonce) });
        if let Some(c) = credential {
            body["credential"] = serde_json::to_value(c).expect("credential");
        }
        let net = self.net;
        let out = Command::new("ip")
            .args(["netns", "exec", &net.ns, "curl", "-sS", "--max-time", "60"])
            .arg("--resolve")
            .arg(format!("host-1:{MTLS_PORT}:{}", net.host_ip))
            .arg("--cacert")
            .arg(dir.ca().ca_pem())
            .arg("--cert")
            .arg(dir.ca().cert("operator"))
            .arg("--key")
            .arg(dir.ca().key("operator"))
            .args([
                "-H",
                &format!("Authorization: Bearer {}", self.token),
                "-H",
                "Content-Type: application/json",
            ])
            .args(["-d", &body.to_string()])
            .arg(format!("https://host-1:{MTLS_PORT}/v1/host/attest"))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::write(
            self.tmp.join(format!("{}-evidence.json", self.name)),
            &out.stdout,
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "not boot evidence ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn console(&self) -> String {
        self.host.console_text()
    }
}

/// What an attesting boot needs (everything a sealed boot needs, plus curl for the controller's
/// API), or the reason it cannot run here.
pub fn preflight() -> Option<String> {
    if let Some(why) = super::missing_resource() {
        return Some(why);
    }
    if !curl_present() {
        return Some("curl is not installed".into());
    }
    None
}

fn curl_present() -> bool {
    Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn rand_nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    // SAFETY: getrandom writes at most n.len() bytes into n.
    let r = unsafe { libc::getrandom(n.as_mut_ptr().cast(), n.len(), 0) };
    assert_eq!(usize::try_from(r).ok(), Some(n.len()));
    n
}
