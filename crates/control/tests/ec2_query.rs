//! The EC2 Query API driven by the real, unmodified AWS clients (boto3 and the aws CLI from
//! PyPI) against a real cluster of the real binaries with real KVM guests: one cluster, two
//! guest boots, every check (issue 19).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use bulkhead_devcluster::cluster::{self, StartOptions};
use serde_json::json;

mod common;
use common::aws::{clients_or_skip, creds, Env, REGION};
use common::*;

#[test]
fn boto3_and_the_aws_cli_drive_bulkhead_over_the_ec2_query_api() {
    let Some(guest) =
        guest_dir_or_skip("boto3_and_the_aws_cli_drive_bulkhead_over_the_ec2_query_api")
    else {
        return;
    };
    if clients_or_skip().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = cluster::start(
        dir.path(),
        &StartOptions {
            hosts: 2,
            controller_args: vec![
                "--backend".into(),
                "host".into(),
                "--guest-dir".into(),
                guest.display().to_string(),
            ],
            bins: bins(),
            record: false,
            poll_interval_ms: 500,
            database_url: None,
            attest: None,
            netns: None,
        },
    )
    .unwrap();
    ran_fully(&c, 2);
    let (a, b) = (creds(&c, "tenant-a"), creds(&c, "tenant-b"));
    let env = Env::new(&c, &a, &b);
    let started = std::time::Instant::now();

    // Two guests boot at once: one run by boto3, one by the aws CLI.
    let r = env.py(&["run"]);
    let ia = r["instance"].as_str().unwrap().to_string();
    assert!(ia.starts_with("i-"), "{r}");
    assert!(r["reservation"].as_str().unwrap().starts_with("r-"), "{r}");
    let ud = dir.path().join("user-data.sh");
    std::fs::write(
        &ud,
        "while [ ! -e /sys/block/vda ]; do sleep 1; done\necho disk-appeared-$(cat /sys/block/vda/size)\n",
    )
    .unwrap();
    let v = env.aws_ok(&[
        "run-instances",
        "--image-id",
        "test-guest",
        "--count",
        "1",
        "--instance-type",
        "t3.nano",
        "--user-data",
        &format!("file://{}", ud.display()),
    ]);
    let ib = v["Instances"][0]["InstanceId"]
        .as_str()
        .unwrap()
        .to_string();

    // boto3: console, encrypted volume attached to the running guest (the disk appears in it),
    // tenant isolation with AWS's codes, detach and delete, filters and pages, VPC operations.
    let f = env.py(&["flow", &ia]);
    eprintln!("boto3 flow: {f}");
    assert_eq!(f["running_filter"], json!([ia]));
    assert!(!f["stopped_filter"].as_array().unwrap().contains(&json!(ia)));
    assert_eq!(f["volume"]["encrypted"], true);
    assert_eq!(f["volume"]["kms_key"], true);
    assert_eq!(f["attach_state"], "attached");
    // The guest's kernel sees a disk of some sectors (the test host backs volumes small).
    let sectors: u64 = f["disk_line"]
        .as_str()
        .and_then(|l| l.strip_prefix("disk-appeared-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(sectors > 0, "{f}");
    assert_eq!(f["attached_filter"][0][1], "in-use");
    assert_eq!(f["b_instances"], json!([]));
    assert_eq!(f["b_volumes"], json!([]));
    for (op, want) in [
        ("DescribeInstances", "InvalidInstanceID.NotFound"),
        ("GetConsoleOutput", "InvalidInstanceID.NotFound"),
        ("StopInstances", "InvalidInstanceID.NotFound"),
        ("TerminateInstances", "InvalidInstanceID.NotFound"),
        ("DetachVolume", "InvalidVolume.NotFound"),
        ("DeleteVolume", "InvalidVolume.NotFound"),
        ("DescribeVolumes", "InvalidVolume.NotFound"),
    ] {
        assert_eq!(f["b_codes"][op], want, "tenant B {op}: {f}");
    }
    let attach = f["b_codes"]["AttachVolume"].as_str().unwrap();
    assert!(
        attach == "InvalidVolume.NotFound" || attach == "InvalidInstanceID.NotFound",
        "{attach}"
    );
    assert_eq!(f["delete_attached"], "VolumeInUse");
    assert_eq!(f["after_detach"], "available");
    assert_eq!(f["after_delete"], "InvalidVolume.NotFound");
    assert_eq!(f["volume_pages"], json!([5, 1]));
    assert_eq!(f["paged_all"], true);
    assert_eq!(f["dup_rule"], "InvalidPermission.Duplicate");
    assert_eq!(f["group"][0][1], 22);
    assert_eq!(f["subnets_of_vpc"].as_array().unwrap().len(), 1);
    for (op, want) in [
        ("DeleteSubnet", "InvalidSubnetID.NotFound"),
        ("DeleteVpc", "InvalidVpcID.NotFound"),
        ("DescribeSecurityGroups", "InvalidGroup.NotFound"),
    ] {
        assert_eq!(f["b_vpc_codes"][op], want, "tenant B {op}: {f}");
    }
    assert_eq!(f["vpc_in_use"], "DependencyViolation");
    assert_eq!(f["vpc_gone"], "InvalidVpcID.NotFound");
    assert_eq!(f["dry_run"], "DryRunOperation");
    assert_eq!(f["unknown_action"], "InvalidAction");
    assert_eq!(f["wrong_version"], "InvalidParameterValue");
    assert_eq!(f["duplicate"], "InvalidParameter");

    // The aws CLI: console (decoded from base64 by the CLI), encrypted volume attached to its
    // guest, filters and pages, detach, delete, terminate.
    env.aws_console(&ib, "BULKHEAD-GUEST-READY");
    let v = env.aws_ok(&[
        "create-volume",
        "--size",
        "1",
        "--availability-zone",
        &format!("{REGION}a"),
        "--encrypted",
    ]);
    let vb = v["VolumeId"].as_str().unwrap().to_string();
    assert_eq!(v["Encrypted"], true);
    let v = env.aws_ok(&[
        "attach-volume",
        "--volume-id",
        &vb,
        "--instance-id",
        &ib,
        "--device",
        "/dev/sdf",
    ]);
    assert_eq!(v["State"], "attached");
    let out = env.aws_console(&ib, "disk-appeared-");
    assert!(out.contains(&format!("disk-appeared-{sectors}")), "{out}");
    let v = env.aws_ok(&[
        "describe-volumes",
        "--filters",
        &format!("Name=attachment.instance-id,Values={ib}"),
    ]);
    assert_eq!(v["Volumes"][0]["VolumeId"], json!(vb));
    assert_eq!(v["Volumes"][0]["Attachments"][0]["InstanceId"], json!(ib));
    let v = env.aws_ok(&[
        "describe-instances",
        "--filters",
        "Name=instance-state-name,Values=running",
        "--page-size",
        "5",
    ]);
    let mut running: Vec<String> = v["Reservations"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["Instances"].as_array().unwrap().clone())
        .map(|i| i["InstanceId"].as_str().unwrap().to_string())
        .collect();
    running.sort();
    let mut want = vec![ia.clone(), ib.clone()];
    want.sort();
    assert_eq!(running, want);
    env.aws_ok(&["detach-volume", "--volume-id", &vb]);
    env.aws_ok(&["delete-volume", "--volume-id", &vb]);
    let (ok, err) = env.aws(&["describe-volumes", "--volume-ids", &vb]);
    assert!(
        !ok && err.as_str().unwrap().contains("InvalidVolume.NotFound"),
        "{err}"
    );

    // Signed requests that must be refused, and change nothing.
    let r = env.py(&["refusals"]);
    eprintln!("refusals: {r}");
    assert_eq!(r["first"], json!([200, "ok"]));
    assert_eq!(r["replay"], json!([401, "AuthFailure"]));
    assert_eq!(r["past"], json!([400, "RequestExpired"]));
    assert_eq!(r["future"], json!([400, "RequestExpired"]));
    assert_eq!(r["body_changed"], json!([400, "SignatureDoesNotMatch"]));
    assert_eq!(r["other_secret"], json!([400, "SignatureDoesNotMatch"]));
    assert_eq!(r["b_key_a_secret"], json!([400, "SignatureDoesNotMatch"]));
    assert_eq!(r["unsigned"], json!([401, "MissingAuthenticationToken"]));
    assert_eq!(
        r["read_repeat"],
        json!([[200, "ok"], [200, "ok"]]),
        "a read signed once is answered twice"
    );
    assert_eq!(r["volumes_made"], 1, "only the first, intact request acted");
    // Each refusal is in the control plane's audit log with its typed code.
    let log = std::fs::read_to_string(c.dir.join("control/audit.log")).unwrap();
    for code in [
        "RequestExpired",
        "SignatureDoesNotMatch",
        "MissingAuthenticationToken",
        "auth_replayed",
        "InvalidAction",
    ] {
        assert!(log.contains(code), "{code} not audited");
    }

    // Forward access: the KMS verifies the customer's SigV4 signature of a forwarded
    // AttachVolume itself. Intact, it passes the signature check (and then fails on the
    // deliberately empty key blob); changed after signing or signed with another secret, the
    // KMS refuses it as a bad signature.
    let cp = as_control_plane(&c);
    let host_pub = std::fs::read(c.dir.join("host-1/host.pub")).unwrap();
    let mut codes = Vec::new();
    for mode in ["intact", "body-changed", "other-secret"] {
        let fwd = env.py(&["sign-attach", "vol-0", &ia, mode]);
        let (st, v) = post(
            &cp,
            &c.kms_addr,
            "/v1/DecryptForHost",
            None,
            &json!({
                "volume_id": "vol-0",
                "ciphertext_blob": base64::engine::general_purpose::STANDARD.encode([0u8; 8]),
                "host_id": "host-1",
                "host_public_key": base64::engine::general_purpose::STANDARD.encode(&host_pub),
                "customer_request": fwd,
                "evidence": null,
            }),
        );
        codes.push((mode, st, code(&v).to_string()));
    }
    assert_eq!(codes[0].2, "bad_ciphertext_blob", "{codes:?}");
    assert_eq!(codes[1].1, 401, "{codes:?}");
    assert_eq!(codes[1].2, "auth_bad_signature", "{codes:?}");
    assert_eq!(codes[2].2, "auth_bad_signature", "{codes:?}");

    let v = env.aws_ok(&["terminate-instances", "--instance-ids", &ia, &ib]);
    assert_eq!(v["TerminatingInstances"].as_array().unwrap().len(), 2);
    eprintln!(
        "ec2_query: boto3 guest boot {} s, whole test {} s",
        f["boot_secs"],
        started.elapsed().as_secs()
    );
}
