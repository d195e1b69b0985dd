//! The listener: TLS 1.3 only, client certificates from the Bulkhead CA required, one axum
//! router behind it, served by the shared loop in `bulkhead-mtls` (handshake and idle timeouts,
//! budgets before and after the handshake, a cap per client identity). Everything that loop
//! refuses (handshakes, caps, malformed HTTP) is audited, rate-summarised.

use std::sync::Arc;

use bulkhead_mtls::{Limits, Refusal, RefusalSink, Refusals, Summary};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use crate::controller::{router, Controller};

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// TLS 1.3-only server config with mandatory client certificates chained to `ca`.
pub fn tls_config(
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Writes the server loop's refusals into the controller's audit log, metrics and monitor.
pub struct ControllerRefusals(pub Arc<Controller>);

impl RefusalSink for ControllerRefusals {
    fn record(&self, r: &Refusal) {
        self.0.audit_refusal(r);
    }
    fn summary(&self, s: &Summary) {
        self.0.audit_refusal_summary(s);
    }
}

/// The controller's connection limits: a verified Bulkhead identity is required.
pub fn limits() -> Limits {
    Limits {
        require_identity: true,
        ..Limits::default()
    }
}

/// Serves until the process ends, on the shared server loop ([`bulkhead_mtls::serve`]).
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    ctrl: Arc<Controller>,
) -> std::io::Result<()> {
    let refusals = Refusals::new(Arc::new(ControllerRefusals(Arc::clone(&ctrl))));
    bulkhead_mtls::serve(listener, tls, router(ctrl), limits(), refusals).await
}
