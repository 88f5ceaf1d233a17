//! The fixed newstyle handshake: greeting, client flags, then option haggling until the client
//! picks an export (`NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`) or leaves. Owns the per-connection
//! negotiation state (structured replies, selected metadata contexts) handed on to transmission.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backend::{BackendError, BlockBackend, ExportProvider};
use crate::proto::{self, Cursor};
use crate::{Config, Error, Result};

/// Option payloads longer than this are refused with `NBD_REP_ERR_TOO_BIG`; the largest
/// legitimate one (a meta-context query list) is far smaller.
const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Bound on `NBD_OPT_LIST` replies so one reply always fits its u32 length fields sanely.
const MAX_LISTED_EXPORTS: usize = 10_000;

/// What the handshake agreed on; everything transmission needs.
pub(crate) struct Session {
    pub export_name: String,
    pub backend: Arc<dyn BlockBackend>,
    pub structured: bool,
    /// `base:allocation` was selected for this export (only with structured replies).
    pub base_allocation: bool,
    pub transmission_flags: u16,
}

/// Negotiation state between options.
struct State {
    no_zeroes: bool,
    structured: bool,
    /// Export name and whether `base:allocation` was selected by the last SET_META_CONTEXT.
    meta: Option<(String, bool)>,
}

/// Result of the option loop.
pub(crate) enum Outcome {
    Transmission(Session),
    /// The client ended negotiation cleanly (NBD_OPT_ABORT or EOF between options).
    Closed,
}

/// Runs the handshake on `stream`. Errors mean the connection must be dropped; the caller logs.
pub(crate) async fn negotiate<S>(
    stream: &mut S,
    exports: &dyn ExportProvider,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(proto::INIT_PASSWD);
    greeting.put_u64(proto::IHAVEOPT);
    greeting.put_u16(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let client_flags = stream.read_u32().await?;
    if client_flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
        // Plain (unfixed) newstyle cannot report option errors, so we only speak fixed newstyle.
        return Err(Error::Protocol(format!(
            "client flags {client_flags:#x} lack NBD_FLAG_C_FIXED_NEWSTYLE"
        )));
    }
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        // The spec requires closing on client flags we did not advertise.
        return Err(Error::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let mut st = State {
        no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta: None,
    };

    loop {
        let mut header = [0u8; 16];
        tokio::select! {
            _ = shutdown.cancelled() => return Err(Error::ShuttingDown),
            r = stream.read_exact(&mut header) => match r {
                Ok(_) => {}
                // Leaving between options is rude but harmless.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Outcome::Closed),
                Err(e) => return Err(e.into()),
            },
        }
        let magic = u64::from_be_bytes(header[0..8].try_into().unwrap_or_default());
        let opt = u32::from_be_bytes(header[8..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(header[12..16].try_into().unwrap_or_default());
        if magic != proto::IHAVEOPT {
            return Err(Error::Protocol(format!("bad option magic {magic:#x}")));
        }
        debug!(option = proto::option_name(opt), opt, len, "option");

        if len > MAX_OPTION_LEN {
            if opt == proto::OPT_EXPORT_NAME {
                // EXPORT_NAME has no error reply; the only answer is to hang up.
                return Err(Error::Protocol(format!("EXPORT_NAME option of {len} bytes")));
            }
            let drained =
                tokio::io::copy(&mut (&mut *stream).take(u64::from(len)), &mut tokio::io::sink())
                    .await?;
            if drained != u64::from(len) {
                return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            reply_err(stream, opt, proto::REP_ERR_TOO_BIG, "option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await?;

        if shutdown.is_cancelled() {
            reply_err(stream, opt, proto::REP_ERR_SHUTDOWN, "server is shutting down").await?;
            return Err(Error::ShuttingDown);
        }

        match opt {
            proto::OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(&data)
                    .map_err(|_| Error::Protocol("export name is not UTF-8".into()))?;
                let session = match open_export(exports, name, &st).await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(export = name, error = %e, "EXPORT_NAME refused, closing connection");
                        return Err(Error::ExportRefused { name: name.to_owned(), source: e });
                    }
                };
                let mut b = BytesMut::with_capacity(10 + 124);
                b.put_u64(session.backend.size());
                b.put_u16(session.transmission_flags);
                if !st.no_zeroes {
                    b.put_bytes(0, 124);
                }
                if let Err(e) = send(stream, &b).await {
                    close_quietly(&session).await;
                    return Err(e);
                }
                info!(export = name, size = session.backend.size(), "client entered transmission (EXPORT_NAME)");
                return Ok(Outcome::Transmission(session));
            }
            proto::OPT_GO | proto::OPT_INFO => {
                if let Some(session) = info_or_go(stream, exports, config, &st, opt, &data).await? {
                    return Ok(Outcome::Transmission(session));
                }
            }
            proto::OPT_ABORT => {
                // The client may already have hung up; an error here changes nothing.
                let _ = send(stream, &proto::option_reply(opt, proto::REP_ACK, &[])).await;
                return Ok(Outcome::Closed);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    reply_err(stream, opt, proto::REP_ERR_INVALID, "LIST takes no data").await?;
                    continue;
                }
                match exports.list().await {
                    Ok(list) => {
                        let mut out = BytesMut::new();
                        for e in list.iter().take(MAX_LISTED_EXPORTS) {
                            let name = proto::bounded_message(&e.name).as_bytes();
                            let desc = proto::bounded_message(&e.description).as_bytes();
                            let mut p = BytesMut::with_capacity(4 + name.len() + desc.len());
                            p.put_u32(name.len() as u32);
                            p.put_slice(name);
                            p.put_slice(desc);
                            out.put(proto::option_reply(opt, proto::REP_SERVER, &p));
                        }
                        out.put(proto::option_reply(opt, proto::REP_ACK, &[]));
                        send(stream, &out).await?;
                    }
                    Err(e) => {
                        warn!(error = %e, "listing exports failed");
                        let (code, msg) = option_error(&e);
                        reply_err(stream, opt, code, &msg).await?;
                    }
                }
            }
            proto::OPT_STARTTLS => {
                reply_err(stream, opt, proto::REP_ERR_POLICY, "TLS is not offered by this server")
                    .await?;
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_err(stream, opt, proto::REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                        .await?;
                    continue;
                }
                st.structured = true;
                send(stream, &proto::option_reply(opt, proto::REP_ACK, &[])).await?;
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                meta_context(stream, &mut st, opt, &data).await?;
            }
            _ => {
                debug!(opt, "unsupported option");
                let msg = format!("option {} ({opt}) is not supported", proto::option_name(opt));
                reply_err(stream, opt, proto::REP_ERR_UNSUP, &msg).await?;
            }
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, buf: &[u8]) -> Result<()> {
    stream.write_all(buf).await?;
    stream.flush().await?;
    Ok(())
}

async fn reply_err<S: AsyncWrite + Unpin>(stream: &mut S, opt: u32, code: u32, msg: &str) -> Result<()> {
    send(stream, &proto::option_reply(opt, code, proto::bounded_message(msg).as_bytes())).await
}

/// Option error reply for a failed export lookup or listing.
fn option_error(e: &BackendError) -> (u32, String) {
    let code = match e {
        BackendError::NotFound(_) => proto::REP_ERR_UNKNOWN,
        BackendError::InvalidArgument(_) => proto::REP_ERR_INVALID,
        // Fenced, read-only refusals and backend failures all mean "the server will not give
        // you this export now"; POLICY is the generic refusal clients report verbatim.
        BackendError::ReadOnly
        | BackendError::Fenced(_)
        | BackendError::NoSpace
        | BackendError::Io(_) => proto::REP_ERR_POLICY,
    };
    (code, e.to_string())
}

/// Releases a handle that will not reach transmission; failures are only worth a log line.
async fn close_quietly(session: &Session) {
    if let Err(e) = session.backend.close().await {
        warn!(export = %session.export_name, error = %e, "closing export failed");
    }
}

fn transmission_flags(backend: &dyn BlockBackend, structured: bool) -> u16 {
    let mut flags = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH | proto::FLAG_SEND_CACHE;
    if backend.read_only() {
        flags |= proto::FLAG_READ_ONLY;
    } else {
        flags |= proto::FLAG_SEND_FUA | proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES;
    }
    if structured {
        flags |= proto::FLAG_SEND_DF;
    }
    if backend.can_multi_conn() {
        flags |= proto::FLAG_CAN_MULTI_CONN;
    }
    flags
}

async fn open_export(
    exports: &dyn ExportProvider,
    name: &str,
    st: &State,
) -> std::result::Result<Session, BackendError> {
    let backend = exports.open(name).await?;
    // Contexts selected for a different export name do not carry over (spec: the final
    // SET_META_CONTEXT must name the export used to enter transmission).
    let base_allocation =
        st.structured && matches!(&st.meta, Some((n, true)) if n == name);
    Ok(Session {
        export_name: name.to_owned(),
        transmission_flags: transmission_flags(backend.as_ref(), st.structured),
        backend,
        structured: st.structured,
        base_allocation,
    })
}

/// NBD_OPT_INFO / NBD_OPT_GO. Returns the session when GO succeeded.
async fn info_or_go<S>(
    stream: &mut S,
    exports: &dyn ExportProvider,
    config: &Config,
    st: &State,
    opt: u32,
    data: &[u8],
) -> Result<Option<Session>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut c = Cursor::new(data);
    let parsed = (|| {
        let name = c.string()?;
        let n = c.u16()?;
        let requests = (0..n).map(|_| c.u16()).collect::<Option<Vec<u16>>>()?;
        (c.remaining() == 0).then_some((name, requests))
    })();
    let Some((name, requests)) = parsed else {
        reply_err(stream, opt, proto::REP_ERR_INVALID, "malformed INFO/GO request").await?;
        return Ok(None);
    };

    let session = match open_export(exports, name, st).await {
        Ok(s) => s,
        Err(e) => {
            if matches!(e, BackendError::NotFound(_)) {
                warn!(export = name, option = proto::option_name(opt), "client asked for unknown export");
            } else {
                warn!(export = name, error = %e, "opening export failed");
            }
            let (code, msg) = option_error(&e);
            let msg = if code == proto::REP_ERR_UNKNOWN { format!("unknown export {name:?}") } else { msg };
            reply_err(stream, opt, code, &msg).await?;
            return Ok(None);
        }
    };

    let mut out = BytesMut::new();
    let mut info = |payload: &[u8]| out.put(proto::option_reply(opt, proto::REP_INFO, payload));
    let mut p = BytesMut::with_capacity(12);
    p.put_u16(proto::INFO_EXPORT);
    p.put_u64(session.backend.size());
    p.put_u16(session.transmission_flags);
    info(&p);
    // Always advertised: clients that did not ask may ignore it, and we accept any alignment.
    let mut p = BytesMut::with_capacity(14);
    p.put_u16(proto::INFO_BLOCK_SIZE);
    p.put_u32(config.min_block_size);
    p.put_u32(config.preferred_block_size);
    p.put_u32(config.max_payload);
    info(&p);
    if requests.contains(&proto::INFO_NAME) {
        let mut p = BytesMut::with_capacity(2 + name.len());
        p.put_u16(proto::INFO_NAME);
        p.put_slice(name.as_bytes());
        info(&p);
    }
    if requests.contains(&proto::INFO_DESCRIPTION) {
        match exports.description(name).await {
            Ok(Some(desc)) => {
                let desc = proto::bounded_message(&desc);
                let mut p = BytesMut::with_capacity(2 + desc.len());
                p.put_u16(proto::INFO_DESCRIPTION);
                p.put_slice(desc.as_bytes());
                info(&p);
            }
            Ok(None) => {}
            // The description is optional information; the spec lets us omit it.
            Err(e) => debug!(export = name, error = %e, "no description for export"),
        }
    }
    out.put(proto::option_reply(opt, proto::REP_ACK, &[]));

    if opt == proto::OPT_INFO {
        // INFO only peeks: release the handle (and any lease) right away.
        close_quietly(&session).await;
        send(stream, &out).await?;
        return Ok(None);
    }
    if let Err(e) = send(stream, &out).await {
        close_quietly(&session).await;
        return Err(e);
    }
    info!(
        export = name,
        size = session.backend.size(),
        structured = session.structured,
        base_allocation = session.base_allocation,
        "client entered transmission"
    );
    Ok(Some(session))
}

/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT for the `base:` namespace.
async fn meta_context<S>(stream: &mut S, st: &mut State, opt: u32, data: &[u8]) -> Result<()>
where
    S: AsyncWrite + Unpin,
{
    let set = opt == proto::OPT_SET_META_CONTEXT;
    if set {
        // SET replaces the previous selection even when it fails.
        st.meta = None;
    }
    if !st.structured {
        return reply_err(stream, opt, proto::REP_ERR_INVALID, "negotiate structured replies first")
            .await;
    }
    let mut c = Cursor::new(data);
    let parsed = (|| {
        let name = c.string()?;
        let n = c.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(c.string()?);
        }
        (c.remaining() == 0).then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return reply_err(stream, opt, proto::REP_ERR_INVALID, "malformed meta context request")
            .await;
    };
    if let Some(q) = queries.iter().find(|q| !q.contains(':')) {
        let msg = format!("meta context query {q:?} lacks a namespace");
        return reply_err(stream, opt, proto::REP_ERR_INVALID, &msg).await;
    }
    let selected = if set {
        queries.contains(&proto::META_BASE_ALLOCATION)
    } else {
        // LIST: no query lists everything; "base:" is the namespace wildcard.
        queries.is_empty() || queries.iter().any(|q| *q == "base:" || *q == proto::META_BASE_ALLOCATION)
    };
    let mut out = BytesMut::new();
    if selected {
        let mut p = BytesMut::with_capacity(4 + proto::META_BASE_ALLOCATION.len());
        // LIST replies carry id 0 (reserved); SET replies carry the id used in BLOCK_STATUS.
        p.put_u32(if set { proto::META_BASE_ALLOCATION_ID } else { 0 });
        p.put_slice(proto::META_BASE_ALLOCATION.as_bytes());
        out.put(proto::option_reply(opt, proto::REP_META_CONTEXT, &p));
    }
    out.put(proto::option_reply(opt, proto::REP_ACK, &[]));
    if set {
        st.meta = Some((name.to_owned(), selected));
    }
    send(stream, &out).await
}
