//! Issue 12, item 6: server identity is pinned per service. Certificates name their role and
//! service (`service`/`kms`, `service`/`tokens`, `service`/`control`, `host`/`host-N`) and every
//! client of the control plane requires the one it meant to reach; a certificate of the same CA
//! for something else — here a host's certificate presented by a KMS — fails the handshake.
//!
//! Needs the release binaries (`cargo build --release --workspace --bins`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use bulkhead_control::hosts::{HostClient, TokenSource};
use bulkhead_mtls::{client_config, HttpsClient};
use bulkhead_tokens::pki::{CaDir, ServerIdentity};
use bulkhead_tokens::token::keypair_from_text;
use bulkhead_tokens::{Policy, Role, TokenService};

fn bins() -> PathBuf {
    let b = Path::new(env!("CARGO_BIN_EXE_bulkhead-control"))
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(
        b.join("bulkhead-kms").is_file(),
        "bulkhead-kms missing in {}: run `cargo build --release --workspace --bins` first",
        b.display()
    );
    b
}

struct Daemon {
    child: Child,
    addr: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real KMS, serving with whatever `ca_dir/kms.pem` is.
fn kms(ca_dir: &Path, state: &Path) -> Daemon {
    let mut child = Command::new(bins().join("bulkhead-kms"))
        .args(["--dev", "--listen", "127.0.0.1:0", "--ca-dir"])
        .arg(ca_dir)
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("no ready line: {line:?}"));
    Daemon {
        addr: v["listen"].as_str().unwrap().to_string(),
        child,
    }
}

/// A CA directory of the same CA whose `kms.pem`/`kms.key` are really `host`'s.
fn impostor_ca(ca: &Path, host: &str, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    for f in ["ca.pem", "ca.key", "control-plane.pem", "control-plane.key"] {
        std::fs::copy(ca.join(f), into.join(f)).unwrap();
    }
    std::fs::copy(ca.join(format!("{host}.pem")), into.join("kms.pem")).unwrap();
    std::fs::copy(ca.join(format!("{host}.key")), into.join("kms.key")).unwrap();
}

fn control_config(dir: &Path, kms_addr: &str) -> PathBuf {
    let path = dir.join(format!(
        "control-{}.toml",
        kms_addr.replace([':', '.'], "-")
    ));
    let cfg = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nca_dir = \"{}\"\nkms_addr = \"{kms_addr}\"\ntoken_service_addr = \"127.0.0.1:9\"\n",
        dir.join("control").display(),
        dir.join("ca").display()
    );
    std::fs::write(&path, cfg).unwrap();
    path
}

/// `bulkhead-control create-customer`: registers a customer secret with the KMS over the
/// control plane's own (pinned) client.
fn create_customer(config: &Path, tenant: &str, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bulkhead-control"))
        .arg("create-customer")
        .arg("--config")
        .arg(config)
        .args(["--tenant", tenant, "--out"])
        .arg(out)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn cluster_certificates_name_their_role_and_service() {
    let dir = tempfile::tempdir().unwrap();
    bulkhead_devcluster::cluster::prepare(dir.path(), 2, false, &[]).unwrap();
    let ca = CaDir::new(dir.path().join("ca"));
    for (name, role) in [
        ("kms", Role::Service),
        ("tokens", Role::Service),
        ("control", Role::Service),
        ("host-1", Role::Host),
        ("host-2", Role::Host),
        ("control-plane", Role::ControlPlane),
    ] {
        let (id, der) = ca.identity(name).unwrap();
        assert_eq!((id.name.as_str(), id.role), (name, role));
        let want = ServerIdentity {
            role,
            name: name.into(),
        };
        assert!(want.check_der(&der).is_ok());
    }
    let (_, host_der) = ca.identity("host-1").unwrap();
    assert_eq!(
        ServerIdentity::kms()
            .check_der(&host_der)
            .unwrap_err()
            .code(),
        "wrong_server_identity"
    );
    assert!(ServerIdentity::host("host-2").check_der(&host_der).is_err());
    // A cluster directory from before (services with `host` certificates) is re-issued.
    ca.issue("kms", Role::Host, true).unwrap();
    bulkhead_devcluster::cluster::prepare(dir.path(), 2, false, &[]).unwrap();
    assert_eq!(ca.identity("kms").unwrap().0.role, Role::Service);
}

#[test]
fn host_certificate_presented_as_the_kms_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    bulkhead_devcluster::cluster::prepare(dir.path(), 2, false, &[]).unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = CaDir::new(&ca_dir);

    // A real KMS that presents host-1's certificate (valid, same CA, SAN 127.0.0.1).
    let fake_ca = dir.path().join("impostor-ca");
    impostor_ca(&ca_dir, "host-1", &fake_ca);
    let impostor = kms(&fake_ca, &dir.path().join("impostor-kms"));
    let genuine = kms(&ca_dir, &dir.path().join("kms"));

    // What a client that checks only the CA and the address accepts (the attack before pinning).
    let unpinned = HttpsClient::new(
        client_config(
            &ca.ca_pem(),
            Some((&ca.cert("control-plane"), &ca.key("control-plane"))),
        )
        .unwrap(),
    );
    let r = block_on(unpinned.request(&impostor.addr, "POST", "/v1/Nothing", &[], Vec::new()));
    assert!(r.is_ok(), "the impostor serves TLS: {r:?}");

    // The control plane refuses it: `create-customer` registers the customer's secret with the
    // KMS; sent to the impostor it must never leave the control plane.
    let out = create_customer(
        &control_config(dir.path(), &impostor.addr),
        "tenant-a",
        &dir.path().join("a.json"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the control plane registered a customer secret with a host posing as the KMS"
    );
    assert!(
        stderr.contains("not the service kms"),
        "refused for another reason: {stderr}"
    );
    assert!(!dir.path().join("a.json").exists());
    // The genuine KMS is accepted by the same command.
    let out = create_customer(
        &control_config(dir.path(), &genuine.addr),
        "tenant-b",
        &dir.path().join("b.json"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The control plane's pinned clients, as `bulkhead-control serve` builds them.
    let base = HttpsClient::from_ca(
        &ca.ca_pem(),
        Some((&ca.cert("control-plane"), &ca.key("control-plane"))),
    )
    .unwrap();
    let call = |c: &HttpsClient, addr: &str| {
        block_on(c.request(addr, "POST", "/v1/Nothing", &[], Vec::new()))
    };
    let as_kms = base.expecting(ServerIdentity::kms()).unwrap();
    let e = call(&as_kms, &impostor.addr).unwrap_err();
    assert_eq!(e.code(), "upstream_unreachable");
    assert!(e.to_string().contains("host host-1"), "{e}");
    assert!(call(&as_kms, &genuine.addr).is_ok());
    // Neither is the KMS's certificate taken for the token service or the control plane.
    assert!(call(
        &base.expecting(ServerIdentity::token_service()).unwrap(),
        &genuine.addr
    )
    .is_err());
    assert!(call(
        &base.expecting(ServerIdentity::control_plane()).unwrap(),
        &genuine.addr
    )
    .is_err());
    // The host is what its certificate says: host-1 is accepted as host-1 only.
    assert!(call(
        &base.expecting(ServerIdentity::host("host-1")).unwrap(),
        &impostor.addr
    )
    .is_ok());
    assert!(call(
        &base.expecting(ServerIdentity::host("host-2")).unwrap(),
        &impostor.addr
    )
    .is_err());
    // A client built without its CA cannot be pinned, so cannot be used by mistake.
    assert!(unpinned.expecting(ServerIdentity::kms()).is_err());

    // The control plane's host client: a call meant for host-2 reaches a server holding
    // host-1's certificate and is refused before the request (and its token) is sent.
    let key = std::fs::read_to_string(dir.path().join("tokens/token-service.key")).unwrap();
    let policy =
        Policy::parse(&std::fs::read_to_string(ca_dir.join("rights.toml")).unwrap()).unwrap();
    let (identity, _) = ca.identity("control-plane").unwrap();
    let hosts = HostClient::new(
        base.clone(),
        TokenSource::Local(Box::new(TokenService::new(
            keypair_from_text(&key).unwrap(),
            policy,
        ))),
        identity,
    );
    let r = block_on(hosts.call(
        "host-2",
        &impostor.addr,
        &bulkhead_controller_proto::calls::GetHealth,
    ));
    assert!(
        matches!(r, Err(bulkhead_control::ControlError::Upstream)),
        "{r:?}"
    );
}
