//! The customer API, version 1: `POST /v1/<Action>` with a strict JSON body (unknown fields
//! refused), signed by the customer (see `bulkhead_kms::sigv`). [`ACTIONS`] *is* the route
//! table; [`ControlRequest::parse`] is the one parser between bytes and the service.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ControlError;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Most ids in one call.
pub const MAX_IDS: usize = 100;

/// Every action, whether it mutates state (and so takes an idempotency `ClientToken`).
pub const ACTIONS: &[(&str, bool)] = &[
    ("RunInstances", true),
    ("DescribeInstances", false),
    ("StopInstances", true),
    ("StartInstances", true),
    ("TerminateInstances", true),
    ("CreateVolume", true),
    ("DescribeVolumes", false),
    ("AttachVolume", true),
    ("DetachVolume", true),
    ("DeleteVolume", true),
    ("GetConsoleOutput", false),
    ("CreateKey", true),
    ("RevokeGrant", true),
];

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
}

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
    /// `None`: the tenant's default KMS key.
    #[serde(rename = "KmsKeyId", default)]
    pub kms_key_id: Option<String>,
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

/// A checked customer request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlRequest {
    RunInstances(RunInstances),
    DescribeInstances(InstanceIds),
    StopInstances(InstanceIds),
    StartInstances(InstanceIds),
    TerminateInstances(InstanceIds),
    CreateVolume(CreateVolume),
    DescribeVolumes(VolumeIds),
    AttachVolume(AttachVolume),
    DetachVolume(VolumeRef),
    DeleteVolume(VolumeRef),
    GetConsoleOutput(InstanceRef),
    CreateKey(CreateKey),
    RevokeGrant(RevokeGrant),
}

fn json<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, ControlError> {
    let body = if body.trim().is_empty() { "{}" } else { body };
    serde_json::from_str(body).map_err(|e| {
        if e.to_string().contains("unknown field") {
            ControlError::UnknownField
        } else {
            ControlError::BadBody
        }
    })
}

fn check_id(s: &str) -> Result<(), ControlError> {
    if bulkhead_tokens::ops::valid_resource_id(s) {
        Ok(())
    } else {
        Err(ControlError::BadId)
    }
}

fn check_ids(v: &[String]) -> Result<(), ControlError> {
    if v.len() > MAX_IDS {
        return Err(ControlError::BadId);
    }
    v.iter().try_for_each(|s| check_id(s))
}

fn check_token(t: &Option<String>) -> Result<(), ControlError> {
    match t {
        Some(t) if t.is_empty() || t.len() > 64 || !t.bytes().all(|b| b.is_ascii_graphic()) => {
            Err(ControlError::BadId)
        }
        _ => Ok(()),
    }
}

impl ControlRequest {
    /// Parses `POST /v1/<Action>` with `body`. `path` must be exactly one action.
    pub fn parse(method: &str, path: &str, body: &str) -> Result<ControlRequest, ControlError> {
        let action = path
            .strip_prefix("/v1/")
            .ok_or(ControlError::NoSuchAction)?;
        if !ACTIONS.iter().any(|(a, _)| *a == action) {
            return Err(ControlError::NoSuchAction);
        }
        if method != "POST" {
            return Err(ControlError::MethodNotAllowed);
        }
        if body.len() > MAX_BODY_BYTES {
            return Err(ControlError::BodyTooLarge);
        }
        let r = match action {
            "RunInstances" => {
                let r: RunInstances = json(body)?;
                check_id(&r.image_id)?;
                check_token(&r.client_token)?;
                if r.vcpus == 0 || r.vcpus > 64 || r.memory_mib < 16 || r.memory_mib > 1 << 20 {
                    return Err(ControlError::BadShape);
                }
                if r.user_data
                    .as_ref()
                    .is_some_and(|u| u.is_empty() || u.len() > MAX_USER_DATA_BYTES)
                {
                    return Err(ControlError::BadShape);
                }
                match r.tenancy.as_deref() {
                    None | Some("default") | Some("dedicated") => {}
                    Some(_) => return Err(ControlError::BadShape),
                }
                ControlRequest::RunInstances(r)
            }
            "DescribeInstances" | "StopInstances" | "StartInstances" | "TerminateInstances" => {
                let r: InstanceIds = json(body)?;
                check_ids(&r.instance_ids)?;
                check_token(&r.client_token)?;
                match action {
                    "DescribeInstances" => ControlRequest::DescribeInstances(r),
                    "StopInstances" => ControlRequest::StopInstances(r),
                    "StartInstances" => ControlRequest::StartInstances(r),
                    _ => ControlRequest::TerminateInstances(r),
                }
            }
            "CreateVolume" => {
                let r: CreateVolume = json(body)?;
                if let Some(k) = &r.kms_key_id {
                    check_id(k)?;
                }
                check_token(&r.client_token)?;
                if r.encrypted == Some(false) {
                    return Err(ControlError::EncryptionRequired);
                }
                if r.size_gib == 0 || r.size_gib > 16_384 {
                    return Err(ControlError::BadShape);
                }
                ControlRequest::CreateVolume(r)
            }
            "DescribeVolumes" => {
                let r: VolumeIds = json(body)?;
                check_ids(&r.volume_ids)?;
                ControlRequest::DescribeVolumes(r)
            }
            "AttachVolume" => {
                let r: AttachVolume = json(body)?;
                check_id(&r.volume_id)?;
                check_id(&r.instance_id)?;
                check_token(&r.client_token)?;
                ControlRequest::AttachVolume(r)
            }
            "DetachVolume" | "DeleteVolume" => {
                let r: VolumeRef = json(body)?;
                check_id(&r.volume_id)?;
                check_token(&r.client_token)?;
                if action == "DetachVolume" {
                    ControlRequest::DetachVolume(r)
                } else {
                    ControlRequest::DeleteVolume(r)
                }
            }
            "GetConsoleOutput" => {
                let r: InstanceRef = json(body)?;
                check_id(&r.instance_id)?;
                ControlRequest::GetConsoleOutput(r)
            }
            "CreateKey" => {
                let r: CreateKey = json(body)?;
                check_token(&r.client_token)?;
                if r.description.as_ref().is_some_and(|d| d.len() > 256) {
                    return Err(ControlError::BadShape);
                }
                ControlRequest::CreateKey(r)
            }
            "RevokeGrant" => {
                let r: RevokeGrant = json(body)?;
                check_id(&r.key_id)?;
                check_id(&r.volume_id)?;
                check_token(&r.client_token)?;
                ControlRequest::RevokeGrant(r)
            }
            _ => return Err(ControlError::NoSuchAction),
        };
        Ok(r)
    }

    pub fn action(&self) -> &'static str {
        match self {
            ControlRequest::RunInstances(_) => "RunInstances",
            ControlRequest::DescribeInstances(_) => "DescribeInstances",
            ControlRequest::StopInstances(_) => "StopInstances",
            ControlRequest::StartInstances(_) => "StartInstances",
            ControlRequest::TerminateInstances(_) => "TerminateInstances",
            ControlRequest::CreateVolume(_) => "CreateVolume",
            ControlRequest::DescribeVolumes(_) => "DescribeVolumes",
            ControlRequest::AttachVolume(_) => "AttachVolume",
            ControlRequest::DetachVolume(_) => "DetachVolume",
            ControlRequest::DeleteVolume(_) => "DeleteVolume",
            ControlRequest::GetConsoleOutput(_) => "GetConsoleOutput",
            ControlRequest::CreateKey(_) => "CreateKey",
            ControlRequest::RevokeGrant(_) => "RevokeGrant",
        }
    }

    /// The idempotency token of a mutating call.
    pub fn client_token(&self) -> Option<&str> {
        match self {
            ControlRequest::RunInstances(r) => r.client_token.as_deref(),
            ControlRequest::StopInstances(r)
            | ControlRequest::StartInstances(r)
            | ControlRequest::TerminateInstances(r) => r.client_token.as_deref(),
            ControlRequest::CreateVolume(r) => r.client_token.as_deref(),
            ControlRequest::AttachVolume(r) => r.client_token.as_deref(),
            ControlRequest::DetachVolume(r) | ControlRequest::DeleteVolume(r) => {
                r.client_token.as_deref()
            }
            ControlRequest::CreateKey(r) => r.client_token.as_deref(),
            ControlRequest::RevokeGrant(r) => r.client_token.as_deref(),
            ControlRequest::DescribeInstances(_)
            | ControlRequest::DescribeVolumes(_)
            | ControlRequest::GetConsoleOutput(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_refuses_bad_input() {
        assert!(matches!(
            ControlRequest::parse("POST", "/v1/Exec", "{}"),
            Err(ControlError::NoSuchAction)
        ));
        assert!(matches!(
            ControlRequest::parse("GET", "/v1/RunInstances", "{}"),
            Err(ControlError::MethodNotAllowed)
        ));
        assert!(matches!(
            ControlRequest::parse("POST", "/v1/RunInstances", r#"{"ImageId":"img","Evil":1}"#),
            Err(ControlError::UnknownField)
        ));
        assert!(matches!(
            ControlRequest::parse(
                "POST",
                "/v1/AttachVolume",
                r#"{"VolumeId":"../x","InstanceId":"i"}"#
            ),
            Err(ControlError::BadId)
        ));
        assert!(matches!(
            ControlRequest::parse(
                "POST",
                "/v1/CreateVolume",
                r#"{"SizeGiB":1,"Encrypted":false}"#
            ),
            Err(ControlError::EncryptionRequired)
        ));
        assert!(matches!(
            ControlRequest::parse("POST", "/v1/RunInstances", "[1"),
            Err(ControlError::BadBody)
        ));
        let ok = ControlRequest::parse(
            "POST",
            "/v1/RunInstances",
            r#"{"ImageId":"img-1","ClientToken":"t1"}"#,
        );
        assert!(matches!(ok, Ok(ControlRequest::RunInstances(_))));
    }
}
