//! Attestation: evidence from a host, and the verifier the control plane and the KMS run before
//! they schedule work on a host or release a volume key to it.
//!
//! [`Verifier::verify`] checks, in order:
//!
//! 1. the quote parses as a `TPMS_ATTEST` of type quote;
//! 2. the host is enrolled, and enrolled **in this verifier's environment**;
//! 3. the ECDSA P-256 signature over the attest bytes verifies under the host's **enrolled** AK
//!    (a quote made by any other TPM, or altered, fails here);
//! 4. the qualifying data is a nonce this verifier issued to this host, not yet used and not
//!    older than the nonce lifetime (it is consumed: a replayed quote fails) — or, for
//!    [`Verifier::verify_for_instance`], SHA-256(that nonce || the instance id the verifier
//!    expects), so that the evidence also says which instance the host runs
//!    ([`qualifying_data`]);
//! 5. the quote covers exactly the SHA-384 measurement PCR;
//! 6. the event log parses, names this environment, and replays to the quoted PCR digest;
//! 7. the replayed value is the expected PCR value of a signed release accepted for this
//!    environment (a host with unknown measurements gets nothing) — the boot events' value,
//!    when the log ends with `release-applied` events (releases a `DeployRelease` applied on
//!    the running host, measured by its agent): then each of those must be the
//!    [`crate::measure::release_applied_digest`] of a signed release accepted here, under its
//!    own version's name, and the newest is reported as [`Attested::applied_release`]. A host
//!    that claims a release it did not apply fails step 6 (its PCR was not extended with it).
//!
//! A sealed host (issue 17: booted from the host image under measuring firmware) is enrolled
//! with [`Verifier::enroll_sealed`] and presents boot evidence instead;
//! [`Verifier::verify_boot_for_instance`] checks the same nonce rules (issued to this host,
//! bound to the instance, consumed, fresh) and then runs the one boot-chain verifier,
//! [`crate::boot::verify_boot`]: its enrolled AK, and every boot PCR exactly as its image
//! manifest and configuration disk say.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use sha2::{Digest as _, Sha256};
use tss_esapi::interface_types::structure_tags::AttestationType;
use tss_esapi::structures::{Attest, AttestInfo};
use tss_esapi::traits::UnMarshall;

use crate::measure::{Environment, EventKind, EventLog};
use crate::release::Manifest;
use crate::tpm::{AkPublic, MeasurePcr, MAX_NONCE_LEN};
use crate::RotError;

/// How long a nonce stays valid.
pub const DEFAULT_NONCE_TTL: Duration = Duration::from_secs(60);
/// Most outstanding nonces (oldest are dropped beyond this).
pub const MAX_OUTSTANDING_NONCES: usize = 4096;

// The evidence and what a quote is made over are wire types: one definition, shared with the
// agent, the controller, the control plane and the KMS.
pub use bulkhead_rot_proto::{qualifying_data, valid_instance_id, Evidence};

/// What the control plane records when it enrols a host (provisioning ceremony).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    pub host: String,
    /// The environment the host was provisioned and measured in.
    pub environment: Environment,
    pub ak: AkPublic,
    /// The 38-byte host public key file, hex: what the KMS seals volume keys to.
    pub host_public: String,
}

/// A sealed host's enrolment (see [`Verifier::enroll_sealed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedEnrollment {
    pub host: String,
    pub environment: Environment,
    /// Its attestation key, certified against its TPM's EK before it was enrolled.
    pub ak: AkPublic,
    /// Every boot PCR's exact value ([`crate::boot::ExpectedPcrs::for_host`]).
    pub expected: crate::boot::ExpectedPcrs,
    /// The 38-byte host public key file, hex: what the KMS seals volume keys to.
    pub host_public: String,
}

/// Why evidence was refused. Codes are stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    #[error("quote is malformed")]
    MalformedQuote,
    #[error("host {0} is not enrolled")]
    UnknownHost(String),
    #[error("host {host} is enrolled in {enrolled}, this verifier serves {verifier}")]
    EnvironmentMismatch {
        host: String,
        enrolled: String,
        verifier: String,
    },
    #[error("quote is not signed by host {0}'s enrolled attestation key")]
    BadSignature(String),
    #[error("nonce was not issued to this host, or was already used (replay)")]
    NonceUnknownOrReplayed,
    #[error(
        "quote is not bound to instance {0} over a nonce issued to this host (the host does not \
         run it, quoted for another instance, or the nonce is unknown or spent)"
    )]
    NotBoundToInstance(String),
    #[error("nonce expired")]
    NonceExpired,
    #[error("quote does not cover exactly the measurement PCR")]
    WrongPcrSelection,
    #[error("event log is invalid: {0}")]
    BadEventLog(String),
    #[error("event log does not replay to the quoted PCR value")]
    LogDoesNotMatchQuote,
    #[error("measurements ({pcr}) are not those of any signed release for this environment")]
    UnknownMeasurements { pcr: String },
    #[error("the host applied release {name}, which is not a signed release accepted here")]
    UnknownAppliedRelease { name: String },
    #[error("sealed host's boot chain refused: {0}")]
    BootChain(crate::boot::BootChainError),
}

impl AttestError {
    pub fn code(&self) -> &'static str {
        match self {
            AttestError::MalformedQuote => "attest_malformed",
            AttestError::UnknownHost(_) => "attest_unknown_host",
            AttestError::EnvironmentMismatch { .. } => "attest_environment_mismatch",
            AttestError::BadSignature(_) => "attest_bad_signature",
            AttestError::NonceUnknownOrReplayed => "attest_nonce_replayed",
            AttestError::NotBoundToInstance(_) => "attest_not_bound_to_instance",
            AttestError::NonceExpired => "attest_nonce_expired",
            AttestError::WrongPcrSelection => "attest_wrong_pcr_selection",
            AttestError::BadEventLog(_) => "attest_bad_event_log",
            AttestError::LogDoesNotMatchQuote => "attest_log_mismatch",
            AttestError::UnknownMeasurements { .. } => "attest_unknown_measurements",
            AttestError::UnknownAppliedRelease { .. } => "attest_unknown_applied_release",
            AttestError::BootChain(e) => e.code(),
        }
    }
}

/// A successful attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    pub host: String,
    pub release_version: u64,
    /// The newest release applied on the running host since its measured start (`None`: the
    /// host runs its boot release only).
    pub applied_release: Option<u64>,
    pub pcr_value: String,
    /// The key the KMS may seal volume keys to.
    pub host_public: String,
}

struct Outstanding {
    host: String,
    issued: Instant,
}

/// The control plane's / KMS's verifier for one environment.
pub struct Verifier {
    environment: Environment,
    pcr: MeasurePcr,
    enrolled: HashMap<String, Enrollment>,
    sealed: HashMap<String, SealedEnrollment>,
    /// Accepted expected PCR values (hex) → release version.
    releases: HashMap<String, u64>,
    /// Accepted `release-applied` digests (hex) → release version.
    applied: HashMap<String, u64>,
    nonces: HashMap<[u8; MAX_NONCE_LEN], Outstanding>,
    nonce_ttl: Duration,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("environment", &self.environment)
            .field("enrolled", &self.enrolled.len())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(environment: Environment, pcr: MeasurePcr) -> Self {
        Verifier {
            environment,
            pcr,
            enrolled: HashMap::new(),
            sealed: HashMap::new(),
            releases: HashMap::new(),
            applied: HashMap::new(),
            nonces: HashMap::new(),
            nonce_ttl: DEFAULT_NONCE_TTL,
        }
    }

    pub fn with_nonce_ttl(mut self, ttl: Duration) -> Self {
        self.nonce_ttl = ttl;
        self
    }

    pub fn environment(&self) -> &Environment {
        &self.environment
    }

    /// Records an enrolment. Enrolments from another environment are kept but always refused
    /// (so the refusal says why).
    pub fn enroll(&mut self, e: Enrollment) {
        self.enrolled.insert(e.host.clone(), e);
    }

    pub fn enrollment(&self, host: &str) -> Option<&Enrollment> {
        self.enrolled.get(host)
    }

    /// Records a sealed host's enrolment: it attests by its boot chain
    /// ([`Verifier::verify_boot_for_instance`]).
    pub fn enroll_sealed(&mut self, e: SealedEnrollment) {
        self.sealed.insert(e.host.clone(), e);
    }

    /// Whether `host` is enrolled, as a host of host processes or as a sealed host.
    pub fn is_enrolled(&self, host: &str) -> bool {
        self.enrolled.contains_key(host) || self.sealed.contains_key(host)
    }

    /// Accepts a release that was verified (signatures, expiry) by the caller. Its expected PCR
    /// (and its live-update value, if any) become acceptable measurements, if it is for this
    /// verifier's environment.
    pub fn accept_release(&mut self, m: &Manifest) {
        if m.environment != self.environment {
            return;
        }
        self.releases.insert(m.expected_pcr.clone(), m.version);
        if let Ok(pcr) = m.expected_pcr_value() {
            let d = crate::measure::release_applied_digest(m.version, &pcr);
            self.applied.insert(hex::encode(d), m.version);
        }
        if let Some(lu) = &m.live_update {
            self.releases
                .insert(lu.expected_pcr_after.clone(), m.version);
        }
    }

    /// Stops accepting a release's measurements (e.g. after a rollback or a recall).
    pub fn retire_release(&mut self, m: &Manifest) {
        self.releases.remove(&m.expected_pcr);
        if let Ok(pcr) = m.expected_pcr_value() {
            let d = crate::measure::release_applied_digest(m.version, &pcr);
            self.applied.remove(&hex::encode(d));
        }
    }

    /// A fresh 32-byte nonce for `host`.
    pub fn challenge(&mut self, host: &str) -> Result<[u8; MAX_NONCE_LEN], RotError> {
        let mut n = [0u8; MAX_NONCE_LEN];
        bulkhead_sealing::fill_random(&mut n)?;
        if self.nonces.len() >= MAX_OUTSTANDING_NONCES {
            let ttl = self.nonce_ttl;
            self.nonces.retain(|_, o| o.issued.elapsed() < ttl);
        }
        if self.nonces.len() >= MAX_OUTSTANDING_NONCES {
            return Err(RotError::Malformed("too many outstanding nonces"));
        }
        self.nonces.insert(
            n,
            Outstanding {
                host: host.to_string(),
                issued: Instant::now(),
            },
        );
        Ok(n)
    }

    /// Full check of `evidence`; see the module documentation for the order.
    pub fn verify(&mut self, evidence: &Evidence) -> Result<Attested, AttestError> {
        self.verify_bound(evidence, None)
    }

    /// As [`Verifier::verify`], and the quote must be bound to `instance`: its qualifying data
    /// is SHA-256(nonce || instance) for a nonce this verifier issued to the host. Evidence the
    /// host quoted for another instance, or unbound, is refused.
    pub fn verify_for_instance(
        &mut self,
        evidence: &Evidence,
        instance: &str,
    ) -> Result<Attested, AttestError> {
        self.verify_bound(evidence, Some(instance))
    }

    fn verify_bound(
        &mut self,
        evidence: &Evidence,
        instance: Option<&str>,
    ) -> Result<Attested, AttestError> {
        let attest_raw =
            hex::decode(&evidence.quote.attest).map_err(|_| AttestError::MalformedQuote)?;
        let sig =
            hex::decode(&evidence.quote.signature).map_err(|_| AttestError::MalformedQuote)?;
        let attest = Attest::unmarshall(&attest_raw).map_err(|_| AttestError::MalformedQuote)?;
        if attest.attestation_type() != AttestationType::Quote {
            return Err(AttestError::MalformedQuote);
        }
        let enrolled = self
            .enrolled
            .get(&evidence.host)
            .ok_or_else(|| AttestError::UnknownHost(evidence.host.clone()))?;
        if enrolled.environment != self.environment {
            return Err(AttestError::EnvironmentMismatch {
                host: evidence.host.clone(),
                enrolled: enrolled.environment.to_string(),
                verifier: self.environment.to_string(),
            });
        }
        let ak = enrolled
            .ak
            .sec1()
            .map_err(|_| AttestError::BadSignature(evidence.host.clone()))?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &ak)
            .verify(&attest_raw, &sig)
            .map_err(|_| AttestError::BadSignature(evidence.host.clone()))?;
        let host_public = enrolled.host_public.clone();

        let qualifying: [u8; MAX_NONCE_LEN] = attest
            .extra_data()
            .value()
            .try_into()
            .map_err(|_| AttestError::NonceUnknownOrReplayed)?;
        let nonce = match instance {
            None => qualifying,
            // The nonce this verifier issued to the host for which the qualifying data is the
            // binding to `id` (a host has few outstanding nonces).
            Some(id) => self
                .nonces
                .iter()
                .filter(|(_, o)| o.host == evidence.host)
                .map(|(n, _)| *n)
                .find(|n| qualifying_data(n, Some(id)) == qualifying)
                .ok_or_else(|| AttestError::NotBoundToInstance(id.to_string()))?,
        };
        let out = self
            .nonces
            .remove(&nonce)
            .ok_or(AttestError::NonceUnknownOrReplayed)?;
        if out.host != evidence.host {
            return Err(AttestError::NonceUnknownOrReplayed);
        }
        if out.issued.elapsed() > self.nonce_ttl {
            return Err(AttestError::NonceExpired);
        }

        let AttestInfo::Quote { info } = attest.attested() else {
            return Err(AttestError::MalformedQuote);
        };
        let want_sel = self
            .pcr
            .selection()
            .map_err(|_| AttestError::WrongPcrSelection)?;
        if info.pcr_selection() != &want_sel {
            return Err(AttestError::WrongPcrSelection);
        }
        let log = EventLog::parse(&evidence.event_log)
            .map_err(|e| AttestError::BadEventLog(e.to_string()))?;
        if log.pcr() != self.pcr {
            return Err(AttestError::BadEventLog("wrong PCR".into()));
        }
        let log_env = log
            .environment()
            .map_err(|e| AttestError::BadEventLog(e.to_string()))?;
        if log_env != self.environment {
            return Err(AttestError::EnvironmentMismatch {
                host: evidence.host.clone(),
                enrolled: log_env.to_string(),
                verifier: self.environment.to_string(),
            });
        }
        let value = log
            .replay()
            .map_err(|e| AttestError::BadEventLog(e.to_string()))?;
        if info.pcr_digest().value() != &Sha256::digest(value)[..] {
            return Err(AttestError::LogDoesNotMatchQuote);
        }
        let pcr_hex = hex::encode(value);
        // The boot events, then only the releases applied since (each one signed and accepted).
        let events = log.events();
        let split = events
            .iter()
            .position(|e| e.kind == EventKind::ReleaseApplied)
            .unwrap_or(events.len());
        let (boot, applied) = events.split_at(split);
        let mut boot_value = [0u8; 48];
        for e in boot {
            let d = e
                .digest()
                .map_err(|e| AttestError::BadEventLog(e.to_string()))?;
            boot_value = crate::tpm::extend(&boot_value, &d);
        }
        let boot_hex = hex::encode(boot_value);
        let version = *self
            .releases
            .get(&boot_hex)
            .ok_or(AttestError::UnknownMeasurements { pcr: boot_hex })?;
        let mut applied_release = None;
        for e in applied {
            if e.kind != EventKind::ReleaseApplied {
                return Err(AttestError::BadEventLog(
                    "a boot event after a release-applied event".into(),
                ));
            }
            let v = self
                .applied
                .get(&e.sha384)
                .copied()
                .filter(|v| crate::measure::release_applied_name(*v) == e.name)
                .ok_or_else(|| AttestError::UnknownAppliedRelease {
                    name: e.name.clone(),
                })?;
            applied_release = Some(v);
        }
        tracing::info!(host = %evidence.host, version, ?applied_release, "host attested");
        Ok(Attested {
            host: evidence.host.clone(),
            release_version: version,
            applied_release,
            pcr_value: pcr_hex,
            host_public,
        })
    }
}

impl Verifier {
    /// A sealed host's boot evidence, bound to `instance`: the quote's qualifying data must be
    /// SHA-256(nonce || instance) for a nonce this verifier issued to the host (consumed here,
    /// and no older than the nonce lifetime), and [`crate::boot::verify_boot`] must accept it
    /// under the host's enrolled AK against every boot PCR's exact expected value.
    pub fn verify_boot_for_instance(
        &mut self,
        evidence: &crate::boot::BootEvidence,
        instance: &str,
    ) -> Result<Attested, AttestError> {
        use crate::boot::{verify_boot, BootChainError};
        let enrolled = self
            .sealed
            .get(&evidence.host)
            .ok_or_else(|| AttestError::UnknownHost(evidence.host.clone()))?;
        if enrolled.environment != self.environment {
            return Err(AttestError::EnvironmentMismatch {
                host: evidence.host.clone(),
                enrolled: enrolled.environment.to_string(),
                verifier: self.environment.to_string(),
            });
        }
        // The host has few outstanding nonces: the one whose binding the quote covers is found
        // by the verifier itself (every other check of it runs first and ends the search).
        let candidates: Vec<[u8; MAX_NONCE_LEN]> = self
            .nonces
            .iter()
            .filter(|(_, o)| o.host == evidence.host)
            .map(|(n, _)| *n)
            .collect();
        for nonce in candidates {
            let bound = qualifying_data(&nonce, Some(instance));
            match verify_boot(evidence, &enrolled.ak, &bound, &enrolled.expected) {
                Err(BootChainError::NonceMismatch) => continue,
                verdict => {
                    let out = self
                        .nonces
                        .remove(&nonce)
                        .ok_or(AttestError::NonceUnknownOrReplayed)?;
                    if out.issued.elapsed() > self.nonce_ttl {
                        return Err(AttestError::NonceExpired);
                    }
                    verdict.map_err(AttestError::BootChain)?;
                    tracing::info!(host = %evidence.host, instance, "sealed host's boot chain attested");
                    return Ok(Attested {
                        host: evidence.host.clone(),
                        release_version: 0,
                        applied_release: None,
                        pcr_value: "sealed-image".to_string(),
                        host_public: enrolled.host_public.clone(),
                    });
                }
            }
        }
        Err(AttestError::NotBoundToInstance(instance.to_string()))
    }
}

/// The KMS's rule: a volume key is sealed to a host's key only after that host's fresh evidence
/// verified. Returns the sealed blob for the block card.
pub fn release_volume_key(
    verifier: &mut Verifier,
    evidence: &Evidence,
    volume_id: &str,
    key: &[u8; bulkhead_sealing::VOLUME_KEY_LEN],
) -> Result<[u8; bulkhead_sealing::SEALED_BLOB_LEN], RotError> {
    let ok = verifier.verify(evidence)?;
    let raw = hex::decode(&ok.host_public).map_err(|_| RotError::Malformed("host public key"))?;
    let pk = bulkhead_sealing::HostPublicKey::from_file_bytes(&raw)?;
    Ok(bulkhead_sealing::seal_volume_key(&pk, volume_id, key)?)
}
