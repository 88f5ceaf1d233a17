//! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/`) through the code the
//! cargo-fuzz targets run (included from `fuzz/src/`), so every test run on stable checks
//! the same invariants on the seeds and on every input fuzzing ever kept.

#[path = "../fuzz/src/headers.rs"]
mod headers;
#[path = "../fuzz/src/request.rs"]
mod request;

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    // The runtime value first: cargo and nextest set it for the test process, and a binary
    // reused from a build cache made in another checkout would carry that checkout's path.
    let root = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let dir = root.join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 12, "{target}: corpus has {} files, expected the seeds", files.len());
    for f in files {
        let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        // Name the input on failure: the panic message alone does not say which file.
        if let Err(e) = std::panic::catch_unwind(|| run(&data)) {
            eprintln!("corpus input {} failed", f.display());
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn request_corpus_gets_s3_answers_and_never_bobs_data() {
    replay("request", request::request);
}

#[test]
fn headers_corpus_parses_within_s3_limits() {
    replay("headers", headers::headers);
}

/// The harness itself works: signed seeds get past authentication and alice's requests
/// reach her data, while bob's stay refused (else the fuzzer would only ever see 403s).
#[test]
fn request_seeds_reach_past_authentication() {
    let seed = |name: &str| {
        let root = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
        let path = root.join("fuzz/corpus/request").join(name);
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        request::status(&data)
    };
    for (name, status) in [
        ("get-object", 200),
        ("presigned-get", 200),
        ("put-object-md5", 200),
        ("list-v2-delimiter", 200),
        ("virtual-host-get", 200),
        ("key-1024-bytes-get", 200),
        ("key-literal-percent", 200),
        // s3s decodes `%2F` before canonicalising the path, so a client that signs the
        // path as sent (aws-sigv4, S3's own rule) never matches: refused, not misrouted.
        ("key-encoded-slash", 403),
        ("range-unsatisfiable", 416),
        // Every range of an empty object (s3s answers a suffix range of one with 0..0).
        ("crash-empty-object-suffix-range", 416),
        ("empty-object-head-range", 416),
        ("streaming-unsigned-trailer", 200),
        ("key-1100-bytes", 400),
        ("get-bob-object", 403),
        ("list-bob-bucket", 403),
        ("copy-from-bob", 403),
        // s3s accepts `x-amz-copy-source: bucket/`; the gateway refuses the empty key.
        ("copy-source-empty-key", 400),
        ("raw-authorization-garbage", 403),
        ("raw-anonymous", 403),
        ("put-policy-public", 204),
        ("put-policy-condition", 501),
        ("put-policy-bob-bucket", 403),
        ("raw-anonymous-chunked", 400),
        ("get-bucket-acl", 200),
        ("get-part-number", 400),
        ("get-part-number-one", 200),
        ("get-part-number-beyond", 400),
        // Bodies s3s reads whole, checked against the signed hash and Content-Length by the
        // gateway (s3s answered 500).
        ("delete-objects-sha256-mismatch", 400),
        ("put-tagging-sha256-mismatch", 400),
        ("regress-delete-objects-shorter-than-content-length", 400),
        ("regress-put-tagging-empty-body-sha256-mismatch", 400),
        // If-None-Match: * on an existing object: 304, without s3s's error XML.
        ("regress-get-if-none-match-star-304", 304),
        ("put-tagging", 200),
        ("put-tagging-duplicate-key", 400),
        // `%ZZ` stays as it is and `b` is a key with an empty value, as URL forms go.
        ("put-object-tagging-header", 200),
        ("get-bob-tagging", 403),
        ("put-bob-tagging", 403),
    ] {
        assert_eq!(seed(name), Some(status), "seed {name}");
    }
}

/// The leak check is not vacuous: an answer carrying bob's token fails it.
#[test]
#[should_panic(expected = "bob's data in the answer")]
fn an_answer_with_bobs_data_fails_the_invariants() {
    let (parts, ()) = http::Response::builder().status(200).body(()).expect("response").into_parts();
    request::check_answer(&http::Method::GET, &parts, b"<Key>key-BOBSECRET42</Key>", "BOBSECRET42");
}
