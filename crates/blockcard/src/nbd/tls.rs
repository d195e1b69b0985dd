//! The card's TLS 1.3 client configuration: the host's certificate as client certificate, the
//! cluster CA as the only root, and the storage node's identity pinned on top of the CA check.

use super::NbdClientError;
use bulkhead_tokens::pinned::PinnedServerVerifier;
use bulkhead_tokens::pki::ServerIdentity;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, NbdClientError> {
    let v: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|_| NbdClientError::Pem {
            what: "certificate",
        })?
        .collect();
    match v {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(NbdClientError::Pem {
            what: "certificate",
        }),
    }
}

/// TLS 1.3 only, client certificate `cert`/`key`, server chained to `ca` and named `expect`.
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    expect: ServerIdentity,
) -> Result<Arc<rustls::ClientConfig>, NbdClientError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(NbdClientError::Tls)?;
    }
    // The storage node the card was told to reach, and no other certificate of the CA.
    let verifier = Arc::new(
        PinnedServerVerifier::new(Arc::new(roots), expect)
            .map_err(|_| NbdClientError::Pem { what: "CA" })?,
    );
    let key = PrivateKeyDer::from_pem_file(key).map_err(|_| NbdClientError::Pem { what: "key" })?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(NbdClientError::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs(cert)?, key)
        .map_err(NbdClientError::Tls)?;
    Ok(Arc::new(cfg))
}
