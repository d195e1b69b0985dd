//! The durable volume table: every volume the node holds, its size and engine, and its grant
//! (host and generation).
//!
//! On disk (`volumes.table`): one header line `bulkhead-storage-table 1 <sha256>` naming the
//! format version and the SHA-256 of the body that follows, then the body as JSON. Written
//! whole to a temporary file, fsync'd, renamed over the old one and the directory fsync'd, so
//! a crash (kill -9, power loss) leaves either the old or the new table. [`Table::parse`] is
//! the one parser of it: a torn, edited or unknown-version table is a typed [`TableError`] and
//! the node does not start.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use bulkhead_storage_proto::{check_size, Engine, HostName, Volume, VolumeId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The file name inside the state directory.
pub const TABLE_FILE: &str = "volumes.table";
/// The header's first word.
pub const MAGIC: &str = "bulkhead-storage-table";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Largest table file read (about 200 bytes per volume: a million volumes).
pub const MAX_TABLE_BYTES: usize = 256 << 20;
/// Most volumes in one table.
pub const MAX_VOLUMES: usize = 1_000_000;
/// Longest Ceph pool name.
pub const MAX_POOL_NAME: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("table is {got} bytes, more than {MAX_TABLE_BYTES}")]
    TooLarge { got: usize },
    #[error("table has no header line")]
    NoHeader,
    #[error("table header is not `{MAGIC} <version> <sha256>`")]
    BadHeader,
    #[error("table version {0} is not {VERSION}")]
    Version(u32),
    #[error("table body does not match its digest (torn or edited)")]
    Digest,
    #[error("table body is not valid (line {line}, column {column})")]
    Body { line: usize, column: usize },
    #[error("table holds {0} volumes, more than {MAX_VOLUMES}")]
    TooMany(usize),
    #[error("volume {0} appears twice")]
    Duplicate(VolumeId),
    #[error("volume {0} has an invalid size")]
    Size(VolumeId),
    #[error("volume {0}: engine and pool do not agree")]
    Pool(VolumeId),
    #[error("volume {0} is granted at generation 0")]
    Generation(VolumeId),
    #[error("table i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where a volume lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Location {
    /// `<data dir>/<volume id>.raw`.
    File,
    /// RBD image `<volume id>` in `pool`.
    Rbd { pool: String },
}

impl Location {
    pub fn engine(&self) -> Engine {
        match self {
            Location::File => Engine::File,
            Location::Rbd { .. } => Engine::Rbd,
        }
    }
}

/// Ceph pool names the node accepts: 1-64 of `A-Za-z0-9_.-`, not starting with `.` or `-`.
pub fn valid_pool(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= MAX_POOL_NAME
        && !p.starts_with(['.', '-'])
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// One volume's durable record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    pub volume_id: VolumeId,
    pub size_bytes: u64,
    pub location: Location,
    /// Highest generation seen in a Grant or Revoke.
    pub generation: u64,
    pub granted_to: Option<HostName>,
    /// DeleteVolume started: the grant is gone; the storage may or may not be released yet.
    /// A restart finishes the deletion.
    pub deleting: bool,
}

impl VolumeRecord {
    /// The record as the control API reports it.
    pub fn view(&self, connections: u32) -> Volume {
        Volume {
            volume_id: self.volume_id.clone(),
            size_bytes: self.size_bytes,
            engine: self.location.engine(),
            generation: self.generation,
            granted_to: self.granted_to.clone(),
            connections,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    volumes: Vec<VolumeRecord>,
}

/// The table in memory (ordered by id, so encodings are stable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    volumes: BTreeMap<VolumeId, VolumeRecord>,
}

impl Table {
    /// The one parser of the on-disk table.
    pub fn parse(raw: &[u8]) -> Result<Table, TableError> {
        if raw.len() > MAX_TABLE_BYTES {
            return Err(TableError::TooLarge { got: raw.len() });
        }
        let nl = raw
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(TableError::NoHeader)?;
        let (header, rest) = raw.split_at(nl);
        let body = rest.get(1..).unwrap_or_default();
        let header = std::str::from_utf8(header).map_err(|_| TableError::BadHeader)?;
        let mut words = header.split(' ');
        let (Some(MAGIC), Some(version), Some(digest), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(TableError::BadHeader);
        };
        let version: u32 = version.parse().map_err(|_| TableError::BadHeader)?;
        if version != VERSION {
            return Err(TableError::Version(version));
        }
        if digest.len() != 64
            || !digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(TableError::BadHeader);
        }
        if hex::encode(Sha256::digest(body)) != digest {
            return Err(TableError::Digest);
        }
        let parsed: Body = serde_json::from_slice(body).map_err(|e| TableError::Body {
            line: e.line(),
            column: e.column(),
        })?;
        if parsed.volumes.len() > MAX_VOLUMES {
            return Err(TableError::TooMany(parsed.volumes.len()));
        }
        let mut volumes = BTreeMap::new();
        for v in parsed.volumes {
            if check_size(v.size_bytes).is_err() {
                return Err(TableError::Size(v.volume_id));
            }
            if let Location::Rbd { pool } = &v.location {
                if !valid_pool(pool) {
                    return Err(TableError::Pool(v.volume_id));
                }
            }
            if v.granted_to.is_some() && v.generation == 0 {
                return Err(TableError::Generation(v.volume_id));
            }
            if volumes.contains_key(&v.volume_id) {
                return Err(TableError::Duplicate(v.volume_id));
            }
            volumes.insert(v.volume_id.clone(), v);
        }
        Ok(Table { volumes })
    }

    /// The on-disk encoding.
    pub fn encode(&self) -> Vec<u8> {
        let body = Body {
            volumes: self.volumes.values().cloned().collect(),
        };
        // Plain structs with string keys: serialization cannot fail.
        let body = serde_json::to_vec_pretty(&body).unwrap_or_default();
        let mut out =
            format!("{MAGIC} {VERSION} {}\n", hex::encode(Sha256::digest(&body))).into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// Reads the table at `path`; a missing file is an empty table (a new node).
    pub fn load(path: &Path) -> Result<Table, TableError> {
        match std::fs::read(path) {
            Ok(raw) => Table::parse(&raw),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Table::default()),
            Err(source) => Err(TableError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Writes the table to `path` atomically and durably (temp file, fsync, rename, fsync of
    /// the directory).
    pub fn save(&self, path: &Path) -> Result<(), TableError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| TableError::Io { path: p, source }
        };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&self.encode()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io(path))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok(())
    }

    pub fn get(&self, id: &VolumeId) -> Option<&VolumeRecord> {
        self.volumes.get(id)
    }

    pub fn insert(&mut self, rec: VolumeRecord) {
        self.volumes.insert(rec.volume_id.clone(), rec);
    }

    pub fn remove(&mut self, id: &VolumeId) -> Option<VolumeRecord> {
        self.volumes.remove(id)
    }

    pub fn volumes(&self) -> impl Iterator<Item = &VolumeRecord> {
        self.volumes.values()
    }

    pub fn len(&self) -> usize {
        self.volumes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.volumes.is_empty()
    }
}

/// Unit-test vectors, also the fuzz target's seeds.
pub fn sample() -> Table {
    let mut t = Table::default();
    let id = |s: &str| VolumeId::new(s).unwrap_or_else(|_| unreachable!("valid sample id"));
    t.insert(VolumeRecord {
        volume_id: id("vol-1"),
        size_bytes: 1 << 20,
        location: Location::File,
        generation: 2,
        granted_to: HostName::new("host-1").ok(),
        deleting: false,
    });
    t.insert(VolumeRecord {
        volume_id: id("vol-2"),
        size_bytes: 4096,
        location: Location::Rbd {
            pool: "bulkhead".into(),
        },
        generation: 0,
        granted_to: None,
        deleting: true,
    });
    t
}

/// The fuzz target's body: any bytes either fail to parse or parse into a table whose
/// encoding parses back to the same table.
pub fn fuzz_parse(data: &[u8]) {
    if let Ok(t) = Table::parse(data) {
        let again = Table::parse(&t.encode());
        assert!(
            matches!(again, Ok(ref u) if *u == t),
            "re-encoding changed the table"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn reseal(body: &str) -> Vec<u8> {
        format!(
            "{MAGIC} {VERSION} {}\n{body}",
            hex::encode(Sha256::digest(body.as_bytes()))
        )
        .into_bytes()
    }

    #[test]
    fn round_trips_and_refuses_corruption() {
        let t = sample();
        let raw = t.encode();
        assert_eq!(Table::parse(&raw).unwrap(), t);
        // Every single-byte flip in the body or digest is caught.
        let nl = raw.iter().position(|&b| b == b'\n').unwrap();
        for i in [nl - 1, nl + 5, raw.len() - 2] {
            let mut bad = raw.clone();
            bad[i] ^= 0x01;
            assert!(Table::parse(&bad).is_err(), "flip at {i}");
        }
        // Torn writes.
        assert!(matches!(
            Table::parse(&raw[..raw.len() - 3]),
            Err(TableError::Digest)
        ));
        assert!(matches!(
            Table::parse(&raw[..nl]),
            Err(TableError::NoHeader)
        ));
        assert!(matches!(Table::parse(b""), Err(TableError::NoHeader)));
        let other = String::from_utf8(raw.clone())
            .unwrap()
            .replacen(" 1 ", " 2 ", 1);
        assert!(matches!(
            Table::parse(other.as_bytes()),
            Err(TableError::Version(2))
        ));
    }

    #[test]
    fn refuses_inconsistent_bodies_even_with_a_good_digest() {
        let vol = |extra: &str| {
            format!(
                r#"{{"volumes":[{{"volume_id":"vol-1","size_bytes":4096,"location":"file","generation":1,"granted_to":"host-1","deleting":false{extra}}}]}}"#
            )
        };
        assert!(Table::parse(&reseal(&vol(""))).is_ok());
        assert!(matches!(
            Table::parse(&reseal(&vol(r#","x":1"#))),
            Err(TableError::Body { .. })
        ));
        let two = r#"{"volumes":[{"volume_id":"vol-1","size_bytes":4096,"location":"file","generation":0,"granted_to":null,"deleting":false},{"volume_id":"vol-1","size_bytes":4096,"location":"file","generation":0,"granted_to":null,"deleting":false}]}"#;
        assert!(matches!(
            Table::parse(&reseal(two)),
            Err(TableError::Duplicate(_))
        ));
        let g0 = vol("").replace(r#""generation":1"#, r#""generation":0"#);
        assert!(matches!(
            Table::parse(&reseal(&g0)),
            Err(TableError::Generation(_))
        ));
        let size = vol("").replace("4096", "100");
        assert!(matches!(
            Table::parse(&reseal(&size)),
            Err(TableError::Size(_))
        ));
        let pool = vol("").replace(r#""file""#, r#"{"rbd":{"pool":"../x"}}"#);
        assert!(matches!(
            Table::parse(&reseal(&pool)),
            Err(TableError::Pool(_))
        ));
        let id = vol("").replace("vol-1", "vol-../1");
        assert!(matches!(
            Table::parse(&reseal(&id)),
            Err(TableError::Body { .. })
        ));
    }

    #[test]
    fn fuzz_seeds_are_the_unit_vectors() {
        let seed = sample().encode();
        fuzz_parse(&seed);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/table_parse");
        let on_disk = std::fs::read(dir.join("sample")).unwrap();
        assert_eq!(
            on_disk, seed,
            "regenerate fuzz/seeds/table_parse/sample from table::sample()"
        );
        fuzz_parse(b"");
        fuzz_parse(b"bulkhead-storage-table 1 00\n{}");
    }

    #[test]
    fn save_is_atomic_and_load_of_missing_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TABLE_FILE);
        assert!(Table::load(&path).unwrap().is_empty());
        let t = sample();
        t.save(&path).unwrap();
        assert_eq!(Table::load(&path).unwrap(), t);
        assert!(!path.with_extension("tmp").exists());
    }
}
