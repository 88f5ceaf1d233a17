//! The `headers` fuzz target: the parsers of request parts that `s3s` makes public and
//! ours, called directly on one string, far faster than through the whole service.
//!
//! `s3s` 0.14 keeps its SigV4 parsing private (`Authorization`, presigned-URL query,
//! `x-amz-date`, canonical request: the `sig_v4` module is not `pub`), and our `auth.rs`
//! parses nothing, so SigV4 canonicalisation is fuzzed only through the `request` target.
//!
//! Input layout: the whole input is one header value or path (inputs that are not UTF-8
//! are ignored: `s3s` takes these as `&str`), given to every parser:
//! - `Range` (`s3s::dto::Range::parse`): a parsed range prints back to itself, and every
//!   satisfiable span of it lies inside the object and is not empty unless the object is;
//! - `x-amz-copy-source` (`s3s::dto::CopySource::parse`): a parsed bucket/key source prints
//!   back to itself, with a non-empty bucket (the key may be empty); an access point or
//!   Outposts ARN (refused by the gateway) only parses without panicking;
//! - the request path, path-style (`s3s::path::parse_path_style_with_validation` with our
//!   bucket-name rules): a bucket it names passes `validate_bucket_name`, a key is not
//!   empty;
//! - the `Host` header (`basalt_s3gw::s3::host::Domains`): a bucket it names is not empty
//!   and stands in front of one of our domains (its name is checked later, by routing);
//! - `If-Match`/`If-None-Match` (`s3s::dto::ETagCondition::parse_http_header`) and HTTP
//!   dates (`If-Modified-Since`): total, and a parsed date prints back to an equal one;
//! - bucket names and keys (`validate_bucket_name`, `validate_key`): what passes keeps S3's
//!   limits.

use basalt_s3gw::s3::host::Domains;
use basalt_s3gw::s3::names::{validate_bucket_name, validate_key, BucketNames, MAX_KEY_BYTES};
use s3s::dto::{CopySource, ETagCondition, Range, Timestamp, TimestampFormat};
use s3s::path::S3Path;

/// Object sizes each parsed range is checked against.
const SIZES: [u64; 6] = [0, 1, 2, 20, 1 << 40, u64::MAX];

pub fn headers(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    range(s);
    copy_source(s);
    path(s);
    host(s);
    let _ = ETagCondition::parse_http_header(data);
    http_date(s);
    names(s);
}

fn range(s: &str) {
    let Ok(r) = Range::parse(s) else { return };
    let printed = r.to_header_string();
    assert_eq!(Range::parse(&printed).ok(), Some(r), "{s:?} printed as {printed:?}");
    for size in SIZES {
        if let Ok(span) = r.check(size) {
            // An empty object satisfies a suffix range with an empty span (RFC 9110), so
            // callers must not take `span.end - 1` blindly; any other span has a byte.
            assert!(span.start <= span.end && span.end <= size, "{r:?} on {size} bytes gave {span:?}");
            assert!(size == 0 || span.start < span.end, "{r:?} on {size} bytes gave {span:?}");
        }
    }
}

fn copy_source(s: &str) {
    let Ok(source) = CopySource::parse(s) else { return };
    // The key may be empty (`bucket/`): s3s leaves that to the operation, which refuses
    // it (the `request` corpus has this case).
    match &source {
        CopySource::Bucket { bucket, .. } => assert!(!bucket.is_empty(), "{s:?} parsed as {source:?}"),
        // Access point and Outposts ARNs are refused by the gateway (NotImplemented), so
        // only parsing them must be safe. s3s 0.14 percent-decodes the whole ARN but
        // re-encodes only the key when printing, so one with `%` in its region does not
        // print back to itself.
        CopySource::AccessPoint { .. } | CopySource::Outpost { .. } => return,
    }
    let printed = source.format_to_string();
    assert_eq!(CopySource::parse(&printed).ok(), Some(source), "{s:?} printed as {printed:?}");
}

fn path(s: &str) {
    let Ok(parsed) = s3s::path::parse_path_style_with_validation(s, &BucketNames) else { return };
    match &parsed {
        S3Path::Root => {}
        S3Path::Bucket { bucket } => assert!(validate_bucket_name(bucket).is_ok(), "{s:?} parsed as {parsed:?}"),
        S3Path::Object { bucket, key } => {
            assert!(validate_bucket_name(bucket).is_ok(), "{s:?} parsed as {parsed:?}");
            assert!(!key.is_empty(), "{s:?} parsed as {parsed:?}");
        }
    }
}

fn host(s: &str) {
    let domains = Domains::new(&["s3.basalt.test".to_owned(), "localhost".to_owned()]);
    let Some(bucket) = domains.bucket_of(s) else { return };
    let name = s.to_ascii_lowercase();
    assert!(!bucket.is_empty(), "{s:?} names an empty bucket");
    assert!(
        ["s3.basalt.test", "localhost"].iter().any(|d| name.starts_with(&format!("{bucket}.{d}"))),
        "{s:?} names bucket {bucket:?}, not in front of a domain"
    );
}

fn http_date(s: &str) {
    let Ok(t) = Timestamp::parse(TimestampFormat::HttpDate, s) else { return };
    let mut printed = Vec::new();
    t.format(TimestampFormat::HttpDate, &mut printed).expect("a parsed date prints");
    let printed = String::from_utf8(printed).expect("a printed date is UTF-8");
    let again = Timestamp::parse(TimestampFormat::HttpDate, &printed).expect("a printed date parses");
    assert_eq!(again, t, "{s:?} printed as {printed:?}");
}

fn names(s: &str) {
    if validate_bucket_name(s).is_ok() {
        assert!((3..=63).contains(&s.len()), "bucket name {s:?} accepted");
        assert!(!s.contains("..") && !s.contains('/') && !s.contains('%'), "bucket name {s:?} accepted");
    }
    if validate_key(s).is_ok() {
        assert!(!s.is_empty() && s.len() <= MAX_KEY_BYTES, "key of {} bytes accepted", s.len());
    }
}
