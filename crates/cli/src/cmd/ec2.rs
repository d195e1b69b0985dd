//! `bulkhead ec2 …`: the customer API the way the `aws ec2` CLI spells it
//! (`bulkhead ec2 run-instances --image-id test-guest`). Each subcommand builds the action's JSON
//! body from typed flags and hands it to `bulkhead-control call` (found next to this binary),
//! which signs the request with the customer's access key and secret. Nothing is signed or
//! sent here, so the signing code exists once.
//!
//! Where to send it: `--endpoint`, `--ca-bundle`, `--credentials`, or the environment
//! (`BULKHEAD_ENDPOINT`, `BULKHEAD_CA_BUNDLE`, `BULKHEAD_CREDENTIALS`), or `--cluster DIR` for a
//! cluster started with `bulkhead up --dir DIR` (endpoint and CA read from it).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Map, Value};

use super::CliError;

#[derive(Debug, clap::Args)]
pub struct Ec2Args {
    /// Control-plane address (host:port).
    #[arg(long, env = "BULKHEAD_ENDPOINT", global = true)]
    pub endpoint: Option<String>,
    /// CA certificate that signed the control plane's certificate.
    #[arg(long, env = "BULKHEAD_CA_BUNDLE", global = true)]
    pub ca_bundle: Option<PathBuf>,
    /// Credentials file (written by `bulkhead-control create-customer`).
    #[arg(long, env = "BULKHEAD_CREDENTIALS", global = true)]
    pub credentials: Option<PathBuf>,
    /// A cluster directory from `bulkhead up --dir DIR`: endpoint and CA come from it.
    #[arg(long, env = "BULKHEAD_CLUSTER", global = true)]
    pub cluster: Option<PathBuf>,
    /// Print the action and body instead of sending them.
    #[arg(long, global = true)]
    pub dry_run: bool,
    #[command(subcommand)]
    pub action: Ec2Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Ec2Action {
    /// Launch an instance (placed on a host by whole cores).
    RunInstances {
        #[arg(long)]
        image_id: String,
        #[arg(long)]
        vcpu_count: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u32>,
        /// `default` or `dedicated`.
        #[arg(long)]
        tenancy: Option<String>,
        /// Script the guest runs at boot.
        #[arg(long, conflicts_with = "user_data_file")]
        user_data: Option<String>,
        #[arg(long)]
        user_data_file: Option<PathBuf>,
        #[arg(long)]
        client_token: Option<String>,
    },
    /// Describe your instances (all, or the ids given).
    DescribeInstances {
        #[arg(long, num_args = 1..)]
        instance_ids: Vec<String>,
    },
    StartInstances {
        #[arg(long, num_args = 1.., required = true)]
        instance_ids: Vec<String>,
    },
    StopInstances {
        #[arg(long, num_args = 1.., required = true)]
        instance_ids: Vec<String>,
    },
    TerminateInstances {
        #[arg(long, num_args = 1.., required = true)]
        instance_ids: Vec<String>,
    },
    /// Create a volume, encrypted by default under your KMS key.
    CreateVolume {
        #[arg(long)]
        size: u32,
        #[arg(long)]
        kms_key_id: Option<String>,
        #[arg(long)]
        client_token: Option<String>,
    },
    DescribeVolumes {
        #[arg(long, num_args = 1..)]
        volume_ids: Vec<String>,
    },
    AttachVolume {
        #[arg(long)]
        volume_id: String,
        #[arg(long)]
        instance_id: String,
    },
    DetachVolume {
        #[arg(long)]
        volume_id: String,
    },
    DeleteVolume {
        #[arg(long)]
        volume_id: String,
    },
    /// The instance's console output (`--output text` prints it raw).
    GetConsoleOutput {
        #[arg(long)]
        instance_id: String,
        #[arg(long, default_value = "json")]
        output: String,
    },
}

fn put(m: &mut Map<String, Value>, k: &str, v: Option<Value>) {
    if let Some(v) = v {
        m.insert(k.into(), v);
    }
}

/// The API action and JSON body for a subcommand.
pub fn request(a: &Ec2Action) -> Result<(&'static str, Value), CliError> {
    let ids = |k: &str, v: &[String]| json!({ k: v });
    Ok(match a {
        Ec2Action::RunInstances {
            image_id,
            vcpu_count,
            memory_mib,
            tenancy,
            user_data,
            user_data_file,
            client_token,
        } => {
            let mut m = Map::new();
            m.insert("ImageId".into(), json!(image_id));
            put(&mut m, "VcpuCount", vcpu_count.map(|v| json!(v)));
            put(&mut m, "MemoryMiB", memory_mib.map(|v| json!(v)));
            put(&mut m, "Tenancy", tenancy.as_ref().map(|v| json!(v)));
            let ud = match user_data_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .map_err(|e| CliError::Io(p.display().to_string(), e))?,
                ),
                None => user_data.clone(),
            };
            put(&mut m, "UserData", ud.map(|v| json!(v)));
            put(
                &mut m,
                "ClientToken",
                client_token.as_ref().map(|v| json!(v)),
            );
            ("RunInstances", Value::Object(m))
        }
        Ec2Action::DescribeInstances { instance_ids } => {
            ("DescribeInstances", ids("InstanceIds", instance_ids))
        }
        Ec2Action::StartInstances { instance_ids } => {
            ("StartInstances", ids("InstanceIds", instance_ids))
        }
        Ec2Action::StopInstances { instance_ids } => {
            ("StopInstances", ids("InstanceIds", instance_ids))
        }
        Ec2Action::TerminateInstances { instance_ids } => {
            ("TerminateInstances", ids("InstanceIds", instance_ids))
        }
        Ec2Action::CreateVolume {
            size,
            kms_key_id,
            client_token,
        } => {
            let mut m = Map::new();
            m.insert("SizeGiB".into(), json!(size));
            put(&mut m, "KmsKeyId", kms_key_id.as_ref().map(|v| json!(v)));
            put(
                &mut m,
                "ClientToken",
                client_token.as_ref().map(|v| json!(v)),
            );
            ("CreateVolume", Value::Object(m))
        }
        Ec2Action::DescribeVolumes { volume_ids } => {
            ("DescribeVolumes", ids("VolumeIds", volume_ids))
        }
        Ec2Action::AttachVolume {
            volume_id,
            instance_id,
        } => (
            "AttachVolume",
            json!({"VolumeId": volume_id, "InstanceId": instance_id}),
        ),
        Ec2Action::DetachVolume { volume_id } => ("DetachVolume", json!({ "VolumeId": volume_id })),
        Ec2Action::DeleteVolume { volume_id } => ("DeleteVolume", json!({ "VolumeId": volume_id })),
        Ec2Action::GetConsoleOutput { instance_id, .. } => {
            ("GetConsoleOutput", json!({ "InstanceId": instance_id }))
        }
    })
}

pub fn run(a: Ec2Args) -> Result<(), CliError> {
    let (action, body) = request(&a.action)?;
    if a.dry_run {
        println!("{action} {body}");
        return Ok(());
    }
    let (mut endpoint, mut ca) = (a.endpoint, a.ca_bundle);
    if let Some(dir) = &a.cluster {
        let f = dir.join("cluster.json");
        let v: Value = std::fs::read(&f)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| CliError::BadArgument(format!("{}: not a cluster file", f.display())))?;
        endpoint = endpoint.or_else(|| v["control"].as_str().map(str::to_owned));
        ca = ca.or_else(|| Some(dir.join("ca/ca.pem")));
    }
    let missing = |what: &str| {
        CliError::BadArgument(format!(
            "no {what}: give --{what} (or its BULKHEAD_* variable) or --cluster DIR"
        ))
    };
    let endpoint = endpoint.ok_or_else(|| missing("endpoint"))?;
    let ca = ca.ok_or_else(|| missing("ca-bundle"))?;
    let creds = a.credentials.ok_or_else(|| missing("credentials"))?;
    let bin = super::sibling_binary("bulkhead-control")?;
    let mut cmd = Command::new(bin);
    cmd.arg("call")
        .arg("--endpoint")
        .arg(endpoint)
        .arg("--ca")
        .arg(ca)
        .arg("--credentials")
        .arg(creds)
        .arg(action)
        .arg(body.to_string());
    if let Ec2Action::GetConsoleOutput { output, .. } = &a.action {
        if output == "text" {
            let out = cmd
                .output()
                .map_err(|e| CliError::Io("bulkhead-control".into(), e))?;
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            match v["Output"].as_str() {
                Some(s) if out.status.success() => print!("{s}"),
                _ => {
                    print!("{}", String::from_utf8_lossy(&out.stdout));
                    return Err(CliError::BadArgument("the call failed".into()));
                }
            }
            return Ok(());
        }
    }
    Err(CliError::Io("exec bulkhead-control".into(), cmd.exec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_the_api_bodies() {
        let (a, b) = request(&Ec2Action::RunInstances {
            image_id: "test-guest".into(),
            vcpu_count: Some(2),
            memory_mib: None,
            tenancy: Some("dedicated".into()),
            user_data: Some("echo hi".into()),
            user_data_file: None,
            client_token: None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a, "RunInstances");
        assert_eq!(
            b,
            json!({"ImageId": "test-guest", "VcpuCount": 2, "Tenancy": "dedicated", "UserData": "echo hi"})
        );
        let (a, b) = request(&Ec2Action::AttachVolume {
            volume_id: "vol-1".into(),
            instance_id: "i-1".into(),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (a, b),
            (
                "AttachVolume",
                json!({"VolumeId": "vol-1", "InstanceId": "i-1"})
            )
        );
        let (_, b) = request(&Ec2Action::TerminateInstances {
            instance_ids: vec!["i-1".into(), "i-2".into()],
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b, json!({"InstanceIds": ["i-1", "i-2"]}));
    }
}
