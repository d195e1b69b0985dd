//! The start-up of a TLS service daemon: bind, announce readiness on stdout, serve.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::{Limits, Refusals};

/// Runs a service daemon's server: binds `listen`, prints the one-line JSON ready event on
/// stdout (`{"event":"ready","service":…,"listen":…}` plus `extra`'s fields, what the cluster
/// launcher waits for), then serves `app` behind TLS ([`crate::serve`], default [`Limits`]) on a
/// two-worker runtime until the process ends; refusals go to `refusals` (the daemon's audit
/// log). Errors name the address.
pub fn run_daemon(
    listen: &str,
    tls: rustls::ServerConfig,
    app: axum::Router,
    service: &str,
    extra: serde_json::Value,
    refusals: Arc<Refusals>,
) -> std::io::Result<()> {
    let ctx = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{listen}: {e}"));
    let std_listener = std::net::TcpListener::bind(listen).map_err(ctx)?;
    std_listener.set_nonblocking(true).map_err(ctx)?;
    let local = std_listener.local_addr().map_err(ctx)?;
    let rt = bulkhead_daemon::runtime()?;
    rt.block_on(async move {
        let listener = TcpListener::from_std(std_listener).map_err(ctx)?;
        let mut ready =
            serde_json::json!({"event": "ready", "service": service, "listen": local.to_string()});
        if let (Some(r), Some(x)) = (ready.as_object_mut(), extra.as_object()) {
            r.extend(x.clone());
        }
        println!("{ready}");
        tracing::info!(listen = %local, service, "ready");
        crate::serve(listener, tls, app, Limits::default(), refusals)
            .await
            .map_err(ctx)
    })
}
