//! Basalt side of the target: targets, LUNs, CHAP and ACLs stored as cluster metadata
//! records, volumes as block devices, ALUA states from the volumes' write leases, and
//! persistent reservations kept in metadata so every node sees the same ones.
//!
//! Records (JSON values, see [`basalt_types::Record`]):
//! - `iscsi/target/<iqn>`: a [`TargetDef`];
//! - `iscsi/portal/<node id>`: the iSCSI address that node serves on (written at start);
//! - `iscsi/pr/<volume id>`: the volume's [`Reservations`].
//!
//! Multipath: every node serves every target. Each node is one target port group with one
//! port; the group id, relative port id and portal group tag are all the node id. The node
//! that holds the volume's write lease is active/optimised, the others active/non-optimised.
//! A write arriving on another node takes the lease over (bumping the epoch, so the old
//! node's writes are refused) — that is how a path moves when an initiator fails over.

use crate::lu::{
    AccessState, AluaStates, BlockDevice, Chap, DeviceError, Extent, Portal, PortGroup,
    Reservations, ReservationStore, TargetAccess,
};
use async_trait::async_trait;
use basalt_storaged_client::{Error as ClientError, StorageClient, Volume, VolumeOptions};
use basalt_types::{ErrorCode, NodeId, NodeState, VolumeId};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::info;

pub const TARGET_PREFIX: &str = "iscsi/target/";
pub const PORTAL_PREFIX: &str = "iscsi/portal/";
pub const PR_PREFIX: &str = "iscsi/pr/";
/// Lease holders of iSCSI paths start with this; a path takes a lease over only from another
/// iSCSI path, never from a VM's NBD export.
pub const HOLDER_PREFIX: &str = "iscsi@";
/// Highest LUN we accept (flat space addressing goes to 16383).
pub const MAX_LUN: u64 = 16383;

/// A target as stored in metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetDef {
    pub name: String,
    #[serde(default)]
    pub alias: Option<String>,
    #[serde(default)]
    pub luns: Vec<LunDef>,
    #[serde(default)]
    pub chap: Option<Chap>,
    /// Initiator names allowed; empty = any.
    #[serde(default)]
    pub initiators: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LunDef {
    pub lun: u64,
    pub volume: String,
    /// The LUN gives its volume read-only: MODE SENSE reports it write protected and
    /// commands that would write it fail with DATA PROTECT. It never takes the volume's
    /// write lease, so it can be served beside a writer elsewhere.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

impl TargetDef {
    pub fn access(&self) -> TargetAccess {
        TargetAccess {
            name: self.name.clone(),
            alias: self.alias.clone(),
            chap: self.chap.clone(),
            initiators: self.initiators.clone(),
            luns: self.luns.iter().map(|l| (l.lun, l.volume.clone())).collect(),
            read_only: self.luns.iter().filter(|l| l.read_only).map(|l| l.lun).collect(),
        }
    }

    /// Checks names, LUN numbers and secrets; every write of a target goes through it.
    pub fn validate(&self) -> Result<(), String> {
        validate_iscsi_name(&self.name)?;
        for i in &self.initiators {
            validate_iscsi_name(i).map_err(|e| format!("initiator: {e}"))?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for l in &self.luns {
            if l.lun > MAX_LUN {
                return Err(format!("LUN {} is above {MAX_LUN}", l.lun));
            }
            if !seen.insert(l.lun) {
                return Err(format!("LUN {} is used twice", l.lun));
            }
        }
        if let Some(chap) = &self.chap {
            validate_chap(&chap.user, &chap.secret)?;
            if let Some((user, secret)) = &chap.mutual {
                validate_chap(user, secret).map_err(|e| format!("mutual CHAP: {e}"))?;
                if secret == &chap.secret {
                    return Err("the mutual CHAP secret must differ from the initiator's secret".into());
                }
            }
        }
        Ok(())
    }
}

/// iSCSI names (RFC 7143 4.2.7): `iqn.YYYY-MM.reversed.domain[:anything]`, `eui.` + 16 hex
/// digits or `naa.` + 16 or 32 hex digits; at most 223 bytes, lower case.
pub fn validate_iscsi_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 223 {
        return Err(format!("iSCSI name must be 1 to 223 bytes, got {}", name.len()));
    }
    if name.chars().any(|c| c.is_ascii_uppercase() || c.is_whitespace() || c.is_control()) {
        return Err(format!("iSCSI name {name:?} must be lower case without spaces"));
    }
    let hex = |s: &str, lens: &[usize]| lens.contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit());
    if let Some(rest) = name.strip_prefix("iqn.") {
        let date_ok = rest.len() > 8
            && rest.as_bytes()[4] == b'-'
            && rest[..4].chars().all(|c| c.is_ascii_digit())
            && rest[5..7].chars().all(|c| c.is_ascii_digit())
            && rest.as_bytes()[7] == b'.';
        if !date_ok {
            return Err(format!("{name:?} is not iqn.YYYY-MM.domain[:id]"));
        }
        return Ok(());
    }
    if let Some(rest) = name.strip_prefix("eui.") {
        return if hex(rest, &[16]) { Ok(()) } else { Err(format!("{name:?}: eui. needs 16 hex digits")) };
    }
    if let Some(rest) = name.strip_prefix("naa.") {
        return if hex(rest, &[16, 32]) { Ok(()) } else { Err(format!("{name:?}: naa. needs 16 or 32 hex digits")) };
    }
    Err(format!("{name:?} is not an iSCSI name (iqn., eui. or naa.)"))
}

/// CHAP secrets: 12 to 255 bytes (Windows and Linux initiators refuse shorter ones; RFC 7143
/// 12.1.3 asks for at least 96 bits).
fn validate_chap(user: &str, secret: &str) -> Result<(), String> {
    if user.is_empty() || user.len() > 255 {
        return Err("CHAP user name must be 1 to 255 bytes".into());
    }
    if secret.len() < 12 || secret.len() > 255 {
        return Err(format!("CHAP secret must be 12 to 255 bytes, got {}", secret.len()));
    }
    Ok(())
}

fn target_key(name: &str) -> String {
    format!("{TARGET_PREFIX}{name}")
}

fn client_err(e: ClientError) -> String {
    e.to_string()
}

/// Every target, in name order.
pub async fn list_targets(client: &StorageClient) -> Result<Vec<TargetDef>, String> {
    let records = client.list_records(TARGET_PREFIX).await.map_err(client_err)?;
    records
        .iter()
        .map(|r| serde_json::from_slice(&r.value).map_err(|e| format!("record {}: {e}", r.key)))
        .collect()
}

/// The targets and LUN numbers that export `volume`.
pub async fn exports_of_volume(client: &StorageClient, volume: &str) -> Result<Vec<(String, u64)>, String> {
    Ok(list_targets(client)
        .await?
        .into_iter()
        .flat_map(|t| t.luns.into_iter().filter(|l| l.volume == volume).map(move |l| (t.name.clone(), l.lun)))
        .collect())
}

pub async fn get_target(client: &StorageClient, name: &str) -> Result<Option<(TargetDef, u64)>, String> {
    match client.get_record(&target_key(name)).await.map_err(client_err)? {
        None => Ok(None),
        Some(r) => {
            let def = serde_json::from_slice(&r.value).map_err(|e| format!("record {}: {e}", r.key))?;
            Ok(Some((def, r.version)))
        }
    }
}

/// Reads a target, lets `change` edit it, and writes it back if nobody changed it meanwhile
/// (retrying otherwise). `create`: start from an empty target if absent (else NotFound).
pub async fn update_target(
    client: &StorageClient,
    name: &str,
    create: bool,
    change: impl Fn(&mut TargetDef) -> Result<(), String>,
) -> Result<TargetDef, String> {
    loop {
        let (mut def, version) = match get_target(client, name).await? {
            Some(found) => found,
            None if create => (
                TargetDef { name: name.to_string(), alias: None, luns: Vec::new(), chap: None, initiators: Vec::new() },
                0,
            ),
            None => return Err(format!("target {name} does not exist")),
        };
        change(&mut def)?;
        def.validate()?;
        for l in &def.luns {
            client.volume(&l.volume).await.map_err(|e| format!("LUN {} volume {}: {e}", l.lun, l.volume))?;
        }
        let value = serde_json::to_vec(&def).map_err(|e| e.to_string())?;
        match client.put_record(&target_key(name), Some(value), Some(version)).await {
            Ok(_) => {
                announce_target_change(client, name).await;
                return Ok(def);
            }
            Err(e) if e.remote_code() == Some(ErrorCode::StaleVersion) => continue,
            Err(e) => return Err(client_err(e)),
        }
    }
}

pub async fn delete_target(client: &StorageClient, name: &str) -> Result<(), String> {
    if get_target(client, name).await?.is_none() {
        return Err(format!("target {name} does not exist"));
    }
    client.put_record(&target_key(name), None, None).await.map_err(client_err)?;
    announce_target_change(client, name).await;
    Ok(())
}

/// Tells every node that a target changed, so that sessions that may no longer use it end
/// now. Best effort: a node that misses it finds out at its next periodic check
/// ([`SESSION_RECHECK`]).
async fn announce_target_change(client: &StorageClient, name: &str) {
    let notice = basalt_types::Notice::TargetChanged { name: name.to_string() };
    client.broadcast_notice(notice, None, NOTICE_TIMEOUT).await;
}

/// How often a node checks the targets of its live sessions against their definitions,
/// for changes whose notice it missed.
pub const SESSION_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Announces this node's iSCSI portal.
pub async fn publish_portal(client: &StorageClient, node: NodeId, addr: SocketAddr) -> Result<(), String> {
    let key = format!("{PORTAL_PREFIX}{node}");
    client.put_record(&key, Some(addr.to_string().into_bytes()), None).await.map_err(client_err)?;
    Ok(())
}

/// Portals of the nodes that are alive, by node id.
pub async fn live_portals(client: &StorageClient) -> Result<BTreeMap<NodeId, SocketAddr>, String> {
    let nodes = client.list_nodes().await.map_err(client_err)?;
    let alive: std::collections::BTreeSet<NodeId> =
        nodes.iter().filter(|n| n.state == NodeState::Alive).map(|n| n.id).collect();
    let mut out = BTreeMap::new();
    for r in client.list_records(PORTAL_PREFIX).await.map_err(client_err)? {
        let Some(node) = r.key.strip_prefix(PORTAL_PREFIX).and_then(|n| n.parse::<NodeId>().ok()) else { continue };
        let Some(addr) = std::str::from_utf8(&r.value).ok().and_then(|a| a.parse().ok()) else { continue };
        if alive.contains(&node) {
            out.insert(node, addr);
        }
    }
    Ok(out)
}

/// Port ids are 16-bit; Basalt node ids are small in practice. Ids that do not fit are
/// folded (a clash only makes two nodes share a port group in reports).
pub fn port_of(node: NodeId) -> u16 {
    if node <= u64::from(u16::MAX) && node > 0 {
        node as u16
    } else {
        (node % 65_535 + 1) as u16
    }
}

/// How long ALUA states and reservations read from metadata are reused. The SCSI layer asks
/// for both on every command; a metadata round trip each time would cost more than the I/O.
/// Changes made on this node are seen at once (the caches are updated or cleared locally);
/// changes made through another node are seen within this time.
const METADATA_CACHE: std::time::Duration = std::time::Duration::from_secs(1);

/// A value read from metadata, reused for [`METADATA_CACHE`] after it was stored.
pub struct Expiring<T> {
    slot: std::sync::Mutex<Option<(std::time::Instant, T)>>,
}

impl<T> Default for Expiring<T> {
    fn default() -> Self {
        Self { slot: std::sync::Mutex::new(None) }
    }
}

impl<T: Clone> Expiring<T> {
    fn get(&self) -> Option<T> {
        let c = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        c.as_ref().filter(|(at, _)| at.elapsed() < METADATA_CACHE).map(|(_, v)| v.clone())
    }

    fn put(&self, value: T) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some((std::time::Instant::now(), value));
    }

    pub fn clear(&self) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// ALUA states of one volume as last computed, shared by its device (which clears it when
/// this node takes or loses the lease) and its [`LeaseAlua`].
pub type AluaCache = Arc<Expiring<Vec<PortGroup>>>;

fn device_err(e: ClientError) -> DeviceError {
    match e.code() {
        ErrorCode::Fenced => DeviceError::Transitioning(e.to_string()),
        ErrorCode::Unavailable | ErrorCode::NotLeader => DeviceError::Unavailable(e.to_string()),
        ErrorCode::InvalidArgument => DeviceError::OutOfRange,
        _ => DeviceError::Io(e.to_string()),
    }
}

/// A Basalt volume as seen by one node's iSCSI target. Reads need no lease; the first write
/// takes the volume's write lease for this node (taking it over from another iSCSI path).
/// Its size is that of its reader [`Volume`], which the storage client updates when the
/// volume is resized (notice or periodic check).
pub struct VolumeDevice {
    client: Arc<StorageClient>,
    name: String,
    id: VolumeId,
    holder: String,
    node: NodeId,
    writer: tokio::sync::Mutex<Option<Arc<Volume>>>,
    /// Opened at once (a reader takes no lease and costs no round trip): it also carries
    /// the device's current size.
    reader: Arc<Volume>,
    alua: AluaCache,
}

impl VolumeDevice {
    pub async fn open(
        client: Arc<StorageClient>,
        volume: &str,
        node: NodeId,
        node_name: &str,
        alua: AluaCache,
    ) -> Result<Self, DeviceError> {
        let info = client.volume(volume).await.map_err(device_err)?;
        let id = info.id;
        let reader = client.open_volume_with(info, VolumeOptions::reader()).await.map_err(device_err)?;
        Ok(Self {
            alua,
            client,
            name: volume.to_string(),
            id,
            holder: format!("{HOLDER_PREFIX}{node_name}"),
            node,
            writer: tokio::sync::Mutex::new(None),
            reader,
        })
    }

    pub fn volume_id(&self) -> VolumeId {
        self.id
    }

    async fn writer(&self) -> Result<Arc<Volume>, DeviceError> {
        let mut w = self.writer.lock().await;
        if let Some(v) = &*w {
            return Ok(v.clone());
        }
        let info = self.client.volume(&self.name).await.map_err(device_err)?;
        let force = match &info.lease {
            None => false,
            Some(l) if l.holder == self.holder => false,
            Some(l) if l.holder.starts_with(HOLDER_PREFIX) => true,
            Some(l) => {
                return Err(DeviceError::Transitioning(format!(
                    "volume {} is in use by {} (not an iSCSI path)",
                    self.name, l.holder
                )))
            }
        };
        let opts = VolumeOptions { force, ..VolumeOptions::writer(self.holder.clone(), self.node) };
        let v = self.client.open_volume_with(info, opts).await.map_err(device_err)?;
        self.alua.clear();
        if force {
            info!(volume = %self.name, epoch = v.epoch(), "iSCSI path took the volume over (now active/optimised here)");
            let notice = basalt_types::Notice::PathMoved { volume: self.id };
            self.client.broadcast_notice(notice, Some(self.node), NOTICE_TIMEOUT).await;
        }
        *w = Some(v.clone());
        Ok(v)
    }

    /// Forgets a fenced writer so the next write takes the lease again.
    async fn drop_writer(&self, fenced: &Arc<Volume>) {
        let mut w = self.writer.lock().await;
        if w.as_ref().is_some_and(|v| Arc::ptr_eq(v, fenced)) {
            *w = None;
            self.alua.clear();
        }
    }

    /// Runs a write-type operation, taking the lease back once if another path fenced us.
    async fn writing<F, Fut>(&self, op: F) -> Result<(), DeviceError>
    where
        F: Fn(Arc<Volume>) -> Fut,
        Fut: std::future::Future<Output = Result<(), ClientError>>,
    {
        let mut attempt = 0;
        loop {
            let v = self.writer().await?;
            match op(v.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if e.code() == ErrorCode::Fenced && attempt == 0 => {
                    self.drop_writer(&v).await;
                    attempt += 1;
                }
                Err(e) => {
                    if e.code() == ErrorCode::Fenced {
                        self.drop_writer(&v).await;
                    }
                    return Err(device_err(e));
                }
            }
        }
    }

    async fn reading_volume(&self) -> Result<Arc<Volume>, DeviceError> {
        if let Some(v) = &*self.writer.lock().await {
            return Ok(v.clone());
        }
        Ok(self.reader.clone())
    }

    /// Releases the lease (on shutdown).
    pub async fn close(&self) {
        if let Some(v) = self.writer.lock().await.take() {
            let _ = v.close().await;
        }
    }
}

#[async_trait]
impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, DeviceError> {
        let v = self.reading_volume().await?;
        v.read(offset, len).await.map_err(device_err)
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), DeviceError> {
        self.writing(|v| {
            let data = data.clone();
            async move { v.write(offset, data).await }
        })
        .await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        // Every acknowledged write is already durable on every replica.
        match &*self.writer.lock().await {
            Some(v) => v.flush().await.map_err(device_err),
            None => Ok(()),
        }
    }

    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.writing(|v| async move { v.trim(offset, len).await }).await
    }

    /// Per chunk: a chunk never written is deallocated; inside a written chunk the client
    /// cannot tell trimmed blocks apart, so the whole chunk is reported mapped.
    async fn allocation(&self, offset: u64, len: u64) -> Result<Option<Vec<Extent>>, DeviceError> {
        let v = self.reading_volume().await?;
        let chunk = v.chunk_size();
        if chunk == 0 {
            return Ok(None);
        }
        let end = offset.checked_add(len).filter(|&e| e <= self.size()).ok_or(DeviceError::OutOfRange)?;
        let mut extents = Vec::new();
        let mut at = offset;
        while at < end {
            let next = ((at / chunk + 1) * chunk).min(end);
            let mapped = v.is_allocated(at / chunk).await.map_err(device_err)?;
            extents.push(Extent { offset: at, len: next - at, mapped });
            at = next;
        }
        Ok(Some(extents))
    }
}

/// ALUA states of one volume: the node holding its write lease is optimised; with no
/// (live) holder, the lowest live node with a portal is, so initiators agree on one path.
pub struct LeaseAlua {
    client: Arc<StorageClient>,
    volume: String,
    cache: AluaCache,
}

impl LeaseAlua {
    pub fn new(client: Arc<StorageClient>, volume: &str, cache: AluaCache) -> Self {
        Self { client, volume: volume.to_string(), cache }
    }

    async fn groups(&self) -> Result<Vec<PortGroup>, String> {
        let portals = live_portals(&self.client).await?;
        let info = self.client.volume(&self.volume).await.map_err(client_err)?;
        let holder = info
            .lease
            .filter(|l| l.holder.starts_with(HOLDER_PREFIX) && portals.contains_key(&l.node))
            .map(|l| l.node);
        let optimised = holder.or_else(|| portals.keys().next().copied());
        Ok(portals
            .keys()
            .map(|&node| PortGroup {
                id: port_of(node),
                state: if Some(node) == optimised { AccessState::ActiveOptimized } else { AccessState::ActiveNonOptimized },
                ports: vec![port_of(node)],
            })
            .collect())
    }
}

#[async_trait]
impl AluaStates for LeaseAlua {
    async fn port_groups(&self) -> Vec<PortGroup> {
        if let Some(g) = self.cache.get() {
            return g;
        }
        match self.groups().await {
            Ok(g) => {
                self.cache.put(g.clone());
                g
            }
            Err(e) => {
                tracing::warn!(volume = %self.volume, error = %e, "cannot compute ALUA states; reporting transitioning");
                Vec::new()
            }
        }
    }
}

/// Persistent reservations of one volume, in a metadata record.
/// Reads are cached for [`METADATA_CACHE`] (the SCSI layer checks reservations on every
/// command); a successful store updates the cache and a lost compare-and-swap clears it, so
/// this node's own changes are never read stale. The other nodes drop their copy when the
/// unit's [`UnitNotifier`] tells them of the change.
pub struct RecordReservations {
    client: Arc<StorageClient>,
    key: String,
    cache: Expiring<(Reservations, u64)>,
}

/// How long a reservation change, a reset or a path move waits for the other nodes to take
/// its notice.
const NOTICE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl RecordReservations {
    pub fn new(client: Arc<StorageClient>, volume: VolumeId) -> Self {
        Self { client, key: format!("{PR_PREFIX}{volume}"), cache: Expiring::default() }
    }

    /// Drops the cached copy (another node changed the reservations).
    pub fn invalidate(&self) {
        self.remember(None);
    }

    fn cached(&self) -> Option<(Reservations, u64)> {
        self.cache.get()
    }

    fn remember(&self, value: Option<(Reservations, u64)>) {
        match value {
            Some(v) => self.cache.put(v),
            None => self.cache.clear(),
        }
    }
}

#[async_trait]
impl ReservationStore for RecordReservations {
    async fn load(&self) -> Result<(Reservations, u64), DeviceError> {
        if let Some(hit) = self.cached() {
            return Ok(hit);
        }
        let loaded = match self.client.get_record(&self.key).await.map_err(device_err)? {
            None => (Reservations::default(), 0),
            Some(r) => {
                let state = serde_json::from_slice(&r.value)
                    .map_err(|e| DeviceError::Io(format!("reservation record {} is unreadable: {e}", r.key)))?;
                (state, r.version)
            }
        };
        self.remember(Some(loaded.clone()));
        Ok(loaded)
    }

    async fn store(&self, state: &Reservations, version: u64) -> Result<bool, DeviceError> {
        let value = serde_json::to_vec(state).map_err(|e| DeviceError::Io(e.to_string()))?;
        match self.client.put_record(&self.key, Some(value), Some(version)).await {
            Ok(stored) => {
                match stored {
                    Some(record) => self.remember(Some((state.clone(), record.version))),
                    None => self.remember(None),
                }
                Ok(true)
            }
            Err(e) if e.remote_code() == Some(ErrorCode::StaleVersion) => {
                self.remember(None);
                Ok(false)
            }
            Err(e) => {
                self.remember(None);
                Err(device_err(e))
            }
        }
    }
}

/// The portal list of discovery: every live node's portal.
pub async fn portals_for_discovery(client: &StorageClient) -> Vec<Portal> {
    match live_portals(client).await {
        Ok(p) => p.into_iter().map(|(node, addr)| Portal { addr, tpgt: port_of(node) }).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list iSCSI portals");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> TargetDef {
        TargetDef {
            name: "iqn.2026-11.io.basalt:t1".into(),
            alias: None,
            luns: vec![LunDef { lun: 0, volume: "v".into(), read_only: false }],
            chap: None,
            initiators: vec![],
        }
    }

    #[test]
    fn iscsi_names_follow_rfc_7143() {
        for ok in ["iqn.2026-11.io.basalt:t1", "iqn.1994-05.com.redhat:abc", "eui.02004567A425678D".to_lowercase().as_str(), "naa.52004567ba64678d"] {
            assert_eq!(validate_iscsi_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "iqn.26-11.x", "iqn.2026-11", "IQN.2026-11.io.x", "iqn.2026-11.io x", "eui.123", "naa.xyz", "target1"] {
            assert!(validate_iscsi_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn targets_are_validated() {
        assert_eq!(def().validate(), Ok(()));
        let mut d = def();
        d.luns.push(LunDef { lun: 0, volume: "w".into(), read_only: false });
        assert!(d.validate().unwrap_err().contains("twice"));
        let mut d = def();
        d.luns[0].lun = MAX_LUN + 1;
        assert!(d.validate().is_err());
        let mut d = def();
        d.chap = Some(Chap { user: "u".into(), secret: "short".into(), mutual: None });
        assert!(d.validate().unwrap_err().contains("12"));
        d.chap = Some(Chap { user: "u".into(), secret: "0123456789ab".into(), mutual: Some(("t".into(), "0123456789ab".into())) });
        assert!(d.validate().unwrap_err().contains("differ"));
        d.chap = Some(Chap { user: "u".into(), secret: "0123456789ab".into(), mutual: Some(("t".into(), "ba9876543210".into())) });
        assert_eq!(d.validate(), Ok(()));
        let mut d = def();
        d.initiators = vec!["not-a-name".into()];
        assert!(d.validate().is_err());
    }

    #[test]
    fn port_ids_fit_sixteen_bits_and_are_never_zero() {
        assert_eq!(port_of(1), 1);
        assert_eq!(port_of(65_535), 65_535);
        assert!(port_of(0) != 0 && port_of(u64::MAX) != 0);
    }

    #[test]
    fn target_records_round_trip_through_json() {
        let mut d = def();
        d.chap = Some(Chap { user: "u".into(), secret: "0123456789ab".into(), mutual: None });
        let back: TargetDef = serde_json::from_slice(&serde_json::to_vec(&d).expect("encode")).expect("decode");
        assert_eq!(back, d);
        // Older records without optional fields still load.
        let minimal: TargetDef = serde_json::from_str(r#"{"name":"iqn.2026-11.io.basalt:x"}"#).expect("decode");
        assert!(minimal.luns.is_empty() && minimal.chap.is_none());
    }
}

/// The targets this node serves: read from metadata at each discovery and login, so
/// changes made with `basalt iscsi` apply to the next login on every node. Live sessions
/// are checked against a target when it changes (`Notice::TargetChanged`, and every
/// [`SESSION_RECHECK`] for a missed notice): those that may no longer use it are closed. Logical units
/// are shared node-wide per volume (one write lease, one COMPARE AND WRITE lock, one set of
/// unit attentions), whichever target and session use them.
pub struct ClusterTargets {
    client: Arc<StorageClient>,
    node: NodeId,
    node_name: String,
    units: tokio::sync::Mutex<std::collections::HashMap<VolumeId, std::sync::Weak<crate::scsi::LogicalUnit>>>,
    /// The caches of each served volume, for notices from other nodes.
    caches: std::sync::Mutex<std::collections::HashMap<VolumeId, (AluaCache, std::sync::Weak<RecordReservations>)>>,
    /// The live sessions of this node's portal.
    sessions: Arc<crate::conn::Sessions>,
    /// The SCSI side of each login (one per session), by target name, for LUNs added
    /// while sessions are live.
    opened: std::sync::Mutex<Vec<(String, std::sync::Weak<crate::scsi::Target>)>>,
}

impl ClusterTargets {
    pub fn new(client: Arc<StorageClient>, node: NodeId, node_name: &str) -> Arc<Self> {
        Arc::new(Self {
            client,
            node,
            node_name: node_name.to_string(),
            units: tokio::sync::Mutex::new(std::collections::HashMap::new()),
            caches: std::sync::Mutex::new(std::collections::HashMap::new()),
            sessions: crate::conn::Sessions::new(),
            opened: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The sessions of this node's portal: serve it with these
    /// ([`crate::portal::serve_with`]), so that target changes reach them.
    pub fn sessions(&self) -> Arc<crate::conn::Sessions> {
        self.sessions.clone()
    }

    /// Checks the live sessions of `target` against its definition now, closing those
    /// that may no longer use it, and serves the LUNs added since to the others (with a
    /// REPORTED LUNS DATA HAS CHANGED unit attention). Nothing happens when the definition
    /// cannot be read. Returns how many sessions were closed.
    pub async fn revalidate(&self, target: &str) -> usize {
        let def = match get_target(&self.client, target).await {
            Ok(found) => found.map(|(def, _)| def),
            Err(e) => {
                tracing::debug!(target_name = %target, error = %e, "cannot reread a target to check its sessions");
                return 0;
            }
        };
        let closed = self.sessions.revalidate(target, def.as_ref().map(|d| d.access()).as_ref());
        if let Some(def) = def {
            self.sync_live_luns(&def).await;
        }
        closed
    }

    /// Brings the live logins to `def`'s target to `def`'s LUNs: LUNs added are served, LUNs
    /// removed are no longer (each told nexus gets REPORTED LUNS DATA HAS CHANGED). A LUN
    /// that now stands for another volume closed its sessions already (`conn::withdrawn`);
    /// a login that raced with the change gets the new unit.
    async fn sync_live_luns(&self, def: &TargetDef) {
        let live: Vec<Arc<crate::scsi::Target>> = {
            let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
            opened.retain(|(_, t)| t.strong_count() > 0);
            opened.iter().filter(|(name, _)| name == &def.name).filter_map(|(_, t)| t.upgrade()).collect()
        };
        if live.is_empty() {
            return;
        }
        let (relative_port, tpgt) = crate::lu::TargetRegistry::local_port(self);
        let told: Vec<crate::lu::Nexus> = self
            .sessions
            .initiator_ports(&def.name)
            .into_iter()
            .map(|(initiator_name, isid)| crate::lu::Nexus { initiator_name, isid, relative_port, tpgt })
            .collect();
        for t in live {
            let served = t.luns();
            let mut set = Vec::new();
            for l in &def.luns {
                match self.unit(&l.volume).await {
                    Ok(unit) if served.get(&l.lun).is_some_and(|u| Arc::ptr_eq(u, &unit)) && served.is_read_only(l.lun) == l.read_only => {}
                    Ok(unit) => set.push(crate::scsi::Lun { lun: l.lun, unit, read_only: l.read_only }),
                    // Retried at each check; the login that left it out warned already.
                    Err(e) => tracing::debug!(target_name = %def.name, lun = l.lun, volume = %l.volume, error = %e, "new LUN not served"),
                }
            }
            let removed: Vec<u64> = served.keys().copied().filter(|n| !def.luns.iter().any(|l| l.lun == *n)).collect();
            if set.is_empty() && removed.is_empty() {
                continue;
            }
            let added: Vec<u64> = set.iter().map(|l| l.lun).collect();
            if t.change_luns(set, &removed, &told) {
                tracing::info!(target_name = %def.name, ?added, ?removed, "LUNs of live sessions changed");
            }
        }
    }

    /// Rechecks the targets of the live sessions every [`SESSION_RECHECK`] until
    /// `shutdown`: the fallback for a [`basalt_types::Notice::TargetChanged`] this node
    /// missed.
    pub async fn recheck_sessions(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SESSION_RECHECK) => {}
                _ = shutdown.cancelled() => return,
            }
            for target in self.sessions.targets() {
                self.revalidate(&target).await;
            }
        }
    }

    /// Another node changed something this node caches, or an event happened there that
    /// the nexuses served here must see. For `VolumeResized` the caller has already made the
    /// storage client reread the volume's size.
    /// Drops this node's cached copy of a volume's reservation record (reservations and
    /// the unit's software write protection), so the next command reads the new one.
    fn forget_reservations(&self, volume: VolumeId) {
        let cached = {
            let caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
            caches.get(&volume).and_then(|(_, r)| r.upgrade())
        };
        if let Some(r) = cached {
            r.invalidate();
        }
    }

    pub async fn on_notice(&self, notice: &basalt_types::Notice) {
        use basalt_types::Notice;
        match notice {
            Notice::ReservationsChanged { volume, attentions } => {
                self.forget_reservations(*volume);
                // Only the nexuses logged in through this node's port are served here.
                let port = port_of(self.node);
                let here: Vec<_> = attentions.iter().filter(|a| a.relative_port == port).cloned().collect();
                if !here.is_empty() {
                    if let Some(unit) = self.served_unit(*volume).await {
                        unit.attentions_from_elsewhere(&here);
                    }
                }
            }
            Notice::ModeParametersChanged { volume } => {
                self.forget_reservations(*volume);
                if let Some(unit) = self.served_unit(*volume).await {
                    unit.mode_changed_elsewhere();
                }
            }
            Notice::PathMoved { volume } => {
                if let Some((alua, _)) = self.caches.lock().unwrap_or_else(|p| p.into_inner()).get(volume) {
                    alua.clear();
                }
            }
            Notice::UnitReset { volume } => {
                if let Some(unit) = self.served_unit(*volume).await {
                    unit.reset_elsewhere();
                }
            }
            Notice::TargetChanged { name } => {
                self.revalidate(name).await;
            }
            Notice::VolumeResized { volume } => {
                // Reported now rather than at the unit's next command: same outcome, but the
                // log shows the change when it happened.
                if let Some(unit) = self.served_unit(*volume).await {
                    unit.check_capacity();
                }
            }
        }
    }

    /// Drops every SPC-2 reservation held through this node's target port. Called when the
    /// node starts, before its portal serves anyone: no nexus through that port survived
    /// the restart, so such a reservation is void (SPC-2: released at I_T nexus loss and
    /// power on). A node that comes back before the cluster declares it dead keeps its port
    /// among the units' port groups, so nothing else would drop it. Persistent reservations
    /// stay, as they should. Failures are logged.
    pub async fn forget_own_reservations(&self) {
        let port = port_of(self.node);
        let records = match self.client.list_records(PR_PREFIX).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list reservations to drop those held through this node");
                return;
            }
        };
        for record in records {
            let Some(volume) = record.key.strip_prefix(PR_PREFIX).and_then(|v| v.parse::<VolumeId>().ok()) else {
                continue;
            };
            let store = RecordReservations::new(self.client.clone(), volume);
            // Compare-and-swap against the nodes serving the unit meanwhile; a few rounds.
            for _ in 0..8 {
                let (mut st, version) = match store.load().await {
                    Ok(loaded) => loaded,
                    Err(e) => {
                        tracing::warn!(volume, error = %e, "cannot read the reservations");
                        break;
                    }
                };
                let Some(holder) = st.reserved_by.take_if(|h| h.relative_port == port) else { break };
                match store.store(&st, version).await {
                    Ok(true) => {
                        tracing::info!(volume, holder = %holder.initiator_port, port, "dropped the SPC-2 reservation of a nexus this node had before it restarted");
                        let notice = basalt_types::Notice::ReservationsChanged { volume, attentions: Vec::new() };
                        self.client.broadcast_notice(notice, Some(self.node), NOTICE_TIMEOUT).await;
                        break;
                    }
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!(volume, error = %e, "cannot drop the SPC-2 reservation");
                        break;
                    }
                }
            }
        }
    }

    /// The logical unit of `volume`, if this node serves it now.
    async fn served_unit(&self, volume: VolumeId) -> Option<Arc<crate::scsi::LogicalUnit>> {
        self.units.lock().await.get(&volume).and_then(std::sync::Weak::upgrade)
    }

    async fn unit(&self, volume: &str) -> Result<Arc<crate::scsi::LogicalUnit>, DeviceError> {
        let info = self.client.volume(volume).await.map_err(device_err)?;
        let mut units = self.units.lock().await;
        if let Some(u) = units.get(&info.id).and_then(std::sync::Weak::upgrade) {
            return Ok(u);
        }
        units.retain(|_, w| w.strong_count() > 0);
        let alua = AluaCache::default();
        let device = VolumeDevice::open(self.client.clone(), volume, self.node, &self.node_name, alua.clone()).await?;
        let reservations = Arc::new(RecordReservations::new(self.client.clone(), info.id));
        {
            let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
            caches.retain(|_, (_, r)| r.strong_count() > 0);
            caches.insert(info.id, (alua.clone(), Arc::downgrade(&reservations)));
        }
        let events = Arc::new(UnitNotifier { client: self.client.clone(), volume: info.id, node: self.node });
        let unit = Arc::new(
            crate::scsi::LogicalUnit::new(
                Arc::new(device),
                Arc::new(LeaseAlua::new(self.client.clone(), volume, alua)),
                reservations,
                crate::scsi::Identity::for_volume(info.id, "VOLUME", "0001"),
            )
            .with_events(events),
        );
        units.insert(info.id, Arc::downgrade(&unit));
        Ok(unit)
    }
}

/// Tells the other nodes that a unit was reset here or its reservations changed here.
struct UnitNotifier {
    client: Arc<StorageClient>,
    volume: VolumeId,
    node: NodeId,
}

#[async_trait]
impl crate::lu::UnitEvents for UnitNotifier {
    async fn reset(&self) {
        let notice = basalt_types::Notice::UnitReset { volume: self.volume };
        self.client.broadcast_notice(notice, Some(self.node), NOTICE_TIMEOUT).await;
    }

    async fn reservations_changed(&self, attentions: &[crate::lu::NexusAttention]) {
        // The command completes only after the other nodes dropped their cached copy and
        // posted the attentions of their nexuses (or the notice timed out: a node that
        // missed it rereads the reservations within METADATA_CACHE, but its nexuses never
        // see those attentions), so a conflict is enforced on every path right away.
        let notice =
            basalt_types::Notice::ReservationsChanged { volume: self.volume, attentions: attentions.to_vec() };
        self.client.broadcast_notice(notice, Some(self.node), NOTICE_TIMEOUT).await;
    }

    async fn mode_changed(&self) {
        // As for reservations: the MODE SELECT completes once every node rereads the
        // record, so write protection holds on every path right away.
        let notice = basalt_types::Notice::ModeParametersChanged { volume: self.volume };
        self.client.broadcast_notice(notice, Some(self.node), NOTICE_TIMEOUT).await;
    }
}

#[async_trait]
impl crate::lu::TargetRegistry for ClusterTargets {
    async fn discover(&self) -> Vec<(TargetAccess, Vec<Portal>)> {
        let targets = match list_targets(&self.client).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list iSCSI targets for discovery");
                return Vec::new();
            }
        };
        let portals = portals_for_discovery(&self.client).await;
        targets.into_iter().map(|t| (t.access(), portals.clone())).collect()
    }

    async fn open(&self, name: &str) -> Option<(TargetAccess, Arc<dyn crate::lu::ScsiTarget>)> {
        let def = match get_target(&self.client, name).await {
            Ok(Some((def, _))) => def,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(target_name = %name, error = %e, "cannot read iSCSI target");
                return None;
            }
        };
        let mut luns = Vec::with_capacity(def.luns.len());
        for l in &def.luns {
            match self.unit(&l.volume).await {
                Ok(unit) => luns.push(crate::scsi::Lun { lun: l.lun, unit, read_only: l.read_only }),
                // A LUN whose volume is gone or unreachable is left out; the others serve.
                Err(e) => tracing::warn!(target_name = %name, lun = l.lun, volume = %l.volume, error = %e, "LUN not served"),
            }
        }
        let target = crate::scsi::Target::new(def.name.clone());
        target.change_luns(luns, &[], &[]);
        let target = Arc::new(target);
        {
            let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
            opened.retain(|(_, t)| t.strong_count() > 0);
            opened.push((def.name.clone(), Arc::downgrade(&target)));
        }
        Some((def.access(), target))
    }

    fn local_port(&self) -> (u16, u16) {
        (port_of(self.node), port_of(self.node))
    }
}
