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
        /// The subnet of the instance's interface (default: your default subnet).
        #[arg(long)]
        subnet_id: Option<String>,
        /// Security groups of the subnet's VPC (default: the VPC's `default` group).
        #[arg(long, num_args = 1..)]
        security_group_ids: Vec<String>,
        /// Instance storage: a local ephemeral disk of N GiB (1..=64; the guest's first disk),
        /// keyed inside its card and crypto-erased at stop and terminate.
        #[arg(long, value_name = "N")]
        instance_storage_gib: Option<u32>,
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
        /// Start as a copy of this snapshot (same key family; `--size` at least its size).
        #[arg(long)]
        snapshot_id: Option<String>,
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
        /// Detach even if the instance's host cannot be reached (a network volume's storage
        /// node then fences that host).
        #[arg(long)]
        force: bool,
    },
    DeleteVolume {
        #[arg(long)]
        volume_id: String,
    },
    /// Snapshot a detached network volume (ciphertext copy on its storage node).
    CreateSnapshot {
        #[arg(long)]
        volume_id: String,
        #[arg(long)]
        client_token: Option<String>,
    },
    DescribeSnapshots {
        #[arg(long, num_args = 1..)]
        snapshot_ids: Vec<String>,
    },
    DeleteSnapshot {
        #[arg(long)]
        snapshot_id: String,
    },
    /// The instance's console output (`--output text` prints it raw).
    GetConsoleOutput {
        #[arg(long)]
        instance_id: String,
        #[arg(long, default_value = "json")]
        output: String,
    },
    /// Create a VPC (`--cidr-block 10.0.0.0/16`, /16 to /28).
    CreateVpc {
        #[arg(long)]
        cidr_block: String,
        #[arg(long)]
        client_token: Option<String>,
    },
    /// Describe your VPCs (all, or the ids given).
    DescribeVpcs {
        #[arg(long, num_args = 1..)]
        vpc_ids: Vec<String>,
    },
    /// Delete a VPC (it must have no subnets).
    DeleteVpc {
        #[arg(long)]
        vpc_id: String,
    },
    /// Create a subnet inside a VPC's block.
    CreateSubnet {
        #[arg(long)]
        vpc_id: String,
        #[arg(long)]
        cidr_block: String,
        #[arg(long)]
        client_token: Option<String>,
    },
    DescribeSubnets {
        #[arg(long, num_args = 1..)]
        subnet_ids: Vec<String>,
    },
    /// Delete a subnet (no instance may use it).
    DeleteSubnet {
        #[arg(long)]
        subnet_id: String,
    },
    /// Create a security group in a VPC (no ingress; egress open).
    CreateSecurityGroup {
        #[arg(long)]
        group_name: String,
        #[arg(long)]
        vpc_id: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        client_token: Option<String>,
    },
    /// Let traffic in: `--protocol tcp --port 7000 --cidr 10.0.0.0/16` (`--port 7000-7100`;
    /// no port for icmp and all).
    AuthorizeSecurityGroupIngress(IngressArgs),
    /// Remove an ingress rule (the same flags as authorize).
    RevokeSecurityGroupIngress(IngressArgs),
    DescribeSecurityGroups {
        #[arg(long, num_args = 1..)]
        group_ids: Vec<String>,
    },
}

/// The flags of authorize/revoke-security-group-ingress (the `aws ec2` shorthand).
#[derive(Debug, clap::Args)]
pub struct IngressArgs {
    #[arg(long)]
    pub group_id: String,
    /// `tcp`, `udp`, `icmp` or `all` (`-1`).
    #[arg(long)]
    pub protocol: String,
    /// A port or `FROM-TO` (tcp and udp).
    #[arg(long)]
    pub port: Option<String>,
    #[arg(long)]
    pub cidr: String,
}

/// EC2's `IpPermissions` for the shorthand flags. Only the shape is built here; the control
/// plane checks the values.
fn ip_permissions(a: &IngressArgs) -> Result<Value, CliError> {
    let mut p = Map::new();
    p.insert("IpProtocol".into(), json!(a.protocol));
    if let Some(port) = &a.port {
        let (from, to) = port.split_once('-').unwrap_or((port, port));
        let n = |s: &str| {
            s.parse::<i32>()
                .map_err(|_| CliError::BadArgument(format!("--port {port}: not a port or range")))
        };
        p.insert("FromPort".into(), json!(n(from)?));
        p.insert("ToPort".into(), json!(n(to)?));
    }
    p.insert("IpRanges".into(), json!([{ "CidrIp": a.cidr }]));
    Ok(json!({ "GroupId": a.group_id, "IpPermissions": [Value::Object(p)] }))
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
            subnet_id,
            security_group_ids,
            instance_storage_gib,
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
            put(&mut m, "SubnetId", subnet_id.as_ref().map(|v| json!(v)));
            put(
                &mut m,
                "InstanceStorageGiB",
                instance_storage_gib.map(|v| json!(v)),
            );
            if !security_group_ids.is_empty() {
                m.insert("SecurityGroupIds".into(), json!(security_group_ids));
            }
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
            snapshot_id,
            client_token,
        } => {
            let mut m = Map::new();
            m.insert("SizeGiB".into(), json!(size));
            put(&mut m, "KmsKeyId", kms_key_id.as_ref().map(|v| json!(v)));
            put(&mut m, "SnapshotId", snapshot_id.as_ref().map(|v| json!(v)));
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
        Ec2Action::DetachVolume { volume_id, force } => {
            let mut b = json!({ "VolumeId": volume_id });
            if *force {
                b["Force"] = json!(true);
            }
            ("DetachVolume", b)
        }
        Ec2Action::DeleteVolume { volume_id } => ("DeleteVolume", json!({ "VolumeId": volume_id })),
        Ec2Action::CreateSnapshot {
            volume_id,
            client_token,
        } => {
            let mut m = Map::new();
            m.insert("VolumeId".into(), json!(volume_id));
            put(
                &mut m,
                "ClientToken",
                client_token.as_ref().map(|v| json!(v)),
            );
            ("CreateSnapshot", Value::Object(m))
        }
        Ec2Action::DescribeSnapshots { snapshot_ids } => {
            ("DescribeSnapshots", ids("SnapshotIds", snapshot_ids))
        }
        Ec2Action::DeleteSnapshot { snapshot_id } => {
            ("DeleteSnapshot", json!({ "SnapshotId": snapshot_id }))
        }
        Ec2Action::GetConsoleOutput { instance_id, .. } => {
            ("GetConsoleOutput", json!({ "InstanceId": instance_id }))
        }
        Ec2Action::CreateVpc {
            cidr_block,
            client_token,
        } => {
            let mut m = Map::new();
            m.insert("CidrBlock".into(), json!(cidr_block));
            put(
                &mut m,
                "ClientToken",
                client_token.as_ref().map(|v| json!(v)),
            );
            ("CreateVpc", Value::Object(m))
        }
        Ec2Action::DescribeVpcs { vpc_ids } => ("DescribeVpcs", ids("VpcIds", vpc_ids)),
        Ec2Action::DeleteVpc { vpc_id } => ("DeleteVpc", json!({ "VpcId": vpc_id })),
        Ec2Action::CreateSubnet {
            vpc_id,
            cidr_block,
            client_token,
        } => {
            let mut m = Map::new();
            m.insert("VpcId".into(), json!(vpc_id));
            m.insert("CidrBlock".into(), json!(cidr_block));
            put(
                &mut m,
                "ClientToken",
                client_token.as_ref().map(|v| json!(v)),
            );
            ("CreateSubnet", Value::Object(m))
        }
        Ec2Action::DescribeSubnets { subnet_ids } => {
            ("DescribeSubnets", ids("SubnetIds", subnet_ids))
        }
        Ec2Action::DeleteSubnet { subnet_id } => ("DeleteSubnet", json!({ "SubnetId": subnet_id })),
        Ec2Action::CreateSecurityGroup {
            group_name,
            vpc_id,
            description,
            client_token,
        } => {
            let mut m = Map::new();
            m.insert("GroupName".into(), json!(group_name));
            m.insert("VpcId".into(), json!(vpc_id));
            put(
                &mut m,
                "Description",
                description.as_ref().map(|v| json!(v)),
            );
            put(
                &mut m,
                "ClientToken",
                client_token.as_ref().map(|v| json!(v)),
            );
            ("CreateSecurityGroup", Value::Object(m))
        }
        Ec2Action::AuthorizeSecurityGroupIngress(a) => {
            ("AuthorizeSecurityGroupIngress", ip_permissions(a)?)
        }
        Ec2Action::RevokeSecurityGroupIngress(a) => {
            ("RevokeSecurityGroupIngress", ip_permissions(a)?)
        }
        Ec2Action::DescribeSecurityGroups { group_ids } => {
            ("DescribeSecurityGroups", ids("GroupIds", group_ids))
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
            subnet_id: None,
            security_group_ids: vec![],
            instance_storage_gib: None,
            client_token: None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a, "RunInstances");
        assert_eq!(
            b,
            json!({"ImageId": "test-guest", "VcpuCount": 2, "Tenancy": "dedicated", "UserData": "echo hi"})
        );
        let (_, b) = request(&Ec2Action::RunInstances {
            image_id: "test-guest".into(),
            vcpu_count: None,
            memory_mib: None,
            tenancy: None,
            user_data: None,
            user_data_file: None,
            subnet_id: None,
            security_group_ids: vec![],
            instance_storage_gib: Some(4),
            client_token: None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b, json!({"ImageId": "test-guest", "InstanceStorageGiB": 4}));
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

    fn parsed(args: &[&str]) -> (&'static str, Value) {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Top {
            #[command(subcommand)]
            a: Ec2Action,
        }
        let t = Top::try_parse_from(std::iter::once("ec2").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{e}"));
        request(&t.a).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn vpc_commands_are_spelled_like_aws_ec2() {
        assert_eq!(
            parsed(&["create-vpc", "--cidr-block", "10.0.0.0/16"]),
            ("CreateVpc", json!({"CidrBlock": "10.0.0.0/16"}))
        );
        assert_eq!(
            parsed(&[
                "create-subnet",
                "--vpc-id",
                "vpc-1",
                "--cidr-block",
                "10.0.1.0/24"
            ]),
            (
                "CreateSubnet",
                json!({"VpcId": "vpc-1", "CidrBlock": "10.0.1.0/24"})
            )
        );
        assert_eq!(
            parsed(&[
                "create-security-group",
                "--group-name",
                "web",
                "--vpc-id",
                "vpc-1"
            ]),
            (
                "CreateSecurityGroup",
                json!({"GroupName": "web", "VpcId": "vpc-1"})
            )
        );
        assert_eq!(
            parsed(&[
                "authorize-security-group-ingress",
                "--group-id",
                "sg-1",
                "--protocol",
                "tcp",
                "--port",
                "7000",
                "--cidr",
                "10.0.0.0/16"
            ]),
            (
                "AuthorizeSecurityGroupIngress",
                json!({"GroupId": "sg-1", "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 7000, "ToPort": 7000, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}]})
            )
        );
        let (a, b) = parsed(&[
            "revoke-security-group-ingress",
            "--group-id",
            "sg-1",
            "--protocol",
            "udp",
            "--port",
            "53-54",
            "--cidr",
            "0.0.0.0/0",
        ]);
        assert_eq!(a, "RevokeSecurityGroupIngress");
        assert_eq!(b["IpPermissions"][0]["FromPort"], 53);
        assert_eq!(b["IpPermissions"][0]["ToPort"], 54);
        let (_, b) = parsed(&[
            "authorize-security-group-ingress",
            "--group-id",
            "sg-1",
            "--protocol",
            "icmp",
            "--cidr",
            "0.0.0.0/0",
        ]);
        assert!(b["IpPermissions"][0].get("FromPort").is_none());
        assert_eq!(
            parsed(&[
                "run-instances",
                "--image-id",
                "test-guest",
                "--subnet-id",
                "subnet-1",
                "--security-group-ids",
                "sg-1",
                "sg-2"
            ]),
            (
                "RunInstances",
                json!({"ImageId": "test-guest", "SubnetId": "subnet-1", "SecurityGroupIds": ["sg-1", "sg-2"]})
            )
        );
        assert_eq!(
            parsed(&["describe-vpcs"]),
            ("DescribeVpcs", json!({"VpcIds": []}))
        );
        assert_eq!(
            parsed(&["delete-subnet", "--subnet-id", "subnet-1"]),
            ("DeleteSubnet", json!({"SubnetId": "subnet-1"}))
        );
        assert_eq!(
            parsed(&["describe-security-groups", "--group-ids", "sg-1"]),
            ("DescribeSecurityGroups", json!({"GroupIds": ["sg-1"]}))
        );
    }
}
