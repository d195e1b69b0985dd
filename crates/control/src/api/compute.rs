//! Request bodies of the instance, volume and key actions (`RunInstances` … `RevokeGrant`), as
//! the customer sends them: strict JSON, unknown fields refused.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunInstances {
    #[serde(rename = "ImageId")]
    pub image_id: String,
    #[serde(rename = "VcpuCount", default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(rename = "MemoryMiB", default = "default_memory")]
    pub memory_mib: u32,
    /// `default` or `dedicated` (a host running only this tenant's instances).
    #[serde(rename = "Tenancy", default)]
    pub tenancy: Option<String>,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
    /// A script the guest runs at boot (passed to the host's controller, never stored by the
    /// control plane); at most [`MAX_USER_DATA_BYTES`].
    #[serde(rename = "UserData", default)]
    pub user_data: Option<String>,
    /// The subnet the instance's interface is in; `None`: the tenant's default subnet (made on
    /// first use).
    #[serde(rename = "SubnetId", default)]
    pub subnet_id: Option<String>,
    /// Security groups of the subnet's VPC (of the default VPC without `SubnetId`); empty: the
    /// VPC's `default` group.
    #[serde(rename = "SecurityGroupIds", default)]
    pub security_group_ids: Vec<String>,
    /// Instance storage: a local ephemeral disk of this many GiB
    /// (1..=[`MAX_INSTANCE_STORAGE_GIB`]) on the instance's host, behind a block card whose key
    /// is made inside the card and never leaves it. Crypto-erased at StopInstances and
    /// TerminateInstances (the card zeroizes its key, the file is deleted): a Start after a
    /// Stop gets a fresh, empty disk. The guest's first disk.
    #[serde(rename = "InstanceStorageGiB", default)]
    pub instance_storage_gib: Option<u32>,
}

/// Largest instance-storage disk, in GiB (the host controller's own bound is the same).
pub const MAX_INSTANCE_STORAGE_GIB: u32 = 64;

/// Largest `UserData` (it ends up on the guest kernel's command line).
pub const MAX_USER_DATA_BYTES: usize = 1024;

fn default_vcpus() -> u32 {
    1
}

fn default_memory() -> u32 {
    128
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceIds {
    #[serde(rename = "InstanceIds", default)]
    pub instance_ids: Vec<String>,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    #[serde(rename = "SizeGiB")]
    pub size_gib: u32,
    /// Volumes are always encrypted; `false` is refused.
    #[serde(rename = "Encrypted", default)]
    pub encrypted: Option<bool>,
    /// `None`: the tenant's default KMS key. With `SnapshotId`, the snapshot's key (its key
    /// family) is used and naming another is refused.
    #[serde(rename = "KmsKeyId", default)]
    pub kms_key_id: Option<String>,
    /// Start as a copy of this snapshot of the caller's (`SizeGiB` at least its size).
    #[serde(rename = "SnapshotId", default)]
    pub snapshot_id: Option<String>,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
}

/// `CreateSnapshot`: a point-in-time copy of a detached (`available`) volume, in the volume's
/// key family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotIds {
    #[serde(rename = "SnapshotIds", default)]
    pub snapshot_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRef {
    #[serde(rename = "SnapshotId")]
    pub snapshot_id: String,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeIds {
    #[serde(rename = "VolumeIds", default)]
    pub volume_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachVolume {
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
    #[serde(rename = "InstanceId")]
    pub instance_id: String,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeRef {
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
    /// DetachVolume only: finish the detach even when the host cannot be reached (a network
    /// volume's storage node then fences the host). Refused on DeleteVolume.
    #[serde(rename = "Force", default)]
    pub force: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceRef {
    #[serde(rename = "InstanceId")]
    pub instance_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    #[serde(rename = "Description", default)]
    pub description: Option<String>,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeGrant {
    #[serde(rename = "KeyId")]
    pub key_id: String,
    #[serde(rename = "VolumeId")]
    pub volume_id: String,
    #[serde(rename = "ClientToken", default)]
    pub client_token: Option<String>,
}
