//! The controller's link to the host's attestation agent (`bulkhead-launcher serve`, see
//! `bulkhead_rot::agent`): one unix-socket connection made at start-up, before the sandbox forbids
//! `connect`, over which `POST /v1/host/attest` is relayed.
//!
//! The controller holds no TPM key and cannot make a quote itself; it passes the verifier's nonce
//! to the agent and the agent's evidence back, unmodified. The verifier (KMS, control plane) is
//! where the evidence is checked. If the link breaks, attestation stays unavailable until the
//! controller restarts (it may not reconnect from inside its sandbox), and the KMS then releases
//! no volume key to this host.
//!
//! A quote may be bound to an instance (qualifying data = SHA-256(nonce || instance id), made
//! by the agent): the controller asks for that only for an instance its backend runs, so the KMS,
//! which recomputes the binding from the customer's signed AttachVolume, releases a volume key
//! only to the host that runs the instance the customer named.
//!
//! A request may also carry a credential for the host's TPM to activate (a sealed host's AK
//! being endorsed, see `bulkhead_rot::endorsement`): relayed as is; the agent checks it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use bulkhead_rot_proto::{
    parse_reply, AgentCall, AgentRequest, AppliedRelease, HostEvidence, ReplyError,
    MAX_EVIDENCE_BYTES,
};

/// How long one quote may take (a TPM quote is tens of milliseconds; swtpm similar).
pub const QUOTE_TIMEOUT: Duration = Duration::from_secs(15);

/// Why no evidence came back. Codes are stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    #[error("this host has no attestation agent, or the link to it is broken")]
    Unavailable,
    #[error("the attestation agent refused or failed ({0})")]
    Agent(String),
}

impl AttestError {
    pub fn code(&self) -> &'static str {
        match self {
            AttestError::Unavailable => "attestation_unavailable",
            AttestError::Agent(_) => "attestation_failed",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            AttestError::Unavailable => 503,
            AttestError::Agent(_) => 502,
        }
    }
}

struct Link {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// The connected agent (or none).
#[derive(Default)]
pub struct AgentLink {
    link: Mutex<Option<Link>>,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink").finish_non_exhaustive()
    }
}

impl AgentLink {
    /// Connects to the agent's socket. Call before the sandbox is installed.
    pub fn connect(path: &Path) -> std::io::Result<AgentLink> {
        Self::from_stream(UnixStream::connect(path)?)
    }

    fn from_stream(s: UnixStream) -> std::io::Result<AgentLink> {
        s.set_read_timeout(Some(QUOTE_TIMEOUT))?;
        s.set_write_timeout(Some(QUOTE_TIMEOUT))?;
        let writer = s.try_clone()?;
        Ok(AgentLink {
            link: Mutex::new(Some(Link {
                reader: BufReader::new(s),
                writer,
            })),
        })
    }

    /// No agent: every attestation request is refused as unavailable.
    pub fn none() -> AgentLink {
        AgentLink::default()
    }

    pub fn is_connected(&self) -> bool {
        self.link.lock().map(|g| g.is_some()).unwrap_or(false)
    }

    /// One quote over `nonce`, bound to `instance` if given (the caller has checked that this
    /// host runs it). Returns the agent's evidence, unmodified.
    pub fn quote(
        &self,
        nonce: &[u8; 32],
        instance: Option<&str>,
    ) -> Result<HostEvidence, AttestError> {
        self.call(&AgentCall {
            nonce: *nonce,
            instance: instance.map(str::to_string),
            credential: None,
            release_applied: None,
        })
    }

    /// Measures a release this host applied (`DeployRelease`): the agent extends the
    /// measurement PCR with a typed `release-applied` event for it, then quotes; the quote
    /// (over a nonce derived from the digest, never sent to a verifier) is not kept. From then
    /// on every quote of this host shows the release, and a verifier accepts it only if it
    /// accepted the same signed release.
    pub fn measure_release(&self, release: AppliedRelease) -> Result<(), AttestError> {
        let mut nonce = [0u8; 32];
        nonce.copy_from_slice(&release.manifest_sha384[..32]);
        self.call(&AgentCall {
            nonce,
            instance: None,
            credential: None,
            release_applied: Some(release),
        })
        .map(|_| ())
    }

    /// One request to the agent (a quote, bound to `call.instance` if given, after the TPM
    /// activated `call.credential` if given). Returns the agent's evidence, unmodified.
    pub fn call(&self, call: &AgentCall) -> Result<HostEvidence, AttestError> {
        let mut guard = match self.link.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let link = guard.as_mut().ok_or(AttestError::Unavailable)?;
        let result = exchange(link, call);
        if matches!(result, Err(AttestError::Unavailable)) {
            // A timed-out or broken link may be out of step with the agent: drop it.
            tracing::error!("attestation agent link broken; attestation unavailable until restart");
            *guard = None;
        }
        result
    }
}

fn exchange(link: &mut Link, call: &AgentCall) -> Result<HostEvidence, AttestError> {
    let mut req = AgentRequest::encode_call(call);
    req.push('\n');
    link.writer
        .write_all(req.as_bytes())
        .map_err(|_| AttestError::Unavailable)?;
    let mut line = Vec::new();
    let limit = u64::try_from(MAX_EVIDENCE_BYTES).unwrap_or(u64::MAX) + 1;
    let n = link
        .reader
        .by_ref()
        .take(limit)
        .read_until(b'\n', &mut line)
        .map_err(|_| AttestError::Unavailable)?;
    if n == 0 || line.last() != Some(&b'\n') {
        return Err(AttestError::Unavailable);
    }
    line.pop();
    parse_reply(&line).map_err(|e| match e {
        ReplyError::Malformed => AttestError::Agent("bad_reply".into()),
        ReplyError::Refused(code) => AttestError::Agent(code),
    })
}
