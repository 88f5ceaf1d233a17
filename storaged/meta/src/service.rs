//! [`MetaService`]: the metadata group as the rest of `storaged` sees it.
//!
//! It owns the openraft node and the leader-only soft state that is not replicated: the
//! heartbeat table (when each node was last heard from and its disk usage) and the per-chunk
//! allocation locks. Replicated state lives only in the cluster map, changed by proposals.

use crate::network::{self, NetworkFactory};
use crate::raft::{Node, NodeId, Raft, RaftMetrics};
use crate::read_barrier::ReadBarrier;
use crate::store;
use crate::Error;
use basalt_map::{place, ClusterMap, DiskSpace, Usage};
use basalt_rpc::RpcEndpoint;
use basalt_types::{
    ChunkId, ClusterStatus, DiskUsage, ErrorCode, MetaCommand, MetaReply, MetaRequest, MetaResponse, NodeRequest,
    NodeResponse, NodeState, NodeStatus, RaftKind, RemoteError, REPLICAS,
};
use bytes::Bytes;
use openraft::error::{ChangeMembershipError, CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a request forwarded to the leader may take before the caller is told to retry
/// (cut short when the leader changes meanwhile).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for openraft's tasks to close the database.
const DB_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the leader looks for nodes that stopped sending heartbeats.
const DEAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A snapshot is built after this many log entries; the log before it is then purged.
const SNAPSHOT_EVERY_LOGS: u64 = 5000;
/// Entries kept in the log behind a snapshot, so a briefly lagging follower catches up from
/// the log instead of needing the whole snapshot.
const LOGS_KEPT_AFTER_SNAPSHOT: u64 = 1000;

/// Configuration of the metadata replica on this node.
#[derive(Clone, Debug)]
pub struct MetaConfig {
    /// This node's id; also its Raft node id.
    pub node_id: u64,
    /// This node's RPC address (`ip:port`), as the other replicas reach it.
    pub rpc_addr: String,
    /// The RocksDB directory holding the Raft log and the state machine.
    pub db_path: PathBuf,
    /// Raft leader heartbeat period.
    pub heartbeat_interval: Duration,
    /// A follower that hears no leader for a random time in `[min, max)` starts an election.
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// A node not heard from (storage heartbeat) for this long is marked dead.
    pub dead_timeout: Duration,
    /// Fewest replicas a chunk may be allocated with or reduced to.
    pub min_replicas: u32,
}

impl MetaConfig {
    /// A configuration with the defaults suited to a LAN or loopback cluster: 250 ms Raft
    /// heartbeats, 1-2 s election timeout, nodes dead after 10 s of silence, at least 2
    /// replicas per chunk.
    pub fn new(node_id: u64, rpc_addr: impl Into<String>, db_path: impl Into<PathBuf>) -> Self {
        Self {
            node_id,
            rpc_addr: rpc_addr.into(),
            db_path: db_path.into(),
            heartbeat_interval: Duration::from_millis(250),
            election_timeout_min: Duration::from_millis(1000),
            election_timeout_max: Duration::from_millis(2000),
            dead_timeout: Duration::from_secs(10),
            min_replicas: 2,
        }
    }

    fn raft_config(&self) -> Result<openraft::Config, Error> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if self.min_replicas == 0 || self.min_replicas as usize > REPLICAS {
            return Err(Error::Config(format!("min_replicas must be in 1..={REPLICAS}, not {}", self.min_replicas)));
        }
        if self.dead_timeout.is_zero() {
            return Err(Error::Config("dead_timeout must not be zero".into()));
        }
        self.rpc_addr
            .parse::<SocketAddr>()
            .map_err(|e| Error::Config(format!("rpc_addr {:?} is not ip:port: {e}", self.rpc_addr)))?;
        let cfg = openraft::Config {
            cluster_name: "basalt-meta".into(),
            heartbeat_interval: ms(self.heartbeat_interval),
            election_timeout_min: ms(self.election_timeout_min),
            election_timeout_max: ms(self.election_timeout_max),
            // A snapshot chunk may need a few round trips worth of time on a busy node.
            install_snapshot_timeout: ms(self.election_timeout_max).max(1000),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY_LOGS),
            max_in_snapshot_log_to_keep: LOGS_KEPT_AFTER_SNAPSHOT,
            ..Default::default()
        };
        // openraft checks heartbeat < election timeout and min < max.
        cfg.validate().map_err(|e| Error::Config(e.to_string()))
    }
}

/// What the leader knows about a node from its last heartbeat.
#[derive(Clone)]
struct Seen {
    at: Instant,
    disks: Vec<DiskUsage>,
}

/// The term this node became leader in and when it noticed.
#[derive(Clone, Copy)]
struct Leadership {
    term: u64,
    since: Instant,
}

/// The metadata replica of this node.
pub struct MetaService {
    id: NodeId,
    cfg: MetaConfig,
    raft: Raft,
    /// Linearizable reads, sharing leadership checks.
    reads: ReadBarrier,
    map: Arc<RwLock<ClusterMap>>,
    /// The on-disk metadata index of this replica (read by the leader after a linearizable check).
    index: crate::index::IndexReader,
    rpc: Arc<RpcEndpoint>,
    /// Leader-only soft state; cleared whenever this node starts a new leadership term, so
    /// it never carries sightings from a previous reign.
    heartbeats: Mutex<HashMap<NodeId, Seen>>,
    leadership: Mutex<Option<Leadership>>,
    alloc_locks: Mutex<HashMap<ChunkId, Weak<tokio::sync::Mutex<()>>>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    stopped: AtomicBool,
    /// Fails `changed()` once openraft's tasks have let go of the database after shutdown.
    db_closed: tokio::sync::watch::Receiver<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded tables hold plain data updated in one step; a panic elsewhere while
    // holding the lock cannot leave them half-changed.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn err(code: ErrorCode, msg: impl Into<String>) -> RemoteError {
    RemoteError::new(code, msg)
}

/// A stable placement seed per chunk (splitmix64), so retried allocations of one chunk
/// prefer the same disks.
fn chunk_seed(chunk: ChunkId) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    mix(chunk.volume ^ mix(chunk.index))
}

fn not_leader(leader: Option<NodeId>) -> RemoteError {
    match leader {
        Some(l) => err(ErrorCode::NotLeader, format!("not the metadata leader; node {l} is")),
        None => err(ErrorCode::NotLeader, "no metadata leader is known; retry"),
    }
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> RemoteError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => not_leader(f.leader_id),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(p))) => {
            err(ErrorCode::Unavailable, format!("a membership change is in progress: {p}"))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => err(ErrorCode::InvalidArgument, e.to_string()),
        RaftError::Fatal(f) => err(ErrorCode::Unavailable, format!("metadata replica stopped: {f}")),
    }
}

fn read_error(e: RaftError<NodeId, CheckIsLeaderError<NodeId, Node>>) -> RemoteError {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => not_leader(f.leader_id),
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
            err(ErrorCode::Unavailable, format!("metadata leader lost its quorum: {q}"))
        }
        RaftError::Fatal(f) => err(ErrorCode::Unavailable, format!("metadata replica stopped: {f}")),
    }
}

fn reply_to_response(reply: MetaReply) -> Result<MetaResponse, RemoteError> {
    Ok(match reply {
        MetaReply::Ok => MetaResponse::Ok,
        MetaReply::NodeId(id) => MetaResponse::NodeId(id),
        MetaReply::Volume(v) => MetaResponse::Volume(v),
        MetaReply::Lease(l) => MetaResponse::Lease(l),
        MetaReply::Chunk(c) => MetaResponse::Chunk(c),
        MetaReply::Record(r) => MetaResponse::Record(r),
        MetaReply::Index(outcome) => MetaResponse::Index(outcome),
        MetaReply::Error(e) => return Err(e),
    })
}

impl MetaService {
    /// Opens the RocksDB store at `cfg.db_path` (loading the map persisted there) and starts
    /// the Raft node. Raft messages go out through `rpc`; cancelling `shutdown` stops the
    /// service like [`MetaService::shutdown`].
    pub async fn open(cfg: MetaConfig, rpc: Arc<RpcEndpoint>, shutdown: CancellationToken) -> Result<Arc<Self>, Error> {
        let raft_cfg = Arc::new(cfg.raft_config()?);
        let path = cfg.db_path.clone();
        let db = tokio::task::spawn_blocking(move || store::open_db(&path))
            .await
            .map_err(|e| Error::Raft(format!("opening the metadata store: {e}")))??;
        let db_closed = db.closed();
        let (log, sm) = store::open_stores(db)?;
        let map = sm.map();
        let index = sm.index_reader();
        let id = cfg.node_id;
        let raft = Raft::new(id, raft_cfg, NetworkFactory::new(id, rpc.clone()), log, sm)
            .await
            .map_err(|e| Error::Raft(format!("starting raft: {e}")))?;
        let checker = raft.clone();
        let reads = ReadBarrier::new(Arc::new(move || {
            let raft = checker.clone();
            Box::pin(async move { raft.ensure_linearizable().await.map(|_| ()).map_err(read_error) })
        }));
        let svc = Arc::new(Self {
            id,
            cfg,
            raft,
            reads,
            map,
            index,
            rpc,
            heartbeats: Mutex::new(HashMap::new()),
            leadership: Mutex::new(None),
            alloc_locks: Mutex::new(HashMap::new()),
            cancel: shutdown.child_token(),
            tasks: TaskTracker::new(),
            stopped: AtomicBool::new(false),
            db_closed,
        });
        svc.tasks.spawn(leader_duties(Arc::downgrade(&svc), svc.raft.metrics(), svc.cancel.clone()));
        // Tie our lifetime to the caller's token without keeping the service alive.
        let weak = Arc::downgrade(&svc);
        let own = svc.cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if let Some(svc) = weak.upgrade() {
                        svc.shutdown().await;
                    }
                }
                _ = own.cancelled() => {}
            }
        });
        tracing::info!(node = id, "metadata service started");
        Ok(svc)
    }

    /// First start of a new cluster: makes `voters` (node id -> RPC address) the initial
    /// membership. A no-op if this node's group is already initialised (or a peer
    /// initialised it first with the same call).
    pub async fn bootstrap(&self, voters: BTreeMap<u64, String>) -> Result<(), Error> {
        if self.raft.is_initialized().await.map_err(|e| Error::Raft(e.to_string()))? {
            tracing::debug!("metadata group already initialised");
            return Ok(());
        }
        let mut nodes = BTreeMap::new();
        for (id, addr) in voters {
            addr.parse::<SocketAddr>()
                .map_err(|e| Error::Config(format!("voter {id} address {addr:?} is not ip:port: {e}")))?;
            nodes.insert(id, BasicNode::new(addr));
        }
        match self.raft.initialize(nodes).await {
            Ok(()) => {
                tracing::info!(node = self.id, "metadata group initialised");
                Ok(())
            }
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                tracing::debug!(%e, "metadata group already initialised");
                Ok(())
            }
            Err(e) => Err(Error::Raft(e.to_string())),
        }
    }

    /// Serves a `NodeRequest::Raft` message from a peer. The reply is the bincode-encoded
    /// result of the local Raft call; an error here means the message itself was unusable.
    pub async fn handle_raft(&self, kind: RaftKind, payload: Vec<u8>) -> Result<Vec<u8>, RemoteError> {
        network::serve(&self.raft, kind, &payload).await
    }

    /// Serves a client request: here if this node is the leader, otherwise forwarded to the
    /// leader. `NotLeader`/`Unavailable` errors mean "retry shortly".
    pub async fn handle(&self, req: MetaRequest) -> Result<MetaResponse, RemoteError> {
        match self.leader() {
            Some(l) if l == self.id => match self.handle_local(req.clone()).await {
                // Leadership moved while we were handling it: pass it on once.
                Err(e) if e.code == ErrorCode::NotLeader => match self.leader() {
                    Some(l) if l != self.id => self.forward(l, req).await,
                    _ => Err(e),
                },
                other => other,
            },
            Some(l) => self.forward(l, req).await,
            None => Err(not_leader(None)),
        }
    }

    /// Serves a request another node forwarded: only as the leader, never forwarding it on.
    pub async fn handle_forwarded(&self, req: MetaRequest) -> Result<MetaResponse, RemoteError> {
        match self.leader() {
            Some(l) if l == self.id => self.handle_local(req).await,
            other => Err(not_leader(other)),
        }
    }

    /// Proposes a command (leader only: elsewhere it fails with `NotLeader`, naming the
    /// leader when known). A refusal by the state machine (`MetaReply::Error`) is returned
    /// as `Err`, so `Ok` never holds `MetaReply::Error`.
    pub async fn propose(&self, cmd: MetaCommand) -> Result<MetaReply, RemoteError> {
        let resp = self.raft.client_write(cmd).await.map_err(write_error)?;
        match resp.data {
            MetaReply::Error(e) => Err(e),
            reply => Ok(reply),
        }
    }

    /// This replica's copy of the metadata index, as applied here (not linearizable: for
    /// diagnostics and tests; clients read through [`MetaService::handle`]).
    pub fn local_index(&self) -> crate::index::IndexReader {
        self.index.clone()
    }

    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn node_id(&self) -> u64 {
        self.id
    }

    /// The current Raft metrics (role, term, membership, log positions).
    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow().clone()
    }

    /// The cluster map as applied on this node (may lag the leader on followers).
    pub fn map(&self) -> Arc<RwLock<ClusterMap>> {
        self.map.clone()
    }

    /// Disk usage per disk from the heartbeats this node received as leader (empty on
    /// followers).
    pub fn usage(&self) -> Usage {
        let hb = lock(&self.heartbeats);
        let mut usage = Usage::new();
        for (node, seen) in hb.iter() {
            for d in &seen.disks {
                usage.insert(
                    basalt_types::DiskId { node: *node, disk: d.disk },
                    DiskSpace { total_bytes: d.total_bytes, free_bytes: d.free_bytes },
                );
            }
        }
        usage
    }

    /// Builds a snapshot of the applied state now and purges the log up to it (normally this
    /// happens every few thousand entries). Returns the snapshot's last log index. Followers
    /// that need purged entries then receive the snapshot instead.
    pub async fn compact(&self, timeout: Duration) -> Result<u64, Error> {
        let applied = self.metrics().last_applied.map(|l| l.index).unwrap_or(0);
        self.raft.trigger().snapshot().await.map_err(|e| Error::Raft(e.to_string()))?;
        let metrics = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.snapshot.is_some_and(|s| s.index >= applied), "snapshot built")
            .await
            .map_err(|e| Error::Raft(format!("waiting for the snapshot: {e}")))?;
        let index = metrics.snapshot.map(|s| s.index).unwrap_or(applied);
        self.raft.trigger().purge_log(index).await.map_err(|e| Error::Raft(e.to_string()))?;
        Ok(index)
    }

    /// Stops the Raft node and the background tasks. Idempotent.
    pub async fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        self.cancel.cancel();
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
        self.tasks.close();
        self.tasks.wait().await;
        // The state machine worker and snapshot builders drop their handles shortly after
        // the core stops; wait for that so the same database can be reopened right away
        // (RocksDB allows one opener per directory).
        let mut closed = self.db_closed.clone();
        let wait = async {
            // No value is ever sent: `changed` returns only when the sender, dropped right
            // after the database closes, is gone.
            while closed.changed().await.is_ok() {}
        };
        if tokio::time::timeout(DB_CLOSE_TIMEOUT, wait).await.is_err() {
            tracing::warn!(node = self.id, "metadata database still open after shutdown");
        }
        tracing::info!(node = self.id, "metadata service stopped");
    }

    // -----------------------------------------------------------------------------------

    fn read_map(&self) -> RwLockReadGuard<'_, ClusterMap> {
        self.map.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn forward(&self, leader: NodeId, req: MetaRequest) -> Result<MetaResponse, RemoteError> {
        let addr = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config.membership().get_node(&leader).map(|n| n.addr.clone())
        };
        let Some(addr) = addr else { return Err(not_leader(Some(leader))) };
        let sock: SocketAddr = addr
            .parse()
            .map_err(|e| err(ErrorCode::Internal, format!("leader {leader} has a bad address {addr:?}: {e}")))?;
        tracing::debug!(leader, ?req, "forwarding metadata request");
        let forwarded = NodeRequest::MetaForwarded(req);
        let call = self.rpc.call::<NodeRequest, NodeResponse>(
            sock,
            &forwarded,
            Bytes::new(),
            FORWARD_TIMEOUT,
        );
        // A dead leader answers nothing: give up as soon as Raft sees another leader (or
        // none), rather than at the timeout, so the caller retries with the new one.
        let mut metrics = self.raft.metrics();
        let leader_changed = async move {
            loop {
                if metrics.borrow_and_update().current_leader != Some(leader) {
                    return;
                }
                if metrics.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let answer = tokio::select! {
            answer = call => answer,
            _ = leader_changed => {
                return Err(err(ErrorCode::Unavailable, format!("metadata leader {leader} lost while forwarding; retry")));
            }
        };
        match answer {
            Ok((NodeResponse::Meta(r), _)) => r,
            Ok((NodeResponse::Error(e), _)) => Err(e),
            Ok((other, _)) => Err(err(ErrorCode::Internal, format!("leader {leader} answered {other:?}"))),
            Err(e) => Err(err(ErrorCode::Unavailable, format!("metadata leader {leader} unreachable: {e}"))),
        }
    }

    async fn linearizable(&self) -> Result<(), RemoteError> {
        self.reads.wait().await
    }

    async fn handle_local(&self, req: MetaRequest) -> Result<MetaResponse, RemoteError> {
        let now = now_ms();
        let cmd = match req {
            MetaRequest::Heartbeat { node, disks } => return self.heartbeat(node, disks).await,
            MetaRequest::RegisterNode { id, name, rpc_addr, nbd_addr, disks } => {
                return self.register_node(id, name, rpc_addr, nbd_addr, disks).await
            }
            MetaRequest::CreateVolume { name, size, chunk_size } => MetaCommand::CreateVolume {
                name,
                size,
                chunk_size: chunk_size.unwrap_or(basalt_types::DEFAULT_CHUNK_SIZE),
                now_ms: now,
            },
            MetaRequest::DeleteVolume { name } => MetaCommand::DeleteVolume { name },
            MetaRequest::ResizeVolume { name, size } => MetaCommand::ResizeVolume { name, size },
            MetaRequest::AcquireLease { volume, holder, node, force } => {
                MetaCommand::AcquireLease { volume, holder, node, force, now_ms: now }
            }
            MetaRequest::ReleaseLease { volume, holder } => MetaCommand::ReleaseLease { volume, holder },
            MetaRequest::DropReplicas { chunk, version, disks } => {
                MetaCommand::DropReplicas { chunk, version, disks, min_replicas: self.cfg.min_replicas }
            }
            MetaRequest::AllocateChunk { chunk, epoch } => return self.allocate_chunk(chunk, epoch).await,
            MetaRequest::GetVolume { name } => {
                self.linearizable().await?;
                let map = self.read_map();
                return match map.volume_by_name(&name) {
                    Some(v) => Ok(MetaResponse::Volume(v.clone())),
                    None => Err(err(ErrorCode::NotFound, format!("no volume named {name:?}"))),
                };
            }
            MetaRequest::ListVolumes => {
                self.linearizable().await?;
                return Ok(MetaResponse::Volumes(self.read_map().volumes().cloned().collect()));
            }
            MetaRequest::GetChunks { volume, first, count } => {
                self.linearizable().await?;
                let map = self.read_map();
                if map.volume(volume).is_none() {
                    return Err(err(ErrorCode::NotFound, format!("no volume with id {volume}")));
                }
                return Ok(MetaResponse::Chunks(map.chunks_of(volume, first, count)));
            }
            MetaRequest::Status => return self.status().await,
            MetaRequest::ListNodes => {
                self.linearizable().await?;
                return Ok(MetaResponse::Nodes(self.read_map().nodes().cloned().collect()));
            }
            MetaRequest::AddVoter { node } => return self.add_voter(node).await,
            MetaRequest::RemoveVoter { node } => return self.remove_voter(node).await,
            MetaRequest::PutRecord { key, value, expected } => MetaCommand::PutRecord { key, value, expected },
            MetaRequest::GetRecord { key } => {
                self.linearizable().await?;
                return Ok(MetaResponse::Record(self.read_map().record(&key).cloned()));
            }
            MetaRequest::ListRecords { prefix } => {
                self.linearizable().await?;
                return Ok(MetaResponse::Records(self.read_map().records_with_prefix(&prefix).cloned().collect()));
            }
            MetaRequest::IndexTxn(txn) => {
                // Refused here rather than by every replica's apply, which would say the same.
                crate::index::validate(&txn)?;
                MetaCommand::IndexTxn(txn)
            }
            MetaRequest::IndexGet { key } => {
                self.linearizable().await?;
                return Ok(MetaResponse::IndexEntry(self.index.get(key).await?));
            }
            MetaRequest::IndexList { prefix, start, limit } => {
                self.linearizable().await?;
                let (entries, more) = self.index.list(prefix, start, limit).await?;
                return Ok(MetaResponse::IndexPage { entries, more });
            }
        };
        reply_to_response(self.propose(cmd).await?)
    }

    async fn heartbeat(&self, node: NodeId, disks: Vec<DiskUsage>) -> Result<MetaResponse, RemoteError> {
        lock(&self.heartbeats).insert(node, Seen { at: Instant::now(), disks });
        let dead = self.read_map().node(node).is_some_and(|n| n.state == NodeState::Dead);
        if dead {
            tracing::info!(node, "dead node is heartbeating again; marking it alive");
            self.propose(MetaCommand::SetNodeState { id: node, state: NodeState::Alive, now_ms: now_ms() }).await?;
        }
        Ok(MetaResponse::HeartbeatAck { delete: Vec::new() })
    }

    async fn register_node(
        &self,
        id: NodeId,
        name: String,
        rpc_addr: String,
        nbd_addr: String,
        disks: Vec<basalt_types::DiskInfo>,
    ) -> Result<MetaResponse, RemoteError> {
        rpc_addr
            .parse::<SocketAddr>()
            .map_err(|e| err(ErrorCode::InvalidArgument, format!("rpc_addr {rpc_addr:?} is not ip:port: {e}")))?;
        // Two members at one address would make Raft talk to the wrong node (and itself).
        let clash = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let found =
                m.membership_config.membership().nodes().find(|(other, n)| **other != id && n.addr == rpc_addr).map(|(o, _)| *o);
            found
        };
        if let Some(other) = clash {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("rpc_addr {rpc_addr} already belongs to node {other}; refusing to register node {id} there"),
            ));
        }
        let cmd = MetaCommand::RegisterNode { id, name, rpc_addr: rpc_addr.clone(), nbd_addr, disks, now_ms: now_ms() };
        let resp = reply_to_response(self.propose(cmd).await?)?;
        // Every registered node keeps a copy of the map as a Raft learner (voters are
        // chosen explicitly with AddVoter).
        let known = self.raft.metrics().borrow().membership_config.membership().get_node(&id).cloned();
        match known {
            None => {
                tracing::info!(node = id, %rpc_addr, "adding registered node as raft learner");
                self.raft.add_learner(id, BasicNode::new(rpc_addr), false).await.map_err(write_error)?;
            }
            Some(n) if n.addr != rpc_addr => {
                tracing::info!(node = id, old = %n.addr, new = %rpc_addr, "raft member changed its address");
                let nodes = BTreeMap::from([(id, BasicNode::new(rpc_addr))]);
                self.raft.change_membership(ChangeMembers::SetNodes(nodes), true).await.map_err(write_error)?;
            }
            Some(_) => {}
        }
        Ok(resp)
    }

    fn alloc_lock(&self, chunk: ChunkId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.alloc_locks);
        if let Some(l) = locks.get(&chunk).and_then(Weak::upgrade) {
            return l;
        }
        locks.retain(|_, w| w.strong_count() > 0);
        let l = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(chunk, Arc::downgrade(&l));
        l
    }

    async fn allocate_chunk(&self, chunk: ChunkId, epoch: u64) -> Result<MetaResponse, RemoteError> {
        // Concurrent first writes to one chunk wait here and then find it allocated, so all
        // of them get the same replica set.
        let guard = self.alloc_lock(chunk);
        let _held = guard.lock().await;
        self.linearizable().await?;
        // Taken before the map lock: the heartbeat table is never locked while waiting for
        // the map (apply holds it for writing).
        let usage = self.usage();
        let disks = {
            let map = self.read_map();
            let Some(volume) = map.volume(chunk.volume) else {
                return Err(err(ErrorCode::NotFound, format!("no volume with id {}", chunk.volume)));
            };
            if volume.epoch != epoch {
                return Err(err(
                    ErrorCode::Fenced,
                    format!("volume {} is at epoch {}, not {epoch}", volume.name, volume.epoch),
                ));
            }
            if let Some(c) = map.chunk(chunk) {
                return Ok(MetaResponse::Chunk(c.clone()));
            }
            place(&map, &usage, REPLICAS, &[], chunk_seed(chunk))
        };
        if disks.len() < self.cfg.min_replicas as usize {
            return Err(err(
                ErrorCode::Unavailable,
                format!("only {} hosts alive with space, {} replicas needed", disks.len(), self.cfg.min_replicas),
            ));
        }
        tracing::debug!(%chunk, ?disks, "allocating chunk");
        reply_to_response(self.propose(MetaCommand::AllocateChunk { chunk, disks }).await?)
    }

    async fn status(&self) -> Result<MetaResponse, RemoteError> {
        self.linearizable().await?;
        let metrics = self.metrics();
        let voters: BTreeSet<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        let hb = lock(&self.heartbeats).clone();
        let map = self.read_map();
        let nodes = map
            .nodes()
            .map(|info| {
                let seen = hb.get(&info.id);
                NodeStatus {
                    info: info.clone(),
                    voter: voters.contains(&info.id),
                    last_seen_ms_ago: seen.map(|s| u64::try_from(s.at.elapsed().as_millis()).unwrap_or(u64::MAX)),
                    disks: seen.map(|s| s.disks.clone()).unwrap_or_default(),
                }
            })
            .collect();
        let all_disks = hb.values().flat_map(|s| s.disks.iter());
        let (capacity_bytes, free_bytes) =
            all_disks.fold((0u64, 0u64), |(c, f), d| (c.saturating_add(d.total_bytes), f.saturating_add(d.free_bytes)));
        Ok(MetaResponse::Status(ClusterStatus {
            leader: metrics.current_leader,
            term: metrics.current_term,
            nodes,
            volumes: map.volumes().count() as u64,
            capacity_bytes,
            free_bytes,
            chunks: map.chunk_health(),
        }))
    }

    async fn add_voter(&self, node: NodeId) -> Result<MetaResponse, RemoteError> {
        let addr = self.read_map().node(node).map(|n| n.rpc_addr.clone());
        let Some(addr) = addr else {
            return Err(err(ErrorCode::NotFound, format!("node {node} is not registered")));
        };
        let (is_voter, is_member) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let mem = m.membership_config.membership();
            (mem.voter_ids().any(|v| v == node), mem.get_node(&node).is_some())
        };
        if is_voter {
            return Ok(MetaResponse::Ok);
        }
        if !is_member {
            // Blocking: wait until the learner has caught up, so promoting it does not stall
            // commits while it replays the log.
            self.raft.add_learner(node, BasicNode::new(addr), true).await.map_err(write_error)?;
        }
        tracing::info!(node, "promoting node to raft voter");
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node])), false)
            .await
            .map_err(write_error)?;
        Ok(MetaResponse::Ok)
    }

    async fn remove_voter(&self, node: NodeId) -> Result<MetaResponse, RemoteError> {
        let voters: BTreeSet<NodeId> = self.metrics().membership_config.membership().voter_ids().collect();
        if !voters.contains(&node) {
            return Ok(MetaResponse::Ok);
        }
        if voters.len() <= 1 {
            return Err(err(ErrorCode::InvalidArgument, format!("node {node} is the last voter")));
        }
        tracing::info!(node, "removing node from raft voters (it stays a learner)");
        self.raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([node])), true)
            .await
            .map_err(write_error)?;
        Ok(MetaResponse::Ok)
    }

    /// Records the start of a leadership term (clearing the heartbeat table) or its end.
    fn observe_role(&self, m: &RaftMetrics) {
        let leading = m.state == ServerState::Leader && m.current_leader == Some(self.id);
        let mut l = lock(&self.leadership);
        match (*l, leading) {
            (Some(cur), true) if cur.term == m.current_term => {}
            (_, true) => {
                tracing::info!(node = self.id, term = m.current_term, "became metadata leader");
                lock(&self.heartbeats).clear();
                *l = Some(Leadership { term: m.current_term, since: Instant::now() });
            }
            (Some(_), false) => {
                tracing::info!(node = self.id, "no longer metadata leader");
                *l = None;
            }
            (None, false) => {}
        }
    }

    /// Marks dead every alive node silent for `dead_timeout`. Only once this node has led for
    /// `dead_timeout`: before that, silence may just mean the node heartbeats to the old
    /// leader.
    async fn check_dead(&self) {
        let Some(lead) = *lock(&self.leadership) else { return };
        if lead.since.elapsed() < self.cfg.dead_timeout || !self.is_leader() {
            return;
        }
        let last_seen: HashMap<NodeId, Instant> = lock(&self.heartbeats).iter().map(|(id, s)| (*id, s.at)).collect();
        let silent: Vec<NodeId> = {
            let map = self.read_map();
            map.nodes()
                .filter(|n| n.state == NodeState::Alive)
                // The leader is running this code: it is alive whatever its heartbeat
                // loop is doing.
                .filter(|n| n.id != self.id)
                .filter(|n| last_seen.get(&n.id).is_none_or(|at| at.elapsed() >= self.cfg.dead_timeout))
                .map(|n| n.id)
                .collect()
        };
        for id in silent {
            tracing::warn!(node = id, timeout = ?self.cfg.dead_timeout, "no heartbeat; marking node dead");
            let cmd = MetaCommand::SetNodeState { id, state: NodeState::Dead, now_ms: now_ms() };
            if let Err(e) = self.propose(cmd).await {
                tracing::warn!(node = id, error = %e, "could not mark node dead");
                return;
            }
        }
    }
}

/// Follows leadership changes and, while leading, runs the dead-node check every second.
async fn leader_duties(
    svc: Weak<MetaService>,
    mut metrics: tokio::sync::watch::Receiver<RaftMetrics>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(DEAD_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = metrics.changed() => {
                if changed.is_err() {
                    return; // raft stopped
                }
                let m = metrics.borrow_and_update().clone();
                let Some(svc) = svc.upgrade() else { return };
                svc.observe_role(&m);
            }
            _ = tick.tick() => {
                let Some(svc) = svc.upgrade() else { return };
                svc.check_dead().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_seed_is_stable_and_spreads() {
        let a = chunk_seed(ChunkId { volume: 1, index: 0 });
        assert_eq!(a, chunk_seed(ChunkId { volume: 1, index: 0 }));
        assert_ne!(a, chunk_seed(ChunkId { volume: 1, index: 1 }));
        assert_ne!(a, chunk_seed(ChunkId { volume: 0, index: 1 }));
    }

    #[test]
    fn config_validation_refuses_bad_values() {
        let ok = MetaConfig::new(1, "127.0.0.1:7000", "/tmp/x");
        assert!(ok.raft_config().is_ok());
        let mut bad = ok.clone();
        bad.min_replicas = 0;
        assert!(bad.raft_config().is_err());
        let mut bad = ok.clone();
        bad.election_timeout_max = bad.election_timeout_min;
        assert!(bad.raft_config().is_err());
        let mut bad = ok;
        bad.rpc_addr = "node1".into();
        assert!(bad.raft_config().is_err());
    }
}
