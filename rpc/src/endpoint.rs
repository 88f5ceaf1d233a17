//! [`RpcEndpoint`]: one QUIC endpoint per process, serving a [`Service`] and calling peers.
//!
//! Each bidirectional stream carries exactly one request frame and one response frame (see
//! [`crate::frame`]); streams are cheap in QUIC, so concurrent calls to a peer share one
//! connection without head-of-line blocking between them.

use crate::error::{code, Result, RpcError};
use crate::frame;
use crate::link;
use crate::outbox::{self, InFlight, Outbox, OutboxHandle, MAX_QUEUED_DATA};
use crate::tls::{self, Identity, SERVER_NAME};
use async_trait::async_trait;
use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, RecvStream, Runtime, SendStream, VarInt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

/// Per-stream flow-control window: a whole block write is in flight without waiting for
/// window updates at LAN round-trip times.
const STREAM_RECEIVE_WINDOW: u32 = 16 << 20;
/// Per-connection flow-control window (all streams together), and our send window to match.
const CONNECTION_RECEIVE_WINDOW: u32 = 64 << 20;
/// Concurrent calls one peer may have open on a connection; more wait for a free stream.
const MAX_CONCURRENT_CALLS: u32 = 1024;
const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// A peer silent for this long (despite the keep-alives) is taken as dead.
const IDLE_TIMEOUT_MS: u32 = 5_000;
/// UDP socket buffers wanted for bulk transfers; the kernel may cap them (net.core.rmem_max).
const SOCKET_BUFFER: usize = 8 << 20;
/// Largest UDP payload we accept: any datagram (quinn's limit), so a peer's packet size is
/// bounded by its own link (see [`crate::link`]), not by ours.
const MAX_RECEIVED_PAYLOAD: u16 = 65527;

/// The serving side of the protocol: one call per stream.
#[async_trait]
pub trait Service: Send + Sync + 'static {
    type Request: DeserializeOwned + Send + 'static;
    type Response: Serialize + Send + 'static;

    /// Handles one request. `data` is the frame's bulk part, returned data likewise.
    /// Errors belong in `Response`; a panic resets the caller's stream.
    async fn call(&self, peer: PeerInfo, req: Self::Request, data: Bytes)
        -> (Self::Response, Bytes);
}

/// Who sent a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// Common name of the peer's certificate (its node name, or e.g. "admin" for the CLI).
    pub name: Option<String>,
}

/// A connection being made or made; concurrent callers to one address share it.
type Slot = Arc<OnceCell<Peer>>;

/// A connection to a peer and the outbox of its small frames.
#[derive(Clone)]
struct Peer {
    conn: Connection,
    outbox: Arc<OutboxHandle>,
}

pub struct RpcEndpoint {
    endpoint: quinn::Endpoint,
    serves: bool,
    connections: Mutex<HashMap<SocketAddr, Slot>>,
}

impl std::fmt::Debug for RpcEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcEndpoint")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .field("serves", &self.serves)
            .finish_non_exhaustive()
    }
}

impl RpcEndpoint {
    /// An endpoint that serves on `socket` (bound by the caller) and calls peers from it.
    /// Must be called inside a Tokio runtime.
    pub fn new(socket: UdpSocket, identity: &Identity) -> Result<Arc<RpcEndpoint>> {
        Self::build(socket, identity, true)
    }

    /// An endpoint that only calls (the CLI, with an "admin" identity), on an ephemeral
    /// IPv4 port. Must be called inside a Tokio runtime.
    pub fn client_only(identity: &Identity) -> Result<Arc<RpcEndpoint>> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        Self::build(socket, identity, false)
    }

    fn build(socket: UdpSocket, identity: &Identity, serves: bool) -> Result<Arc<RpcEndpoint>> {
        let shape = link::shape_for(socket.local_addr()?);
        debug!(payload = shape.payload, segments = shape.segments, "QUIC packet size for this link");
        let transport = Arc::new(transport_config(shape.payload));
        let client_crypto = QuicClientConfig::try_from(identity.client_config()?)
            .map_err(|e| RpcError::Tls(format!("client config: {e}")))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport.clone());
        let server = if serves {
            let server_crypto = QuicServerConfig::try_from(identity.server_config()?)
                .map_err(|e| RpcError::Tls(format!("server config: {e}")))?;
            let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
            server.transport_config(transport);
            Some(server)
        } else {
            None
        };
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(identity.reset_key()?));
        endpoint_config.max_udp_payload_size(MAX_RECEIVED_PAYLOAD).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("max UDP payload: {e}"))
        })?;
        tune_socket(&socket);
        socket.set_nonblocking(true)?;
        let runtime = Arc::new(quinn::TokioRuntime);
        let socket = Arc::new(link::Segmented::new(runtime.wrap_udp_socket(socket)?, shape.segments));
        let mut endpoint = quinn::Endpoint::new_with_abstract_socket(endpoint_config, server, socket, runtime)?;
        endpoint.set_default_client_config(client);
        Ok(Arc::new(RpcEndpoint { endpoint, serves, connections: Mutex::new(HashMap::new()) }))
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Closes every connection at once (peers see the close right away and reconnect
    /// elsewhere or later); calls in flight fail. Use the `serve` shutdown token first for a
    /// graceful stop.
    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(code::OK), b"endpoint closed");
        self.lock_connections().clear();
    }

    /// Waits until the close has been delivered to all peers (or timed out).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }

    /// Serves `service` until `shutdown` is cancelled or the endpoint is closed. On shutdown,
    /// new connections and calls are refused, calls in progress run to their end and their
    /// responses are sent, and each connection is closed once the peer has acknowledged
    /// them (or after a short bound, for a peer that has gone silent); returns when that is
    /// done. (A response written just before the shutdown began is not followed: quinn has
    /// normally sent it long before the calls still running end and the connection closes.)
    pub async fn serve<S: Service>(&self, service: Arc<S>, shutdown: CancellationToken) {
        if !self.serves {
            error!("serve called on a client-only endpoint");
            return;
        }
        let connections = TaskTracker::new();
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            connections.spawn(serve_connection(incoming, service.clone(), shutdown.clone()));
        }
        connections.close();
        connections.wait().await;
    }

    /// Calls the peer at `addr`: sends `req` and `data`, returns its response and data.
    /// `timeout` bounds the whole call, connecting included.
    pub async fn call<Req, Resp>(
        &self,
        addr: SocketAddr,
        req: &Req,
        data: Bytes,
        timeout: Duration,
    ) -> Result<(Resp, Bytes)>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let header = frame::encode(req, data.len())?;
        let result = match tokio::time::timeout(timeout, self.exchange(addr, header, data)).await {
            Ok(result) => result,
            Err(_) => Err(RpcError::Timeout { addr, timeout }),
        };
        if let Err(RpcError::Handshake { reason, .. }) = &result {
            warn!(peer = %addr, %reason, "TLS handshake failed");
        }
        result
    }

    /// [`RpcEndpoint::call`] with the address as text ("10.0.0.5:7000", or a host name to
    /// resolve within the timeout).
    pub async fn call_str<Req, Resp>(
        &self,
        addr: &str,
        req: &Req,
        data: Bytes,
        timeout: Duration,
    ) -> Result<(Resp, Bytes)>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        if let Ok(parsed) = addr.parse() {
            return self.call(parsed, req, data, timeout).await;
        }
        let start = Instant::now();
        // Prefer an address of our socket's family: a client bound to 0.0.0.0 cannot reach
        // "localhost" resolved to ::1.
        let ipv4 = self.endpoint.local_addr().map(|a| a.is_ipv4()).unwrap_or(true);
        let resolved = match tokio::time::timeout(timeout, tokio::net::lookup_host(addr)).await {
            Ok(Ok(addrs)) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                addrs.iter().find(|a| a.is_ipv4() == ipv4).or(addrs.first()).copied()
            }
            Ok(Err(_)) | Err(_) => None,
        };
        let resolved = resolved.ok_or_else(|| RpcError::InvalidAddress(addr.to_owned()))?;
        self.call(resolved, req, data, timeout.saturating_sub(start.elapsed())).await
    }

    async fn exchange<Resp: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        header: Bytes,
        data: Bytes,
    ) -> Result<(Resp, Bytes)> {
        let (outbox, send, recv) = self.open_stream(addr).await?;
        let _in_flight = outbox.call_started();
        let mut streams = CallStreams { send: Some(send), recv, received: false };
        if data.len() <= MAX_QUEUED_DATA && !outbox.alone() {
            if let Some(send) = streams.send.take() {
                outbox.push(send, header, data);
            }
        } else if let Some(send) = streams.send.as_mut() {
            frame::write(send, addr, header, data).await?;
            streams.send = None;
        }
        let response = frame::read(&mut streams.recv, addr).await?;
        streams.received = true;
        Ok(response)
    }

    async fn open_stream(&self, addr: SocketAddr) -> Result<(Arc<OutboxHandle>, SendStream, RecvStream)> {
        let (peer, fresh) = self.peer(addr).await?;
        match peer.conn.open_bi().await {
            Ok((send, recv)) => Ok((peer.outbox, send, recv)),
            // The cached connection died after we picked it. Nothing was sent on it for
            // this call, so a new connection is safe; `peer` replaces the dead one.
            Err(e) if !fresh => {
                debug!(peer = %addr, error = %e, "cached connection is gone, reconnecting");
                let (peer, _) = self.peer(addr).await?;
                let (send, recv) = peer.conn.open_bi().await.map_err(|e| RpcError::from_connection(addr, e, false))?;
                Ok((peer.outbox, send, recv))
            }
            Err(e) => Err(RpcError::from_connection(addr, e, false)),
        }
    }

    /// The connection to `addr` (see [`RpcEndpoint::peer`]).
    #[cfg(test)]
    pub(crate) async fn connection(&self, addr: SocketAddr) -> Result<(Connection, bool)> {
        self.peer(addr).await.map(|(peer, fresh)| (peer.conn, fresh))
    }

    /// The connection to `addr` with its outbox, made if needed, and whether this call made
    /// it. Only callers to the same address wait for a handshake in progress.
    async fn peer(&self, addr: SocketAddr) -> Result<(Peer, bool)> {
        let slot = {
            let mut connections = self.lock_connections();
            let slot = connections.entry(addr).or_default();
            match slot.get() {
                Some(peer) if peer.conn.close_reason().is_none() => return Ok((peer.clone(), false)),
                Some(_) => *slot = Slot::default(),
                None => {}
            }
            slot.clone()
        };
        let mut fresh = false;
        let peer = slot
            .get_or_try_init(|| {
                fresh = true;
                async move {
                    let conn = self.connect(addr).await?;
                    // The writer ends with the connection or the last handle. A caller's
                    // requests have no shutdown to wait through: its token never fires.
                    let (outbox, _writer) = Outbox::start(conn.clone(), addr, CancellationToken::new());
                    Ok::<_, RpcError>(Peer { conn, outbox: Arc::new(outbox) })
                }
            })
            .await?;
        Ok((peer.clone(), fresh))
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Connection> {
        let connecting = self.endpoint.connect(addr, SERVER_NAME).map_err(|e| match e {
            quinn::ConnectError::EndpointStopping => RpcError::Closed,
            other => RpcError::Connect { addr, reason: other.to_string() },
        })?;
        let conn = connecting.await.map_err(|e| RpcError::from_connection(addr, e, true))?;
        debug!(peer = %addr, "connected");
        Ok(conn)
    }

    fn lock_connections(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Slot>> {
        // The map holds no invariant a panicking holder could break half-way.
        self.connections.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    pub(crate) fn open_connections(&self) -> usize {
        self.endpoint.open_connections()
    }
}

/// The two halves of a call's stream. quinn finishes a send stream that is dropped, which
/// the server would read as a truncated request; a call abandoned half-way (timeout,
/// dropped future, error) resets it instead, and stops the response it no longer wants.
/// `send` is None once the request is written or handed to the outbox (which sends a
/// request whole even if its caller has given up, as a request already sent is answered).
struct CallStreams {
    send: Option<SendStream>,
    recv: RecvStream,
    received: bool,
}

impl Drop for CallStreams {
    fn drop(&mut self) {
        let cancelled = VarInt::from_u32(code::CANCELLED);
        if let Some(send) = self.send.as_mut() {
            let _ = send.reset(cancelled);
        }
        if !self.received {
            let _ = self.recv.stop(cancelled);
        }
    }
}

/// The send half of a served stream: reset with `INTERNAL` if no response gets sent (the
/// service panicked), rather than finished, which the caller would read as truncated.
/// None once the response is written or queued.
struct ResponseStream(Option<SendStream>);

impl ResponseStream {
    fn reset(&mut self, code: u32) {
        if let Some(mut send) = self.0.take() {
            let _ = send.reset(VarInt::from_u32(code));
        }
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        self.reset(code::INTERNAL);
    }
}

async fn serve_connection<S: Service>(
    incoming: quinn::Incoming,
    service: Arc<S>,
    shutdown: CancellationToken,
) {
    let addr = incoming.remote_address();
    let handshake = tokio::select! {
        _ = shutdown.cancelled() => return,
        handshake = incoming => handshake,
    };
    let conn = match handshake {
        Ok(conn) => conn,
        Err(e) => {
            match RpcError::from_connection(addr, e, true) {
                RpcError::Handshake { reason, .. } => {
                    warn!(peer = %addr, %reason, "refused connection: TLS handshake failed")
                }
                other => debug!(peer = %addr, error = %other, "incoming connection failed"),
            }
            return;
        }
    };
    let peer = PeerInfo { addr, name: peer_name(&conn) };
    debug!(peer = %addr, peer_name = ?peer.name, "accepted connection");
    let streams = TaskTracker::new();
    let (outbox, writer) = Outbox::start(conn.clone(), addr, shutdown.clone());
    let outbox = Arc::new(outbox);
    loop {
        let (send, recv) = tokio::select! {
            _ = shutdown.cancelled() => break,
            stream = conn.accept_bi() => match stream {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(peer = %addr, peer_name = ?peer.name, reason = %e, "connection closed");
                    break;
                }
            },
        };
        let in_flight = outbox.call_started();
        let shutdown = shutdown.clone();
        streams.spawn(serve_stream(service.clone(), peer.clone(), outbox.clone(), in_flight, shutdown, send, recv));
    }
    streams.close();
    streams.wait().await;
    // The last responses may still be queued: the writer writes them once its handle goes.
    drop(outbox);
    let _ = writer.await;
    if shutdown.is_cancelled() {
        conn.close(VarInt::from_u32(code::SHUTTING_DOWN), b"shutting down");
    }
}

async fn serve_stream<S: Service>(
    service: Arc<S>,
    peer: PeerInfo,
    outbox: Arc<OutboxHandle>,
    in_flight: InFlight,
    shutdown: CancellationToken,
    send: SendStream,
    mut recv: RecvStream,
) {
    let mut response = ResponseStream(Some(send));
    let (req, data) = match frame::read::<S::Request>(&mut recv, peer.addr).await {
        Ok(request) => request,
        Err(e) => {
            let code = match e {
                RpcError::FrameTooLarge { .. } => code::TOO_LARGE,
                RpcError::Decode(_) => code::MALFORMED,
                // The caller went away or gave up: nothing wrong with the protocol.
                other => {
                    debug!(peer = %peer.addr, peer_name = ?peer.name, error = %other, "request not received");
                    response.reset(code::CANCELLED);
                    return;
                }
            };
            warn!(peer = %peer.addr, peer_name = ?peer.name, error = %e, "refusing a bad request frame");
            let _ = recv.stop(VarInt::from_u32(code));
            response.reset(code);
            return;
        }
    };
    let addr = peer.addr;
    let (resp, data) = service.call(peer, req, data).await;
    let header = match frame::encode(&resp, data.len()) {
        Ok(header) => header,
        Err(e) => {
            error!(peer = %addr, error = %e, "cannot encode a response");
            response.reset(code::INTERNAL);
            return;
        }
    };
    let Some(mut send) = response.0.take() else { return };
    if data.len() <= MAX_QUEUED_DATA && !outbox.alone() {
        outbox.push(send, header, data);
        // Counted until queued, so the writer waits for this round's other responses.
        drop(in_flight);
    } else if let Err(e) = frame::write(&mut send, addr, header, data).await {
        debug!(peer = %addr, error = %e, "response not delivered");
    } else if shutdown.is_cancelled() {
        outbox::acknowledged([send.stopped()], addr).await;
    }
}

/// The common name of the certificate the peer authenticated with.
fn peer_name(conn: &Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    chain.first().and_then(|cert| tls::common_name(cert))
}

fn transport_config(max_payload: u16) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(max_payload);
    transport.mtu_discovery_config(Some(mtu));
    transport
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(u64::from(CONNECTION_RECEIVE_WINDOW))
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_CALLS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None)
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
    transport
}

/// Asks for large UDP buffers so bursts of block data are not dropped by the kernel before
/// quinn reads them. Best effort: the kernel caps unprivileged requests.
fn tune_socket(socket: &UdpSocket) {
    let state = match quinn::udp::UdpSocketState::new(socket.into()) {
        Ok(state) => state,
        Err(e) => {
            debug!(error = %e, "cannot inspect the UDP socket");
            return;
        }
    };
    if let Err(e) = state.set_recv_buffer_size(socket.into(), SOCKET_BUFFER) {
        debug!(error = %e, "cannot enlarge the UDP receive buffer");
    }
    if let Err(e) = state.set_send_buffer_size(socket.into(), SOCKET_BUFFER) {
        debug!(error = %e, "cannot enlarge the UDP send buffer");
    }
    debug!(
        recv_buffer = state.recv_buffer_size(socket.into()).ok(),
        send_buffer = state.send_buffer_size(socket.into()).ok(),
        "UDP socket buffers"
    );
}
