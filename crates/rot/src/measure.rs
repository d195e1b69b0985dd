//! Measured start and its event log.
//!
//! Before any Bulkhead service starts, the launcher extends into one SHA-384 PCR, in this order:
//!
//! 1. the environment: `SHA-384("bulkhead environment v1\0" || name)`, so that an identity sealed
//!    and enrolled in `staging` can never be presented as `production`;
//! 2. every artefact of the release in manifest order (binaries, configuration, policy files):
//!    `SHA-384(file bytes)`.
//!
//! Each extension is one line of the event log, JSON lines (one object per line, `\n`-terminated):
//!
//! ```text
//! {"seq":0,"pcr":23,"kind":"environment","name":"staging","sha384":"<96 hex>"}
//! {"seq":1,"pcr":23,"kind":"binary","name":"bulkhead-controller","sha384":"<96 hex>"}
//! ```
//!
//! A verifier replays the log: `pcr = 0^48; for e in log: pcr = SHA-384(pcr || e.sha384)`, and
//! compares the result with the PCR value in a quote. [`EventLog::parse`] is the only parser of
//! this format (bounded line length and event count, strict sequence, no unknown fields).

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha384};

use crate::tpm::{extend, MeasurePcr, Sha384Digest, Tpm};
use crate::RotError;

/// Longest event-log line accepted.
pub const MAX_EVENT_LINE: usize = 1024;
/// Most events in one log.
pub const MAX_EVENTS: usize = 256;
/// Longest artefact or environment name.
pub const MAX_NAME_LEN: usize = 64;

const ENV_PREFIX: &[u8] = b"bulkhead environment v1\0";

/// What an event measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    Environment,
    Binary,
    Config,
    Policy,
    /// A component replaced while instances keep running (hypervisor live update).
    LiveUpdate,
    /// A signed release applied on the running host by `DeployRelease` (named `v<version>`,
    /// digest [`release_applied_digest`] of its manifest). Only at the end of a log.
    ReleaseApplied,
}

const RELEASE_APPLIED_PREFIX: &[u8] = b"bulkhead release-applied v1\0";

/// What a `release-applied` event extends for release `version` whose signed manifest's
/// expected PCR value is `expected_pcr` (which commits to its environment and every artefact
/// digest): `SHA-384("bulkhead release-applied v1\0" || version as 8 bytes big-endian ||
/// expected_pcr)`. A verifier that accepted the release computes the same value from the
/// manifest alone.
pub fn release_applied_digest(version: u64, expected_pcr: &Sha384Digest) -> Sha384Digest {
    let mut h = Sha384::new();
    h.update(RELEASE_APPLIED_PREFIX);
    h.update(version.to_be_bytes());
    h.update(expected_pcr);
    h.finalize().into()
}

/// The event name of release `version` applied.
pub fn release_applied_name(version: u64) -> String {
    format!("v{version}")
}

/// A deployment environment (`staging`, `production`, ...): 1-32 of `a-z0-9-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Environment(String);

impl Environment {
    pub fn parse(s: &str) -> Result<Self, RotError> {
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Environment(s.to_string()))
        } else {
            Err(RotError::Malformed(
                "environment name (want 1-32 of a-z0-9-)",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value extended for this environment.
    pub fn digest(&self) -> Sha384Digest {
        let mut h = Sha384::new();
        h.update(ENV_PREFIX);
        h.update(self.0.as_bytes());
        h.finalize().into()
    }
}

impl std::fmt::Display for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Environment {
    type Error = RotError;
    fn try_from(s: String) -> Result<Self, RotError> {
        Environment::parse(&s)
    }
}

impl From<Environment> for String {
    fn from(e: Environment) -> String {
        e.0
    }
}

/// Checks an artefact name: 1-64 of `A-Za-z0-9._-`, not starting with `.`.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME_LEN
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// One extension of the PCR.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub seq: u64,
    pub pcr: MeasurePcr,
    pub kind: EventKind,
    pub name: String,
    /// The extended digest, 96 hex characters.
    pub sha384: String,
}

impl Event {
    pub fn digest(&self) -> Result<Sha384Digest, RotError> {
        parse_sha384(&self.sha384)
    }
}

/// Parses 96 hex characters into a SHA-384 digest.
pub fn parse_sha384(s: &str) -> Result<Sha384Digest, RotError> {
    let v = hex::decode(s).map_err(|_| RotError::Malformed("sha384 hex"))?;
    Sha384Digest::try_from(v.as_slice()).map_err(|_| RotError::Malformed("sha384 length"))
}

/// Why an event log was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventLogError {
    #[error("event log line {line} is longer than {MAX_EVENT_LINE} bytes")]
    LineTooLong { line: usize },
    #[error("event log has more than {MAX_EVENTS} events")]
    TooManyEvents,
    #[error("event log line {line} is not a valid event")]
    BadEvent { line: usize },
    #[error("event log line {line} has seq {got}, want {want}")]
    BadSequence { line: usize, got: u64, want: u64 },
    #[error("event log line {line} extends PCR {got}, want {want}")]
    WrongPcr { line: usize, got: u8, want: u8 },
    #[error("event log does not start with the environment event")]
    NoEnvironment,
    #[error("environment event names {name} but its digest is not that environment's")]
    EnvironmentDigest { name: String },
    #[error("event log is empty")]
    Empty,
}

/// A checked event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLog {
    pcr: MeasurePcr,
    events: Vec<Event>,
}

impl EventLog {
    /// A log that starts with the environment event.
    pub fn new(pcr: MeasurePcr, env: &Environment) -> Self {
        let mut log = EventLog {
            pcr,
            events: Vec::new(),
        };
        log.push_digest(EventKind::Environment, env.as_str(), &env.digest());
        log
    }

    fn push_digest(&mut self, kind: EventKind, name: &str, digest: &Sha384Digest) {
        let seq = u64::try_from(self.events.len()).unwrap_or(u64::MAX);
        self.events.push(Event {
            seq,
            pcr: self.pcr,
            kind,
            name: name.to_string(),
            sha384: hex::encode(digest),
        });
    }

    pub fn pcr(&self) -> MeasurePcr {
        self.pcr
    }

    /// Records an in-place replacement (live update) extended on top of the boot measurements.
    pub fn push_live_update(&mut self, name: &str, digest: &Sha384Digest) {
        self.push_digest(EventKind::LiveUpdate, name, digest);
    }

    /// Records a release applied on the running host (after every boot measurement).
    pub fn push_release_applied(&mut self, version: u64, digest: &Sha384Digest) {
        self.push_digest(
            EventKind::ReleaseApplied,
            &release_applied_name(version),
            digest,
        );
    }

    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The environment named by the first event.
    pub fn environment(&self) -> Result<Environment, RotError> {
        let first = self.events.first().ok_or(EventLogError::Empty)?;
        Environment::parse(&first.name)
    }

    /// Replays the log into the PCR value it must have produced from a reset PCR.
    pub fn replay(&self) -> Result<Sha384Digest, RotError> {
        let mut pcr = [0u8; 48];
        for e in &self.events {
            pcr = extend(&pcr, &e.digest()?);
        }
        Ok(pcr)
    }

    /// JSON lines.
    pub fn to_jsonl(&self) -> Result<String, RotError> {
        let mut out = String::new();
        for e in &self.events {
            out.push_str(&serde_json::to_string(e).map_err(|_| RotError::Malformed("event"))?);
            out.push('\n');
        }
        Ok(out)
    }

    /// The one parser of the event-log format.
    pub fn parse(text: &str) -> Result<Self, EventLogError> {
        let mut events: Vec<Event> = Vec::new();
        let mut pcr = None;
        for (i, line) in text.lines().enumerate() {
            let lineno = i.saturating_add(1);
            if line.len() > MAX_EVENT_LINE {
                return Err(EventLogError::LineTooLong { line: lineno });
            }
            if events.len() >= MAX_EVENTS {
                return Err(EventLogError::TooManyEvents);
            }
            let e: Event =
                serde_json::from_str(line).map_err(|_| EventLogError::BadEvent { line: lineno })?;
            if !valid_name(&e.name) || parse_sha384(&e.sha384).is_err() {
                return Err(EventLogError::BadEvent { line: lineno });
            }
            let want = u64::try_from(events.len()).unwrap_or(u64::MAX);
            if e.seq != want {
                return Err(EventLogError::BadSequence {
                    line: lineno,
                    got: e.seq,
                    want,
                });
            }
            let p = *pcr.get_or_insert(e.pcr);
            if e.pcr != p {
                return Err(EventLogError::WrongPcr {
                    line: lineno,
                    got: e.pcr.index(),
                    want: p.index(),
                });
            }
            events.push(e);
        }
        let first = events.first().ok_or(EventLogError::Empty)?;
        if first.kind != EventKind::Environment {
            return Err(EventLogError::NoEnvironment);
        }
        let env = Environment::parse(&first.name).map_err(|_| EventLogError::NoEnvironment)?;
        if first.sha384 != hex::encode(env.digest()) {
            return Err(EventLogError::EnvironmentDigest {
                name: first.name.clone(),
            });
        }
        if events
            .iter()
            .skip(1)
            .any(|e| e.kind == EventKind::Environment)
        {
            return Err(EventLogError::NoEnvironment);
        }
        Ok(EventLog {
            pcr: pcr.unwrap_or(MeasurePcr::DEV),
            events,
        })
    }
}

/// One file the launcher measures before it starts anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measured {
    pub kind: EventKind,
    pub name: String,
    pub path: PathBuf,
}

/// SHA-384 of a file's bytes, streamed.
pub fn sha384_file(path: &Path) -> Result<Sha384Digest, RotError> {
    let io = |source| RotError::Io {
        path: path.into(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    sha384_read(&mut f).map(|(d, _)| d).map_err(io)
}

/// SHA-384 of everything `r` yields, streamed, and how many bytes that was. Hash through an
/// already-open descriptor (`&File`) to check exactly the file that descriptor names; bound
/// what is read with [`std::io::Read::take`].
pub fn sha384_read(r: &mut impl std::io::Read) -> std::io::Result<(Sha384Digest, u64)> {
    let mut h = Sha384::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        let Some(chunk) = buf.get(..n) else {
            return Err(std::io::ErrorKind::InvalidData.into());
        };
        if chunk.is_empty() {
            break;
        }
        total = total.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        h.update(chunk);
    }
    Ok((h.finalize().into(), total))
}

/// Measured start: extends the environment and then every item, in order, into `pcr`, and
/// returns the event log. `reset_first` resets the PCR beforehand (dev PCRs 16/23 only; a
/// production PCR starts from zero at platform reset). The PCR read back from the TPM must equal
/// the log's replay, or the start is refused.
pub fn measured_start(
    tpm: &mut Tpm,
    pcr: MeasurePcr,
    env: &Environment,
    items: &[Measured],
    reset_first: bool,
) -> Result<(EventLog, Sha384Digest), RotError> {
    let span = tracing::info_span!("measured_start", pcr = pcr.index(), env = %env);
    let _g = span.enter();
    if reset_first {
        tpm.pcr_reset(pcr)?;
    }
    let start = tpm.pcr_read(pcr)?;
    if start != [0u8; 48] {
        return Err(RotError::PcrNotFresh { pcr: pcr.index() });
    }
    let mut log = EventLog::new(pcr, env);
    tpm.pcr_extend(pcr, &env.digest())?;
    for item in items {
        if !valid_name(&item.name) {
            return Err(RotError::Malformed("artefact name"));
        }
        let d = sha384_file(&item.path)?;
        tpm.pcr_extend(pcr, &d)?;
        tracing::info!(name = %item.name, kind = ?item.kind, sha384 = %hex::encode(&d[..8]), "measured");
        log.push_digest(item.kind, &item.name, &d);
    }
    let value = tpm.pcr_read(pcr)?;
    if value != log.replay()? {
        return Err(RotError::LogMismatch);
    }
    Ok((log, value))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn log_roundtrip_and_replay() {
        let env = Environment::parse("staging").unwrap();
        let mut log = EventLog::new(MeasurePcr::DEV, &env);
        log.push_digest(EventKind::Binary, "bulkhead-controller", &[7u8; 48]);
        let text = log.to_jsonl().unwrap();
        let back = EventLog::parse(&text).unwrap();
        assert_eq!(back, log);
        let want = extend(&extend(&[0u8; 48], &env.digest()), &[7u8; 48]);
        assert_eq!(back.replay().unwrap(), want);
    }

    #[test]
    fn log_rejects_bad_input() {
        let env = Environment::parse("production").unwrap();
        let log = EventLog::new(MeasurePcr::DEV, &env);
        let text = log.to_jsonl().unwrap();
        // Lying about the environment name.
        let lie = text.replace("\"production\"", "\"staging\"");
        assert!(matches!(
            EventLog::parse(&lie),
            Err(EventLogError::EnvironmentDigest { .. })
        ));
        assert_eq!(EventLog::parse(""), Err(EventLogError::Empty));
        assert!(matches!(
            EventLog::parse("{\"seq\":1}"),
            Err(EventLogError::BadEvent { line: 1 })
        ));
        let long = "x".repeat(MAX_EVENT_LINE + 1);
        assert!(matches!(
            EventLog::parse(&long),
            Err(EventLogError::LineTooLong { .. })
        ));
        assert!(Environment::parse("Prod").is_err());
        assert!(!valid_name("../etc"));
    }
}
