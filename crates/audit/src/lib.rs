//! `bulkhead-audit`: the controller's append-only, hash-chained audit log.
//!
//! One JSON record per line. Each record carries the SHA-256 (hex) of the exact bytes of the
//! previous line, so deleting, reordering or editing any record breaks the chain at that point.
//! Records are written by one writer thread that takes every entry queued since its last write,
//! writes them with one `write`, and makes them durable with one `fdatasync` (group commit).
//! An [`AuditLog::append`] call returns only once its record is on disk; if the write or the sync
//! fails the caller gets an error and must refuse the request it was about to serve (fail closed).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
            | VerifyError::TornTail { line } => *line,
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
}

fn line_hash(line: &[u8]) -> String {
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

/// Checks the whole chain. Stops at the first bad record.
pub fn verify(path: &Path) -> Result<ChainHead, VerifyError> {
    let file = File::open(path).map_err(|_| VerifyError::Io { line: 0 })?;
    verify_reader(BufReader::new(file))
}

/// Checks a chain read from any reader.
pub fn verify_reader<R: BufRead>(mut r: R) -> Result<ChainHead, VerifyError> {
    let mut prev = GENESIS_HASH.to_string();
    let mut records: u64 = 0;
    let mut bytes: u64 = 0;
    let mut buf = Vec::new();
    loop {
        let line = records + 1;
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
        let rec: AuditRecord =
            serde_json::from_slice(&buf).map_err(|_| VerifyError::Malformed { line })?;
        if rec.seq != line {
            return Err(VerifyError::BadSeq {
                line,
                got: rec.seq,
                want: line,
            });
        }
        if rec.prev != prev {
            return Err(VerifyError::BrokenLink { line });
        }
        prev = line_hash(&buf);
        records = line;
        bytes += u64::try_from(buf.len()).unwrap_or(u64::MAX) + 1;
    }
    Ok(ChainHead {
        records,
        last_hash: prev,
        bytes,
    })
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
    /// Bytes of an unterminated last line that were cut off (never acknowledged).
    pub torn_bytes_removed: u64,
}

/// Handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    path: PathBuf,
}

impl AuditLog {
    /// Opens (or creates) the log, verifies the whole chain, cuts off a torn last line, and
    /// starts the writer thread. A broken chain is an error: the controller must not start.
    pub fn open(path: &Path) -> Result<(AuditLog, OpenReport), AuditError> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let head = match verify(path) {
            Ok(h) => h,
            Err(VerifyError::TornTail { line }) => {
                // Re-verify the prefix before the torn line and cut the file there.
                let mut r = BufReader::new(File::open(path)?);
                verify_prefix(&mut r, line.saturating_sub(1))?
            }
            Err(e) => return Err(AuditError::Broken(e)),
        };
        let len = file.seek(SeekFrom::End(0))?;
        let torn = len.saturating_sub(head.bytes);
        if torn > 0 {
            tracing::warn!(
                bytes = torn,
                "cutting torn, unacknowledged tail off the audit log"
            );
            file.set_len(head.bytes)?;
            file.sync_all()?;
        }
        let shared = Arc::new(Shared::default());
        shared.records.store(head.records, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel::<Job>();
        let writer = Writer {
            file,
            good_len: head.bytes,
            next_seq: head.records + 1,
            prev: head.last_hash,
            shared: Arc::clone(&shared),
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok((
            AuditLog {
                tx,
                shared,
                path: path.to_path_buf(),
            },
            OpenReport {
                records: head.records,
                torn_bytes_removed: torn,
            },
        ))
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

fn verify_prefix<R: BufRead>(r: &mut R, lines: u64) -> Result<ChainHead, AuditError> {
    let mut prefix = Vec::new();
    let mut buf = Vec::new();
    for _ in 0..lines {
        match read_line(r, &mut buf)? {
            Some(true) => {
                prefix.extend_from_slice(&buf);
                prefix.push(b'\n');
            }
            _ => break,
        }
    }
    Ok(verify_reader(&prefix[..])?)
}

struct Writer {
    file: File,
    good_len: u64,
    next_seq: u64,
    prev: String,
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
        self.prev = prev;
        let n = u64::try_from(batch.len()).unwrap_or(0);
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
        assert_eq!(log.append(entry("b")).await.unwrap(), 2);
        assert_eq!(verify(&path).unwrap().records, 2);
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let r = verify_reader(&b"\xff\xfe not json\n"[..]);
        assert_eq!(r.unwrap_err(), VerifyError::Malformed { line: 1 });
        let r = verify_reader(&b"{\"seq\":1}\n"[..]);
        assert_eq!(r.unwrap_err(), VerifyError::Malformed { line: 1 });
    }
}
