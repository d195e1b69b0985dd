//! The EC2 error codes this boundary answers with: the strings a real SDK matches on
//! (`botocore.exceptions.ClientError.response["Error"]["Code"]`), and the HTTP status EC2 sends
//! with each.

/// An EC2 error code. Every typed error of this crate maps to exactly one (see `code()` on
/// [`crate::SigV4Error`] and [`crate::QueryError`]); the control plane adds its own
/// (`InvalidInstanceID.NotFound`, `UnauthorizedOperation`, ...) from the same list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ec2ErrorCode {
    /// The access key is unknown, or the credentials cannot be used here.
    AuthFailure,
    /// No `Authorization` header (and no other way of authenticating).
    MissingAuthenticationToken,
    /// The `Authorization` header or a date it depends on is malformed or incomplete.
    IncompleteSignature,
    /// The signature (or the scope it was computed for) does not match.
    SignatureDoesNotMatch,
    /// `X-Amz-Date` is outside the accepted window.
    RequestExpired,
    /// The caller is authenticated but not allowed to do this.
    UnauthorizedOperation,
    /// The form body is not a valid `application/x-www-form-urlencoded` query.
    MalformedQueryString,
    /// No `Action` parameter.
    MissingAction,
    /// An `Action` this endpoint does not implement.
    InvalidAction,
    /// A required parameter is absent.
    MissingParameter,
    /// A parameter has a value that is not valid for it.
    InvalidParameterValue,
    /// A parameter is not valid here (duplicated, badly indexed, ...).
    InvalidParameter,
    /// Parameters that cannot be used together.
    InvalidParameterCombination,
    /// A parameter the action does not take.
    UnknownParameter,
    /// An instance id that is not an instance id.
    InvalidInstanceIdMalformed,
    /// A volume id that is not a volume id.
    InvalidVolumeIdMalformed,
    /// The request as a whole is not acceptable (for example too large).
    InvalidRequest,
    /// The named instance does not exist (for the caller).
    InvalidInstanceIdNotFound,
    /// The named volume does not exist (for the caller).
    InvalidVolumeNotFound,
    /// A `ClientToken` was reused with different parameters.
    IdempotentParameterMismatch,
    /// `DryRun=true` and the request would have succeeded.
    DryRunOperation,
    /// Something failed on our side.
    InternalError,
    /// A VPC id that is not a VPC id.
    InvalidVpcIdMalformed,
    /// A subnet id that is not a subnet id.
    InvalidSubnetIdMalformed,
    /// A security group id that is not a security group id.
    InvalidGroupIdMalformed,
    /// The named VPC does not exist (for the caller).
    InvalidVpcIdNotFound,
    /// The named subnet does not exist (for the caller).
    InvalidSubnetIdNotFound,
    /// The named security group does not exist (for the caller).
    InvalidGroupNotFound,
    /// A security group of that name exists in the VPC.
    InvalidGroupDuplicate,
    /// The rule is already in the group.
    InvalidPermissionDuplicate,
    /// The rule is not in the group.
    InvalidPermissionNotFound,
    /// The subnet's block overlaps another subnet of the VPC.
    InvalidSubnetConflict,
    /// The subnet's block is not inside the VPC's.
    InvalidSubnetRange,
    /// A VPC block EC2 does not accept (prefix outside /16../28).
    InvalidVpcRange,
    /// The resource still has dependents (subnets, instances).
    DependencyViolation,
    /// The instance is not in a state that allows this.
    IncorrectInstanceState,
    /// The resource is not in a state that allows this.
    IncorrectState,
    /// The volume is attached.
    VolumeInUse,
    /// No host has room for the instance.
    InsufficientInstanceCapacity,
    /// The image does not exist.
    InvalidAmiIdNotFound,
    /// The KMS key does not exist (for the caller).
    InvalidKmsKeyNotFound,
    /// A per-resource limit was reached.
    RulesPerSecurityGroupLimitExceeded,
    /// The subnet has no free address.
    InsufficientFreeAddressesInSubnet,
    /// A dependency of the service is unavailable; retry later.
    Unavailable,
    /// A snapshot id that is not a snapshot id.
    InvalidSnapshotIdMalformed,
    /// The named snapshot does not exist (for the caller).
    InvalidSnapshotNotFound,
}

impl Ec2ErrorCode {
    /// The code exactly as EC2 spells it on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthFailure => "AuthFailure",
            Self::MissingAuthenticationToken => "MissingAuthenticationToken",
            Self::IncompleteSignature => "IncompleteSignature",
            Self::SignatureDoesNotMatch => "SignatureDoesNotMatch",
            Self::RequestExpired => "RequestExpired",
            Self::UnauthorizedOperation => "UnauthorizedOperation",
            Self::MalformedQueryString => "MalformedQueryString",
            Self::MissingAction => "MissingAction",
            Self::InvalidAction => "InvalidAction",
            Self::MissingParameter => "MissingParameter",
            Self::InvalidParameterValue => "InvalidParameterValue",
            Self::InvalidParameter => "InvalidParameter",
            Self::InvalidParameterCombination => "InvalidParameterCombination",
            Self::UnknownParameter => "UnknownParameter",
            Self::InvalidInstanceIdMalformed => "InvalidInstanceID.Malformed",
            Self::InvalidVolumeIdMalformed => "InvalidVolumeID.Malformed",
            Self::InvalidRequest => "InvalidRequest",
            Self::InvalidInstanceIdNotFound => "InvalidInstanceID.NotFound",
            Self::InvalidVolumeNotFound => "InvalidVolume.NotFound",
            Self::IdempotentParameterMismatch => "IdempotentParameterMismatch",
            Self::DryRunOperation => "DryRunOperation",
            Self::InternalError => "InternalError",
            Self::InvalidVpcIdMalformed => "InvalidVpcID.Malformed",
            Self::InvalidSubnetIdMalformed => "InvalidSubnetID.Malformed",
            Self::InvalidGroupIdMalformed => "InvalidGroupId.Malformed",
            Self::InvalidVpcIdNotFound => "InvalidVpcID.NotFound",
            Self::InvalidSubnetIdNotFound => "InvalidSubnetID.NotFound",
            Self::InvalidGroupNotFound => "InvalidGroup.NotFound",
            Self::InvalidGroupDuplicate => "InvalidGroup.Duplicate",
            Self::InvalidPermissionDuplicate => "InvalidPermission.Duplicate",
            Self::InvalidPermissionNotFound => "InvalidPermission.NotFound",
            Self::InvalidSubnetConflict => "InvalidSubnet.Conflict",
            Self::InvalidSubnetRange => "InvalidSubnet.Range",
            Self::InvalidVpcRange => "InvalidVpc.Range",
            Self::DependencyViolation => "DependencyViolation",
            Self::IncorrectInstanceState => "IncorrectInstanceState",
            Self::IncorrectState => "IncorrectState",
            Self::VolumeInUse => "VolumeInUse",
            Self::InsufficientInstanceCapacity => "InsufficientInstanceCapacity",
            Self::InvalidAmiIdNotFound => "InvalidAMIID.NotFound",
            Self::InvalidKmsKeyNotFound => "InvalidKMSKey.NotFound",
            Self::RulesPerSecurityGroupLimitExceeded => "RulesPerSecurityGroupLimitExceeded",
            Self::InsufficientFreeAddressesInSubnet => "InsufficientFreeAddressesInSubnet",
            Self::Unavailable => "Unavailable",
            Self::InvalidSnapshotIdMalformed => "InvalidSnapshotID.Malformed",
            Self::InvalidSnapshotNotFound => "InvalidSnapshot.NotFound",
        }
    }

    /// The HTTP status EC2 sends with this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::AuthFailure | Self::MissingAuthenticationToken => 401,
            Self::UnauthorizedOperation => 403,
            Self::DryRunOperation => 412,
            Self::InternalError => 500,
            Self::InsufficientInstanceCapacity => 500,
            Self::Unavailable => 503,
            _ => 400,
        }
    }
}

impl std::fmt::Display for Ec2ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
