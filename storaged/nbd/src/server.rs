//! Listeners and per-connection lifecycle: accept loops for TCP and unix sockets, the handshake
//! timeout, and orderly shutdown (stop accepting, let connections finish in-flight requests).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::backend::ExportProvider;
use crate::handshake::{self, Outcome};
use crate::{transmission, Config, Error, Result};

/// An NBD server over one export provider; cheap to clone, shareable between listeners.
#[derive(Clone)]
pub struct NbdServer {
    exports: Arc<dyn ExportProvider>,
    config: Arc<Config>,
}

impl NbdServer {
    /// Builds a server after checking `config`.
    pub fn new(exports: Arc<dyn ExportProvider>, config: Config) -> Result<Self> {
        config.validate()?;
        Ok(Self { exports, config: Arc::new(config) })
    }

    fn with_defaults(exports: Arc<dyn ExportProvider>) -> Self {
        Self { exports, config: Arc::new(Config::default()) }
    }

    /// Accepts TCP clients until `shutdown` fires, then waits for open connections to finish
    /// their in-flight requests.
    pub async fn serve_tcp(&self, listener: TcpListener, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // Small replies (write acks) must not wait for Nagle.
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(%peer, error = %e, "setting TCP_NODELAY failed");
                    }
                    let (r, w) = stream.into_split();
                    self.spawn_connection(&tracker, r, w, peer.to_string(), &shutdown);
                }
                Err(e) => accept_failed(e).await,
            }
        }
        tracker.close();
        tracker.wait().await;
    }

    /// Accepts unix-socket clients until `shutdown` fires, like [`NbdServer::serve_tcp`].
    pub async fn serve_unix(&self, listener: UnixListener, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let mut n: u64 = 0;
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    n += 1;
                    let (r, w) = stream.into_split();
                    self.spawn_connection(&tracker, r, w, format!("unix#{n}"), &shutdown);
                }
                Err(e) => accept_failed(e).await,
            }
        }
        tracker.close();
        tracker.wait().await;
    }

    fn spawn_connection<R, W>(
        &self,
        tracker: &TaskTracker,
        reader: R,
        writer: W,
        peer: String,
        shutdown: &CancellationToken,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let server = self.clone();
        let shutdown = shutdown.clone();
        let span = info_span!("nbd_conn", peer = %peer, export = tracing::field::Empty);
        tracker.spawn(
            async move {
                match server.serve_connection(reader, writer, shutdown).await {
                    Ok(()) => debug!("connection closed"),
                    Err(Error::ShuttingDown) => debug!("connection closed by shutdown"),
                    // Already logged where the export was refused.
                    Err(Error::ExportRefused { .. }) => {}
                    Err(e) => warn!(error = %e, "connection ended with an error"),
                }
            }
            .instrument(span),
        );
    }

    /// Runs the whole protocol on one already-accepted connection, given as its two halves.
    /// Returns when the client leaves or `shutdown` fires; an error says why the connection was
    /// dropped (handshake violation, bad request magic, socket error).
    pub async fn serve_connection<R, W>(
        &self,
        reader: R,
        writer: W,
        shutdown: CancellationToken,
    ) -> Result<()>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut stream = tokio::io::join(reader, writer);
        let negotiation = tokio::time::timeout(
            self.config.handshake_timeout,
            handshake::negotiate(&mut stream, self.exports.as_ref(), &self.config, &shutdown),
        );
        // Shutdown must not wait for a client that stalls anywhere in the handshake.
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return Err(Error::ShuttingDown),
            r = negotiation => r.map_err(|_| Error::HandshakeTimeout(self.config.handshake_timeout))??,
        };
        let session = match outcome {
            Outcome::Closed => return Ok(()),
            Outcome::Transmission(s) => s,
        };
        tracing::Span::current().record("export", session.export_name.as_str());
        let (reader, writer) = stream.into_inner();
        transmission::run(reader, writer, session, &self.config, &shutdown).await
    }
}

/// Accept errors are mostly transient (EMFILE, ECONNABORTED); back off briefly so a persistent
/// one does not spin a core.
async fn accept_failed(e: std::io::Error) {
    warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Serves NBD on a TCP listener with the default [`Config`] until `shutdown` fires.
pub async fn serve_tcp(
    listener: TcpListener,
    exports: Arc<dyn ExportProvider>,
    shutdown: CancellationToken,
) {
    info!(addr = ?listener.local_addr().ok(), "NBD server listening on TCP");
    NbdServer::with_defaults(exports).serve_tcp(listener, shutdown).await
}

/// Serves NBD on a unix socket listener with the default [`Config`] until `shutdown` fires.
pub async fn serve_unix(
    listener: UnixListener,
    exports: Arc<dyn ExportProvider>,
    shutdown: CancellationToken,
) {
    info!(addr = ?listener.local_addr().ok(), "NBD server listening on unix socket");
    NbdServer::with_defaults(exports).serve_unix(listener, shutdown).await
}
