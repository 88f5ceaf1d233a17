//! End-to-end tests of the endpoint over loopback QUIC.

use crate::error::code;
use crate::frame::{self, MAGIC, MAX_HEADER_LEN};
use crate::{ClusterCa, Identity, PeerInfo, RpcEndpoint, RpcError, Service};
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
enum TestRequest {
    Echo { id: u64, text: String },
    Padding(Vec<u8>),
    Panic,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct TestResponse {
    id: u64,
    text: String,
    peer_name: Option<String>,
    data_len: u64,
}

/// Echoes the request's text and data back, and says who it thinks the caller is.
struct EchoService;

#[async_trait]
impl Service for EchoService {
    type Request = TestRequest;
    type Response = TestResponse;

    async fn call(&self, peer: PeerInfo, req: TestRequest, data: Bytes) -> (TestResponse, Bytes) {
        let (id, text) = match req {
            TestRequest::Echo { id, text } => (id, text),
            TestRequest::Padding(p) => (p.len() as u64, String::new()),
            TestRequest::Panic => panic!("test service asked to panic"),
        };
        let resp = TestResponse { id, text, peer_name: peer.name, data_len: data.len() as u64 };
        (resp, data)
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

struct Server {
    endpoint: Arc<RpcEndpoint>,
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    fn start(identity: &Identity) -> std::result::Result<Server, RpcError> {
        Self::start_on(UdpSocket::bind("127.0.0.1:0")?, identity)
    }

    fn start_on(socket: UdpSocket, identity: &Identity) -> std::result::Result<Server, RpcError> {
        let endpoint = RpcEndpoint::new(socket, identity)?;
        let addr = endpoint.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let endpoint = endpoint.clone();
            let shutdown = shutdown.clone();
            async move { endpoint.serve(Arc::new(EchoService), shutdown).await }
        });
        Ok(Server { endpoint, addr, shutdown, task })
    }

    async fn stop(self) -> TestResult {
        self.shutdown.cancel();
        tokio::time::timeout(TIMEOUT, self.task).await??;
        self.endpoint.close();
        self.endpoint.wait_idle().await;
        Ok(())
    }
}

fn pattern(len: usize, seed: u64) -> Bytes {
    (0..len).map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed) % 251) as u8).collect()
}

async fn echo(
    client: &RpcEndpoint,
    addr: SocketAddr,
    id: u64,
    data: Bytes,
) -> std::result::Result<(TestResponse, Bytes), RpcError> {
    let req = TestRequest::Echo { id, text: format!("request {id}") };
    client.call(addr, &req, data, TIMEOUT).await
}

/// Sends `bytes` as a whole request on a raw stream of `client`'s connection to `addr` and
/// returns the reset code the server answers with (None if it answered normally).
async fn raw_request(
    client: &RpcEndpoint,
    addr: SocketAddr,
    bytes: Vec<u8>,
) -> std::result::Result<Option<u64>, Box<dyn std::error::Error + Send + Sync>> {
    let (conn, _) = client.connection(addr).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    // The server may reset before it has read everything; that write error is expected.
    let _ = send.write_all(&bytes).await;
    let _ = send.finish();
    let outcome = tokio::time::timeout(TIMEOUT, recv.read_to_end(usize::MAX)).await?;
    match outcome {
        Ok(_) => Ok(None),
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            Ok(Some(code.into_inner()))
        }
        Err(e) => Err(e.into()),
    }
}

fn prefix(magic: u32, header_len: u32, data_len: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&magic.to_le_bytes());
    bytes.extend_from_slice(&header_len.to_le_bytes());
    bytes.extend_from_slice(&data_len.to_le_bytes());
    bytes
}

#[tokio::test]
async fn round_trip_carries_the_header_and_one_mib_of_data() -> TestResult {
    init_tracing();
    let ca = ClusterCa::generate("test")?;
    let server = Server::start(&ca.issue("node-1")?)?;
    let client = RpcEndpoint::client_only(&ca.issue("client-7")?)?;

    let data = pattern(1 << 20, 5);
    let (resp, back) = echo(&client, server.addr, 42, data.clone()).await?;
    assert_eq!(
        resp,
        TestResponse {
            id: 42,
            text: "request 42".into(),
            peer_name: Some("client-7".into()),
            data_len: 1 << 20,
        }
    );
    assert_eq!(back, data);
    server.stop().await
}

/// Loopback allows any packet size, so MTU discovery must reach the bound of the sender's
/// link; a bound whose GSO batches the kernel refuses shows up as losses and a fall back to
/// 1200 byte packets. A client on a wildcard address (link unknown) uses the default shape;
/// one bound to a loopback address sends the largest datagrams loopback carries.
#[tokio::test]
async fn bulk_calls_over_loopback_settle_on_large_packets() -> TestResult {
    init_tracing();
    let ca = ClusterCa::generate("test")?;
    let server = Server::start(&ca.issue("node-1")?)?;
    let wildcard = RpcEndpoint::client_only(&ca.issue("client")?)?;
    let on_loopback = RpcEndpoint::new(UdpSocket::bind("127.0.0.1:0")?, &ca.issue("node-2")?)?;
    let loopback = crate::link::shape_for(on_loopback.local_addr()?);
    assert!(loopback.payload > crate::link::UNKNOWN_LINK.payload, "{loopback:?}");
    for (client, want) in [(&wildcard, crate::link::UNKNOWN_LINK.payload), (&on_loopback, loopback.payload)] {
        let data = pattern(4 << 20, 9);
        let deadline = Instant::now() + TIMEOUT;
        let mtu = loop {
            let (_, back) = echo(client, server.addr, 1, data.clone()).await?;
            assert_eq!(back, data);
            let (conn, _) = client.connection(server.addr).await?;
            let mtu = conn.stats().path.current_mtu;
            if mtu == want || Instant::now() >= deadline {
                break mtu;
            }
        };
        assert_eq!(mtu, want, "MTU discovery stopped short");
        let (conn, _) = client.connection(server.addr).await?;
        assert_eq!(conn.stats().path.black_holes_detected, 0);
        // The server's packets to us grow to its own link's bound (loopback for both).
        let data = pattern(4 << 20, 3);
        let (_, back) = echo(client, server.addr, 2, data.clone()).await?;
        assert_eq!(back, data);
    }
    on_loopback.close();
    server.stop().await
}

#[tokio::test]
async fn an_empty_data_part_round_trips() -> TestResult {
    init_tracing();
    let ca = ClusterCa::generate("test")?;
    let server = Server::start(&ca.issue("node-1")?)?;
    let client = RpcEndpoint::client_only(&ca.issue("client")?)?;
    let (resp, back) = echo(&client, server.addr, 1, Bytes::new()).await?;
    assert_eq!(resp.data_len, 0);
    assert!(back.is_empty());
    server.stop().await
}

#[tokio::test]
async fn two_hundred_concurrent_calls_share_one_connection() -> TestResult {
    init_tracing();
    let ca = ClusterCa::generate("test")?;
    let server = Server::start(&ca.issue("node-1")?)?;
    let client = RpcEndpoint::client_only(&ca.issue("client")?)?;

    let mut calls = tokio::task::JoinSet::new();
    for id in 0..200u64 {
        let client = client.clone();
        let addr = server.addr;
        calls.spawn(async move {
            let data = pattern(4096 + id as usize, id);
            let result = echo(&client, addr, id, data.clone()).await;
            (id, data, result)
        });
    }
    let mut answered = 0;
    while let Some(joined) = calls.join_next().await {
        let (id, data, result) = joined?;
        let (resp, back) = result?;
        assert_eq!(resp.id, id);
        assert_eq!(resp.text, format!("request {id}"));
        assert_eq!(back, data);
        answered += 1;
    }
    assert_eq!(answered, 200);
    assert_eq!(client.open_connections(), 1);
    server.stop().await
}

#[tokio::test]
async fn a_client_with_a_foreign_certificate_is_refused() -> TestResult {
    init_tracing();
    let ca = ClusterCa::generate("test")?;
    let foreign = ClusterCa::generate("elsewhere")?;
    let server = Server::start(&ca.issue("node-1")?)?;

    // The intruder trusts our CA (so it would accept the server) but its own certificate
    // comes from another CA: only the server's check can stop it.
    let intruder = Identity { ca_pem: ca.cert_pem().to_owned(), ..foreign.issue("intruder")? };
    let intruder = RpcEndpoint::client_only(&intruder)?;
    match echo(&intruder, server.addr, 1, Bytes::from_static(b"x")).await {
        Err(RpcError::Handshake { .. }) => {}
        other => panic!("expected a handshake refusal, got {other:?}"),
    }

    // The server still serves members.
    let client = RpcEndpoint::client_only(&ca.issue("client")?)?;
    echo(&client, server.addr, 2, Bytes::new()).await?;
    server.stop().await
}

#[tokio::test]
async fn a_server_with_a_foreign_certificate_is_refused() -> TestResult {
    init_tracing();
    let ca = ClusterCa::generate("test")?;
    let foreign = ClusterCa::generate("elsewhere")?;
    // The impostor trusts our CA (so it would accept our client) but presents a
    // certificate from another CA: only the client's check can stop it.
    let impostor = Identity { ca_pem: ca.cert_pem().to_owned(), ..foreign.issue("node-1")? };
    let server = Server::start(&impostor)?;
    let client = RpcEndpoint::client_only(&ca.issue("client")?)?;
    match echo(&client, server.addr, 1, Bytes::new()).await {
        Err(e @ RpcError::Handshake { .. }) => assert!(!e.is_retryable()),
        other => panic!("expected a handshake refusal, got {other:?}"),
    }
    server.stop().await
}

#[tokio::test]
async fn identities_from_a_saved_and_reloaded_ca_are_trusted() -> TestResult {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let ca = ClusterCa::generate("test")?;
    ca.save(dir.path())?;
    let server_id = ca.issue("node-1")?;
    server_id.save(&dir.path().join("node-1"), "node-1")?;

    let reloaded = ClusterCa::load(dir.path())?;
    let server = Server::start(&Identity::load(&dir.path().join("node-1"), "node-1")?)?;
    let client = RpcEndpoint::client_only(&reloaded.issue("client")?)?;
    let (resp, _) = echo(&client, server.addr, 3, Bytes::new()).await?;
    assert_eq!(resp.peer_name.as_deref(), Some("client"));
    server.stop().await
}

#[tokio::test]
async fn malformed_frames_reset_their_stream_and_the_server_keeps_serving() -> TestResult {
    init_tracing();
    let ca = ClusterCa::generate("test")?;
    let server = Server::start(&ca.issue("node-1")?)?;
    let client = RpcEndpoint::client_only(&ca.issue("client")?)?;
    let malformed = Some(u64::from(code::MALFORMED));

    let garbage = b"GET / HTTP/1.1\r\nHost: basalt\r\n\r\n".to_vec();
    assert_eq!(raw_request(&client, server.addr, garbage).await?, malformed);

    let mut truncated = prefix(MAGIC, 100, 0);
    truncated.extend_from_slice(&[0; 10]);
    assert_eq!(raw_request(&client, server.addr, truncated).await?, malformed);

    // A variant index far beyond the request enum's.
    let mut undecodable = prefix(MAGIC, 2, 0);
    undecodable.extend_from_slice(&[0x7f, 0x00]);
    assert_eq!(raw_request(&client, server.addr, undecodable).await?, malformed);

    let mut trailing = frame::encode(&TestRequest::Panic, 0)?.to_vec();
    trailing.push(0);
    assert_eq!(raw_request(&client, server.addr, trailing).await?, malformed);

    // A well-formed frame written by hand is answered on the same connection...
    let good = frame::encode(&TestRequest::Echo { id: 9, text: "raw".into() }, 0)?.to_vec();
    assert_eq!(raw_request(&client, server.addr, good).await?, None);
    // ...and so are normal calls, on it and on a new one.
    echo(&client, server.addr, 10, Bytes::from_static(b"after")).await?;
    assert_eq!(client.open_connections(), 1);
    let other = RpcEndpoint::client_only(&ca.issue("other")?)?;
    echo(&other, server.addr, 11, Bytes::new()).await?;
    server.stop().await
}

#[tokio::test]
async fn oversize_frames_are_refused_on_both_sides() -> TestResult {
    init_tracing();
    let ca = ClusterCa::generate("test")?;
    let server = Server::start(&ca.issue("node-1")?)?;
    let client = RpcEndpoint::client_only(&ca.issue("client")?)?;
    let too_large = Some(u64::from(code::TOO_LARGE));

    // The caller refuses to send a header over the limit.
    let padding = TestRequest::Padding(vec![0; MAX_HEADER_LEN + 1]);
    match client.call::<_, TestResponse>(server.addr, &padding, Bytes::new(), TIMEOUT).await {
        Err(RpcError::FrameTooLarge { part: "header", .. }) => {}
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }

    // The server refuses from the prefix alone, without waiting for the announced bytes.
    let header_len = u32::try_from(MAX_HEADER_LEN + 1)?;
    assert_eq!(raw_request(&client, server.addr, prefix(MAGIC, header_len, 0)).await?, too_large);
    let huge_data = prefix(MAGIC, 1, frame::MAX_DATA_LEN + 1);
    assert_eq!(raw_request(&client, server.addr, huge_data).await?, too_large);

    echo(&client, server.addr, 1, Bytes::from_static(b"still here")).await?;
    server.stop().await
}

#[tokio::test]
async fn a_panicking_service_resets_only_that_call() -> TestResult {
    init_tracing();
    let ca = ClusterCa::generate("test")?;
    let server = Server::start(&ca.issue("node-1")?)?;
    let client = RpcEndpoint::client_only(&ca.issue("client")?)?;
    match client.call::<_, TestResponse>(server.addr, &TestRequest::Panic, Bytes::new(), TIMEOUT).await
    {
        Err(RpcError::StreamReset { code, .. }) => assert_eq!(code, u64::from(code::INTERNAL)),
        other => panic!("expected a reset, got {other:?}"),
    }
    echo(&client, server.addr, 1, Bytes::new()).await?;
    server.stop().await
}

#[tokio::test]
async fn calls_reconnect_after_the_server_restarts_on_the_same_port() -> TestResult {
    init_tracing();
    let ca = ClusterCa::generate("test")?;
    let server_id = ca.issue("node-1")?;
    let server = Server::start(&server_id)?;
    let addr = server.addr;
    let client = RpcEndpoint::client_only(&ca.issue("client")?)?;
    echo(&client, addr, 1, Bytes::new()).await?;

    server.stop().await?;
    // The old endpoint's socket is released once its driver has wound down.
    let deadline = Instant::now() + TIMEOUT;
    let socket = loop {
        match UdpSocket::bind(addr) {
            Ok(socket) => break socket,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let server = Server::start_on(socket, &server_id)?;
    let (resp, _) = echo(&client, addr, 2, Bytes::from_static(b"again")).await?;
    assert_eq!(resp.id, 2);
    server.stop().await
}

#[tokio::test]
async fn a_call_to_a_silent_address_times_out_on_time() -> TestResult {
    init_tracing();
    let ca = ClusterCa::generate("test")?;
    let client = RpcEndpoint::client_only(&ca.issue("client")?)?;
    // Bound but never read: packets vanish, as with a dead host.
    let silent = UdpSocket::bind("127.0.0.1:0")?;
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let req = TestRequest::Echo { id: 1, text: String::new() };
    let result = client.call::<_, TestResponse>(silent.local_addr()?, &req, Bytes::new(), timeout).await;
    let elapsed = start.elapsed();
    match result {
        Err(e @ RpcError::Timeout { .. }) => assert!(e.is_retryable()),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(elapsed >= timeout);
    assert!(elapsed < timeout + Duration::from_millis(500), "took {elapsed:?}");
    Ok(())
}

#[tokio::test]
async fn call_str_parses_and_resolves_addresses() -> TestResult {
    init_tracing();
    let ca = ClusterCa::generate("test")?;
    let server = Server::start(&ca.issue("node-1")?)?;
    let client = RpcEndpoint::client_only(&ca.issue("client")?)?;
    let req = TestRequest::Echo { id: 5, text: "s".into() };
    let text = server.addr.to_string();
    let (resp, _): (TestResponse, _) = client.call_str(&text, &req, Bytes::new(), TIMEOUT).await?;
    assert_eq!(resp.id, 5);
    let by_name = format!("localhost:{}", server.addr.port());
    let (resp, _): (TestResponse, _) = client.call_str(&by_name, &req, Bytes::new(), TIMEOUT).await?;
    assert_eq!(resp.id, 5);
    match client.call_str::<_, TestResponse>("not an address", &req, Bytes::new(), TIMEOUT).await {
        Err(RpcError::InvalidAddress(_)) => {}
        other => panic!("expected InvalidAddress, got {other:?}"),
    }
    server.stop().await
}

/// Small frames of concurrent calls go through the connection's outbox and share packets:
/// 64 requests of 512 bytes take a handful of datagrams (72 without the outbox). On the
/// multi-threaded runtime, as a node runs: there a task woken by another runs right after
/// it, so quinn's driver would send each call's frame as soon as it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn concurrent_small_calls_share_packets() -> TestResult {
    init_tracing();
    let ca = ClusterCa::generate("test")?;
    let server = Server::start(&ca.issue("node-1")?)?;
    let client = RpcEndpoint::new(UdpSocket::bind("127.0.0.1:0")?, &ca.issue("node-2")?)?;
    echo(&client, server.addr, 0, Bytes::new()).await?;
    let (conn, _) = client.connection(server.addr).await?;
    let before = conn.stats().udp_tx.datagrams;
    const CALLS: u64 = 64;
    let mut calls = tokio::task::JoinSet::new();
    for id in 1..=CALLS {
        let client = client.clone();
        let addr = server.addr;
        calls.spawn(async move {
            let data = pattern(512, id);
            let (resp, back) = echo(&client, addr, id, data.clone()).await?;
            assert_eq!((resp.id, back), (id, data));
            Ok::<_, RpcError>(())
        });
    }
    while let Some(joined) = calls.join_next().await {
        joined??;
    }
    // Acknowledgements of the responses are in the count too.
    let sent = conn.stats().udp_tx.datagrams - before;
    assert!(sent < CALLS / 3, "{sent} datagrams for {CALLS} requests");
    client.close();
    server.stop().await
}


/// Holds every call until released, counting the calls it holds.
struct GatedService {
    started: tokio::sync::Semaphore,
    release: tokio::sync::Notify,
    released: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Service for GatedService {
    type Request = TestRequest;
    type Response = TestResponse;

    async fn call(&self, peer: PeerInfo, req: TestRequest, data: Bytes) -> (TestResponse, Bytes) {
        self.started.add_permits(1);
        loop {
            let released = self.release.notified();
            if self.released.load(std::sync::atomic::Ordering::Acquire) {
                break;
            }
            released.await;
        }
        EchoService.call(peer, req, data).await
    }
}

/// A call in progress when the server is told to shut down gets its response: the server
/// waits for the peer to acknowledge it before closing the connection. Both ways a
/// response leaves are covered: a lone call writes its own, concurrent calls go through
/// the connection's outbox, and a large one is written by its call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_progress_at_shutdown_get_their_responses() -> TestResult {
    init_tracing();
    let ca = ClusterCa::generate("test")?;
    for (calls, len) in [(1u64, 16usize), (16, 512), (4, 2 << 20)] {
        let endpoint = RpcEndpoint::new(UdpSocket::bind("127.0.0.1:0")?, &ca.issue("node-1")?)?;
        let addr = endpoint.local_addr()?;
        let service = Arc::new(GatedService {
            started: tokio::sync::Semaphore::new(0),
            release: tokio::sync::Notify::new(),
            released: std::sync::atomic::AtomicBool::new(false),
        });
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn({
            let (endpoint, service, shutdown) =
                (endpoint.clone(), service.clone(), shutdown.clone());
            async move { endpoint.serve(service, shutdown).await }
        });
        let client = RpcEndpoint::client_only(&ca.issue("client")?)?;
        let mut pending = tokio::task::JoinSet::new();
        for id in 0..calls {
            let client = client.clone();
            pending.spawn(async move {
                let data = pattern(len, id);
                let (resp, back) = echo(&client, addr, id, data.clone()).await?;
                assert_eq!((resp.id, back), (id, data));
                Ok::<_, RpcError>(())
            });
        }
        // Every call has reached the service before the shutdown.
        let held = u32::try_from(calls)?;
        let _ = tokio::time::timeout(TIMEOUT, service.started.acquire_many(held)).await??;
        shutdown.cancel();
        service
            .released
            .store(true, std::sync::atomic::Ordering::Release);
        service.release.notify_waiters();
        while let Some(joined) = pending.join_next().await {
            joined
                .map_err(|e| format!("{calls} calls of {len} bytes: {e}"))?
                .map_err(|e| format!("{calls} calls of {len} bytes: {e}"))?;
        }
        tokio::time::timeout(TIMEOUT, serving).await??;
        endpoint.close();
        client.close();
    }
    Ok(())
}
