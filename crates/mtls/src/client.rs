//! TLS 1.3 configurations built from the Bulkhead dev CA (`bulkhead-tokens`) for both ends, a
//! client that pins the server's identity, and a one-connection-per-call HTTP/1.1 client: what
//! every service above the hosts (control plane, KMS, storage, token service) uses to call
//! another.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_tokens::pki::ServerIdentity;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::TlsConnector;

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

/// The server-identity pin on top of the CA check (one implementation, `bulkhead-tokens`'s).
pub use bulkhead_tokens::pinned::PinnedServerVerifier;

fn roots(ca_pem: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(cert(ca_pem)?)?;
    Ok(Arc::new(roots))
}

/// As [`client_config`], accepting only a server whose certificate names `expect`.
pub fn pinned_client_config(
    ca_pem: &Path,
    client: Option<(&Path, &Path)>,
    expect: ServerIdentity,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = client_config(ca_pem, client)?;
    cfg.dangerous()
        .set_certificate_verifier(Arc::new(PinnedServerVerifier::new(roots(ca_pem)?, expect)?));
    Ok(cfg)
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
    /// The CA, when known, so that [`HttpsClient::expecting`] can pin each server.
    roots: Option<Arc<RootCertStore>>,
    timeout: Duration,
}

impl HttpsClient {
    /// A client that checks only the CA and the address. Service clients use
    /// [`HttpsClient::pinned`] or [`HttpsClient::expecting`] instead.
    pub fn new(cfg: rustls::ClientConfig) -> HttpsClient {
        HttpsClient {
            cfg: Arc::new(cfg),
            roots: None,
            // Covers a host's hot-plug of a volume into a running guest (the hypervisor waits up to
            // 30 s for the guest's driver, 45 s for a detach).
            timeout: Duration::from_secs(75),
        }
    }

    /// A client trusting `ca_pem` (presenting `client`'s certificate) whose every connection
    /// must reach the server named `expect`.
    pub fn pinned(
        ca_pem: &Path,
        client: Option<(&Path, &Path)>,
        expect: ServerIdentity,
    ) -> Result<HttpsClient, TlsError> {
        let mut c = HttpsClient::new(pinned_client_config(ca_pem, client, expect)?);
        c.roots = Some(roots(ca_pem)?);
        Ok(c)
    }

    /// A client trusting `ca_pem` that keeps the CA so that each call can name its server
    /// with [`HttpsClient::expecting`] (e.g. one host of many).
    pub fn from_ca(ca_pem: &Path, client: Option<(&Path, &Path)>) -> Result<HttpsClient, TlsError> {
        let mut c = HttpsClient::new(client_config(ca_pem, client)?);
        c.roots = Some(roots(ca_pem)?);
        Ok(c)
    }

    /// The same client with another whole-call timeout (a call known to run long, such as a
    /// storage node's volume copy).
    pub fn with_timeout(mut self, timeout: Duration) -> HttpsClient {
        self.timeout = timeout;
        self
    }

    /// The same client (certificate, timeout), accepting only a server named `expect`.
    /// Refuses if this client was built without its CA ([`HttpsClient::new`]).
    pub fn expecting(&self, expect: ServerIdentity) -> Result<HttpsClient, TlsError> {
        let roots = self
            .roots
            .clone()
            .ok_or_else(|| TlsError::Http("client has no CA to pin a server with".into()))?;
        let mut cfg = (*self.cfg).clone();
        cfg.dangerous()
            .set_certificate_verifier(Arc::new(PinnedServerVerifier::new(
                Arc::clone(&roots),
                expect,
            )?));
        Ok(HttpsClient {
            cfg: Arc::new(cfg),
            roots: Some(roots),
            timeout: self.timeout,
        })
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
