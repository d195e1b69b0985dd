//! `bulkhead-audit`: the controller's append-only, hash-chained audit log.
//!
//! One JSON record per line. Each record carries the SHA-256 (hex) of the exact bytes of the
//! previous line, so deleting, reordering or editing any record breaks the chain at that point.
//! Records are written by one writer thread that takes every entry queued since its last write,
//! writes them with one `write`, and makes them durable with one `fdatasync` (group commit).
//! An [`AuditLog::append`] call returns only once its record is on disk; if the write or the sync
//! fails the caller gets an error and must refuse the request it was about to serve (fail closed).
//!
//! When the log is opened with a [`CheckpointSigner`], every group commit ends with a signed
//! checkpoint record (see [`checkpoint`]), so the tail cannot be edited, cut or rewritten without
//! a verifier that holds the signer's certificate, or an earlier head, noticing. A torn last line
//! found at open is never dropped silently: it is cut, and an alert record saying what was cut
//! (bytes, SHA-256, after which sequence number) is the first record written afterwards.
//!
//! Compatibility: records written before checkpoints existed have no `checkpoint` field and the
//! same shape as before, so older logs verify unchanged with [`verify`]; a daemon that opens an
//! older log with a signer seals everything before it with its first checkpoint.
//!
//! Request parameters: a service that records a digest of the bytes a caller sent computes it
//! with its [`ParamsKey`] (HMAC-SHA256 under a key drawn at process start and held only in
//! memory), never a plain SHA-256, so an operator reading the log cannot confirm guesses of the
//! body's fields the record does not show. The record's `op` and `resources` stay in clear; see
//! [`params`] for which fields only the digest covers, where the key lives and what equal
//! digests mean.

pub mod checkpoint;
pub mod params;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use checkpoint::{Checkpoint, CheckpointKey, CheckpointSigner, KeyError};
pub use params::{ParamsKey, ParamsKeyError};

/// `prev` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Largest record line accepted by the reader and verifier.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Most entries written by one group commit.
const MAX_BATCH: usize = 4096;

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A request, written before the action runs (or instead of it when refused).
    Request,
    /// The result of an allowed request, written after the action ran.
    Outcome,
    /// An alert raised by the monitoring rules.
    Alert,
    /// The controller started (or recovered the log).
    Lifecycle,
    /// A signed checkpoint over the chain so far (the record carries a [`Checkpoint`]).
    Checkpoint,
}

/// The decision recorded for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
    /// Not a decision (outcomes, alerts, lifecycle events).
    None,
}

/// What the controller asks to log. The writer adds sequence number, time and chain hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub kind: EntryKind,
    /// Identifier the controller gave the request; outcome records repeat it.
    pub request_id: String,
    /// Caller identity as authenticated by TLS (certificate subject CN), or "-" if none.
    pub caller: String,
    /// SHA-256 of the caller's certificate (DER), hex.
    pub cert_sha256: Option<String>,
    /// Token identifier, once the token's signature checked out.
    pub token_id: Option<String>,
    /// Operation name (e.g. `DescribeHost`), or the route that was tried.
    pub op: String,
    pub resources: Vec<String>,
    /// Digest of the request's parameters, 64 hex digits. Where a service digests the bytes a
    /// caller sent, this is keyed: HMAC-SHA256 under the writing process's [`ParamsKey`]
    /// (equal only for equal bodies within one process run; see [`params`]). The name is kept
    /// from when it was a plain SHA-256 (older records) so existing logs and readers parse
    /// unchanged. Other writers document what they put here (the controller: plain SHA-256 of
    /// an operator-plane body, the operator's own input; a deploy: of its public release
    /// manifest; a measured-start alert: the PCR value; this crate's torn-tail alert: plain
    /// SHA-256 of the cut bytes, a partial record of the log itself).
    pub params_sha256: Option<String>,
    pub decision: Decision,
    /// Stable code: `ok` or an error code such as `token_expired`.
    pub code: String,
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub seq: u64,
    pub time_ms: u64,
    pub prev: String,
    pub entry: AuditEntry,
    /// Present exactly on records of kind [`EntryKind::Checkpoint`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("audit log is broken: {0}")]
    Broken(#[from] VerifyError),
    #[error("audit log is poisoned after an unrecoverable write failure")]
    Poisoned,
    #[error("audit write failed (disk full or i/o error); nothing was appended")]
    WriteFailed,
    #[error("audit writer has stopped")]
    WriterGone,
    #[error("audit record could not be encoded")]
    Encode,
    #[error("audit checkpoint key {path}: {source}")]
    Key { path: String, source: KeyError },
}

impl AuditError {
    /// Stable error code.
    pub fn code(&self) -> &'static str {
        "audit_unavailable"
    }
}

/// Why verification stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("line {line}: i/o error reading the log")]
    Io { line: u64 },
    #[error("line {line}: not a valid record")]
    Malformed { line: u64 },
    #[error("line {line}: longer than {MAX_LINE_BYTES} bytes")]
    TooLong { line: u64 },
    #[error("line {line}: sequence number {got}, want {want}")]
    BadSeq { line: u64, got: u64, want: u64 },
    #[error("line {line}: prev hash does not match the previous record")]
    BrokenLink { line: u64 },
    #[error("line {line}: last record has no newline (torn write)")]
    TornTail { line: u64 },
    #[error("line {line}: checkpoint signature does not verify (record edited, rewritten or signed by another key)")]
    BadCheckpoint { line: u64 },
    #[error("line {line}: checkpoint number {got}, want {want}")]
    CheckpointGap { line: u64, got: u64, want: u64 },
    #[error("line {line}: records after the last checkpoint (appended, or the tail was cut off mid-batch)")]
    UnsealedTail { line: u64 },
    #[error("line {line}: record differs from the anchored head (history rewritten)")]
    AnchorMismatch { line: u64 },
    #[error(
        "line {line}: log ends at {have} records but {want} were seen before (records deleted)"
    )]
    Truncated { line: u64, have: u64, want: u64 },
    #[error("line {line}: last checkpoint is number {have}, but number {want} was seen before (rolled back)")]
    RolledBack { line: u64, have: u64, want: u64 },
}

impl VerifyError {
    /// 1-based line number of the first bad record.
    pub fn line(&self) -> u64 {
        match self {
            VerifyError::Io { line }
            | VerifyError::Malformed { line }
            | VerifyError::TooLong { line }
            | VerifyError::BadSeq { line, .. }
            | VerifyError::BrokenLink { line }
            | VerifyError::TornTail { line }
            | VerifyError::BadCheckpoint { line }
            | VerifyError::CheckpointGap { line, .. }
            | VerifyError::UnsealedTail { line }
            | VerifyError::AnchorMismatch { line }
            | VerifyError::Truncated { line, .. }
            | VerifyError::RolledBack { line, .. } => *line,
        }
    }
}

/// Result of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// Number of records.
    pub records: u64,
    /// SHA-256 of the last line (or [`GENESIS_HASH`]).
    pub last_hash: String,
    /// Byte length of the verified prefix.
    pub bytes: u64,
    /// Number of the last checkpoint, 0 if none.
    pub checkpoint: u64,
    /// Sequence number of the last checkpoint record, 0 if none.
    pub sealed_through: u64,
}

/// A position of the chain a verifier saw before: record `seq` had line hash `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub hash: String,
}

impl Anchor {
    /// Parses `SEQ:HASH` (64 hex digits).
    pub fn parse(s: &str) -> Option<Anchor> {
        let (seq, hash) = s.split_once(':')?;
        let seq = seq.parse().ok()?;
        (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then(|| Anchor {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// What [`verify_with`] demands beyond an intact chain.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Every checkpoint must be signed by this key, and the log must end with a checkpoint.
    pub key: Option<CheckpointKey>,
    /// The chain must still hold this record unchanged (and so be at least this long).
    pub anchor: Option<Anchor>,
    /// The last checkpoint's number must be at least this.
    pub min_checkpoint: Option<u64>,
}

/// SHA-256 (hex) of one record line, as the next record's `prev` names it.
pub fn line_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

fn now_ms() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Reads one `\n`-terminated line of at most [`MAX_LINE_BYTES`]; `Ok(None)` at end of file.
/// Returns `(bytes, terminated)`.
fn read_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Option<bool>> {
    buf.clear();
    let limit = u64::try_from(MAX_LINE_BYTES).unwrap_or(u64::MAX) + 1;
    let n = r.by_ref().take(limit).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    let terminated = buf.last() == Some(&b'\n');
    if terminated {
        buf.pop();
    }
    Ok(Some(terminated))
}

/// True if `bytes` are all NUL (the preallocated space after the last record; see
/// [`LogOptions::preallocate`]).
fn is_padding(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Reads `r` to its end; true if everything left is NUL.
fn rest_is_padding<R: Read>(r: &mut R) -> std::io::Result<bool> {
    let mut chunk = [0u8; 8192];
    loop {
        let n = r.read(&mut chunk)?;
        if n == 0 {
            return Ok(true);
        }
        if !is_padding(chunk.get(..n).unwrap_or(&[])) {
            return Ok(false);
        }
    }
}

/// Checks the whole chain (links and sequence numbers). Stops at the first bad record.
/// Checkpoint signatures are not checked: see [`verify_with`].
pub fn verify(path: &Path) -> Result<ChainHead, VerifyError> {
    verify_with(path, &VerifyOptions::default())
}

/// Checks the chain and whatever `opts` demands.
pub fn verify_with(path: &Path, opts: &VerifyOptions) -> Result<ChainHead, VerifyError> {
    let file = File::open(path).map_err(|_| VerifyError::Io { line: 0 })?;
    verify_reader_with(BufReader::new(file), opts)
}

/// Checks a chain read from any reader.
pub fn verify_reader<R: BufRead>(r: R) -> Result<ChainHead, VerifyError> {
    verify_reader_with(r, &VerifyOptions::default())
}

/// Follows a chain record by record; shared by whole-file verification and by verifiers that
/// receive a log in pages (the control plane's pulls).
#[derive(Debug, Clone)]
pub struct ChainFollower {
    prev: String,
    records: u64,
    bytes: u64,
    checkpoint: u64,
    sealed_through: u64,
    key: Option<CheckpointKey>,
}

impl ChainFollower {
    /// From the start of a log.
    pub fn new(key: Option<CheckpointKey>) -> Self {
        ChainFollower {
            prev: GENESIS_HASH.to_string(),
            records: 0,
            bytes: 0,
            checkpoint: 0,
            sealed_through: 0,
            key,
        }
    }

    /// Continuing after record `head.seq` whose line hash was `head.hash`, last checkpoint
    /// number `checkpoint`.
    pub fn resume(key: Option<CheckpointKey>, head: &Anchor, checkpoint: u64) -> Self {
        ChainFollower {
            prev: head.hash.clone(),
            records: head.seq,
            bytes: 0,
            checkpoint,
            sealed_through: head.seq,
            key,
        }
    }

    /// Takes the next line (without its newline). Returns the parsed record.
    pub fn push(&mut self, line: &[u8]) -> Result<AuditRecord, VerifyError> {
        let n = self.records + 1;
        if line.len() > MAX_LINE_BYTES {
            return Err(VerifyError::TooLong { line: n });
        }
        let rec: AuditRecord =
            serde_json::from_slice(line).map_err(|_| VerifyError::Malformed { line: n })?;
        if rec.seq != n {
            return Err(VerifyError::BadSeq {
                line: n,
                got: rec.seq,
                want: n,
            });
        }
        if rec.prev != self.prev {
            return Err(VerifyError::BrokenLink { line: n });
        }
        match (&rec.checkpoint, rec.entry.kind == EntryKind::Checkpoint) {
            (None, false) => {}
            (Some(cp), true) => {
                if let Some(k) = &self.key {
                    if !k.verify(rec.seq, rec.time_ms, &rec.prev, cp) {
                        return Err(VerifyError::BadCheckpoint { line: n });
                    }
                }
                // Numbers run 1, 2, 3 … in one log; a follower resumed mid-log without a number
                // (checkpoint 0) takes the first one it sees.
                if self.checkpoint != 0 || self.records == 0 {
                    let want = self.checkpoint + 1;
                    if cp.number != want {
                        return Err(VerifyError::CheckpointGap {
                            line: n,
                            got: cp.number,
                            want,
                        });
                    }
                }
                self.checkpoint = cp.number;
                self.sealed_through = n;
            }
            _ => return Err(VerifyError::Malformed { line: n }),
        }
        self.prev = line_hash(line);
        self.records = n;
        self.bytes += u64::try_from(line.len()).unwrap_or(u64::MAX) + 1;
        Ok(rec)
    }

    /// The head so far.
    pub fn head(&self) -> ChainHead {
        ChainHead {
            records: self.records,
            last_hash: self.prev.clone(),
            bytes: self.bytes,
            checkpoint: self.checkpoint,
            sealed_through: self.sealed_through,
        }
    }

    /// With a key: every record must be covered by a checkpoint.
    pub fn check_sealed(&self) -> Result<(), VerifyError> {
        if self.key.is_some() && self.records > self.sealed_through {
            return Err(VerifyError::UnsealedTail {
                line: self.sealed_through + 1,
            });
        }
        Ok(())
    }
}

/// Checks a chain read from any reader against `opts`.
pub fn verify_reader_with<R: BufRead>(
    mut r: R,
    opts: &VerifyOptions,
) -> Result<ChainHead, VerifyError> {
    let mut f = ChainFollower::new(opts.key.clone());
    let mut buf = Vec::new();
    loop {
        let line = f.records + 1;
        let terminated = match read_line(&mut r, &mut buf) {
            Ok(None) => break,
            Ok(Some(t)) => t,
            Err(_) => return Err(VerifyError::Io { line }),
        };
        // A preallocating writer's unused space: NUL bytes to the end of the file.
        if !terminated
            && is_padding(&buf)
            && rest_is_padding(&mut r).map_err(|_| VerifyError::Io { line })?
        {
            break;
        }
        // Torn: a record cut short (in a preallocated file, followed by NUL bytes).
        let written = buf.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if !terminated && written <= MAX_LINE_BYTES {
            return Err(VerifyError::TornTail { line });
        }
        if buf.len() > MAX_LINE_BYTES {
            return Err(VerifyError::TooLong { line });
        }
        f.push(&buf)?;
        if let Some(a) = &opts.anchor {
            if a.seq == line && f.prev != a.hash {
                return Err(VerifyError::AnchorMismatch { line });
            }
        }
    }
    let head = f.head();
    let end = head.records + 1;
    if let Some(a) = &opts.anchor {
        if head.records < a.seq {
            return Err(VerifyError::Truncated {
                line: end,
                have: head.records,
                want: a.seq,
            });
        }
    }
    f.check_sealed()?;
    if let Some(min) = opts.min_checkpoint {
        if head.checkpoint < min {
            return Err(VerifyError::RolledBack {
                line: end,
                have: head.checkpoint,
                want: min,
            });
        }
    }
    Ok(head)
}

/// Reads up to `limit` raw record lines with `seq > after`. Only complete lines are returned.
pub fn read_after(path: &Path, after: u64, limit: usize) -> std::io::Result<Vec<String>> {
    let mut r = BufReader::new(File::open(path)?);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut seq: u64 = 0;
    while out.len() < limit {
        match read_line(&mut r, &mut buf)? {
            None | Some(false) => break,
            Some(true) => {}
        }
        seq += 1;
        if seq > after {
            match String::from_utf8(buf.clone()) {
                Ok(s) => out.push(s),
                Err(_) => break,
            }
        }
    }
    Ok(out)
}

/// What the writer answers: the record's sequence number and the entry, handed back.
type Acked = Result<(u64, AuditEntry), AuditError>;

struct Job {
    entry: AuditEntry,
    reply: Option<tokio::sync::oneshot::Sender<Acked>>,
}

/// How [`AuditLog::open_with_options`] opens a log.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// Seal every group commit with a checkpoint signed by this key.
    pub signer: Option<Arc<CheckpointSigner>>,
    /// Keep zero-filled space ([`PREALLOC_CHUNK`] at a time) written ahead of the records, so a
    /// group commit overwrites blocks the file already has and its `fdatasync` writes the data
    /// alone, not the inode's new size as well (one device write per commit instead of two).
    /// While the log is open, and after a crash until the next open, the file then ends in NUL
    /// bytes: readers stop at the last newline, [`verify`] accepts an all-NUL tail, and a clean
    /// close (every handle dropped) cuts it off. Off by default.
    pub preallocate: bool,
}

/// Zero-filled bytes a preallocating writer adds at a time (see [`LogOptions::preallocate`]).
pub const PREALLOC_CHUNK: u64 = 256 * 1024;

/// Length of the written (non-NUL) part of the file after `from`: the bytes up to and including
/// the last non-NUL byte. 0 when the tail is empty or all padding.
fn written_tail(path: &Path, from: u64) -> std::io::Result<u64> {
    let mut r = File::open(path)?;
    r.seek(SeekFrom::Start(from))?;
    let mut chunk = vec![0u8; 64 * 1024];
    let (mut pos, mut last) = (0u64, 0u64);
    loop {
        let n = r.read(&mut chunk)?;
        if n == 0 {
            return Ok(last);
        }
        let part = chunk.get(..n).unwrap_or(&[]);
        if let Some(i) = part.iter().rposition(|&b| b != 0) {
            last = pos + u64::try_from(i).unwrap_or(u64::MAX) + 1;
        }
        pos += u64::try_from(n).unwrap_or(u64::MAX);
    }
}

/// One line as [`AuditRecord`] serializes it, borrowing instead of owning: the writer encodes
/// records straight into its batch buffer without cloning entries or hashes (the bytes are the
/// same: `record_ref_encodes_like_the_record`).
#[derive(Serialize)]
struct RecordRef<'a> {
    seq: u64,
    time_ms: u64,
    prev: &'a str,
    entry: &'a AuditEntry,
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint: Option<&'a Checkpoint>,
}

/// Encodes one record line (and its newline) at the end of `buf`; returns the line's hash (hex).
fn encode_line(buf: &mut Vec<u8>, rec: &RecordRef<'_>) -> Result<[u8; 64], AuditError> {
    let start = buf.len();
    serde_json::to_writer(&mut *buf, rec).map_err(|_| AuditError::Encode)?;
    let mut hash = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(buf.get(start..).unwrap_or(&[])), &mut hash)
        .map_err(|_| AuditError::Encode)?;
    buf.push(b'\n');
    Ok(hash)
}

fn hex_str(h: &[u8; 64]) -> Result<&str, AuditError> {
    std::str::from_utf8(h).map_err(|_| AuditError::Encode)
}

#[derive(Default)]
struct Shared {
    poisoned: AtomicBool,
    records: AtomicU64,
    batches: AtomicU64,
    failures: AtomicU64,
    head: std::sync::Mutex<Head>,
    /// Set by the writer thread as its last act.
    closed: AtomicBool,
}

/// The durable head of the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Sequence number of the last durable record (0 when empty).
    pub seq: u64,
    /// Its line hash.
    pub hash: String,
    /// Number of the last checkpoint (0 when none).
    pub checkpoint: u64,
}

/// Counters about the writer, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditStats {
    pub records: u64,
    pub batches: u64,
    pub failures: u64,
    pub poisoned: bool,
}

/// What [`AuditLog::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    pub records: u64,
    /// Bytes of an unterminated last line that were cut off. Recorded in the log as an alert
    /// (`audit_torn_tail`): an unterminated line is normally a batch that was never acknowledged
    /// (crash mid-write), but it may also be an acknowledged record cut by someone.
    pub torn_bytes_removed: u64,
    /// With a signer: records found after the last checkpoint (recorded as an
    /// `audit_unsealed_tail` alert when the log had checkpoints before).
    pub unsealed_records: u64,
    /// Alerts written at open (rule names).
    pub alerts: Vec<String>,
}

/// Handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    path: PathBuf,
}

impl AuditLog {
    /// Opens (or creates) the log without checkpoints. See [`AuditLog::open_with`].
    pub fn open(path: &Path) -> Result<(AuditLog, OpenReport), AuditError> {
        Self::open_with(path, None)
    }

    /// Opens (or creates) the log, verifies the whole chain (and, with a signer, every
    /// checkpoint against the signer's own key), cuts off a torn last line and records that it
    /// did, and starts the writer thread. A broken chain is an error: the daemon must not start.
    pub fn open_with(
        path: &Path,
        signer: Option<Arc<CheckpointSigner>>,
    ) -> Result<(AuditLog, OpenReport), AuditError> {
        Self::open_with_options(
            path,
            LogOptions {
                signer,
                preallocate: false,
            },
        )
    }

    /// Opens (or creates) the log as `options` say. See [`AuditLog::open_with`].
    pub fn open_with_options(
        path: &Path,
        options: LogOptions,
    ) -> Result<(AuditLog, OpenReport), AuditError> {
        let LogOptions {
            signer,
            preallocate,
        } = options;
        // Preallocating, the writer writes at explicit offsets inside the file; otherwise it
        // only ever appends.
        let mut file = OpenOptions::new()
            .read(true)
            .append(!preallocate)
            .write(preallocate)
            .create(true)
            .open(path)?;
        let opts = VerifyOptions {
            key: signer.as_ref().map(|s| s.verifying_key()),
            ..VerifyOptions::default()
        };
        let scan = |r: &mut BufReader<File>, lines: Option<u64>| -> Result<ChainHead, AuditError> {
            let mut f = ChainFollower::new(opts.key.clone());
            let mut buf = Vec::new();
            while lines.is_none_or(|l| f.records < l) {
                match read_line(r, &mut buf)? {
                    Some(true) => {
                        f.push(&buf)?;
                    }
                    // Preallocated space: the records end here (what follows is checked
                    // below, byte by byte, without a second pass over the log).
                    Some(false) if is_padding(&buf) => break,
                    Some(false) => {
                        return Err(AuditError::Broken(VerifyError::TornTail {
                            line: f.records + 1,
                        }))
                    }
                    None => break,
                }
            }
            Ok(f.head())
        };
        let head = match scan(&mut BufReader::new(File::open(path)?), None) {
            Ok(h) => h,
            Err(AuditError::Broken(VerifyError::TornTail { line })) => scan(
                &mut BufReader::new(File::open(path)?),
                Some(line.saturating_sub(1)),
            )?,
            Err(e) => return Err(e),
        };
        let len = file.seek(SeekFrom::End(0))?;
        // After the last complete record: NUL padding (a preallocating writer's unused space),
        // and before it, perhaps, a torn record.
        let torn = written_tail(path, head.bytes)?;
        let mut alloc_len = len;
        if torn == 0 && len > head.bytes && !preallocate {
            file.set_len(head.bytes)?;
            file.sync_all()?;
            alloc_len = head.bytes;
        }
        let mut alerts = Vec::new();
        let mut pending = Vec::new();
        if torn > 0 {
            let mut cut = Vec::new();
            let mut r = File::open(path)?;
            r.seek(SeekFrom::Start(head.bytes))?;
            r.take(torn).read_to_end(&mut cut)?;
            alloc_len = head.bytes;
            tracing::error!(
                bytes = torn,
                after_seq = head.records,
                "audit log ends in a torn line: cutting it and recording the cut"
            );
            file.set_len(head.bytes)?;
            file.sync_all()?;
            alerts.push("audit_torn_tail".to_string());
            pending.push(AuditEntry {
                kind: EntryKind::Alert,
                request_id: format!("torn-{}", head.records),
                caller: "audit".into(),
                cert_sha256: None,
                token_id: None,
                op: "audit_torn_tail".into(),
                resources: vec![],
                params_sha256: Some(hex::encode(Sha256::digest(&cut))),
                decision: Decision::None,
                code: format!(
                    "cut {torn} bytes of an unterminated record after seq {}",
                    head.records
                ),
            });
        }
        let unsealed = head.records.saturating_sub(head.sealed_through);
        if signer.is_some() && unsealed > 0 && head.checkpoint > 0 {
            tracing::error!(
                records = unsealed,
                "audit log has records after its last checkpoint: recording it"
            );
            alerts.push("audit_unsealed_tail".to_string());
            pending.push(AuditEntry {
                kind: EntryKind::Alert,
                request_id: format!("unsealed-{}", head.sealed_through),
                caller: "audit".into(),
                cert_sha256: None,
                token_id: None,
                op: "audit_unsealed_tail".into(),
                resources: vec![],
                params_sha256: None,
                decision: Decision::None,
                code: format!(
                    "{unsealed} records after the last checkpoint (seq {})",
                    head.sealed_through
                ),
            });
        }
        let shared = Arc::new(Shared::default());
        shared.records.store(head.records, Ordering::Relaxed);
        *lock(&shared.head) = Head {
            seq: head.records,
            hash: head.last_hash.clone(),
            checkpoint: head.checkpoint,
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let prev: [u8; 64] = head
            .last_hash
            .as_bytes()
            .try_into()
            .map_err(|_| AuditError::Encode)?;
        let mut writer = Writer {
            file,
            good_len: head.bytes,
            alloc_len,
            preallocate,
            next_seq: head.records + 1,
            prev,
            checkpoint: head.checkpoint,
            signer,
            shared: Arc::clone(&shared),
            buf: Vec::new(),
            zeros: Vec::new(),
        };
        if !pending.is_empty() {
            // What open found is durable before anything else is written or acknowledged.
            let jobs: Vec<Job> = pending
                .into_iter()
                .map(|entry| Job { entry, reply: None })
                .collect();
            writer.commit(&jobs)?;
        }
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))?;
        let log = AuditLog {
            tx,
            shared,
            path: path.to_path_buf(),
        };
        Ok((
            log,
            OpenReport {
                records: head.records,
                torn_bytes_removed: torn,
                unsealed_records: unsealed,
                alerts,
            },
        ))
    }

    /// Opens the log with checkpoints signed by the PEM PKCS#8 key at `key_pem` (a daemon's own
    /// TLS key: whoever holds its certificate can then verify the log).
    pub fn open_signed(path: &Path, key_pem: &Path) -> Result<(AuditLog, OpenReport), AuditError> {
        let key_err = |source| AuditError::Key {
            path: key_pem.display().to_string(),
            source,
        };
        let pem = std::fs::read(key_pem)?;
        let signer = CheckpointSigner::from_pkcs8_pem(&pem).map_err(key_err)?;
        Self::open_with(path, Some(Arc::new(signer)))
    }

    /// The durable head (last record and checkpoint).
    pub fn head(&self) -> Head {
        lock(&self.shared.head).clone()
    }

    /// Appends `entry` and waits until it is on disk. Returns its sequence number.
    pub async fn append(&self, entry: AuditEntry) -> Result<u64, AuditError> {
        self.append_returning(entry).await.map(|(seq, _)| seq)
    }

    /// Appends `entry`, waits until it is on disk, and hands the entry back with its sequence
    /// number (a caller that logs an outcome record next reuses it instead of cloning it first).
    pub async fn append_returning(
        &self,
        entry: AuditEntry,
    ) -> Result<(u64, AuditEntry), AuditError> {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Err(AuditError::Poisoned);
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Job {
                entry,
                reply: Some(reply),
            })
            .map_err(|_| AuditError::WriterGone)?;
        rx.await.map_err(|_| AuditError::WriterGone)?
    }

    /// Appends from a non-async context, blocking until durable.
    pub fn append_blocking(&self, entry: AuditEntry) -> Result<u64, AuditError> {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Err(AuditError::Poisoned);
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Job {
                entry,
                reply: Some(reply),
            })
            .map_err(|_| AuditError::WriterGone)?;
        rx.blocking_recv()
            .map_err(|_| AuditError::WriterGone)?
            .map(|(seq, _)| seq)
    }

    /// Queues `entry`; it becomes durable with the next group commit. Used for outcome records,
    /// whose request record is already durable.
    pub fn append_queued(&self, entry: AuditEntry) {
        if self.tx.send(Job { entry, reply: None }).is_err() {
            tracing::error!("audit writer gone; queued record dropped");
        }
    }

    pub fn stats(&self) -> AuditStats {
        AuditStats {
            records: self.shared.records.load(Ordering::Relaxed),
            batches: self.shared.batches.load(Ordering::Relaxed),
            failures: self.shared.failures.load(Ordering::Relaxed),
            poisoned: self.shared.poisoned.load(Ordering::Relaxed),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

struct Writer {
    file: File,
    /// End of the last durable record.
    good_len: u64,
    /// Length of the file: `good_len` plus preallocated NUL bytes.
    alloc_len: u64,
    preallocate: bool,
    next_seq: u64,
    /// Line hash (hex) of the last durable record.
    prev: [u8; 64],
    checkpoint: u64,
    signer: Option<Arc<CheckpointSigner>>,
    shared: Arc<Shared>,
    /// The batch being encoded; kept between batches (no allocation per commit).
    buf: Vec<u8>,
    /// [`PREALLOC_CHUNK`] NUL bytes, made on first use.
    zeros: Vec<u8>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut batch: Vec<Job> = Vec::new();
        while let Ok(first) = rx.recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            let result = if self.shared.poisoned.load(Ordering::Acquire) {
                Err(AuditError::Poisoned)
            } else {
                self.commit(&batch)
            };
            match result {
                Ok(first_seq) => {
                    for (i, job) in batch.drain(..).enumerate() {
                        if let Some(reply) = job.reply {
                            let seq = first_seq + u64::try_from(i).unwrap_or(0);
                            let _ = reply.send(Ok((seq, job.entry)));
                        }
                    }
                }
                Err(e) => {
                    self.shared.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, records = batch.len(), "audit write failed; refusing");
                    for job in batch.drain(..) {
                        if let Some(reply) = job.reply {
                            let err = if self.shared.poisoned.load(Ordering::Acquire) {
                                AuditError::Poisoned
                            } else {
                                AuditError::WriteFailed
                            };
                            let _ = reply.send(Err(err));
                        }
                    }
                }
            }
        }
        // Every handle is gone: a clean close leaves no preallocated space behind.
        if self.preallocate
            && self.alloc_len > self.good_len
            && !self.shared.poisoned.load(Ordering::Acquire)
        {
            let cut = self
                .file
                .set_len(self.good_len)
                .and_then(|()| self.file.sync_all());
            if let Err(e) = cut {
                tracing::warn!(error = %e, "could not cut the audit log's preallocated space");
            }
        }
        self.shared.closed.store(true, Ordering::Release);
    }

    /// Makes sure the file has written (NUL) space up to at least `end`, a chunk ahead. Best
    /// effort: when the disk has no room for a chunk, the batch is appended past the end.
    fn preallocate_to(&mut self, end: u64) {
        if end <= self.alloc_len {
            return;
        }
        let target = (end / PREALLOC_CHUNK).saturating_add(1) * PREALLOC_CHUNK;
        if self.zeros.is_empty() {
            self.zeros = vec![0u8; usize::try_from(PREALLOC_CHUNK).unwrap_or(0)];
        }
        let mut off = self.alloc_len;
        while off < target {
            let n = usize::try_from((target - off).min(PREALLOC_CHUNK)).unwrap_or(0);
            let res = self
                .file
                .write_all_at(self.zeros.get(..n).unwrap_or(&[]), off);
            if let Err(e) = res {
                tracing::warn!(error = %e, "audit log: no room to preallocate; appending instead");
                // Cut the part of the chunk that was written; the records go past the end.
                if self.file.set_len(self.alloc_len).is_err() {
                    self.shared.poisoned.store(true, Ordering::Release);
                }
                return;
            }
            off += u64::try_from(n).unwrap_or(u64::MAX);
        }
        self.alloc_len = target;
    }

    /// Writes and syncs one batch; returns the first sequence number used.
    fn commit(&mut self, batch: &[Job]) -> Result<u64, AuditError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let res = self.commit_into(batch, &mut buf);
        // Keep the buffer for the next batch unless one huge batch made it huge.
        if buf.capacity() <= 4 * 1024 * 1024 {
            self.buf = buf;
        }
        res
    }

    fn commit_into(&mut self, batch: &[Job], buf: &mut Vec<u8>) -> Result<u64, AuditError> {
        let mut seq = self.next_seq;
        let mut prev = self.prev;
        let time_ms = now_ms();
        for job in batch {
            prev = encode_line(
                buf,
                &RecordRef {
                    seq,
                    time_ms,
                    prev: hex_str(&prev)?,
                    entry: &job.entry,
                    checkpoint: None,
                },
            )?;
            seq += 1;
        }
        // The batch's checkpoint goes out in the same write and sync: nothing is acknowledged
        // before it is sealed.
        let mut checkpoint = self.checkpoint;
        if let Some(signer) = &self.signer {
            checkpoint += 1;
            let prev_hex = hex_str(&prev)?;
            let sig = signer
                .sign(&checkpoint::message(seq, time_ms, prev_hex, checkpoint))
                .ok_or(AuditError::Encode)?;
            let entry = AuditEntry {
                kind: EntryKind::Checkpoint,
                request_id: format!("checkpoint-{checkpoint}"),
                caller: "audit".into(),
                cert_sha256: None,
                token_id: None,
                op: "Checkpoint".into(),
                resources: vec![],
                params_sha256: None,
                decision: Decision::None,
                code: "ok".into(),
            };
            let cp = Checkpoint {
                number: checkpoint,
                signer: signer.id().to_string(),
                sig,
            };
            prev = encode_line(
                buf,
                &RecordRef {
                    seq,
                    time_ms,
                    prev: prev_hex,
                    entry: &entry,
                    checkpoint: Some(&cp),
                },
            )?;
            seq += 1;
        }
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        let res = if self.preallocate {
            self.preallocate_to(self.good_len.saturating_add(len));
            self.file.write_all_at(buf, self.good_len)
        } else {
            self.file.write_all(buf)
        }
        .and_then(|()| self.file.sync_data());
        if let Err(e) = res {
            // Cut any partial write (and any preallocated space) so the chain on disk stays
            // intact.
            let restored = self
                .file
                .set_len(self.good_len)
                .and_then(|()| self.file.sync_all());
            self.alloc_len = self.good_len;
            if restored.is_err() {
                self.shared.poisoned.store(true, Ordering::Release);
            }
            return Err(AuditError::Io(e));
        }
        let first = self.next_seq;
        self.good_len += len;
        self.alloc_len = self.alloc_len.max(self.good_len);
        self.next_seq = seq;
        self.prev = prev;
        self.checkpoint = checkpoint;
        *lock(&self.shared.head) = Head {
            seq: seq - 1,
            hash: hex_str(&prev)?.to_string(),
            checkpoint,
        };
        let n = seq - first;
        self.shared.records.fetch_add(n, Ordering::Relaxed);
        self.shared.batches.fetch_add(1, Ordering::Relaxed);
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(op: &str) -> AuditEntry {
        AuditEntry {
            kind: EntryKind::Request,
            request_id: "r".into(),
            caller: "operator".into(),
            cert_sha256: None,
            token_id: None,
            op: op.into(),
            resources: vec!["host".into()],
            params_sha256: None,
            decision: Decision::Allow,
            code: "ok".into(),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn chain_verifies_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, rep) = AuditLog::open(&path).unwrap();
        assert_eq!(rep.records, 0);
        for i in 0..10 {
            assert_eq!(log.append(entry("DescribeHost")).await.unwrap(), i + 1);
        }
        drop(log);
        assert_eq!(verify(&path).unwrap().records, 10);
        let (log, rep) = AuditLog::open(&path).unwrap();
        assert_eq!(rep.records, 10);
        assert_eq!(log.append(entry("x")).await.unwrap(), 11);
        assert_eq!(verify(&path).unwrap().records, 11);
        let lines = read_after(&path, 9, 100).unwrap();
        assert_eq!(lines.len(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tampering_is_found_at_the_right_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, _) = AuditLog::open(&path).unwrap();
        for _ in 0..5 {
            log.append(entry("DescribeHost")).await.unwrap();
        }
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let edited = text.replacen("\"DescribeHost\"", "\"RebootHost\"", 3);
        // Records 1..3 edited: record 2 is the first whose prev no longer matches.
        std::fs::write(&path, edited).unwrap();
        assert_eq!(
            verify(&path).unwrap_err(),
            VerifyError::BrokenLink { line: 2 }
        );
        assert!(AuditLog::open(&path).is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn torn_tail_is_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, _) = AuditLog::open(&path).unwrap();
        log.append(entry("a")).await.unwrap();
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"ti").unwrap();
        drop(f);
        assert_eq!(
            verify(&path).unwrap_err(),
            VerifyError::TornTail { line: 2 }
        );
        let (log, rep) = AuditLog::open(&path).unwrap();
        assert_eq!(rep.records, 1);
        assert!(rep.torn_bytes_removed > 0);
        // Record 2 says what was cut.
        assert_eq!(log.append(entry("b")).await.unwrap(), 3);
        assert_eq!(verify(&path).unwrap().records, 3);
    }

    fn signer() -> Arc<CheckpointSigner> {
        use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        Arc::new(CheckpointSigner::from_pkcs8_der(doc.as_ref()).unwrap())
    }

    fn keyed(s: &CheckpointSigner) -> VerifyOptions {
        VerifyOptions {
            key: Some(s.verifying_key()),
            ..VerifyOptions::default()
        }
    }

    /// A signed log of `n` requests, one batch each, half of them denied.
    async fn signed_log(n: usize) -> (tempfile::TempDir, PathBuf, Arc<CheckpointSigner>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let s = signer();
        let (log, _) = AuditLog::open_with(&path, Some(Arc::clone(&s))).unwrap();
        for i in 0..n {
            let mut e = entry("DescribeHost");
            if i % 2 == 1 {
                e.decision = Decision::Deny;
                e.code = "policy_denied".into();
            }
            log.append(e).await.unwrap();
        }
        drop(log);
        (dir, path, s)
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(path: &Path, l: &[String]) {
        let mut t = l.join("\n");
        if !l.is_empty() {
            t.push('\n');
        }
        std::fs::write(path, t).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn every_batch_is_sealed_and_the_seal_verifies() {
        let (_d, path, s) = signed_log(10).await;
        let head = verify_with(&path, &keyed(&s)).unwrap();
        assert_eq!(
            head.records, 20,
            "each request is followed by its checkpoint"
        );
        assert_eq!(head.checkpoint, 10);
        assert_eq!(head.sealed_through, 20);
        // Reopened: numbering and sealing continue.
        let (log, rep) = AuditLog::open_with(&path, Some(Arc::clone(&s))).unwrap();
        assert!(rep.alerts.is_empty());
        assert_eq!(log.append(entry("x")).await.unwrap(), 21);
        assert_eq!(log.head().checkpoint, 11);
        drop(log);
        assert_eq!(verify_with(&path, &keyed(&s)).unwrap().checkpoint, 11);
        // Another key does not verify it.
        let other = signer();
        assert_eq!(
            verify_with(&path, &keyed(&other)).unwrap_err(),
            VerifyError::BadCheckpoint { line: 2 }
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tail_tampering_is_detected() {
        let (_d, path, s) = signed_log(40).await;
        let good = lines(&path);
        let head = verify_with(&path, &keyed(&s)).unwrap();
        let anchor = Anchor {
            seq: head.records,
            hash: head.last_hash.clone(),
        };

        // One byte of the last request record changed.
        let mut l = good.clone();
        let i = l.len() - 2;
        l[i] = l[i].replacen("DescribeHost", "DescribeHosT", 1);
        write_lines(&path, &l);
        assert!(verify_with(&path, &keyed(&s)).is_err());
        // One byte of the last line (the checkpoint) changed.
        let mut l = good.clone();
        let i = l.len() - 1;
        l[i] = l[i].replacen("\"number\":40", "\"number\":41", 1);
        write_lines(&path, &l);
        assert!(matches!(
            verify_with(&path, &keyed(&s)).unwrap_err(),
            VerifyError::BadCheckpoint { .. }
        ));

        // The last record deleted: an unsealed tail.
        write_lines(&path, &good[..good.len() - 1]);
        assert!(matches!(
            verify_with(&path, &keyed(&s)).unwrap_err(),
            VerifyError::UnsealedTail { .. }
        ));
        // The last 50 records deleted, ending on a checkpoint: the signatures alone cannot tell,
        // the anchor a verifier kept does.
        write_lines(&path, &good[..good.len() - 50]);
        assert!(verify_with(&path, &keyed(&s)).is_ok());
        let anchored = VerifyOptions {
            anchor: Some(anchor.clone()),
            ..keyed(&s)
        };
        assert!(matches!(
            verify_with(&path, &anchored).unwrap_err(),
            VerifyError::Truncated {
                have: 30,
                want: 80,
                ..
            }
        ));
        let numbered = VerifyOptions {
            min_checkpoint: Some(40),
            ..keyed(&s)
        };
        assert!(matches!(
            verify_with(&path, &numbered).unwrap_err(),
            VerifyError::RolledBack {
                have: 15,
                want: 40,
                ..
            }
        ));

        // Rewritten from a middle record on: a deny flipped to allow and every later hash
        // recomputed, checkpoints kept (their signatures cannot be redone) …
        let mut l = good.clone();
        let mut prev = line_hash(l[20].as_bytes());
        for line in l.iter_mut().skip(21) {
            let mut rec: AuditRecord = serde_json::from_str(line).unwrap();
            if rec.entry.decision == Decision::Deny {
                rec.entry.decision = Decision::Allow;
                rec.entry.code = "ok".into();
            }
            rec.prev = prev.clone();
            *line = serde_json::to_string(&rec).unwrap();
            prev = line_hash(line.as_bytes());
        }
        write_lines(&path, &l);
        assert!(verify(&path).is_ok(), "the bare chain is consistent again");
        assert!(matches!(
            verify_with(&path, &keyed(&s)).unwrap_err(),
            VerifyError::BadCheckpoint { .. }
        ));
        // … or dropped (and the sequence renumbered): an unsealed tail.
        let mut out: Vec<String> = good[..22].to_vec();
        let mut prev = line_hash(out[21].as_bytes());
        let mut seq = 23;
        for line in good.iter().skip(22) {
            let mut rec: AuditRecord = serde_json::from_str(line).unwrap();
            if rec.checkpoint.is_some() {
                continue;
            }
            rec.entry.decision = Decision::Allow;
            rec.seq = seq;
            rec.prev = prev.clone();
            let t = serde_json::to_string(&rec).unwrap();
            prev = line_hash(t.as_bytes());
            out.push(t);
            seq += 1;
        }
        write_lines(&path, &out);
        assert!(verify(&path).is_ok());
        assert!(matches!(
            verify_with(&path, &keyed(&s)).unwrap_err(),
            VerifyError::UnsealedTail { line: 23 }
        ));
        // And against the anchor, the rewrite is a mismatch.
        let mut l = good.clone();
        l[4] = l[4].replacen("DescribeHost", "RebootHost", 1);
        write_lines(&path, &l);
        let a = VerifyOptions {
            anchor: Some(Anchor {
                seq: 5,
                hash: line_hash(good[4].as_bytes()),
            }),
            ..VerifyOptions::default()
        };
        assert_eq!(
            verify_with(&path, &a).unwrap_err(),
            VerifyError::AnchorMismatch { line: 5 }
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_torn_acknowledged_record_is_recorded_not_dropped() {
        let (_d, path, s) = signed_log(3).await;
        let good = lines(&path);
        // Cut the last acknowledged batch (request + checkpoint) in half.
        let mut text = good[..good.len() - 2].join("\n");
        text.push('\n');
        text.push_str(&good[good.len() - 2][..40]);
        std::fs::write(&path, &text).unwrap();
        let (log, rep) = AuditLog::open_with(&path, Some(Arc::clone(&s))).unwrap();
        assert!(rep.torn_bytes_removed > 0);
        assert_eq!(rep.alerts, vec!["audit_torn_tail".to_string()]);
        drop(log);
        let recs: Vec<AuditRecord> = lines(&path)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let alert = recs
            .iter()
            .find(|r| r.entry.op == "audit_torn_tail")
            .expect("the cut is on record");
        assert_eq!(alert.entry.kind, EntryKind::Alert);
        assert!(
            alert.entry.code.contains("cut 40 bytes"),
            "{}",
            alert.entry.code
        );
        assert!(verify_with(&path, &keyed(&s)).is_ok());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn older_logs_verify_and_are_sealed_on_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, _) = AuditLog::open(&path).unwrap();
        for _ in 0..3 {
            log.append(entry("DescribeHost")).await.unwrap();
        }
        drop(log);
        assert!(!std::fs::read_to_string(&path)
            .unwrap()
            .contains("checkpoint\":"));
        assert_eq!(verify(&path).unwrap().records, 3);
        let s = signer();
        let (log, rep) = AuditLog::open_with(&path, Some(Arc::clone(&s))).unwrap();
        assert!(
            rep.alerts.is_empty(),
            "no checkpoint before: an upgrade, not an alert"
        );
        log.append(entry("x")).await.unwrap();
        drop(log);
        let h = verify_with(&path, &keyed(&s)).unwrap();
        assert_eq!((h.records, h.checkpoint), (5, 1));
    }

    #[test]
    fn record_ref_encodes_like_the_record() {
        let cp = Checkpoint {
            number: 7,
            signer: "ab".into(),
            sig: "cd".into(),
        };
        let mut e = entry("Describe\"Host\n");
        e.token_id = Some("t-1".into());
        for checkpoint in [None, Some(&cp)] {
            let owned = AuditRecord {
                seq: 3,
                time_ms: 99,
                prev: GENESIS_HASH.into(),
                entry: e.clone(),
                checkpoint: checkpoint.cloned(),
            };
            let mut want = serde_json::to_vec(&owned).unwrap();
            let hash = line_hash(&want);
            want.push(b'\n');
            let mut buf = b"earlier".to_vec();
            let got = encode_line(
                &mut buf,
                &RecordRef {
                    seq: 3,
                    time_ms: 99,
                    prev: GENESIS_HASH,
                    entry: &e,
                    checkpoint,
                },
            )
            .unwrap();
            assert_eq!(&buf[7..], &want[..]);
            assert_eq!(hex_str(&got).unwrap(), hash);
        }
    }

    /// Drops `log` (its last handle) and waits for the writer thread to finish.
    fn close(log: AuditLog) {
        let shared = Arc::clone(&log.shared);
        drop(log);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !shared.closed.load(Ordering::Acquire) {
            assert!(std::time::Instant::now() < deadline, "writer did not stop");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn prealloc(s: Option<Arc<CheckpointSigner>>) -> LogOptions {
        LogOptions {
            signer: s,
            preallocate: true,
        }
    }

    /// Many threads append at once: requests share commits (fewer batches than records), every
    /// acknowledged sequence number holds exactly the entry that was acknowledged with it, each
    /// thread's acknowledgements come in its own order, and the sealed chain verifies.
    #[test]
    fn concurrent_appends_share_commits_and_match_their_acknowledgements() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let s = signer();
        let (log, _) = AuditLog::open_with_options(&path, prealloc(Some(Arc::clone(&s)))).unwrap();
        let threads = 8;
        let per = 150;
        let acks: Vec<Vec<(u64, String)>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    let log = log.clone();
                    sc.spawn(move || {
                        (0..per)
                            .map(|i| {
                                let mut e = entry("DescribeHost");
                                e.request_id = format!("t{t}-{i}");
                                (log.append_blocking(e).unwrap(), format!("t{t}-{i}"))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let stats = log.stats();
        let appended = u64::try_from(threads * per).unwrap();
        // One checkpoint per commit: records = appended + batches.
        assert_eq!(stats.records, appended + stats.batches);
        assert!(
            stats.batches < appended,
            "no commit was shared: {} batches for {appended} records",
            stats.batches
        );
        // The file is read while the writer still holds it: preallocated NUL space at its end.
        let len = std::fs::metadata(&path).unwrap().len();
        let head = verify_with(&path, &keyed(&s)).unwrap();
        assert!(len > head.bytes, "no preallocated space");
        assert_eq!(head.records, stats.records);
        let recs: Vec<AuditRecord> = read_after(&path, 0, usize::MAX)
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mut seen = std::collections::HashSet::new();
        for thread in &acks {
            for w in thread.windows(2) {
                assert!(w[0].0 < w[1].0, "a thread's acknowledgements out of order");
            }
            for (seq, id) in thread {
                assert!(
                    seen.insert(*seq),
                    "sequence number {seq} acknowledged twice"
                );
                let rec = &recs[usize::try_from(*seq - 1).unwrap()];
                assert_eq!(rec.seq, *seq);
                assert_eq!(&rec.entry.request_id, id);
            }
        }
        // A clean close cuts the preallocated space: the file is the records alone.
        close(log);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), head.bytes);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn preallocated_space_is_kept_or_cut_on_reopen_and_a_torn_record_in_it_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, _) = AuditLog::open_with_options(&path, prealloc(None)).unwrap();
        for _ in 0..3 {
            log.append(entry("a")).await.unwrap();
        }
        let bytes = verify(&path).unwrap().bytes;
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, PREALLOC_CHUNK);
        // A crash leaves the padding: what a kill -9 would leave is this file as it is now.
        let crashed = std::fs::read(&path).unwrap();
        close(log);
        std::fs::write(&path, &crashed).unwrap();
        // Reopened preallocating: the padding is kept, nothing is reported.
        let (log, rep) = AuditLog::open_with_options(&path, prealloc(None)).unwrap();
        assert_eq!((rep.records, rep.torn_bytes_removed), (3, 0));
        assert!(rep.alerts.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert_eq!(log.append(entry("b")).await.unwrap(), 4);
        close(log);
        // Reopened by a plain writer (or the CLI): the padding is cut, nothing is reported.
        std::fs::write(&path, &crashed).unwrap();
        let (log, rep) = AuditLog::open(&path).unwrap();
        assert!(rep.alerts.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes);
        close(log);
        // A record torn inside the padding: cut and recorded, the padding not counted.
        let mut torn = crashed.clone();
        let at = usize::try_from(bytes).unwrap();
        torn[at..at + 12].copy_from_slice(b"{\"seq\":4,\"ti");
        std::fs::write(&path, &torn).unwrap();
        assert_eq!(
            verify(&path).unwrap_err(),
            VerifyError::TornTail { line: 4 }
        );
        let (log, rep) = AuditLog::open_with_options(&path, prealloc(None)).unwrap();
        assert_eq!(rep.torn_bytes_removed, 12);
        assert_eq!(rep.alerts, vec!["audit_torn_tail".to_string()]);
        close(log);
        assert_eq!(verify(&path).unwrap().records, 4);
        // NUL bytes followed by anything else are not padding.
        let mut bad = crashed;
        bad.push(b'x');
        std::fs::write(&path, &bad).unwrap();
        assert!(verify(&path).is_err());
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let r = verify_reader(&b"\xff\xfe not json\n"[..]);
        assert_eq!(r.unwrap_err(), VerifyError::Malformed { line: 1 });
        let r = verify_reader(&b"{\"seq\":1}\n"[..]);
        assert_eq!(r.unwrap_err(), VerifyError::Malformed { line: 1 });
    }
}
