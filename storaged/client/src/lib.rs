//! Client library for Basalt volumes.
//!
//! [`StorageClient`] talks to the metadata service (any node; non-leaders forward) and
//! [`Volume`] does replicated chunk I/O straight to the chunk servers: data never goes
//! through the metadata group. Frontends (the NBD export, later iSCSI/S3/NFS) and the CLI use
//! only this crate, never the server's internals.

mod error;
mod rangelock;
mod volume;

pub use error::{Error, Result};
pub use volume::{Volume, VolumeOptions};

use basalt_rpc::RpcEndpoint;
use basalt_types::*;
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tracing::debug;

/// How long a metadata call keeps retrying through leader changes before giving up.
const META_DEADLINE: Duration = Duration::from_secs(30);
/// Per-attempt timeout of one metadata RPC. Metadata operations are one Raft commit; a
/// node that does not answer in this time is tried again later, after the others.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an address that failed at the transport level is tried only after the others.
const DOWN_FOR: Duration = Duration::from_secs(5);
/// How long a resize waits for the nodes to take its notice.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a node rereads the sizes of the volumes it has open, so a resize whose notice
/// it missed still reaches its frontends (`storaged` runs the check).
pub const VOLUME_SIZE_CHECK: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// RPC addresses of some cluster nodes (any will do; more is more available).
    pub seeds: Vec<SocketAddr>,
    /// This client's node, if it runs on one: its replicas are preferred for reads.
    pub local_node: Option<NodeId>,
    /// How long a write keeps retrying while too few replicas are reachable before failing.
    pub io_deadline: Duration,
}

impl ClientConfig {
    pub fn new(seeds: Vec<SocketAddr>) -> Self {
        Self { seeds, local_node: None, io_deadline: Duration::from_secs(60) }
    }
}

/// The chunk service of the node this client runs in. Requests for replicas on this node
/// are handed to it directly instead of looping through QUIC to ourselves: a third of a
/// write's traffic, and all of a local read's, never touches the network stack.
pub trait LocalChunks: Send + Sync + 'static {
    fn call(
        &self,
        req: ChunkRequest,
        data: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = (std::result::Result<ChunkResponse, RemoteError>, Bytes)> + Send + '_>>;
}

/// A connection to a Basalt cluster.
pub struct StorageClient {
    local: std::sync::OnceLock<(SocketAddr, Arc<dyn LocalChunks>)>,
    rpc: Arc<RpcEndpoint>,
    config: ClientConfig,
    /// Node id → RPC address, refreshed from the metadata service.
    nodes: RwLock<HashMap<NodeId, NodeInfo>>,
    /// Index into the seed list of the last node that answered a metadata call.
    preferred_seed: std::sync::atomic::AtomicUsize,
    /// Addresses that failed at the transport level recently, and until when they count
    /// as down: calls go to the others first instead of waiting for a timeout again.
    down: std::sync::Mutex<HashMap<SocketAddr, Instant>>,
    /// Volumes opened through this client, so a resize reaches every open copy.
    open: std::sync::Mutex<HashMap<VolumeId, Vec<std::sync::Weak<Volume>>>>,
    /// Held while sizes are read and applied, and while a volume is registered: a refresh
    /// applies only what it read after every volume it updates was registered, and
    /// refreshes never overtake each other, so no open volume goes back to an older size.
    size_refresh: tokio::sync::Mutex<()>,
}

impl StorageClient {
    pub fn new(rpc: Arc<RpcEndpoint>, config: ClientConfig) -> Arc<Self> {
        Arc::new(Self {
            local: std::sync::OnceLock::new(),
            rpc,
            config,
            nodes: RwLock::new(HashMap::new()),
            preferred_seed: std::sync::atomic::AtomicUsize::new(0),
            down: std::sync::Mutex::new(HashMap::new()),
            open: std::sync::Mutex::new(HashMap::new()),
            size_refresh: tokio::sync::Mutex::new(()),
        })
    }

    /// Serve requests addressed to `addr` (this node) with `local` instead of the network.
    pub fn set_local(&self, addr: SocketAddr, local: Arc<dyn LocalChunks>) {
        let _ = self.local.set((addr, local));
    }

    pub fn rpc(&self) -> &Arc<RpcEndpoint> {
        &self.rpc
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Send a metadata request, trying the seeds in turn and retrying through leader
    /// elections and unreachable nodes until [`META_DEADLINE`].
    pub async fn meta(&self, req: MetaRequest) -> Result<MetaResponse> {
        use std::sync::atomic::Ordering;
        let deadline = Instant::now() + META_DEADLINE;
        let seeds = self.seed_addrs();
        if seeds.is_empty() {
            return Err(Error::NoSeeds);
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            // One round: from the node that answered last, nodes believed down last.
            let first = self.preferred_seed.load(Ordering::Relaxed) % seeds.len();
            let mut round: Vec<usize> = (0..seeds.len()).map(|k| (first + k) % seeds.len()).collect();
            round.sort_by_key(|&i| self.is_down(seeds[i]));
            let mut retry_reason = String::new();
            for i in round {
                let addr = seeds[i];
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let outcome = self
                    .rpc
                    .call::<NodeRequest, NodeResponse>(
                        addr,
                        &NodeRequest::Meta(req.clone()),
                        Bytes::new(),
                        CALL_TIMEOUT.min(left),
                    )
                    .await;
                retry_reason = match outcome {
                    Ok((NodeResponse::Meta(Ok(resp)), _)) => {
                        self.preferred_seed.store(i, Ordering::Relaxed);
                        self.mark_up(addr);
                        return Ok(resp);
                    }
                    Ok((NodeResponse::Meta(Err(e)), _)) => match e.code {
                        ErrorCode::NotLeader | ErrorCode::Unavailable => e.to_string(),
                        _ => return Err(Error::Remote(e)),
                    },
                    Ok((NodeResponse::Error(e), _)) if e.code == ErrorCode::Unavailable => e.to_string(),
                    Ok((NodeResponse::Error(e), _)) => return Err(Error::Remote(e)),
                    Ok((other, _)) => return Err(Error::Protocol(format!("unexpected answer {other:?}"))),
                    Err(e) => {
                        self.mark_down(addr);
                        e.to_string()
                    }
                };
                debug!(%addr, reason = %retry_reason, "metadata call retried");
            }
            if Instant::now() >= deadline {
                return Err(Error::MetaUnavailable(retry_reason));
            }
            // Every node said "no leader" (an election) or failed: back off between rounds.
            tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Whether `addr` failed at the transport level within the last [`DOWN_FOR`].
    pub fn is_down(&self, addr: SocketAddr) -> bool {
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        down.get(&addr).is_some_and(|until| Instant::now() < *until)
    }

    fn mark_down(&self, addr: SocketAddr) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        down.insert(addr, Instant::now() + DOWN_FOR);
    }

    fn mark_up(&self, addr: SocketAddr) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        down.remove(&addr);
    }

    /// The configured seeds, then every known node (by id), without duplicates.
    fn seed_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = self.config.seeds.clone();
        if let Ok(nodes) = self.nodes.read() {
            let mut known: Vec<&NodeInfo> = nodes.values().collect();
            known.sort_by_key(|n| n.id);
            for n in known {
                if let Ok(a) = n.rpc_addr.parse::<SocketAddr>() {
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
            }
        }
        addrs
    }

    pub async fn status(&self) -> Result<ClusterStatus> {
        match self.meta(MetaRequest::Status).await? {
            MetaResponse::Status(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeInfo>> {
        match self.meta(MetaRequest::ListNodes).await? {
            MetaResponse::Nodes(nodes) => {
                if let Ok(mut map) = self.nodes.write() {
                    map.clear();
                    for n in &nodes {
                        map.insert(n.id, n.clone());
                    }
                }
                Ok(nodes)
            }
            other => Err(unexpected(other)),
        }
    }

    /// RPC address of a node, refreshing the node list once if it is unknown.
    pub async fn node_addr(&self, node: NodeId) -> Result<SocketAddr> {
        if let Some(a) = self.cached_node_addr(node) {
            return Ok(a);
        }
        self.list_nodes().await?;
        self.cached_node_addr(node).ok_or(Error::UnknownNode(node))
    }

    fn cached_node_addr(&self, node: NodeId) -> Option<SocketAddr> {
        let nodes = self.nodes.read().ok()?;
        nodes.get(&node)?.rpc_addr.parse().ok()
    }

    pub async fn create_volume(&self, name: &str, size: u64, chunk_size: Option<u64>) -> Result<VolumeInfo> {
        let req = MetaRequest::CreateVolume { name: name.to_string(), size, chunk_size };
        match self.meta(req).await? {
            MetaResponse::Volume(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Delete a volume and, best effort, its replicas on every reachable node (nodes that
    /// are down drop them when they come back: their replicas belong to no volume).
    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let info = self.volume(name).await?;
        self.meta(MetaRequest::DeleteVolume { name: name.to_string() }).await?;
        let nodes = self.list_nodes().await.unwrap_or_default();
        let calls = nodes.iter().filter_map(|n| n.rpc_addr.parse::<SocketAddr>().ok()).map(|addr| {
            let req = NodeRequest::Chunk(ChunkRequest::DeleteVolume { volume: info.id });
            async move {
                let _ = self
                    .rpc
                    .call::<NodeRequest, NodeResponse>(addr, &req, Bytes::new(), CALL_TIMEOUT)
                    .await;
            }
        });
        futures::future::join_all(calls).await;
        Ok(())
    }

    /// Changes a volume's size, then tells every node (best effort, waiting at most
    /// [`NOTICE_TIMEOUT`]) so the frontends that have it open adopt the new size; a node
    /// that misses the notice adopts it at its next [`VOLUME_SIZE_CHECK`].
    pub async fn resize_volume(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        let info = match self.meta(MetaRequest::ResizeVolume { name: name.to_string(), size }).await? {
            MetaResponse::Volume(v) => v,
            other => return Err(unexpected(other)),
        };
        if let Err(e) = self.refresh_volume_sizes(Some(info.id)).await {
            debug!(volume = %info.name, error = %e, "cannot reread the size of our open copies");
        }
        let told = self.broadcast_notice(Notice::VolumeResized { volume: info.id }, None, NOTICE_TIMEOUT).await;
        debug!(volume = %info.name, size = info.size, nodes = told, "resize announced");
        Ok(info)
    }

    pub async fn volume(&self, name: &str) -> Result<VolumeInfo> {
        match self.meta(MetaRequest::GetVolume { name: name.to_string() }).await? {
            MetaResponse::Volume(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    pub async fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        match self.meta(MetaRequest::ListVolumes).await? {
            MetaResponse::Volumes(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Writes (`value` Some) or deletes a record if it is at version `expected` (`Some(0)`:
    /// absent; `None`: unconditionally). A version mismatch is `ErrorCode::StaleVersion`.
    pub async fn put_record(&self, key: &str, value: Option<Vec<u8>>, expected: Option<u64>) -> Result<Option<Record>> {
        match self.meta(MetaRequest::PutRecord { key: key.to_string(), value, expected }).await? {
            MetaResponse::Record(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    pub async fn get_record(&self, key: &str) -> Result<Option<Record>> {
        match self.meta(MetaRequest::GetRecord { key: key.to_string() }).await? {
            MetaResponse::Record(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Records whose key starts with `prefix`, in key order.
    pub async fn list_records(&self, prefix: &str) -> Result<Vec<Record>> {
        match self.meta(MetaRequest::ListRecords { prefix: prefix.to_string() }).await? {
            MetaResponse::Records(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Runs a conditional write on the metadata index. A call that fails in transport may
    /// still have been applied: callers that retry must be ready for a `Conflict` caused by
    /// their own earlier attempt.
    pub async fn index_txn(&self, txn: IndexTxn) -> Result<IndexOutcome> {
        match self.meta(MetaRequest::IndexTxn(txn)).await? {
            MetaResponse::Index(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    /// One index entry, read linearizably.
    pub async fn index_get(&self, key: &[u8]) -> Result<Option<IndexEntry>> {
        match self.meta(MetaRequest::IndexGet { key: key.to_vec() }).await? {
            MetaResponse::IndexEntry(e) => Ok(e),
            other => Err(unexpected(other)),
        }
    }

    /// Index entries with `prefix`, from `start` on, at most `limit`; and whether more follow.
    pub async fn index_list(&self, prefix: &[u8], start: &[u8], limit: u32) -> Result<(Vec<IndexEntry>, bool)> {
        let req = MetaRequest::IndexList { prefix: prefix.to_vec(), start: start.to_vec(), limit };
        match self.meta(req).await? {
            MetaResponse::IndexPage { entries, more } => Ok((entries, more)),
            other => Err(unexpected(other)),
        }
    }

    /// Open a volume for I/O, taking its write lease as `holder`. With `force`, take the
    /// lease over from another holder: the epoch is bumped and every reachable chunk server
    /// is told, so the old holder's writes are refused from then on.
    pub async fn open_volume(self: &Arc<Self>, name: &str, opts: VolumeOptions) -> Result<Arc<Volume>> {
        let info = self.volume(name).await?;
        Volume::open(self.clone(), info, opts).await
    }

    /// [`open_volume`](Self::open_volume) with the volume's description already fetched (the
    /// caller looked at its lease to decide on `force`): one metadata round trip fewer.
    pub async fn open_volume_with(self: &Arc<Self>, info: VolumeInfo, opts: VolumeOptions) -> Result<Arc<Volume>> {
        Volume::open(self.clone(), info, opts).await
    }

    async fn register_open(&self, vol: &Arc<Volume>) {
        let _serial = self.size_refresh.lock().await;
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|_, vols| {
            vols.retain(|v| v.strong_count() > 0);
            !vols.is_empty()
        });
        open.entry(vol.id()).or_default().push(Arc::downgrade(vol));
    }

    /// Rereads the size of the volumes open through this client (`only`: of that one, which
    /// was just resized) and applies it to every open copy; returns how many copies changed
    /// size. A node calls it when told of a resize and every [`VOLUME_SIZE_CHECK`].
    pub async fn refresh_volume_sizes(&self, only: Option<VolumeId>) -> Result<usize> {
        let _serial = self.size_refresh.lock().await;
        let open: Vec<Arc<Volume>> = {
            let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.iter()
                .filter(|(id, _)| only.is_none_or(|o| o == **id))
                .flat_map(|(_, vols)| vols.iter().filter_map(std::sync::Weak::upgrade))
                .collect()
        };
        let Some(first) = open.first() else { return Ok(0) };
        let sizes: HashMap<VolumeId, u64> = match only {
            // One volume: one GetVolume (by name; a volume deleted and created again under
            // that name has another id and is left alone).
            Some(_) => {
                let info = self.volume(first.name()).await?;
                HashMap::from([(info.id, info.size)])
            }
            None => self.list_volumes().await?.into_iter().map(|v| (v.id, v.size)).collect(),
        };
        let mut changed = 0;
        for v in &open {
            if let Some(&size) = sizes.get(&v.id()) {
                changed += usize::from(v.set_size(size, only.is_some()));
            }
        }
        Ok(changed)
    }

    /// Sends `notice` to every node but `except`, at once, waiting at most `timeout` for
    /// them; returns how many took it. Best effort: nodes that miss it rely on expiry.
    pub async fn broadcast_notice(&self, notice: Notice, except: Option<NodeId>, timeout: Duration) -> usize {
        let Ok(nodes) = self.list_nodes().await else { return 0 };
        let nodes = nodes.into_iter().filter(|n| Some(n.id) != except).collect();
        let answers = self.ask_alive(nodes, &NodeRequest::Notice(notice), timeout).await;
        answers.iter().filter(|(_, a)| matches!(a, Some(NodeResponse::Done))).count()
    }

    /// Sends `req` to each of `nodes` that is alive, at once, waiting at most `timeout`
    /// for each; a node that cannot be reached or fails to answer has `None`.
    async fn ask_alive(&self, nodes: Vec<NodeInfo>, req: &NodeRequest, timeout: Duration) -> Vec<(NodeInfo, Option<NodeResponse>)> {
        let calls = nodes.into_iter().filter(|n| n.state == NodeState::Alive).map(|n| async move {
            let Ok(addr) = n.rpc_addr.parse::<SocketAddr>() else { return (n, None) };
            let answer = self.rpc.call::<NodeRequest, NodeResponse>(addr, req, Bytes::new(), timeout).await;
            (n, answer.ok().map(|(a, _)| a))
        });
        futures::future::join_all(calls).await
    }

    /// The iSCSI sessions of every live node, with the node; a node that does not answer
    /// (or runs no portal) lists none, and is named in the second list.
    pub async fn iscsi_sessions(&self) -> Result<(Vec<(NodeInfo, Vec<basalt_types::IscsiSession>)>, Vec<NodeInfo>)> {
        let nodes = self.list_nodes().await?;
        let (mut answered, mut silent) = (Vec::new(), Vec::new());
        for (n, answer) in self.ask_alive(nodes, &NodeRequest::IscsiSessions, CALL_TIMEOUT).await {
            match answer {
                Some(NodeResponse::IscsiSessions(s)) => answered.push((n, s)),
                _ => silent.push(n),
            }
        }
        Ok((answered, silent))
    }

    /// Send one chunk-service request to a node.
    pub async fn chunk_call(
        &self,
        addr: SocketAddr,
        req: ChunkRequest,
        data: Bytes,
        timeout: Duration,
    ) -> Result<(ChunkResponse, Bytes)> {
        if let Some((local_addr, local)) = self.local.get() {
            if *local_addr == addr {
                let (resp, data) = local.call(req, data).await;
                return resp.map(|r| (r, data)).map_err(Error::Remote);
            }
        }
        let (resp, data) = match self
            .rpc
            .call::<NodeRequest, NodeResponse>(addr, &NodeRequest::Chunk(req), data, timeout)
            .await
        {
            Ok(answer) => answer,
            Err(e) => {
                self.mark_down(addr);
                return Err(Error::Transport(e.to_string()));
            }
        };
        match resp {
            NodeResponse::Chunk(Ok(r)) => Ok((r, data)),
            NodeResponse::Chunk(Err(e)) | NodeResponse::Error(e) => Err(Error::Remote(e)),
            other => Err(Error::Protocol(format!("unexpected answer {other:?}"))),
        }
    }
}

pub(crate) fn unexpected(resp: MetaResponse) -> Error {
    Error::Protocol(format!("unexpected metadata answer {resp:?}"))
}
