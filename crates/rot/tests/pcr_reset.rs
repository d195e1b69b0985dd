//! The boot PCRs cannot be reset by software (issue 17, claim 7): a real swtpm refuses
//! `TPM2_PCR_Reset` on every PCR the firmware and the kernel stub measure into (0–15) and leaves
//! its value as it was, so a host cannot wind its boot measurements back and replay good ones.
//! The control: PCRs 16 and 23 are resettable from locality 0, the TPM's own rule — the reason
//! a process host's PCR 23 measurement is weaker than a sealed host's PCRs 4, 9, 11 and 12
//! (docs/rot.md states that limit). The test would fail if resets of 0–15 were accepted or
//! refused for another reason than locality. `TPM2_PCR_Reset` acts on a PCR index in every bank
//! at once, so reading the SHA-384 bank (the one the wrapper extends) shows the rule for the
//! SHA-256 bank a sealed host quotes as well.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bulkhead_rot::swtpm::Swtpm;
use bulkhead_rot::tpm::{MeasurePcr, Tpm};
use bulkhead_rot::RotError;
use common::skip;
use tss_esapi::constants::Tss2ResponseCodeKind;
use tss_esapi::Error as TssError;

#[test]
fn boot_pcrs_refuse_reset_and_keep_their_value() {
    if skip("boot_pcrs_refuse_reset_and_keep_their_value") {
        return;
    }
    let sw = Swtpm::start().unwrap();
    let mut tpm = Tpm::open(&sw.tcti()).unwrap();
    let measured = [0xa5u8; 48];
    for index in 0..=15u8 {
        let pcr = MeasurePcr::new(index).unwrap();
        tpm.pcr_extend(pcr, &measured).unwrap();
        let before = tpm.pcr_read(pcr).unwrap();
        assert_ne!(before, [0u8; 48], "PCR {index} was not extended");
        let reset = tpm.pcr_reset(pcr);
        // Refused for its locality (TPM_RC_LOCALITY): the PCR's own attribute, not an
        // authorization or handle error of ours.
        assert!(
            matches!(
                reset,
                Err(RotError::Tpm(TssError::Tss2Error(rc)))
                    if rc.kind() == Some(Tss2ResponseCodeKind::Locality)
            ),
            "PCR {index}: TPM2_PCR_Reset was not refused for its locality: {reset:?}"
        );
        assert_eq!(
            tpm.pcr_read(pcr).unwrap(),
            before,
            "PCR {index} changed under a refused reset"
        );
    }
    // The control: the debug PCR 16 and the application PCR 23 do reset from locality 0.
    for index in [16u8, 23] {
        let pcr = MeasurePcr::new(index).unwrap();
        tpm.pcr_extend(pcr, &measured).unwrap();
        assert_ne!(tpm.pcr_read(pcr).unwrap(), [0u8; 48]);
        tpm.pcr_reset(pcr)
            .unwrap_or_else(|e| panic!("PCR {index} should reset from locality 0: {e}"));
        assert_eq!(
            tpm.pcr_read(pcr).unwrap(),
            [0u8; 48],
            "PCR {index} not reset"
        );
    }
}
