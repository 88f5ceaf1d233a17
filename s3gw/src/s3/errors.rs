//! The one place where store errors become S3 error codes and HTTP statuses.

use crate::backend::Error;
use http::StatusCode;
use s3s::{S3Error, S3ErrorCode};

/// S3's answer to `e`: its code, status and a message for the client. Internal errors are
/// logged here, where they are handled.
pub fn to_s3(e: Error) -> S3Error {
    use S3ErrorCode as C;
    let (code, status) = match &e {
        Error::NoSuchBucket(_) => (C::NoSuchBucket, StatusCode::NOT_FOUND),
        Error::NoSuchKey => (C::NoSuchKey, StatusCode::NOT_FOUND),
        Error::BucketAlreadyExists(_) => (C::BucketAlreadyExists, StatusCode::CONFLICT),
        Error::BucketAlreadyOwnedByYou(_) => (C::BucketAlreadyOwnedByYou, StatusCode::CONFLICT),
        Error::BucketNotEmpty(_) => (C::BucketNotEmpty, StatusCode::CONFLICT),
        Error::InvalidBucketName(..) => (C::InvalidBucketName, StatusCode::BAD_REQUEST),
        Error::KeyTooLong => (C::KeyTooLongError, StatusCode::BAD_REQUEST),
        Error::BadDigest => (C::BadDigest, StatusCode::BAD_REQUEST),
        Error::IncompleteBody => (C::IncompleteBody, StatusCode::BAD_REQUEST),
        Error::InvalidRange => (C::InvalidRange, StatusCode::RANGE_NOT_SATISFIABLE),
        Error::NoSuchVersion => (C::NoSuchVersion, StatusCode::NOT_FOUND),
        Error::MethodNotAllowed => (C::MethodNotAllowed, StatusCode::METHOD_NOT_ALLOWED),
        Error::NoSuchUpload => (C::NoSuchUpload, StatusCode::NOT_FOUND),
        Error::InvalidPart(_) => (C::InvalidPart, StatusCode::BAD_REQUEST),
        Error::InvalidPartOrder => (C::InvalidPartOrder, StatusCode::BAD_REQUEST),
        Error::EntityTooSmall(_) => (C::EntityTooSmall, StatusCode::BAD_REQUEST),
        Error::InvalidArgument(_) => (C::InvalidArgument, StatusCode::BAD_REQUEST),
        // S3 has no code of its own for bucket quotas; Ceph RGW and MinIO clients know this one.
        Error::QuotaExceeded => (C::Custom("QuotaExceeded".into()), StatusCode::FORBIDDEN),
        Error::AccessDenied => (C::AccessDenied, StatusCode::FORBIDDEN),
        // The body stream failed before the store had all of it: the client went away or
        // sent less than it announced.
        Error::Body(_) => (C::IncompleteBody, StatusCode::BAD_REQUEST),
        Error::Unavailable(_) => (C::ServiceUnavailable, StatusCode::SERVICE_UNAVAILABLE),
        Error::Internal(_) => (C::InternalError, StatusCode::INTERNAL_SERVER_ERROR),
        Error::NotImplemented(_) => (C::NotImplemented, StatusCode::NOT_IMPLEMENTED),
    };
    let message = match &e {
        Error::Internal(msg) => {
            tracing::error!(error = %msg, "internal error");
            "We encountered an internal error. Please try again.".to_owned()
        }
        Error::Unavailable(msg) => {
            tracing::warn!(error = %msg, "storage unavailable");
            "Please reduce your request rate.".to_owned()
        }
        other => other.to_string(),
    };
    with_status(code, status, message)
}

/// An error with an explicit status (custom codes have none of their own in `s3s`).
pub fn with_status(code: S3ErrorCode, status: StatusCode, message: impl Into<String>) -> S3Error {
    let mut err = S3Error::with_message(code, message.into());
    err.set_status_code(status);
    err
}

pub fn invalid_argument(message: impl Into<String>) -> S3Error {
    with_status(S3ErrorCode::InvalidArgument, StatusCode::BAD_REQUEST, message)
}

pub fn not_implemented(message: impl Into<String>) -> S3Error {
    with_status(S3ErrorCode::NotImplemented, StatusCode::NOT_IMPLEMENTED, message)
}

pub fn access_denied() -> S3Error {
    with_status(S3ErrorCode::AccessDenied, StatusCode::FORBIDDEN, "Access Denied")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_store_error_has_its_s3_code_and_status() {
        let cases: Vec<(Error, &str, u16)> = vec![
            (Error::NoSuchBucket("b".into()), "NoSuchBucket", 404),
            (Error::NoSuchKey, "NoSuchKey", 404),
            (Error::BucketAlreadyExists("b".into()), "BucketAlreadyExists", 409),
            (Error::BucketAlreadyOwnedByYou("b".into()), "BucketAlreadyOwnedByYou", 409),
            (Error::BucketNotEmpty("b".into()), "BucketNotEmpty", 409),
            (Error::InvalidBucketName("B".into(), "why"), "InvalidBucketName", 400),
            (Error::KeyTooLong, "KeyTooLongError", 400),
            (Error::BadDigest, "BadDigest", 400),
            (Error::IncompleteBody, "IncompleteBody", 400),
            (Error::InvalidRange, "InvalidRange", 416),
            (Error::NoSuchVersion, "NoSuchVersion", 404),
            (Error::MethodNotAllowed, "MethodNotAllowed", 405),
            (Error::NoSuchUpload, "NoSuchUpload", 404),
            (Error::InvalidPart(3), "InvalidPart", 400),
            (Error::InvalidPartOrder, "InvalidPartOrder", 400),
            (Error::EntityTooSmall(1), "EntityTooSmall", 400),
            (Error::InvalidArgument("x".into()), "InvalidArgument", 400),
            (Error::QuotaExceeded, "QuotaExceeded", 403),
            (Error::AccessDenied, "AccessDenied", 403),
            (Error::Body(std::io::Error::other("reset")), "IncompleteBody", 400),
            (Error::Unavailable("no leader".into()), "ServiceUnavailable", 503),
            (Error::Internal("boom".into()), "InternalError", 500),
            (Error::NotImplemented("versioning"), "NotImplemented", 501),
        ];
        for (e, code, status) in cases {
            let s3 = to_s3(e);
            assert_eq!(s3.code().as_str(), code);
            assert_eq!(s3.status_code().map(|s| s.as_u16()), Some(status), "{code}");
        }
    }

    #[test]
    fn internal_details_stay_in_the_log() {
        let s3 = to_s3(Error::Internal("disk /dev/sdb failed".into()));
        assert!(!s3.message().unwrap_or_default().contains("sdb"));
    }
}
