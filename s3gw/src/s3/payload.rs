//! The signed payload of requests whose body `s3s` reads whole (DeleteObjects,
//! CompleteMultipartUpload, bucket and object configuration PUTs…), checked by the
//! gateway so that a bad one is a 400 and not a 500.
//!
//! `s3s` verifies a body against its signed `x-amz-content-sha256`, and against its
//! `Content-Length`, by failing the body stream; reading a whole body it turns any stream
//! failure into `InternalError`. Object data does not go that way (PutObject and UploadPart
//! stream through [`super::body::Upload`], which names the failure), but a client whose
//! DeleteObjects body does not hash to the signed value got a 500 where S3 answers 400
//! `XAmzContentSHA256Mismatch`, and a body cut short got a 500 where S3 answers 400
//! `IncompleteBody`.
//!
//! [`Service`] therefore wraps the body of every request with a signed payload hash in a
//! [`Watched`] stream and puts its [`Watch`] in the request's extensions. The access check,
//! the last step `s3s` takes before reading a whole body and the first that knows the
//! operation, arms the watch for every operation but the streaming ones; an armed watch
//! hashes and counts what passes and, at the end of the body, fails the stream with the
//! reason recorded. When `s3s` then answers 500, [`Service`] answers with that reason.
//! An unarmed watch only passes the data on, so object uploads are not hashed twice.

use super::body::BodyFailure;
use bytes::Bytes;
use futures::Stream;
use s3s::crypto::Checksum as _;
use s3s::stream::{ByteStream, DynByteStream, RemainingLength};
use s3s::{Body, HttpError};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// The `s3s` service with what the gateway adds around it: the payload check, and answers
/// that have no content (304, 204) sent without any; built by [`super::service`].
#[derive(Clone)]
pub struct Service {
    inner: s3s::service::S3Service,
}

impl Service {
    pub(super) fn new(inner: s3s::service::S3Service) -> Self {
        Service { inner }
    }

    /// Answers one request.
    pub async fn call(&self, req: http::Request<Body>) -> Result<http::Response<Body>, HttpError> {
        let mut res = match signed_sha256(req.headers()) {
            Some(expected) => self.call_watched(req, expected).await?,
            None => self.inner.call(req).await?,
        };
        // `s3s` answers a failed If-None-Match / If-Modified-Since with its error XML in a
        // 304, which has no content (RFC 9110 15.4.5). hyper would not send it; the answer
        // itself should not carry it either.
        if matches!(res.status(), http::StatusCode::NOT_MODIFIED | http::StatusCode::NO_CONTENT) {
            *res.body_mut() = Body::empty();
            res.headers_mut().remove(http::header::CONTENT_LENGTH);
        }
        Ok(res)
    }

    async fn call_watched(
        &self,
        mut req: http::Request<Body>,
        expected: [u8; 32],
    ) -> Result<http::Response<Body>, HttpError> {
        let length = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // `s3s` checks the hash of an empty body without reading it: judge that one here.
        let empty = length == Some(0) || (length.is_none() && req.body().remaining_length().exact() == Some(0));
        let empty_failure =
            (empty && s3s::crypto::Sha256::checksum(b"").as_ref() != expected.as_slice()).then_some(BodyFailure::ContentSha256Mismatch);
        let watch = Watch::new(empty_failure);
        req.extensions_mut().insert(watch.clone());
        let req = req.map(|body| {
            let stream: DynByteStream = Box::pin(Watched::new(body, watch.clone(), expected, length));
            Body::from(stream)
        });
        let res = self.inner.call(req).await?;
        match watch.failure() {
            Some(failure) if res.status().is_server_error() => {
                tracing::debug!(?failure, "request body refused");
                failure.to_s3().to_http_response().map_err(|e| HttpError::new(Box::new(e)))
            }
            _ => Ok(res),
        }
    }
}

/// The SHA-256 a request's `x-amz-content-sha256` signs, when it is one (not
/// `UNSIGNED-PAYLOAD` nor a `STREAMING-*` mode, whose chunks `s3s` checks itself).
fn signed_sha256(headers: &http::HeaderMap) -> Option<[u8; 32]> {
    let value = headers.get("x-amz-content-sha256")?.as_bytes();
    if value.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(value.chunks_exact(2)) {
        let hex = |c: u8| char::from(c).to_digit(16);
        *byte = u8::try_from(hex(pair[0])? * 16 + hex(pair[1])?).ok()?;
    }
    Some(out)
}

/// Shared between a [`Watched`] body, the access check that arms it and [`Service`].
#[derive(Clone, Debug, Default)]
pub struct Watch(Arc<WatchState>);

#[derive(Debug, Default)]
struct WatchState {
    armed: AtomicBool,
    failure: Mutex<Option<BodyFailure>>,
    /// What is wrong with the request's body when it is empty (known before it is read).
    empty_failure: Option<BodyFailure>,
}

impl Watch {
    fn new(empty_failure: Option<BodyFailure>) -> Self {
        Watch(Arc::new(WatchState { empty_failure, ..WatchState::default() }))
    }

    /// The operation reads the body whole: check it (called by the access check).
    pub fn arm(&self) {
        self.0.armed.store(true, Ordering::Release);
    }

    fn armed(&self) -> bool {
        self.0.armed.load(Ordering::Acquire)
    }

    fn fail(&self, failure: BodyFailure) -> s3s::StdError {
        let err = format!("request body: {failure:?}").into();
        self.0.failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(failure);
        err
    }

    /// Why the body was refused, once the watch was armed.
    fn failure(&self) -> Option<BodyFailure> {
        let recorded = self.0.failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
        recorded.or_else(|| if self.armed() { self.0.empty_failure.clone() } else { None })
    }
}

/// A request body on its way to `s3s`, checked at its end once [`Watch::arm`]ed.
struct Watched {
    inner: Body,
    watch: Watch,
    expected: [u8; 32],
    /// The `Content-Length` the request announced.
    length: Option<u64>,
    seen: u64,
    /// Started at the first piece read once armed.
    hasher: Option<s3s::crypto::Sha256>,
    /// Pieces passed before the watch was armed, so the hash cannot be checked (the access
    /// check comes before `s3s` reads any body it reads whole, so this is not expected).
    unhashed: bool,
    done: bool,
}

impl Watched {
    fn new(inner: Body, watch: Watch, expected: [u8; 32], length: Option<u64>) -> Self {
        Watched { inner, watch, expected, length, seen: 0, hasher: None, unhashed: false, done: false }
    }

    /// At the end of the body: the announced length, then the signed hash.
    fn finish(&mut self) -> Result<(), BodyFailure> {
        if self.length.is_some_and(|l| l != self.seen) {
            return Err(BodyFailure::Incomplete);
        }
        let hasher = self.hasher.take().unwrap_or_default();
        if !self.unhashed && hasher.finalize().as_ref() != self.expected.as_slice() {
            return Err(BodyFailure::ContentSha256Mismatch);
        }
        Ok(())
    }
}

impl Stream for Watched {
    type Item = Result<Bytes, s3s::StdError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let armed = this.watch.armed();
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(bytes))) => {
                this.seen += bytes.len() as u64;
                if !armed {
                    this.unhashed |= !bytes.is_empty();
                    return Poll::Ready(Some(Ok(bytes)));
                }
                this.hasher.get_or_insert_with(s3s::crypto::Sha256::new).update(&bytes);
                // `s3s` checks the hash itself once it has `Content-Length` bytes, without
                // waiting for the end of the stream: check it first, on the last piece.
                if this.length.is_some_and(|l| this.seen >= l) {
                    this.done = true;
                    if let Err(f) = this.finish() {
                        return Poll::Ready(Some(Err(this.watch.fail(f))));
                    }
                }
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                if armed {
                    tracing::debug!(error = %e, "request body failed");
                    return Poll::Ready(Some(Err(this.watch.fail(BodyFailure::Incomplete))));
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.done = true;
                if !armed {
                    return Poll::Ready(None);
                }
                match this.finish() {
                    Ok(()) => Poll::Ready(None),
                    Err(f) => Poll::Ready(Some(Err(this.watch.fail(f)))),
                }
            }
        }
    }
}

impl ByteStream for Watched {
    fn remaining_length(&self) -> RemainingLength {
        self.inner.remaining_length()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn sha256(data: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(s3s::crypto::Sha256::checksum(data).as_ref());
        out
    }

    fn watched(body: &'static [u8], expected: [u8; 32], length: Option<u64>, armed: bool) -> (Watched, Watch) {
        let watch = Watch::default();
        if armed {
            watch.arm();
        }
        (Watched::new(Body::from(Bytes::from_static(body)), watch.clone(), expected, length), watch)
    }

    async fn drain(mut w: Watched) -> Result<Vec<u8>, s3s::StdError> {
        let mut out = Vec::new();
        while let Some(piece) = w.next().await {
            out.extend_from_slice(&piece?);
        }
        Ok(out)
    }

    #[test]
    fn only_hex_sha256_values_are_signed_payloads() {
        let mut h = http::HeaderMap::new();
        assert_eq!(signed_sha256(&h), None);
        h.insert("x-amz-content-sha256", http::HeaderValue::from_static("UNSIGNED-PAYLOAD"));
        assert_eq!(signed_sha256(&h), None);
        h.insert(
            "x-amz-content-sha256",
            http::HeaderValue::from_static("STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILERxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
        );
        assert_eq!(signed_sha256(&h), None);
        let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        h.insert("x-amz-content-sha256", http::HeaderValue::from_static(empty));
        assert_eq!(signed_sha256(&h), Some(sha256(b"")));
        h.insert("x-amz-content-sha256", http::HeaderValue::from_static("E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"));
        assert_eq!(signed_sha256(&h), Some(sha256(b"")));
        h.insert("x-amz-content-sha256", http::HeaderValue::from_static("g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
        assert_eq!(signed_sha256(&h), None);
    }

    #[tokio::test]
    async fn an_armed_watch_fails_a_body_that_does_not_match_and_says_why() {
        let (w, watch) = watched(b"<Delete/>", sha256(b"<Delete/>"), Some(9), true);
        assert_eq!(drain(w).await.expect("good body"), b"<Delete/>");
        assert_eq!(watch.failure(), None);

        let (w, watch) = watched(b"<Delete/>", sha256(b"<Delete/ >"), Some(9), true);
        assert!(drain(w).await.is_err());
        assert_eq!(watch.failure(), Some(BodyFailure::ContentSha256Mismatch));

        // Fewer bytes than announced: incomplete, whatever the hash.
        let (w, watch) = watched(b"", sha256(b""), Some(5), true);
        assert!(drain(w).await.is_err());
        assert_eq!(watch.failure(), Some(BodyFailure::Incomplete));
    }

    #[test]
    fn an_empty_body_is_judged_before_it_is_read_once_armed() {
        let watch = Watch::new(Some(BodyFailure::ContentSha256Mismatch));
        assert_eq!(watch.failure(), None);
        watch.arm();
        assert_eq!(watch.failure(), Some(BodyFailure::ContentSha256Mismatch));
    }

    #[tokio::test]
    async fn an_unarmed_watch_passes_everything_on() {
        let (w, watch) = watched(b"object data", sha256(b"other data"), Some(99), false);
        assert_eq!(drain(w).await.expect("passed on"), b"object data");
        assert_eq!(watch.failure(), None);
    }
}
