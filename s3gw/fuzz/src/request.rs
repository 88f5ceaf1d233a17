//! The `request` fuzz target: one HTTP request, decoded from the fuzz input, through the
//! whole S3 service (`basalt_s3gw::s3::service` over a fresh `MemBackend`, in process, no
//! sockets), with the invariants of the gateway checked on the answer.
//!
//! Shared by the cargo-fuzz target (`fuzz_targets/request.rs`, through this crate) and
//! `s3gw/tests/fuzz_corpus.rs` (which includes this file with `#[path]` and replays the
//! checked-in corpus on stable), so it uses only crates both have.
//!
//! Input layout, text-like so corpus files can be written by hand:
//!
//! ```text
//! <mode> <METHOD> <path-and-query>\n
//! <name>: <value>\n        (any number of header lines, `\r\n` also accepted)
//! \n
//! <body: the remaining bytes>
//! ```
//!
//! - `mode`: `sign` signs the request with SigV4 in an `Authorization` header, as alice,
//!   now (the input's `Authorization` and `X-Amz-Date` are dropped; an
//!   `X-Amz-Content-Sha256` it gives is signed as the payload hash as is, so streaming and
//!   unsigned modes are reachable; without one the body's SHA-256 is signed); `presign`
//!   signs it as a presigned URL (query parameters, valid 5 minutes, as alice, now);
//!   anything else (`raw`) sends the request exactly as decoded, so the fuzzer's own
//!   `Authorization` header or `X-Amz-*` query parameters exercise SigV4 canonicalisation
//!   and signature parsing.
//! - `METHOD`: one of GET, PUT, POST, HEAD, DELETE (anything else: the input is ignored).
//! - Without a `Host` header, `s3.basalt.test` (a gateway domain itself, so path-style).
//!   Domains: `s3.basalt.test` and `localhost`.
//! - The body is cut to `Content-Length` when the input gives one (what hyper delivers);
//!   without one, and without `Transfer-Encoding`, `Content-Length` is set to its length.
//!
//! State, fresh for every input (so every failure reproduces from its input alone):
//! alice (key `AKALICE`, secret `alice-secret`) owns `alice-bucket` with a few objects
//! (see [`ALICE_OBJECTS`]); bob (key `AKBOB`) owns `bob-private` with `hello.txt`, whose
//! data is a random token drawn for this input, and an object whose key holds the token.
//!
//! Inputs that would hit a known s3s panic (see [`hits_s3s_date_digit_overflow`]) are not
//! sent. With `S3GW_FUZZ_SHOW` set, every answer is printed to stderr (for writing seeds).
//!
//! Invariants (a broken one panics):
//! - the service never panics and always answers (no `HttpError`) within 10 s;
//! - the answer is valid HTTP: the body streams to its end without error, and its length
//!   is the `Content-Length` announced (but for HEAD, 204 and 304, which have none);
//! - no 5xx other than 501 Not Implemented and 503 Slow Down;
//! - an error answer (4xx/5xx, not HEAD) has an S3 XML error body with a `<Code>`;
//! - bob's data never reaches the caller (the token is in no answer's headers or body),
//!   and bob's bucket and objects are unchanged afterwards.

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use basalt_s3gw::backend::{Account, Backend, ListQuery, PutOptions};
use basalt_s3gw::mem::MemBackend;
use bytes::Bytes;
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub const REGION: &str = "basalt-1";
pub const DOMAINS: [&str; 2] = ["s3.basalt.test", "localhost"];
pub const ALICE_KEY: &str = "AKALICE";
pub const ALICE_SECRET: &str = "alice-secret";
pub const ALICE_BUCKET: &str = "alice-bucket";
pub const BOB_BUCKET: &str = "bob-private";
/// Alice's objects: plain, nested with a space and unicode, dot segments, an encoded
/// slash taken literally, and (see [`long_key`]) a key of exactly 1024 bytes, the limit.
/// Each holds `alice's <key>\n`.
pub const ALICE_OBJECTS: [&str; 4] = ["hello.txt", "dir/a b/ünï.txt", "../up/./x", "a%2Fb"];
/// alice's object of no bytes.
pub const EMPTY_OBJECT: &str = "empty";

/// `long/` and then `0123456789abcdef` repeated, 1024 bytes in all.
pub fn long_key() -> String {
    let mut key = String::from("long/");
    while key.len() < 1024 {
        let i = (key.len() - 5) % 16;
        key.push_str(&"0123456789abcdef"[i..=i]);
    }
    key
}
const DEFAULT_HOST: &str = "s3.basalt.test";
const METHODS: [&str; 5] = ["GET", "PUT", "POST", "HEAD", "DELETE"];
/// Headers the signer computes itself in `sign` mode.
const SIGNER_HEADERS: [&str; 3] = ["authorization", "x-amz-date", "x-amz-content-sha256"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sign,
    Presign,
    Raw,
}

/// A fuzz input, decoded.
#[derive(Debug)]
pub struct Input<'a> {
    pub mode: Mode,
    pub method: &'a str,
    pub path_and_query: &'a [u8],
    pub headers: Vec<(&'a [u8], &'a [u8])>,
    pub body: &'a [u8],
}

impl<'a> Input<'a> {
    /// `None` when the input names no method of ours.
    pub fn decode(data: &'a [u8]) -> Option<Input<'a>> {
        let (head, body) = split_head(data);
        let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let first = lines.next()?;
        let mut words = first.splitn(3, |&b| b == b' ');
        let mode = match words.next()? {
            b"sign" => Mode::Sign,
            b"presign" => Mode::Presign,
            _ => Mode::Raw,
        };
        let method = words.next()?;
        let method = METHODS.into_iter().find(|m| m.as_bytes() == method)?;
        let path_and_query = words.next().unwrap_or(b"/");
        let headers = lines
            .filter_map(|l| {
                let colon = l.iter().position(|&b| b == b':')?;
                // As httparse does: whitespace around a value is not part of it.
                Some((&l[..colon], l[colon + 1..].trim_ascii()))
            })
            .collect();
        Some(Input { mode, method, path_and_query, headers, body })
    }
}

/// The head (request line and headers) and the body, split at the first empty line.
fn split_head(data: &[u8]) -> (&[u8], &[u8]) {
    let mut at = 0;
    for line in data.split_inclusive(|&b| b == b'\n') {
        if at > 0 && (line == b"\n" || line == b"\r\n") {
            return (&data[..at - 1], &data[at + line.len()..]);
        }
        at += line.len();
    }
    (data, &[])
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

/// The entry point: decodes `data`, sends it, checks the invariants.
pub fn request(data: &[u8]) {
    status(data);
}

/// [`request`], and the status of the answer (`None` if the input was not sent: no method
/// of ours, a request hyper would refuse, or one the signer cannot sign).
pub fn status(data: &[u8]) -> Option<u16> {
    let input = Input::decode(data)?;
    block_on(run(input))
}

struct World {
    backend: Arc<MemBackend>,
    /// What no answer to alice may contain.
    token: String,
    /// Bob's objects: key and ETag.
    bob_objects: Vec<(String, String)>,
}

async fn world() -> World {
    let backend = Arc::new(MemBackend::new());
    let alice = Account { id: "id-alice".into(), name: "alice".into() };
    let bob = Account { id: "id-bob".into(), name: "bob".into() };
    backend.add_key(&alice, ALICE_KEY, ALICE_SECRET);
    backend.add_key(&bob, "AKBOB", "bob-secret");
    let token = format!("BOBSECRET{:032x}", rand::random::<u128>());
    backend.create_bucket(&alice, ALICE_BUCKET, REGION).await.expect("alice's bucket");
    for key in ALICE_OBJECTS.map(str::to_owned).into_iter().chain([long_key()]) {
        put(&backend, ALICE_BUCKET, &key, Bytes::from(format!("alice's {key}\n"))).await;
    }
    // An empty object: ranges of it are all unsatisfiable.
    put(&backend, ALICE_BUCKET, EMPTY_OBJECT, Bytes::new()).await;
    backend.create_bucket(&bob, BOB_BUCKET, REGION).await.expect("bob's bucket");
    let mut bob_objects = Vec::new();
    for key in ["hello.txt".to_owned(), format!("key-{token}")] {
        let etag = put(&backend, BOB_BUCKET, &key, Bytes::from(token.clone())).await;
        bob_objects.push((key, etag));
    }
    World { backend, token, bob_objects }
}

/// Stores a seed object; its ETag.
async fn put(backend: &MemBackend, bucket: &str, key: &str, data: Bytes) -> String {
    let body: basalt_s3gw::backend::ByteStream = Box::pin(futures::stream::iter([Ok(data)]));
    backend.put_object(bucket, key, PutOptions::default(), body).await.expect("seed object").etag
}

/// The request as hyper would hand it to the service, `None` if hyper would refuse it; and
/// in `sign` mode the payload hash the input gave (which the signer then sets).
fn build(input: &Input<'_>) -> Option<(http::Request<Bytes>, Option<String>)> {
    let uri = http::Uri::try_from(input.path_and_query).ok()?;
    // hyper serves origin-form targets; anything else is not ours to route.
    if uri.scheme().is_some() || uri.authority().is_some() || !input.path_and_query.starts_with(b"/") {
        return None;
    }
    let mut req = http::Request::builder().method(input.method).uri(uri).body(Bytes::new()).ok()?;
    let mut payload_hash = None;
    let headers = req.headers_mut();
    for (name, value) in &input.headers {
        let (Ok(name), Ok(value)) = (http::HeaderName::from_bytes(name), http::HeaderValue::from_bytes(value)) else {
            continue;
        };
        if input.mode == Mode::Sign && SIGNER_HEADERS.contains(&name.as_str()) {
            if name == "x-amz-content-sha256" {
                payload_hash = value.to_str().ok().map(str::to_owned);
            }
            continue;
        }
        headers.append(name, value);
    }
    if !headers.contains_key(http::header::HOST) {
        headers.insert(http::header::HOST, http::HeaderValue::from_static(DEFAULT_HOST));
    }
    // hyper refuses a request with a bad or ambiguous Content-Length, and delivers exactly
    // that many bytes of body.
    let lengths: Vec<_> = headers.get_all(http::header::CONTENT_LENGTH).iter().collect();
    let body = match lengths.as_slice() {
        [] if headers.contains_key(http::header::TRANSFER_ENCODING) => input.body,
        [] => {
            headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(input.body.len()));
            input.body
        }
        [one] => {
            let n: usize = one.to_str().ok()?.parse().ok()?;
            &input.body[..n.min(input.body.len())]
        }
        _ => return None,
    };
    *req.body_mut() = Bytes::copy_from_slice(body);
    Some((req, payload_hash))
}

/// A known bug of s3s 0.14 this target steps around: its date-digit parser
/// (`utils/parser.rs`, `digit`) computes `c - b'0'` before checking that `c` is a digit,
/// so a byte below '0' in the date of a SigV4 credential scope or of `x-amz-date` (header,
/// query or POST form) overflows. That panics only with overflow checks on (tests, fuzzing);
/// our release builds wrap and refuse the date as they should. It is in s3s's signature
/// parsing, before any code of ours runs, so the gateway cannot refuse such a request first.
fn hits_s3s_date_digit_overflow(req: &http::Request<Bytes>) -> bool {
    let below_zero = |s: &[u8]| s.iter().any(|&b| b < b'0');
    let credential_date = |c: &[u8]| c.split(|&b| b == b'/').nth(1).is_some_and(below_zero);
    let headers = req.headers();
    let auth_dates = headers.get_all(http::header::AUTHORIZATION).iter().any(|v| {
        let v = v.as_bytes();
        find(v, b"Credential=").is_some_and(|at| credential_date(&v[at..]))
    });
    let header_dates = headers.get_all("x-amz-date").iter().any(|v| below_zero(v.as_bytes()));
    let query_dates = req.uri().query().is_some_and(|q| {
        q.split('&').any(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value.as_bytes());
            (name == "X-Amz-Date" && below_zero(&value)) || (name == "X-Amz-Credential" && credential_date(&value))
        })
    });
    // POST form fields: the same parsers, on any form naming a date or credential.
    let body = req.body().to_ascii_lowercase();
    let form_dates = find(&body, b"x-amz-date").is_some() || find(&body, b"x-amz-credential").is_some();
    auth_dates || header_dates || query_dates || (req.method() == http::Method::POST && form_dates)
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match (s[i], s.get(i + 1).copied().and_then(hex), s.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap_or(0));
                i += 3;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Signs `req` as alice, now; `None` if it cannot be signed (a header the signer cannot
/// take, a URI it cannot parse).
fn signed(mut req: http::Request<Bytes>, mode: Mode, payload_hash: Option<String>) -> Option<http::Request<Bytes>> {
    let identity: Identity = Credentials::new(ALICE_KEY, ALICE_SECRET, None, None, "fuzz").into();
    let mut settings = SigningSettings::default();
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    let body = req.body().clone();
    let signable_body = if mode == Mode::Presign {
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(Duration::from_secs(300));
        SignableBody::UnsignedPayload
    } else {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        match payload_hash {
            Some(h) => SignableBody::Precomputed(h),
            None => SignableBody::Bytes(&body),
        }
    };
    // Headers that are not visible ASCII cannot be signed; they travel unsigned.
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    if !headers.iter().any(|(k, _)| k == "host") {
        return None;
    }
    let params: v4::SigningParams<'_, SigningSettings> = v4::SigningParams::builder()
        .identity(&identity)
        .region(REGION)
        .name("s3")
        .time(SystemTime::now())
        .settings(settings)
        .build()
        .ok()?;
    let uri = req.uri().to_string();
    let signable = SignableRequest::new(
        req.method().as_str(),
        uri.as_str(),
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        signable_body,
    )
    .ok()?;
    let (instructions, _) = sign(signable, &params.into()).ok()?.into_parts();
    instructions.apply_to_request_http1x(&mut req);
    Some(req)
}

async fn run(input: Input<'_>) -> Option<u16> {
    let (req, payload_hash) = build(&input)?;
    if hits_s3s_date_digit_overflow(&req) {
        return None;
    }
    let req = match input.mode {
        Mode::Raw => req,
        Mode::Sign | Mode::Presign => signed(req, input.mode, payload_hash)?,
    };
    let world = world().await;
    let domains: Vec<String> = DOMAINS.iter().map(|d| (*d).to_owned()).collect();
    let service = basalt_s3gw::s3::service(Arc::clone(&world.backend), REGION, &domains);
    let method = req.method().clone();
    let req = req.map(s3s::Body::from);
    let answer = async {
        let res = service.call(req).await.unwrap_or_else(|e| panic!("the service failed instead of answering: {e:?}"));
        let (parts, body) = res.into_parts();
        let body = body.collect().await.unwrap_or_else(|e| panic!("response body failed: {e}")).to_bytes();
        (parts, body)
    };
    let (parts, body) =
        tokio::time::timeout(Duration::from_secs(10), answer).await.expect("the service answers within 10 s");
    if std::env::var_os("S3GW_FUZZ_SHOW").is_some() {
        eprintln!("{} {:?}\n{}", parts.status, parts.headers, String::from_utf8_lossy(&body));
    }
    check_answer(&method, &parts, &body, &world.token);
    check_bob_untouched(&world).await;
    Some(parts.status.as_u16())
}

/// The invariants on one answer (public so the replay test can show they catch a leak).
pub fn check_answer(method: &http::Method, parts: &http::response::Parts, body: &[u8], token: &str) {
    let status = parts.status.as_u16();
    let text = String::from_utf8_lossy(body);
    assert!(
        !(500..600).contains(&status) || status == 501 || status == 503,
        "server error {status}: {text}"
    );
    let bodiless = *method == http::Method::HEAD || status == 204 || status == 304;
    if let Some(len) = parts.headers.get(http::header::CONTENT_LENGTH) {
        let len: usize = len.to_str().ok().and_then(|l| l.parse().ok()).unwrap_or_else(|| panic!("Content-Length {len:?}"));
        if !bodiless {
            assert_eq!(len, body.len(), "Content-Length does not match the body");
        }
    }
    // A body on a HEAD answer is harmless (hyper never sends it), and s3s puts its error
    // XML there; other bodiless answers must be empty.
    if bodiless && *method != http::Method::HEAD {
        assert!(body.is_empty(), "{status} answer to {method} has a body: {text}");
    } else if !bodiless && status >= 400 {
        assert!(text.contains("<Error>") && text.contains("<Code>"), "{status} without an S3 error body: {text}");
    }
    for (name, value) in &parts.headers {
        assert!(
            find(value.as_bytes(), token.as_bytes()).is_none(),
            "bob's data in header {name}: {value:?}"
        );
    }
    assert!(find(body, token.as_bytes()).is_none(), "bob's data in the answer ({status}): {text}");
}

async fn check_bob_untouched(world: &World) {
    let bucket = world.backend.bucket(BOB_BUCKET).await.expect("bob's bucket is still there");
    assert_eq!(bucket.owner, "id-bob", "bob's bucket changed owner");
    let query = ListQuery { max_keys: 1000, ..ListQuery::default() };
    let page = world.backend.list_objects(BOB_BUCKET, &query).await.expect("bob's listing");
    let found: Vec<(&str, &str)> = page.objects.iter().map(|o| (o.key.as_str(), o.etag.as_str())).collect();
    let mut expected: Vec<(&str, &str)> = world.bob_objects.iter().map(|(k, e)| (k.as_str(), e.as_str())).collect();
    expected.sort_unstable();
    assert_eq!(found, expected, "bob's objects changed");
}
