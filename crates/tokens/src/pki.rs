//! The Bulkhead CA: create it, issue host and caller certificates, rotate them, and read a
//! verified peer certificate's identity (CN = name, OU = role).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sha2::{Digest, Sha256};

use crate::clock::{civil_from_days, unix_now};
use crate::ops::Role;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("not a valid PEM certificate")]
    BadPem,
    #[error("not a valid X.509 certificate")]
    BadCertificate,
    #[error("certificate has no usable common name")]
    NoName,
    #[error("certificate has no known role in its OU")]
    NoRole,
    #[error("bad name {0:?}: use 1-40 of a-z, 0-9 and -")]
    BadName(String),
    #[error("server certificate names {got}, not the {want} this client meant to reach")]
    WrongServer { want: String, got: String },
    #[error("{0} already exists; refusing to overwrite (use rotate)")]
    Exists(PathBuf),
    #[error("{0} is missing")]
    Missing(PathBuf),
}

impl PkiError {
    pub fn code(&self) -> &'static str {
        match self {
            PkiError::BadPem | PkiError::BadCertificate | PkiError::NoName | PkiError::NoRole => {
                "bad_certificate"
            }
            PkiError::WrongServer { .. } => "wrong_server_identity",
            _ => "pki_error",
        }
    }
}

/// Who a verified certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
    /// SHA-256 of the certificate's DER, hex. Tokens are bound to it.
    pub cert_sha256: String,
}

/// The server a client means to reach: the role and name (CN) its certificate must carry.
/// Every client of a Bulkhead service pins one, so that no other certificate of the same CA —
/// a host's presented as the KMS, the KMS's presented as a host — is accepted in its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    pub role: Role,
    pub name: String,
}

/// Certificate names of the services above the hosts (role [`Role::Service`]).
pub const KMS_NAME: &str = "kms";
pub const TOKEN_SERVICE_NAME: &str = "tokens";
pub const CONTROL_PLANE_NAME: &str = "control";

impl ServerIdentity {
    pub fn kms() -> Self {
        ServerIdentity::service(KMS_NAME)
    }

    pub fn token_service() -> Self {
        ServerIdentity::service(TOKEN_SERVICE_NAME)
    }

    pub fn control_plane() -> Self {
        ServerIdentity::service(CONTROL_PLANE_NAME)
    }

    pub fn service(name: &str) -> Self {
        ServerIdentity {
            role: Role::Service,
            name: name.to_string(),
        }
    }

    /// A host's controller, by host name.
    pub fn host(name: &str) -> Self {
        ServerIdentity {
            role: Role::Host,
            name: name.to_string(),
        }
    }

    /// Checks a (CA-verified) server certificate names exactly this identity.
    pub fn check_der(&self, der: &[u8]) -> Result<Identity, PkiError> {
        let got = identity_from_der(der)?;
        if got.role == self.role && got.name == self.name {
            Ok(got)
        } else {
            Err(PkiError::WrongServer {
                want: self.to_string(),
                got: format!("{} {}", got.role, got.name),
            })
        }
    }
}

impl std::fmt::Display for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

/// SHA-256 of a certificate's DER encoding, hex.
pub fn cert_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Reads name and role from a certificate that TLS has already verified against the CA.
pub fn identity_from_der(der: &[u8]) -> Result<Identity, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| PkiError::BadCertificate)?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .filter(|n| valid_name(n))
        .ok_or(PkiError::NoName)?
        .to_string();
    let role = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .and_then(Role::from_name)
        .ok_or(PkiError::NoRole)?;
    Ok(Identity {
        name,
        role,
        cert_sha256: cert_sha256(der),
    })
}

/// First certificate of a PEM text, as DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|_| PkiError::BadPem)?;
    Ok(p.contents)
}

/// Caller, host and CA names: 1-40 of `a-z0-9-`.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 40
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A CA directory: `ca.pem`, `ca.key`, and `NAME.pem` / `NAME.key` per issued certificate.
#[derive(Debug, Clone)]
pub struct CaDir {
    root: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_new(path: &Path, data: &str, mode: u32, overwrite: bool) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    if !overwrite && path.exists() {
        let _ = fs::remove_file(&tmp);
        return Err(PkiError::Exists(path.to_path_buf()));
    }
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let today = i64::try_from(unix_now() / 86_400).unwrap_or(0);
    let (y, m, d) = civil_from_days(today - 1);
    params.not_before = rcgen::date_time_ymd(
        i32::try_from(y).unwrap_or(1970),
        u8::try_from(m).unwrap_or(1),
        u8::try_from(d).unwrap_or(1),
    );
    let (y, m, d) = civil_from_days(today + days);
    params.not_after = rcgen::date_time_ymd(
        i32::try_from(y).unwrap_or(2100),
        u8::try_from(m).unwrap_or(1),
        u8::try_from(d).unwrap_or(1),
    );
}

fn serial(params: &mut CertificateParams) {
    let mut s: [u8; 16] = rand::random();
    s[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&s));
}

impl CaDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        CaDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.root.join("ca.pem")
    }

    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.key"))
    }

    pub fn exists(&self) -> bool {
        self.ca_pem().exists() && self.ca_key().exists()
    }

    /// Creates the CA. Refuses if one exists.
    pub fn init(&self) -> Result<(), PkiError> {
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        if self.exists() {
            return Err(PkiError::Exists(self.ca_pem()));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Bulkhead CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, 3650);
        serial(&mut params);
        let cert = params.self_signed(&key)?;
        write_new(&self.ca_key(), &key.serialize_pem(), 0o600, false)?;
        write_new(&self.ca_pem(), &cert.pem(), 0o644, false)?;
        Ok(())
    }

    /// Issues `NAME.pem` / `NAME.key` for `role`. Refuses to overwrite unless `rotate`.
    pub fn issue(&self, name: &str, role: Role, rotate: bool) -> Result<Identity, PkiError> {
        self.issue_with_sans(name, role, rotate, &[])
    }

    /// As [`CaDir::issue`], with extra subject alternative names (IP addresses or DNS names) —
    /// e.g. the address of a host's network namespace.
    pub fn issue_with_sans(
        &self,
        name: &str,
        role: Role,
        rotate: bool,
        extra_sans: &[String],
    ) -> Result<Identity, PkiError> {
        if !valid_name(name) || name == "ca" {
            return Err(PkiError::BadName(name.to_string()));
        }
        let ca_pem = fs::read_to_string(self.ca_pem()).map_err(io_err(&self.ca_pem()))?;
        let ca_key_pem = fs::read_to_string(self.ca_key()).map_err(io_err(&self.ca_key()))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key)?;
        if !rotate && self.cert(name).exists() {
            return Err(PkiError::Exists(self.cert(name)));
        }
        let mut sans = vec![name.to_string()];
        let server = matches!(role, Role::Host | Role::Service);
        if server {
            sans.push("localhost".into());
            sans.push("127.0.0.1".into());
        }
        sans.extend(extra_sans.iter().cloned());
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.name());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, 90);
        serial(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write_new(&self.key(name), &key.serialize_pem(), 0o600, rotate)?;
        write_new(&self.cert(name), &cert.pem(), 0o644, rotate)?;
        Ok(Identity {
            name: name.to_string(),
            role,
            cert_sha256: cert_sha256(cert.der()),
        })
    }

    /// Re-issues `NAME` with a fresh key, keeping its role.
    pub fn rotate(&self, name: &str) -> Result<Identity, PkiError> {
        let path = self.cert(name);
        if !path.exists() {
            return Err(PkiError::Missing(path));
        }
        let pem = fs::read_to_string(&path).map_err(io_err(&path))?;
        let old = identity_from_der(&pem_to_der(&pem)?)?;
        self.issue(name, old.role, true)
    }

    /// Reads the identity of an issued certificate.
    pub fn identity(&self, name: &str) -> Result<(Identity, Vec<u8>), PkiError> {
        let path = self.cert(name);
        let pem = fs::read_to_string(&path).map_err(io_err(&path))?;
        let der = pem_to_der(&pem)?;
        Ok((identity_from_der(&der)?, der))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn issue_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::new(dir.path());
        ca.init().unwrap();
        assert!(ca.init().is_err());
        let id = ca.issue("operator", Role::Operator, false).unwrap();
        let (back, _) = ca.identity("operator").unwrap();
        assert_eq!(id, back);
        assert!(ca.issue("operator", Role::Operator, false).is_err());
        let rotated = ca.rotate("operator").unwrap();
        assert_eq!(rotated.role, Role::Operator);
        assert_ne!(rotated.cert_sha256, id.cert_sha256);
        assert!(ca.issue("../x", Role::Operator, false).is_err());
    }
}
