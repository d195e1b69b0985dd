//! The one TPM command PID 1 sends: `TPM2_PCR_Extend` of PCR 23's SHA-256 bank with the
//! configuration disk's digest, over the kernel's `/dev/tpmrm0` (no TSS in PID 1).

/// The PCR the configuration disk is measured into (resettable by software, unlike 0-15: see
/// host/README.md for why that is acceptable here and what is not covered).
pub const CONFIG_PCR: u32 = 23;

const TPM_ST_SESSIONS: u16 = 0x8002;
const TPM_CC_PCR_EXTEND: u32 = 0x0000_0182;
const TPM_RS_PW: u32 = 0x4000_0009;
const TPM_ALG_SHA256: u16 = 0x000B;

/// Why the TPM's answer was not a success.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmError {
    #[error("the TPM's response is shorter than its header")]
    Short,
    #[error("the TPM's response length field disagrees with what was read")]
    BadLength,
    #[error("the TPM refused the command: response code {0:#x}")]
    Refused(u32),
}

/// `TPM2_PCR_Extend(pcr, {SHA-256: digest})` with an empty password session.
pub fn pcr_extend_command(pcr: u32, digest: &[u8; 32]) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(&pcr.to_be_bytes());
    // Authorization area: one password session with an empty password.
    let auth: Vec<u8> = [
        &TPM_RS_PW.to_be_bytes()[..],
        &0u16.to_be_bytes()[..], // nonce size
        &[0u8][..],              // session attributes
        &0u16.to_be_bytes()[..], // hmac (password) size
    ]
    .concat();
    body.extend_from_slice(&u32::try_from(auth.len()).unwrap_or(0).to_be_bytes());
    body.extend_from_slice(&auth);
    body.extend_from_slice(&1u32.to_be_bytes()); // one digest
    body.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
    body.extend_from_slice(digest);
    let size = 10 + body.len();
    let mut cmd = Vec::with_capacity(size);
    cmd.extend_from_slice(&TPM_ST_SESSIONS.to_be_bytes());
    cmd.extend_from_slice(&u32::try_from(size).unwrap_or(0).to_be_bytes());
    cmd.extend_from_slice(&TPM_CC_PCR_EXTEND.to_be_bytes());
    cmd.extend_from_slice(&body);
    cmd
}

/// Checks a TPM response: well-formed header, length as read, response code 0.
pub fn check_response(resp: &[u8]) -> Result<(), TpmError> {
    let size = resp
        .get(2..6)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or(TpmError::Short)?;
    let rc = resp
        .get(6..10)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or(TpmError::Short)?;
    if usize::try_from(size).ok() != Some(resp.len()) {
        return Err(TpmError::BadLength);
    }
    if rc != 0 {
        return Err(TpmError::Refused(rc));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn extend_command_layout() {
        let c = pcr_extend_command(23, &[0xAB; 32]);
        assert_eq!(c.len(), 10 + 4 + 4 + 9 + 4 + 2 + 32);
        assert_eq!(&c[..2], &[0x80, 0x02]);
        assert_eq!(
            u32::from_be_bytes(c[2..6].try_into().unwrap()) as usize,
            c.len()
        );
        assert_eq!(&c[6..10], &[0, 0, 1, 0x82]);
        assert_eq!(&c[10..14], &[0, 0, 0, 23]);
        assert_eq!(&c[c.len() - 32..], &[0xAB; 32]);
    }

    #[test]
    fn responses() {
        assert_eq!(
            check_response(&[0x80, 0x02, 0, 0, 0, 19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Ok(())
        );
        assert_eq!(
            check_response(&[0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x09, 0x07]),
            Err(TpmError::Refused(0x907))
        );
        assert_eq!(check_response(&[0x80]), Err(TpmError::Short));
        assert_eq!(
            check_response(&[0x80, 0x01, 0, 0, 0, 11, 0, 0, 0, 0]),
            Err(TpmError::BadLength)
        );
    }
}
