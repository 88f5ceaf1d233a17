//! The iSCSI network portal: accepts TCP connections and runs each in its own task, with
//! a tracing span naming the peer, and later the initiator and target, until shutdown.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::conn::{self, Config, Context, Sessions};
use crate::lu::TargetRegistry;

/// Serves the portal with the default [`Config`] and a session table of its own.
pub async fn serve(listener: TcpListener, registry: Arc<dyn TargetRegistry>, shutdown: CancellationToken) {
    serve_with(listener, registry, Config::default(), Sessions::new(), shutdown).await
}

/// Accepts connections until `shutdown` fires, then waits for the connections to close
/// (each tells its initiator and ends on the same token). Whoever holds `sessions` can
/// close sessions whose target changed ([`Sessions::revalidate`]).
pub async fn serve_with(
    listener: TcpListener,
    registry: Arc<dyn TargetRegistry>,
    config: Config,
    sessions: Arc<Sessions>,
    shutdown: CancellationToken,
) {
    let ctx = Context { registry, sessions, config: Arc::new(config), shutdown: shutdown.clone() };
    let local = listener.local_addr().ok();
    info!(addr = ?local, "iSCSI portal listening");
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    // Latency matters more than segment count for iSCSI's small PDUs.
                    let _ = stream.set_nodelay(true);
                    let span = info_span!("iscsi_conn", %peer, initiator = tracing::field::Empty, target = tracing::field::Empty);
                    let ctx = ctx.clone();
                    conns.spawn(
                        async move {
                            match conn::serve_connection_from(stream, Some(peer), ctx).await {
                                Ok(()) => info!("connection closed"),
                                // Malformed PDUs, digest errors, timeouts: this connection
                                // ends, the daemon does not.
                                Err(e) => warn!(reason = %e, "connection closed on error"),
                            }
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(r) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = r {
                    if e.is_panic() {
                        warn!(error = %e, "connection task panicked");
                    }
                }
            }
            _ = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    // Connections see the same token and close themselves; bound the wait anyway.
    let wait = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(10), wait).await.is_err() {
        warn!("connections still open after shutdown grace period; aborting them");
        conns.abort_all();
    }
    info!("iSCSI portal stopped");
}
