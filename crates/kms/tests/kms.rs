//! The real `bulkhead-kms` binary over real mutual TLS 1.3: forward-access checks, grants, host
//! key binding, revocation, and no plaintext data key in its database, WAL or logs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bulkhead_ec2_query::bh1 as sigv;
use bulkhead_kms_proto::{ForwardedRequest, SignedParts};
use bulkhead_mtls::{client_config, HttpsClient};
use bulkhead_sealing::{open_volume_key, HostKey};
use bulkhead_tokens::pki::CaDir;
use bulkhead_tokens::Role;
use serde_json::{json, Value};

const AKID: &str = "AKIDTENANTA00001";
const SECRET: [u8; 32] = [7u8; 32];
const AKID_B: &str = "AKIDTENANTB00001";
const SECRET_B: [u8; 32] = [9u8; 32];

struct Kms {
    child: Child,
    addr: String,
    dir: PathBuf,
    ready: Value,
}

impl Drop for Kms {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Kms {
    start_with(dir, &[], &[])
}

fn start_with(dir: &Path, args: &[String], env: &[(&str, PathBuf)]) -> Kms {
    let ca = CaDir::new(dir.join("ca"));
    if !ca.exists() {
        ca.init().unwrap();
        ca.issue("control-plane", Role::ControlPlane, false)
            .unwrap();
        ca.issue("operator", Role::Operator, false).unwrap();
    }
    let log = std::fs::File::create(dir.join("kms.stderr")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead-kms"))
        .args(["--dev", "--listen", "127.0.0.1:0", "--ca-dir"])
        .arg(dir.join("ca"))
        .arg("--state-dir")
        .arg(dir.join("kms"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("no ready line: {line:?}"));
    Kms {
        child,
        addr: v["listen"].as_str().unwrap().to_string(),
        dir: dir.to_path_buf(),
        ready: v,
    }
}

impl Kms {
    fn call_as(&self, who: &str, op: &str, body: &Value) -> (u16, Value) {
        let ca = CaDir::new(self.dir.join("ca"));
        let client = HttpsClient::new(
            client_config(&ca.ca_pem(), Some((&ca.cert(who), &ca.key(who)))).unwrap(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt
            .block_on(client.request(
                &self.addr,
                "POST",
                &format!("/v1/{op}"),
                &[("content-type", "application/json")],
                body.to_string().into_bytes(),
            ))
            .unwrap();
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }

    fn call(&self, op: &str, body: &Value) -> (u16, Value) {
        self.call_as("control-plane", op, body)
    }

    fn enroll(&self, host: &str, key: &HostKey) {
        std::fs::write(
            self.dir.join("kms/hosts").join(format!("{host}.pub")),
            key.public().to_file_bytes(),
        )
        .unwrap();
    }
}

fn signed(akid: &str, secret: &[u8], action: &str, body: &Value, at: u64) -> Value {
    let parts = SignedParts {
        method: "POST".into(),
        path: format!("/v1/{action}"),
        query: String::new(),
        host: "control.example".into(),
        date: sigv::format_date(at),
        body: body.to_string(),
        nonce: bulkhead_sealing::random_nonce(),
    };
    let f = ForwardedRequest {
        authorization: sigv::sign(akid, secret, &parts),
        parts,
    };
    serde_json::to_value(f).unwrap()
}

fn now() -> u64 {
    bulkhead_kms::service::now()
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// Registers tenants A and B, creates A's key and a data key for vol-1; returns (key_id, blob).
fn setup(k: &Kms) -> (String, String) {
    for (t, a, s) in [("tenant-a", AKID, SECRET), ("tenant-b", AKID_B, SECRET_B)] {
        let (st, v) = k.call(
            "RegisterCustomer",
            &json!({"tenant_id": t, "access_key_id": a, "secret": B64.encode(s)}),
        );
        assert_eq!(st, 200, "{v}");
    }
    let (st, v) = k.call("CreateKey", &json!({"customer_request": signed(AKID, &SECRET, "CreateKey", &json!({"Description": "a"}), now())}));
    assert_eq!(st, 200, "{v}");
    let key_id = v["key_id"].as_str().unwrap().to_string();
    let cv = json!({"SizeGiB": 1, "KmsKeyId": key_id});
    let (st, v) = k.call(
        "GenerateDataKey",
        &json!({"key_id": key_id, "volume_id": "vol-1", "customer_request": signed(AKID, &SECRET, "CreateVolume", &cv, now())}),
    );
    assert_eq!(st, 200, "{v}");
    assert!(v.get("plaintext").is_none());
    (key_id, v["ciphertext_blob"].as_str().unwrap().to_string())
}

fn decrypt_body(blob: &str, host: &str, key: &HostKey, auth: Value) -> Value {
    json!({
        "volume_id": "vol-1",
        "ciphertext_blob": blob,
        "host_id": host,
        "host_public_key": B64.encode(key.public().to_file_bytes()),
        "customer_request": auth,
    })
}

/// A customer's AttachVolume authorization. Each is distinct (its own client token), as two
/// real requests are: the KMS lets one authorization open a key once.
fn attach_auth(akid: &str, secret: &[u8], at: u64) -> Value {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    signed(
        akid,
        secret,
        "AttachVolume",
        &json!({"VolumeId": "vol-1", "InstanceId": "i-1", "ClientToken": format!("t{n}")}),
        at,
    )
}

#[test]
fn decrypt_for_host_needs_recent_customer_authorization_grant_and_enrolled_host_key() {
    let dir = tempfile::tempdir().unwrap();
    let k = start(dir.path());
    let (key_id, blob) = setup(&k);
    let host = HostKey::generate().unwrap();
    k.enroll("host-1", &host);

    // Happy path: the sealed blob opens only with that host's key, for that volume.
    let first = attach_auth(AKID, &SECRET, now());
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(&blob, "host-1", &host, first.clone()),
    );
    assert_eq!(st, 200, "{v}");
    let sealed = B64.decode(v["sealed_key"].as_str().unwrap()).unwrap();
    let dk = open_volume_key(&host, "vol-1", &sealed).unwrap();
    assert!(open_volume_key(&host, "vol-2", &sealed).is_err());
    // One authorization, one use: the same one again (for this or any other enrolled host) is
    // refused, so a control plane cannot take a customer's attach to a second host.
    let other = HostKey::generate().unwrap();
    k.enroll("host-2", &other);
    for (h, key) in [("host-1", &host), ("host-2", &other)] {
        let (st, v) = k.call(
            "DecryptForHost",
            &decrypt_body(&blob, h, key, first.clone()),
        );
        assert_eq!((st, code(&v)), (403, "authorization_replayed"), "{v}");
    }

    // (1) no recent customer authorization: 10 minutes old, or signed by someone else.
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(
            &blob,
            "host-1",
            &host,
            attach_auth(AKID, &SECRET, now() - 600),
        ),
    );
    assert_eq!((st, code(&v)), (401, "authorization_not_recent"));
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(&blob, "host-1", &host, attach_auth(AKID, &SECRET_B, now())),
    );
    assert_eq!((st, code(&v)), (401, "auth_bad_signature"));
    // A signed request for another action is not an AttachVolume authorization.
    let wrong = signed(
        AKID,
        &SECRET,
        "CreateVolume",
        &json!({"VolumeId": "vol-1"}),
        now(),
    );
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(&blob, "host-1", &host, wrong),
    );
    assert_eq!((st, code(&v)), (403, "wrong_customer_action"));

    // (2) no grant: tenant B, validly signed, cannot use tenant A's key or blob.
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(
            &blob,
            "host-1",
            &host,
            attach_auth(AKID_B, &SECRET_B, now()),
        ),
    );
    assert_eq!((st, code(&v)), (404, "no_such_key"));

    // (3) a different host key than the one enrolled for host-1, or an unenrolled host.
    let rogue = HostKey::generate().unwrap();
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(&blob, "host-1", &rogue, attach_auth(AKID, &SECRET, now())),
    );
    assert_eq!((st, code(&v)), (403, "host_key_mismatch"));
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(&blob, "host-9", &rogue, attach_auth(AKID, &SECRET, now())),
    );
    assert_eq!((st, code(&v)), (404, "unknown_host"));

    // Only the control plane's certificate may call at all.
    let (st, v) = k.call_as(
        "operator",
        "DecryptForHost",
        &decrypt_body(&blob, "host-1", &host, attach_auth(AKID, &SECRET, now())),
    );
    assert_eq!((st, code(&v)), (403, "caller_not_allowed"));

    // Revoking the grant makes the next decrypt fail.
    let rb = json!({"KeyId": key_id, "VolumeId": "vol-1"});
    let (st, v) = k.call(
        "RevokeGrant",
        &json!({"key_id": key_id, "volume_id": "vol-1", "customer_request": signed(AKID, &SECRET, "RevokeGrant", &rb, now())}),
    );
    assert_eq!((st, v["revoked"].as_u64()), (200, Some(1)), "{v}");
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(&blob, "host-1", &host, attach_auth(AKID, &SECRET, now())),
    );
    assert_eq!((st, code(&v)), (403, "no_grant"));

    // Every call is in the hash-chained audit log, refusals included.
    let head = bulkhead_audit::verify(&dir.path().join("kms/audit.log")).unwrap();
    assert!(head.records >= 12, "{head:?}");
    let audit = std::fs::read_to_string(dir.path().join("kms/audit.log")).unwrap();
    for c in [
        "authorization_not_recent",
        "no_grant",
        "host_key_mismatch",
        "caller_not_allowed",
        "no_such_key",
        "authorization_replayed",
    ] {
        assert!(audit.contains(c), "audit lacks {c}");
    }

    // No plaintext data key (raw or hex or base64) in the database, its WAL, the audit log or
    // the debug log.
    drop(k);
    let needles: Vec<Vec<u8>> = vec![
        dk.as_ref().to_vec(),
        hex::encode(dk.as_ref()).into_bytes(),
        B64.encode(dk.as_ref()).into_bytes(),
        dk.as_ref()[..16].to_vec(),
    ];
    let mut scanned = 0;
    for f in [
        "kms/kms.db",
        "kms/kms.db-wal",
        "kms/audit.log",
        "kms.stderr",
    ] {
        let p = dir.path().join(f);
        let Ok(hay) = std::fs::read(&p) else { continue };
        scanned += 1;
        for n in &needles {
            assert!(
                !hay.windows(n.len()).any(|w| w == n.as_slice()),
                "plaintext key material in {f}"
            );
        }
    }
    assert!(scanned >= 3);
}

#[test]
fn bad_input_is_refused_with_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let k = start(dir.path());
    setup(&k);
    let (st, v) = k.call("ExportKey", &json!({}));
    assert_eq!((st, code(&v)), (404, "no_such_route"));
    let (st, v) = k.call("CreateKey", &json!({"customer_request": {}, "extra": 1}));
    assert_eq!((st, code(&v)), (400, "body_invalid"));
    let (st, v) = k.call("RegisterCustomer", &json!({"tenant_id": "tenant-a", "access_key_id": "AKIDOTHER0001", "secret": B64.encode([1u8; 32])}));
    assert_eq!((st, code(&v)), (409, "customer_exists"));
    let big = "x".repeat(40 * 1024);
    let (st, v) = k.call("CreateKey", &json!({"pad": big}));
    assert_eq!((st, code(&v)), (413, "body_too_large"));
    // A tenant cannot mint data keys under another tenant's key.
    let (st, v) = k.call(
        "CreateKey",
        &json!({"customer_request": signed(AKID, &SECRET, "CreateKey", &json!({}), now())}),
    );
    assert_eq!(st, 200);
    let key_a = v["key_id"].as_str().unwrap();
    let cv = json!({"KmsKeyId": key_a});
    let (st, v) = k.call(
        "GenerateDataKey",
        &json!({"key_id": key_a, "volume_id": "vol-x", "customer_request": signed(AKID_B, &SECRET_B, "CreateVolume", &cv, now())}),
    );
    assert_eq!((st, code(&v)), (404, "no_such_key"));
}

/// SoftHSM2 (the PKCS#11 module and its token tool), or `None` after a loud skip.
fn softhsm(dir: &Path) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let module = [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file());
    let util = Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .is_ok();
    let Some(module) = module.filter(|_| util) else {
        bulkhead_testkit::skip_or_fail(
            "PKCS#11 test: SoftHSM2 not installed (apt-get install softhsm2)",
        );
        return None;
    };
    let tokens = dir.join("softhsm-tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let out = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "bulkhead-kms",
            "--pin",
            "246810",
            "--so-pin",
            "135791",
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pin = dir.join("pin");
    std::fs::write(&pin, "246810\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    Some((module, conf, pin))
}

/// Customer master keys held in a PKCS#11 token (SoftHSM2): created inside it, sensitive and
/// never extractable, used by the token for every data-key operation; the KMS's database holds
/// only a marker; a KMS restarted on the same token still serves, and the same database without
/// the token opens nothing.
#[test]
fn cmks_in_a_pkcs11_token_never_leave_it() {
    let dir = tempfile::tempdir().unwrap();
    let Some((module, conf, pin)) = softhsm(dir.path()) else {
        return;
    };
    let args = vec![
        "--pkcs11-module".to_string(),
        module.display().to_string(),
        "--pkcs11-token".into(),
        "bulkhead-kms".into(),
        "--pkcs11-pin-file".into(),
        pin.display().to_string(),
    ];
    let env = [("SOFTHSM2_CONF", conf.clone())];
    let k = start_with(dir.path(), &args, &env);
    assert_eq!(k.ready["keystore"], "pkcs11", "{}", k.ready);
    let (key_id, blob) = setup(&k);
    let host = HostKey::generate().unwrap();
    k.enroll("host-1", &host);
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(&blob, "host-1", &host, attach_auth(AKID, &SECRET, now())),
    );
    assert_eq!(st, 200, "{v}");
    let sealed = B64.decode(v["sealed_key"].as_str().unwrap()).unwrap();
    let dk = open_volume_key(&host, "vol-1", &sealed).unwrap();

    // The store keeps a marker, not a wrapped key.
    let db = rusqlite::Connection::open(dir.path().join("kms/kms.db")).unwrap();
    let stored: Vec<Vec<u8>> = db
        .prepare("SELECT wrapped FROM cmks")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(!stored.is_empty());
    assert!(stored
        .iter()
        .all(|w| w == bulkhead_kms::keystore::PKCS11_MARKER));
    drop(db);

    // Inside the token: the CMK is there, sensitive, never extractable; its value is not given out.
    {
        use cryptoki::context::{CInitializeArgs, Pkcs11};
        use cryptoki::object::{Attribute, AttributeType};
        use cryptoki::session::UserType;
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let p = Pkcs11::new(&module).unwrap();
        p.initialize(CInitializeArgs::OsThreads).unwrap();
        let slot = p
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| p.get_token_info(*s).unwrap().label().trim_end() == "bulkhead-kms")
            .unwrap();
        let s = p.open_ro_session(slot).unwrap();
        s.login(UserType::User, Some(&"246810".to_string().into()))
            .unwrap();
        let found = s
            .find_objects(&[Attribute::Label(key_id.as_bytes().to_vec())])
            .unwrap();
        assert_eq!(found.len(), 1, "the CMK is one object in the token");
        let attrs = s
            .get_attributes(
                found[0],
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::Value,
                ],
            )
            .unwrap_or_default();
        assert!(attrs.contains(&Attribute::Sensitive(true)), "{attrs:?}");
        assert!(attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
        assert!(
            attrs.contains(&Attribute::NeverExtractable(true)),
            "{attrs:?}"
        );
        assert!(
            !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
            "the token handed out the CMK's value"
        );
    }

    // A restarted KMS on the same token still opens the data key.
    drop(k);
    let k = start_with(dir.path(), &args, &env);
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(&blob, "host-1", &host, attach_auth(AKID, &SECRET, now())),
    );
    assert_eq!(st, 200, "{v}");
    let again = B64.decode(v["sealed_key"].as_str().unwrap()).unwrap();
    assert_eq!(
        open_volume_key(&host, "vol-1", &again).unwrap().as_ref(),
        dk.as_ref()
    );
    drop(k);

    // The same database and root key without the token: nothing opens.
    let k = start(dir.path());
    assert_eq!(k.ready["keystore"], "embedded");
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(&blob, "host-1", &host, attach_auth(AKID, &SECRET, now())),
    );
    assert_eq!(st, 400, "{v}");
    assert_eq!(code(&v), "ciphertext_rejected", "{v}");
}

/// A customer's signed RunInstances (distinct per call, as two real requests are).
fn run_auth(akid: &str, secret: &[u8], at: u64) -> Value {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    signed(
        akid,
        secret,
        "RunInstances",
        &json!({"ImageId": "img-1", "ClientToken": format!("r{n}")}),
        at,
    )
}

fn seal_body(
    vpc: &str,
    epoch: u32,
    instance: &str,
    host: &str,
    key: &HostKey,
    auth: &Value,
) -> Value {
    json!({
        "customer_request": auth,
        "vpc_id": vpc,
        "epoch": epoch,
        "instance_id": instance,
        "host_id": host,
        "host_public_key": B64.encode(key.public().to_file_bytes()),
    })
}

/// Opens a sealed epoch key as the net card does (the sealing id binds VPC number and epoch;
/// bytes 32..64 are zero).
fn open_epoch(host: &HostKey, vpc_number: u32, epoch: u32, hex_blob: &str) -> [u8; 32] {
    let blob = hex::decode(hex_blob).unwrap();
    assert_eq!(blob.len(), bulkhead_sealing::SEALED_BLOB_LEN);
    let opened = open_volume_key(
        host,
        &format!("netcard-vpc-{vpc_number}-epoch-{epoch}"),
        &blob,
    )
    .unwrap();
    assert!(opened.as_ref()[32..].iter().all(|b| *b == 0));
    let mut k = [0u8; 32];
    k.copy_from_slice(&opened.as_ref()[..32]);
    k
}

#[test]
fn vpc_epoch_keys_are_sealed_only_for_the_owners_instances_to_enrolled_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let k = start(dir.path());
    setup(&k);
    let host = HostKey::generate().unwrap();
    k.enroll("host-1", &host);
    let create = |akid: &str, secret: &[u8], action: &str, vpc: &str, n: u32| {
        k.call(
            "CreateVpcKey",
            &json!({"customer_request": signed(akid, secret, action, &json!({"CidrBlock": "10.0.0.0/16"}), now()),
                    "vpc_id": vpc, "vpc_number": n}),
        )
    };

    // Tenant A's VPC 7 (explicit CreateVpc) and default VPC 8 (made by a RunInstances).
    let (st, v) = create(AKID, &SECRET, "CreateVpc", "vpc-a", 7);
    assert_eq!((st, v["epoch"].as_u64()), (200, Some(1)), "{v}");
    let (st, v) = create(AKID, &SECRET, "RunInstances", "vpc-a-default", 8);
    assert_eq!(st, 200, "{v}");
    // A retry of the same VPC by its owner answers the same; anyone else's clash is refused.
    let (st, v) = create(AKID, &SECRET, "CreateVpc", "vpc-a", 7);
    assert_eq!((st, v["epoch"].as_u64()), (200, Some(1)), "{v}");
    let (st, v) = create(AKID_B, &SECRET_B, "CreateVpc", "vpc-a", 7);
    assert_eq!((st, code(&v)), (409, "vpc_exists"), "{v}");
    let (st, v) = create(AKID_B, &SECRET_B, "CreateVpc", "vpc-b", 7);
    assert_eq!((st, code(&v)), (409, "vpc_exists"), "{v}");
    let (st, v) = create(AKID, &SECRET, "CreateVolume", "vpc-c", 9);
    assert_eq!((st, code(&v)), (403, "wrong_customer_action"), "{v}");
    let (st, v) = create(AKID, &SECRET, "CreateVpc", "subnet-1", 9);
    assert_eq!((st, code(&v)), (400, "bad_request"), "{v}");
    let (st, v) = create(AKID, &SECRET, "CreateVpc", "vpc-c", 0);
    assert_eq!((st, code(&v)), (400, "bad_request"), "{v}");
    let (st, v) = create(AKID_B, &SECRET_B, "CreateVpc", "vpc-b", 10);
    assert_eq!(st, 200, "{v}");

    // Sealed to the enrolled host for one instance: the card's sealed-key layout, and every
    // instance of the VPC gets the same epoch key.
    let auth = run_auth(AKID, &SECRET, now());
    let (st, v) = k.call(
        "SealVpcKey",
        &seal_body("vpc-a", 1, "i-1", "host-1", &host, &auth),
    );
    assert_eq!((st, v["vpc_number"].as_u64()), (200, Some(7)), "{v}");
    let key1 = open_epoch(&host, 7, 1, v["sealed_epoch_key"].as_str().unwrap());
    let (st, v) = k.call(
        "SealVpcKey",
        &seal_body("vpc-a", 1, "i-2", "host-1", &host, &auth),
    );
    assert_eq!(st, 200, "{v}");
    let blob2 = v["sealed_epoch_key"].as_str().unwrap().to_string();
    assert_eq!(open_epoch(&host, 7, 1, &blob2), key1);
    // The blob is bound to its VPC number and epoch.
    let raw2 = hex::decode(&blob2).unwrap();
    assert!(open_volume_key(&host, "netcard-vpc-8-epoch-1", &raw2).is_err());
    assert!(open_volume_key(&host, "netcard-vpc-7-epoch-2", &raw2).is_err());
    // Another VPC has another key.
    let (st, v) = k.call(
        "SealVpcKey",
        &seal_body(
            "vpc-a-default",
            1,
            "i-3",
            "host-1",
            &host,
            &run_auth(AKID, &SECRET, now()),
        ),
    );
    assert_eq!(st, 200, "{v}");
    assert_ne!(
        open_epoch(&host, 8, 1, v["sealed_epoch_key"].as_str().unwrap()),
        key1
    );

    // Attacks.
    // One RunInstances authorization seals the key once per instance.
    let (st, v) = k.call(
        "SealVpcKey",
        &seal_body("vpc-a", 1, "i-1", "host-1", &host, &auth),
    );
    assert_eq!((st, code(&v)), (403, "authorization_replayed"), "{v}");
    // Tenant B's RunInstances cannot get A's VPC key (indistinguishable from no VPC).
    let (st, v) = k.call(
        "SealVpcKey",
        &seal_body(
            "vpc-a",
            1,
            "i-9",
            "host-1",
            &host,
            &run_auth(AKID_B, &SECRET_B, now()),
        ),
    );
    assert_eq!((st, code(&v)), (404, "no_such_vpc"), "{v}");
    // Another action's signature does not authorize a seal.
    let (st, v) = k.call(
        "SealVpcKey",
        &seal_body(
            "vpc-a",
            1,
            "i-9",
            "host-1",
            &host,
            &attach_auth(AKID, &SECRET, now()),
        ),
    );
    assert_eq!((st, code(&v)), (403, "wrong_customer_action"), "{v}");
    // A stale authorization.
    let (st, v) = k.call(
        "SealVpcKey",
        &seal_body(
            "vpc-a",
            1,
            "i-9",
            "host-1",
            &host,
            &run_auth(AKID, &SECRET, now() - 3600),
        ),
    );
    assert_eq!((st, code(&v)), (401, "authorization_not_recent"), "{v}");
    // An epoch that was never made.
    let (st, v) = k.call(
        "SealVpcKey",
        &seal_body(
            "vpc-a",
            2,
            "i-9",
            "host-1",
            &host,
            &run_auth(AKID, &SECRET, now()),
        ),
    );
    assert_eq!((st, code(&v)), (404, "no_such_epoch"), "{v}");
    // A host key that is not the enrolled one, or an unenrolled host.
    let rogue = HostKey::generate().unwrap();
    let (st, v) = k.call(
        "SealVpcKey",
        &seal_body(
            "vpc-a",
            1,
            "i-9",
            "host-1",
            &rogue,
            &run_auth(AKID, &SECRET, now()),
        ),
    );
    assert_eq!((st, code(&v)), (403, "host_key_mismatch"), "{v}");
    let (st, v) = k.call(
        "SealVpcKey",
        &seal_body(
            "vpc-a",
            1,
            "i-9",
            "host-9",
            &rogue,
            &run_auth(AKID, &SECRET, now()),
        ),
    );
    assert_eq!((st, code(&v)), (404, "unknown_host"), "{v}");
    // The operator's certificate may call neither operation.
    let (st, v) = k.call_as(
        "operator",
        "SealVpcKey",
        &seal_body(
            "vpc-a",
            1,
            "i-9",
            "host-1",
            &host,
            &run_auth(AKID, &SECRET, now()),
        ),
    );
    assert_eq!((st, code(&v)), (403, "caller_not_allowed"), "{v}");
    let (st, v) = k.call_as(
        "operator",
        "CreateVpcKey",
        &json!({"customer_request": run_auth(AKID, &SECRET, now()), "vpc_id": "vpc-op", "vpc_number": 99}),
    );
    assert_eq!((st, code(&v)), (403, "caller_not_allowed"), "{v}");
    // Unknown fields are refused.
    let mut extra = seal_body(
        "vpc-a",
        1,
        "i-9",
        "host-1",
        &host,
        &run_auth(AKID, &SECRET, now()),
    );
    extra["plaintext"] = json!(true);
    let (st, v) = k.call("SealVpcKey", &extra);
    assert_eq!((st, code(&v)), (400, "body_invalid"), "{v}");

    // Audited, refusals included.
    bulkhead_audit::verify(&dir.path().join("kms/audit.log")).unwrap();
    let audit = std::fs::read_to_string(dir.path().join("kms/audit.log")).unwrap();
    for c in [
        "CreateVpcKey",
        "SealVpcKey",
        "vpc_exists",
        "no_such_vpc",
        "no_such_epoch",
        "vpc:vpc-a",
        "instance:i-1",
    ] {
        assert!(audit.contains(c), "audit lacks {c}");
    }

    // The plaintext epoch key is nowhere on the KMS's disk or in its log.
    drop(k);
    let needles: Vec<Vec<u8>> = vec![
        key1.to_vec(),
        hex::encode(key1).into_bytes(),
        B64.encode(key1).into_bytes(),
        key1[..16].to_vec(),
    ];
    let mut scanned = 0;
    for f in [
        "kms/kms.db",
        "kms/kms.db-wal",
        "kms/audit.log",
        "kms.stderr",
    ] {
        let Ok(hay) = std::fs::read(dir.path().join(f)) else {
            continue;
        };
        scanned += 1;
        for n in &needles {
            assert!(
                !hay.windows(n.len()).any(|w| w == n.as_slice()),
                "plaintext epoch key in {f}"
            );
        }
    }
    assert!(scanned >= 3);
}

/// DeleteVolume's crypto-erase: after `DestroyDataKey` on the owner's own signed DeleteVolume,
/// the volume's blob opens for nobody (the owner, any host, a repeat), the secret is gone from
/// the store file, and another tenant cannot destroy it.
#[test]
fn destroyed_data_keys_open_for_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let k = start(dir.path());
    let (_key_id, blob) = setup(&k);
    let host = HostKey::generate().unwrap();
    k.enroll("host-1", &host);
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(&blob, "host-1", &host, attach_auth(AKID, &SECRET, now())),
    );
    assert_eq!(st, 200, "{v}");

    let delete = |akid: &str, secret: &[u8], vol: &str, n: u32| {
        signed(
            akid,
            secret,
            "DeleteVolume",
            &json!({"VolumeId": vol, "ClientToken": format!("d{n}")}),
            now(),
        )
    };
    // Another tenant, validly signed, is not the owner; a DeleteVolume naming another volume is
    // not this one's; an AttachVolume is not a DeleteVolume.
    let (st, v) = k.call(
        "DestroyDataKey",
        &json!({"volume_id": "vol-1", "customer_request": delete(AKID_B, &SECRET_B, "vol-1", 1)}),
    );
    assert_eq!((st, code(&v)), (403, "no_grant"), "{v}");
    let (st, v) = k.call(
        "DestroyDataKey",
        &json!({"volume_id": "vol-1", "customer_request": delete(AKID, &SECRET, "vol-2", 2)}),
    );
    assert_eq!((st, code(&v)), (403, "wrong_customer_action"), "{v}");
    let (st, v) = k.call(
        "DestroyDataKey",
        &json!({"volume_id": "vol-1", "customer_request": attach_auth(AKID, &SECRET, now())}),
    );
    assert_eq!((st, code(&v)), (403, "wrong_customer_action"), "{v}");
    // Still opens: nothing above changed anything.
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(&blob, "host-1", &host, attach_auth(AKID, &SECRET, now())),
    );
    assert_eq!(st, 200, "{v}");

    let (st, v) = k.call(
        "DestroyDataKey",
        &json!({"volume_id": "vol-1", "customer_request": delete(AKID, &SECRET, "vol-1", 3)}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["erased"], true, "{v}");
    // Refused for every caller from now on, typed.
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(&blob, "host-1", &host, attach_auth(AKID, &SECRET, now())),
    );
    assert_eq!((st, code(&v)), (410, "key_destroyed"), "{v}");
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(
            &blob,
            "host-1",
            &host,
            attach_auth(AKID_B, &SECRET_B, now()),
        ),
    );
    assert_ne!(st, 200, "{v}");
    // A repeat by the owner is answered; its one-use authorization is not reusable.
    let again = delete(AKID, &SECRET, "vol-1", 4);
    let (st, v) = k.call(
        "DestroyDataKey",
        &json!({"volume_id": "vol-1", "customer_request": again.clone()}),
    );
    assert_eq!(st, 200, "{v}");
    let (st, v) = k.call(
        "DestroyDataKey",
        &json!({"volume_id": "vol-1", "customer_request": again}),
    );
    assert_eq!((st, code(&v)), (403, "authorization_replayed"), "{v}");
    // The KMS restarted (a fresh process on the same store) still refuses.
    drop(k);
    let k = start(dir.path());
    let (st, v) = k.call(
        "DecryptForHost",
        &decrypt_body(&blob, "host-1", &host, attach_auth(AKID, &SECRET, now())),
    );
    assert_eq!((st, code(&v)), (410, "key_destroyed"), "{v}");
    // The store keeps a tombstone naming the owner, not the secret.
    drop(k);
    let conn = rusqlite::Connection::open(dir.path().join("kms/kms.db")).unwrap();
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM volume_secrets", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
    let t: String = conn
        .query_row(
            "SELECT tenant_id FROM destroyed_volumes WHERE volume_id = 'vol-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!t.is_empty());
}

/// Snapshots: a snapshot and a volume made from it join the volume's key family (ShareDataKey on
/// the owner's signed CreateSnapshot / CreateVolume naming the source), and all three open the
/// same data key, sealed for their own ids. Destroying a member refuses only that member (410 for
/// every caller); the family's secret lives, across KMS restarts, until its last member goes,
/// and then every member's blob is refused and the secret is gone from the store. Another
/// tenant cannot join a family; bad input is typed.
#[test]
fn key_families_share_one_data_key_until_their_last_member_is_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let k = start(dir.path());
    let (_key_id, blob) = setup(&k);
    let host = HostKey::generate().unwrap();
    k.enroll("host-1", &host);
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tok = || N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let snap_auth = |akid: &str, secret: &[u8], vol: &str| {
        signed(
            akid,
            secret,
            "CreateSnapshot",
            &json!({"VolumeId": vol, "ClientToken": format!("s{}", tok())}),
            now(),
        )
    };
    let clone_auth = |akid: &str, secret: &[u8], snap: &str| {
        signed(
            akid,
            secret,
            "CreateVolume",
            &json!({"SnapshotId": snap, "SizeGiB": 1, "ClientToken": format!("c{}", tok())}),
            now(),
        )
    };
    let share = |k: &Kms, src: &str, member: &str, auth: Value| {
        k.call(
            "ShareDataKey",
            &json!({"source_id": src, "member_id": member, "ciphertext_blob": blob, "customer_request": auth}),
        )
    };
    let key_for = |k: &Kms,
                   vol: &str,
                   akid: &str,
                   secret: &[u8]|
     -> (u16, Value, Option<Vec<u8>>) {
        let auth = signed(
            akid,
            secret,
            "AttachVolume",
            &json!({"VolumeId": vol, "InstanceId": "i-1", "ClientToken": format!("a{}", tok())}),
            now(),
        );
        let mut body = decrypt_body(&blob, "host-1", &host, auth);
        body["volume_id"] = json!(vol);
        let (st, v) = k.call("DecryptForHost", &body);
        let key = (st == 200).then(|| {
            let sealed = B64.decode(v["sealed_key"].as_str().unwrap()).unwrap();
            open_volume_key(&host, vol, &sealed)
                .unwrap()
                .as_ref()
                .to_vec()
        });
        (st, v, key)
    };
    let destroy = |k: &Kms, vol: &str| {
        let auth = signed(
            AKID,
            &SECRET,
            "DeleteVolume",
            &json!({"VolumeId": vol, "ClientToken": format!("d{}", tok())}),
            now(),
        );
        k.call(
            "DestroyDataKey",
            &json!({"volume_id": vol, "customer_request": auth}),
        )
    };

    // Bad input, typed; nothing is added by any of it.
    let (st, v) = share(&k, "vol-1", "vol-1", snap_auth(AKID, &SECRET, "vol-1"));
    assert_eq!((st, code(&v)), (400, "bad_request"), "{v}");
    let (st, v) = share(&k, "vol/1", "snap-1", snap_auth(AKID, &SECRET, "vol/1"));
    assert_eq!((st, code(&v)), (400, "bad_request"), "{v}");
    let (st, v) = k.call("ShareDataKey", &json!({"source_id": "vol-1", "member_id": "snap-1", "ciphertext_blob": "AAAA", "customer_request": snap_auth(AKID, &SECRET, "vol-1")}));
    assert_eq!((st, code(&v)), (400, "bad_ciphertext_blob"), "{v}");
    let (st, v) = share(&k, "vol-1", "snap-1", snap_auth(AKID, &SECRET, "vol-9"));
    assert_eq!((st, code(&v)), (403, "wrong_customer_action"), "{v}");
    let (st, v) = share(&k, "vol-1", "snap-1", attach_auth(AKID, &SECRET, now()));
    assert_eq!((st, code(&v)), (403, "wrong_customer_action"), "{v}");
    // Another tenant, validly signed, cannot join tenant A's family.
    let (st, v) = share(&k, "vol-1", "snap-b", snap_auth(AKID_B, &SECRET_B, "vol-1"));
    assert_eq!(
        st, 404,
        "another tenant's blob names a key it does not own: {v}"
    );
    let (st, _, _) = key_for(&k, "snap-b", AKID_B, &SECRET_B);
    assert_ne!(st, 200);

    // Snapshot, then a volume from the snapshot: both open vol-1's key.
    let (_, _, k1) = key_for(&k, "vol-1", AKID, &SECRET);
    let k1 = k1.expect("vol-1 opens");
    let (st, v) = share(&k, "vol-1", "snap-1", snap_auth(AKID, &SECRET, "vol-1"));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["family_id"], "vol-1", "{v}");
    // One authorization, one member.
    let a = clone_auth(AKID, &SECRET, "snap-1");
    let (st, v) = share(&k, "snap-1", "vol-2", a.clone());
    assert_eq!(st, 200, "{v}");
    let (st, v) = share(&k, "snap-1", "vol-3", a);
    assert_eq!((st, code(&v)), (403, "authorization_replayed"), "{v}");
    let (st, v) = share(&k, "snap-1", "vol-2", clone_auth(AKID, &SECRET, "snap-1"));
    assert_eq!((st, code(&v)), (409, "member_exists"), "{v}");
    let (_, v, k2) = key_for(&k, "vol-2", AKID, &SECRET);
    assert_eq!(
        k2.as_deref(),
        Some(&k1[..]),
        "the clone opens the family's key: {v}"
    );
    let (st, _, _) = key_for(&k, "vol-2", AKID_B, &SECRET_B);
    assert_ne!(st, 200, "not for another tenant");

    // The original volume deleted: only it is refused; the clone still opens, across a restart.
    let (st, v) = destroy(&k, "vol-1");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["family_members_left"], 2, "{v}");
    let (st, v, _) = key_for(&k, "vol-1", AKID, &SECRET);
    assert_eq!((st, code(&v)), (410, "key_destroyed"), "{v}");
    let (st, v) = share(&k, "vol-1", "snap-2", snap_auth(AKID, &SECRET, "vol-1"));
    assert_eq!((st, code(&v)), (410, "key_destroyed"), "{v}");
    drop(k);
    let k = start(dir.path());
    let (_, v, k2) = key_for(&k, "vol-2", AKID, &SECRET);
    assert_eq!(k2.as_deref(), Some(&k1[..]), "{v}");

    // Clone and snapshot destroyed: the family's secret goes with the last one.
    let (st, v) = destroy(&k, "vol-2");
    assert_eq!(
        (st, v["family_members_left"].as_u64()),
        (200, Some(1)),
        "{v}"
    );
    let (st, v, _) = key_for(&k, "vol-2", AKID, &SECRET);
    assert_eq!((st, code(&v)), (410, "key_destroyed"), "{v}");
    let (st, v) = destroy(&k, "snap-1");
    assert_eq!(
        (st, v["family_members_left"].as_u64()),
        (200, Some(0)),
        "{v}"
    );
    drop(k);
    let k = start(dir.path());
    for vol in ["vol-1", "vol-2", "snap-1"] {
        for (a, s) in [(AKID, &SECRET), (AKID_B, &SECRET_B)] {
            let (st, v, _) = key_for(&k, vol, a, s);
            assert_ne!(st, 200, "{vol}: {v}");
            if a == AKID {
                assert_eq!((st, code(&v)), (410, "key_destroyed"), "{vol}: {v}");
            }
        }
    }
    drop(k);
    let conn = rusqlite::Connection::open(dir.path().join("kms/kms.db")).unwrap();
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM volume_secrets", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0, "the family's secret is gone");
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM family_members", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
}

/// Crypto-erase does not depend on clocks: the owner's signed DeleteSnapshot for an id the KMS
/// never added (its create's ShareDataKey is late: a stalled request, a skewed replica) is
/// answered `no_grant` as before but tombstones the id, so the late ShareDataKey is refused and
/// no family member outlives every row. Another tenant's delete naming a live member of A's
/// tombstones nothing, and A's family still works.
#[test]
fn a_destroy_of_an_unknown_id_refuses_a_late_share_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let k = start(dir.path());
    let (_key_id, blob) = setup(&k);
    let auth = |akid: &str, secret: &[u8], action: &str, field: &str, id: &str, n: u32| {
        signed(
            akid,
            secret,
            action,
            &json!({field: id, "ClientToken": format!("u{n}")}),
            now(),
        )
    };
    let share = |member: &str, n: u32| {
        k.call(
            "ShareDataKey",
            &json!({"source_id": "vol-1", "member_id": member, "ciphertext_blob": blob,
                    "customer_request": auth(AKID, &SECRET, "CreateSnapshot", "VolumeId", "vol-1", n)}),
        )
    };
    // The delete reaches the KMS first: nothing names snap-late.
    let (st, v) = k.call(
        "DestroyDataKey",
        &json!({"volume_id": "snap-late", "customer_request":
                auth(AKID, &SECRET, "DeleteSnapshot", "SnapshotId", "snap-late", 1)}),
    );
    assert_eq!((st, code(&v)), (403, "no_grant"), "{v}");
    // The create's late ShareDataKey is refused: the id is tombstoned.
    let (st, v) = share("snap-late", 2);
    assert_eq!((st, code(&v)), (409, "member_exists"), "{v}");
    // Another tenant's delete of A's live member changes nothing; A can still snapshot.
    let (st, v) = share("snap-ok", 3);
    assert_eq!(st, 200, "{v}");
    let (st, v) = k.call(
        "DestroyDataKey",
        &json!({"volume_id": "snap-ok", "customer_request":
                auth(AKID_B, &SECRET_B, "DeleteSnapshot", "SnapshotId", "snap-ok", 4)}),
    );
    assert_eq!((st, code(&v)), (403, "no_grant"), "{v}");
    let (st, v) = k.call(
        "DestroyDataKey",
        &json!({"volume_id": "snap-ok", "customer_request":
                auth(AKID, &SECRET, "DeleteSnapshot", "SnapshotId", "snap-ok", 5)}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["erased"], true, "{v}");
    drop(k);
    let conn = rusqlite::Connection::open(dir.path().join("kms/kms.db")).unwrap();
    let t: String = conn
        .query_row(
            "SELECT tenant_id FROM destroyed_volumes WHERE volume_id = 'snap-late'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(t, "tenant-a");
    let n: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM family_members WHERE member_id IN ('snap-late', 'snap-ok')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 0);
}

/// Key-family calls check the id field of the action the customer signed, not whichever id
/// field the body has: ShareDataKey takes a CreateSnapshot's VolumeId or a CreateVolume's
/// SnapshotId, DestroyDataKey a DeleteVolume's VolumeId or a DeleteSnapshot's SnapshotId, and
/// GenerateDataKey refuses a CreateVolume that names a snapshot (that one only joins a family).
#[test]
fn key_family_calls_check_the_signed_actions_own_id_field() {
    let dir = tempfile::tempdir().unwrap();
    let k = start(dir.path());
    let (key_id, blob) = setup(&k);
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let auth = |action: &str, mut body: Value| {
        body["ClientToken"] = json!(format!(
            "f{}",
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        signed(AKID, &SECRET, action, &body, now())
    };
    let share = |src: &str, member: &str, a: Value| {
        k.call(
            "ShareDataKey",
            &json!({"source_id": src, "member_id": member, "ciphertext_blob": blob, "customer_request": a}),
        )
    };
    let destroy = |id: &str, a: Value| {
        k.call(
            "DestroyDataKey",
            &json!({"volume_id": id, "customer_request": a}),
        )
    };
    // A CreateVolume naming the volume (not a snapshot), a CreateSnapshot naming it as a
    // SnapshotId: neither authorizes a snapshot of vol-1.
    for a in [
        auth("CreateVolume", json!({"VolumeId": "vol-1", "SizeGiB": 1})),
        auth("CreateSnapshot", json!({"SnapshotId": "vol-1"})),
    ] {
        let (st, v) = share("vol-1", "snap-1", a);
        assert_eq!((st, code(&v)), (403, "wrong_customer_action"), "{v}");
    }
    let (st, v) = share(
        "vol-1",
        "snap-1",
        auth("CreateSnapshot", json!({"VolumeId": "vol-1"})),
    );
    assert_eq!(st, 200, "{v}");
    // A CreateSnapshot naming the snapshot as a SnapshotId does not make a volume from it.
    let (st, v) = share(
        "snap-1",
        "vol-2",
        auth("CreateSnapshot", json!({"SnapshotId": "snap-1"})),
    );
    assert_eq!((st, code(&v)), (403, "wrong_customer_action"), "{v}");
    // A DeleteSnapshot naming vol-1 as a VolumeId, a DeleteVolume naming it as a SnapshotId:
    // neither erases it.
    for a in [
        auth("DeleteSnapshot", json!({"VolumeId": "vol-1"})),
        auth("DeleteVolume", json!({"SnapshotId": "vol-1"})),
    ] {
        let (st, v) = destroy("vol-1", a);
        assert_eq!((st, code(&v)), (403, "wrong_customer_action"), "{v}");
    }
    // A signed CreateVolume from a snapshot does not authorize a fresh data key.
    let cv = json!({"SizeGiB": 1, "KmsKeyId": key_id, "SnapshotId": "snap-1"});
    let (st, v) = k.call(
        "GenerateDataKey",
        &json!({"key_id": key_id, "volume_id": "vol-3", "customer_request": auth("CreateVolume", cv)}),
    );
    assert_eq!((st, code(&v)), (403, "wrong_customer_action"), "{v}");
    // The right fields still work.
    let (st, v) = destroy(
        "snap-1",
        auth("DeleteSnapshot", json!({"SnapshotId": "snap-1"})),
    );
    assert_eq!(st, 200, "{v}");
    let (st, v) = destroy("vol-1", auth("DeleteVolume", json!({"VolumeId": "vol-1"})));
    assert_eq!(
        (st, v["family_members_left"].as_u64()),
        (200, Some(0)),
        "{v}"
    );
}
