//! The Raft transport: openraft messages carried as `NodeRequest::Raft(kind, bytes)` over the
//! node-to-node RPC endpoint.
//!
//! Requests and replies are bincode-encoded openraft types. The reply payload is the whole
//! `Result<Response, RaftError>` of the remote `Raft` call, so remote Raft errors (a follower
//! refusing a snapshot chunk, a node shutting down) reach openraft as `RemoteError`s, while
//! transport failures become `Unreachable` (openraft backs off), `Timeout` or `NetworkError`.

use crate::codec;
use crate::raft::{Node, NodeId, TypeConfig};
use basalt_rpc::{RpcEndpoint, RpcError};
use basalt_types::{NodeRequest, NodeResponse, RaftKind};
use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, RPCTypes, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Builds one [`Connection`] per Raft peer; all share the node's RPC endpoint (and so its
/// QUIC connections).
#[derive(Clone)]
pub struct NetworkFactory {
    id: NodeId,
    rpc: Arc<RpcEndpoint>,
}

impl NetworkFactory {
    pub fn new(id: NodeId, rpc: Arc<RpcEndpoint>) -> Self {
        Self { id, rpc }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Connection {
        Connection { id: self.id, target, node: node.clone(), rpc: self.rpc.clone() }
    }
}

/// The Raft client side towards one peer.
pub struct Connection {
    id: NodeId,
    target: NodeId,
    node: Node,
    rpc: Arc<RpcEndpoint>,
}

/// A failed Raft call, before it is typed for the particular openraft method.
enum CallError {
    Unreachable(Unreachable),
    Timeout(Duration),
    Network(NetworkError),
}

impl Connection {
    /// Sends one Raft message and decodes the remote `Result<Resp, RaftError<E>>`.
    async fn call<Req, Resp, E>(
        &self,
        kind: RaftKind,
        req: &Req,
        timeout: Duration,
    ) -> Result<Result<Resp, RaftError<NodeId, E>>, CallError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let addr: SocketAddr = self.node.addr.parse().map_err(|e: std::net::AddrParseError| {
            CallError::Unreachable(Unreachable::new(&AnyError::error(format!(
                "node {} has an invalid address {:?}: {e}",
                self.target, self.node.addr
            ))))
        })?;
        let payload = codec::encode(req).map_err(|e| CallError::Network(NetworkError::new(&e)))?;
        let request = NodeRequest::Raft(kind, payload);
        let (response, _) = self
            .rpc
            .call::<NodeRequest, NodeResponse>(addr, &request, Bytes::new(), timeout)
            .await
            .map_err(classify)?;
        match response {
            NodeResponse::Raft(Ok(bytes)) => codec::decode::<Result<Resp, RaftError<NodeId, E>>>(&bytes)
                .map_err(|e| CallError::Network(NetworkError::new(&AnyError::error(format!("bad raft reply: {e}"))))),
            // The peer answered but could not take the message (it does not run the metadata
            // service yet, or the message did not decode): retrying later is all we can do.
            NodeResponse::Raft(Err(e)) | NodeResponse::Error(e) => {
                Err(CallError::Unreachable(Unreachable::new(&e)))
            }
            other => Err(CallError::Network(NetworkError::new(&AnyError::error(format!(
                "unexpected reply to a raft message: {other:?}"
            ))))),
        }
    }

    fn typed<Resp, E: std::error::Error>(
        &self,
        action: RPCTypes,
        res: Result<Result<Resp, RaftError<NodeId, E>>, CallError>,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>> {
        match res {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                remote,
            ))),
            Err(CallError::Unreachable(e)) => Err(RPCError::Unreachable(e)),
            Err(CallError::Network(e)) => Err(RPCError::Network(e)),
            Err(CallError::Timeout(timeout)) => {
                Err(RPCError::Timeout(Timeout { action, id: self.id, target: self.target, timeout }))
            }
        }
    }
}

/// Which transport failures mean "the peer is down, back off" and which are worth an
/// immediate retry.
fn classify(e: RpcError) -> CallError {
    match e {
        RpcError::Timeout { timeout, .. } => CallError::Timeout(timeout),
        RpcError::Connect { .. }
        | RpcError::Handshake { .. }
        | RpcError::ConnectionLost { .. }
        | RpcError::InvalidAddress(_)
        | RpcError::StreamReset { .. }
        | RpcError::Closed => CallError::Unreachable(Unreachable::new(&e)),
        other => CallError::Network(NetworkError::new(&other)),
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let res = self.call(RaftKind::AppendEntries, &rpc, option.hard_ttl()).await;
        self.typed(RPCTypes::AppendEntries, res)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>>
    {
        let res = self.call(RaftKind::InstallSnapshot, &rpc, option.hard_ttl()).await;
        self.typed(RPCTypes::InstallSnapshot, res)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let res = self.call(RaftKind::Vote, &rpc, option.hard_ttl()).await;
        self.typed(RPCTypes::Vote, res)
    }

    fn backoff(&self) -> Backoff {
        // A dead peer is retried every 500 ms at first, then once a second; reconnecting is
        // cheap on loopback but there is no point in hammering a stopped node.
        Backoff::new([200u64, 500].into_iter().chain(std::iter::repeat(1000)).map(Duration::from_millis))
    }
}

/// The server side: decodes a Raft message, hands it to the local Raft node and encodes its
/// whole result.
pub(crate) async fn serve(raft: &crate::raft::Raft, kind: RaftKind, payload: &[u8]) -> Result<Vec<u8>, basalt_types::RemoteError> {
    use basalt_types::{ErrorCode, RemoteError as WireError};
    let bad = |e: String| WireError::new(ErrorCode::InvalidArgument, format!("undecodable {kind:?} message: {e}"));
    let encoded = match kind {
        RaftKind::AppendEntries => {
            let req: AppendEntriesRequest<TypeConfig> = codec::decode(payload).map_err(bad)?;
            codec::encode(&raft.append_entries(req).await)
        }
        RaftKind::Vote => {
            let req: VoteRequest<NodeId> = codec::decode(payload).map_err(bad)?;
            codec::encode(&raft.vote(req).await)
        }
        RaftKind::InstallSnapshot => {
            let req: InstallSnapshotRequest<TypeConfig> = codec::decode(payload).map_err(bad)?;
            codec::encode(&raft.install_snapshot(req).await)
        }
    };
    encoded.map_err(|e| WireError::new(ErrorCode::Internal, format!("encoding the {kind:?} reply: {e}")))
}
