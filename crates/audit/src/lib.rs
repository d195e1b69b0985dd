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

pub mod checkpoint;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use checkpoint::{Checkpoint, CheckpointKey, CheckpointSigner, KeyError};

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
    /// SHA-256 of the request body, hex.
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
        if buf.len() > MAX_LINE_BYTES {
            return Err(VerifyError::TooLong { line });
        }
        if !terminated {
            return Err(VerifyError::TornTail { line });
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

struct Job {
    entry: AuditEntry,
    reply: Option<tokio::sync::oneshot::Sender<Result<u64, AuditError>>>,
}

#[derive(Default)]
struct Shared {
    poisoned: AtomicBool,
    records: AtomicU64,
    batches: AtomicU64,
    failures: AtomicU64,
    head: std::sync::Mutex<Head>,
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
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
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
        let torn = len.saturating_sub(head.bytes);
        let mut alerts = Vec::new();
        let mut pending = Vec::new();
        if torn > 0 {
            let mut cut = Vec::new();
            let mut r = File::open(path)?;
            r.seek(SeekFrom::Start(head.bytes))?;
            r.take(torn).read_to_end(&mut cut)?;
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
        let mut writer = Writer {
            file,
            good_len: head.bytes,
            next_seq: head.records + 1,
            prev: head.last_hash,
            checkpoint: head.checkpoint,
            signer,
            shared: Arc::clone(&shared),
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
        rx.blocking_recv().map_err(|_| AuditError::WriterGone)?
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
    good_len: u64,
    next_seq: u64,
    prev: String,
    checkpoint: u64,
    signer: Option<Arc<CheckpointSigner>>,
    shared: Arc<Shared>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
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
                    for (i, job) in batch.into_iter().enumerate() {
                        if let Some(reply) = job.reply {
                            let seq = first_seq + u64::try_from(i).unwrap_or(0);
                            let _ = reply.send(Ok(seq));
                        }
                    }
                }
                Err(e) => {
                    self.shared.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, records = batch.len(), "audit write failed; refusing");
                    for job in batch {
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
    }

    /// Writes and syncs one batch; returns the first sequence number used.
    fn commit(&mut self, batch: &[Job]) -> Result<u64, AuditError> {
        let mut buf = Vec::with_capacity(batch.len() * 400);
        let mut seq = self.next_seq;
        let mut prev = self.prev.clone();
        let time_ms = now_ms();
        for job in batch {
            let rec = AuditRecord {
                seq,
                time_ms,
                prev: prev.clone(),
                entry: job.entry.clone(),
                checkpoint: None,
            };
            let line = serde_json::to_vec(&rec).map_err(|_| AuditError::Encode)?;
            prev = line_hash(&line);
            buf.extend_from_slice(&line);
            buf.push(b'\n');
            seq += 1;
        }
        // The batch's checkpoint goes out in the same write and sync: nothing is acknowledged
        // before it is sealed.
        let mut checkpoint = self.checkpoint;
        if let Some(signer) = &self.signer {
            checkpoint += 1;
            let sig = signer
                .sign(&checkpoint::message(seq, time_ms, &prev, checkpoint))
                .ok_or(AuditError::Encode)?;
            let rec = AuditRecord {
                seq,
                time_ms,
                prev: prev.clone(),
                entry: AuditEntry {
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
                },
                checkpoint: Some(Checkpoint {
                    number: checkpoint,
                    signer: signer.id().to_string(),
                    sig,
                }),
            };
            let line = serde_json::to_vec(&rec).map_err(|_| AuditError::Encode)?;
            prev = line_hash(&line);
            buf.extend_from_slice(&line);
            buf.push(b'\n');
            seq += 1;
        }
        let res = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = res {
            // Cut any partial write so the chain on disk stays intact.
            let restored = self
                .file
                .set_len(self.good_len)
                .and_then(|()| self.file.sync_all());
            if restored.is_err() {
                self.shared.poisoned.store(true, Ordering::Release);
            }
            return Err(AuditError::Io(e));
        }
        let first = self.next_seq;
        self.good_len += u64::try_from(buf.len()).unwrap_or(u64::MAX);
        self.next_seq = seq;
        self.prev = prev.clone();
        self.checkpoint = checkpoint;
        *lock(&self.shared.head) = Head {
            seq: seq - 1,
            hash: prev,
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
    fn garbage_is_malformed_not_a_panic() {
        let r = verify_reader(&b"\xff\xfe not json\n"[..]);
        assert_eq!(r.unwrap_err(), VerifyError::Malformed { line: 1 });
        let r = verify_reader(&b"{\"seq\":1}\n"[..]);
        assert_eq!(r.unwrap_err(), VerifyError::Malformed { line: 1 });
    }
}
