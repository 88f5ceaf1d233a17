//! One iSCSI connection and the session it carries (RFC 7143): the login phase (security
//! and operational negotiation, discovery, ACLs, session reinstatement) and the full
//! feature phase (command window, Data-Out/R2T, Data-In, task management, NOP, text,
//! logout).
//!
//! Sessions have exactly one connection (MaxConnections=1) and ErrorRecoveryLevel 0: a
//! protocol error or a damaged header ends the connection, and with it the session. Lost or
//! damaged write data (a Data-Out that fails its data digest, or a gap in DataSN, which RFC
//! 7143 7.9 reads as an earlier Data-Out lost to a digest error) fails only its command:
//! the damaged PDU is rejected, the rest of the command's data is taken in, and the command
//! ends with CHECK CONDITION, PROTOCOL SERVICE CRC ERROR without being executed (RFC 7143
//! 7.8, option b, the one open at ErrorRecoveryLevel 0).
//!
//! Structure of a running connection: the connection loop reads and decodes PDUs (a
//! read-ahead buffer: one system call for a burst of small PDUs, data read straight into it)
//! and owns all task state; a writer task owns the socket's write half, stamps
//! StatSN/ExpCmdSN/MaxCmdSN onto each PDU as it leaves (so the numbering follows the wire
//! order), and sends everything queued meanwhile in one vectored write.
//! The SCSI commands run in the connection's own task, polled beside the reader
//! (`Conn::running`): a command costs no task of its own, and the wake-ups that drive it
//! (its disk completions) wake the connection's task directly. Aborting a command drops its
//! `ScsiTarget::execute` future the next time the loop turns. One connection's commands thus
//! share one thread, as they do in tgt and LIO; sessions and connections spread over threads.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use basalt_iobuf::AlignedBuf;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use futures::future::{AbortHandle, Abortable};
use futures::stream::{FuturesUnordered, StreamExt};
use std::future::Future;
use std::pin::Pin;
use sync_wrapper::SyncWrapper;
use tracing::{debug, info, warn, Instrument};

use crate::chap::{self, Challenge};
use crate::lu::{self, Nexus, ScsiTarget, TargetAccess, TargetRegistry, TaskAttr, TaskManagement, TmfOutcome};
use crate::pdu::{
    self, reject, Ahs, DataIn, Digests, Error, Header, LoginResponse, Pdu, Result,
    LOGIN_MAX_DATA, RESERVED_TAG,
};
use crate::scsi::sense::{Failure, Sense};
use crate::text::{self, Negotiator, SessionParams, SessionType, TargetLimits};

/// Connection settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// What the target negotiates (burst lengths, R2Ts, digests …).
    pub limits: TargetLimits,
    /// Commands the initiator may have queued beyond ExpCmdSN, less those still running:
    /// MaxCmdSN = ExpCmdSN + window - 1 - running.
    pub cmd_window: u32,
    /// Idle time after which we ping the initiator with a NOP-In.
    pub nop_interval: Duration,
    /// How long an initiator may stay silent after our ping before we drop it.
    pub nop_timeout: Duration,
    /// Time allowed for the whole login phase.
    pub login_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            limits: TargetLimits::default(),
            cmd_window: 128,
            nop_interval: Duration::from_secs(10),
            nop_timeout: Duration::from_secs(15),
            login_timeout: Duration::from_secs(30),
        }
    }
}

/// Login status codes (RFC 7143 11.13.5): class in the high byte, detail in the low.
pub mod login_status {
    pub const SUCCESS: u16 = 0x0000;
    pub const INITIATOR_ERROR: u16 = 0x0200;
    pub const AUTH_FAILURE: u16 = 0x0201;
    pub const AUTHORIZATION_FAILURE: u16 = 0x0202;
    pub const NOT_FOUND: u16 = 0x0203;
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    pub const TOO_MANY_CONNECTIONS: u16 = 0x0206;
    pub const MISSING_PARAMETER: u16 = 0x0207;
    pub const SESSION_TYPE_UNSUPPORTED: u16 = 0x0209;
    pub const SESSION_DOES_NOT_EXIST: u16 = 0x020a;
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
    pub const TARGET_ERROR: u16 = 0x0300;
}

/// Identity of a session for reinstatement: the initiator port (name + ISID) and the target.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SessionKey {
    initiator: String,
    isid: [u8; 6],
    target: String,
}

struct SessionEntry {
    tsih: u16,
    /// Ends the session (reinstatement, or access withdrawn: then `revoked` says why).
    cancel: CancellationToken,
    revoked: Arc<std::sync::OnceLock<String>>,
    /// What the session logged in under (None for discovery sessions).
    access: Option<TargetAccess>,
    info: SessionInfo,
}

/// A live session, for listing (`Sessions::list`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// Empty for a discovery session.
    pub target: String,
    pub initiator: String,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub peer: Option<std::net::SocketAddr>,
    pub since: std::time::SystemTime,
    /// The login passed CHAP.
    pub chap: bool,
    pub header_digest: bool,
    pub data_digest: bool,
}

/// Why a live session may no longer use its target, now defined as `now`: the checks of a
/// login, applied again. A session keeps what it proved at login: CHAP it did not pass, or
/// passed with other credentials, does not cover it; neither does an ACL without its
/// initiator, nor a LUN it uses that now stands for another volume or changed between
/// read-only and writable. (A LUN removed is taken
/// from the live session, not the session from the initiator: see `ClusterTargets`.)
pub fn withdrawn(login: &TargetAccess, now: &TargetAccess, initiator: &str) -> Option<String> {
    if !now.admits(initiator) {
        return Some(format!("{initiator} is no longer in the target's ACL"));
    }
    match (&login.chap, &now.chap) {
        (_, None) => {}
        (None, Some(_)) => return Some("the target now requires CHAP".into()),
        (Some(a), Some(b)) if a.user != b.user || a.secret != b.secret => {
            return Some("the target's CHAP credentials changed".into())
        }
        (Some(_), Some(_)) => {}
    }
    // A LUN removed is taken from the live session instead (REPORTED LUNS DATA HAS CHANGED,
    // then LOGICAL UNIT NOT SUPPORTED); one that now stands for another volume is not: the
    // initiator could go on writing to a LUN it believes is the old volume.
    let moved = login.luns.iter().find_map(|(lun, volume)| {
        let moved = now.luns.iter().find(|(l, _)| l == lun).filter(|(_, v)| v != volume)?;
        Some(format!("LUN {lun} now stands for volume {} instead of {volume}", moved.1))
    });
    // Nor one that turned read-only or writable: the initiator probed its mode at login.
    moved.or_else(|| {
        login.luns.iter().map(|(lun, _)| *lun).find_map(|lun| {
            let (was, is) = (login.read_only.contains(&lun), now.read_only.contains(&lun));
            let kept = now.luns.iter().any(|(l, _)| *l == lun);
            (kept && was != is).then(|| format!("LUN {lun} is now {}", if is { "read-only" } else { "writable" }))
        })
    })
}

/// The sessions of one portal: TSIH allocation and reinstatement (a new login with the
/// same ISID, initiator and target closes the old session, RFC 7143 6.3.5).
#[derive(Default)]
pub struct Sessions {
    by_key: Mutex<HashMap<SessionKey, SessionEntry>>,
    next_tsih: AtomicU16,
}

impl Sessions {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn alloc_tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            let taken = self.lock().values().any(|e| e.tsih == t);
            // TSIH 0 means "new session" on the wire.
            if t != 0 && !taken {
                return t;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, SessionEntry>> {
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn exists(&self, tsih: u16) -> bool {
        self.lock().values().any(|e| e.tsih == tsih)
    }

    /// Registers a new session, cancelling the one it reinstates (if any).
    fn register(
        &self,
        key: SessionKey,
        tsih: u16,
        cancel: CancellationToken,
        revoked: Arc<std::sync::OnceLock<String>>,
        access: Option<TargetAccess>,
        info: SessionInfo,
    ) {
        if let Some(old) = self.lock().insert(key, SessionEntry { tsih, cancel, revoked, access, info }) {
            info!(old_tsih = old.tsih, new_tsih = tsih, "session reinstatement: closing the old session");
            old.cancel.cancel();
        }
    }

    fn remove(&self, key: &SessionKey, tsih: u16) {
        let mut m = self.lock();
        if m.get(key).is_some_and(|e| e.tsih == tsih) {
            m.remove(key);
        }
    }

    /// Applies a change of `target` to its live sessions: each one that may no longer use
    /// it ([`withdrawn`]; all of them when `now` is None, the target is gone) is told the
    /// target drops it (asynchronous event 3) and closed. A new login is checked against
    /// the new definition. Returns how many sessions were closed.
    pub fn revalidate(&self, target: &str, now: Option<&TargetAccess>) -> usize {
        let mut m = self.lock();
        let mut closed = 0;
        for (key, e) in m.iter_mut().filter(|(k, _)| k.target == target) {
            let Some(login) = &e.access else { continue };
            let why = match now {
                None => Some("the target was deleted".to_string()),
                Some(now) => withdrawn(login, now, &key.initiator),
            };
            match why {
                Some(why) => {
                    if e.revoked.set(why.clone()).is_ok() {
                        info!(target_name = %target, initiator = %key.initiator, tsih = e.tsih, reason = %why, "closing a session: access withdrawn");
                        e.cancel.cancel();
                        closed += 1;
                    }
                }
                // It passes the new definition, which is what later changes are held
                // against (LUNs added to it live, credentials dropped).
                None => e.access = now.cloned(),
            }
        }
        closed
    }

    /// The live normal sessions, by target, initiator and ISID.
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut all: Vec<SessionInfo> =
            self.lock().values().filter(|e| e.access.is_some()).map(|e| e.info.clone()).collect();
        all.sort_by(|a, b| (&a.target, &a.initiator, a.isid).cmp(&(&b.target, &b.initiator, b.isid)));
        all
    }

    /// The initiator ports (name, ISID) of the live sessions of `target`.
    pub fn initiator_ports(&self, target: &str) -> Vec<(String, [u8; 6])> {
        self.lock()
            .iter()
            .filter(|(k, e)| k.target == target && e.access.is_some() && e.revoked.get().is_none())
            .map(|(k, _)| (k.initiator.clone(), k.isid))
            .collect()
    }

    /// The targets that have live normal sessions here.
    pub fn targets(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.lock().iter().filter(|(_, e)| e.access.is_some()).map(|(k, _)| k.target.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything a connection needs from its portal.
#[derive(Clone)]
pub struct Context {
    pub registry: Arc<dyn TargetRegistry>,
    pub sessions: Arc<Sessions>,
    pub config: Arc<Config>,
    pub shutdown: CancellationToken,
}

/// Serial number arithmetic (RFC 1982) for 32-bit sequence numbers: a < b.
fn sn_lt(a: u32, b: u32) -> bool {
    a != b && (b.wrapping_sub(a) as i32) > 0
}

/// Serves one connection until logout, error, or shutdown.
pub async fn serve_connection<S>(stream: S, ctx: Context) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    serve_connection_from(stream, None, ctx).await
}

/// As [`serve_connection`], for a connection from `peer` (shown in session listings).
pub async fn serve_connection_from<S>(stream: S, peer: Option<std::net::SocketAddr>, ctx: Context) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = pdu::PduReader::new(rd);
    let span = tracing::Span::current();
    let login = tokio::select! {
        r = tokio::time::timeout(ctx.config.login_timeout, login(&mut rd, &mut wr, &ctx, peer)) => match r {
            Ok(r) => r?,
            Err(_) => return Err(Error::Timeout("login")),
        },
        _ = ctx.shutdown.cancelled() => return Ok(()),
    };
    let Some(s) = login else { return Ok(()) };
    span.record("initiator", s.nexus.initiator_name.as_str());
    span.record("target", s.target.as_ref().map(|t| t.0.name.as_str()).unwrap_or("(discovery)"));
    info!(tsih = s.tsih, discovery = s.target.is_none(), "login complete");
    let key = s.key.clone();
    let tsih = s.tsih;
    let sessions = ctx.sessions.clone();
    let r = full_feature(rd, wr, s, &ctx).await;
    sessions.remove(&key, tsih);
    r
}

// ---------------------------------------------------------------------------------------
// Login phase
// ---------------------------------------------------------------------------------------

enum Auth {
    NotStarted,
    WaitAlgorithm,
    WaitResponse(Challenge),
    Done,
}

/// The outcome of a successful login.
struct LoggedIn {
    params: SessionParams,
    target: Option<(TargetAccess, Arc<dyn ScsiTarget>)>,
    nexus: Nexus,
    tsih: u16,
    cid: u16,
    next_statsn: u32,
    exp_cmdsn: u32,
    cancel: CancellationToken,
    revoked: Arc<std::sync::OnceLock<String>>,
    key: SessionKey,
}

struct LoginFail(u16, String);

impl<E: std::fmt::Display> From<(u16, E)> for LoginFail {
    fn from((s, e): (u16, E)) -> Self {
        LoginFail(s, e.to_string())
    }
}

/// Runs the login phase. `Ok(None)`: login refused (the refusal has been sent).
async fn login<R, W>(
    rd: &mut pdu::PduReader<R>,
    wr: &mut W,
    ctx: &Context,
    peer: Option<std::net::SocketAddr>,
) -> Result<Option<LoggedIn>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let window = ctx.config.cmd_window.max(1);
    let mut neg = Negotiator::new(ctx.config.limits.clone());
    let mut acc = text::Accumulator::default();
    let mut auth = Auth::NotStarted;
    let mut stage: Option<u8> = None;
    let mut target: Option<(TargetAccess, Arc<dyn ScsiTarget>)> = None;
    let mut statsn: u32 = rand::random();
    let mut first: Option<pdu::LoginRequest> = None;
    loop {
        let Some(p) = rd.read(Digests::default(), LOGIN_MAX_DATA).await? else {
            return Err(Error::Closed);
        };
        let req = match p.header {
            Header::LoginRequest(r) => r,
            other => {
                // Anything but a Login Request during login: refuse and close.
                let f = first.clone().unwrap_or_else(|| placeholder_login(other.itt()));
                send_login_fail(wr, &f, statsn, window, login_status::INVALID_DURING_LOGIN).await?;
                return Err(Error::Protocol(format!("opcode {:#04x} during login", other.opcode())));
            }
        };
        let f = first.get_or_insert_with(|| req.clone()).clone();
        let step = login_step(&req, &f, &p.data, ctx, &mut neg, &mut acc, &mut auth, &mut stage, &mut target).await;
        let (transit, nsg, keys) = match step {
            Ok(Step::Continue) => {
                // The initiator sent a partial request (C bit): acknowledge with an empty
                // response and wait for the rest.
                let h = login_response(&req, statsn, window, false, req.csg, 0, 0, 0);
                pdu::write_pdu(wr, &Pdu::new(Header::LoginResponse(h)), Digests::default()).await?;
                statsn = statsn.wrapping_add(1);
                continue;
            }
            Ok(Step::Answer { transit, nsg, keys }) => (transit, nsg, keys),
            Err(LoginFail(status, why)) => {
                warn!(status = format_args!("{status:#06x}"), reason = %why, "login refused");
                send_login_fail(wr, &req, statsn, window, status).await?;
                return Ok(None);
            }
        };
        let csg = stage.unwrap_or(req.csg);
        let finishing = transit && nsg == 3;
        let tsih = if finishing { ctx.sessions.alloc_tsih() } else { 0 };
        let mut h = login_response(&req, statsn, window, transit, csg, nsg, 0, 0);
        h.tsih = tsih;
        let data = text::encode(&keys);
        if data.len() > LOGIN_MAX_DATA as usize {
            return Err(Error::Protocol("login response longer than 8 KiB".into()));
        }
        pdu::write_pdu(wr, &Pdu::with_data(Header::LoginResponse(h), data), Digests::default()).await?;
        statsn = statsn.wrapping_add(1);
        if transit {
            stage = Some(nsg);
        }
        if finishing {
            let params = neg.params.clone();
            let (relative_port, tpgt) = ctx.registry.local_port();
            let initiator_name = params.initiator_name.clone().unwrap_or_default();
            let key = SessionKey {
                initiator: initiator_name.clone(),
                isid: f.isid,
                target: target.as_ref().map(|t| t.0.name.clone()).unwrap_or_default(),
            };
            let cancel = CancellationToken::new();
            let revoked = Arc::new(std::sync::OnceLock::new());
            let access = target.as_ref().map(|t| t.0.clone());
            let info = SessionInfo {
                target: key.target.clone(),
                initiator: initiator_name.clone(),
                isid: f.isid,
                tsih,
                peer,
                since: std::time::SystemTime::now(),
                // A target with CHAP lets no one in without it.
                chap: access.as_ref().is_some_and(|a| a.chap.is_some()),
                header_digest: params.header_digest,
                data_digest: params.data_digest,
            };
            ctx.sessions.register(key.clone(), tsih, cancel.clone(), revoked.clone(), access, info);
            return Ok(Some(LoggedIn {
                nexus: Nexus { initiator_name, isid: f.isid, relative_port, tpgt },
                params,
                target,
                tsih,
                cid: f.cid,
                next_statsn: statsn,
                exp_cmdsn: f.cmdsn,
                cancel,
                revoked,
                key,
            }));
        }
    }
}

enum Step {
    Continue,
    Answer { transit: bool, nsg: u8, keys: Vec<(String, String)> },
}

#[allow(clippy::too_many_arguments)]
async fn login_step(
    req: &pdu::LoginRequest,
    first: &pdu::LoginRequest,
    data: &Bytes,
    ctx: &Context,
    neg: &mut Negotiator,
    acc: &mut text::Accumulator,
    auth: &mut Auth,
    stage: &mut Option<u8>,
    target: &mut Option<(TargetAccess, Arc<dyn ScsiTarget>)>,
) -> Result<Step, LoginFail> {
    use login_status::*;
    if req.version_min > 0 {
        return Err(LoginFail(UNSUPPORTED_VERSION, format!("version-min {}", req.version_min)));
    }
    if req.isid != first.isid || req.tsih != first.tsih {
        return Err(LoginFail(INITIATOR_ERROR, "ISID or TSIH changed during login".into()));
    }
    let Some(text) = acc.push(data, req.cont).map_err(|e| (INITIATOR_ERROR, e))? else {
        return Ok(Step::Continue);
    };
    let pairs = text::parse(&text).map_err(|e| (INITIATOR_ERROR, e))?;
    let get = |k: &str| pairs.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
    let is_first = stage.is_none();
    let mut keys = neg.login_keys(&pairs).map_err(|e| match e {
        text::NegotiationError::SessionType(_) => LoginFail(SESSION_TYPE_UNSUPPORTED, e.to_string()),
        _ => LoginFail(INITIATOR_ERROR, e.to_string()),
    })?;
    if is_first {
        let (_, tpgt) = ctx.registry.local_port();
        let Some(initiator) = neg.params.initiator_name.clone() else {
            return Err(LoginFail(MISSING_PARAMETER, "no InitiatorName".into()));
        };
        if req.csg > 1 {
            return Err(LoginFail(INITIATOR_ERROR, format!("login starts in stage {}", req.csg)));
        }
        if neg.params.session_type == SessionType::Normal {
            let Some(name) = neg.params.target_name.clone() else {
                return Err(LoginFail(MISSING_PARAMETER, "no TargetName".into()));
            };
            let Some((access, scsi)) = ctx.registry.open(&name).await else {
                return Err(LoginFail(NOT_FOUND, format!("no target {name}")));
            };
            if !access.admits(&initiator) {
                return Err(LoginFail(AUTHORIZATION_FAILURE, format!("{initiator} not allowed on {name}")));
            }
            if req.tsih != 0 {
                // Adding a connection to an existing session (MC/S) is not supported.
                return Err(if ctx.sessions.exists(req.tsih) {
                    LoginFail(TOO_MANY_CONNECTIONS, "one connection per session".into())
                } else {
                    LoginFail(SESSION_DOES_NOT_EXIST, format!("TSIH {}", req.tsih))
                });
            }
            // RFC 7143 13.9: the first response of a normal session names the portal group.
            keys.push(("TargetPortalGroupTag".into(), tpgt.to_string()));
            *target = Some((access, scsi));
        }
        *stage = Some(req.csg);
    }
    let cur = stage.unwrap_or(0);
    if req.csg != cur {
        return Err(LoginFail(INVALID_DURING_LOGIN, format!("CSG {} in stage {cur}", req.csg)));
    }
    let chap = target.as_ref().and_then(|t| t.0.chap.clone());
    if cur == 1 && chap.is_some() && !matches!(auth, Auth::Done) {
        return Err(LoginFail(AUTH_FAILURE, "target requires CHAP; security stage skipped".into()));
    }
    if cur == 0 {
        loop {
            match std::mem::replace(auth, Auth::Done) {
                Auth::NotStarted => match get("AuthMethod") {
                    Some(offer) => match text::select_auth_method(offer, chap.is_some()) {
                        Some("CHAP") => {
                            keys.push(("AuthMethod".into(), "CHAP".into()));
                            *auth = Auth::WaitAlgorithm;
                            if get("CHAP_A").is_some() {
                                continue;
                            }
                        }
                        Some(m) => keys.push(("AuthMethod".into(), m.into())),
                        None => {
                            return Err(LoginFail(AUTH_FAILURE, format!("no acceptable AuthMethod in {offer:?}")))
                        }
                    },
                    None if chap.is_none() => {}
                    None => return Err(LoginFail(AUTH_FAILURE, "CHAP required, no AuthMethod offered".into())),
                },
                Auth::WaitAlgorithm => {
                    let alg = get("CHAP_A").ok_or(LoginFail(AUTH_FAILURE, "expected CHAP_A".into()))?;
                    chap::select_algorithm(alg).map_err(|e| (AUTH_FAILURE, e))?;
                    let c = Challenge::random();
                    keys.extend(c.keys());
                    *auth = Auth::WaitResponse(c);
                }
                Auth::WaitResponse(c) => {
                    let Some(chap) = chap.as_ref() else {
                        return Err(LoginFail(AUTH_FAILURE, "no CHAP secret".into()));
                    };
                    keys.extend(c.verify(chap, &pairs).map_err(|e| (AUTH_FAILURE, e))?);
                }
                Auth::Done => {}
            }
            break;
        }
    }
    if !req.transit {
        return Ok(Step::Answer { transit: false, nsg: 0, keys });
    }
    if !(req.nsg == 1 || req.nsg == 3) || req.nsg <= cur {
        return Err(LoginFail(INITIATOR_ERROR, format!("transition {cur} -> {}", req.nsg)));
    }
    if cur == 0 && !matches!(auth, Auth::Done) {
        // Authentication still under way: stay in the security stage.
        return Ok(Step::Answer { transit: false, nsg: 0, keys });
    }
    if req.nsg == 3 {
        keys.extend(neg.finish());
        if let Some(alias) = target.as_ref().and_then(|t| t.0.alias.clone()) {
            keys.push(("TargetAlias".into(), alias));
        }
    }
    Ok(Step::Answer { transit: true, nsg: req.nsg, keys })
}

fn placeholder_login(itt: u32) -> pdu::LoginRequest {
    pdu::LoginRequest {
        transit: false,
        cont: false,
        csg: 0,
        nsg: 0,
        version_max: 0,
        version_min: 0,
        isid: [0; 6],
        tsih: 0,
        itt,
        cid: 0,
        cmdsn: 0,
        exp_statsn: 0,
    }
}

#[allow(clippy::too_many_arguments)]
fn login_response(
    req: &pdu::LoginRequest,
    statsn: u32,
    window: u32,
    transit: bool,
    csg: u8,
    nsg: u8,
    class: u8,
    detail: u8,
) -> LoginResponse {
    LoginResponse {
        transit,
        cont: false,
        csg,
        nsg: if transit { nsg } else { 0 },
        version_max: 0,
        version_active: 0,
        isid: req.isid,
        tsih: req.tsih,
        itt: req.itt,
        statsn,
        // Login requests are immediate: their CmdSN is the first the session will use.
        exp_cmdsn: req.cmdsn,
        max_cmdsn: req.cmdsn.wrapping_add(window - 1),
        status_class: class,
        status_detail: detail,
    }
}

async fn send_login_fail<W: AsyncWrite + Unpin>(
    wr: &mut W,
    req: &pdu::LoginRequest,
    statsn: u32,
    window: u32,
    status: u16,
) -> Result<()> {
    let h = login_response(req, statsn, window, false, req.csg, 0, (status >> 8) as u8, status as u8);
    pdu::write_pdu(wr, &Pdu::new(Header::LoginResponse(h)), Digests::default()).await?;
    wr.flush().await?;
    let _ = wr.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Writer: stamps sequence numbers in wire order
// ---------------------------------------------------------------------------------------

enum Out {
    Pdu(Pdu),
    /// Reply once everything queued before has been written.
    Flush(oneshot::Sender<()>),
}

/// Sequence state shared by the connection loop, the command tasks and the writer.
struct Window {
    exp_cmdsn: AtomicU32,
    /// Last MaxCmdSN sent; never decreases (initiators ignore decreases).
    max_cmdsn: AtomicU32,
    running: AtomicU32,
    size: u32,
}

impl Window {
    fn stamp(&self) -> (u32, u32) {
        let exp = self.exp_cmdsn.load(Ordering::Acquire);
        let running = self.running.load(Ordering::Acquire).min(self.size);
        // A window of `size` commands, less those still executing: flow control towards
        // initiators that queue faster than the volume serves.
        let want = exp.wrapping_add(self.size).wrapping_sub(1).wrapping_sub(running);
        let last = self.max_cmdsn.load(Ordering::Acquire);
        let max = if sn_lt(last, want) { want } else { last };
        self.max_cmdsn.store(max, Ordering::Release);
        (exp, max)
    }
}

fn stamp(h: &mut Header, statsn: &mut u32, win: &Window) {
    let (exp, max) = win.stamp();
    let mut take = |advance: bool| {
        let s = *statsn;
        if advance {
            *statsn = statsn.wrapping_add(1);
        }
        s
    };
    macro_rules! set {
        ($x:expr, $adv:expr) => {{
            $x.statsn = take($adv);
            $x.exp_cmdsn = exp;
            $x.max_cmdsn = max;
        }};
    }
    match h {
        Header::ScsiResponse(x) => set!(x, true),
        Header::TaskMgmtResponse(x) => set!(x, true),
        Header::TextResponse(x) => set!(x, true),
        Header::LogoutResponse(x) => set!(x, true),
        Header::Reject(x) => set!(x, true),
        Header::AsyncMessage(x) => set!(x, true),
        Header::NopIn(x) => {
            let adv = x.itt != RESERVED_TAG;
            set!(x, adv)
        }
        Header::R2t(x) => set!(x, false),
        Header::DataIn(x) => {
            let adv = x.has_status;
            set!(x, adv);
            if !adv {
                x.statsn = 0;
            }
        }
        _ => {}
    }
}

async fn writer<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Out>,
    mut statsn: u32,
    win: Arc<Window>,
    digests: Digests,
) -> Result<()> {
    // Everything queued while the previous write ran goes out in one vectored write.
    let mut queued = Vec::with_capacity(pdu::MAX_GATHER);
    let mut frames = Vec::with_capacity(pdu::MAX_GATHER);
    while rx.recv_many(&mut queued, pdu::MAX_GATHER).await > 0 {
        // Commands completing together (one batch of disk completions) each wake this task
        // first (tokio runs the task a task wakes next), so the queue usually holds one PDU
        // here; once the other ready tasks have run, their responses are queued too and go
        // out in the same write. With no other command running, no other response can join
        // (a command's task queues all of its PDUs before this task runs): write at once.
        if queued.len() < pdu::MAX_GATHER && win.running.load(Ordering::Acquire) > 0 {
            tokio::task::yield_now().await;
            while queued.len() < pdu::MAX_GATHER {
                match rx.try_recv() {
                    Ok(o) => queued.push(o),
                    Err(_) => break,
                }
            }
        }
        for o in queued.drain(..) {
            match o {
                Out::Pdu(mut p) => {
                    stamp(&mut p.header, &mut statsn, &win);
                    frames.push(pdu::Frame::new(&p, digests)?);
                }
                Out::Flush(done) => {
                    pdu::write_frames(&mut wr, &frames).await?;
                    frames.clear();
                    wr.flush().await?;
                    let _ = done.send(());
                }
            }
        }
        pdu::write_frames(&mut wr, &frames).await?;
        frames.clear();
    }
    wr.flush().await?;
    let _ = wr.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Full feature phase
// ---------------------------------------------------------------------------------------

/// A solicited transfer in progress (one R2T).
struct R2tState {
    offset: u32,
    len: u32,
    received: u32,
    next_datasn: u32,
}

/// A command known to the connection: gathering write data, or running.
struct Task {
    gen: u64,
    lun: u64,
    lun_raw: [u8; 8],
    cmd: Option<lu::ScsiCommand>,
    /// Write buffer (pre-sized to the expected length) and bytes received so far. Page
    /// aligned and from the pool: the replica writes it with `O_DIRECT` as it is (no aligned
    /// copy) and it is not zeroed first, since the command starts only once every byte of it
    /// has arrived (the Data-Out checks admit each offset once).
    buf: AlignedBuf,
    received: u32,
    write_len: u32,
    unsolicited_end: u32,
    unsolicited_next: u32,
    unsolicited_datasn: u32,
    r2ts: HashMap<u32, R2tState>,
    next_r2t_offset: u32,
    r2tsn: u32,
    read: bool,
    bidi: bool,
    expected_in: u32,
    /// Set once the task has given its slot in the command window back.
    released: Arc<AtomicBool>,
    /// Some of its Data-Out was damaged (data digest) or is missing (a DataSN gap): the
    /// command is not executed but ends with CHECK CONDITION, PROTOCOL SERVICE CRC ERROR,
    /// once all its data is in (RFC 7143 7.8 b, 7.9). The session goes on.
    data_fault: bool,
    abort: Option<AbortHandle>,
}

/// A command being executed: answers its ITT and generation when done.
type Running = Abortable<Pin<Box<dyn Future<Output = (u32, u64)> + Send>>>;

struct Conn {
    params: SessionParams,
    target: Option<(TargetAccess, Arc<dyn ScsiTarget>)>,
    registry: Arc<dyn TargetRegistry>,
    nexus: Nexus,
    cid: u16,
    out: mpsc::Sender<Out>,
    win: Arc<Window>,
    tasks: HashMap<u32, Task>,
    /// Non-immediate PDUs that arrived ahead of ExpCmdSN, by CmdSN.
    pending: HashMap<u32, Pdu>,
    /// Data-Out for commands still in `pending` (each with whether its data was damaged).
    early_data: HashMap<u32, Vec<(Pdu, bool)>>,
    /// The commands being executed, polled by the connection loop. (`SyncWrapper`: the
    /// futures are `Send` but not `Sync`, and `Conn` is shared by reference across awaits;
    /// only `&mut Conn` ever reaches them.)
    running: SyncWrapper<FuturesUnordered<Running>>,
    next_gen: u64,
    next_ttt: u32,
    text_acc: text::Accumulator,
    /// A long text response being sent in pieces: (ITT, TTT, remaining chunks).
    text_out: Option<(u32, u32, VecDeque<Bytes>)>,
    neg: Negotiator,
    ping: Option<(u32, Instant)>,
    last_rx: Instant,
    config: Arc<Config>,
    /// The SCSI layer was told the nexus is gone (at logout, before its response).
    nexus_released: bool,
}

/// Why the full feature phase ended.
enum End {
    Logout,
    Closed,
}

async fn full_feature<R, W>(mut rd: pdu::PduReader<R>, wr: W, s: LoggedIn, ctx: &Context) -> Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let digests = Digests { header: s.params.header_digest, data: s.params.data_digest };
    let win = Arc::new(Window {
        exp_cmdsn: AtomicU32::new(s.exp_cmdsn),
        max_cmdsn: AtomicU32::new(s.exp_cmdsn.wrapping_add(ctx.config.cmd_window.max(1) - 1)),
        running: AtomicU32::new(0),
        size: ctx.config.cmd_window.max(1),
    });
    let (out_tx, out_rx) = mpsc::channel(256);
    let writer = tokio::spawn(writer(wr, out_rx, s.next_statsn, win.clone(), digests).in_current_span());
    let max_in = s.params.target_max_recv_dsl;
    let mut limits = ctx.config.limits.clone();
    limits.max_recv_data_segment_length = s.params.target_max_recv_dsl;
    let mut neg = Negotiator::new(limits);
    neg.params = s.params.clone();
    let mut c = Conn {
        params: s.params,
        target: s.target,
        registry: ctx.registry.clone(),
        nexus: s.nexus,
        cid: s.cid,
        out: out_tx,
        win,
        tasks: HashMap::new(),
        pending: HashMap::new(),
        early_data: HashMap::new(),
        running: SyncWrapper::new(FuturesUnordered::new()),
        next_gen: 0,
        next_ttt: 1,
        text_acc: text::Accumulator::default(),
        text_out: None,
        neg,
        ping: None,
        last_rx: Instant::now(),
        nexus_released: false,
        config: ctx.config.clone(),
    };
    let session_cancel = s.cancel;
    let revoked = s.revoked;
    // Made once, not at every turn of the loop (each would register with the timer wheel or
    // the token again): the timer is armed for the earliest moment a ping could be due and
    // looks again when it fires; the cancellations end the loop when they fire.
    let mut nop_timer = std::pin::pin!(tokio::time::sleep_until(c.last_rx + c.config.nop_interval));
    let mut revoked_now = std::pin::pin!(session_cancel.cancelled());
    let mut shutting_down = std::pin::pin!(ctx.shutdown.cancelled());
    let result: Result<End> = loop {
        tokio::select! {
            // Cancel safe: a PDU leaves the reader's buffer only once it is whole.
            r = rd.read(digests, max_in) => match r {
                Ok(Some(p)) => {
                    // Any PDU shows the initiator alive.
                    c.last_rx = Instant::now();
                    c.ping = None;
                    match c.on_pdu(p).await {
                        Ok(None) => {}
                        Ok(Some(end)) => break Ok(end),
                        Err(e) => break Err(e),
                    }
                }
                // Data that failed its digest: rejected and discarded, and its command
                // fails once all of its data is in (RFC 7143 7.8); the session goes on.
                Err(Error::DataOutDigest { pdu, got, want }) => {
                    c.last_rx = Instant::now();
                    c.ping = None;
                    warn!(itt = pdu.header.itt(), got, want, "Data-Out data digest error: the command will fail");
                    c.reject(reject::DATA_DIGEST, &pdu).await;
                    if let Err(e) = c.on_data_out(*pdu, true).await {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(End::Closed),
                Err(e) => break Err(e),
            },
            // A command ended (its response is queued) or was aborted: forget it, unless its
            // ITT already names a newer command.
            Some(ended) = c.running.get_mut().next(), if !c.running.get_mut().is_empty() => {
                if let Ok((itt, gen)) = ended {
                    if c.tasks.get(&itt).is_some_and(|t| t.gen == gen) {
                        c.tasks.remove(&itt);
                    }
                }
            }
            _ = &mut nop_timer => {
                let due = match c.ping {
                    Some((_, sent)) => sent + c.config.nop_timeout,
                    None => c.last_rx + c.config.nop_interval,
                };
                let now = Instant::now();
                if now < due {
                    nop_timer.as_mut().reset(due);
                    continue;
                }
                if c.ping.is_some() {
                    break Err(Error::Timeout("initiator did not answer our NOP-In"));
                }
                let ttt = c.alloc_ttt();
                c.ping = Some((ttt, now));
                nop_timer.as_mut().reset(now + c.config.nop_timeout);
                debug!(ttt, "idle connection: NOP-In ping");
                let h = pdu::NopIn { lun: [0; 8], itt: RESERVED_TAG, ttt, statsn: 0, exp_cmdsn: 0, max_cmdsn: 0 };
                c.send(Pdu::new(Header::NopIn(h))).await;
            }
            _ = &mut revoked_now => match revoked.get() {
                Some(why) => {
                    // As at shutdown, the target drops the session (event 3); the
                    // initiator's next login is checked against the new definition.
                    c.send(Pdu::new(Header::AsyncMessage(drop_session_event()))).await;
                    break Err(Error::AccessWithdrawn(why.clone()));
                }
                None => break Err(Error::Protocol("session reinstated by a new login".into())),
            },
            _ = &mut shutting_down => {
                // Tell the initiator the target drops the session (event 3), with
                // Time2Wait/Time2Retain, so it retries later instead of declaring failure.
                c.send(Pdu::new(Header::AsyncMessage(drop_session_event()))).await;
                break Ok(End::Closed);
            }
        }
    };
    // Drop what is still running: no response will be sent for it.
    c.tasks.clear();
    c.running.get_mut().clear();
    if let (Some((_, scsi)), false) = (&c.target, c.nexus_released) {
        scsi.nexus_gone(&c.nexus).await;
    }
    let (flush_tx, flush_rx) = oneshot::channel();
    let _ = c.out.send(Out::Flush(flush_tx)).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), flush_rx).await;
    drop(c);
    match tokio::time::timeout(Duration::from_secs(5), writer).await {
        Ok(Ok(Err(e))) => debug!(error = %e, "writer ended with an error"),
        Ok(_) => {}
        Err(_) => debug!("writer did not finish in time"),
    }
    match result {
        Ok(End::Logout) => {
            info!("logged out");
            Ok(())
        }
        Ok(End::Closed) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Asynchronous event 3 (RFC 7143 11.9.1): the target drops all the connections of the
/// session; the initiator may log in again after Time2Wait (2 s), and nothing is kept for
/// it (Time2Retain 0).
fn drop_session_event() -> pdu::AsyncMessage {
    pdu::AsyncMessage { lun: [0; 8], statsn: 0, exp_cmdsn: 0, max_cmdsn: 0, event: 3, vcode: 0, param1: 0, param2: 2, param3: 0 }
}

impl Conn {
    async fn send(&self, p: Pdu) {
        // The writer only goes away when the connection is ending anyway.
        let _ = self.out.send(Out::Pdu(p)).await;
    }

    /// The SCSI side of the target this session logged in to (None in discovery).
    fn scsi(&self) -> Option<Arc<dyn ScsiTarget>> {
        self.target.as_ref().map(|(_, scsi)| scsi.clone())
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG || self.next_ttt == 0 {
            self.next_ttt = 1;
        }
        t
    }

    async fn reject(&self, reason: u8, p: &Pdu) {
        let ahs_len = pdu::encode_ahs(&p.ahs).map(|a| a.len()).unwrap_or(0);
        let bhs = p
            .header
            .encode(pdu::Lengths { ahs: ahs_len, data: p.data.len() as u32 })
            .map(|b| Bytes::copy_from_slice(&b))
            .unwrap_or_default();
        debug!(reason, opcode = p.header.opcode(), itt = p.header.itt(), "reject");
        let h = pdu::Reject { reason, statsn: 0, exp_cmdsn: 0, max_cmdsn: 0, datasn: 0 };
        self.send(Pdu::with_data(Header::Reject(h), bhs)).await;
    }

    /// Handles one received PDU; `Some(end)` ends the connection.
    async fn on_pdu(&mut self, p: Pdu) -> Result<Option<End>> {
        let (immediate, cmdsn) = match &p.header {
            Header::ScsiCommand(h) => (h.immediate, h.cmdsn),
            Header::TaskMgmtRequest(h) => (h.immediate, h.cmdsn),
            Header::TextRequest(h) => (h.immediate, h.cmdsn),
            Header::LogoutRequest(h) => (h.immediate, h.cmdsn),
            // A NOP-Out answering our ping (ITT reserved) is not a command.
            Header::NopOut(h) if h.itt == RESERVED_TAG => (true, h.cmdsn),
            Header::NopOut(h) => (h.immediate, h.cmdsn),
            Header::DataOut(_) => return self.on_data_out(p, false).await.map(|_| None),
            Header::Snack(_) => {
                // ERL 0: no retransmission.
                self.reject(reject::SNACK_REJECT, &p).await;
                return Ok(None);
            }
            Header::LoginRequest(_) => {
                self.reject(reject::PROTOCOL_ERROR, &p).await;
                return Ok(None);
            }
            Header::Unknown(_) => {
                self.reject(reject::COMMAND_NOT_SUPPORTED, &p).await;
                return Ok(None);
            }
            // Target opcodes coming from an initiator.
            _ => {
                self.reject(reject::PROTOCOL_ERROR, &p).await;
                return Ok(None);
            }
        };
        if immediate {
            return self.dispatch(p).await;
        }
        let exp = self.win.exp_cmdsn.load(Ordering::Acquire);
        let max = self.win.max_cmdsn.load(Ordering::Acquire);
        if cmdsn != exp {
            if sn_lt(exp, cmdsn) && !sn_lt(max, cmdsn) {
                debug!(cmdsn, exp, "command ahead of ExpCmdSN: queued");
                self.pending.insert(cmdsn, p);
            } else {
                // RFC 7143 3.2.2.1: out-of-window non-immediate commands are dropped.
                debug!(cmdsn, exp, max, "command outside the window: dropped");
            }
            return Ok(None);
        }
        self.win.exp_cmdsn.store(exp.wrapping_add(1), Ordering::Release);
        if let Some(end) = self.dispatch(p).await? {
            return Ok(Some(end));
        }
        // Deliver whatever the queue now holds in order.
        loop {
            let exp = self.win.exp_cmdsn.load(Ordering::Acquire);
            let Some(next) = self.pending.remove(&exp) else { break };
            self.win.exp_cmdsn.store(exp.wrapping_add(1), Ordering::Release);
            let itt = next.header.itt();
            if let Some(end) = self.dispatch(next).await? {
                return Ok(Some(end));
            }
            for (d, damaged) in self.early_data.remove(&itt).unwrap_or_default() {
                self.on_data_out(d, damaged).await?;
            }
        }
        Ok(None)
    }

    async fn dispatch(&mut self, p: Pdu) -> Result<Option<End>> {
        match &p.header {
            Header::ScsiCommand(_) => self.on_command(p).await?,
            Header::TaskMgmtRequest(h) => {
                let h = h.clone();
                return self.on_tmf(h, &p).await;
            }
            Header::TextRequest(h) => {
                let h = h.clone();
                self.on_text(h, p.data.clone()).await?;
            }
            Header::NopOut(h) => {
                // ITT reserved: the answer to our ping (already counted as liveness).
                if h.itt != RESERVED_TAG {
                    let reply = pdu::NopIn {
                        lun: h.lun,
                        itt: h.itt,
                        ttt: RESERVED_TAG,
                        statsn: 0,
                        exp_cmdsn: 0,
                        max_cmdsn: 0,
                    };
                    self.send(Pdu::with_data(Header::NopIn(reply), p.data.clone())).await;
                }
            }
            Header::LogoutRequest(h) => {
                let h = h.clone();
                return self.on_logout(h).await;
            }
            _ => self.reject(reject::PROTOCOL_ERROR, &p).await,
        }
        Ok(None)
    }

    async fn on_logout(&mut self, h: pdu::LogoutRequest) -> Result<Option<End>> {
        let response = match h.reason {
            0 => 0,
            1 if h.cid == self.cid => 0,
            1 => 1, // CID not found
            _ => 2, // connection recovery is not supported
        };
        if response == 0 {
            for (_, t) in self.tasks.drain() {
                if let Some(a) = t.abort {
                    a.abort();
                }
            }
            // What goes with the nexus (an SPC-2 reservation) is gone before the initiator
            // hears the logout succeeded: it may tell another path to take over at once.
            if let Some((_, scsi)) = &self.target {
                scsi.nexus_gone(&self.nexus).await;
                self.nexus_released = true;
            }
        }
        let r = pdu::LogoutResponse {
            response,
            itt: h.itt,
            statsn: 0,
            exp_cmdsn: 0,
            max_cmdsn: 0,
            time2wait: self.params.default_time2wait,
            time2retain: self.params.default_time2retain,
        };
        self.send(Pdu::new(Header::LogoutResponse(r))).await;
        Ok((response == 0).then_some(End::Logout))
    }

    async fn on_text(&mut self, h: pdu::TextRequest, data: Bytes) -> Result<()> {
        let mrdsl = self.params.initiator_max_recv_dsl as usize;
        // Continuation of a long response we are sending in pieces.
        if h.ttt != RESERVED_TAG {
            if let Some((itt, ttt, chunks)) = self.text_out.as_mut() {
                if *itt == h.itt && *ttt == h.ttt {
                    let chunk = chunks.pop_front().unwrap_or_default();
                    let more = !chunks.is_empty();
                    let ttt = if more { *ttt } else { RESERVED_TAG };
                    if !more {
                        self.text_out = None;
                    }
                    let r = text_response(&h, !more, more, ttt);
                    self.send(Pdu::with_data(Header::TextResponse(r), chunk)).await;
                    return Ok(());
                }
            }
        }
        let full = match self.text_acc.push(&data, h.cont) {
            Ok(Some(t)) => t,
            Ok(None) => {
                let ttt = self.alloc_ttt();
                let r = text_response(&h, false, false, ttt);
                self.send(Pdu::new(Header::TextResponse(r))).await;
                return Ok(());
            }
            Err(e) => return Err(Error::Protocol(e.to_string())),
        };
        let pairs = match text::parse(&full) {
            Ok(p) => p,
            Err(e) => {
                debug!(error = %e, "bad text request");
                self.reject(reject::PROTOCOL_ERROR, &Pdu::with_data(Header::TextRequest(h), data)).await;
                return Ok(());
            }
        };
        let mut keys = Vec::new();
        if let Some((_, v)) = pairs.iter().find(|(k, _)| k == "SendTargets") {
            keys.extend(self.send_targets(v).await);
        }
        keys.extend(self.neg.text_keys(&pairs));
        self.params.initiator_max_recv_dsl = self.neg.params.initiator_max_recv_dsl;
        let body = text::encode(&keys);
        let mut chunks: VecDeque<Bytes> = text::chunks(&body, mrdsl).into();
        let first = chunks.pop_front().unwrap_or_default();
        if chunks.is_empty() {
            let r = text_response(&h, true, false, RESERVED_TAG);
            self.send(Pdu::with_data(Header::TextResponse(r), first)).await;
        } else {
            let ttt = self.alloc_ttt();
            let r = text_response(&h, false, true, ttt);
            self.text_out = Some((h.itt, ttt, chunks));
            self.send(Pdu::with_data(Header::TextResponse(r), first)).await;
        }
        Ok(())
    }

    /// SendTargets (RFC 7143 appendix C): targets this initiator may log in to, each with
    /// every portal it is reachable at.
    async fn send_targets(&self, what: &str) -> Vec<(String, String)> {
        let discovery = self.params.session_type == SessionType::Discovery;
        let wanted: Option<String> = match (what, discovery) {
            ("All", true) => None,
            ("All", false) => return vec![("SendTargets".into(), "Reject".into())],
            ("", false) => self.target.as_ref().map(|t| t.0.name.clone()),
            ("", true) => return vec![("SendTargets".into(), "Reject".into())],
            (name, _) => Some(name.to_string()),
        };
        let mut out = Vec::new();
        for (access, portals) in self.registry.discover().await {
            if wanted.as_ref().is_some_and(|w| w != &access.name) {
                continue;
            }
            if !access.admits(&self.nexus.initiator_name) {
                continue;
            }
            out.push(("TargetName".into(), access.name.clone()));
            for p in portals {
                let addr = match p.addr {
                    std::net::SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
                    std::net::SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
                };
                out.push(("TargetAddress".into(), format!("{addr},{}", p.tpgt)));
            }
        }
        out
    }

    async fn on_command(&mut self, p: Pdu) -> Result<()> {
        let Header::ScsiCommand(h) = &p.header else { return Ok(()) };
        let Some(scsi) = self.scsi() else {
            // Discovery sessions carry no SCSI commands.
            self.reject(reject::PROTOCOL_ERROR, &p).await;
            return Ok(());
        };
        if self.tasks.contains_key(&h.itt) {
            self.reject(reject::TASK_IN_PROGRESS, &p).await;
            return Ok(());
        }
        let mut cdb = BytesMut::from(&h.cdb[..]);
        let mut bidi_len = None;
        for a in &p.ahs {
            match a {
                // The AHS starts with a reserved byte before the CDB bytes beyond 16.
                Ahs::ExtendedCdb(ext) => cdb.extend_from_slice(ext.get(1..).unwrap_or_default()),
                Ahs::BidiReadLength(l) => bidi_len = Some(*l),
                Ahs::Other { .. } => {}
            }
        }
        let write_len = if h.write { h.expected_len } else { 0 };
        let expected_in = match (h.read, h.write) {
            (true, true) => bidi_len.unwrap_or(0),
            (true, false) => h.expected_len,
            _ => 0,
        };
        let imm = p.data.len() as u32;
        let bad_imm = imm > 0
            && (!h.write || !self.params.immediate_data || imm > write_len || imm > self.params.first_burst_length);
        if bad_imm {
            self.reject(reject::PROTOCOL_ERROR, &p).await;
            return Ok(());
        }
        let unsolicited_end = if h.write && !h.final_ && !self.params.initial_r2t {
            self.params.first_burst_length.min(write_len)
        } else {
            imm
        };
        let mut buf = AlignedBuf::filled_later(write_len as usize);
        buf.as_mut()[..imm as usize].copy_from_slice(&p.data);
        let attr = match h.attr {
            0 => TaskAttr::Untagged,
            2 => TaskAttr::Ordered,
            3 => TaskAttr::HeadOfQueue,
            4 => TaskAttr::Aca,
            _ => TaskAttr::Simple,
        };
        let lun = pdu::decode_lun(&h.lun);
        let cmd = lu::ScsiCommand {
            lun,
            cdb: cdb.freeze(),
            data_out: Bytes::new(),
            expected_in,
            attr,
            nexus: self.nexus.clone(),
        };
        self.next_gen += 1;
        self.win.running.fetch_add(1, Ordering::AcqRel);
        let task = Task {
            gen: self.next_gen,
            lun,
            lun_raw: h.lun,
            cmd: Some(cmd),
            buf,
            received: imm,
            write_len,
            unsolicited_end,
            unsolicited_next: imm,
            unsolicited_datasn: 0,
            r2ts: HashMap::new(),
            next_r2t_offset: unsolicited_end,
            r2tsn: 0,
            read: h.read,
            bidi: h.read && h.write,
            expected_in,
            released: Arc::new(AtomicBool::new(false)),
            abort: None,
            data_fault: false,
        };
        let itt = h.itt;
        self.tasks.insert(itt, task);
        self.issue_r2ts(itt).await;
        self.maybe_start(itt, scsi);
        Ok(())
    }

    /// Sends R2Ts for the data still to solicit, up to MaxOutstandingR2T at a time.
    async fn issue_r2ts(&mut self, itt: u32) {
        let max_out = usize::from(self.params.max_outstanding_r2t.max(1));
        let burst = self.params.max_burst_length.max(512);
        loop {
            let Some(t) = self.tasks.get(&itt) else { return };
            if t.r2ts.len() >= max_out || t.next_r2t_offset >= t.write_len {
                return;
            }
            let ttt = self.alloc_ttt();
            let Some(t) = self.tasks.get_mut(&itt) else { return };
            let offset = t.next_r2t_offset;
            let len = burst.min(t.write_len - offset);
            t.next_r2t_offset += len;
            let r2tsn = t.r2tsn;
            t.r2tsn += 1;
            t.r2ts.insert(ttt, R2tState { offset, len, received: 0, next_datasn: 0 });
            let h = pdu::R2t {
                lun: t.lun_raw,
                itt,
                ttt,
                statsn: 0,
                exp_cmdsn: 0,
                max_cmdsn: 0,
                r2tsn,
                offset,
                desired_len: len,
            };
            self.send(Pdu::new(Header::R2t(h))).await;
        }
    }

    /// One Data-Out PDU; `damaged` when its data failed the data digest (its header is
    /// sound, so its offset and length still count).
    async fn on_data_out(&mut self, p: Pdu, damaged: bool) -> Result<()> {
        let Header::DataOut(h) = &p.header else { return Ok(()) };
        let len = p.data.len() as u32;
        let Some(t) = self.tasks.get_mut(&h.itt) else {
            if self.pending.values().any(|q| q.header.itt() == h.itt) {
                let stash = self.early_data.entry(h.itt).or_default();
                if stash.len() < 1024 {
                    stash.push((p, damaged));
                    return Ok(());
                }
                return Err(Error::Protocol("too much Data-Out ahead of its command".into()));
            }
            // Data for a task we aborted (or never had): drop it.
            debug!(itt = h.itt, "Data-Out for an unknown task dropped");
            return Ok(());
        };
        // The offset must be the next one (DataPDUInOrder=Yes): a wrong offset is a protocol
        // error that ends the connection. A DataSN out of order, though, means a Data-Out
        // before it was lost (RFC 7143 7.9): that fails only this command.
        let expected_datasn;
        if h.ttt == RESERVED_TAG {
            if h.offset != t.unsolicited_next {
                return Err(Error::Protocol(format!(
                    "unsolicited Data-Out offset {} (expected {})",
                    h.offset, t.unsolicited_next
                )));
            }
            if h.offset.checked_add(len).is_none_or(|e| e > t.unsolicited_end) {
                return Err(Error::Protocol("unsolicited data beyond FirstBurstLength".into()));
            }
            expected_datasn = t.unsolicited_datasn;
            t.unsolicited_next += len;
            t.unsolicited_datasn += 1;
        } else {
            let Some(r) = t.r2ts.get_mut(&h.ttt) else {
                return Err(Error::Protocol(format!("Data-Out with unknown TTT {:#x}", h.ttt)));
            };
            if h.offset != r.offset + r.received {
                return Err(Error::Protocol(format!(
                    "Data-Out offset {} (expected {})",
                    h.offset,
                    r.offset + r.received
                )));
            }
            if r.received + len > r.len {
                return Err(Error::Protocol("Data-Out beyond the R2T's desired length".into()));
            }
            expected_datasn = r.next_datasn;
            r.received += len;
            r.next_datasn += 1;
            if r.received == r.len {
                t.r2ts.remove(&h.ttt);
            }
        }
        // (A damaged PDU was logged where its digest was checked.)
        let gap = h.datasn != expected_datasn;
        if gap && !t.data_fault {
            warn!(itt = h.itt, datasn = h.datasn, expected = expected_datasn, "Data-Out out of sequence: the command will fail");
        }
        t.data_fault |= gap || damaged;
        if !t.data_fault {
            let (o, l) = (h.offset as usize, len as usize);
            t.buf.as_mut()[o..o + l].copy_from_slice(&p.data);
        }
        t.received += len;
        let itt = h.itt;
        self.issue_r2ts(itt).await;
        if let Some(scsi) = self.scsi() {
            self.maybe_start(itt, scsi);
        }
        Ok(())
    }

    /// Starts the command once all its write data is in.
    fn maybe_start(&mut self, itt: u32, scsi: Arc<dyn ScsiTarget>) {
        let Some(t) = self.tasks.get_mut(&itt) else { return };
        if t.received < t.write_len {
            return;
        }
        let Some(mut cmd) = t.cmd.take() else { return };
        cmd.data_out = std::mem::replace(&mut t.buf, AlignedBuf::filled_later(0)).into_bytes();
        let info = ResponseInfo {
            itt,
            lun_raw: t.lun_raw,
            read: t.read,
            bidi: t.bidi,
            expected_in: t.expected_in,
            expected_out: t.write_len,
            r2ts: t.r2tsn,
            max_data: self.params.initiator_max_recv_dsl,
            max_burst: self.params.max_burst_length,
        };
        let out = self.out.clone();
        let gen = t.gen;
        let released = t.released.clone();
        let win = self.win.clone();
        let fault = t.data_fault;
        let fut = async move {
            let resp = if fault {
                Failure::Check(Sense::protocol_service_crc_error()).into_response()
            } else {
                scsi.execute(cmd).await
            };
            // Give the window slot back before the final PDU so that PDU carries the
            // reopened MaxCmdSN.
            if !released.swap(true, Ordering::AcqRel) {
                win.running.fetch_sub(1, Ordering::AcqRel);
            }
            for p in response_pdus(&info, resp) {
                if out.send(Out::Pdu(p)).await.is_err() {
                    break;
                }
            }
            (itt, gen)
        };
        let (abort, registration) = AbortHandle::new_pair();
        t.abort = Some(abort);
        self.running.get_mut().push(Abortable::new(Box::pin(fut), registration));
    }

    fn abort_task(&mut self, itt: u32) -> bool {
        let Some(t) = self.tasks.remove(&itt) else { return false };
        if let Some(a) = t.abort {
            a.abort();
        }
        if !t.released.swap(true, Ordering::AcqRel) {
            self.win.running.fetch_sub(1, Ordering::AcqRel);
        }
        true
    }

    async fn on_tmf(&mut self, h: pdu::TaskMgmtRequest, p: &Pdu) -> Result<Option<End>> {
        let Some(scsi) = self.scsi() else {
            self.reject(reject::PROTOCOL_ERROR, p).await;
            return Ok(None);
        };
        let lun = pdu::decode_lun(&h.lun);
        let outcome_code = |o: TmfOutcome| match o {
            TmfOutcome::Complete => 0,
            TmfOutcome::NoSuchTask => 1,
            TmfOutcome::NoSuchLun => 2,
            TmfOutcome::NotSupported => 5,
            TmfOutcome::Rejected => 255,
        };
        let mut end = None;
        let response = match h.function {
            1 => {
                let queued = self.pending.iter().find(|(_, q)| q.header.itt() == h.ref_task_tag).map(|(k, _)| *k);
                if let Some(k) = queued {
                    self.pending.remove(&k);
                    0
                } else if self.abort_task(h.ref_task_tag) {
                    info!(itt = h.ref_task_tag, "task aborted");
                    0
                } else {
                    // Already completed (its response is out) or never seen.
                    1
                }
            }
            2 | 4 | 5 => {
                let victims: Vec<u32> = self.tasks.iter().filter(|(_, t)| t.lun == lun).map(|(k, _)| *k).collect();
                for itt in &victims {
                    self.abort_task(*itt);
                }
                let tmf = match h.function {
                    2 => TaskManagement::AbortTaskSet,
                    4 => TaskManagement::ClearTaskSet,
                    _ => TaskManagement::LogicalUnitReset,
                };
                info!(lun, aborted = victims.len(), ?tmf, "task management");
                outcome_code(scsi.task_management(tmf, lun, &self.nexus).await)
            }
            3 => outcome_code(scsi.task_management(TaskManagement::ClearAca, lun, &self.nexus).await),
            6 | 7 => {
                let all: Vec<u32> = self.tasks.keys().copied().collect();
                for itt in all {
                    self.abort_task(itt);
                }
                let tmf = if h.function == 6 {
                    TaskManagement::TargetWarmReset
                } else {
                    // A cold reset also drops the connection (RFC 7143 11.5.1).
                    end = Some(End::Closed);
                    TaskManagement::TargetColdReset
                };
                info!(?tmf, "target reset");
                outcome_code(scsi.task_management(tmf, 0, &self.nexus).await)
            }
            // TASK REASSIGN needs ErrorRecoveryLevel 2.
            8 => 4,
            _ => 5,
        };
        let r = pdu::TaskMgmtResponse { response, itt: h.itt, statsn: 0, exp_cmdsn: 0, max_cmdsn: 0 };
        self.send(Pdu::new(Header::TaskMgmtResponse(r))).await;
        Ok(end)
    }
}

fn text_response(h: &pdu::TextRequest, final_: bool, cont: bool, ttt: u32) -> pdu::TextResponse {
    pdu::TextResponse { final_, cont, lun: h.lun, itt: h.itt, ttt, statsn: 0, exp_cmdsn: 0, max_cmdsn: 0 }
}

/// What the response builder needs to know about a command.
#[derive(Clone, Debug)]
pub struct ResponseInfo {
    pub itt: u32,
    pub lun_raw: [u8; 8],
    pub read: bool,
    pub bidi: bool,
    pub expected_in: u32,
    /// Expected Data Transfer Length of the Data-Out (0 for commands without).
    pub expected_out: u32,
    /// R2Ts sent for the command (they count in ExpDataSN).
    pub r2ts: u32,
    /// The initiator's MaxRecvDataSegmentLength.
    pub max_data: u32,
    pub max_burst: u32,
}

/// Turns a SCSI response into Data-In PDUs (each at most `max_data` bytes, F at every
/// MaxBurstLength boundary) and, unless the status rides in the last Data-In (S bit: no
/// sense data), a SCSI Response. Sequence numbers are stamped later by the writer.
pub fn response_pdus(info: &ResponseInfo, resp: lu::ScsiResponse) -> Vec<Pdu> {
    let mut data = if info.read { resp.data_in } else { Bytes::new() };
    let expected = info.expected_in as usize;
    let (mut over, mut under, mut residual) = (false, false, 0u32);
    if data.len() > expected {
        over = true;
        residual = (data.len() - expected) as u32;
        data.truncate(expected);
    } else if info.read && data.len() < expected {
        under = true;
        residual = (expected - data.len()) as u32;
    }
    // Write residual (RFC 7143 11.4.5): what the CDB asked for against what the initiator
    // said it would send. For bidirectional commands it takes the Residual Count and the
    // read residual above the Bidirectional one.
    let (mut w_over, mut w_under, mut w_residual) = (false, false, 0u32);
    if let Some(want) = resp.data_out_len.filter(|_| !info.read || info.bidi) {
        match want.cmp(&info.expected_out) {
            std::cmp::Ordering::Greater => (w_over, w_residual) = (true, want - info.expected_out),
            std::cmp::Ordering::Less => (w_under, w_residual) = (true, info.expected_out - want),
            std::cmp::Ordering::Equal => {}
        }
    }
    let mut out = Vec::new();
    let status_in_data = resp.sense.is_none() && !data.is_empty();
    let max_data = info.max_data.max(512) as usize;
    let burst = info.max_burst.max(512) as usize;
    let mut offset = 0usize;
    let mut datasn = 0u32;
    while offset < data.len() {
        let in_burst = burst - offset % burst;
        let len = max_data.min(in_burst).min(data.len() - offset);
        let last = offset + len == data.len();
        let h = DataIn {
            final_: last || (offset + len).is_multiple_of(burst),
            has_status: last && status_in_data,
            status: resp.status,
            overflow: last && status_in_data && over,
            underflow: last && status_in_data && under,
            residual: if last && status_in_data { residual } else { 0 },
            lun: info.lun_raw,
            itt: info.itt,
            ttt: RESERVED_TAG,
            datasn,
            offset: offset as u32,
            ..Default::default()
        };
        out.push(Pdu::with_data(Header::DataIn(h), data.slice(offset..offset + len)));
        offset += len;
        datasn += 1;
    }
    if !status_in_data {
        let sense = resp.sense.map(|s| {
            let mut b = BytesMut::with_capacity(2 + s.len());
            b.put_u16(s.len().min(u16::MAX as usize) as u16);
            b.put_slice(&s);
            b.freeze()
        });
        let mut h = pdu::ScsiResponse {
            response: 0,
            status: resp.status,
            itt: info.itt,
            exp_datasn: datasn + info.r2ts,
            ..Default::default()
        };
        if info.bidi {
            h.bidi_overflow = over;
            h.bidi_underflow = under;
            h.bidi_residual = residual;
            (h.overflow, h.underflow, h.residual) = (w_over, w_under, w_residual);
        } else if info.read {
            h.overflow = over;
            h.underflow = under;
            h.residual = residual;
        } else {
            (h.overflow, h.underflow, h.residual) = (w_over, w_under, w_residual);
        }
        out.push(Pdu::with_data(Header::ScsiResponse(h), sense.unwrap_or_default()));
    }
    out
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
