//! In-process metadata clusters on loopback: real QUIC endpoints with mTLS, real RocksDB
//! directories, one `MetaService` per node behind a tiny RPC service that dispatches
//! `NodeRequest::Raft`/`Meta` the way `storaged` does.

use basalt_meta::{MetaConfig, MetaService};
use basalt_rpc::{async_trait, Bytes, CancellationToken, ClusterCa, PeerInfo, RpcEndpoint, Service};
use basalt_types::{
    ChunkId, DiskId, DiskInfo, DiskUsage, ErrorCode, IndexOutcome, IndexTxn, MetaRequest, MetaResponse, NodeRequest, NodeResponse,
    NodeState, RemoteError, VolumeInfo,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

type Slot = Arc<RwLock<Option<Arc<MetaService>>>>;

/// What `storaged` does with node requests, minus the chunk service.
struct Dispatch {
    meta: Slot,
}

#[async_trait]
impl Service for Dispatch {
    type Request = NodeRequest;
    type Response = NodeResponse;

    async fn call(&self, _peer: PeerInfo, req: NodeRequest, _data: Bytes) -> (NodeResponse, Bytes) {
        let meta = self.meta.read().expect("slot lock").clone();
        let resp = match (meta, req) {
            (None, _) => NodeResponse::Error(RemoteError::new(ErrorCode::Unavailable, "metadata service not running")),
            (Some(m), NodeRequest::Raft(kind, payload)) => NodeResponse::Raft(m.handle_raft(kind, payload).await),
            (Some(m), NodeRequest::Meta(req)) => NodeResponse::Meta(m.handle(req).await),
            (Some(m), NodeRequest::MetaForwarded(req)) => NodeResponse::Meta(m.handle_forwarded(req).await),
            (Some(_), NodeRequest::Notice(_)) => NodeResponse::Done,
            (Some(_), NodeRequest::Chunk(_)) => {
                NodeResponse::Error(RemoteError::new(ErrorCode::InvalidArgument, "no chunk service here"))
            }
            (Some(_), NodeRequest::IscsiSessions) => NodeResponse::IscsiSessions(Vec::new()),
        };
        (resp, Bytes::new())
    }
}

struct TestNode {
    id: u64,
    addr: SocketAddr,
    endpoint: Arc<RpcEndpoint>,
    slot: Slot,
    serving: CancellationToken,
    db_path: PathBuf,
}

impl TestNode {
    async fn start(ca: &ClusterCa, id: u64, root: &std::path::Path, dead_timeout: Duration) -> TestNode {
        let identity = ca.issue(&format!("node{id}")).expect("issue identity");
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let endpoint = RpcEndpoint::new(socket, &identity).expect("endpoint");
        let addr = endpoint.local_addr().expect("local addr");
        let slot: Slot = Arc::new(RwLock::new(None));
        let serving = CancellationToken::new();
        let ep = endpoint.clone();
        let svc = Arc::new(Dispatch { meta: slot.clone() });
        let stop = serving.clone();
        tokio::spawn(async move { ep.serve(svc, stop).await });
        let node = TestNode { id, addr, endpoint, slot, serving, db_path: root.join(format!("node{id}")) };
        node.open_meta(dead_timeout).await;
        node
    }

    fn config(&self, dead_timeout: Duration) -> MetaConfig {
        let mut cfg = MetaConfig::new(self.id, self.addr.to_string(), self.db_path.clone());
        // Shorter than production so the test elects quickly, long enough for a loaded
        // 2-core machine not to flap.
        cfg.heartbeat_interval = Duration::from_millis(100);
        cfg.election_timeout_min = Duration::from_millis(600);
        cfg.election_timeout_max = Duration::from_millis(1200);
        cfg.dead_timeout = dead_timeout;
        cfg
    }

    async fn open_meta(&self, dead_timeout: Duration) -> Arc<MetaService> {
        let meta = MetaService::open(self.config(dead_timeout), self.endpoint.clone(), CancellationToken::new())
            .await
            .expect("open meta service");
        *self.slot.write().expect("slot lock") = Some(meta.clone());
        meta
    }

    fn meta(&self) -> Arc<MetaService> {
        self.slot.read().expect("slot lock").clone().expect("meta service running")
    }

    /// Stops the metadata service but keeps the endpoint (and so the address) alive.
    async fn stop_meta(&self) {
        let meta = self.slot.write().expect("slot lock").take();
        if let Some(m) = meta {
            m.shutdown().await;
        }
    }

    /// Stops everything: the node is gone from the network.
    async fn kill(&self) {
        self.stop_meta().await;
        self.serving.cancel();
        self.endpoint.close();
    }

    async fn handle(&self, req: MetaRequest) -> Result<MetaResponse, RemoteError> {
        self.meta().handle(req).await
    }

    /// Retries while the cluster answers "no leader yet / retry".
    async fn request(&self, req: MetaRequest) -> MetaResponse {
        let start = Instant::now();
        loop {
            match self.handle(req.clone()).await {
                Ok(r) => return r,
                Err(e) if matches!(e.code, ErrorCode::NotLeader | ErrorCode::Unavailable) && start.elapsed() < DEADLINE => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("node {}: {req:?} failed: {e}", self.id),
            }
        }
    }

    async fn register(&self) {
        self.request(self.registration()).await;
    }

    fn registration(&self) -> MetaRequest {
        MetaRequest::RegisterNode {
            id: self.id,
            name: format!("node{}", self.id),
            rpc_addr: self.addr.to_string(),
            nbd_addr: "127.0.0.1:10809".into(),
            disks: vec![DiskInfo {
                id: DiskId { node: self.id, disk: 0 },
                path: format!("/data/{}", self.id),
                total_bytes: 1 << 40,
                free_bytes: 1 << 40,
            }],
        }
    }

    async fn heartbeat(&self) {
        let disks = vec![DiskUsage { disk: 0, total_bytes: 1 << 40, free_bytes: 1 << 39, chunks: 0 }];
        let resp = self.request(MetaRequest::Heartbeat { node: self.id, disks }).await;
        assert!(matches!(resp, MetaResponse::HeartbeatAck { .. }), "{resp:?}");
    }
}

async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every running node of `nodes` names the same leader, one of them.
async fn agreed_leader(nodes: &[&TestNode]) -> u64 {
    eventually("a leader all nodes agree on", || {
        let leaders: BTreeSet<Option<u64>> = nodes.iter().map(|n| n.meta().leader()).collect();
        match leaders.into_iter().collect::<Vec<_>>().as_slice() {
            [Some(l)] if nodes.iter().any(|n| n.id == *l && n.meta().is_leader()) => Some(*l),
            _ => None,
        }
    })
    .await
}

/// Index transactions and reads through any node: conditions, atomicity, listing, limits,
/// and two racing creators of one key.
async fn check_index(via: &TestNode, a: &TestNode, b: &TestNode) {
    let txn = |checks: Vec<(&[u8], u64)>, puts: Vec<(&[u8], Option<&[u8]>)>| {
        MetaRequest::IndexTxn(IndexTxn {
            checks: checks.into_iter().map(|(k, v)| (k.to_vec(), v)).collect(),
            puts: puts.into_iter().map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))).collect(),
            adds: Vec::new(),
        })
    };
    let committed = |resp: MetaResponse| match resp {
        MetaResponse::Index(IndexOutcome::Committed { version }) => version,
        other => panic!("expected a commit, got {other:?}"),
    };
    let get = |key: &[u8]| MetaRequest::IndexGet { key: key.to_vec() };

    let v1 = committed(via.request(txn(vec![(b"a", 0)], vec![(b"a", Some(b"one")), (b"b", Some(b"two"))])).await);
    assert!(v1 > 0);
    // The same creation again conflicts, naming the key and its version; nothing is written.
    let again = via.request(txn(vec![(b"a", 0)], vec![(b"a", Some(b"uno")), (b"c", Some(b"x"))])).await;
    assert!(matches!(&again, MetaResponse::Index(IndexOutcome::Conflict { key, version }) if key == b"a" && *version == v1), "{again:?}");
    assert!(matches!(via.request(get(b"c")).await, MetaResponse::IndexEntry(None)), "a conflicting txn writes nothing");
    let v2 = committed(via.request(txn(vec![(b"b", v1)], vec![(b"b", None)])).await);
    assert!(v2 > v1);
    match via.request(get(b"a")).await {
        MetaResponse::IndexEntry(Some(e)) => assert_eq!((e.value.as_slice(), e.version), (&b"one"[..], v1)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(via.request(get(b"b")).await, MetaResponse::IndexEntry(None)));

    // Listing: by prefix, from a start key, in pages.
    committed(via.request(txn(vec![], vec![(b"p/1", Some(b"")), (b"p/2", Some(b"")), (b"p/3", Some(b"")), (b"q", Some(b""))])).await);
    let list = |prefix: &[u8], start: &[u8], limit| MetaRequest::IndexList { prefix: prefix.to_vec(), start: start.to_vec(), limit };
    let keys = |resp: MetaResponse| match resp {
        MetaResponse::IndexPage { entries, more } => (entries.into_iter().map(|e| e.key).collect::<Vec<_>>(), more),
        other => panic!("{other:?}"),
    };
    assert_eq!(keys(via.request(list(b"p/", b"", 2)).await), (vec![b"p/1".to_vec(), b"p/2".to_vec()], true));
    assert_eq!(keys(via.request(list(b"p/", b"p/2", 10)).await), (vec![b"p/2".to_vec(), b"p/3".to_vec()], false));
    assert_eq!(keys(via.request(list(b"p/", b"p/4", 10)).await), (vec![], false));

    // Bad transactions are refused before they reach the log.
    for bad in [txn(vec![], vec![]), txn(vec![], vec![(&[0u8; 5000][..], Some(b"x"))])] {
        assert_eq!(via.handle(bad).await.map_err(|e| e.code).err(), Some(ErrorCode::InvalidArgument));
    }

    // Counters: adds from several writers combine, without conflicts.
    let add = |delta: i64| MetaRequest::IndexTxn(IndexTxn { adds: vec![(b"count".to_vec(), delta)], ..Default::default() });
    let (x, y) = tokio::join!(a.request(add(5)), b.request(add(-2)));
    committed(x);
    committed(y);
    match via.request(get(b"count")).await {
        MetaResponse::IndexEntry(Some(e)) => assert_eq!(e.value, 3i64.to_be_bytes().to_vec()),
        other => panic!("{other:?}"),
    }
    let not_a_counter = MetaRequest::IndexTxn(IndexTxn { adds: vec![(b"a".to_vec(), 1)], ..Default::default() });
    assert_eq!(via.handle(not_a_counter).await.map_err(|e| e.code).err(), Some(ErrorCode::InvalidArgument));

    // Two creators of one key through two nodes: exactly one wins.
    let (x, y) = tokio::join!(
        a.request(txn(vec![(b"race", 0)], vec![(b"race", Some(b"from a"))])),
        b.request(txn(vec![(b"race", 0)], vec![(b"race", Some(b"from b"))])),
    );
    let wins = [&x, &y].iter().filter(|r| matches!(r, MetaResponse::Index(IndexOutcome::Committed { .. }))).count();
    assert_eq!(wins, 1, "{x:?} {y:?}");
}

fn volume(resp: MetaResponse) -> VolumeInfo {
    match resp {
        MetaResponse::Volume(v) => v,
        other => panic!("expected a volume, got {other:?}"),
    }
}

fn voters(node: &TestNode) -> BTreeSet<u64> {
    node.meta().metrics().membership_config.membership().voter_ids().collect()
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_survives_leader_loss_restart_and_membership_changes() {
    init_tracing();
    let ca = ClusterCa::generate("test").expect("ca");
    let root = tempfile::tempdir().expect("tempdir");
    let dead = Duration::from_secs(3600);
    let n1 = TestNode::start(&ca, 1, root.path(), dead).await;
    let n2 = TestNode::start(&ca, 2, root.path(), dead).await;
    let n3 = TestNode::start(&ca, 3, root.path(), dead).await;
    let nodes = [&n1, &n2, &n3];

    // Bootstrap is idempotent: a second call (here from another node) is a no-op.
    let voters_map: BTreeMap<u64, String> = nodes.iter().map(|n| (n.id, n.addr.to_string())).collect();
    n1.meta().bootstrap(voters_map.clone()).await.expect("bootstrap");
    let leader = agreed_leader(&nodes).await;
    n2.meta().bootstrap(voters_map).await.expect("second bootstrap is a no-op");
    for n in nodes {
        n.register().await;
        n.heartbeat().await;
    }

    // Create a volume through a follower: the request is forwarded to the leader.
    let follower = nodes.iter().find(|n| n.id != leader).expect("a follower");
    let vol = volume(
        follower
            .request(MetaRequest::CreateVolume { name: "vol1".into(), size: 1 << 30, chunk_size: Some(64 << 20) })
            .await,
    );
    assert_eq!(vol.name, "vol1");
    let again = follower
        .handle(MetaRequest::CreateVolume { name: "vol1".into(), size: 1 << 30, chunk_size: None })
        .await;
    assert_eq!(again.map_err(|e| e.code).err(), Some(ErrorCode::AlreadyExists));
    for n in nodes {
        assert_eq!(volume(n.request(MetaRequest::GetVolume { name: "vol1".into() }).await).id, vol.id);
    }

    check_index(follower, &n1, &n3).await;

    // Allocation: three replicas on distinct hosts; concurrent callers get the same chunk;
    // a stale epoch is fenced.
    let chunk = ChunkId { volume: vol.id, index: 0 };
    let (a, b) = tokio::join!(
        n1.request(MetaRequest::AllocateChunk { chunk, epoch: vol.epoch }),
        n3.request(MetaRequest::AllocateChunk { chunk, epoch: vol.epoch }),
    );
    let (MetaResponse::Chunk(a), MetaResponse::Chunk(b)) = (a, b) else { panic!("expected chunks") };
    assert_eq!(a, b);
    let hosts: BTreeSet<u64> = a.replicas.iter().map(|r| r.disk.node).collect();
    assert_eq!(hosts.len(), 3, "{a:?}");
    let fenced = n2.handle(MetaRequest::AllocateChunk { chunk, epoch: vol.epoch + 1 }).await;
    assert_eq!(fenced.map_err(|e| e.code).err(), Some(ErrorCode::Fenced));

    // Status from a follower reflects heartbeats, voters and chunks.
    let MetaResponse::Status(status) = follower.request(MetaRequest::Status).await else { panic!("status") };
    assert_eq!(status.leader, Some(leader));
    assert_eq!(status.nodes.len(), 3);
    assert!(status.nodes.iter().all(|n| n.voter && n.last_seen_ms_ago.is_some()));
    assert_eq!(status.capacity_bytes, 3 << 40);
    assert_eq!(status.volumes, 1);
    assert_eq!(status.chunks.total, 1);

    // Kill the leader: the two others elect a new one and still have the volume.
    let old = nodes.iter().find(|n| n.id == leader).expect("leader node");
    old.kill().await;
    let alive: Vec<&TestNode> = nodes.iter().copied().filter(|n| n.id != leader).collect();
    let new_leader = eventually("a new leader", || {
        let l = alive[0].meta().leader()?;
        (l != leader && alive.iter().all(|n| n.meta().leader() == Some(l))).then_some(l)
    })
    .await;
    for n in &alive {
        assert_eq!(volume(n.request(MetaRequest::GetVolume { name: "vol1".into() }).await).id, vol.id);
    }

    // Restart the remaining follower from its database: its map is there before it has
    // heard from anyone.
    let restarted = alive.iter().find(|n| n.id != new_leader).expect("follower");
    restarted.stop_meta().await;
    let meta = restarted.open_meta(dead).await;
    {
        let map = meta.map();
        let map = map.read().expect("map lock");
        assert_eq!(map.volume_by_name("vol1").map(|v| v.id), Some(vol.id), "map loaded from RocksDB");
        assert!(map.chunk(chunk).is_some());
    }
    volume(restarted.request(MetaRequest::CreateVolume { name: "vol2".into(), size: 1 << 30, chunk_size: None }).await);

    // Compact the log on the leader so a new node must be sent a snapshot.
    let leader_node = alive.iter().find(|n| n.id == new_leader).expect("leader");
    leader_node.meta().compact(DEADLINE).await.expect("compact");

    // A fourth node joins as a learner (on registration), catches up, and becomes a voter.
    // A node outside the group knows no leader: it registers through a member, as
    // `storaged` does through its seed peers.
    let n4 = TestNode::start(&ca, 4, root.path(), dead).await;
    assert_eq!(n4.handle(n4.registration()).await.map_err(|e| e.code).err(), Some(ErrorCode::NotLeader));
    restarted.request(n4.registration()).await;
    eventually("node 4 to receive the map", || {
        let map = n4.meta().map();
        let map = map.read().expect("map lock");
        (map.volume_by_name("vol1").is_some() && map.volume_by_name("vol2").is_some()).then_some(())
    })
    .await;
    assert!(!voters(&n4).contains(&4), "a registered node starts as a learner");
    // The index came with the snapshot (the log that wrote it was compacted away).
    let a = n4.meta().local_index().get(b"a".to_vec()).await.expect("local index read");
    assert_eq!(a.map(|e| e.value), Some(b"one".to_vec()), "index entries travel in snapshots");
    let listed = n4.meta().local_index().list(b"p/".to_vec(), Vec::new(), 100).await.expect("local list");
    assert_eq!(listed.0.len(), 3);
    n4.request(MetaRequest::AddVoter { node: 4 }).await;
    let want: BTreeSet<u64> = [1, 2, 3, 4].into_iter().collect();
    eventually("node 4 to be a voter", || (voters(leader_node) == want).then_some(())).await;

    // Remove the dead old leader from the voters; the group keeps working without it.
    n4.request(MetaRequest::RemoveVoter { node: leader }).await;
    let want: BTreeSet<u64> = [1, 2, 3, 4].into_iter().filter(|&i| i != leader).collect();
    eventually("the old leader to be removed", || (voters(&n4) == want).then_some(())).await;
    volume(n4.request(MetaRequest::CreateVolume { name: "vol3".into(), size: 1 << 30, chunk_size: None }).await);
    let MetaResponse::Volumes(vols) = n4.request(MetaRequest::ListVolumes).await else { panic!("volumes") };
    assert_eq!(vols.len(), 3);

    for n in [&n1, &n2, &n3, &n4] {
        if n.id != leader {
            n.kill().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_nodes_are_marked_dead_and_revive_on_heartbeat() {
    init_tracing();
    let ca = ClusterCa::generate("test").expect("ca");
    let root = tempfile::tempdir().expect("tempdir");
    let n1 = TestNode::start(&ca, 1, root.path(), Duration::from_secs(2)).await;
    n1.meta().bootstrap(BTreeMap::from([(1, n1.addr.to_string())])).await.expect("bootstrap");
    agreed_leader(&[&n1]).await;
    n1.register().await;

    // Node 2 is a storage node outside the Raft group (registered through node 1).
    let MetaRequest::RegisterNode { name: _, rpc_addr, nbd_addr, disks, .. } = n1.registration() else {
        unreachable!("registration is a RegisterNode")
    };
    let disks: Vec<DiskInfo> = disks.into_iter().map(|d| DiskInfo { id: DiskId { node: 2, disk: 0 }, ..d }).collect();
    // Not at node 1's address: refused, two Raft members cannot share one.
    let clash = MetaRequest::RegisterNode {
        id: 2,
        name: "node2".into(),
        rpc_addr,
        nbd_addr: nbd_addr.clone(),
        disks: disks.clone(),
    };
    assert_eq!(n1.handle(clash).await.map_err(|e| e.code).err(), Some(ErrorCode::InvalidArgument));
    // An address nobody listens on: node 2 never answers (nor heartbeats).
    let rpc_addr = "127.0.0.1:9".to_string();
    n1.request(MetaRequest::RegisterNode { id: 2, name: "node2".into(), rpc_addr, nbd_addr, disks }).await;

    let state = |id| n1.meta().map().read().expect("map lock").node(id).map(|n| n.state);
    assert_eq!(state(2), Some(NodeState::Alive));
    // No heartbeat: after the dead timeout (counted from when 1 became leader) 2 is dead.
    eventually("node 2 to be marked dead", || (state(2) == Some(NodeState::Dead)).then_some(())).await;
    // The leader never marks itself dead, heartbeat or not: it is running.
    assert_eq!(state(1), Some(NodeState::Alive));
    let disks = vec![DiskUsage { disk: 0, total_bytes: 1 << 40, free_bytes: 1 << 39, chunks: 0 }];
    n1.request(MetaRequest::Heartbeat { node: 2, disks }).await;
    eventually("node 2 to be alive again", || (state(2) == Some(NodeState::Alive)).then_some(())).await;

    // The last voter cannot be removed.
    let refused = n1.handle(MetaRequest::RemoveVoter { node: 1 }).await;
    assert_eq!(refused.map_err(|e| e.code).err(), Some(ErrorCode::InvalidArgument));
    // Too few hosts for a chunk (min_replicas 2): node 2 goes silent again, one host is left.
    eventually("node 2 to be marked dead again", || (state(2) == Some(NodeState::Dead)).then_some(())).await;
    let vol = volume(n1.request(MetaRequest::CreateVolume { name: "v".into(), size: 1 << 30, chunk_size: None }).await);
    let r = n1.handle(MetaRequest::AllocateChunk { chunk: ChunkId { volume: vol.id, index: 0 }, epoch: vol.epoch }).await;
    assert_eq!(r.map_err(|e| e.code).err(), Some(ErrorCode::Unavailable));
    n1.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_retryably_before_bootstrap() {
    init_tracing();
    let ca = ClusterCa::generate("test").expect("ca");
    let root = tempfile::tempdir().expect("tempdir");
    let n1 = TestNode::start(&ca, 1, root.path(), Duration::from_secs(60)).await;
    let r = n1.handle(MetaRequest::ListVolumes).await;
    assert_eq!(r.map_err(|e| e.code).err(), Some(ErrorCode::NotLeader));
    n1.kill().await;
}
