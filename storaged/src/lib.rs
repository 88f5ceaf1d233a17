//! `storaged`: the storage daemon of one node.
//!
//! Composition root: [`run`] builds the node from its [`Config`] and the listeners its
//! caller bound — the QUIC RPC endpoint, the chunk store and chunk service, the metadata
//! replica (openraft + RocksDB, in `basalt-meta`), the repair manager (active on the Raft
//! leader), the heartbeat and scrubber loops, and the NBD export — and runs them until the
//! shutdown token fires.

pub mod chunk_service;
pub mod config;
pub mod gc;
pub mod nbd_export;
pub mod repair;
pub mod throttle;

pub use config::{Config, ConfigError, ConfigFile};

use async_trait::async_trait;
use basalt_chunkstore::ChunkStore;
use basalt_meta::{MetaConfig, MetaService};
use basalt_rpc::{Identity, PeerInfo, RpcEndpoint, Service};
use basalt_storaged_client::{ClientConfig, StorageClient};
use basalt_types::*;
use bytes::Bytes;
use chunk_service::ChunkService;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("certificates: {0}")]
    Tls(String),
    #[error("transport: {0}")]
    Rpc(String),
    #[error("chunk store: {0}")]
    Store(#[from] basalt_chunkstore::Error),
    #[error("metadata: {0}")]
    Meta(String),
    #[error("NBD: {0}")]
    Nbd(String),
    #[error("iSCSI: {0}")]
    Iscsi(String),
    #[error("S3: {0}")]
    S3(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Sockets bound by the caller (so tests can use port 0).
pub struct Listeners {
    pub rpc: std::net::UdpSocket,
    pub nbd: tokio::net::TcpListener,
    pub nbd_unix: Option<tokio::net::UnixListener>,
    pub iscsi: Option<tokio::net::TcpListener>,
    pub s3: Option<tokio::net::TcpListener>,
    /// The S3 gateway over HTTPS.
    pub s3_tls: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// Bind the addresses of a configuration.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let rpc = std::net::UdpSocket::bind(config.file.rpc_listen)
            .map_err(|e| in_use(e, "RPC (UDP)", &config.file.rpc_listen))?;
        let nbd = tokio::net::TcpListener::bind(config.file.nbd_listen)
            .await
            .map_err(|e| in_use(e, "NBD (TCP)", &config.file.nbd_listen))?;
        let nbd_unix = match &config.file.nbd_socket {
            Some(path) => {
                // A socket file left by a killed process would make bind fail.
                let _ = std::fs::remove_file(path);
                Some(tokio::net::UnixListener::bind(path).map_err(|e| in_use(e, "NBD (unix)", &path.display()))?)
            }
            None => None,
        };
        let iscsi = match config.file.iscsi_listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| in_use(e, "iSCSI (TCP)", &addr))?),
            None => None,
        };
        let s3 = match config.file.s3_listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| in_use(e, "S3 (TCP)", &addr))?),
            None => None,
        };
        let s3_tls = match config.file.s3_tls_listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| in_use(e, "S3 HTTPS (TCP)", &addr))?),
            None => None,
        };
        Ok(Listeners { rpc, nbd, nbd_unix, iscsi, s3, s3_tls })
    }
}

/// A bind error that names the listener and the address it wanted.
fn in_use(e: std::io::Error, what: &str, addr: &dyn std::fmt::Display) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what} listener on {addr}: {e}"))
}

/// Answers every RPC a node serves: Raft traffic and metadata requests go to the metadata
/// replica, chunk requests to the chunk service.
struct NodeService {
    meta: Arc<MetaService>,
    chunks: Arc<ChunkService>,
    /// The node's storage client: a resize notice makes it reread the size of its open
    /// volumes (NBD exports and iSCSI units alike).
    client: Arc<StorageClient>,
    /// The iSCSI frontend, once started: it takes the cache notices.
    iscsi: Arc<std::sync::OnceLock<Arc<basalt_iscsi::cluster::ClusterTargets>>>,
}

#[async_trait]
impl Service for NodeService {
    type Request = NodeRequest;
    type Response = NodeResponse;

    async fn call(&self, _peer: PeerInfo, req: NodeRequest, data: Bytes) -> (NodeResponse, Bytes) {
        match req {
            NodeRequest::Raft(kind, payload) => (NodeResponse::Raft(self.meta.handle_raft(kind, payload).await), Bytes::new()),
            NodeRequest::Meta(req) => (NodeResponse::Meta(self.meta.handle(req).await), Bytes::new()),
            NodeRequest::MetaForwarded(req) => (NodeResponse::Meta(self.meta.handle_forwarded(req).await), Bytes::new()),
            NodeRequest::Notice(notice) => {
                if let Notice::VolumeResized { volume } = &notice {
                    if let Err(e) = self.client.refresh_volume_sizes(Some(*volume)).await {
                        warn!(volume, error = %e, "cannot reread the size of a resized volume; the periodic check will");
                    }
                }
                if let Some(iscsi) = self.iscsi.get() {
                    iscsi.on_notice(&notice).await;
                }
                (NodeResponse::Done, Bytes::new())
            }
            NodeRequest::Chunk(req) => {
                let (resp, data) = self.chunks.handle(req, data).await;
                (NodeResponse::Chunk(resp), data)
            }
            NodeRequest::IscsiSessions => {
                let sessions = self.iscsi.get().map(|t| t.sessions().list()).unwrap_or_default();
                (NodeResponse::IscsiSessions(sessions.into_iter().map(session_to_wire).collect()), Bytes::new())
            }
        }
    }
}

fn session_to_wire(s: basalt_iscsi::conn::SessionInfo) -> basalt_types::IscsiSession {
    let since_ms = s.since.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    basalt_types::IscsiSession {
        target: s.target,
        initiator: s.initiator,
        isid: s.isid,
        tsih: s.tsih,
        peer: s.peer.map(|p| p.to_string()),
        since_ms,
        chap: s.chap,
        header_digest: s.header_digest,
        data_digest: s.data_digest,
    }
}

impl basalt_storaged_client::LocalChunks for ChunkService {
    fn call(
        &self,
        req: ChunkRequest,
        data: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = (Result<ChunkResponse, RemoteError>, Bytes)> + Send + '_>> {
        Box::pin(self.handle(req, data))
    }
}

/// Run a node until `shutdown` fires.
pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> Result<()> {
    let node = config.file.node_id;
    let span = info_span!("node", node, name = %config.file.name);
    async move {
        let f = &config.file;
        let identity = Identity::load(&f.certs_dir, &f.name).map_err(|e| Error::Tls(e.to_string()))?;
        let rpc = RpcEndpoint::new(listeners.rpc, &identity).map_err(|e| Error::Rpc(e.to_string()))?;
        let store_config =
            basalt_chunkstore::Config { journal_bytes: f.journal_bytes, io_uring: f.io_uring, ..Default::default() };
        let store = ChunkStore::open_with(f.data_dirs.clone(), store_config).await?;

        let mut meta_cfg = MetaConfig::new(node, config.rpc_advertise.to_string(), f.meta_dir.clone());
        meta_cfg.dead_timeout = f.dead_timeout;
        meta_cfg.min_replicas = f.min_replicas;
        let meta = MetaService::open(meta_cfg, rpc.clone(), shutdown.clone())
            .await
            .map_err(|e| Error::Meta(e.to_string()))?;
        let chunks = ChunkService::new(store.clone(), rpc.clone(), f.repair_bytes_per_sec);

        let mut seeds = vec![config.rpc_advertise];
        seeds.extend(f.initial_voters.values().copied());
        seeds.extend(f.seeds.iter().copied());
        seeds.dedup();
        let mut client_cfg = ClientConfig::new(seeds);
        client_cfg.local_node = Some(node);
        let client = StorageClient::new(rpc.clone(), client_cfg);
        client.set_local(config.rpc_advertise, chunks.clone());

        let iscsi_slot = Arc::new(std::sync::OnceLock::new());
        let service = Arc::new(NodeService {
            meta: meta.clone(),
            chunks: chunks.clone(),
            client: client.clone(),
            iscsi: iscsi_slot.clone(),
        });
        let mut tasks = tokio::task::JoinSet::new();
        {
            let rpc = rpc.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move { rpc.serve(service, shutdown).await }.in_current_span());
        }

        // The lowest-numbered initial voter creates the group on the very first start.
        if f.initial_voters.keys().next() == Some(&node) {
            let voters = f.initial_voters.iter().map(|(id, a)| (*id, a.to_string())).collect();
            meta.bootstrap(voters).await.map_err(|e| Error::Meta(e.to_string()))?;
        }

        // Registration and heartbeats go through the client: a node that is not (yet) a member
        // of the Raft group knows no leader, so it asks the other nodes in turn.
        register(&config, &client, &store, &shutdown).await;
        release_own_leases(&client, &f.name).await;

        tasks.spawn(heartbeats(client.clone(), store.clone(), node, f.heartbeat_interval, shutdown.clone()).in_current_span());
        tasks.spawn(gc::run(store.clone(), client.clone(), f.gc_interval, shutdown.clone()).in_current_span());
        tasks.spawn(repair::RepairManager::new(meta.clone(), client.clone()).run(shutdown.clone()).in_current_span());
        tasks.spawn(volume_size_checks(client.clone(), shutdown.clone()).in_current_span());
        if f.scrub_bytes_per_sec > 0 {
            let (chunks, client, shutdown) = (chunks.clone(), client.clone(), shutdown.clone());
            let (rate, interval) = (f.scrub_bytes_per_sec, f.scrub_interval);
            tasks.spawn(
                async move {
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(interval) => {}
                        }
                        chunks.scrub_pass(rate, &client, node).await;
                    }
                }
                .in_current_span(),
            );
        }

        let exports: Arc<dyn basalt_nbd::ExportProvider> =
            Arc::new(nbd_export::ExportsProvider(nbd_export::Exports::new(client.clone(), node, &f.name)));
        tasks.spawn(basalt_nbd::serve_tcp(listeners.nbd, exports.clone(), shutdown.clone()).in_current_span());
        if let Some(iscsi) = listeners.iscsi {
            let addr = iscsi.local_addr().map_err(|e| Error::Iscsi(e.to_string()))?;
            if let Err(e) = basalt_iscsi::cluster::publish_portal(&client, node, addr).await {
                warn!(error = %e, "could not publish the iSCSI portal; discovery will not list it yet");
            }
            let targets = basalt_iscsi::cluster::ClusterTargets::new(client.clone(), node, &f.name);
            // Before the portal serves anyone, as `release_own_leases` for volume leases.
            targets.forget_own_reservations().await;
            let _ = iscsi_slot.set(targets.clone());
            info!(%addr, "iSCSI target listening");
            tasks.spawn(targets.clone().recheck_sessions(shutdown.clone()).in_current_span());
            let sessions = targets.sessions();
            let config = basalt_iscsi::conn::Config::default();
            tasks.spawn(basalt_iscsi::portal::serve_with(iscsi, targets, config, sessions, shutdown.clone()).in_current_span());
        }
        if listeners.s3.is_some() || listeners.s3_tls.is_some() {
            // One object store per node (it holds the node's data volume), whichever of
            // HTTP and HTTPS it is served on.
            let store = basalt_s3gw::store::ObjectStore::new(client.clone(), basalt_s3gw::store::StoreConfig::new(node, &f.name));
            tasks.spawn(store.clone().garbage_loop(Duration::from_secs(60), shutdown.clone()).in_current_span());
            tasks.spawn(store.clone().lifecycle_loop(Duration::from_secs(3600), shutdown.clone()).in_current_span());
            let served = [(listeners.s3, None), (listeners.s3_tls, config.s3_tls.clone())];
            for (listener, tls) in served {
                let Some(listener) = listener else { continue };
                let addr = listener.local_addr().map_err(|e| Error::S3(e.to_string()))?;
                let https = tls.is_some();
                let opts = basalt_s3gw::ServeOptions { region: f.s3_region.clone(), domains: f.s3_domains.clone(), tls };
                info!(%addr, https, region = %f.s3_region, "S3 gateway listening");
                tasks.spawn(basalt_s3gw::serve(listener, store.clone(), opts, shutdown.clone()).in_current_span());
            }
        }
        if let Some(unix) = listeners.nbd_unix {
            tasks.spawn(basalt_nbd::serve_unix(unix, exports.clone(), shutdown.clone()).in_current_span());
        }
        info!(rpc = %config.rpc_advertise, nbd = %f.nbd_listen, "node running");

        shutdown.cancelled().await;
        info!("shutting down");
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), drain).await.is_err() {
            warn!("some tasks did not stop within 10 s");
        }
        meta.shutdown().await;
        rpc.close();
        Ok(())
    }
    .instrument(span)
    .await
}

/// Register this node (addresses and disks) in the cluster map; retried until a leader
/// accepts it, since on a fresh cluster the group is still electing.
async fn register(config: &Config, client: &StorageClient, store: &ChunkStore, shutdown: &CancellationToken) {
    let f = &config.file;
    let disks = store
        .disks()
        .into_iter()
        .map(|d| DiskInfo {
            id: DiskId { node: f.node_id, disk: d.disk },
            path: d.path.display().to_string(),
            total_bytes: 0,
            free_bytes: 0,
        })
        .collect::<Vec<_>>();
    let req = MetaRequest::RegisterNode {
        id: f.node_id,
        name: f.name.clone(),
        rpc_addr: config.rpc_advertise.to_string(),
        nbd_addr: f.nbd_listen.to_string(),
        disks,
    };
    let mut delay = Duration::from_millis(100);
    loop {
        match client.meta(req.clone()).await {
            Ok(_) => {
                info!("registered in the cluster map");
                return;
            }
            Err(e) => {
                info!(error = %e, "registration not accepted yet; retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// A freshly started process holds no NBD connection, so write leases still recorded for
/// this node's export (left by a crash) are released; the epoch is kept, so nothing the
/// old process might still have in flight can land after a new holder starts.
async fn release_own_leases(client: &StorageClient, node_name: &str) {
    let holder = nbd_export::holder_name(node_name);
    let volumes = match client.list_volumes().await {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "cannot list volumes to release stale leases");
            return;
        }
    };
    for v in volumes.into_iter().filter(|v| v.lease.as_ref().is_some_and(|l| l.holder == holder)) {
        let req = MetaRequest::ReleaseLease { volume: v.name.clone(), holder: holder.clone() };
        match client.meta(req).await {
            Ok(_) => info!(volume = %v.name, "released the lease left by this node's previous run"),
            Err(e) => warn!(volume = %v.name, error = %e, "cannot release a stale lease"),
        }
    }
}

/// Rereads the size of the volumes open on this node every
/// [`basalt_storaged_client::VOLUME_SIZE_CHECK`], so a resize whose notice this node missed
/// still reaches its NBD exports and iSCSI units.
async fn volume_size_checks(client: Arc<StorageClient>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(basalt_storaged_client::VOLUME_SIZE_CHECK) => {}
        }
        match client.refresh_volume_sizes(None).await {
            Ok(0) => {}
            // A notice missed, or still on its way.
            Ok(n) => info!(copies = n, "the periodic check found resized volumes"),
            Err(e) => warn!(error = %e, "cannot check the sizes of open volumes"),
        }
    }
}

async fn heartbeats(client: Arc<StorageClient>, store: ChunkStore, node: NodeId, every: Duration, shutdown: CancellationToken) {
    loop {
        let disks = match store.usage().await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot read disk usage");
                Vec::new()
            }
        };
        let started = tokio::time::Instant::now();
        match client.meta(MetaRequest::Heartbeat { node, disks }).await {
            Ok(_) if started.elapsed() > every => {
                warn!(took = ?started.elapsed(), "heartbeat delivered late");
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, took = ?started.elapsed(), "heartbeat not delivered"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
