//! Mutual TLS 1.3 for the services above the hosts (KMS, control plane): server and client
//! configurations built from the Bulkhead dev CA (`bulkhead-tokens`), a one-connection-per-call
//! HTTP/1.1 client, and the accept loop that hands each request its peer's verified identity.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_tokens::pki::identity_from_der;
use bulkhead_tokens::Identity;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tower::Service;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: not a readable PEM certificate or key")]
    Pem(String),
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("connect {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("tls handshake with {0}: {1}")]
    Handshake(String, std::io::Error),
    #[error("http: {0}")]
    Http(String),
    #[error("timed out")]
    Timeout,
    #[error("response too large")]
    TooLarge,
}

impl TlsError {
    pub fn code(&self) -> &'static str {
        match self {
            TlsError::Connect(..) | TlsError::Handshake(..) | TlsError::Timeout => {
                "upstream_unreachable"
            }
            _ => "upstream_error",
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn cert(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_file(path).map_err(|_| TlsError::Pem(path.display().to_string()))
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|_| TlsError::Pem(path.display().to_string()))
}

/// TLS 1.3-only server config. `client_ca`: require client certificates chained to it.
pub fn server_config(
    ca_pem: &Path,
    cert_pem: &Path,
    key_pem: &Path,
    require_client: bool,
) -> Result<rustls::ServerConfig, TlsError> {
    let p = provider();
    let b = rustls::ServerConfig::builder_with_provider(Arc::clone(&p))
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let b = if require_client {
        let mut roots = RootCertStore::empty();
        roots.add(cert(ca_pem)?)?;
        b.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), p).build()?,
        )
    } else {
        b.with_no_client_auth()
    };
    let mut cfg = b.with_single_cert(vec![cert(cert_pem)?], key(key_pem)?)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// TLS 1.3-only client config trusting `ca_pem`, presenting `name`'s certificate if given.
pub fn client_config(
    ca_pem: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(cert(ca_pem)?)?;
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    Ok(match client {
        Some((c, k)) => b.with_client_auth_cert(vec![cert(c)?], key(k)?)?,
        None => b.with_no_client_auth(),
    })
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Largest response body read.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// One request over a fresh TLS connection.
#[derive(Clone)]
pub struct HttpsClient {
    cfg: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl HttpsClient {
    pub fn new(cfg: rustls::ClientConfig) -> HttpsClient {
        HttpsClient {
            cfg: Arc::new(cfg),
            // Covers a host's hot-plug of a volume into a running guest (the hypervisor waits up to
            // 30 s for the guest's driver, 45 s for a detach).
            timeout: Duration::from_secs(75),
        }
    }

    pub async fn request(
        &self,
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<HttpResponse, TlsError> {
        tokio::time::timeout(
            self.timeout,
            self.request_inner(addr, method, path, headers, body),
        )
        .await
        .map_err(|_| TlsError::Timeout)?
    }

    async fn request_inner(
        &self,
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<HttpResponse, TlsError> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| TlsError::Connect(addr.into(), e))?;
        let _ = tcp.set_nodelay(true);
        let ip = addr
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(addr)
            .to_string();
        let name =
            ServerName::try_from(ip).map_err(|_| TlsError::Http("bad server name".into()))?;
        let tls = TlsConnector::from(Arc::clone(&self.cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| TlsError::Handshake(addr.into(), e))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| TlsError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|e| TlsError::Http(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| TlsError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|_| TlsError::TooLarge)?
            .to_bytes()
            .to_vec();
        Ok(HttpResponse { status, body })
    }
}

/// The verified client certificate identity, inserted into every request's extensions.
#[derive(Debug, Clone)]
pub struct Peer(pub Option<Arc<Identity>>);

/// Serves `app` behind TLS until the process ends. Handshake failures are logged and dropped.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    app: axum::Router,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let slots = Arc::new(tokio::sync::Semaphore::new(256));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return Ok(());
        };
        let (tcp, addr): (_, SocketAddr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(peer = %addr, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| identity_from_der(c.as_ref()).ok())
                .map(Arc::new);
            let peer = Peer(peer);
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
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

/// Runs a service daemon's server: binds `listen`, prints the one-line JSON ready event on
/// stdout (`{"event":"ready","service":…,"listen":…}` plus `extra`'s fields, what the cluster
/// launcher waits for), then serves `app` behind TLS on a two-worker runtime until the process
/// ends. Errors name the address.
pub fn run_daemon(
    listen: &str,
    tls: rustls::ServerConfig,
    app: axum::Router,
    service: &str,
    extra: serde_json::Value,
) -> std::io::Result<()> {
    let ctx = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{listen}: {e}"));
    let std_listener = std::net::TcpListener::bind(listen).map_err(ctx)?;
    std_listener.set_nonblocking(true).map_err(ctx)?;
    let local = std_listener.local_addr().map_err(ctx)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::from_std(std_listener).map_err(ctx)?;
        let mut ready =
            serde_json::json!({"event": "ready", "service": service, "listen": local.to_string()});
        if let (Some(r), Some(x)) = (ready.as_object_mut(), extra.as_object()) {
            r.extend(x.clone());
        }
        println!("{ready}");
        tracing::info!(listen = %local, service, "ready");
        serve(listener, tls, app).await.map_err(ctx)
    })
}
