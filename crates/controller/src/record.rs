//! The host's own durable record of its instances and attachments.
//!
//! The controller writes it (write to a temporary file, `fsync`, rename, `fsync` the directory)
//! after every change it acknowledges and before it answers, so a controller that is killed at
//! any point leaves a record of everything it ever acknowledged. A new controller reads it at
//! start, before it touches any process, and adopts what the record names (see
//! [`crate::host::HostBackend::adopt`]).
//!
//! File layout: one header line, then the JSON body:
//!
//! ```text
//! bulkhead-host-record v1 len=<body bytes> sha256=<hex of the body>\n
//! {"instances":[...],"draining":false}
//! ```
//!
//! [`HostRecord::parse`] is the one parser of this file: size capped, header and version
//! checked (an unknown version is [`RecordError::UnknownVersion`], never a guess), digest
//! checked (a corrupted body is [`RecordError::Digest`]), strict JSON (unknown fields refused),
//! then every value checked (identifiers, pids, device names, no volume twice). The file is
//! 0600: it holds each instance's guest command line (which carries the customer's user data)
//! and the net cards' sealed epoch keys (sealed to this host's key; the controller never opens
//! them). It holds no volume key, sealed or not: a block card keeps its key for its life.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The only version this controller writes and reads.
pub const RECORD_VERSION: u32 = 1;
/// First word of the header line.
pub const RECORD_MAGIC: &str = "bulkhead-host-record";
/// Largest record file accepted.
pub const MAX_RECORD: usize = 4 * 1024 * 1024;
/// Longest header line.
const MAX_HEADER: usize = 160;
/// Most instances a record may name.
pub const MAX_INSTANCES: usize = 4096;
/// Most volumes per instance.
pub const MAX_VOLUMES: usize = 64;
/// Longest guest command line kept (the controller's own cap is 1792).
const MAX_CMDLINE: usize = 4096;

/// Why a host record was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("host record is {len} bytes, more than {max}")]
    TooLarge { len: usize, max: usize },
    #[error("host record has no header line")]
    NoHeader,
    #[error("host record header is malformed")]
    BadHeader,
    #[error("host record is version {got}; this controller reads version {want} only")]
    UnknownVersion { got: u32, want: u32 },
    #[error("host record body is {got} bytes, its header says {want}")]
    Length { got: usize, want: usize },
    #[error("host record body does not match its digest (corrupted)")]
    Digest,
    #[error("host record body is not valid JSON for this version (line {line}, column {column})")]
    Json { line: usize, column: usize },
    #[error("host record field is invalid: {0}")]
    Invalid(RecordField),
    #[error("host record {path}: {kind}")]
    Io {
        path: PathBuf,
        kind: std::io::ErrorKind,
    },
}

/// Which value of a record failed its check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordField {
    #[error("too many instances")]
    TooManyInstances,
    #[error("instance id")]
    InstanceId,
    #[error("instance id named twice")]
    DuplicateInstance,
    #[error("image")]
    Image,
    #[error("vcpus or memory")]
    Size,
    #[error("command line")]
    Cmdline,
    #[error("pid")]
    Pid,
    #[error("volume id")]
    VolumeId,
    #[error("volume attached twice")]
    DuplicateVolume,
    #[error("device id")]
    Device,
    #[error("device id used twice")]
    DuplicateDevice,
    #[error("too many volumes")]
    TooManyVolumes,
    #[error("network")]
    Network,
    #[error("sealed key")]
    SealedKey,
    #[error("cpus (out of range, named twice, or held by two instances)")]
    Cpus,
    #[error("instance storage size")]
    InstanceStorage,
    #[error("active release")]
    Release,
}

/// An instance's recorded state (terminated instances leave the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordedState {
    Created,
    Running,
    Stopped,
}

/// One attached volume: its card and the guest device it is plugged as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    pub volume: String,
    pub device: String,
    pub card_pid: u32,
    /// The new card of a card update in flight (committed at the keeper and recorded before
    /// the hypervisor's `ReplaceBlock`): a restarted controller keeps whichever of the two
    /// cards still runs once the other is gone (the old one exits after a completed move).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_update: Option<u32>,
}

/// An attach that was in flight (not acknowledged): undone on adoption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingAttach {
    pub volume: String,
    pub device: String,
}

/// The interface CreateInstance described (kept as the checked text the card takes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkRecord {
    pub vpc: u32,
    pub card_id: u32,
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
    pub mtu: u16,
    pub allow: Vec<String>,
    pub routes: Vec<String>,
}

/// The running net card and what restarting it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetCardRecord {
    /// Its process; `null`: the card is down (it could not be started again) and the
    /// controller starts it with backoff.
    pub pid: Option<u32>,
    pub listen: std::net::SocketAddr,
    pub epoch: u32,
    /// Hex of the sealed epoch key blob (sealed to this host; never opened by the controller).
    pub sealed_key: String,
    pub routes: Vec<String>,
    pub allow: Vec<String>,
    /// The installed release whose `bulkhead-netcard` the card runs (absent: the configured
    /// binary); a card restarted after it died runs the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
}

/// The instance's instance-storage disk: its size and, while it exists, the card serving it.
/// The card holds a key it made itself (never recorded anywhere); the backing file is
/// `<volume dir>/instance-store/<instance>.img`, deleted when the disk ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceStoreRecord {
    pub gib: u32,
    /// The card and guest device of the current disk (`None`: no disk now; the next boot
    /// makes a fresh one).
    pub disk: Option<StoreDiskRecord>,
}

/// A running instance-storage card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreDiskRecord {
    pub device: String,
    pub card_pid: u32,
}

/// One instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    pub id: String,
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub state: RecordedState,
    pub cmdline: String,
    pub booted: bool,
    /// The hypervisor process (`None`: no VM right now, e.g. after it died).
    pub hypervisor_pid: Option<u32>,
    /// A live update in flight: the new hypervisor process, started and committed before the
    /// old one hands over. A restarted controller adopts whichever of the two runs the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor_update: Option<u32>,
    pub next_device: u32,
    pub volumes: Vec<VolumeRecord>,
    pub attaching: Option<PendingAttach>,
    pub network: Option<NetworkRecord>,
    pub net_card: Option<NetCardRecord>,
    /// The host CPUs of the instance's whole cores (its vCPU threads are pinned there; see
    /// [`crate::cores`]). Empty: not pinned (a host with shared cores, or a record written
    /// before pinning). Left out of the file when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpus: Vec<usize>,
    /// Instance storage (left out of the file when the instance has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_storage: Option<InstanceStoreRecord>,
}

/// The whole record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    pub instances: Vec<InstanceRecord>,
    pub draining: bool,
    /// The release this host runs (DeployRelease): its hypervisor starts every new instance,
    /// and its version is the floor below which no release is accepted. Absent: none deployed
    /// yet (the configured binaries run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseRecord>,
}

/// One artefact of the active release, as installed under the host's release directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseArtefactRecord {
    pub name: String,
    pub sha384: String,
}

/// The host's active release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRecord {
    pub version: u64,
    /// Every artefact installed in `v<version>/` (the hypervisor, and the controller and card
    /// binaries, which this release records but does not yet apply).
    pub artefacts: Vec<ReleaseArtefactRecord>,
}

impl ReleaseRecord {
    /// Whether this release carries artefact `name` (a hypervisor, card or controller binary).
    pub fn carries(&self, name: &str) -> bool {
        self.artefacts.iter().any(|a| a.name == name)
    }
}

/// Most artefacts a recorded release may name (the release format's own cap).
const MAX_RECORDED_ARTEFACTS: usize = 64;

fn valid_id(s: &str) -> bool {
    bulkhead_tokens::ops::valid_resource_id(s)
}

fn valid_pid(p: u32) -> bool {
    p > 1 && i32::try_from(p).is_ok()
}

fn valid_device(s: &str) -> bool {
    bulkhead_hypervisor_client::DeviceId::new(s).is_ok()
}

impl HostRecord {
    /// The one parser of a record file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<HostRecord, RecordError> {
        if bytes.len() > MAX_RECORD {
            return Err(RecordError::TooLarge {
                len: bytes.len(),
                max: MAX_RECORD,
            });
        }
        let nl = bytes
            .iter()
            .take(MAX_HEADER)
            .position(|b| *b == b'\n')
            .ok_or(RecordError::NoHeader)?;
        let (header, rest) = bytes.split_at(nl);
        let body = rest.get(1..).unwrap_or(&[]);
        let header = std::str::from_utf8(header).map_err(|_| RecordError::BadHeader)?;
        let mut words = header.split(' ');
        if words.next() != Some(RECORD_MAGIC) {
            return Err(RecordError::BadHeader);
        }
        let version = words
            .next()
            .and_then(|v| v.strip_prefix('v'))
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or(RecordError::BadHeader)?;
        if version != RECORD_VERSION {
            return Err(RecordError::UnknownVersion {
                got: version,
                want: RECORD_VERSION,
            });
        }
        let len = words
            .next()
            .and_then(|v| v.strip_prefix("len="))
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or(RecordError::BadHeader)?;
        let digest = words
            .next()
            .and_then(|v| v.strip_prefix("sha256="))
            .filter(|d| d.len() == 64)
            .and_then(|d| hex::decode(d).ok())
            .ok_or(RecordError::BadHeader)?;
        if words.next().is_some() {
            return Err(RecordError::BadHeader);
        }
        if body.len() != len {
            return Err(RecordError::Length {
                got: body.len(),
                want: len,
            });
        }
        if Sha256::digest(body)[..] != digest[..] {
            return Err(RecordError::Digest);
        }
        let rec: HostRecord = serde_json::from_slice(body).map_err(|e| RecordError::Json {
            line: e.line(),
            column: e.column(),
        })?;
        rec.check()?;
        Ok(rec)
    }

    /// Every value checked (the types already bound the shapes).
    pub fn check(&self) -> Result<(), RecordError> {
        use RecordField as F;
        let bad = |f| Err(RecordError::Invalid(f));
        if self.instances.len() > MAX_INSTANCES {
            return bad(F::TooManyInstances);
        }
        if let Some(r) = &self.release {
            let names_ok = r.artefacts.iter().all(|a| {
                !a.name.is_empty()
                    && a.name.len() <= 64
                    && a.name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    && !a.name.starts_with('.')
                    && a.sha384.len() == 96
                    && a.sha384.bytes().all(|b| b.is_ascii_hexdigit())
            });
            if r.version == 0 || r.artefacts.len() > MAX_RECORDED_ARTEFACTS || !names_ok {
                return bad(F::Release);
            }
        }
        let mut ids = std::collections::BTreeSet::new();
        let mut volumes = std::collections::BTreeSet::new();
        let mut cpus = std::collections::BTreeSet::new();
        for i in &self.instances {
            for c in &i.cpus {
                if *c > crate::cores::MAX_CPU || !cpus.insert(*c) {
                    return bad(F::Cpus);
                }
            }
            if !valid_id(&i.id) {
                return bad(F::InstanceId);
            }
            if !ids.insert(i.id.as_str()) {
                return bad(F::DuplicateInstance);
            }
            if !valid_id(&i.image) {
                return bad(F::Image);
            }
            if i.vcpus == 0 || i.vcpus > 255 || i.memory_mib == 0 {
                return bad(F::Size);
            }
            if i.cmdline.is_empty() || i.cmdline.len() > MAX_CMDLINE || i.cmdline.contains('\0') {
                return bad(F::Cmdline);
            }
            if i.hypervisor_pid.is_some_and(|p| !valid_pid(p))
                || i.hypervisor_update.is_some_and(|p| !valid_pid(p))
            {
                return bad(F::Pid);
            }
            if i.volumes.len() > MAX_VOLUMES {
                return bad(F::TooManyVolumes);
            }
            let mut devices = std::collections::BTreeSet::new();
            for v in &i.volumes {
                if !valid_id(&v.volume) {
                    return bad(F::VolumeId);
                }
                if !volumes.insert(v.volume.as_str()) {
                    return bad(F::DuplicateVolume);
                }
                if !valid_device(&v.device) {
                    return bad(F::Device);
                }
                if !devices.insert(v.device.as_str()) {
                    return bad(F::DuplicateDevice);
                }
                if !valid_pid(v.card_pid) {
                    return bad(F::Pid);
                }
            }
            if let Some(st) = &i.instance_storage {
                if crate::api::InstanceStorageGib::new(st.gib).is_err() {
                    return bad(F::InstanceStorage);
                }
                if let Some(d) = &st.disk {
                    if !valid_device(&d.device) {
                        return bad(F::Device);
                    }
                    if !devices.insert(d.device.as_str()) {
                        return bad(F::DuplicateDevice);
                    }
                    if !valid_pid(d.card_pid) {
                        return bad(F::Pid);
                    }
                }
            }
            if let Some(p) = &i.attaching {
                if !valid_id(&p.volume) {
                    return bad(F::VolumeId);
                }
                if !valid_device(&p.device) {
                    return bad(F::Device);
                }
                if devices.contains(p.device.as_str()) {
                    return bad(F::DuplicateDevice);
                }
            }
            if let Some(n) = &i.network {
                let cidr = format!("{}/{}", n.ip, n.prefix);
                if bulkhead_netcard::frame::MacAddr::parse_text(&n.mac).is_err()
                    || bulkhead_netcard::secgroup::Cidr::parse_text(&cidr).is_err()
                    || crate::api::check_rules(&n.allow).is_err()
                    || crate::api::check_routes(&n.routes, n.card_id).is_err()
                {
                    return bad(F::Network);
                }
            }
            if let Some(c) = &i.net_card {
                let Some(n) = &i.network else {
                    return bad(F::Network);
                };
                if c.pid.is_some_and(|p| !valid_pid(p)) {
                    return bad(F::Pid);
                }
                if c.sealed_key.len() != 2 * bulkhead_sealing::SEALED_BLOB_LEN
                    || !c.sealed_key.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return bad(F::SealedKey);
                }
                if crate::api::check_rules(&c.allow).is_err()
                    || crate::api::check_routes(&c.routes, n.card_id).is_err()
                {
                    return bad(F::Network);
                }
            }
        }
        Ok(())
    }

    /// The file's bytes: header line and body.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut out = format!(
            "{RECORD_MAGIC} v{RECORD_VERSION} len={} sha256={}\n",
            body.len(),
            hex::encode(Sha256::digest(&body))
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// Reads and parses the record at `path`; a missing file is an empty record (a host that
    /// never ran an instance).
    pub fn load(path: &Path) -> Result<HostRecord, RecordError> {
        use std::io::Read as _;
        let io = |e: std::io::Error| RecordError::Io {
            path: path.to_path_buf(),
            kind: e.kind(),
        };
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HostRecord::default()),
            Err(e) => return Err(io(e)),
        };
        let mut bytes = Vec::new();
        f.take(
            u64::try_from(MAX_RECORD)
                .unwrap_or(u64::MAX)
                .saturating_add(1),
        )
        .read_to_end(&mut bytes)
        .map_err(io)?;
        HostRecord::parse(&bytes)
    }

    /// Writes the record durably: a 0600 temporary file in the same directory, `fsync`,
    /// rename over `path`, `fsync` the directory. Either the old or the new record is on disk.
    pub fn store(&self, path: &Path) -> Result<(), RecordError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |e: std::io::Error| RecordError::Io {
            path: path.to_path_buf(),
            kind: e.kind(),
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".new");
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&self.encode()).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A record with every kind of entry (also the fuzz target's seed).
    pub fn sample() -> HostRecord {
        HostRecord {
            draining: false,
            instances: vec![InstanceRecord {
                id: "i-1".into(),
                image: "test-guest".into(),
                vcpus: 1,
                memory_mib: 256,
                state: RecordedState::Running,
                cmdline: "console=ttyS0 bulkhead.run=echo\\0040hi".into(),
                booted: true,
                hypervisor_pid: Some(4242),
                hypervisor_update: Some(4246),
                next_device: 2,
                volumes: vec![VolumeRecord {
                    volume: "vol-1".into(),
                    device: "blk0".into(),
                    card_pid: 4243,
                    card_update: None,
                }],
                attaching: Some(PendingAttach {
                    volume: "vol-2".into(),
                    device: "blk1".into(),
                }),
                network: Some(NetworkRecord {
                    vpc: 7,
                    card_id: 1,
                    mac: "02:00:00:00:00:10".into(),
                    ip: "10.0.1.5".parse().unwrap(),
                    prefix: 24,
                    gateway: "10.0.1.1".parse().unwrap(),
                    mtu: 1400,
                    allow: vec!["tcp:7000:10.0.0.0/16".into()],
                    routes: vec!["10.0.1.6=2@127.0.0.1:40001".into()],
                }),
                net_card: Some(NetCardRecord {
                    pid: Some(4244),
                    listen: "127.0.0.1:40000".parse().unwrap(),
                    epoch: 1,
                    sealed_key: "ab".repeat(bulkhead_sealing::SEALED_BLOB_LEN),
                    routes: vec![],
                    allow: vec![],
                    release: Some(3),
                }),
                cpus: vec![2, 3],
                instance_storage: Some(InstanceStoreRecord {
                    gib: 2,
                    disk: Some(StoreDiskRecord {
                        device: "store0".into(),
                        card_pid: 4245,
                    }),
                }),
            }],
            release: Some(ReleaseRecord {
                version: 3,
                artefacts: vec![ReleaseArtefactRecord {
                    name: "bulkhead-hypervisor".into(),
                    sha384: "ab".repeat(48),
                }],
            }),
        }
    }

    #[test]
    fn a_release_carries_only_the_artefacts_it_names() {
        let r = sample().release.unwrap();
        assert!(r.carries("bulkhead-hypervisor"));
        assert!(!r.carries("bulkhead-blockcard"));
        assert!(!r.carries("bulkhead-hypervisor-"));
    }

    #[test]
    fn a_bad_release_entry_is_refused() {
        let mut r = sample();
        if let Some(rel) = r.release.as_mut() {
            rel.artefacts[0].name = "../x".into();
        }
        assert!(matches!(
            HostRecord::parse(&r.encode()),
            Err(RecordError::Invalid(RecordField::Release))
        ));
        let mut r = sample();
        r.release = None;
        // A record without a release (an older controller's) still parses.
        assert_eq!(HostRecord::parse(&r.encode()).unwrap(), r);
    }

    #[test]
    fn round_trips() {
        let r = sample();
        assert_eq!(HostRecord::parse(&r.encode()).unwrap(), r);
        let empty = HostRecord::default();
        assert_eq!(HostRecord::parse(&empty.encode()).unwrap(), empty);
        // A card update in flight is kept; a record without one (an older controller's) parses.
        let mut r = sample();
        r.instances[0].volumes[0].card_update = Some(4250);
        let text = r.encode();
        assert!(String::from_utf8_lossy(&text).contains(r#""card_update":4250"#));
        assert_eq!(HostRecord::parse(&text).unwrap(), r);
        assert!(!String::from_utf8_lossy(&sample().encode()).contains("card_update"));
        // A net card on the configured binary (an older controller's record has no release).
        let mut r = sample();
        if let Some(c) = r.instances[0].net_card.as_mut() {
            c.release = None;
        }
        assert_eq!(HostRecord::parse(&r.encode()).unwrap(), r);
        // A down net card (no process) keeps everything but its pid.
        if let Some(c) = r.instances[0].net_card.as_mut() {
            c.pid = None;
        }
        let text = r.encode();
        assert!(String::from_utf8_lossy(&text).contains(r#""pid":null"#));
        assert_eq!(HostRecord::parse(&text).unwrap(), r);
    }

    #[test]
    fn writes_the_seed_corpus() {
        // Keeps the fuzz seed equal to what the controller writes.
        let seed = sample().encode();
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/host_record/sample");
        if std::env::var_os("BULKHEAD_BLESS").is_some() {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, &seed).unwrap();
        }
        assert_eq!(
            HostRecord::parse(&std::fs::read(&p).unwrap()).unwrap(),
            sample()
        );
    }

    #[test]
    fn refuses_what_it_cannot_trust() {
        let good = sample().encode();
        // Unknown version: typed, never guessed.
        let v2 = String::from_utf8(good.clone())
            .unwrap()
            .replacen(" v1 ", " v2 ", 1);
        assert_eq!(
            HostRecord::parse(v2.as_bytes()),
            Err(RecordError::UnknownVersion { got: 2, want: 1 })
        );
        // One flipped body byte: digest.
        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x01;
        assert_eq!(HostRecord::parse(&flipped), Err(RecordError::Digest));
        // Truncated: length.
        assert!(matches!(
            HostRecord::parse(&good[..good.len() - 5]),
            Err(RecordError::Length { .. })
        ));
        assert_eq!(HostRecord::parse(b""), Err(RecordError::NoHeader));
        assert_eq!(
            HostRecord::parse(b"something-else v1 len=0 sha256=00\n"),
            Err(RecordError::BadHeader)
        );
        // A body that hashes right but breaks a rule is refused by the checks.
        let mut r = sample();
        let again = r.instances[0].volumes[0].clone();
        r.instances[0].volumes.push(again);
        assert_eq!(
            HostRecord::parse(&r.encode()),
            Err(RecordError::Invalid(RecordField::DuplicateVolume))
        );
        let mut r = sample();
        r.instances[0].hypervisor_pid = Some(1);
        assert_eq!(
            HostRecord::parse(&r.encode()),
            Err(RecordError::Invalid(RecordField::Pid))
        );
        let mut r = sample();
        r.instances[0].cpus = vec![2, 2];
        assert_eq!(
            HostRecord::parse(&r.encode()),
            Err(RecordError::Invalid(RecordField::Cpus))
        );
        let mut r = sample();
        r.instances[0].cpus = vec![crate::cores::MAX_CPU + 1];
        assert_eq!(
            HostRecord::parse(&r.encode()),
            Err(RecordError::Invalid(RecordField::Cpus))
        );
        // A record written before pinning (no `cpus`) still parses: not pinned.
        let mut r = sample();
        r.instances[0].cpus = Vec::new();
        assert!(!String::from_utf8(r.encode()).unwrap().contains("\"cpus\""));
        assert_eq!(HostRecord::parse(&r.encode()).unwrap(), r);
        // Instance storage: size bounded, its device unique among the instance's disks.
        for gib in [0, crate::api::MAX_INSTANCE_STORAGE_GIB + 1] {
            let mut r = sample();
            r.instances[0].instance_storage.as_mut().unwrap().gib = gib;
            assert_eq!(
                HostRecord::parse(&r.encode()),
                Err(RecordError::Invalid(RecordField::InstanceStorage))
            );
        }
        let mut r = sample();
        r.instances[0].instance_storage.as_mut().unwrap().disk = Some(StoreDiskRecord {
            device: "blk0".into(),
            card_pid: 4245,
        });
        assert_eq!(
            HostRecord::parse(&r.encode()),
            Err(RecordError::Invalid(RecordField::DuplicateDevice))
        );
        // A record with no instance storage leaves the field out and still parses.
        let mut r = sample();
        r.instances[0].instance_storage = None;
        assert!(!String::from_utf8(r.encode())
            .unwrap()
            .contains("instance_storage"));
        assert_eq!(HostRecord::parse(&r.encode()).unwrap(), r);
        let mut r = sample();
        r.instances[0].id = "../x".into();
        assert_eq!(
            HostRecord::parse(&r.encode()),
            Err(RecordError::Invalid(RecordField::InstanceId))
        );
        // Unknown fields are refused.
        let body = br#"{"instances":[],"draining":false,"extra":1}"#;
        let mut f = format!(
            "{RECORD_MAGIC} v1 len={} sha256={}\n",
            body.len(),
            hex::encode(Sha256::digest(body))
        )
        .into_bytes();
        f.extend_from_slice(body);
        assert!(matches!(
            HostRecord::parse(&f),
            Err(RecordError::Json { .. })
        ));
    }

    #[test]
    fn stores_durably_and_privately() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("host-record");
        assert_eq!(HostRecord::load(&p).unwrap(), HostRecord::default());
        sample().store(&p).unwrap();
        assert_eq!(HostRecord::load(&p).unwrap(), sample());
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
