//! The server-identity pin on top of the CA check, for every TLS client of a Bulkhead service
//! (the services above the hosts through `bulkhead-mtls`, the block card's NBD client): after
//! webpki's chain, validity and address checks, the server certificate must name the
//! [`ServerIdentity`] the client meant to reach (role in OU, name in CN), so any other
//! certificate of the same CA — a host's presented at the KMS's address, another storage
//! node's — fails the handshake. Behind the `rustls` feature.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::RootCertStore;

use crate::pki::ServerIdentity;

/// Runs the CA check and then requires the certificate to name `expect`.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expect: ServerIdentity,
}

impl PinnedServerVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        expect: ServerIdentity,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider).build()?;
        Ok(PinnedServerVerifier { inner, expect })
    }
}

/// Why a CA-valid server certificate was refused: it names another service.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct WrongServer(String);

impl ServerCertVerifier for PinnedServerVerifier {
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
                tracing::warn!(want = %self.expect, error = %e, "server identity refused");
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Other(rustls::OtherError(Arc::new(WrongServer(
                        e.to_string(),
                    )))),
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

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}
