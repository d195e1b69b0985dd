//! The real AWS clients (boto3 and the aws CLI from PyPI) pointed at a test cluster's EC2 Query
//! endpoint: endpoint URL, CA bundle, region and two tenants' credentials, reading no file of this
//! machine's own.

use std::path::Path;
use std::process::Command;

use bulkhead_devcluster::cluster::Cluster;
use serde_json::Value;

use super::customer;

pub const REGION: &str = "us-east-1";

/// `python3` with boto3 and the `aws` CLI, installed with pip when absent (as
/// `scripts/install-deps.sh` does); `None` after a loud skip.
pub fn clients_or_skip() -> Option<()> {
    let ok = || {
        Command::new("python3")
            .args(["-c", "import boto3, awscli"])
            .output()
            .is_ok_and(|o| o.status.success())
            && Command::new("aws")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
    };
    if !ok() {
        for extra in [&[][..], &["--break-system-packages"][..]] {
            let _ = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "boto3", "awscli"])
                .args(extra)
                .status();
            if ok() {
                break;
            }
        }
    }
    if ok() {
        Some(())
    } else {
        bulkhead_testkit::skip_or_fail("boto3 and the aws CLI are not available (pip failed)");
        None
    }
}

pub struct Env {
    pub vars: Vec<(String, String)>,
}

pub fn creds(c: &Cluster, tenant: &str) -> (String, String) {
    let _ = customer(c, tenant);
    let v: Value =
        serde_json::from_slice(&std::fs::read(c.dir.join(format!("{tenant}.json"))).unwrap())
            .unwrap();
    (
        v["access_key_id"].as_str().unwrap().to_string(),
        v["secret"].as_str().unwrap().to_string(),
    )
}

impl Env {
    pub fn new(c: &Cluster, a: &(String, String), b: &(String, String)) -> Env {
        let home = c.dir.join("aws-home");
        std::fs::create_dir_all(&home).unwrap();
        let vars = [
            ("BH_ENDPOINT", format!("https://{}", c.control_addr)),
            ("BH_REGION", REGION.to_string()),
            (
                "AWS_CA_BUNDLE",
                c.dir.join("ca/ca.pem").display().to_string(),
            ),
            ("BH_A_KEY", a.0.clone()),
            ("BH_A_SECRET", a.1.clone()),
            ("BH_B_KEY", b.0.clone()),
            ("BH_B_SECRET", b.1.clone()),
            // The aws CLI as tenant A, reading no file of this machine's own.
            ("AWS_ACCESS_KEY_ID", a.0.clone()),
            ("AWS_SECRET_ACCESS_KEY", a.1.clone()),
            ("AWS_DEFAULT_REGION", REGION.to_string()),
            ("AWS_CONFIG_FILE", home.join("config").display().to_string()),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                home.join("credentials").display().to_string(),
            ),
            ("AWS_MAX_ATTEMPTS", "1".to_string()),
        ];
        Env {
            vars: vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        }
    }

    pub fn py(&self, args: &[&str]) -> Value {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/ec2_clients.py");
        let o = Command::new("python3")
            .arg(script)
            .args(args)
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ec2_clients.py {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// `aws ec2 ARGS --endpoint-url … --output json`: (success, stdout JSON or stderr text).
    pub fn aws(&self, args: &[&str]) -> (bool, Value) {
        let endpoint = &self.vars[0].1;
        let o = Command::new("aws")
            .arg("ec2")
            .args(args)
            .args(["--endpoint-url", endpoint, "--output", "json"])
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        if o.status.success() {
            (
                true,
                serde_json::from_slice(&o.stdout).unwrap_or(Value::Null),
            )
        } else {
            (
                false,
                Value::String(String::from_utf8_lossy(&o.stderr).into()),
            )
        }
    }

    pub fn aws_ok(&self, args: &[&str]) -> Value {
        let (ok, v) = self.aws(args);
        assert!(ok, "aws ec2 {args:?}: {v}");
        v
    }

    pub fn aws_console(&self, instance: &str, needle: &str) -> String {
        let started = std::time::Instant::now();
        loop {
            let v = self.aws_ok(&["get-console-output", "--instance-id", instance]);
            let out = v["Output"].as_str().unwrap_or("").to_string();
            if out.contains(needle) {
                return out;
            }
            assert!(
                started.elapsed().as_secs() < 900,
                "no {needle:?} on {instance}:\n{out}"
            );
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    }
}
