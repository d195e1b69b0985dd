//! The listener: TLS 1.3 only, client certificates from the Bulkhead CA required, one axum
//! router behind it. Handshake refusals are audited.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_tokens::pki::{cert_sha256, identity_from_der};
use bulkhead_tokens::Identity;
use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::Service;

use crate::controller::{router, Controller};

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Time allowed for a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

fn classify(e: &std::io::Error) -> Option<&'static str> {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::NoCertificatesPresented) => Some("tls_no_client_cert"),
        Some(rustls::Error::InvalidCertificate(_)) => Some("tls_bad_client_cert"),
        Some(_) => Some("tls_handshake_failed"),
        // A TCP connect that sent nothing is not an authentication attempt.
        None => None,
    }
}

/// Serves until the process ends.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    ctrl: Arc<Controller>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let app = router(Arc::clone(&ctrl));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return Ok(());
        };
        let (tcp, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let ctrl = Arc::clone(&ctrl);
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    if let Some(code) = classify(&e) {
                        tracing::info!(peer = %addr, code, "TLS handshake refused");
                        ctrl.audit_tls_refusal(code, None).await;
                    }
                    return;
                }
                Err(_) => {
                    ctrl.audit_tls_refusal("tls_handshake_timeout", None).await;
                    return;
                }
            };
            let der = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec());
            let identity: Identity = match der.as_deref().map(identity_from_der) {
                Some(Ok(id)) => id,
                _ => {
                    ctrl.audit_tls_refusal("bad_certificate", der.as_deref().map(cert_sha256))
                        .await;
                    return;
                }
            };
            let peer = Arc::new(identity);
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(Arc::clone(&peer));
                    let mut app = app.clone();
                    async move { app.call(req.map(axum::body::Body::new)).await }
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with error");
            }
        });
    }
}
