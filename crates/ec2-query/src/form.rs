//! The EC2 Query request parser: an `application/x-www-form-urlencoded` body
//! (`Action=…&Version=2016-11-15&…`) into a typed [`Ec2Request`].
//!
//! Strict: every parameter is consumed by the action that takes it, and anything left over is
//! [`QueryError::UnknownParameter`]; a key given twice, a `.N` list that does not run 1, 2, 3...
//! or runs past [`MAX_LIST_INDEX`], a number that is not plain decimal in range, a boolean that
//! is not `true`/`false` are each a typed error with the EC2 code an SDK understands
//! ([`QueryError::code`]). Every size is bounded before it is stored.

use std::collections::BTreeMap;

use base64::Engine as _;

use crate::code::Ec2ErrorCode;
use crate::sigv4::percent_decode;

/// The one API version accepted (the one every current AWS SDK sends for EC2).
pub const API_VERSION: &str = "2016-11-15";
/// Largest form body accepted, in bytes.
pub const MAX_FORM_BODY: usize = 128 * 1024;
/// Most `key=value` pairs in one body.
pub const MAX_PARAMS: usize = 2048;
/// Highest `.N` accepted in a list parameter.
pub const MAX_LIST_INDEX: usize = 1000;
/// Highest `.M` accepted in `Filter.N.Value.M`.
pub const MAX_FILTER_VALUES: usize = 200;
/// Longest ordinary parameter value, in bytes (ids, names, tokens, filter values).
pub const MAX_VALUE_LEN: usize = 1024;
/// Longest `UserData` after base64 decoding (EC2's limit).
pub const MAX_USER_DATA: usize = 16 * 1024;
/// Largest volume, in GiB (EC2's gp2/gp3 limit).
pub const MAX_VOLUME_GIB: u32 = 16 * 1024;

/// Why a Query body was refused. Parameter names are the wire names (`ImageId`, `Filter`...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("the request body is {len} bytes, more than {MAX_FORM_BODY}")]
    BodyTooLarge { len: usize },
    #[error("the request has more than {MAX_PARAMS} parameters")]
    TooManyParameters,
    #[error("the query string is not valid application/x-www-form-urlencoded UTF-8")]
    MalformedEncoding,
    #[error("the parameter {0} is given more than once")]
    DuplicateParameter(DuplicateKey),
    #[error("The request must contain the parameter Action")]
    MissingAction,
    #[error("The action is not valid for this web service")]
    UnknownAction,
    #[error("The request must contain the parameter Version")]
    MissingVersion,
    #[error("Version must be 2016-11-15")]
    WrongVersion,
    #[error("The request must contain the parameter {0}")]
    MissingParameter(&'static str),
    #[error("Value for parameter {0} is invalid")]
    InvalidValue(&'static str),
    #[error("Value for parameter {0} is too long")]
    ValueTooLong(&'static str),
    #[error("The request contains a parameter this action does not take")]
    UnknownParameter,
    #[error("The list parameter {0} has a malformed index")]
    BadIndex(&'static str),
    #[error("The list parameter {0} does not run 1, 2, 3, ... without gaps")]
    IndexGap(&'static str),
    #[error("The list parameter {0} has an index above {MAX_LIST_INDEX}")]
    IndexTooLarge(&'static str),
    #[error("The parameter {0} cannot be used with the parameter {1}")]
    Combination(&'static str, &'static str),
    #[error("Invalid id (malformed instance id)")]
    MalformedInstanceId,
    #[error("Invalid id (malformed volume id)")]
    MalformedVolumeId,
    #[error("Invalid id (malformed VPC id)")]
    MalformedVpcId,
    #[error("Invalid id (malformed subnet id)")]
    MalformedSubnetId,
    #[error("Invalid id (malformed security group id)")]
    MalformedGroupId,
    #[error("Invalid id (malformed snapshot id)")]
    MalformedSnapshotId,
    #[error("UserData is not valid base64")]
    UserDataNotBase64,
    #[error("UserData is longer than {MAX_USER_DATA} bytes")]
    UserDataTooLarge,
}

/// Which key was duplicated: fixed names only, so the error carries no caller text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DuplicateKey;

impl std::fmt::Display for DuplicateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(a key)")
    }
}

impl QueryError {
    /// The EC2 error code for this refusal.
    pub fn code(&self) -> Ec2ErrorCode {
        use QueryError as E;
        match self {
            E::BodyTooLarge { .. } | E::TooManyParameters => Ec2ErrorCode::InvalidRequest,
            E::MalformedEncoding => Ec2ErrorCode::MalformedQueryString,
            E::DuplicateParameter(_) | E::BadIndex(_) | E::IndexGap(_) | E::IndexTooLarge(_) => {
                Ec2ErrorCode::InvalidParameter
            }
            E::MissingAction => Ec2ErrorCode::MissingAction,
            E::UnknownAction => Ec2ErrorCode::InvalidAction,
            E::MissingVersion | E::MissingParameter(_) => Ec2ErrorCode::MissingParameter,
            E::WrongVersion
            | E::InvalidValue(_)
            | E::ValueTooLong(_)
            | E::UserDataNotBase64
            | E::UserDataTooLarge => Ec2ErrorCode::InvalidParameterValue,
            E::UnknownParameter => Ec2ErrorCode::UnknownParameter,
            E::Combination(..) => Ec2ErrorCode::InvalidParameterCombination,
            E::MalformedInstanceId => Ec2ErrorCode::InvalidInstanceIdMalformed,
            E::MalformedVolumeId => Ec2ErrorCode::InvalidVolumeIdMalformed,
            E::MalformedVpcId => Ec2ErrorCode::InvalidVpcIdMalformed,
            E::MalformedSubnetId => Ec2ErrorCode::InvalidSubnetIdMalformed,
            E::MalformedGroupId => Ec2ErrorCode::InvalidGroupIdMalformed,
            E::MalformedSnapshotId => Ec2ErrorCode::InvalidSnapshotIdMalformed,
        }
    }
}

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident, $prefix:literal, $err:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The prefix every such id starts with.
            pub const PREFIX: &'static str = $prefix;

            /// `PREFIX` then 1 to 32 of `0-9a-z`.
            pub fn parse(raw: &str) -> Result<Self, QueryError> {
                let rest = raw.strip_prefix($prefix).ok_or(QueryError::$err)?;
                if rest.is_empty()
                    || rest.len() > 32
                    || !rest.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
                {
                    return Err(QueryError::$err);
                }
                Ok(Self(raw.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// `i-…`
    InstanceId,
    "i-",
    MalformedInstanceId
);
id_type!(
    /// `vol-…`
    VolumeId,
    "vol-",
    MalformedVolumeId
);
id_type!(
    /// `vpc-…`
    VpcId,
    "vpc-",
    MalformedVpcId
);
id_type!(
    /// `subnet-…`
    SubnetId,
    "subnet-",
    MalformedSubnetId
);
id_type!(
    /// `sg-…`
    GroupId,
    "sg-",
    MalformedGroupId
);
id_type!(
    /// `snap-…`
    SnapshotId,
    "snap-",
    MalformedSnapshotId
);

/// One `Filter.N`: a name and its values (at least one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub name: String,
    pub values: Vec<String>,
}

/// `MaxResults` and `NextToken`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub max_results: Option<u32>,
    pub next_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInstances {
    pub image_id: String,
    pub min_count: u32,
    pub max_count: u32,
    pub instance_type: Option<String>,
    /// Decoded from the base64 EC2 carries it in.
    pub user_data: Option<Vec<u8>>,
    pub client_token: Option<String>,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    pub availability_zone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeInstances {
    pub instance_ids: Vec<InstanceId>,
    pub filters: Vec<Filter>,
    pub page: Page,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopInstances {
    pub instance_ids: Vec<InstanceId>,
    pub force: bool,
    pub hibernate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetConsoleOutput {
    pub instance_id: InstanceId,
    pub latest: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolume {
    pub size_gib: u32,
    pub availability_zone: String,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    /// Start as a copy of this snapshot (`Size` is still required: at least the snapshot's).
    pub snapshot_id: Option<SnapshotId>,
    pub volume_type: Option<String>,
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeVolumes {
    pub volume_ids: Vec<VolumeId>,
    pub filters: Vec<Filter>,
    pub page: Page,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachVolume {
    pub volume_id: VolumeId,
    pub instance_id: InstanceId,
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachVolume {
    pub volume_id: VolumeId,
    pub instance_id: Option<InstanceId>,
    pub device: Option<String>,
    pub force: bool,
}

/// One parsed EC2 Query request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ec2Request {
    RunInstances(RunInstances),
    DescribeInstances(DescribeInstances),
    StartInstances { instance_ids: Vec<InstanceId> },
    StopInstances(StopInstances),
    TerminateInstances { instance_ids: Vec<InstanceId> },
    GetConsoleOutput(GetConsoleOutput),
    CreateVolume(CreateVolume),
    DescribeVolumes(DescribeVolumes),
    AttachVolume(AttachVolume),
    DetachVolume(DetachVolume),
    DeleteVolume { volume_id: VolumeId },
    CreateVpc(crate::vpc::CreateVpc),
    DescribeVpcs(crate::vpc::Describe<VpcId>),
    DeleteVpc { vpc_id: VpcId },
    CreateSubnet(crate::vpc::CreateSubnet),
    DescribeSubnets(crate::vpc::Describe<SubnetId>),
    DeleteSubnet { subnet_id: SubnetId },
    CreateSecurityGroup(crate::vpc::CreateSecurityGroup),
    AuthorizeSecurityGroupIngress(crate::vpc::IngressChange),
    RevokeSecurityGroupIngress(crate::vpc::IngressChange),
    DescribeSecurityGroups(crate::vpc::DescribeSecurityGroups),
    CreateSnapshot(crate::snapshot::CreateSnapshot),
    DescribeSnapshots(crate::snapshot::DescribeSnapshots),
    DeleteSnapshot { snapshot_id: SnapshotId },
}

/// A parsed request and the `DryRun` flag every action takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ec2Call {
    pub dry_run: bool,
    pub request: Ec2Request,
}

impl Ec2Request {
    /// The `Action` name, as on the wire and in the response element names.
    pub fn action(&self) -> &'static str {
        match self {
            Self::RunInstances(_) => "RunInstances",
            Self::DescribeInstances(_) => "DescribeInstances",
            Self::StartInstances { .. } => "StartInstances",
            Self::StopInstances(_) => "StopInstances",
            Self::TerminateInstances { .. } => "TerminateInstances",
            Self::GetConsoleOutput(_) => "GetConsoleOutput",
            Self::CreateVolume(_) => "CreateVolume",
            Self::DescribeVolumes(_) => "DescribeVolumes",
            Self::AttachVolume(_) => "AttachVolume",
            Self::DetachVolume(_) => "DetachVolume",
            Self::DeleteVolume { .. } => "DeleteVolume",
            Self::CreateVpc(_) => "CreateVpc",
            Self::DescribeVpcs(_) => "DescribeVpcs",
            Self::DeleteVpc { .. } => "DeleteVpc",
            Self::CreateSubnet(_) => "CreateSubnet",
            Self::DescribeSubnets(_) => "DescribeSubnets",
            Self::DeleteSubnet { .. } => "DeleteSubnet",
            Self::CreateSecurityGroup(_) => "CreateSecurityGroup",
            Self::AuthorizeSecurityGroupIngress(_) => "AuthorizeSecurityGroupIngress",
            Self::RevokeSecurityGroupIngress(_) => "RevokeSecurityGroupIngress",
            Self::DescribeSecurityGroups(_) => "DescribeSecurityGroups",
            Self::CreateSnapshot(_) => "CreateSnapshot",
            Self::DescribeSnapshots(_) => "DescribeSnapshots",
            Self::DeleteSnapshot { .. } => "DeleteSnapshot",
        }
    }

    /// Whether the action only reads (Describe…, GetConsoleOutput): nothing it does changes
    /// state, so a byte-identical repeat within the signature's window (an SDK retry, a polling
    /// loop signing twice in one second: SigV4 has no nonce) is answered again rather than
    /// refused as a replay. Every other action's signature is accepted once.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Self::DescribeInstances(_)
                | Self::GetConsoleOutput(_)
                | Self::DescribeVolumes(_)
                | Self::DescribeVpcs(_)
                | Self::DescribeSubnets(_)
                | Self::DescribeSecurityGroups(_)
                | Self::DescribeSnapshots(_)
        )
    }

    /// Parses a form body.
    pub fn parse(body: &[u8]) -> Result<Ec2Call, QueryError> {
        let mut p = Params::decode(body)?;
        let action = p.take("Action")?.ok_or(QueryError::MissingAction)?;
        let parse_action: fn(&mut Params) -> Result<Ec2Request, QueryError> = match action.as_str()
        {
            "RunInstances" => run_instances,
            "DescribeInstances" => describe_instances,
            "StartInstances" => |p| {
                Ok(Ec2Request::StartInstances {
                    instance_ids: p.instance_ids_required()?,
                })
            },
            "StopInstances" => |p| {
                Ok(Ec2Request::StopInstances(StopInstances {
                    instance_ids: p.instance_ids_required()?,
                    force: p.bool("Force")?,
                    hibernate: p.bool("Hibernate")?,
                }))
            },
            "TerminateInstances" => |p| {
                Ok(Ec2Request::TerminateInstances {
                    instance_ids: p.instance_ids_required()?,
                })
            },
            "GetConsoleOutput" => |p| {
                Ok(Ec2Request::GetConsoleOutput(GetConsoleOutput {
                    instance_id: p.instance_id("InstanceId")?,
                    latest: p.bool("Latest")?,
                }))
            },
            "CreateVolume" => create_volume,
            "DescribeVolumes" => describe_volumes,
            "AttachVolume" => |p| {
                Ok(Ec2Request::AttachVolume(AttachVolume {
                    volume_id: p.volume_id("VolumeId")?,
                    instance_id: p.instance_id("InstanceId")?,
                    device: p.required_text("Device", 64)?,
                }))
            },
            "DetachVolume" => |p| {
                let instance_id = match p.take("InstanceId")? {
                    Some(v) => Some(InstanceId::parse(&v)?),
                    None => None,
                };
                Ok(Ec2Request::DetachVolume(DetachVolume {
                    volume_id: p.volume_id("VolumeId")?,
                    instance_id,
                    device: p.text("Device", 64)?,
                    force: p.bool("Force")?,
                }))
            },
            "DeleteVolume" => |p| {
                Ok(Ec2Request::DeleteVolume {
                    volume_id: p.volume_id("VolumeId")?,
                })
            },
            other => crate::vpc::parser(other)
                .or_else(|| crate::snapshot::parser(other))
                .ok_or(QueryError::UnknownAction)?,
        };
        match p.take("Version")? {
            None => return Err(QueryError::MissingVersion),
            Some(v) if v != API_VERSION => return Err(QueryError::WrongVersion),
            Some(_) => {}
        }
        let dry_run = p.bool("DryRun")?;
        let request = parse_action(&mut p)?;
        if !p.0.is_empty() {
            return Err(QueryError::UnknownParameter);
        }
        Ok(Ec2Call { dry_run, request })
    }
}

fn run_instances(p: &mut Params) -> Result<Ec2Request, QueryError> {
    let image_id = p.required_text("ImageId", 128)?;
    let min_count = p
        .number("MinCount", 1, MAX_LIST_INDEX)?
        .ok_or(QueryError::MissingParameter("MinCount"))?;
    let max_count = p
        .number("MaxCount", 1, MAX_LIST_INDEX)?
        .ok_or(QueryError::MissingParameter("MaxCount"))?;
    if min_count > max_count {
        return Err(QueryError::InvalidValue("MinCount"));
    }
    let user_data = match p.take_len("UserData", MAX_USER_DATA.div_ceil(3) * 4)? {
        None => None,
        Some(b64) => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|_| QueryError::UserDataNotBase64)?;
            if raw.len() > MAX_USER_DATA {
                return Err(QueryError::UserDataTooLarge);
            }
            Some(raw)
        }
    };
    Ok(Ec2Request::RunInstances(RunInstances {
        image_id,
        min_count,
        max_count,
        instance_type: p.text("InstanceType", 64)?,
        user_data,
        client_token: p.text("ClientToken", 64)?,
        subnet_id: p.text("SubnetId", 64)?,
        security_group_ids: p.list("SecurityGroupId", 64)?,
        availability_zone: p.text("Placement.AvailabilityZone", 64)?,
    }))
}

fn describe_instances(p: &mut Params) -> Result<Ec2Request, QueryError> {
    let instance_ids = p.instance_ids()?;
    let page = p.page(5, 1000)?;
    if !instance_ids.is_empty() && page.max_results.is_some() {
        return Err(QueryError::Combination("InstanceId", "MaxResults"));
    }
    Ok(Ec2Request::DescribeInstances(DescribeInstances {
        instance_ids,
        filters: p.filters()?,
        page,
    }))
}

fn describe_volumes(p: &mut Params) -> Result<Ec2Request, QueryError> {
    let volume_ids = p
        .list("VolumeId", 64)?
        .iter()
        .map(|v| VolumeId::parse(v))
        .collect::<Result<Vec<_>, _>>()?;
    let page = p.page(5, 500)?;
    if !volume_ids.is_empty() && page.max_results.is_some() {
        return Err(QueryError::Combination("VolumeId", "MaxResults"));
    }
    Ok(Ec2Request::DescribeVolumes(DescribeVolumes {
        volume_ids,
        filters: p.filters()?,
        page,
    }))
}

fn create_volume(p: &mut Params) -> Result<Ec2Request, QueryError> {
    let size_gib = p
        .number(
            "Size",
            1,
            usize::try_from(MAX_VOLUME_GIB).unwrap_or(usize::MAX),
        )?
        .ok_or(QueryError::MissingParameter("Size"))?;
    let encrypted = p.bool("Encrypted")?;
    let kms_key_id = p.text("KmsKeyId", 256)?;
    if kms_key_id.is_some() && !encrypted {
        return Err(QueryError::Combination("KmsKeyId", "Encrypted=false"));
    }
    Ok(Ec2Request::CreateVolume(CreateVolume {
        size_gib,
        availability_zone: p.required_text("AvailabilityZone", 64)?,
        encrypted,
        kms_key_id,
        snapshot_id: p
            .text("SnapshotId", 64)?
            .map(|s| SnapshotId::parse(&s))
            .transpose()?,
        volume_type: p.text("VolumeType", 16)?,
        client_token: p.text("ClientToken", 64)?,
    }))
}

/// `Filter.N` while it is gathered: its name, and its values with their `.M`.
type RawFilter = (Option<String>, Vec<(usize, String)>);

/// The decoded form: each key once.
pub(crate) struct Params(pub(crate) BTreeMap<String, String>);

/// Parses the decimal digits of a list index: no sign, no leading zero, at most `max`.
pub(crate) fn list_index(raw: &str, name: &'static str, max: usize) -> Result<usize, QueryError> {
    if raw.is_empty()
        || raw.len() > 7
        || raw.starts_with('0')
        || !raw.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(QueryError::BadIndex(name));
    }
    let n: usize = raw.parse().map_err(|_| QueryError::BadIndex(name))?;
    if n > max {
        return Err(QueryError::IndexTooLarge(name));
    }
    Ok(n)
}

/// Checks that `items`' indexes run 1..=len and returns the values in index order.
pub(crate) fn contiguous<T>(
    mut items: Vec<(usize, T)>,
    name: &'static str,
) -> Result<Vec<T>, QueryError> {
    items.sort_by_key(|(n, _)| *n);
    let mut out = Vec::with_capacity(items.len());
    for (want, (n, v)) in (1..).zip(items) {
        if n != want {
            return Err(QueryError::IndexGap(name));
        }
        out.push(v);
    }
    Ok(out)
}

/// A value is printable: no control characters.
pub(crate) fn check_text(v: &str, name: &'static str, max: usize) -> Result<(), QueryError> {
    if v.len() > max {
        return Err(QueryError::ValueTooLong(name));
    }
    if v.chars().any(char::is_control) {
        return Err(QueryError::InvalidValue(name));
    }
    Ok(())
}

impl Params {
    fn decode(body: &[u8]) -> Result<Self, QueryError> {
        if body.len() > MAX_FORM_BODY {
            return Err(QueryError::BodyTooLarge { len: body.len() });
        }
        let text = std::str::from_utf8(body).map_err(|_| QueryError::MalformedEncoding)?;
        let mut map = BTreeMap::new();
        if text.is_empty() {
            return Ok(Self(map));
        }
        for (i, piece) in text.split('&').enumerate() {
            if i == MAX_PARAMS {
                return Err(QueryError::TooManyParameters);
            }
            let (k, v) = piece.split_once('=').ok_or(QueryError::MalformedEncoding)?;
            let k = percent_decode(k).ok_or(QueryError::MalformedEncoding)?;
            let v = percent_decode(v).ok_or(QueryError::MalformedEncoding)?;
            let k = String::from_utf8(k).map_err(|_| QueryError::MalformedEncoding)?;
            let v = String::from_utf8(v).map_err(|_| QueryError::MalformedEncoding)?;
            if k.is_empty() || k.len() > 128 {
                return Err(QueryError::MalformedEncoding);
            }
            if map.insert(k, v).is_some() {
                return Err(QueryError::DuplicateParameter(DuplicateKey));
            }
        }
        Ok(Self(map))
    }

    pub(crate) fn take(&mut self, name: &str) -> Result<Option<String>, QueryError> {
        Ok(self.0.remove(name))
    }

    pub(crate) fn take_len(
        &mut self,
        name: &'static str,
        max: usize,
    ) -> Result<Option<String>, QueryError> {
        match self.0.remove(name) {
            Some(v) if v.len() > max => Err(QueryError::ValueTooLong(name)),
            other => Ok(other),
        }
    }

    pub(crate) fn text(
        &mut self,
        name: &'static str,
        max: usize,
    ) -> Result<Option<String>, QueryError> {
        match self.0.remove(name) {
            None => Ok(None),
            Some(v) => {
                check_text(&v, name, max)?;
                if v.is_empty() {
                    return Err(QueryError::InvalidValue(name));
                }
                Ok(Some(v))
            }
        }
    }

    pub(crate) fn required_text(
        &mut self,
        name: &'static str,
        max: usize,
    ) -> Result<String, QueryError> {
        self.text(name, max)?
            .ok_or(QueryError::MissingParameter(name))
    }

    pub(crate) fn bool(&mut self, name: &'static str) -> Result<bool, QueryError> {
        match self.0.remove(name).as_deref() {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(_) => Err(QueryError::InvalidValue(name)),
        }
    }

    fn number(
        &mut self,
        name: &'static str,
        min: usize,
        max: usize,
    ) -> Result<Option<u32>, QueryError> {
        let Some(v) = self.0.remove(name) else {
            return Ok(None);
        };
        if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(QueryError::InvalidValue(name));
        }
        let n: usize = v.parse().map_err(|_| QueryError::InvalidValue(name))?;
        if n < min || n > max {
            return Err(QueryError::InvalidValue(name));
        }
        u32::try_from(n)
            .map(Some)
            .map_err(|_| QueryError::InvalidValue(name))
    }

    /// `NAME.1`, `NAME.2`, ... as strings.
    pub(crate) fn list(
        &mut self,
        name: &'static str,
        max_len: usize,
    ) -> Result<Vec<String>, QueryError> {
        let prefix = format!("{name}.");
        let keys: Vec<String> = self
            .0
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        let mut items = Vec::with_capacity(keys.len());
        for k in keys {
            let n = list_index(
                k.get(prefix.len()..).unwrap_or_default(),
                name,
                MAX_LIST_INDEX,
            )?;
            let v = self.0.remove(&k).unwrap_or_default();
            check_text(&v, name, max_len)?;
            items.push((n, v));
        }
        contiguous(items, name)
    }

    fn instance_id(&mut self, name: &'static str) -> Result<InstanceId, QueryError> {
        let v = self.take(name)?.ok_or(QueryError::MissingParameter(name))?;
        InstanceId::parse(&v)
    }

    pub(crate) fn volume_id(&mut self, name: &'static str) -> Result<VolumeId, QueryError> {
        let v = self.take(name)?.ok_or(QueryError::MissingParameter(name))?;
        VolumeId::parse(&v)
    }

    fn instance_ids(&mut self) -> Result<Vec<InstanceId>, QueryError> {
        self.list("InstanceId", 64)?
            .iter()
            .map(|v| InstanceId::parse(v))
            .collect()
    }

    fn instance_ids_required(&mut self) -> Result<Vec<InstanceId>, QueryError> {
        let ids = self.instance_ids()?;
        if ids.is_empty() {
            return Err(QueryError::MissingParameter("InstanceId"));
        }
        Ok(ids)
    }

    pub(crate) fn page(&mut self, min: usize, max: usize) -> Result<Page, QueryError> {
        Ok(Page {
            max_results: self.number("MaxResults", min, max)?,
            next_token: self.text("NextToken", MAX_VALUE_LEN)?,
        })
    }

    /// `Filter.N.Name` and `Filter.N.Value.M`.
    pub(crate) fn filters(&mut self) -> Result<Vec<Filter>, QueryError> {
        const NAME: &str = "Filter";
        let keys: Vec<String> = self
            .0
            .range("Filter.".to_owned()..)
            .take_while(|(k, _)| k.starts_with("Filter."))
            .map(|(k, _)| k.clone())
            .collect();
        let mut by_index: BTreeMap<usize, RawFilter> = BTreeMap::new();
        for k in keys {
            let rest = k.get("Filter.".len()..).unwrap_or_default();
            let (n, field) = rest.split_once('.').ok_or(QueryError::BadIndex(NAME))?;
            let n = list_index(n, NAME, MAX_LIST_INDEX)?;
            let v = self.0.remove(&k).unwrap_or_default();
            let entry = by_index.entry(n).or_default();
            if field == "Name" {
                check_text(&v, NAME, 128)?;
                entry.0 = Some(v);
            } else if let Some(m) = field.strip_prefix("Value.") {
                let m = list_index(m, NAME, MAX_FILTER_VALUES)?;
                check_text(&v, NAME, MAX_VALUE_LEN)?;
                entry.1.push((m, v));
            } else {
                return Err(QueryError::UnknownParameter);
            }
        }
        let items = by_index
            .into_iter()
            .map(|(n, (name, values))| {
                let name = name.ok_or(QueryError::MissingParameter("Filter.N.Name"))?;
                let values = contiguous(values, NAME)?;
                if values.is_empty() {
                    return Err(QueryError::MissingParameter("Filter.N.Value.1"));
                }
                Ok((n, Filter { name, values }))
            })
            .collect::<Result<Vec<_>, _>>()?;
        contiguous(items, NAME)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(s: &str) -> Result<Ec2Call, QueryError> {
        Ec2Request::parse(s.as_bytes())
    }

    #[test]
    fn run_instances() {
        let call = parse("Action=RunInstances&Version=2016-11-15&ImageId=ami-1&MinCount=1&MaxCount=2&InstanceType=t3.micro&UserData=aGVsbG8%3D&SecurityGroupId.2=sg-b&SecurityGroupId.1=sg-a&DryRun=true").unwrap();
        assert!(call.dry_run);
        let Ec2Request::RunInstances(r) = call.request else {
            panic!("wrong action")
        };
        assert_eq!(r.user_data.as_deref(), Some(&b"hello"[..]));
        assert_eq!(r.security_group_ids, ["sg-a", "sg-b"]);
        assert_eq!((r.min_count, r.max_count), (1, 2));
    }

    #[test]
    fn describe_with_filters_and_plus_as_space() {
        let call = parse("Action=DescribeInstances&Version=2016-11-15&Filter.1.Name=tag%3AName&Filter.1.Value.1=my+box&Filter.1.Value.2=b&Filter.2.Name=instance-state-name&Filter.2.Value.1=running&MaxResults=5&NextToken=abc").unwrap();
        let Ec2Request::DescribeInstances(d) = call.request else {
            panic!("wrong action")
        };
        assert_eq!(
            d.filters[0],
            Filter {
                name: "tag:Name".into(),
                values: vec!["my box".into(), "b".into()]
            }
        );
        assert_eq!(d.filters[1].values, ["running"]);
        assert_eq!(
            d.page,
            Page {
                max_results: Some(5),
                next_token: Some("abc".into())
            }
        );
    }

    #[test]
    fn refusals_carry_ec2_codes() {
        let code = |s: &str| parse(s).unwrap_err().code().as_str();
        assert_eq!(code(""), "MissingAction");
        assert_eq!(
            code("Action=DescribeImages&Version=2016-11-15"),
            "InvalidAction"
        );
        assert_eq!(code("Action=DescribeInstances"), "MissingParameter");
        assert_eq!(
            code("Action=DescribeInstances&Version=2014-01-01"),
            "InvalidParameterValue"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&Version=2016-11-15"),
            "InvalidParameter"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&Foo=1"),
            "UnknownParameter"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&InstanceId.2=i-1"),
            "InvalidParameter"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&InstanceId.01=i-1"),
            "InvalidParameter"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&InstanceId.99999999=i-1"),
            "InvalidParameter"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&InstanceId.1001=i-1"),
            "InvalidParameter"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&InstanceId.1=vol-1"),
            "InvalidInstanceID.Malformed"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&InstanceId.1=i-1&MaxResults=5"),
            "InvalidParameterCombination"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&MaxResults=4"),
            "InvalidParameterValue"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&MaxResults=%2B5"),
            "InvalidParameterValue"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&Filter.1.Value.1=x"),
            "MissingParameter"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&Filter.1.Name=x"),
            "MissingParameter"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&Filter.1.Name=x&Filter.1.Value.2=y"),
            "InvalidParameter"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&Filter.1.Name=x&Filter.1.Other=y"),
            "UnknownParameter"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&DryRun=yes"),
            "InvalidParameterValue"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&%zz=1"),
            "MalformedQueryString"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&"),
            "MalformedQueryString"
        );
        assert_eq!(
            code("Action=DescribeInstances&Version=2016-11-15&NextToken=%FF"),
            "MalformedQueryString"
        );
        assert_eq!(
            code("Action=RunInstances&Version=2016-11-15&ImageId=a&MinCount=2&MaxCount=1"),
            "InvalidParameterValue"
        );
        assert_eq!(
            code(
                "Action=RunInstances&Version=2016-11-15&ImageId=a&MinCount=1&MaxCount=99999999999"
            ),
            "InvalidParameterValue"
        );
        assert_eq!(code("Action=RunInstances&Version=2016-11-15&ImageId=a&MinCount=1&MaxCount=1&UserData=***"), "InvalidParameterValue");
        assert_eq!(
            code("Action=RunInstances&Version=2016-11-15&MinCount=1&MaxCount=1"),
            "MissingParameter"
        );
        assert_eq!(
            code("Action=CreateVolume&Version=2016-11-15&Size=0&AvailabilityZone=z"),
            "InvalidParameterValue"
        );
        assert_eq!(
            code("Action=CreateVolume&Version=2016-11-15&Size=1&AvailabilityZone=z&KmsKeyId=k"),
            "InvalidParameterCombination"
        );
        assert_eq!(
            code("Action=DeleteVolume&Version=2016-11-15&VolumeId=vol-X"),
            "InvalidVolumeID.Malformed"
        );
        assert_eq!(
            code("Action=StopInstances&Version=2016-11-15"),
            "MissingParameter"
        );
        let big = format!(
            "Action=DescribeInstances&Version=2016-11-15&NextToken={}",
            "a".repeat(MAX_FORM_BODY)
        );
        assert_eq!(code(&big), "InvalidRequest");
        let many: String = (0..=MAX_PARAMS).map(|i| format!("k{i}=v&")).collect();
        assert_eq!(code(&many), "InvalidRequest");
    }

    #[test]
    fn volumes() {
        let c = parse("Action=CreateVolume&Version=2016-11-15&Size=8&AvailabilityZone=bh-1a&Encrypted=true&KmsKeyId=key-1").unwrap();
        assert_eq!(
            c.request,
            Ec2Request::CreateVolume(CreateVolume {
                size_gib: 8,
                availability_zone: "bh-1a".into(),
                encrypted: true,
                kms_key_id: Some("key-1".into()),
                snapshot_id: None,
                volume_type: None,
                client_token: None,
            })
        );
        let c = parse("Action=AttachVolume&Version=2016-11-15&VolumeId=vol-1&InstanceId=i-2&Device=%2Fdev%2Fvdb").unwrap();
        let Ec2Request::AttachVolume(a) = c.request else {
            panic!("wrong action")
        };
        assert_eq!(
            (
                a.volume_id.as_str(),
                a.instance_id.as_str(),
                a.device.as_str()
            ),
            ("vol-1", "i-2", "/dev/vdb")
        );
    }
}
