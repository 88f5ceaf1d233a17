//! Bad input from clients and peers gets a clear error, and the cluster keeps serving.

use anyhow::{bail, Context, Result};
use basalt_rpc::{ClusterCa, Identity, RpcEndpoint};
use basalt_tests::*;
use basalt_types::*;
use bytes::Bytes;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

/// A minimal NBD client (fixed newstyle, NBD_OPT_GO) so the test controls every field.
struct RawNbd {
    sock: TcpStream,
}

impl RawNbd {
    fn connect(addr: std::net::SocketAddr, export: &str) -> Result<(RawNbd, u64)> {
        let mut sock = TcpStream::connect(addr)?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut hello = [0u8; 18];
        sock.read_exact(&mut hello)?;
        if &hello[..8] != b"NBDMAGIC" || &hello[8..16] != b"IHAVEOPT" {
            bail!("not an NBD newstyle server");
        }
        sock.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
        // NBD_OPT_GO (7): name length, name, no info requests.
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        sock.write_all(b"IHAVEOPT")?;
        sock.write_all(&7u32.to_be_bytes())?;
        sock.write_all(&(data.len() as u32).to_be_bytes())?;
        sock.write_all(&data)?;
        let mut size = None;
        loop {
            let mut hdr = [0u8; 20];
            sock.read_exact(&mut hdr)?;
            let reply = u32::from_be_bytes(hdr[12..16].try_into()?);
            let len = u32::from_be_bytes(hdr[16..20].try_into()?) as usize;
            let mut body = vec![0u8; len];
            sock.read_exact(&mut body)?;
            match reply {
                1 => break, // NBD_REP_ACK
                3 if body.len() >= 10 && body[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(body[2..10].try_into()?));
                }
                3 => {}
                r if r & 0x8000_0000 != 0 => {
                    bail!("option refused ({r:#x}): {}", String::from_utf8_lossy(&body))
                }
                other => bail!("unexpected reply {other:#x}"),
            }
        }
        Ok((RawNbd { sock }, size.context("server sent no export size")?))
    }

    /// Send a command; return the error field of the simple reply (and the data for reads).
    fn command(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&42u64.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.sock.write_all(&req)?;
        let mut rep = [0u8; 16];
        self.sock.read_exact(&mut rep)?;
        if rep[..4] != 0x6744_6698u32.to_be_bytes() {
            bail!("bad reply magic");
        }
        let error = u32::from_be_bytes(rep[4..8].try_into()?);
        let mut data = Vec::new();
        if cmd == 0 && error == 0 {
            data = vec![0u8; len as usize];
            self.sock.read_exact(&mut data)?;
        }
        Ok((error, data))
    }
}

const NBD_CMD_READ: u16 = 0;
const NBD_CMD_WRITE: u16 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_the_cluster_keeps_serving() -> Result<()> {
    let c = TestCluster::start(3, Duration::from_secs(60)).await?;
    let client = c.client()?;
    client.create_volume("good", 16 << 20, Some(4 << 20)).await?;
    let nbd = c.file.node("node1")?.nbd_addr;

    // 1. Wrong export name: refused with a message naming it.
    let err = match RawNbd::connect(nbd, "no-such-volume") {
        Ok(_) => bail!("an unknown export was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("no-such-volume") || err.contains("0x80000006"), "unhelpful refusal: {err}");
    if require("nbdinfo").is_ok() {
        let out = Command::new("nbdinfo").arg(c.nbd_uri("node1", "no-such-volume")?).output()?;
        assert!(!out.status.success(), "nbdinfo accepted an unknown export");
    }

    // 2. Requests past the end of a volume: EINVAL/ENOSPC, and the connection stays usable.
    {
        let (mut conn, size) = RawNbd::connect(nbd, "good")?;
        assert_eq!(size, 16 << 20);
        let (e, _) = conn.command(NBD_CMD_READ, size - 512, 4096, &[])?;
        assert_eq!(e, EINVAL, "read past the end");
        let (e, _) = conn.command(NBD_CMD_WRITE, size, 4096, &[7u8; 4096])?;
        assert!(e == ENOSPC || e == EINVAL, "write past the end answered {e}");
        let (e, _) = conn.command(NBD_CMD_WRITE, 0, 4096, &[9u8; 4096])?;
        assert_eq!(e, 0, "a good write after bad ones");
        let (e, data) = conn.command(NBD_CMD_READ, 0, 4096, &[])?;
        assert_eq!(e, 0);
        assert!(data.iter().all(|&b| b == 9), "read back what was written");
    }

    // 3. Malformed frames from a peer holding a valid certificate: a header that is not a
    //    NodeRequest, and a request for an absurd range. Each gets an error.
    let admin = Identity::load(&c.file.certs_dir, &c.file.admin_identity)?;
    let rpc = RpcEndpoint::client_only(&admin)?;
    let node1 = c.file.node("node1")?.rpc_addr;
    let garbage: Result<(NodeResponse, Bytes), _> =
        rpc.call(node1, &("not", "a", "node request", 12345u64), Bytes::from_static(b"junk"), Duration::from_secs(5)).await;
    assert!(garbage.is_err(), "a malformed frame was answered: {garbage:?}");
    let absurd = NodeRequest::Chunk(ChunkRequest::Read {
        disk: 0,
        chunk: ChunkId { volume: 999, index: u64::MAX },
        version: 1,
        offset: u64::MAX - 10,
        len: u64::MAX,
    });
    let (resp, _): (NodeResponse, Bytes) = rpc.call(node1, &absurd, Bytes::new(), Duration::from_secs(5)).await?;
    assert!(matches!(resp, NodeResponse::Chunk(Err(_))), "absurd read answered {resp:?}");

    // 4. A node with a certificate from another CA cannot talk to the cluster.
    let foreign_ca = ClusterCa::generate("intruder")?;
    let intruder = RpcEndpoint::client_only(&foreign_ca.issue("node9")?)?;
    let refused: Result<(NodeResponse, Bytes), _> =
        intruder.call(node1, &NodeRequest::Meta(MetaRequest::Status), Bytes::new(), Duration::from_secs(5)).await;
    assert!(refused.is_err(), "a foreign certificate was accepted");

    // The cluster still serves.
    let status = client.status().await?;
    assert!(status.leader.is_some());
    assert_eq!(status.nodes.iter().filter(|n| n.info.state == NodeState::Alive).count(), 3);
    let vol = client.open_volume("good", basalt_storaged_client::VolumeOptions::writer("t", 0)).await?;
    assert!(vol.read(0, 4096).await?.iter().all(|&b| b == 9));
    c.passed()
}
