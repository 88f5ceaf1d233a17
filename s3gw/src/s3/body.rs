//! Object data between HTTP and the backend, streamed piece by piece: the upload side
//! hashes what passes and fails the stream at its end if a checksum does not match (so the
//! backend stores nothing), and remembers why, so the answer names the right S3 error.

use crate::backend::ByteStream;
use bytes::Bytes;
use futures::Stream;
use s3s::checksum::ChecksumHasher;
use s3s::crypto::Checksum as _;
use s3s::dto::StreamingBlob;
use s3s::{S3Error, S3ErrorCode, TrailingHeaders};
use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use super::errors::with_status;
use http::StatusCode;

/// The checksum algorithms S3 clients may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Algorithm {
    Crc32,
    Crc32c,
    Crc64Nvme,
    Sha1,
    Sha256,
}

impl Algorithm {
    pub const ALL: [Algorithm; 5] =
        [Algorithm::Crc32, Algorithm::Crc32c, Algorithm::Crc64Nvme, Algorithm::Sha1, Algorithm::Sha256];

    /// The name S3 uses (`x-amz-sdk-checksum-algorithm`, `ObjectInfo::checksums` keys).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "CRC32",
            Algorithm::Crc32c => "CRC32C",
            Algorithm::Crc64Nvme => "CRC64NVME",
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
        }
    }

    pub fn header(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "x-amz-checksum-crc32",
            Algorithm::Crc32c => "x-amz-checksum-crc32c",
            Algorithm::Crc64Nvme => "x-amz-checksum-crc64nvme",
            Algorithm::Sha1 => "x-amz-checksum-sha1",
            Algorithm::Sha256 => "x-amz-checksum-sha256",
        }
    }

    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.name().eq_ignore_ascii_case(name))
    }

    pub fn from_header(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.header().eq_ignore_ascii_case(name.trim()))
    }
}

/// Where the client's value for a checksum comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Sent in an `x-amz-checksum-*` header, known before the body.
    Header(String),
    /// Announced in `x-amz-trailer`, sent after the body.
    Trailer,
    /// Only the algorithm was named: the gateway computes the value.
    Compute,
}

/// Why an upload body was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyFailure {
    /// The payload does not hash to the signed `x-amz-content-sha256`.
    ContentSha256Mismatch,
    /// An aws-chunked chunk signature is wrong.
    ChunkSignature,
    /// Malformed aws-chunked framing or trailers.
    Malformed,
    /// Shorter or longer than announced, or the connection failed.
    Incomplete,
    /// A checksum sent in a header does not match the data.
    ChecksumMismatch(Algorithm),
    /// A checksum sent in a trailer does not match the data.
    TrailerChecksumMismatch(Algorithm),
    /// A trailer was announced but not sent.
    MissingTrailer(Algorithm),
}

impl BodyFailure {
    pub fn to_s3(&self) -> S3Error {
        match self {
            BodyFailure::ContentSha256Mismatch => with_status(
                S3ErrorCode::Custom("XAmzContentSHA256Mismatch".into()),
                StatusCode::BAD_REQUEST,
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
            ),
            BodyFailure::ChunkSignature => with_status(
                S3ErrorCode::SignatureDoesNotMatch,
                StatusCode::FORBIDDEN,
                "The chunk signature we calculated does not match the signature you provided.",
            ),
            BodyFailure::Malformed => {
                with_status(S3ErrorCode::InvalidRequest, StatusCode::BAD_REQUEST, "Malformed aws-chunked body.")
            }
            BodyFailure::Incomplete => with_status(
                S3ErrorCode::IncompleteBody,
                StatusCode::BAD_REQUEST,
                "You did not provide the number of bytes specified by the Content-Length HTTP header.",
            ),
            BodyFailure::ChecksumMismatch(a) => with_status(
                S3ErrorCode::BadDigest,
                StatusCode::BAD_REQUEST,
                format!("The {} you specified did not match the calculated checksum.", a.name()),
            ),
            BodyFailure::TrailerChecksumMismatch(a) => with_status(
                S3ErrorCode::Custom("XAmzContentChecksumMismatch".into()),
                StatusCode::BAD_REQUEST,
                format!("The provided '{}' header does not match what was computed.", a.header()),
            ),
            BodyFailure::MissingTrailer(a) => with_status(
                S3ErrorCode::InvalidRequest,
                StatusCode::BAD_REQUEST,
                format!("The trailer {} was announced but not sent.", a.header()),
            ),
        }
    }

    /// What a failed `s3s` body stream meant. Its error types are private to `s3s`, so
    /// their messages are all there is to go by (pinned by the gateway's tests).
    fn classify(e: &(dyn std::error::Error + Send + Sync)) -> BodyFailure {
        let text = e.to_string();
        if text.contains("Sha256Mismatch") {
            BodyFailure::ContentSha256Mismatch
        } else if text.contains("SignatureMismatch") {
            BodyFailure::ChunkSignature
        } else if text.contains("LengthMismatch") || text.contains("Incomplete") {
            BodyFailure::Incomplete
        } else if text.contains("AwsChunkedStreamError") {
            BodyFailure::Malformed
        } else {
            BodyFailure::Incomplete
        }
    }
}

/// What the upload learned, read by the gateway once the backend has returned.
#[derive(Clone, Debug, Default)]
pub struct UploadReport(Arc<Mutex<Report>>);

#[derive(Debug, Default)]
struct Report {
    failure: Option<BodyFailure>,
    checksums: BTreeMap<String, String>,
}

impl UploadReport {
    pub fn failure(&self) -> Option<BodyFailure> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).failure.clone()
    }

    /// The checksums of the whole body, once it was read to its end and verified.
    pub fn checksums(&self) -> BTreeMap<String, String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).checksums.clone()
    }

    fn fail(&self, f: BodyFailure) -> io::Error {
        let err = io::Error::new(io::ErrorKind::InvalidData, format!("{f:?}"));
        let mut report = self.0.lock().unwrap_or_else(|p| p.into_inner());
        report.failure.get_or_insert(f);
        err
    }
}

type Inner = Pin<Box<dyn Stream<Item = Result<Bytes, Box<dyn std::error::Error + Send + Sync>>> + Send>>;

/// The request body on its way to `Backend::put_object`.
pub struct Upload {
    inner: Option<Inner>,
    hasher: Option<ChecksumHasher>,
    expected: Vec<(Algorithm, Expected)>,
    trailers: Option<TrailingHeaders>,
    report: UploadReport,
}

impl Upload {
    /// `expected`: the checksums to compute and, where the client gave one, to verify.
    pub fn new(
        body: StreamingBlob,
        expected: Vec<(Algorithm, Expected)>,
        trailers: Option<TrailingHeaders>,
    ) -> (Upload, UploadReport) {
        let inner: Inner = Box::pin(body);
        Upload::from_inner(inner, expected, trailers)
    }

    /// The same over a backend stream (CopyObject's source).
    pub fn from_backend(body: ByteStream, expected: Vec<(Algorithm, Expected)>) -> (Upload, UploadReport) {
        use futures::TryStreamExt;
        let inner: Inner = Box::pin(body.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>));
        Upload::from_inner(inner, expected, None)
    }

    fn from_inner(
        inner: Inner,
        expected: Vec<(Algorithm, Expected)>,
        trailers: Option<TrailingHeaders>,
    ) -> (Upload, UploadReport) {
        let report = UploadReport::default();
        let hasher = (!expected.is_empty()).then(|| {
            let mut h = ChecksumHasher::default();
            for (a, _) in &expected {
                match a {
                    Algorithm::Crc32 => h.crc32 = Some(s3s::crypto::Crc32::new()),
                    Algorithm::Crc32c => h.crc32c = Some(s3s::crypto::Crc32c::new()),
                    Algorithm::Crc64Nvme => h.crc64nvme = Some(s3s::crypto::Crc64Nvme::new()),
                    Algorithm::Sha1 => h.sha1 = Some(s3s::crypto::Sha1::new()),
                    Algorithm::Sha256 => h.sha256 = Some(s3s::crypto::Sha256::new()),
                }
            }
            h
        });
        let upload = Upload { inner: Some(inner), hasher, expected, trailers, report: report.clone() };
        (upload, report)
    }

    pub fn into_stream(self) -> ByteStream {
        Box::pin(self)
    }

    /// At the end of the body: compare every checksum with the client's value.
    fn finish(&mut self) -> Result<(), BodyFailure> {
        let Some(hasher) = self.hasher.take() else { return Ok(()) };
        let sums = hasher.finalize();
        let trailers = self.trailers.as_ref().and_then(|t| t.take());
        let mut verified = BTreeMap::new();
        for (algorithm, expected) in &self.expected {
            let computed = match algorithm {
                Algorithm::Crc32 => sums.checksum_crc32.clone(),
                Algorithm::Crc32c => sums.checksum_crc32c.clone(),
                Algorithm::Crc64Nvme => sums.checksum_crc64nvme.clone(),
                Algorithm::Sha1 => sums.checksum_sha1.clone(),
                Algorithm::Sha256 => sums.checksum_sha256.clone(),
            }
            .unwrap_or_default();
            match expected {
                Expected::Header(v) if *v != computed => return Err(BodyFailure::ChecksumMismatch(*algorithm)),
                Expected::Trailer => {
                    let sent = trailers
                        .as_ref()
                        .and_then(|t| t.get(algorithm.header()))
                        .and_then(|v| v.to_str().ok())
                        .map(|v| v.trim().to_owned());
                    match sent {
                        None => return Err(BodyFailure::MissingTrailer(*algorithm)),
                        Some(v) if v != computed => return Err(BodyFailure::TrailerChecksumMismatch(*algorithm)),
                        Some(_) => {}
                    }
                }
                _ => {}
            }
            verified.insert(algorithm.name().to_owned(), computed);
        }
        self.report.0.lock().unwrap_or_else(|p| p.into_inner()).checksums = verified;
        Ok(())
    }
}

impl Stream for Upload {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        match inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(bytes))) => {
                if let Some(h) = this.hasher.as_mut() {
                    h.update(&bytes);
                }
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.inner = None;
                Poll::Ready(Some(Err(this.report.fail(BodyFailure::classify(e.as_ref())))))
            }
            Poll::Ready(None) => {
                this.inner = None;
                match this.finish() {
                    Ok(()) => Poll::Ready(None),
                    Err(f) => Poll::Ready(Some(Err(this.report.fail(f)))),
                }
            }
        }
    }
}

/// A backend stream as a response body (`s3s` wants `Sync`, the backend only `Send`).
pub fn download(stream: ByteStream) -> StreamingBlob {
    StreamingBlob::wrap(sync_wrapper::SyncStream::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn blob(pieces: &[&'static [u8]]) -> StreamingBlob {
        let items: Vec<Result<Bytes, io::Error>> = pieces.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        StreamingBlob::wrap(futures::stream::iter(items))
    }

    async fn drain(mut s: ByteStream) -> Result<Vec<u8>, io::Error> {
        let mut out = Vec::new();
        while let Some(piece) = s.next().await {
            out.extend_from_slice(&piece?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn header_checksums_are_verified_at_the_end() {
        // CRC32 of "hello world" is 0x0d4a1185.
        let good = base64_of(&[0x0d, 0x4a, 0x11, 0x85]);
        let (up, report) = Upload::new(blob(&[b"hello ", b"world"]), vec![(Algorithm::Crc32, Expected::Header(good.clone()))], None);
        assert_eq!(drain(up.into_stream()).await.expect("body"), b"hello world");
        assert_eq!(report.checksums().get("CRC32"), Some(&good));

        let (up, report) = Upload::new(blob(&[b"hello ", b"world!"]), vec![(Algorithm::Crc32, Expected::Header(good))], None);
        assert!(drain(up.into_stream()).await.is_err());
        assert_eq!(report.failure(), Some(BodyFailure::ChecksumMismatch(Algorithm::Crc32)));
    }

    #[tokio::test]
    async fn requested_algorithms_are_computed() {
        let (up, report) = Upload::new(blob(&[b"abc"]), vec![(Algorithm::Sha256, Expected::Compute)], None);
        drain(up.into_stream()).await.expect("body");
        // SHA-256("abc") = ba7816bf...
        assert_eq!(report.checksums().get("SHA256").map(String::as_str), Some("ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="));
    }

    fn base64_of(b: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(b)
    }
}
