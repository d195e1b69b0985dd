//! The card's TLS 1.3 client configuration: the host's certificate as client certificate, the
//! cluster CA as the only root, and the storage node's identity pinned on top of the CA check.

use super::NbdClientError;
use bulkhead_tokens::pki::ServerIdentity;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
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

/// Runs the CA check (chain, validity, address) and then requires the server certificate to name
/// the storage node the card was told to reach: any other certificate of the same CA (a host's,
/// the KMS's, another storage node's) fails the handshake.
#[derive(Debug)]
struct PinnedStorageVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expect: ServerIdentity,
}

/// Why a CA-valid certificate was refused.
#[derive(Debug, thiserror::Error)]
#[error("the server certificate names another identity")]
struct WrongServer;

impl ServerCertVerifier for PinnedStorageVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match self.expect.check_der(end_entity.as_ref()) {
            Ok(_) => Ok(ok),
            Err(e) => {
                tracing::warn!(want = %self.expect, error = %e, "storage node identity refused");
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Other(rustls::OtherError(Arc::new(WrongServer))),
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
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
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|_| NbdClientError::Pem { what: "CA" })?;
    let verifier = Arc::new(PinnedStorageVerifier { inner, expect });
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
