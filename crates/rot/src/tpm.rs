//! The host's TPM 2.0, through `tss-esapi`: PCR extend/read/reset, the storage root key, the
//! attestation key, PCR-policy sealing and quotes.
//!
//! * Measurements go into one PCR ([`MeasurePcr`]) of the SHA-384 bank.
//! * Storage root key (SRK): an ECC P-256 restricted decryption primary key in the owner
//!   hierarchy, re-derived from the owner seed on every start (never stored).
//! * Attestation key (AK): an ECC P-256 restricted ECDSA-SHA256 signing primary key in the owner
//!   hierarchy, also re-derived. `TPM2_Clear` (re-provisioning) changes the owner seed, so both
//!   keys change and every sealed object becomes unloadable: a host can be returned to a known
//!   state but never keeps its old identity.
//! * Sealed objects: a keyed-hash object with no user auth whose `authPolicy` is
//!   `PolicyPCR(SHA-384:[pcr], expected value)`, computed in software ([`pcr_policy_digest`]) so
//!   that a host can re-seal to the PCR value of a *future* signed release before it restarts.

use std::convert::TryFrom;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha384};
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, ObjectHandle, PcrHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::PolicySession;
use tss_esapi::structures::{
    Attest, Data, Digest, DigestValues, EccPoint, EccScheme, HashScheme,
    KeyDerivationFunctionScheme, KeyedHashScheme, PcrSelectionList, PcrSelectionListBuilder,
    PcrSlot, Private, Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters,
    SensitiveData, Signature, SignatureScheme, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;

use crate::RotError;

/// SHA-384 digest length: the PCR bank and every measurement.
pub const SHA384_LEN: usize = 48;
/// A SHA-384 PCR value or measurement.
pub type Sha384Digest = [u8; SHA384_LEN];
/// Largest secret a keyed-hash sealed object holds (`MAX_SYM_DATA`).
pub const MAX_SEALED_LEN: usize = 128;
/// Longest nonce (qualifying data) a quote carries.
pub use bulkhead_rot_proto::MAX_NONCE_LEN;

/// The PCR that Bulkhead's measured start extends, in the SHA-384 bank.
///
/// Dev and tests use PCR 23 (application support; resettable from locality 0, so a test can
/// re-run a measured start on one emulator). Production should use a PCR in 8..=15 that its boot
/// chain leaves alone and that cannot be reset without a platform reset; see docs/rot.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct MeasurePcr(u8);

impl MeasurePcr {
    /// PCR 23, the dev/test default.
    pub const DEV: MeasurePcr = MeasurePcr(23);

    pub fn new(index: u8) -> Result<Self, RotError> {
        if index > 23 {
            return Err(RotError::BadPcr(index));
        }
        Ok(MeasurePcr(index))
    }

    pub fn index(self) -> u8 {
        self.0
    }

    fn slot(self) -> Result<PcrSlot, RotError> {
        PcrSlot::try_from(1u32 << self.0).map_err(RotError::Tpm)
    }

    fn handle(self) -> PcrHandle {
        const H: [PcrHandle; 24] = [
            PcrHandle::Pcr0,
            PcrHandle::Pcr1,
            PcrHandle::Pcr2,
            PcrHandle::Pcr3,
            PcrHandle::Pcr4,
            PcrHandle::Pcr5,
            PcrHandle::Pcr6,
            PcrHandle::Pcr7,
            PcrHandle::Pcr8,
            PcrHandle::Pcr9,
            PcrHandle::Pcr10,
            PcrHandle::Pcr11,
            PcrHandle::Pcr12,
            PcrHandle::Pcr13,
            PcrHandle::Pcr14,
            PcrHandle::Pcr15,
            PcrHandle::Pcr16,
            PcrHandle::Pcr17,
            PcrHandle::Pcr18,
            PcrHandle::Pcr19,
            PcrHandle::Pcr20,
            PcrHandle::Pcr21,
            PcrHandle::Pcr22,
            PcrHandle::Pcr23,
        ];
        H.get(usize::from(self.0))
            .copied()
            .unwrap_or(PcrHandle::Pcr23)
    }

    /// `PCR_SELECTION` for this PCR in the SHA-384 bank.
    pub fn selection(self) -> Result<PcrSelectionList, RotError> {
        PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha384, &[self.slot()?])
            .build()
            .map_err(RotError::Tpm)
    }

    /// Marshalled `TPML_PCR_SELECTION` (count 1, SHA-384, 3-byte bitmap).
    fn tpml_selection_bytes(self) -> [u8; 10] {
        let mut bitmap = [0u8; 3];
        let byte = usize::from(self.0 / 8);
        if let Some(b) = bitmap.get_mut(byte) {
            *b = 1 << (self.0 % 8);
        }
        [0, 0, 0, 1, 0x00, 0x0c, 3, bitmap[0], bitmap[1], bitmap[2]]
    }
}

impl TryFrom<u8> for MeasurePcr {
    type Error = RotError;
    fn try_from(v: u8) -> Result<Self, RotError> {
        MeasurePcr::new(v)
    }
}

impl From<MeasurePcr> for u8 {
    fn from(p: MeasurePcr) -> u8 {
        p.0
    }
}

/// `TPM2_PCR_Extend` in software: `SHA-384(old || digest)`.
pub fn extend(old: &Sha384Digest, digest: &Sha384Digest) -> Sha384Digest {
    let mut h = Sha384::new();
    h.update(old);
    h.update(digest);
    h.finalize().into()
}

/// The `authPolicy` of an object sealed with `PolicyPCR` to `pcr` holding `value`:
/// `SHA-256(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || SHA-256(value))`.
pub fn pcr_policy_digest(pcr: MeasurePcr, value: &Sha384Digest) -> [u8; 32] {
    const TPM_CC_POLICY_PCR: u32 = 0x0000_017f;
    let pcr_digest = Sha256::digest(value);
    let mut h = Sha256::new();
    h.update([0u8; 32]);
    h.update(TPM_CC_POLICY_PCR.to_be_bytes());
    h.update(pcr.tpml_selection_bytes());
    h.update(pcr_digest);
    h.finalize().into()
}

/// A sealed object as stored on disk: the TPM's `TPM2B_PUBLIC` and `TPM2B_PRIVATE` contents.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SealedBlob {
    /// Marshalled `TPMT_PUBLIC`, hex.
    pub public: String,
    /// `TPM2B_PRIVATE` buffer (encrypted by the SRK), hex.
    pub private: String,
    /// The PCR and value the policy binds (informational; the TPM enforces the policy digest).
    pub pcr: MeasurePcr,
    pub pcr_value: String,
}

pub use bulkhead_rot_proto::AkPublic;
pub use bulkhead_rot_proto::RawQuote;

/// An open connection to a TPM.
pub struct Tpm {
    ctx: Context,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm").finish_non_exhaustive()
    }
}

fn pad32(v: &[u8]) -> Result<[u8; 32], RotError> {
    if v.len() > 32 {
        return Err(RotError::Malformed("ECC parameter longer than 32 bytes"));
    }
    let mut out = [0u8; 32];
    let start = 32 - v.len();
    out[start..].copy_from_slice(v);
    Ok(out)
}

impl Tpm {
    /// Connects through a TCTI string: `swtpm:host=127.0.0.1,port=P` or `device:/dev/tpmrm0`.
    pub fn open(tcti: &str) -> Result<Self, RotError> {
        let conf = TctiNameConf::from_str(tcti).map_err(RotError::Tpm)?;
        let ctx = Context::new(conf).map_err(RotError::Tpm)?;
        Ok(Tpm { ctx })
    }

    /// Reads one PCR of the SHA-384 bank.
    pub fn pcr_read(&mut self, pcr: MeasurePcr) -> Result<Sha384Digest, RotError> {
        let (_, _, digests) = self.ctx.pcr_read(pcr.selection()?).map_err(RotError::Tpm)?;
        let d = digests
            .value()
            .first()
            .ok_or(RotError::Malformed("empty PCR read"))?;
        Sha384Digest::try_from(d.value()).map_err(|_| RotError::Malformed("PCR value length"))
    }

    /// Extends a SHA-384 digest into the PCR.
    pub fn pcr_extend(&mut self, pcr: MeasurePcr, digest: &Sha384Digest) -> Result<(), RotError> {
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha384,
            Digest::try_from(digest.as_slice()).map_err(RotError::Tpm)?,
        );
        let handle = pcr.handle();
        self.ctx
            .execute_with_nullauth_session(|ctx| ctx.pcr_extend(handle, values))
            .map_err(RotError::Tpm)
    }

    /// Resets a resettable PCR (16 or 23 from locality 0). Dev/test only.
    pub fn pcr_reset(&mut self, pcr: MeasurePcr) -> Result<(), RotError> {
        let handle = pcr.handle();
        self.ctx
            .execute_with_nullauth_session(|ctx| ctx.pcr_reset(handle))
            .map_err(RotError::Tpm)
    }

    fn srk_template() -> Result<Public, RotError> {
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_restricted(true)
            .with_decrypt(true)
            .build()
            .map_err(RotError::Tpm)?;
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                    .with_ecc_scheme(EccScheme::Null)
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_signing_key(false)
                    .with_is_decryption_key(true)
                    .with_restricted(true)
                    .build()
                    .map_err(RotError::Tpm)?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
            .map_err(RotError::Tpm)
    }

    fn ak_template() -> Result<Public, RotError> {
        Self::ak_template_with(EccPoint::default())
    }

    /// The AK template with `unique` as its public point: with the TPM's point, exactly the
    /// public area the TPM holds (what the AK's name is computed from).
    pub(crate) fn ak_template_with(unique: EccPoint) -> Result<Public, RotError> {
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_restricted(true)
            .with_sign_encrypt(true)
            .build()
            .map_err(RotError::Tpm)?;
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::Null)
                    .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_signing_key(true)
                    .with_is_decryption_key(false)
                    .with_restricted(true)
                    .build()
                    .map_err(RotError::Tpm)?,
            )
            .with_ecc_unique_identifier(unique)
            .build()
            .map_err(RotError::Tpm)
    }

    fn create_primary(&mut self, template: Public) -> Result<(KeyHandle, Public), RotError> {
        let r = self
            .ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(RotError::Tpm)?;
        Ok((r.key_handle, r.out_public))
    }

    fn flush(&mut self, key: KeyHandle) {
        if let Err(e) = self.ctx.flush_context(ObjectHandle::from(key)) {
            tracing::warn!(error = %e, "TPM flush_context failed");
        }
    }

    /// The attestation key's public half (re-derived from the owner seed).
    pub fn ak_public(&mut self) -> Result<AkPublic, RotError> {
        let (key, public) = self.create_primary(Self::ak_template()?)?;
        self.flush(key);
        ak_public_of(&public)
    }

    /// Seals `secret` (at most [`MAX_SEALED_LEN`] bytes) so that it unseals only while `pcr`
    /// holds `pcr_value`. `pcr_value` may be a future value (a signed release's).
    pub fn seal(
        &mut self,
        pcr: MeasurePcr,
        pcr_value: &Sha384Digest,
        secret: &[u8],
    ) -> Result<SealedBlob, RotError> {
        if secret.is_empty() || secret.len() > MAX_SEALED_LEN {
            return Err(RotError::Malformed("sealed secret length"));
        }
        let policy = pcr_policy_digest(pcr, pcr_value);
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_no_da(true)
            .build()
            .map_err(RotError::Tpm)?;
        let template = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_auth_policy(Digest::try_from(policy.as_slice()).map_err(RotError::Tpm)?)
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .map_err(RotError::Tpm)?;
        let data = SensitiveData::try_from(secret.to_vec()).map_err(RotError::Tpm)?;
        let (srk, _) = self.create_primary(Self::srk_template()?)?;
        let created = self.ctx.execute_with_nullauth_session(|ctx| {
            ctx.create(srk, template, None, Some(data), None, None)
        });
        self.flush(srk);
        let created = created.map_err(RotError::Tpm)?;
        Ok(SealedBlob {
            public: hex::encode(created.out_public.marshall().map_err(RotError::Tpm)?),
            private: hex::encode(created.out_private.value()),
            pcr,
            pcr_value: hex::encode(pcr_value),
        })
    }

    /// Unseals a [`SealedBlob`] under a `PolicyPCR` session. Fails (with the TPM's policy error)
    /// if the PCR does not hold the value it was sealed to.
    pub fn unseal(&mut self, blob: &SealedBlob) -> Result<zeroize::Zeroizing<Vec<u8>>, RotError> {
        let public_raw =
            hex::decode(&blob.public).map_err(|_| RotError::Malformed("sealed public"))?;
        let private_raw =
            hex::decode(&blob.private).map_err(|_| RotError::Malformed("sealed private"))?;
        let public = Public::unmarshall(&public_raw).map_err(RotError::Tpm)?;
        let private = Private::try_from(private_raw).map_err(RotError::Tpm)?;
        let selection = blob.pcr.selection()?;
        let (srk, _) = self.create_primary(Self::srk_template()?)?;
        let loaded = self
            .ctx
            .execute_with_nullauth_session(|ctx| ctx.load(srk, private, public));
        self.flush(srk);
        let object = loaded.map_err(RotError::Tpm)?;
        let result = self.unseal_loaded(object, selection);
        self.flush(object);
        result
    }

    /// A fresh policy session (SHA-256, parameter encryption with AES-128-CFB).
    fn policy_session(
        &mut self,
    ) -> Result<tss_esapi::interface_types::session_handles::AuthSession, RotError> {
        self.ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(RotError::Tpm)?
            .ok_or(RotError::Malformed("TPM returned no session"))
    }

    fn unseal_loaded(
        &mut self,
        object: KeyHandle,
        selection: PcrSelectionList,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, RotError> {
        let session = self.policy_session()?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        let result = (|| {
            self.ctx
                .tr_sess_set_attributes(session, attrs, mask)
                .map_err(RotError::Tpm)?;
            let policy = PolicySession::try_from(session).map_err(RotError::Tpm)?;
            self.ctx
                .policy_pcr(policy, Digest::default(), selection)
                .map_err(RotError::Tpm)?;
            let data = self
                .ctx
                .execute_with_session(Some(session), |ctx| ctx.unseal(ObjectHandle::from(object)))
                .map_err(RotError::UnsealRefused)?;
            Ok(zeroize::Zeroizing::new(data.value().to_vec()))
        })();
        let handle = ObjectHandle::from(tss_esapi::handles::SessionHandle::from(session));
        if let Err(e) = self.ctx.flush_context(handle) {
            tracing::debug!(error = %e, "flushing policy session");
        }
        result
    }

    /// `TPM2_Quote` over the measurement PCR with `nonce` as qualifying data, signed by the AK.
    pub fn quote(&mut self, pcr: MeasurePcr, nonce: &[u8]) -> Result<RawQuote, RotError> {
        if nonce.is_empty() || nonce.len() > MAX_NONCE_LEN {
            return Err(RotError::Malformed("nonce length"));
        }
        let data = Data::try_from(nonce.to_vec()).map_err(RotError::Tpm)?;
        let selection = pcr.selection()?;
        let (ak, _) = self.create_primary(Self::ak_template()?)?;
        let quoted = self.ctx.execute_with_nullauth_session(|ctx| {
            ctx.quote(ak, data, SignatureScheme::Null, selection)
        });
        self.flush(ak);
        let (attest, signature): (Attest, Signature) = quoted.map_err(RotError::Tpm)?;
        let sig = match signature {
            Signature::EcDsa(s) => {
                let mut rs = Vec::with_capacity(64);
                rs.extend_from_slice(&pad32(s.signature_r().value())?);
                rs.extend_from_slice(&pad32(s.signature_s().value())?);
                rs
            }
            _ => return Err(RotError::Malformed("quote signature is not ECDSA")),
        };
        Ok(RawQuote {
            attest: hex::encode(attest.marshall().map_err(RotError::Tpm)?),
            signature: hex::encode(sig),
        })
    }

    /// `TPM2_Quote` over the SHA-256 bank's PCRs `pcrs` (ascending, each 0..=23) with `nonce`
    /// as qualifying data, signed by the AK, and the quoted PCRs' values (`TPM2_PCR_Read`, in
    /// the same order) for the verifier to recompute the quote's PCR digest. The sealed host's
    /// boot chain ([`crate::boot`]).
    pub fn quote_sha256_pcrs(
        &mut self,
        pcrs: &[u8],
        nonce: &[u8],
    ) -> Result<(RawQuote, Vec<[u8; 32]>), RotError> {
        if nonce.is_empty() || nonce.len() > MAX_NONCE_LEN {
            return Err(RotError::Malformed("nonce length"));
        }
        if pcrs.is_empty() || pcrs.len() > 8 || pcrs.windows(2).any(|w| w[0] >= w[1]) {
            return Err(RotError::Malformed("PCR list"));
        }
        let slots = pcrs
            .iter()
            .map(|&p| {
                if p > 23 {
                    return Err(RotError::Malformed("PCR index"));
                }
                PcrSlot::try_from(1u32 << p).map_err(RotError::Tpm)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let selection = || {
            PcrSelectionListBuilder::new()
                .with_selection(HashingAlgorithm::Sha256, &slots)
                .build()
                .map_err(RotError::Tpm)
        };
        let data = Data::try_from(nonce.to_vec()).map_err(RotError::Tpm)?;
        let (ak, _) = self.create_primary(Self::ak_template()?)?;
        let sel = selection()?;
        let quoted = self
            .ctx
            .execute_with_nullauth_session(|ctx| ctx.quote(ak, data, SignatureScheme::Null, sel));
        self.flush(ak);
        let (attest, signature): (Attest, Signature) = quoted.map_err(RotError::Tpm)?;
        let (_, _, digests) = self.ctx.pcr_read(selection()?).map_err(RotError::Tpm)?;
        let values = digests
            .value()
            .iter()
            .map(|d| {
                <[u8; 32]>::try_from(d.value()).map_err(|_| RotError::Malformed("PCR value length"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if values.len() != pcrs.len() {
            return Err(RotError::Malformed("PCR read returned another count"));
        }
        let sig = match signature {
            Signature::EcDsa(s) => {
                let mut rs = Vec::with_capacity(64);
                rs.extend_from_slice(&pad32(s.signature_r().value())?);
                rs.extend_from_slice(&pad32(s.signature_s().value())?);
                rs
            }
            _ => return Err(RotError::Malformed("quote signature is not ECDSA")),
        };
        Ok((
            RawQuote {
                attest: hex::encode(attest.marshall().map_err(RotError::Tpm)?),
                signature: hex::encode(sig),
            },
            values,
        ))
    }

    /// The RSA 2048 EK certificate (DER) the manufacturer stored in NV index `0x01c00002`.
    pub fn ek_certificate(&mut self) -> Result<Vec<u8>, crate::endorsement::EndorsementError> {
        use tss_esapi::abstraction::ek::retrieve_ek_pubcert;
        use tss_esapi::abstraction::AsymmetricAlgorithmSelection;
        use tss_esapi::interface_types::key_bits::RsaKeyBits;
        retrieve_ek_pubcert(
            &mut self.ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        )
        .map_err(|_| crate::endorsement::EndorsementError::NoEkCertificate)
    }

    /// The AK's TPM name, as the TPM computes it (`nameAlg || H(TPMT_PUBLIC)`).
    pub fn ak_name(&mut self) -> Result<Vec<u8>, RotError> {
        let (ak, _) = self.create_primary(Self::ak_template()?)?;
        let read = self.ctx.read_public(ak);
        self.flush(ak);
        let (_, name, _) = read.map_err(RotError::Tpm)?;
        Ok(name.value().to_vec())
    }

    /// `TPM2_ActivateCredential` for the AK with the RSA 2048 EK (default template): returns the
    /// secret a verifier wrapped with [`crate::endorsement::make_credential`]. The TPM refuses
    /// unless it holds that EK's private key and the credential names this TPM's AK.
    pub fn activate_credential(
        &mut self,
        challenge: &crate::endorsement::CredentialChallenge,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, crate::endorsement::EndorsementError> {
        use crate::endorsement::EndorsementError;
        use tss_esapi::abstraction::ek::create_ek_object_2;
        use tss_esapi::abstraction::AsymmetricAlgorithmSelection;
        use tss_esapi::handles::{AuthHandle, SessionHandle};
        use tss_esapi::interface_types::key_bits::RsaKeyBits;
        use tss_esapi::interface_types::session_handles::AuthSession;
        use tss_esapi::structures::{EncryptedSecret, IdObject};

        let id_object = hex::decode(&challenge.id_object)
            .ok()
            .and_then(|b| IdObject::try_from(b).ok())
            .ok_or(EndorsementError::Malformed("credential blob"))?;
        let secret = hex::decode(&challenge.encrypted_secret)
            .ok()
            .and_then(|b| EncryptedSecret::try_from(b).ok())
            .ok_or(EndorsementError::Malformed("encrypted secret"))?;
        let tpm_err = |_| EndorsementError::Crypto("TPM");
        let ek = create_ek_object_2(
            &mut self.ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            None,
        )
        .map_err(tpm_err)?;
        let ak = match Self::ak_template().map(|t| self.create_primary(t)) {
            Ok(Ok((ak, _))) => ak,
            _ => {
                self.flush(ek);
                return Err(EndorsementError::Crypto("TPM"));
            }
        };
        // The EK's policy is PolicySecret(TPM_RH_ENDORSEMENT): a policy session satisfied with
        // the (empty) endorsement authorization.
        let session = self.policy_session().ok();
        let result = (|| {
            let session = session.ok_or(EndorsementError::Crypto("TPM session"))?;
            let policy = PolicySession::try_from(session).map_err(tpm_err)?;
            self.ctx
                .execute_with_nullauth_session(|ctx| {
                    ctx.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })
                .map_err(tpm_err)?;
            self.ctx
                .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |ctx| {
                    ctx.activate_credential(ak, ek, id_object, secret)
                })
                .map(|d| zeroize::Zeroizing::new(d.value().to_vec()))
                .map_err(|e| {
                    tracing::info!(error = %e, "TPM refused ActivateCredential");
                    EndorsementError::ActivationRefused
                })
        })();
        if let Some(s) = session {
            let _ = self
                .ctx
                .flush_context(ObjectHandle::from(SessionHandle::from(s)));
        }
        self.flush(ak);
        self.flush(ek);
        result
    }

    /// The ESYS handle of the NV index `index` (fails if it is not defined).
    fn nv_handle(&mut self, index: u32) -> Result<tss_esapi::handles::NvIndexHandle, RotError> {
        use tss_esapi::handles::{NvIndexHandle, NvIndexTpmHandle, TpmHandle};
        let tpm_handle = NvIndexTpmHandle::new(index).map_err(RotError::Tpm)?;
        self.ctx
            .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::NvIndex(tpm_handle)))
            .map(NvIndexHandle::from)
            .map_err(RotError::Tpm)
    }

    /// Reads the anti-rollback counter at `index`: `None` if the index is not defined, 0 if it
    /// was defined but never incremented.
    pub fn counter_read(&mut self, index: u32) -> Result<Option<u64>, RotError> {
        use tss_esapi::interface_types::resource_handles::NvAuth;
        let Ok(handle) = self.nv_handle(index) else {
            return Ok(None);
        };
        let read = self
            .ctx
            .execute_with_nullauth_session(|ctx| ctx.nv_read(NvAuth::Owner, handle, 8, 0));
        let _ = self.ctx.tr_close(&mut ObjectHandle::from(handle));
        match read {
            Ok(buf) => {
                let bytes: [u8; 8] = buf
                    .value()
                    .try_into()
                    .map_err(|_| RotError::Malformed("NV counter size"))?;
                Ok(Some(u64::from_be_bytes(bytes)))
            }
            // TPM_RC_NV_UNINITIALIZED: defined, never incremented.
            Err(e) if uninitialized(&e) => Ok(Some(0)),
            Err(e) => Err(RotError::Tpm(e)),
        }
    }

    /// Defines the anti-rollback counter at `index` (owner hierarchy, `TPM_NT_COUNTER`) if it
    /// does not exist. A TPM counter only ever goes up; one deleted and defined again starts at
    /// the highest value any counter of this TPM ever held, so the floor survives that too.
    pub fn counter_define(&mut self, index: u32) -> Result<(), RotError> {
        use tss_esapi::attributes::NvIndexAttributesBuilder;
        use tss_esapi::constants::NvIndexType;
        use tss_esapi::handles::NvIndexTpmHandle;
        use tss_esapi::interface_types::resource_handles::Provision;
        use tss_esapi::structures::NvPublicBuilder;
        if self.counter_read(index)?.is_some() {
            return Ok(());
        }
        let attrs = NvIndexAttributesBuilder::new()
            .with_nv_index_type(NvIndexType::Counter)
            .with_owner_write(true)
            .with_owner_read(true)
            .with_auth_read(true)
            .with_no_da(true)
            .build()
            .map_err(RotError::Tpm)?;
        let public = NvPublicBuilder::new()
            .with_nv_index(NvIndexTpmHandle::new(index).map_err(RotError::Tpm)?)
            .with_index_name_algorithm(HashingAlgorithm::Sha256)
            .with_index_attributes(attrs)
            .with_data_area_size(8)
            .build()
            .map_err(RotError::Tpm)?;
        let handle = self
            .ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.nv_define_space(Provision::Owner, None, public)
            })
            .map_err(RotError::Tpm)?;
        let _ = self.ctx.tr_close(&mut ObjectHandle::from(handle));
        Ok(())
    }

    /// Deletes the counter at `index` (owner authorization). Dev/test only: shows that a
    /// counter defined again does not start below where the old one was.
    pub fn counter_undefine(&mut self, index: u32) -> Result<(), RotError> {
        use tss_esapi::interface_types::resource_handles::Provision;
        let handle = self.nv_handle(index)?;
        self.ctx
            .execute_with_nullauth_session(|ctx| ctx.nv_undefine_space(Provision::Owner, handle))
            .map_err(RotError::Tpm)
    }

    /// Increments the counter at `index` until it is at least `value` (at most 4096 steps per
    /// call: release versions are small). Returns the counter's value.
    pub fn counter_raise_to(&mut self, index: u32, value: u64) -> Result<u64, RotError> {
        use tss_esapi::interface_types::resource_handles::NvAuth;
        let mut now = self
            .counter_read(index)?
            .ok_or(RotError::Malformed("anti-rollback counter not defined"))?;
        let mut steps = 0u32;
        while now < value {
            if steps >= 4096 {
                return Err(RotError::Malformed("anti-rollback counter: step limit"));
            }
            let handle = self.nv_handle(index)?;
            let r = self
                .ctx
                .execute_with_nullauth_session(|ctx| ctx.nv_increment(NvAuth::Owner, handle));
            let _ = self.ctx.tr_close(&mut ObjectHandle::from(handle));
            r.map_err(RotError::Tpm)?;
            steps += 1;
            now = self
                .counter_read(index)?
                .ok_or(RotError::Malformed("anti-rollback counter vanished"))?;
        }
        Ok(now)
    }

    /// `TPM2_Clear` with owner (platform would be used on real hardware) authorization: new owner
    /// seed, so a new SRK and AK; every object sealed before becomes unloadable.
    pub fn clear_owner(&mut self) -> Result<(), RotError> {
        self.ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.clear(tss_esapi::handles::AuthHandle::Platform)
            })
            .map_err(RotError::Tpm)
    }
}

/// TPM_RC_NV_UNINITIALIZED (0x14a): an NV index defined but never written.
fn uninitialized(e: &tss_esapi::Error) -> bool {
    match e {
        tss_esapi::Error::Tss2Error(rc) => matches!(
            rc.kind(),
            Some(tss_esapi::constants::response_code::Tss2ResponseCodeKind::NvUninitialized)
        ),
        _ => false,
    }
}

/// The marshalled `TPMT_PUBLIC` of Bulkhead's AK template holding the point `ak`.
pub(crate) fn ak_public_area(ak: &AkPublic) -> Result<Vec<u8>, RotError> {
    let sec1 = ak.sec1()?;
    let (x, y) = match sec1.as_slice() {
        [4, rest @ ..] if rest.len() == 64 => rest.split_at(32),
        _ => return Err(RotError::Malformed("attestation key")),
    };
    let point = EccPoint::new(
        tss_esapi::structures::EccParameter::try_from(x.to_vec()).map_err(RotError::Tpm)?,
        tss_esapi::structures::EccParameter::try_from(y.to_vec()).map_err(RotError::Tpm)?,
    );
    Tpm::ak_template_with(point)?
        .marshall()
        .map_err(RotError::Tpm)
}

fn ak_public_of(public: &Public) -> Result<AkPublic, RotError> {
    match public {
        Public::Ecc { unique, .. } => {
            let mut sec1 = Vec::with_capacity(65);
            sec1.push(4u8);
            sec1.extend_from_slice(&pad32(unique.x().value())?);
            sec1.extend_from_slice(&pad32(unique.y().value())?);
            Ok(AkPublic(hex::encode(sec1)))
        }
        _ => Err(RotError::Malformed("attestation key is not ECC")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_bytes() {
        assert_eq!(
            MeasurePcr::DEV.tpml_selection_bytes(),
            [0, 0, 0, 1, 0, 0x0c, 3, 0, 0, 0x80]
        );
        assert_eq!(
            MeasurePcr(8).tpml_selection_bytes(),
            [0, 0, 0, 1, 0, 0x0c, 3, 0, 1, 0]
        );
        assert!(MeasurePcr::new(24).is_err());
    }
}
