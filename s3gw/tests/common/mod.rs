//! A gateway on loopback over `MemBackend`, and a small SigV4 client (signatures by
//! `aws-sigv4`, HTTP by hyper) that can also send what a well-behaved SDK never would.

#![allow(dead_code)]

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use basalt_s3gw::backend::Account;
use basalt_s3gw::mem::MemBackend;
use basalt_s3gw::{serve, ServeOptions};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

pub const REGION: &str = "basalt-1";

pub struct Gateway {
    pub addr: SocketAddr,
    pub backend: Arc<MemBackend>,
    pub alice: Account,
    pub bob: Account,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    /// Two accounts: alice (key `AKALICE`) and bob (key `AKBOB`).
    pub async fn start() -> Gateway {
        let _ = tracing_subscriber::fmt().with_env_filter("basalt_s3gw=debug,warn").with_test_writer().try_init();
        let backend = Arc::new(MemBackend::new());
        let alice = Account { id: "id-alice".into(), name: "alice".into() };
        let bob = Account { id: "id-bob".into(), name: "bob".into() };
        backend.add_key(&alice, "AKALICE", "alice-secret");
        backend.add_key(&bob, "AKBOB", "bob-secret");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let opts = ServeOptions { region: REGION.into(), domains: vec!["localhost".into(), "s3.basalt.test".into()], tls: None };
        let task = tokio::spawn(serve(listener, Arc::clone(&backend), opts, shutdown.clone()));
        Gateway { addr, backend, alice, bob, shutdown, task: Some(task) }
    }

    pub fn client(&self, access: &str, secret: &str) -> Client {
        Client {
            addr: self.addr,
            access: access.into(),
            secret: secret.into(),
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn alice(&self) -> Client {
        self.client("AKALICE", "alice-secret")
    }

    pub fn bob(&self) -> Client {
        self.client("AKBOB", "bob-secret")
    }

    /// Asks the server to stop, without waiting.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    /// Whether the server task has returned.
    pub fn stopped(&self) -> bool {
        self.task.as_ref().is_none_or(tokio::task::JoinHandle::is_finished)
    }

    /// Stops the server and waits for it, failing if it does not stop in time.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server stops within 10 s")
                .expect("server task did not panic");
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub struct Client {
    pub addr: SocketAddr,
    pub access: String,
    pub secret: String,
    http: HttpClient<HttpConnector, Full<Bytes>>,
}

/// How the payload is covered by the signature.
#[derive(Clone, Debug)]
pub enum Payload {
    /// `x-amz-content-sha256` is the SHA-256 of this body (which may differ from the body sent).
    Signed(Bytes),
    Unsigned,
    /// As given (streaming modes).
    Literal(&'static str),
}

#[derive(Clone, Debug)]
pub enum Auth {
    Header,
    /// Presigned URL valid for this long.
    Presign(Duration),
    Anonymous,
}

pub struct Request<'c> {
    client: &'c Client,
    method: String,
    /// Already percent-encoded.
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Bytes,
    payload: Option<Payload>,
    auth: Auth,
    time: SystemTime,
    host: Option<String>,
    /// Replaces the signature with this one after signing.
    tamper_signature: bool,
}

pub struct Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    }

    /// The `<Code>` of an S3 error body.
    pub fn code(&self) -> Option<String> {
        xml_values(&self.text(), "Code").into_iter().next()
    }

    #[track_caller]
    pub fn expect_status(&self, status: u16) -> &Self {
        assert_eq!(self.status, status, "unexpected status; body: {}", self.text());
        self
    }

    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) -> &Self {
        assert_eq!(self.status, status, "unexpected status; body: {}", self.text());
        assert_eq!(self.code().as_deref(), Some(code), "unexpected code; body: {}", self.text());
        self
    }
}

/// Text of every `<tag>…</tag>` in `xml`, in order (enough for S3's flat answers).
pub fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find(&open) {
        rest = &rest[at + open.len()..];
        let Some(end) = rest.find(&close) else { break };
        out.push(unescape(&rest[..end]));
        rest = &rest[end + close.len()..];
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&apos;", "'").replace("&amp;", "&")
}

/// Percent-encodes a key for a path (keeps `/`).
pub fn enc_key(key: &str) -> String {
    const SET: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b'/');
    percent_encoding::utf8_percent_encode(key, SET).to_string()
}

pub fn enc_query(v: &str) -> String {
    const SET: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    percent_encoding::utf8_percent_encode(v, SET).to_string()
}

pub fn md5_b64(data: &[u8]) -> String {
    use base64::Engine;
    use md5::Digest;
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(data))
}

pub fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    md5::Md5::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

impl Client {
    pub fn request(&self, method: &str, path: &str) -> Request<'_> {
        Request {
            client: self,
            method: method.into(),
            path: path.into(),
            query: Vec::new(),
            headers: Vec::new(),
            body: Bytes::new(),
            payload: None,
            auth: Auth::Header,
            time: SystemTime::now(),
            host: None,
            tamper_signature: false,
        }
    }

    pub async fn put_object(&self, bucket: &str, key: &str, data: &[u8]) -> Response {
        self.request("PUT", &format!("/{bucket}/{}", enc_key(key))).body(data.to_vec()).send().await
    }

    pub async fn get_object(&self, bucket: &str, key: &str) -> Response {
        self.request("GET", &format!("/{bucket}/{}", enc_key(key))).send().await
    }

    pub async fn create_bucket(&self, bucket: &str) -> Response {
        self.request("PUT", &format!("/{bucket}")).send().await
    }
}

impl Request<'_> {
    pub fn query(mut self, name: &str, value: &str) -> Self {
        self.query.push((name.into(), value.into()));
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    pub fn payload(mut self, payload: Payload) -> Self {
        self.payload = Some(payload);
        self
    }

    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    pub fn at(mut self, time: SystemTime) -> Self {
        self.time = time;
        self
    }

    pub fn host(mut self, host: &str) -> Self {
        self.host = Some(host.into());
        self
    }

    pub fn tamper_signature(mut self) -> Self {
        self.tamper_signature = true;
        self
    }

    fn uri(&self) -> String {
        let mut uri = format!("http://{}{}", self.client.addr, self.path);
        if !self.query.is_empty() {
            let q: Vec<String> = self
                .query
                .iter()
                .map(|(k, v)| if v.is_empty() { enc_query(k) } else { format!("{}={}", enc_query(k), enc_query(v)) })
                .collect();
            uri.push('?');
            uri.push_str(&q.join("&"));
        }
        uri
    }

    /// The signed request, and the signature that seeds aws-chunked chunk signatures.
    pub fn build(&self) -> (http::Request<Full<Bytes>>, String) {
        let host = self.host.clone().unwrap_or_else(|| self.client.addr.to_string());
        let mut headers = self.headers.clone();
        headers.push(("host".into(), host));
        let mut req = http::Request::builder().method(self.method.as_str()).uri(self.uri());
        for (k, v) in &headers {
            req = req.header(k, v);
        }
        let mut req = req.body(Full::new(self.body.clone())).expect("valid request");
        if matches!(self.auth, Auth::Anonymous) {
            return (req, String::new());
        }
        let identity: Identity = Credentials::new(&self.client.access, &self.client.secret, None, None, "test").into();
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let payload = self.payload.clone().unwrap_or_else(|| Payload::Signed(self.body.clone()));
        let signable_body = match &self.auth {
            Auth::Presign(expires) => {
                settings.signature_location = SignatureLocation::QueryParams;
                settings.expires_in = Some(*expires);
                SignableBody::UnsignedPayload
            }
            _ => {
                settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
                match &payload {
                    Payload::Signed(b) => SignableBody::Bytes(b),
                    Payload::Unsigned => SignableBody::UnsignedPayload,
                    Payload::Literal(s) => SignableBody::Precomputed((*s).to_owned()),
                }
            }
        };
        let params: v4::SigningParams<'_, SigningSettings> = v4::SigningParams::builder()
            .identity(&identity)
            .region(REGION)
            .name("s3")
            .time(self.time)
            .settings(settings)
            .build()
            .expect("signing params");
        let uri = self.uri();
        let signable = SignableRequest::new(
            &self.method,
            uri.as_str(),
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            signable_body,
        )
        .expect("signable request");
        let signing_params = params.into();
        let (instructions, signature) = sign(signable, &signing_params).expect("sign").into_parts();
        instructions.apply_to_request_http1x(&mut req);
        if self.tamper_signature {
            tamper(&mut req, &signature);
        }
        (req, signature)
    }

    pub async fn send(self) -> Response {
        let (req, _) = self.build();
        send(&self.client.http, req).await
    }

    /// Sends `body` as aws-chunked with signed chunks of `chunk` bytes
    /// (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD`); `corrupt` flips a byte of the first chunk
    /// after signing.
    pub async fn send_chunked(mut self, data: &[u8], chunk: usize, corrupt: bool) -> Response {
        let chunks: Vec<&[u8]> = data.chunks(chunk).collect();
        let encoded_len: usize = chunks.iter().map(|c| chunk_header_len(c.len()) + c.len() + 2).sum::<usize>()
            + chunk_header_len(0)
            + 2;
        self = self
            .header("content-encoding", "aws-chunked")
            .header("x-amz-decoded-content-length", &data.len().to_string())
            .header("content-length", &encoded_len.to_string())
            .payload(Payload::Literal("STREAMING-AWS4-HMAC-SHA256-PAYLOAD"));
        let (req, seed) = self.build();
        let identity: Identity = Credentials::new(&self.client.access, &self.client.secret, None, None, "test").into();
        let params: v4::SigningParams<'_, ()> = v4::SigningParams::builder()
            .identity(&identity)
            .region(REGION)
            .name("s3")
            .time(self.time)
            .settings(())
            .build()
            .expect("chunk signing params");
        let mut body = Vec::with_capacity(encoded_len);
        let mut prev = seed;
        for (i, piece) in chunks.iter().copied().chain(std::iter::once(&[][..])).enumerate() {
            let sig = v4::sign_chunk(&Bytes::copy_from_slice(piece), &prev, &params).expect("sign chunk").into_parts().1;
            body.extend_from_slice(format!("{:x};chunk-signature={sig}\r\n", piece.len()).as_bytes());
            let start = body.len();
            body.extend_from_slice(piece);
            if corrupt && i == 0 && !piece.is_empty() {
                body[start] ^= 0xff;
            }
            body.extend_from_slice(b"\r\n");
            prev = sig;
        }
        assert_eq!(body.len(), encoded_len);
        let (parts, _) = req.into_parts();
        send(&self.client.http, http::Request::from_parts(parts, Full::new(Bytes::from(body)))).await
    }
}

impl Request<'_> {
    /// Sends `data` as aws-chunked with unsigned chunks and a trailing
    /// `x-amz-checksum-crc32: trailer` (`STREAMING-UNSIGNED-PAYLOAD-TRAILER`, what AWS SDKs
    /// send by default over TLS).
    pub async fn send_unsigned_trailer(mut self, data: &[u8], chunk: usize, trailer: &str) -> Response {
        let mut body = Vec::new();
        for piece in data.chunks(chunk) {
            body.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            body.extend_from_slice(piece);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("0\r\nx-amz-checksum-crc32:{trailer}\r\n\r\n").as_bytes());
        self = self
            .header("content-encoding", "aws-chunked")
            .header("x-amz-decoded-content-length", &data.len().to_string())
            .header("x-amz-trailer", "x-amz-checksum-crc32")
            .header("content-length", &body.len().to_string())
            .payload(Payload::Literal("STREAMING-UNSIGNED-PAYLOAD-TRAILER"));
        let (req, _) = self.build();
        let (parts, _) = req.into_parts();
        send(&self.client.http, http::Request::from_parts(parts, Full::new(Bytes::from(body)))).await
    }
}

/// The request line and headers of `req` as HTTP/1.1 bytes (for tests that write the body
/// themselves, slowly).
pub fn request_head(req: &http::Request<Full<Bytes>>) -> Vec<u8> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method(), path).into_bytes();
    for (name, value) in req.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

fn chunk_header_len(len: usize) -> usize {
    format!("{len:x};chunk-signature=").len() + 64 + 2
}

fn tamper(req: &mut http::Request<Full<Bytes>>, signature: &str) {
    let flipped: String = signature.chars().rev().collect();
    if let Some(auth) = req.headers().get("authorization").and_then(|v| v.to_str().ok()) {
        let changed = auth.replace(signature, &flipped);
        req.headers_mut().insert("authorization", http::HeaderValue::from_str(&changed).expect("header"));
    } else {
        let uri = req.uri().to_string().replace(signature, &flipped);
        *req.uri_mut() = uri.parse().expect("uri");
    }
}

async fn send(http: &HttpClient<HttpConnector, Full<Bytes>>, req: http::Request<Full<Bytes>>) -> Response {
    let res = tokio::time::timeout(Duration::from_secs(30), http.request(req))
        .await
        .expect("response within 30 s")
        .expect("HTTP exchange");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.expect("response body").to_bytes();
    Response { status, headers, body }
}
