//! The HTTP server of the S3 gateway: HTTP/1.1 with keep-alive on a listener the caller
//! bound, one `tracing` span per request, graceful shutdown on a cancellation token.

use crate::backend::Backend;
use crate::s3::host::Domains;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// A client must send its request head within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// After shutdown, requests in flight get this long to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The region this gateway serves (signatures' scope, bucket locations).
    pub region: String,
    /// Domains for virtual-hosted-style requests (`bucket.<domain>`), e.g.
    /// `s3.basalt.local`, `localhost`; other hosts are path-style.
    pub domains: Vec<String>,
    /// Serve HTTPS with this certificate and key (see [`tls_config`]); plain HTTP without.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A TLS server configuration from a PEM certificate chain and private key (HTTP/1.1 over
/// TLS 1.2 and 1.3, as S3 clients speak it).
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("reading the certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the PEM file".into());
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("reading the private key: {e}"))?
        .ok_or("no private key in the PEM file")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves S3 on `listener` until `shutdown` is cancelled, then stops accepting, lets open
/// requests finish (for up to 30 s) and returns.
pub async fn serve<B: Backend>(
    listener: TcpListener,
    backend: Arc<B>,
    opts: ServeOptions,
    shutdown: CancellationToken,
) {
    let service = crate::s3::service(backend, &opts.region, &opts.domains);
    let domains = Arc::new(Domains::new(&opts.domains));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true).timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let tls = opts.tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let domains = Arc::clone(&domains);
        let handler = hyper::service::service_fn(move |req| handle(service.clone(), Arc::clone(&domains), peer, req));
        let http = http.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => watcher.watch(http.serve_connection(TokioIo::new(stream), handler)).await,
                Some(acceptor) => {
                    // The handshake gets the time a request head gets.
                    let stream = match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    };
                    watcher.watch(http.serve_connection(TokioIo::new(stream), handler)).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still open after the drain timeout were cut");
    }
}

async fn handle(
    service: crate::s3::payload::Service,
    domains: Arc<Domains>,
    peer: SocketAddr,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<s3s::Body>, s3s::HttpError> {
    let (bucket, key) = bucket_and_key(&domains, &req);
    // Clients log `x-amz-request-id` with errors; the same id is in our span.
    let request_id = format!("{:016X}", rand::random::<u64>());
    let span = tracing::info_span!(
        "s3_request",
        request_id = %request_id,
        method = %req.method(),
        bucket = %bucket,
        key = %key,
        %peer,
        status = tracing::field::Empty,
    );
    async move {
        let started = Instant::now();
        let head = req.method() == http::Method::HEAD;
        let mut result = service.call(req.map(s3s::Body::from)).await;
        // S3 answers a ranged HEAD with 206, which `s3s` cannot express.
        if let Ok(res) = &mut result {
            if head && res.status() == http::StatusCode::OK && res.headers().contains_key(http::header::CONTENT_RANGE) {
                *res.status_mut() = http::StatusCode::PARTIAL_CONTENT;
            }
            if let Ok(v) = http::HeaderValue::from_str(&request_id) {
                res.headers_mut().insert("x-amz-request-id", v);
            }
        }
        let elapsed_ms = started.elapsed().as_millis();
        match &result {
            Ok(res) => {
                tracing::Span::current().record("status", res.status().as_u16());
                tracing::debug!(elapsed_ms, "request done");
            }
            Err(e) => tracing::warn!(elapsed_ms, error = ?e, "request failed"),
        }
        result
    }
    .instrument(span)
    .await
}

/// Bucket and key as the request names them, for the log only (routing is `s3s`'s).
fn bucket_and_key(domains: &Domains, req: &hyper::Request<Incoming>) -> (String, String) {
    let path = percent_encoding::percent_decode_str(req.uri().path()).decode_utf8_lossy();
    let path = path.strip_prefix('/').unwrap_or(&path);
    let host_bucket = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).and_then(|h| domains.bucket_of(h));
    match host_bucket {
        Some(bucket) => (bucket, path.to_owned()),
        None => {
            let (bucket, key) = path.split_once('/').unwrap_or((path, ""));
            (bucket.to_owned(), key.to_owned())
        }
    }
}
