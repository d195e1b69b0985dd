//! `bulkhead-storage-proto`: the wire types of the storage node's control API, shared by the
//! storage node (which parses requests and encodes replies) and the control plane (which
//! encodes requests and parses replies). No I/O.
//!
//! Every request is `POST /v1/<Op>` with a JSON body over mutual TLS 1.3; only the control
//! plane's certificate (role `control-plane`) is served. Bodies are strict: unknown fields,
//! malformed ids and out-of-range sizes are refused with a typed [`ProtoError`] before any
//! logic runs.
//!
//! | Op | Body | Reply (200) |
//! |---|---|---|
//! | `CreateVolume` | [`CreateVolume`] `{"volume_id","size_bytes","source"?}` (idempotent; `source`: a snapshot whose blocks the new volume starts with) | [`VolumeReply`] |
//! | `CreateSnapshot` | [`CreateSnapshot`] `{"snapshot_id","volume_id"}` (idempotent; the volume granted to nobody) | [`VolumeReply`] |
//! | `Grant` | [`Grant`] `{"volume_id","host","generation"}` | [`VolumeReply`] |
//! | `Revoke` | [`Revoke`] `{"volume_id","generation"}` | [`VolumeReply`] |
//! | `DeleteVolume` | [`DeleteVolume`] `{"volume_id"}` (idempotent) | [`DeleteReply`] |
//! | `ListVolumes` | `{}` | [`ListReply`] |
//!
//! A refusal is a non-200 status with [`ErrorBody`] `{"error":{"code","message"}}`; the code
//! is one of [`ErrorCode`].
//!
//! **Grants and fencing.** A volume is granted to at most one host at a time. A `Grant` names
//! the host and a generation; a generation below the volume's current one is refused
//! (`stale_generation`), the same generation for another host is refused
//! (`generation_conflict`), the same generation for the same host is a no-op, and a higher
//! generation moves the grant: every live connection of any other host to that volume is cut
//! before the reply, and that host's next attempt is refused. `Revoke` with a generation at or
//! above the current one leaves the volume granted to nobody (and cuts every connection).
//!
//! **Snapshots.** A snapshot (`snap-…` id) is a point-in-time copy of a volume's ciphertext,
//! taken only while the volume is granted to nobody and has no connection (detached: a
//! consistent point without a flush protocol). It is never exported and never granted
//! (`not_attachable`); `CreateVolume` with `source` makes a new volume from it (same size or
//! larger); `DeleteVolume` deletes it. Neither ever sees a key.

use serde::{Deserialize, Serialize};

/// Default port of the control API.
pub const DEFAULT_CONTROL_PORT: u16 = 8710;
/// Default port of the NBD listener (IANA's `nbd`).
pub const DEFAULT_NBD_PORT: u16 = 10809;
/// The storage node's default certificate name (CN; role `service`). Clients pin it.
pub const DEFAULT_SERVER_NAME: &str = "storage";
/// Largest request body the node reads.
pub const MAX_BODY_BYTES: usize = 4096;
/// Volume sizes are whole sectors.
pub const SECTOR_BYTES: u64 = 512;
/// Largest volume (64 TiB).
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;
/// Longest volume id suffix after `vol-` (the id is also qemu-storage-daemon's node name,
/// which QEMU caps at 31 bytes).
pub const MAX_VOLUME_SUFFIX: usize = 24;
/// Longest host name (as in the cluster's certificates).
pub const MAX_HOST_NAME: usize = 40;

/// Why a request (or a reply, on the client side) was refused by the parser.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("no such route")]
    NoSuchRoute,
    #[error("body is not valid JSON for this operation (line {line}, column {column})")]
    BadBody { line: usize, column: usize },
    #[error("volume id must be `vol-` (or `snap-`) followed by 1-{MAX_VOLUME_SUFFIX} of a-z, 0-9")]
    BadVolumeId,
    #[error("a snapshot id must start with `snap-`, a volume id with `vol-`")]
    WrongIdKind,
    #[error("host name must be 1-{MAX_HOST_NAME} of a-z, 0-9, -")]
    BadHostName,
    #[error("size must be a positive multiple of {SECTOR_BYTES} bytes up to {MAX_VOLUME_BYTES}")]
    BadSize,
    #[error("generation must be at least 1")]
    BadGeneration,
}

impl ProtoError {
    /// The stable error code a refusal carries.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::NoSuchRoute => ErrorCode::NoSuchRoute,
            _ => ErrorCode::BadRequest,
        }
    }
}

impl From<serde_json::Error> for ProtoError {
    fn from(e: serde_json::Error) -> Self {
        // A validation failure inside a field's `TryFrom` surfaces here as a serde "custom"
        // error; keep its meaning.
        let msg = e.to_string();
        for (probe, err) in [
            (BAD_VOLUME_ID, ProtoError::BadVolumeId),
            (BAD_HOST_NAME, ProtoError::BadHostName),
        ] {
            if msg.starts_with(probe) {
                return err;
            }
        }
        ProtoError::BadBody {
            line: e.line(),
            column: e.column(),
        }
    }
}

const BAD_VOLUME_ID: &str = "bad volume id";
const BAD_HOST_NAME: &str = "bad host name";

/// A volume id: `vol-` followed by 1–24 of `a-z0-9`. It names the NBD export, the file or
/// RBD image and qemu-storage-daemon's block node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeId(String);

impl VolumeId {
    pub fn new(s: &str) -> Result<VolumeId, ProtoError> {
        let ok = s
            .strip_prefix("vol-")
            .or_else(|| s.strip_prefix("snap-"))
            .is_some_and(|rest| {
                !rest.is_empty()
                    && rest.len() <= MAX_VOLUME_SUFFIX
                    && rest
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
        if ok {
            Ok(VolumeId(s.to_owned()))
        } else {
            Err(ProtoError::BadVolumeId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A snapshot's id (`snap-…`): never exported, never granted.
    pub fn is_snapshot(&self) -> bool {
        self.0.starts_with("snap-")
    }
}

impl TryFrom<String> for VolumeId {
    type Error = &'static str;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        VolumeId::new(&s).map_err(|_| BAD_VOLUME_ID)
    }
}

impl From<VolumeId> for String {
    fn from(v: VolumeId) -> String {
        v.0
    }
}

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A host name as the cluster's certificates carry it (CN of a `host` certificate): 1–40 of
/// `a-z0-9-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostName(String);

impl HostName {
    pub fn new(s: &str) -> Result<HostName, ProtoError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_HOST_NAME
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(HostName(s.to_owned()))
        } else {
            Err(ProtoError::BadHostName)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for HostName {
    type Error = &'static str;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        HostName::new(&s).map_err(|_| BAD_HOST_NAME)
    }
}

impl From<HostName> for String {
    fn from(v: HostName) -> String {
        v.0
    }
}

impl std::fmt::Display for HostName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Creates a volume of `size_bytes` (idempotent: the same id and size again is answered with
/// the existing volume; another size is `volume_exists`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub volume_id: VolumeId,
    pub size_bytes: u64,
    /// A snapshot the new volume starts as (at least its size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeId>,
}

/// Takes `snapshot_id` as a copy of `volume_id`'s blocks (idempotent: the same snapshot of the
/// same volume again is answered with the existing one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    pub snapshot_id: VolumeId,
    pub volume_id: VolumeId,
}

/// Grants `host`, and only it, the volume from `generation` on (fences every other host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub volume_id: VolumeId,
    pub host: HostName,
    pub generation: u64,
}

/// Leaves the volume granted to nobody from `generation` on (cuts every connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoke {
    pub volume_id: VolumeId,
    pub generation: u64,
}

/// Revokes, cuts connections, removes the export, discards and releases the storage, and
/// forgets the volume (idempotent: an unknown volume answers `deleted: false`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteVolume {
    pub volume_id: VolumeId,
}

/// Lists every volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListVolumes {}

/// The operations, by route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    CreateVolume,
    CreateSnapshot,
    Grant,
    Revoke,
    DeleteVolume,
    ListVolumes,
}

impl Op {
    /// In route order of the fuzz seeds (a new route goes last).
    pub const ALL: [Op; 6] = [
        Op::CreateVolume,
        Op::Grant,
        Op::Revoke,
        Op::DeleteVolume,
        Op::ListVolumes,
        Op::CreateSnapshot,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::CreateVolume => "CreateVolume",
            Op::CreateSnapshot => "CreateSnapshot",
            Op::Grant => "Grant",
            Op::Revoke => "Revoke",
            Op::DeleteVolume => "DeleteVolume",
            Op::ListVolumes => "ListVolumes",
        }
    }

    /// `POST` path of the operation.
    pub fn path(self) -> &'static str {
        match self {
            Op::CreateVolume => "/v1/CreateVolume",
            Op::CreateSnapshot => "/v1/CreateSnapshot",
            Op::Grant => "/v1/Grant",
            Op::Revoke => "/v1/Revoke",
            Op::DeleteVolume => "/v1/DeleteVolume",
            Op::ListVolumes => "/v1/ListVolumes",
        }
    }

    pub fn from_path(path: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|o| o.path() == path)
    }
}

/// A parsed, validated control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    CreateVolume(CreateVolume),
    CreateSnapshot(CreateSnapshot),
    Grant(Grant),
    Revoke(Revoke),
    DeleteVolume(DeleteVolume),
    ListVolumes(ListVolumes),
}

fn check_generation(g: u64) -> Result<(), ProtoError> {
    if g == 0 {
        Err(ProtoError::BadGeneration)
    } else {
        Ok(())
    }
}

/// Checks a volume size: a positive multiple of [`SECTOR_BYTES`] up to [`MAX_VOLUME_BYTES`].
pub fn check_size(size: u64) -> Result<(), ProtoError> {
    if size == 0 || !size.is_multiple_of(SECTOR_BYTES) || size > MAX_VOLUME_BYTES {
        Err(ProtoError::BadSize)
    } else {
        Ok(())
    }
}

impl Request {
    /// The one parser of the control boundary: route and body to a checked request. The body
    /// must already be bounded by the caller ([`MAX_BODY_BYTES`]).
    pub fn parse(path: &str, body: &[u8]) -> Result<Request, ProtoError> {
        let op = Op::from_path(path).ok_or(ProtoError::NoSuchRoute)?;
        let req = match op {
            Op::CreateVolume => {
                let r: CreateVolume = serde_json::from_slice(body)?;
                check_size(r.size_bytes)?;
                if r.volume_id.is_snapshot() || r.source.as_ref().is_some_and(|s| !s.is_snapshot())
                {
                    return Err(ProtoError::WrongIdKind);
                }
                Request::CreateVolume(r)
            }
            Op::CreateSnapshot => {
                let r: CreateSnapshot = serde_json::from_slice(body)?;
                if !r.snapshot_id.is_snapshot() || r.volume_id.is_snapshot() {
                    return Err(ProtoError::WrongIdKind);
                }
                Request::CreateSnapshot(r)
            }
            Op::Grant => {
                let r: Grant = serde_json::from_slice(body)?;
                check_generation(r.generation)?;
                Request::Grant(r)
            }
            Op::Revoke => {
                let r: Revoke = serde_json::from_slice(body)?;
                check_generation(r.generation)?;
                Request::Revoke(r)
            }
            Op::DeleteVolume => Request::DeleteVolume(serde_json::from_slice(body)?),
            Op::ListVolumes => Request::ListVolumes(serde_json::from_slice(body)?),
        };
        Ok(req)
    }

    pub fn op(&self) -> Op {
        match self {
            Request::CreateVolume(_) => Op::CreateVolume,
            Request::CreateSnapshot(_) => Op::CreateSnapshot,
            Request::Grant(_) => Op::Grant,
            Request::Revoke(_) => Op::Revoke,
            Request::DeleteVolume(_) => Op::DeleteVolume,
            Request::ListVolumes(_) => Op::ListVolumes,
        }
    }

    /// The volume the request is about, if any.
    pub fn volume_id(&self) -> Option<&VolumeId> {
        match self {
            Request::CreateVolume(r) => Some(&r.volume_id),
            Request::CreateSnapshot(r) => Some(&r.snapshot_id),
            Request::Grant(r) => Some(&r.volume_id),
            Request::Revoke(r) => Some(&r.volume_id),
            Request::DeleteVolume(r) => Some(&r.volume_id),
            Request::ListVolumes(_) => None,
        }
    }

    /// The JSON body a client sends (to [`Op::path`] of [`Request::op`]).
    pub fn to_body(&self) -> Vec<u8> {
        let v = match self {
            Request::CreateVolume(r) => serde_json::to_vec(r),
            Request::CreateSnapshot(r) => serde_json::to_vec(r),
            Request::Grant(r) => serde_json::to_vec(r),
            Request::Revoke(r) => serde_json::to_vec(r),
            Request::DeleteVolume(r) => serde_json::to_vec(r),
            Request::ListVolumes(r) => serde_json::to_vec(r),
        };
        // Serializing these plain structs cannot fail.
        v.unwrap_or_default()
    }
}

/// The engine that holds a volume's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// A raw sparse file per volume in the node's data directory.
    File,
    /// An RBD image in a Ceph pool.
    Rbd,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::File => "file",
            Engine::Rbd => "rbd",
        }
    }
}

/// A volume as the node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub volume_id: VolumeId,
    pub size_bytes: u64,
    pub engine: Engine,
    /// The highest generation seen in a Grant or Revoke (0: never granted).
    pub generation: u64,
    /// The one host that may open the volume, if any.
    pub granted_to: Option<HostName>,
    /// Live NBD connections to the volume right now.
    pub connections: u32,
}

/// Reply to CreateVolume, Grant and Revoke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeReply {
    pub volume: Volume,
    /// Connections cut by this request (fencing).
    #[serde(default)]
    pub cut_connections: u32,
}

/// Reply to DeleteVolume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteReply {
    pub volume_id: VolumeId,
    /// False when the volume did not exist (nothing to do).
    pub deleted: bool,
    #[serde(default)]
    pub cut_connections: u32,
}

/// Reply to ListVolumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListReply {
    pub volumes: Vec<Volume>,
}

/// Stable error codes of refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body failed the parser.
    BadRequest,
    NoSuchRoute,
    BodyTooLarge,
    /// The caller's certificate is not the control plane's.
    NotControlPlane,
    UnknownVolume,
    /// CreateVolume for an existing id with another size.
    VolumeExists,
    /// A Grant or Revoke below the volume's current generation.
    StaleGeneration,
    /// A Grant at the current generation for another host.
    GenerationConflict,
    /// The volume is being deleted.
    Deleting,
    /// CreateSnapshot of a volume some host holds (granted or connected).
    VolumeInUse,
    /// A Grant or Revoke of a snapshot: snapshots are never opened.
    NotAttachable,
    /// A Grant, DeleteVolume or CreateVolume of a volume the node is copying from or to (a
    /// snapshot or a volume made from one, in progress): try again once it ended.
    CopyInProgress,
    /// The storage engine (qemu-storage-daemon, Ceph) failed.
    EngineFailure,
    /// The durable volume table could not be written.
    TableFailure,
    /// The audit log could not be written; nothing was done.
    AuditUnavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NoSuchRoute => "no_such_route",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::NotControlPlane => "not_control_plane",
            ErrorCode::UnknownVolume => "unknown_volume",
            ErrorCode::VolumeExists => "volume_exists",
            ErrorCode::StaleGeneration => "stale_generation",
            ErrorCode::GenerationConflict => "generation_conflict",
            ErrorCode::Deleting => "deleting",
            ErrorCode::VolumeInUse => "volume_in_use",
            ErrorCode::NotAttachable => "not_attachable",
            ErrorCode::CopyInProgress => "copy_in_progress",
            ErrorCode::EngineFailure => "engine_failure",
            ErrorCode::TableFailure => "table_failure",
            ErrorCode::AuditUnavailable => "audit_unavailable",
        }
    }

    /// The HTTP status a refusal with this code carries.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::NoSuchRoute => 404,
            ErrorCode::BodyTooLarge => 413,
            ErrorCode::NotControlPlane => 403,
            ErrorCode::UnknownVolume => 404,
            ErrorCode::VolumeExists
            | ErrorCode::StaleGeneration
            | ErrorCode::GenerationConflict
            | ErrorCode::Deleting
            | ErrorCode::VolumeInUse
            | ErrorCode::CopyInProgress => 409,
            ErrorCode::NotAttachable => 400,
            ErrorCode::EngineFailure | ErrorCode::TableFailure => 500,
            ErrorCode::AuditUnavailable => 503,
        }
    }
}

/// A refusal's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

/// What a client makes of an answer: the operation's reply, or the node's typed refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<T> {
    Ok(T),
    Refused { status: u16, error: ErrorDetail },
}

/// Parses an answer to `op`'s request: status 200 with `T`, else an [`ErrorBody`].
pub fn parse_answer<T: serde::de::DeserializeOwned>(
    status: u16,
    body: &[u8],
) -> Result<Answer<T>, ProtoError> {
    if status == 200 {
        Ok(Answer::Ok(serde_json::from_slice(body)?))
    } else {
        let e: ErrorBody = serde_json::from_slice(body)?;
        Ok(Answer::Refused {
            status,
            error: e.error,
        })
    }
}

/// The fuzz target's body: the first byte picks the route, the rest is the body. Whatever
/// parses must encode to a body that parses to the same request.
pub fn fuzz_request(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let op = Op::ALL[usize::from(sel) % Op::ALL.len()];
    if let Ok(r) = Request::parse(op.path(), body) {
        assert_eq!(Request::parse(op.path(), &r.to_body()).ok(), Some(r));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ids_are_strict() {
        assert!(VolumeId::new("vol-1").is_ok());
        assert!(VolumeId::new("vol-0123456789abcdef").is_ok());
        for bad in [
            "",
            "vol-",
            "vol-A",
            "vol-a/b",
            "vol-..",
            "v-1",
            "vol-1 ",
            "vol-aaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert_eq!(VolumeId::new(bad), Err(ProtoError::BadVolumeId), "{bad:?}");
        }
        assert!(HostName::new("host-1").is_ok());
        for bad in ["", "Host", "h_1", &"h".repeat(41)] {
            assert_eq!(HostName::new(bad), Err(ProtoError::BadHostName), "{bad:?}");
        }
    }

    #[test]
    fn snapshot_requests_name_the_right_kinds_of_id() {
        let r = Request::parse(
            "/v1/CreateSnapshot",
            br#"{"snapshot_id":"snap-1","volume_id":"vol-1"}"#,
        )
        .unwrap();
        assert_eq!(r.volume_id().unwrap().as_str(), "snap-1");
        assert_eq!(Request::parse(r.op().path(), &r.to_body()).unwrap(), r);
        let r = Request::parse(
            "/v1/CreateVolume",
            br#"{"volume_id":"vol-2","size_bytes":4096,"source":"snap-1"}"#,
        )
        .unwrap();
        assert_eq!(Request::parse(r.op().path(), &r.to_body()).unwrap(), r);
        let cases: &[(&str, &[u8], ProtoError)] = &[
            (
                "/v1/CreateSnapshot",
                br#"{"snapshot_id":"vol-3","volume_id":"vol-1"}"#,
                ProtoError::WrongIdKind,
            ),
            (
                "/v1/CreateSnapshot",
                br#"{"snapshot_id":"snap-3","volume_id":"snap-1"}"#,
                ProtoError::WrongIdKind,
            ),
            (
                "/v1/CreateVolume",
                br#"{"volume_id":"snap-2","size_bytes":4096}"#,
                ProtoError::WrongIdKind,
            ),
            (
                "/v1/CreateVolume",
                br#"{"volume_id":"vol-2","size_bytes":4096,"source":"vol-1"}"#,
                ProtoError::WrongIdKind,
            ),
            (
                "/v1/CreateSnapshot",
                br#"{"snapshot_id":"snap-A","volume_id":"vol-1"}"#,
                ProtoError::BadVolumeId,
            ),
        ];
        for (path, body, want) in cases {
            assert_eq!(
                Request::parse(path, body).as_ref().err(),
                Some(want),
                "{path}"
            );
        }
        assert!(VolumeId::new("snap-1").unwrap().is_snapshot());
        assert!(!VolumeId::new("vol-1").unwrap().is_snapshot());
    }

    #[test]
    fn requests_parse_strictly() {
        let r = Request::parse(
            "/v1/Grant",
            br#"{"volume_id":"vol-1","host":"host-2","generation":3}"#,
        )
        .unwrap();
        assert_eq!(r.op(), Op::Grant);
        assert_eq!(r.volume_id().unwrap().as_str(), "vol-1");
        assert_eq!(Request::parse(r.op().path(), &r.to_body()).unwrap(), r);
        let cases: &[(&str, &[u8], ProtoError)] = &[
            ("/v1/Nope", b"{}", ProtoError::NoSuchRoute),
            (
                "/v1/Grant",
                br#"{"volume_id":"vol-1","host":"host-2","generation":0}"#,
                ProtoError::BadGeneration,
            ),
            (
                "/v1/Grant",
                br#"{"volume_id":"vol-1","host":"Host","generation":1}"#,
                ProtoError::BadHostName,
            ),
            (
                "/v1/CreateVolume",
                br#"{"volume_id":"../etc","size_bytes":4096}"#,
                ProtoError::BadVolumeId,
            ),
            (
                "/v1/CreateVolume",
                br#"{"volume_id":"vol-1","size_bytes":4097}"#,
                ProtoError::BadSize,
            ),
            (
                "/v1/CreateVolume",
                br#"{"volume_id":"vol-1","size_bytes":0}"#,
                ProtoError::BadSize,
            ),
        ];
        for (path, body, want) in cases {
            assert_eq!(
                Request::parse(path, body).unwrap_err(),
                *want,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        for bad in [
            &br#"{"volume_id":"vol-1","size_bytes":4096,"engine":"rbd"}"#[..],
            br#"{"volume_id":"vol-1"}"#,
            br#"{"volume_id":"vol-1","size_bytes":-1}"#,
            br#"[]"#,
            b"",
        ] {
            assert!(matches!(
                Request::parse("/v1/CreateVolume", bad),
                Err(ProtoError::BadBody { .. })
            ));
        }
        assert!(Request::parse("/v1/ListVolumes", b"{}").is_ok());
        assert!(Request::parse("/v1/ListVolumes", br#"{"all":true}"#).is_err());
    }

    #[test]
    fn fuzz_seeds_parse() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/control_request");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            let op = Op::ALL[usize::from(data[0]) % Op::ALL.len()];
            assert!(Request::parse(op.path(), &data[1..]).is_ok());
            fuzz_request(&data);
            n += 1;
        }
        assert_eq!(n, 7);
    }

    #[test]
    fn answers_round_trip() {
        let v = VolumeReply {
            volume: Volume {
                volume_id: VolumeId::new("vol-1").unwrap(),
                size_bytes: 4096,
                engine: Engine::File,
                generation: 2,
                granted_to: Some(HostName::new("host-1").unwrap()),
                connections: 1,
            },
            cut_connections: 0,
        };
        let body = serde_json::to_vec(&v).unwrap();
        assert_eq!(
            parse_answer::<VolumeReply>(200, &body).unwrap(),
            Answer::Ok(v)
        );
        let e = ErrorBody {
            error: ErrorDetail {
                code: ErrorCode::StaleGeneration,
                message: "x".into(),
            },
        };
        let body = serde_json::to_vec(&e).unwrap();
        assert_eq!(
            parse_answer::<VolumeReply>(409, &body).unwrap(),
            Answer::Refused {
                status: 409,
                error: e.error
            }
        );
        for c in [
            ErrorCode::BadRequest,
            ErrorCode::GenerationConflict,
            ErrorCode::CopyInProgress,
        ] {
            let s = serde_json::to_string(&c).unwrap();
            assert_eq!(s, format!("\"{}\"", c.as_str()));
        }
    }
}
