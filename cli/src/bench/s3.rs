//! `basalt bench s3`: our S3 gateway on a fresh 3-node cluster against Garage (3 nodes, 3
//! zones, replication 3, [`super::garage`]) on the same machine, each measured alone, through
//! one node's endpoint, by the same in-process load generator.
//!
//! This module owns the workload plan, the load generator and the S3 report. The default plan:
//! for each object size (4 KiB, 64 MiB) and concurrency (1, 16, 64), a PUT phase of new
//! objects, then a GET phase reading random objects of that size back; then LIST rows
//! (ListObjectsV2 pages of a fixed set of keys) at each concurrency. `--mix` replaces the
//! phases by one mixed run per size and concurrency. Small objects are judged in ops/s,
//! objects of 1 MiB and more in MiB/s; every row also has p50/p90/p99/max latency.
//!
//! The generator. Each worker owns one HTTP/1.1 connection (hyper's bare client connection,
//! kept alive) and runs one request at a time for the row's runtime; a row's elapsed time runs
//! until the last request started before the deadline completes, so a 64 MiB transfer in
//! flight at the deadline is counted whole, not dropped or prorated. Requests are signed with
//! SigV4 (aws-sigv4) and an unsigned payload. We chose this over `aws-sdk-s3` because on this
//! 2-core machine the generator competes with the servers for CPU: no retry, checksum,
//! endpoint-resolution or connection-pool layers, bodies streamed from shared buffers (no
//! copy per PUT), and nothing hashed but the signature. Its own CPU is reported per row.
//!
//! Honest data. Objects are a random buffer (one per size, shared by both systems) with a
//! 16-byte stamp (object id, block number) at the start of every 64 KiB, so no two objects
//! or blocks are equal (Garage deduplicates identical blocks) and every byte read can be
//! checked. Every GET checks its length; every [`VERIFY_EVERY`]th GET of a worker (and its
//! first) compares every byte; LIST checks the key count. A failed check counts as an error,
//! and a row with errors never meets the goal.

use super::garage::{self, GarageCluster, GarageOptions};
use super::{
    fmt_ratio, fmt_verdict, interruptible, progress, push_line, running_pids, table_row, verdict, CpuProbe,
    FreshCluster, Goal, MachineCpu, Metric, Verdict, FRESH_CLUSTER_PARENT,
};
use crate::dev;
use crate::sizes::human;
use anyhow::{anyhow, bail, Context, Result};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime};

/// The goal of every row: Basalt at least at Garage's figures.
pub const GOAL: Goal = Goal { min_ratio: 1.0 };
pub const DEFAULT_SIZES: &str = "4K,64M";
pub const DEFAULT_CONCURRENCY: &str = "1,16,64";
pub const DEFAULT_OPS: &str = "put,get,list";
pub const DEFAULT_LIST_KEYS: usize = 1000;
/// Objects at least this large are judged in MiB/s, smaller ones in ops/s.
pub const BANDWIDTH_SIZE: u64 = 1 << 20;
pub const BUCKET: &str = "basalt-bench";
/// Every this many GETs of a worker (and its first), every byte is compared.
pub const VERIFY_EVERY: u64 = 4;
const STAMP_EVERY: u64 = 64 << 10;
const STAMP_LEN: usize = 16;
const LIST_PREFIX: &str = "l-";
/// S3's largest listing page.
const LIST_PAGE: usize = 1000;
/// Workers of the untimed set-up (LIST keys, objects for a GET-only plan).
const SETUP_CONCURRENCY: usize = 16;
/// An error answer's body is read up to this much, for the message.
const ERROR_BODY_MAX: usize = 2048;
const LIST_BODY_MAX: usize = 16 << 20;
const READY_TIMEOUT: Duration = Duration::from_secs(60);

// ---- options and plan ---------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Put,
    Get,
    List,
}

impl Op {
    pub fn label(self) -> &'static str {
        match self {
            Op::Put => "PUT",
            Op::Get => "GET",
            Op::List => "LIST",
        }
    }

    pub fn parse(s: &str) -> Result<Op> {
        match s.trim().to_ascii_lowercase().as_str() {
            "put" => Ok(Op::Put),
            "get" => Ok(Op::Get),
            "list" => Ok(Op::List),
            other => bail!("unknown operation {other:?} (use put, get or list)"),
        }
    }
}

/// Relative weights of the operations of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Mix {
    pub put: u32,
    pub get: u32,
    pub list: u32,
}

impl Mix {
    pub fn only(op: Op) -> Mix {
        let mut m = Mix { put: 0, get: 0, list: 0 };
        *m.weight_mut(op) = 1;
        m
    }

    /// `put=50,get=40,list=10` (missing operations weigh 0).
    pub fn parse(s: &str) -> Result<Mix> {
        let mut m = Mix { put: 0, get: 0, list: 0 };
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (op, w) = part.split_once('=').ok_or_else(|| anyhow!("mix entry {part:?} is not op=weight"))?;
            let w: u32 = w.trim().parse().with_context(|| format!("weight of {op:?} in the mix"))?;
            *m.weight_mut(Op::parse(op)?) = w;
        }
        if m.total() == 0 {
            bail!("the mix {s:?} has no operation with a weight above 0");
        }
        Ok(m)
    }

    fn weight_mut(&mut self, op: Op) -> &mut u32 {
        match op {
            Op::Put => &mut self.put,
            Op::Get => &mut self.get,
            Op::List => &mut self.list,
        }
    }

    pub fn weight(&self, op: Op) -> u32 {
        match op {
            Op::Put => self.put,
            Op::Get => self.get,
            Op::List => self.list,
        }
    }

    pub fn total(&self) -> u32 {
        self.put + self.get + self.list
    }

    pub fn ops(&self) -> Vec<Op> {
        [Op::Put, Op::Get, Op::List].into_iter().filter(|&op| self.weight(op) > 0).collect()
    }

    /// The operation for a uniform draw in `0..total()`.
    pub fn pick(&self, draw: u32) -> Op {
        if draw < self.put {
            Op::Put
        } else if draw < self.put + self.get {
            Op::Get
        } else {
            Op::List
        }
    }
}

/// Comma-separated values, each parsed by `one`.
pub fn parse_list<T>(s: &str, what: &str, one: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    let v: Vec<T> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| one(p).with_context(|| format!("{what} {p:?}")))
        .collect::<Result<_>>()?;
    if v.is_empty() {
        bail!("no {what} given");
    }
    Ok(v)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum System {
    Basalt,
    Garage,
}

impl System {
    pub fn label(self) -> &'static str {
        match self {
            System::Basalt => "Basalt",
            System::Garage => "Garage",
        }
    }
}

#[derive(Clone, Debug)]
pub struct S3Options {
    /// Where both clusters live (one disk-backed directory for all; never tmpfs).
    pub work_dir: PathBuf,
    pub runtime: Duration,
    pub sizes: Vec<u64>,
    pub concurrencies: Vec<usize>,
    /// The phases, in order per size and concurrency (LIST rows come last); ignored with `mix`.
    pub ops: Vec<Op>,
    pub mix: Option<Mix>,
    /// Keys under the listed prefix.
    pub list_keys: usize,
    /// None: both.
    pub only: Option<System>,
    /// Garage's `data_fsync`/`metadata_fsync` (on: the same durability as ours).
    pub garage_fsync: bool,
    pub garage_bin: Option<PathBuf>,
    pub storaged_bin: PathBuf,
}

impl S3Options {
    pub fn new(runtime: Duration) -> Self {
        Self {
            work_dir: PathBuf::from(FRESH_CLUSTER_PARENT),
            runtime,
            sizes: vec![4 << 10, 64 << 20],
            concurrencies: vec![1, 16, 64],
            ops: vec![Op::Put, Op::Get, Op::List],
            mix: None,
            list_keys: DEFAULT_LIST_KEYS,
            only: None,
            garage_fsync: true,
            garage_bin: None,
            storaged_bin: dev::default_storaged_bin(),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.runtime < Duration::from_secs(1) {
            bail!("the runtime must be at least 1s");
        }
        if self.concurrencies.contains(&0) {
            bail!("a concurrency must be at least 1");
        }
        if self.list_keys == 0 || self.list_keys > LIST_PAGE {
            bail!("--list-keys must be between 1 and {LIST_PAGE} (one listing page)");
        }
        if self.mix.is_none() && self.ops.is_empty() {
            bail!("no operation to run");
        }
        if self.sizes.iter().any(|&s| s > usize::MAX as u64 / 2) {
            bail!("object size too large for this machine");
        }
        Ok(())
    }
}

/// One measured run: a mix of operations on objects of one size by `concurrency` workers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Step {
    pub mix: Mix,
    /// From `--mix` (rows are labelled so), rather than a single-operation phase.
    pub mixed: bool,
    /// Object size for PUT and GET (LIST phases have 0: they list the fixed key set).
    pub size: u64,
    pub concurrency: usize,
}

/// The steps of a run, in order.
pub fn plan(sizes: &[u64], concurrencies: &[usize], ops: &[Op], mix: Option<Mix>) -> Vec<Step> {
    let mut steps = Vec::new();
    if let Some(mix) = mix {
        for &size in sizes {
            for &concurrency in concurrencies {
                steps.push(Step { mix, mixed: true, size, concurrency });
            }
        }
        return steps;
    }
    for &size in sizes {
        for &concurrency in concurrencies {
            for op in [Op::Put, Op::Get] {
                if ops.contains(&op) {
                    steps.push(Step { mix: Mix::only(op), mixed: false, size, concurrency });
                }
            }
        }
    }
    if ops.contains(&Op::List) {
        for &concurrency in concurrencies {
            steps.push(Step { mix: Mix::only(Op::List), mixed: false, size: 0, concurrency });
        }
    }
    steps
}

// ---- object contents ----------------------------------------------------------------------

/// The contents of every object of one size: a shared random buffer, stamped per object.
pub struct Payload {
    size: u64,
    base: Bytes,
}

impl Payload {
    pub fn random(size: u64) -> Payload {
        let mut base = vec![0u8; size as usize];
        rand::Rng::fill(&mut rand::rng(), &mut base[..]);
        Payload { size, base: Bytes::from(base) }
    }

    fn stamp(id: u64, block: u64) -> [u8; STAMP_LEN] {
        let mut s = [0u8; STAMP_LEN];
        s[..8].copy_from_slice(&id.to_le_bytes());
        s[8..].copy_from_slice(&block.to_le_bytes());
        s
    }

    /// Object `id`'s bytes as frames: per 64 KiB block its stamp, then the shared buffer.
    pub fn body(&self, id: u64) -> ObjectBody {
        let mut segs = VecDeque::new();
        let mut pos = 0u64;
        while pos < self.size {
            let block = pos / STAMP_EVERY;
            let end = ((block + 1) * STAMP_EVERY).min(self.size);
            let stamped = (end - pos).min(STAMP_LEN as u64) as usize;
            segs.push_back(Bytes::copy_from_slice(&Self::stamp(id, block)[..stamped]));
            if pos + (stamped as u64) < end {
                segs.push_back(self.base.slice((pos as usize + stamped)..end as usize));
            }
            pos = end;
        }
        ObjectBody { segs, remaining: self.size }
    }

    /// Whether `data`, read at offset `pos` of object `id`, is what was written.
    pub fn matches(&self, id: u64, mut pos: u64, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if pos >= self.size {
                return false;
            }
            let block = pos / STAMP_EVERY;
            let within = (pos % STAMP_EVERY) as usize;
            let end = ((block + 1) * STAMP_EVERY).min(self.size);
            let n = ((end - pos) as usize).min(data.len());
            let (head, tail) = data.split_at(n);
            let stamp = Self::stamp(id, block);
            let stamped = STAMP_LEN.saturating_sub(within).min(n);
            if stamped > 0 && head[..stamped] != stamp[within..within + stamped] {
                return false;
            }
            let from = pos as usize + stamped;
            if head[stamped..] != self.base[from..pos as usize + n] {
                return false;
            }
            pos += n as u64;
            data = tail;
        }
        true
    }
}

/// A request body of shared buffers with an exact length (so hyper sends Content-Length).
pub struct ObjectBody {
    segs: VecDeque<Bytes>,
    remaining: u64,
}

impl ObjectBody {
    pub fn empty() -> ObjectBody {
        ObjectBody { segs: VecDeque::new(), remaining: 0 }
    }
}

impl Body for ObjectBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.segs.pop_front().map(|b| {
            self.remaining -= b.len() as u64;
            Ok(Frame::data(b))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.segs.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

fn object_key(size: u64, id: u64) -> String {
    format!("o{size}-{id:010}")
}

// ---- HTTP client ----------------------------------------------------------------------------

/// One S3 endpoint and the identity requests to it are signed with.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub bucket: String,
    pub region: String,
    identity: Identity,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, bucket: &str, region: &str, access_key: &str, secret_key: &str) -> Endpoint {
        let identity = Credentials::new(access_key, secret_key, None, None, "basalt-bench").into();
        Endpoint { addr, bucket: bucket.into(), region: region.into(), identity }
    }

    /// A request signed with SigV4 and `UNSIGNED-PAYLOAD`; `path` is the absolute path.
    fn request(&self, method: Method, path: &str, query: &str, body: ObjectBody) -> Result<Request<ObjectBody>> {
        let host = self.addr.to_string();
        let target = if query.is_empty() { path.to_string() } else { format!("{path}?{query}") };
        let len = body.remaining;
        let mut builder = Request::builder().method(method.clone()).uri(target.as_str()).header(http::header::HOST, &host);
        if method == Method::PUT {
            builder = builder.header(http::header::CONTENT_LENGTH, len);
        }
        let mut req = builder.body(body).context("building a request")?;
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        // Adds `x-amz-content-sha256: UNSIGNED-PAYLOAD`.
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .context("SigV4 parameters")?;
        let uri = format!("http://{host}{target}");
        let signable = SignableRequest::new(
            method.as_str(),
            uri.as_str(),
            [("host", host.as_str())].into_iter(),
            SignableBody::UnsignedPayload,
        )
        .context("a request to sign")?;
        let (instructions, _) = sign(signable, &params.into()).context("signing a request")?.into_parts();
        instructions.apply_to_request_http1x(&mut req);
        Ok(req)
    }
}

/// One kept-alive HTTP/1.1 connection (reopened after an error).
struct Conn {
    ep: Arc<Endpoint>,
    sender: Option<SendRequest<ObjectBody>>,
}

impl Conn {
    async fn open(ep: Arc<Endpoint>) -> Result<Conn> {
        let mut c = Conn { ep, sender: None };
        c.connect().await?;
        Ok(c)
    }

    async fn connect(&mut self) -> Result<()> {
        let stream = tokio::net::TcpStream::connect(self.ep.addr)
            .await
            .with_context(|| format!("connecting to {}", self.ep.addr))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("HTTP handshake")?;
        tokio::spawn(async move {
            // Ends when the server closes or the sender is dropped; an error shows on the
            // request that was in flight.
            let _ = conn.await;
        });
        self.sender = Some(sender);
        Ok(())
    }

    async fn send(&mut self, method: Method, path: &str, query: &str, body: ObjectBody) -> Result<Response<Incoming>> {
        let req = self.ep.request(method, path, query, body)?;
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.connect().await?;
        }
        let sender = self.sender.as_mut().ok_or_else(|| anyhow!("no connection"))?;
        let result = match sender.ready().await {
            Ok(()) => sender.send_request(req).await,
            Err(e) => Err(e),
        };
        result.map_err(|e| {
            self.sender = None;
            anyhow!(e).context(format!("HTTP request to {}", self.ep.addr))
        })
    }

    fn object_path(&self, key: &str) -> String {
        format!("/{}/{key}", self.ep.bucket)
    }

    async fn put(&mut self, payload: &Payload, key: &str, id: u64) -> Result<u64> {
        let path = self.object_path(key);
        let resp = self.send(Method::PUT, &path, "", payload.body(id)).await?;
        expect_ok(resp, "PUT", &path).await?.collect().await.context("reading a PUT answer")?;
        Ok(payload.size)
    }

    /// GET object `id` and check its length, and if `verify` every byte.
    async fn get(&mut self, payload: &Payload, key: &str, id: u64, verify: bool) -> Result<u64> {
        let path = self.object_path(key);
        let resp = self.send(Method::GET, &path, "", ObjectBody::empty()).await?;
        let mut body = expect_ok(resp, "GET", &path).await?;
        let mut pos = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.with_context(|| format!("reading GET {path}"))?;
            if let Ok(data) = frame.into_data() {
                if verify && !payload.matches(id, pos, &data) {
                    bail!("GET {path}: wrong data in bytes {pos}..{}", pos + data.len() as u64);
                }
                pos += data.len() as u64;
            }
        }
        if pos != payload.size {
            bail!("GET {path}: {pos} bytes, expected {}", payload.size);
        }
        Ok(pos)
    }

    /// One ListObjectsV2 page of the LIST prefix; checks the number of keys.
    async fn list(&mut self, expected: usize) -> Result<u64> {
        let path = format!("/{}", self.ep.bucket);
        let query = format!("list-type=2&max-keys={LIST_PAGE}&prefix={LIST_PREFIX}");
        let resp = self.send(Method::GET, &path, &query, ObjectBody::empty()).await?;
        let body = expect_ok(resp, "LIST", &path).await?;
        let xml = http_body_util::Limited::new(body, LIST_BODY_MAX)
            .collect()
            .await
            .map_err(|e| anyhow!("reading a listing: {e}"))?
            .to_bytes();
        let keys = count_keys(&String::from_utf8_lossy(&xml));
        if keys != expected {
            bail!("LIST {path}?{query}: {keys} keys, expected {expected}");
        }
        Ok(xml.len() as u64)
    }
}

/// `<Key>` elements of a ListObjectsV2 answer (keys are escaped, so the tag is unambiguous).
pub fn count_keys(xml: &str) -> usize {
    xml.matches("<Key>").count()
}

/// The body of a 2xx answer, else an error with the status and the start of the body.
async fn expect_ok(resp: Response<Incoming>, what: &str, path: &str) -> Result<Incoming> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp.into_body());
    }
    Err(status_error(status, resp.into_body(), &format!("{what} {path}")).await)
}

async fn status_error(status: StatusCode, body: Incoming, what: &str) -> anyhow::Error {
    let text = match http_body_util::Limited::new(body, ERROR_BODY_MAX).collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
        Err(_) => "(long or unreadable body)".into(),
    };
    anyhow!("{what}: HTTP {status}: {text}")
}

// ---- measurement ----------------------------------------------------------------------------

/// Latency percentiles of one operation, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let q = |q: f64| h.value_at_quantile(q) as f64;
        Percentiles { p50_us: q(0.50), p90_us: q(0.90), p99_us: q(0.99), max_us: h.max() as f64, mean_us: h.mean() }
    }
}

/// Microseconds, 1 µs to 1 hour, 3 significant digits.
fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    #[allow(clippy::unwrap_used)]
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap()
}

/// What one worker saw of one operation.
struct OpTally {
    hist: Histogram<u64>,
    ops: u64,
    bytes: u64,
    errors: u64,
    verified: u64,
    first_error: Option<String>,
}

impl OpTally {
    fn new() -> OpTally {
        OpTally { hist: histogram(), ops: 0, bytes: 0, errors: 0, verified: 0, first_error: None }
    }

    fn merge(&mut self, other: &OpTally) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.errors += other.errors;
        self.verified += other.verified;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }
}

/// The figures of one operation in one step against one system.
#[derive(Clone, Debug, Serialize)]
pub struct OpResult {
    pub op: Op,
    pub mixed: bool,
    pub size: u64,
    pub concurrency: usize,
    /// Operations completed without error.
    pub ops: u64,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// GETs whose every byte was compared.
    pub verified: u64,
    pub bytes: u64,
    /// From the start to the completion of the last operation.
    pub elapsed_s: f64,
    pub ops_per_s: f64,
    pub mib_per_s: f64,
    pub latency: Percentiles,
    /// The servers' CPU (user + system of all their processes) per wall second, in cores.
    pub server_cores: f64,
    /// The load generator's own CPU, in cores.
    pub generator_cores: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steal_percent: Option<f64>,
}

impl OpResult {
    pub fn metric(&self) -> Metric {
        metric_for(self.op, self.size)
    }

    pub fn rate(&self) -> f64 {
        match self.metric() {
            Metric::Iops => self.ops_per_s,
            Metric::MibPerSec => self.mib_per_s,
        }
    }
}

/// LIST and small objects in ops/s, large objects in MiB/s.
pub fn metric_for(op: Op, size: u64) -> Metric {
    if op != Op::List && size >= BANDWIDTH_SIZE {
        Metric::MibPerSec
    } else {
        Metric::Iops
    }
}

/// Objects written so far, per size: what GETs read.
#[derive(Default)]
struct Pool {
    ids: Mutex<Vec<u64>>,
    next: AtomicU64,
}

impl Pool {
    fn new_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn add(&self, id: u64) {
        if let Ok(mut ids) = self.ids.lock() {
            ids.push(id);
        }
    }

    fn random(&self) -> Option<u64> {
        let ids = self.ids.lock().ok()?;
        (!ids.is_empty()).then(|| ids[rand::random_range(0..ids.len())])
    }

    fn len(&self) -> usize {
        self.ids.lock().map(|ids| ids.len()).unwrap_or(0)
    }
}

/// What a step's workers share.
struct StepCtx {
    mix: Mix,
    payload: Arc<Payload>,
    pool: Arc<Pool>,
    list_keys: usize,
    deadline: Instant,
}

async fn worker(ctx: Arc<StepCtx>, mut conn: Conn) -> (BTreeMap<Op, OpTally>, Instant) {
    let mut tallies: BTreeMap<Op, OpTally> = ctx.mix.ops().into_iter().map(|op| (op, OpTally::new())).collect();
    let mut gets = 0u64;
    while Instant::now() < ctx.deadline {
        let op = ctx.mix.pick(rand::random_range(0..ctx.mix.total()));
        let t0 = Instant::now();
        let mut verify = false;
        let result = match op {
            Op::Put => {
                let id = ctx.pool.new_id();
                let r = conn.put(&ctx.payload, &object_key(ctx.payload.size, id), id).await;
                if r.is_ok() {
                    ctx.pool.add(id);
                }
                r
            }
            Op::Get => match ctx.pool.random() {
                Some(id) => {
                    // `is_multiple_of` needs Rust 1.87; the workspace's rust-version is 1.85.
                    #[allow(clippy::manual_is_multiple_of)]
                    {
                        verify = gets % VERIFY_EVERY == 0;
                    }
                    gets += 1;
                    conn.get(&ctx.payload, &object_key(ctx.payload.size, id), id, verify).await
                }
                None => Err(anyhow!("no object of {} to GET", human(ctx.payload.size))),
            },
            Op::List => conn.list(ctx.list_keys).await,
        };
        let micros = t0.elapsed().as_micros().max(1) as u64;
        let Some(t) = tallies.get_mut(&op) else { continue };
        match result {
            Ok(bytes) => {
                let _ = t.hist.record(micros);
                t.ops += 1;
                t.bytes += bytes;
                t.verified += u64::from(verify && op == Op::Get);
            }
            Err(e) => {
                t.errors += 1;
                if t.first_error.is_none() {
                    t.first_error = Some(format!("{e:#}"));
                }
                // A server that fails fast must not turn the row into a busy loop.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    (tallies, Instant::now())
}

/// The processes whose CPU a system's rows count.
struct Probes {
    server: CpuProbe,
    generator: CpuProbe,
}

async fn run_step(ep: &Arc<Endpoint>, step: &Step, ctx: StepCtx, runtime: Duration, probes: &Probes) -> Result<Vec<OpResult>> {
    // Connections are opened before the clock starts.
    let mut conns = Vec::with_capacity(step.concurrency);
    for _ in 0..step.concurrency {
        conns.push(Conn::open(Arc::clone(ep)).await?);
    }
    let server0 = probes.server.sample()?;
    let gen0 = probes.generator.sample()?;
    let machine0 = MachineCpu::sample();
    let start = Instant::now();
    let ctx = Arc::new(StepCtx { deadline: start + runtime, ..ctx });
    let tasks: Vec<_> = conns.into_iter().map(|c| tokio::spawn(worker(Arc::clone(&ctx), c))).collect();
    let mut total: BTreeMap<Op, OpTally> = BTreeMap::new();
    let mut last = start;
    for t in tasks {
        let (tallies, done) = t.await.context("a load worker panicked")?;
        last = last.max(done);
        for (op, tally) in tallies {
            total.entry(op).or_insert_with(OpTally::new).merge(&tally);
        }
    }
    let elapsed = (last - start).as_secs_f64().max(1e-9);
    let server_cores = (probes.server.sample()? - server0) / elapsed;
    let generator_cores = (probes.generator.sample()? - gen0) / elapsed;
    let steal_percent = machine0.zip(MachineCpu::sample()).and_then(|(a, b)| a.steal_percent(&b));
    Ok(total
        .into_iter()
        .map(|(op, t)| OpResult {
            op,
            mixed: step.mixed,
            size: if op == Op::List { 0 } else { step.size },
            concurrency: step.concurrency,
            ops: t.ops,
            errors: t.errors,
            first_error: t.first_error,
            verified: t.verified,
            bytes: t.bytes,
            elapsed_s: elapsed,
            ops_per_s: t.ops as f64 / elapsed,
            mib_per_s: t.bytes as f64 / elapsed / (1 << 20) as f64,
            latency: Percentiles::of(&t.hist),
            server_cores,
            generator_cores,
            steal_percent,
        })
        .collect())
}

/// Untimed writes: `count` objects of `payload` (fresh ids from `pool`, or LIST keys when
/// `pool` is None), `SETUP_CONCURRENCY` at a time.
async fn fill(ep: &Arc<Endpoint>, payload: &Arc<Payload>, pool: Option<&Arc<Pool>>, count: usize) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..SETUP_CONCURRENCY.min(count) {
        let mut conn = Conn::open(Arc::clone(ep)).await?;
        let (payload, pool, next) = (Arc::clone(payload), pool.cloned(), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count as u64 {
                    return Ok::<(), anyhow::Error>(());
                }
                match &pool {
                    Some(pool) => {
                        let id = pool.new_id();
                        conn.put(&payload, &object_key(payload.size, id), id).await?;
                        pool.add(id);
                    }
                    None => {
                        conn.put(&payload, &format!("{LIST_PREFIX}{n:06}"), n).await?;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.context("a set-up worker panicked")??;
    }
    Ok(())
}

/// Wait until the endpoint stores and returns a small object (a gateway may accept
/// connections before its bucket is visible).
async fn wait_ready(ep: &Arc<Endpoint>) -> Result<()> {
    let payload = Payload::random(1024);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let attempt = async {
            let mut conn = Conn::open(Arc::clone(ep)).await?;
            conn.put(&payload, "ready-probe", 0).await?;
            conn.get(&payload, "ready-probe", 0, true).await
        };
        match attempt.await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e.context(format!("{} is not ready", ep.addr))),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// Every step of the plan against one endpoint.
async fn bench_endpoint(
    system: System,
    ep: &Arc<Endpoint>,
    steps: &[Step],
    opts: &S3Options,
    payloads: &BTreeMap<u64, Arc<Payload>>,
    probes: &Probes,
) -> Result<Vec<OpResult>> {
    wait_ready(ep).await?;
    let payload_of = |size: u64| payloads.get(&size).cloned().ok_or_else(|| anyhow!("no payload of {size} bytes"));
    if steps.iter().any(|s| s.mix.list > 0) {
        progress(&format!("{}: writing {} keys to list (untimed)", system.label(), opts.list_keys));
        fill(ep, &payload_of(0)?, None, opts.list_keys).await.context("writing the keys to list")?;
    }
    let mut pools: BTreeMap<u64, Arc<Pool>> = BTreeMap::new();
    let mut rows = Vec::new();
    for step in steps {
        let pool = Arc::clone(pools.entry(step.size).or_default());
        let payload = payload_of(step.size)?;
        if step.mix.get > 0 && pool.len() == 0 {
            progress(&format!("{}: writing {} objects of {} to read (untimed)", system.label(), step.concurrency, human(step.size)));
            fill(ep, &payload, Some(&pool), step.concurrency).await.context("writing objects to read")?;
        }
        progress(&format!(
            "{}: {} {} x{} for {}",
            system.label(),
            step_label(step),
            if step.size > 0 || step.mix.list == 0 { human(step.size) } else { format!("{} keys", opts.list_keys) },
            step.concurrency,
            humantime::format_duration(opts.runtime)
        ));
        let ctx = StepCtx { mix: step.mix, payload, pool, list_keys: opts.list_keys, deadline: Instant::now() };
        let results = run_step(ep, step, ctx, opts.runtime, probes).await?;
        for r in &results {
            if let Some(e) = &r.first_error {
                progress(&format!("{}: {} errors in {} rows, first: {e}", system.label(), r.errors, r.op.label()));
            }
        }
        rows.extend(results);
    }
    Ok(rows)
}

fn step_label(step: &Step) -> String {
    if step.mixed {
        let parts: Vec<String> = step.mix.ops().iter().map(|&op| format!("{}={}", op.label(), step.mix.weight(op))).collect();
        format!("mix {}", parts.join(","))
    } else {
        step.mix.ops().first().map(|op| op.label().to_string()).unwrap_or_default()
    }
}

// ---- the two systems ----------------------------------------------------------------------

/// One system as benchmarked.
#[derive(Clone, Debug, Serialize)]
pub struct SystemRun {
    pub system: System,
    pub description: String,
    pub endpoint: SocketAddr,
    pub rows: Vec<OpResult>,
}

async fn run_basalt(opts: &S3Options, steps: &[Step], payloads: &BTreeMap<u64, Arc<Payload>>) -> Result<SystemRun> {
    let fresh = FreshCluster::new_in(&opts.work_dir)?;
    progress(&format!("Basalt: starting a 3-node cluster in {}", fresh.dir().display()));
    let cluster = fresh.start(3, &opts.storaged_bin).await?;
    let node = cluster.nodes.first().ok_or_else(|| anyhow!("the cluster has no node"))?;
    let addr = node.s3_addr.ok_or_else(|| anyhow!("{} serves no S3", node.name))?;
    let creds = cluster.s3_admin.as_ref().ok_or_else(|| anyhow!("the cluster has no S3 admin key"))?;
    let ep = Arc::new(Endpoint::new(addr, BUCKET, &creds.region, &creds.access_key, &creds.secret_key));
    create_bucket(&ep).await?;
    let probes = Probes {
        server: CpuProbe::new("storaged", running_pids(&cluster))?,
        generator: CpuProbe::new("basalt bench", vec![std::process::id()])?,
    };
    let rows = bench_endpoint(System::Basalt, &ep, steps, opts, payloads, &probes).await?;
    drop(fresh);
    Ok(SystemRun {
        system: System::Basalt,
        description: format!(
            "Basalt, 3 storaged nodes ({} replicas), gateway of {}; PUT acknowledged when durable on every replica",
            basalt_types::REPLICAS,
            node.name
        ),
        endpoint: addr,
        rows,
    })
}

/// CreateBucket, retried while the gateway comes up.
async fn create_bucket(ep: &Arc<Endpoint>) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let attempt = async {
            let mut conn = Conn::open(Arc::clone(ep)).await?;
            let path = format!("/{}", ep.bucket);
            let resp = conn.send(Method::PUT, &path, "", ObjectBody::empty()).await?;
            expect_ok(resp, "CreateBucket", &path).await?.collect().await.context("reading CreateBucket's answer")?;
            Ok::<(), anyhow::Error>(())
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

async fn run_garage(
    opts: &S3Options,
    bin: PathBuf,
    steps: &[Step],
    payloads: &BTreeMap<u64, Arc<Payload>>,
) -> Result<SystemRun> {
    let version = garage::version(&bin).await?;
    let gopts =
        GarageOptions { bin, parent: opts.work_dir.clone(), nodes: 3, fsync: opts.garage_fsync, region: dev::S3_REGION.into() };
    progress(&format!("Garage: starting 3 nodes ({version}) under {}", opts.work_dir.display()));
    let cluster = GarageCluster::start(&gopts).await?;
    let (access, secret) = cluster.create_bucket(BUCKET).await?;
    let node = cluster.nodes.first().ok_or_else(|| anyhow!("the Garage cluster has no node"))?;
    let ep = Arc::new(Endpoint::new(node.s3_addr, BUCKET, dev::S3_REGION, &access, &secret));
    let probes = Probes {
        server: CpuProbe::new("garage", cluster.pids())?,
        generator: CpuProbe::new("basalt bench", vec![std::process::id()])?,
    };
    let rows = bench_endpoint(System::Garage, &ep, steps, opts, payloads, &probes).await?;
    let description = format!(
        "{version}, 3 nodes in 3 zones, replication_factor 3, lmdb, {}, endpoint of {}",
        if opts.garage_fsync { "data_fsync and metadata_fsync on" } else { "no fsync (Garage's default)" },
        node.name
    );
    let addr = node.s3_addr;
    drop(cluster);
    Ok(SystemRun { system: System::Garage, description, endpoint: addr, rows })
}

// ---- comparison and report ------------------------------------------------------------------

/// Basalt's rate over Garage's (> 1: we are faster).
pub fn rate_ratio(basalt: f64, garage: f64) -> Option<f64> {
    (garage > 0.0 && garage.is_finite() && basalt.is_finite()).then(|| basalt / garage)
}

/// Garage's latency over Basalt's (> 1: we are faster).
pub fn latency_ratio(basalt_us: f64, garage_us: f64) -> Option<f64> {
    (basalt_us > 0.0 && garage_us > 0.0).then(|| garage_us / basalt_us)
}

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub op: Op,
    pub mixed: bool,
    pub size: u64,
    pub concurrency: usize,
    pub metric: Metric,
    pub basalt_rate: f64,
    pub garage_rate: f64,
    pub rate_ratio: Option<f64>,
    pub p50_ratio: Option<f64>,
    pub p99_ratio: Option<f64>,
    /// What keeps the row from the goal: "rate", "p50", "p99", "errors".
    pub short_of: Vec<&'static str>,
    pub verdict: Verdict,
}

pub fn compare(basalt: &OpResult, garage: &OpResult) -> Comparison {
    let rate_ratio = rate_ratio(basalt.rate(), garage.rate());
    let p50_ratio = latency_ratio(basalt.latency.p50_us, garage.latency.p50_us);
    let p99_ratio = latency_ratio(basalt.latency.p99_us, garage.latency.p99_us);
    let mut short_of = Vec::new();
    for (name, r) in [("rate", rate_ratio), ("p50", p50_ratio), ("p99", p99_ratio)] {
        if verdict(Some(GOAL), r) != Verdict::Met {
            short_of.push(name);
        }
    }
    if basalt.errors > 0 {
        short_of.push("errors");
    }
    Comparison {
        op: basalt.op,
        mixed: basalt.mixed,
        size: basalt.size,
        concurrency: basalt.concurrency,
        metric: basalt.metric(),
        basalt_rate: basalt.rate(),
        garage_rate: garage.rate(),
        rate_ratio,
        p50_ratio,
        p99_ratio,
        verdict: if short_of.is_empty() { Verdict::Met } else { Verdict::NotMet },
        short_of,
    }
}

fn same_row(a: &OpResult, b: &OpResult) -> bool {
    (a.op, a.mixed, a.size, a.concurrency) == (b.op, b.mixed, b.size, b.concurrency)
}

#[derive(Clone, Debug, Serialize)]
pub struct S3Report {
    pub runtime_s: f64,
    pub sizes: Vec<u64>,
    pub concurrencies: Vec<usize>,
    pub list_keys: usize,
    pub verify_every: u64,
    pub steps: Vec<Step>,
    pub systems: Vec<SystemRun>,
    pub comparisons: Vec<Comparison>,
}

/// Run the benchmark. Progress goes to stderr; the caller prints the report.
pub async fn run_s3(opts: &S3Options) -> Result<S3Report> {
    opts.validate()?;
    let steps = plan(&opts.sizes, &opts.concurrencies, &opts.ops, opts.mix);
    let want = |s: System| opts.only.is_none_or(|o| o == s);
    // Found (or built) first: a missing Garage should not cost a Basalt run first.
    let garage_bin = match (want(System::Garage), &opts.garage_bin) {
        (false, _) => None,
        (true, Some(bin)) => Some(bin.clone()),
        (true, None) => Some(interruptible(garage::find_or_install()).await?),
    };
    let mut payloads = BTreeMap::new();
    for size in steps.iter().map(|s| s.size).chain([0]) {
        payloads.entry(size).or_insert_with(|| Arc::new(Payload::random(size)));
    }
    let mut systems = Vec::new();
    if want(System::Basalt) {
        systems.push(interruptible(run_basalt(opts, &steps, &payloads)).await?);
    }
    if let Some(bin) = garage_bin {
        systems.push(interruptible(run_garage(opts, bin, &steps, &payloads)).await?);
    }
    let side = |s: System| systems.iter().find(|r| r.system == s);
    let comparisons = match (side(System::Basalt), side(System::Garage)) {
        (Some(b), Some(g)) => b
            .rows
            .iter()
            .filter_map(|br| g.rows.iter().find(|gr| same_row(br, gr)).map(|gr| compare(br, gr)))
            .collect(),
        _ => Vec::new(),
    };
    Ok(S3Report {
        runtime_s: opts.runtime.as_secs_f64(),
        sizes: opts.sizes.clone(),
        concurrencies: opts.concurrencies.clone(),
        list_keys: opts.list_keys,
        verify_every: VERIFY_EVERY,
        steps,
        systems,
        comparisons,
    })
}

fn fmt_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2} s", us / 1e6)
    } else if us >= 1000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn fmt_rate(metric: Metric, rate: f64) -> String {
    match metric {
        Metric::Iops => format!("{rate:.0} ops/s"),
        Metric::MibPerSec => format!("{rate:.1} MiB/s"),
    }
}

fn fmt_size(op: Op, size: u64) -> String {
    if op == Op::List {
        "-".into()
    } else {
        human(size).replace(".0 ", " ")
    }
}

fn op_label(op: Op, mixed: bool) -> String {
    if mixed {
        format!("{} (mix)", op.label())
    } else {
        op.label().to_string()
    }
}

/// The human-readable report: each system's figures, then Basalt against Garage.
pub fn render_table(r: &S3Report) -> String {
    let mut out = String::new();
    let line = |out: &mut String, s: String| push_line(out, &s);
    line(
        &mut out,
        format!(
            "S3 benchmark: {}s per row, concurrency {}, one HTTP/1.1 connection per worker, SigV4 with UNSIGNED-PAYLOAD;",
            r.runtime_s,
            r.concurrencies.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("/")
        ),
    );
    line(
        &mut out,
        format!(
            "LIST = one ListObjectsV2 page of {} keys; every GET length-checked, every {}th of a worker byte-checked.",
            r.list_keys, r.verify_every
        ),
    );
    for s in &r.systems {
        line(&mut out, format!("{}: {} (http://{})", s.system.label(), s.description, s.endpoint));
    }
    out.push('\n');
    let widths = [6, 10, 7, 4, 12, 11, 9, 9, 9, 9, 7, 6, 6];
    let row = |cells: [String; 13]| table_row(&cells, &widths, |i| i < 3);
    let head = ["system", "op", "size", "conc", "rate", "MiB/s", "p50", "p90", "p99", "max", "errors", "srv", "gen"];
    line(&mut out, row(head.map(String::from)));
    for s in &r.systems {
        for x in &s.rows {
            line(
                &mut out,
                row([
                    s.system.label().to_string(),
                    op_label(x.op, x.mixed),
                    fmt_size(x.op, x.size),
                    x.concurrency.to_string(),
                    fmt_rate(Metric::Iops, x.ops_per_s),
                    if x.op == Op::List { "-".into() } else { format!("{:.1}", x.mib_per_s) },
                    fmt_us(x.latency.p50_us),
                    fmt_us(x.latency.p90_us),
                    fmt_us(x.latency.p99_us),
                    fmt_us(x.latency.max_us),
                    x.errors.to_string(),
                    format!("{:.2}", x.server_cores),
                    format!("{:.2}", x.generator_cores),
                ]),
            );
        }
    }
    line(&mut out, "srv / gen: CPU cores used by the servers' processes / by this load generator.".into());
    let errors: Vec<String> = r
        .systems
        .iter()
        .flat_map(|s| s.rows.iter().filter_map(move |x| x.first_error.as_ref().map(|e| (s.system, x, e))))
        .map(|(sys, x, e)| format!("  {} {} {} x{}: {} errors, first: {e}", sys.label(), op_label(x.op, x.mixed), fmt_size(x.op, x.size), x.concurrency, x.errors))
        .collect();
    if !errors.is_empty() {
        line(&mut out, "Errors:".into());
        for e in errors {
            line(&mut out, e);
        }
    }
    if let Some(worst) = r.systems.iter().flat_map(|s| s.rows.iter().filter_map(|x| x.steal_percent)).reduce(f64::max) {
        line(&mut out, format!("CPU taken by the hypervisor (steal) during the rows: up to {worst:.1}%."));
    }
    if r.comparisons.is_empty() {
        return out;
    }
    out.push('\n');
    let widths = [10, 7, 4, 14, 14, 6, 6, 6, 20];
    let row = |cells: [String; 9]| table_row(&cells, &widths, |i| i < 3 || i == 8);
    line(&mut out, "Basalt vs Garage (ratios > 1 favour Basalt: rate Basalt/Garage, latency Garage/Basalt; goal >= 1.00 each)".into());
    let head = ["op", "size", "conc", "Basalt", "Garage", "rate", "p50", "p99", "goal"];
    line(&mut out, row(head.map(String::from)));
    for c in &r.comparisons {
        let result = match c.verdict {
            Verdict::NotMet => format!("NOT met ({})", c.short_of.join(", ")),
            v => fmt_verdict(v).to_string(),
        };
        line(
            &mut out,
            row([
                op_label(c.op, c.mixed),
                fmt_size(c.op, c.size),
                c.concurrency.to_string(),
                fmt_rate(c.metric, c.basalt_rate),
                fmt_rate(c.metric, c.garage_rate),
                fmt_ratio(c.rate_ratio),
                fmt_ratio(c.p50_ratio),
                fmt_ratio(c.p99_ratio),
                result,
            ]),
        );
    }
    let met = r.comparisons.iter().filter(|c| c.verdict == Verdict::Met).count();
    line(&mut out, format!("Goal met on {met} of {} rows.", r.comparisons.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse_and_pick_by_weight() {
        let m = Mix::parse("put=50, get=40,list=10").expect("mix");
        assert_eq!(m, Mix { put: 50, get: 40, list: 10 });
        assert_eq!((m.pick(0), m.pick(49), m.pick(50), m.pick(89), m.pick(90), m.pick(99)), (Op::Put, Op::Put, Op::Get, Op::Get, Op::List, Op::List));
        assert_eq!(Mix::parse("get=1").expect("mix").ops(), vec![Op::Get]);
        assert!(Mix::parse("put=0").is_err(), "nothing to do");
        assert!(Mix::parse("delete=5").is_err());
        assert!(Mix::parse("put").is_err());
        assert!(Mix::parse("put=x").is_err());
        assert_eq!(Mix::only(Op::List).ops(), vec![Op::List]);
    }

    #[test]
    fn lists_of_sizes_and_concurrencies_parse() {
        let sizes = parse_list("4K, 64M", "size", crate::sizes::parse_size).expect("sizes");
        assert_eq!(sizes, vec![4096, 64 << 20]);
        let c = parse_list("1,16,64", "concurrency", |s| Ok(s.parse::<usize>()?)).expect("conc");
        assert_eq!(c, vec![1, 16, 64]);
        assert!(parse_list("", "size", crate::sizes::parse_size).is_err());
        assert!(parse_list("4Q", "size", crate::sizes::parse_size).is_err());
        assert_eq!(parse_list("put,LIST", "operation", Op::parse).expect("ops"), vec![Op::Put, Op::List]);
    }

    #[test]
    fn the_default_plan_puts_then_gets_each_size_and_lists_last() {
        let steps = plan(&[4096, 64 << 20], &[1, 16, 64], &[Op::Put, Op::Get, Op::List], None);
        assert_eq!(steps.len(), 2 * 3 * 2 + 3);
        assert_eq!((steps[0].mix, steps[0].size, steps[0].concurrency), (Mix::only(Op::Put), 4096, 1));
        assert_eq!((steps[1].mix, steps[1].size, steps[1].concurrency), (Mix::only(Op::Get), 4096, 1));
        assert_eq!((steps[11].mix, steps[11].size, steps[11].concurrency), (Mix::only(Op::Get), 64 << 20, 64));
        assert!(steps[12..].iter().all(|s| s.mix == Mix::only(Op::List) && s.size == 0));
        let mixed = plan(&[4096], &[1, 16], &[Op::Put], Some(Mix { put: 1, get: 1, list: 0 }));
        assert_eq!(mixed.len(), 2);
        assert!(mixed.iter().all(|s| s.mixed));
        assert!(plan(&[4096], &[1], &[Op::Get], None).iter().all(|s| s.mix == Mix::only(Op::Get)));
    }

    #[test]
    fn objects_are_stamped_per_block_and_verified_byte_for_byte() {
        let p = Payload::random(3 * STAMP_EVERY + 100);
        let bytes = |id| -> Vec<u8> { p.body(id).segs.iter().flat_map(|b| b.iter().copied()).collect() };
        let a = bytes(7);
        assert_eq!(a.len() as u64, p.size);
        assert_eq!(p.body(7).size_hint().exact(), Some(p.size));
        assert_ne!(a, bytes(8), "objects differ");
        assert_ne!(a[..STAMP_EVERY as usize], a[STAMP_EVERY as usize..2 * STAMP_EVERY as usize], "blocks differ");
        assert!(p.matches(7, 0, &a));
        // Any split into frames, including one through a stamp.
        assert!(p.matches(7, 0, &a[..10]) && p.matches(7, 10, &a[10..STAMP_EVERY as usize + 5]));
        assert!(p.matches(7, STAMP_EVERY + 5, &a[STAMP_EVERY as usize + 5..]));
        assert!(!p.matches(8, 0, &a), "another object's data");
        let mut bad = a.clone();
        bad[2 * STAMP_EVERY as usize + 40] ^= 1;
        assert!(!p.matches(7, 0, &bad));
        assert!(!p.matches(7, p.size - 1, &a[..2]), "past the end");
        let small = Payload::random(10);
        let s: Vec<u8> = small.body(1).segs.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(s.len(), 10);
        assert!(small.matches(1, 0, &s));
        assert!(Payload::random(0).body(1).is_end_stream());
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = histogram();
        for us in 1..=1000u64 {
            h.record(us).expect("in bounds");
        }
        let p = Percentiles::of(&h);
        assert!((p.p50_us - 500.0).abs() <= 1.0, "{p:?}");
        assert!((p.p90_us - 900.0).abs() <= 1.0, "{p:?}");
        assert!((p.p99_us - 990.0).abs() <= 1.0, "{p:?}");
        assert!((p.max_us - 1000.0).abs() <= 1.0, "{p:?}");
        assert_eq!(Percentiles::of(&histogram()), Percentiles::default());
    }

    #[test]
    fn listing_keys_are_counted() {
        let xml = "<ListBucketResult><KeyCount>2</KeyCount><Contents><Key>l-1</Key></Contents>\
                   <Contents><Key>l-2</Key></Contents></ListBucketResult>";
        assert_eq!(count_keys(xml), 2);
    }

    fn result(op: Op, size: u64, ops_per_s: f64, p50: f64, p99: f64) -> OpResult {
        OpResult {
            op,
            mixed: false,
            size,
            concurrency: 16,
            ops: (ops_per_s * 10.0) as u64,
            errors: 0,
            first_error: None,
            verified: 3,
            bytes: (ops_per_s * 10.0) as u64 * size,
            elapsed_s: 10.0,
            ops_per_s,
            mib_per_s: ops_per_s * size as f64 / (1 << 20) as f64,
            latency: Percentiles { p50_us: p50, p90_us: p50 * 2.0, p99_us: p99, max_us: p99 * 2.0, mean_us: p50 },
            server_cores: 1.5,
            generator_cores: 0.2,
            steal_percent: Some(1.0),
        }
    }

    #[test]
    fn ratios_favour_basalt_above_one_and_goal_needs_every_figure() {
        assert_eq!(rate_ratio(200.0, 100.0), Some(2.0));
        assert_eq!(rate_ratio(1.0, 0.0), None);
        assert_eq!(latency_ratio(100.0, 300.0), Some(3.0));
        assert_eq!(latency_ratio(0.0, 300.0), None);
        let met = compare(&result(Op::Put, 4096, 2000.0, 500.0, 900.0), &result(Op::Put, 4096, 1000.0, 1000.0, 900.0));
        assert_eq!((met.verdict, met.rate_ratio, met.p99_ratio), (Verdict::Met, Some(2.0), Some(1.0)));
        assert_eq!(met.metric, Metric::Iops);
        let slow_tail = compare(&result(Op::Get, 64 << 20, 10.0, 500.0, 2000.0), &result(Op::Get, 64 << 20, 5.0, 600.0, 1000.0));
        assert_eq!(slow_tail.metric, Metric::MibPerSec);
        assert_eq!((slow_tail.verdict, slow_tail.short_of.clone()), (Verdict::NotMet, vec!["p99"]));
        let mut broken = result(Op::Get, 4096, 5000.0, 1.0, 1.0);
        broken.errors = 3;
        assert_eq!(compare(&broken, &result(Op::Get, 4096, 1.0, 9.0, 9.0)).short_of, vec!["errors"]);
    }

    #[test]
    fn the_table_shows_both_systems_ratios_and_verdicts() {
        let basalt = vec![result(Op::Put, 4096, 1500.0, 600.0, 2000.0), result(Op::Get, 64 << 20, 4.0, 200_000.0, 1_500_000.0)];
        let garage = vec![result(Op::Put, 4096, 1000.0, 900.0, 3000.0), result(Op::Get, 64 << 20, 5.0, 180_000.0, 1_000_000.0)];
        let comparisons = basalt.iter().zip(&garage).map(|(b, g)| compare(b, g)).collect();
        let run = |system, rows| SystemRun { system, description: "d".into(), endpoint: "127.0.0.1:9000".parse().expect("addr"), rows };
        let report = S3Report {
            runtime_s: 10.0,
            sizes: vec![4096, 64 << 20],
            concurrencies: vec![16],
            list_keys: 1000,
            verify_every: VERIFY_EVERY,
            steps: Vec::new(),
            systems: vec![run(System::Basalt, basalt), run(System::Garage, garage)],
            comparisons,
        };
        let table = render_table(&report);
        let cmp = |prefix: &str| table.lines().rfind(|l| l.starts_with(prefix)).expect(prefix).to_string();
        let put = cmp("PUT");
        assert!(put.contains("1500 ops/s") && put.contains("1000 ops/s") && put.contains("1.50x"), "{put}");
        assert!(put.trim_end().ends_with("met") && !put.contains("NOT"), "{put}");
        let get = cmp("GET");
        assert!(get.contains("256.0 MiB/s") && get.contains("320.0 MiB/s") && get.contains("0.80x"), "{get}");
        assert!(get.contains("NOT met (rate, p50, p99)"), "{get}");
        assert!(table.contains("Goal met on 1 of 2 rows."), "{table}");
        assert!(table.contains("1.50 s"), "max latency in seconds: {table}");
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["comparisons"][1]["verdict"], "not_met");
        assert_eq!(json["systems"][0]["rows"][0]["latency"]["p50_us"], 600.0);
    }
}
