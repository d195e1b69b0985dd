//! The configuration disk: `MAGIC` (8 bytes) ‖ body length (u32, little endian) ‖ body (JSON,
//! [`HostConfig`]) ‖ zero padding to the end of the disk. The measured bytes are the header and
//! the body (not the padding), so a disk of any size with the same configuration measures the
//! same.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// First bytes of a configuration disk.
pub const MAGIC: &[u8; 8] = b"BHHOST01";
/// Header length: magic and the body length.
pub const HEADER_LEN: usize = 12;
/// Largest accepted body.
pub const MAX_BODY: usize = 256 * 1024;
/// Largest accepted text field (certificates, keys, policy).
pub const MAX_FIELD: usize = 64 * 1024;
/// The disk is written in whole sectors.
pub const SECTOR: usize = 512;

/// One host's identity and address. Everything else about the host is in the image.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// The host's name (its certificate's name): 1-63 of `a-z0-9-`, not starting with `-`.
    pub host_id: String,
    /// The address of `eth0`.
    pub address: Ipv4Addr,
    /// Its prefix length, 8..=30.
    pub prefix: u8,
    /// The default gateway, if any (inside the prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// The Bulkhead CA certificate (PEM).
    pub ca_cert: String,
    /// This host's certificate chain (PEM).
    pub host_cert: String,
    /// This host's TLS private key (PEM, PKCS#8).
    pub host_key: Zeroizing<String>,
    /// The token service's public key (text form).
    pub token_public_key: String,
    /// The rights policy (TOML text).
    pub rights: String,
    /// Revoked token ids, one per line (may be empty).
    #[serde(default)]
    pub revocations: String,
}

impl std::fmt::Debug for HostConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostConfig")
            .field("host_id", &self.host_id)
            .field("address", &self.address)
            .field("prefix", &self.prefix)
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

/// Why a configuration disk was refused. Nothing on it is used then: the host halts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("the disk is shorter than its header")]
    Short,
    #[error("the disk does not start with the configuration magic")]
    BadMagic,
    #[error("the body length {0} is over the limit")]
    TooLong(u32),
    #[error("the disk ends before the body does")]
    Truncated,
    #[error("the body is not the expected JSON")]
    BadJson,
    #[error("host_id is not 1-63 of a-z0-9- (not starting with -)")]
    BadHostId,
    #[error("the prefix length must be 8..=30")]
    BadPrefix,
    #[error("the address is not a usable unicast host address in its prefix")]
    BadAddress,
    #[error("the gateway is not a host address in the prefix")]
    BadGateway,
    #[error("{0} is not PEM")]
    NotPem(&'static str),
    #[error("{0} is longer than the field limit")]
    FieldTooLong(&'static str),
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
}

/// A parsed disk: the configuration and the SHA-256 of the measured bytes.
#[derive(Debug)]
pub struct ParsedDisk {
    pub config: HostConfig,
    pub measured: [u8; 32],
}

/// `true` for 1-63 of `a-z0-9-` not starting with `-`.
pub fn valid_host_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn text(name: &'static str, v: &str, pem: bool) -> Result<(), ConfigError> {
    if v.len() > MAX_FIELD {
        return Err(ConfigError::FieldTooLong(name));
    }
    if v.contains('\0') {
        return Err(ConfigError::Nul(name));
    }
    if pem && !(v.trim_start().starts_with("-----BEGIN ") && v.contains("-----END ")) {
        return Err(ConfigError::NotPem(name));
    }
    Ok(())
}

impl HostConfig {
    /// Checks every field; [`parse_disk`] calls it, so a parsed configuration is a checked one.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !valid_host_id(&self.host_id) {
            return Err(ConfigError::BadHostId);
        }
        if !(8..=30).contains(&self.prefix) {
            return Err(ConfigError::BadPrefix);
        }
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        let addr = u32::from(self.address);
        let host_part = addr & !mask;
        if self.address.is_loopback()
            || self.address.is_multicast()
            || self.address.is_broadcast()
            || self.address.is_unspecified()
            || host_part == 0
            || host_part == !mask
        {
            return Err(ConfigError::BadAddress);
        }
        if let Some(gw) = self.gateway {
            let g = u32::from(gw);
            if g & mask != addr & mask || g == addr || g & !mask == 0 || g & !mask == !mask {
                return Err(ConfigError::BadGateway);
            }
        }
        text("ca_cert", &self.ca_cert, true)?;
        text("host_cert", &self.host_cert, true)?;
        text("host_key", &self.host_key, true)?;
        text("token_public_key", &self.token_public_key, false)?;
        text("rights", &self.rights, false)?;
        text("revocations", &self.revocations, false)?;
        Ok(())
    }

    /// The netmask of [`Self::prefix`].
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix.clamp(1, 32))))
    }
}

/// Parses a configuration disk (the raw device's bytes, padding included).
pub fn parse_disk(raw: &[u8]) -> Result<ParsedDisk, ConfigError> {
    let header = raw.get(..HEADER_LEN).ok_or(ConfigError::Short)?;
    if header.get(..8) != Some(&MAGIC[..]) {
        return Err(ConfigError::BadMagic);
    }
    let len_bytes: [u8; 4] = header
        .get(8..12)
        .and_then(|b| b.try_into().ok())
        .ok_or(ConfigError::Short)?;
    let len = u32::from_le_bytes(len_bytes);
    let body_len = usize::try_from(len).map_err(|_| ConfigError::TooLong(len))?;
    if body_len > MAX_BODY {
        return Err(ConfigError::TooLong(len));
    }
    let end = HEADER_LEN + body_len;
    let body = raw.get(HEADER_LEN..end).ok_or(ConfigError::Truncated)?;
    let config: HostConfig = serde_json::from_slice(body).map_err(|_| ConfigError::BadJson)?;
    config.check()?;
    let measured: [u8; 32] = Sha256::digest(&raw[..end]).into();
    Ok(ParsedDisk { config, measured })
}

/// Encodes a configuration as disk bytes (padded to whole sectors). Checks it first.
pub fn encode_disk(c: &HostConfig) -> Result<Vec<u8>, ConfigError> {
    c.check()?;
    let body = serde_json::to_vec(c).map_err(|_| ConfigError::BadJson)?;
    if body.len() > MAX_BODY {
        return Err(ConfigError::TooLong(
            u32::try_from(body.len()).unwrap_or(u32::MAX),
        ));
    }
    let len = u32::try_from(body.len()).map_err(|_| ConfigError::TooLong(u32::MAX))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + SECTOR);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    let padded = out.len().div_ceil(SECTOR) * SECTOR;
    out.resize(padded.max(SECTOR), 0);
    Ok(out)
}

/// SHA-256 of the measured part of an encoded disk (what `bulkhead-init` extends PCR 23 with).
pub fn measured_digest(disk: &[u8]) -> Result<[u8; 32], ConfigError> {
    parse_disk(disk).map(|p| p.measured)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(crate) fn sample() -> HostConfig {
        HostConfig {
            host_id: "host-1".into(),
            address: Ipv4Addr::new(10, 77, 0, 2),
            prefix: 24,
            gateway: Some(Ipv4Addr::new(10, 77, 0, 1)),
            ca_cert: "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n".into(),
            host_cert: "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n".into(),
            host_key: Zeroizing::new(
                "-----BEGIN PRIVATE KEY-----\nMA==\n-----END PRIVATE KEY-----\n".into(),
            ),
            token_public_key: "ed25519/00".into(),
            rights: "# none\n".into(),
            revocations: String::new(),
        }
    }

    #[test]
    fn round_trip_and_padding_not_measured() {
        let c = sample();
        let disk = encode_disk(&c).unwrap();
        assert_eq!(disk.len() % SECTOR, 0);
        let p = parse_disk(&disk).unwrap();
        assert_eq!(p.config, c);
        let mut bigger = disk.clone();
        bigger.resize(disk.len() + 4096, 0);
        assert_eq!(parse_disk(&bigger).unwrap().measured, p.measured);
        // One byte of the body changed: refused or measured differently, never the same.
        let mut edited = disk.clone();
        let at = edited.iter().position(|&b| b == b'h').unwrap();
        edited[at] = b'g';
        if let Ok(q) = parse_disk(&edited) {
            assert_ne!(q.measured, p.measured);
        }
    }

    #[test]
    fn typed_refusals() {
        assert_eq!(parse_disk(b"BHHOST0").unwrap_err(), ConfigError::Short);
        assert_eq!(parse_disk(&[0u8; 512]).unwrap_err(), ConfigError::BadMagic);
        let mut d = MAGIC.to_vec();
        d.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_disk(&d).unwrap_err(), ConfigError::TooLong(u32::MAX));
        let mut d = MAGIC.to_vec();
        d.extend_from_slice(&100u32.to_le_bytes());
        d.extend_from_slice(b"{}");
        assert_eq!(parse_disk(&d).unwrap_err(), ConfigError::Truncated);
        let mut d = MAGIC.to_vec();
        d.extend_from_slice(&2u32.to_le_bytes());
        d.extend_from_slice(b"{}");
        assert_eq!(parse_disk(&d).unwrap_err(), ConfigError::BadJson);

        let mut c = sample();
        c.host_id = "Host_1".into();
        assert_eq!(encode_disk(&c).unwrap_err(), ConfigError::BadHostId);
        let mut c = sample();
        c.prefix = 31;
        assert_eq!(encode_disk(&c).unwrap_err(), ConfigError::BadPrefix);
        let mut c = sample();
        c.address = Ipv4Addr::new(10, 77, 0, 255);
        assert_eq!(encode_disk(&c).unwrap_err(), ConfigError::BadAddress);
        let mut c = sample();
        c.gateway = Some(Ipv4Addr::new(10, 78, 0, 1));
        assert_eq!(encode_disk(&c).unwrap_err(), ConfigError::BadGateway);
        let mut c = sample();
        c.host_key = Zeroizing::new("not a key".into());
        assert_eq!(
            encode_disk(&c).unwrap_err(),
            ConfigError::NotPem("host_key")
        );
        let mut c = sample();
        c.rights = "a\0b".into();
        assert_eq!(encode_disk(&c).unwrap_err(), ConfigError::Nul("rights"));
        // An unknown field is refused, not ignored.
        let body = br#"{"host_id":"h","address":"10.0.0.2","prefix":24,"ca_cert":"","host_cert":"","host_key":"","token_public_key":"","rights":"","extra":1}"#;
        let mut d = MAGIC.to_vec();
        d.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
        d.extend_from_slice(body);
        assert_eq!(parse_disk(&d).unwrap_err(), ConfigError::BadJson);
    }

    #[test]
    fn netmask() {
        assert_eq!(sample().netmask(), Ipv4Addr::new(255, 255, 255, 0));
    }
}
