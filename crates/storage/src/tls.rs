//! TLS 1.3 server configurations of the node's two listeners, from the cluster CA: both
//! require a client certificate chained to the CA (the control API serves only the control
//! plane, the NBD listener only hosts; roles are checked after the handshake).

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: not a readable PEM certificate or key")]
    Pem(std::path::PathBuf),
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The node's certificate, key and the CA it trusts clients by.
#[derive(Debug, Clone)]
pub struct TlsFiles<'a> {
    pub ca_pem: &'a Path,
    pub cert_pem: &'a Path,
    pub key_pem: &'a Path,
}

/// A TLS 1.3-only server configuration requiring a CA-chained client certificate. `alpn`:
/// the protocols offered (`http/1.1` on the control API; none for NBD, which QEMU does not
/// negotiate).
pub fn server_config(
    files: &TlsFiles<'_>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let p = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(
        CertificateDer::from_pem_file(files.ca_pem)
            .map_err(|_| TlsError::Pem(files.ca_pem.to_path_buf()))?,
    )?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&p)).build()?;
    let cert = CertificateDer::from_pem_file(files.cert_pem)
        .map_err(|_| TlsError::Pem(files.cert_pem.to_path_buf()))?;
    let key = PrivateKeyDer::from_pem_file(files.key_pem)
        .map_err(|_| TlsError::Pem(files.key_pem.to_path_buf()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}
