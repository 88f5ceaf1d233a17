//! Bucket-name rules (the protocol layer refuses bad names before any backend call, for
//! routing as well as for CreateBucket) and key limits.

use crate::backend::Error;

/// S3's limit on the UTF-8 length of an object key.
pub const MAX_KEY_BYTES: usize = 1024;

/// Checks `name` against S3's rules for general-purpose buckets: 3 to 63 characters of
/// lowercase letters, digits, dots and hyphens; a letter or digit at both ends; no two
/// adjacent dots; not shaped like an IPv4 address; none of the prefixes and suffixes AWS
/// reserves.
pub fn validate_bucket_name(name: &str) -> Result<(), Error> {
    let bad = |why: &'static str| Err(Error::InvalidBucketName(name.to_owned(), why));
    if name.len() < 3 || name.len() > 63 {
        return bad("must be 3 to 63 characters long");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-') {
        return bad("may hold only lowercase letters, digits, dots and hyphens");
    }
    let alnum = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !alnum(name.as_bytes().first()) || !alnum(name.as_bytes().last()) {
        return bad("must begin and end with a letter or digit");
    }
    if name.contains("..") {
        return bad("must not hold two adjacent dots");
    }
    if looks_like_ipv4(name) {
        return bad("must not be formatted as an IP address");
    }
    for prefix in ["xn--", "sthree-", "amzn-s3-demo-"] {
        if name.starts_with(prefix) {
            return bad("starts with a reserved prefix");
        }
    }
    for suffix in ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"] {
        if name.ends_with(suffix) {
            return bad("ends with a reserved suffix");
        }
    }
    Ok(())
}

/// Four dot-separated groups of 1 to 3 digits (S3 refuses these whether or not each group
/// is below 256).
fn looks_like_ipv4(name: &str) -> bool {
    let groups: Vec<&str> = name.split('.').collect();
    groups.len() == 4 && groups.iter().all(|g| (1..=3).contains(&g.len()) && g.bytes().all(|b| b.is_ascii_digit()))
}

/// [`validate_bucket_name`] as `s3s` routing uses it, so a request naming a bad bucket is
/// answered `InvalidBucketName` before it reaches the gateway.
#[derive(Debug, Default, Clone, Copy)]
pub struct BucketNames;

impl s3s::validation::NameValidation for BucketNames {
    fn validate_bucket_name(&self, name: &str) -> bool {
        validate_bucket_name(name).is_ok()
    }
}

/// Keys S3 accepts: at most [`MAX_KEY_BYTES`] bytes, not empty.
pub fn validate_key(key: &str) -> Result<(), Error> {
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::KeyTooLong);
    }
    if key.is_empty() {
        return Err(Error::InvalidArgument("the key must not be empty".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_follow_s3_rules() {
        for ok in ["abc", "my-bucket", "my.bucket.1", "a1-b2", "0abc", &"a".repeat(63), "1.2.3", "1.2.3.4.5"] {
            assert!(validate_bucket_name(ok).is_ok(), "{ok} should be valid");
        }
        for bad in [
            "ab",
            &"a".repeat(64),
            "MyBucket",
            "my_bucket",
            "-abc",
            "abc-",
            ".abc",
            "abc.",
            "a..b",
            "192.168.1.1",
            "999.999.999.999",
            "xn--abc",
            "sthree-abc",
            "abc-s3alias",
            "abc--ol-s3",
            "a b",
            "ünï",
        ] {
            assert!(
                matches!(validate_bucket_name(bad), Err(Error::InvalidBucketName(..))),
                "{bad} should be invalid"
            );
        }
    }

    #[test]
    fn keys_are_limited_to_1024_bytes() {
        assert!(validate_key(&"k".repeat(1024)).is_ok());
        assert!(matches!(validate_key(&"k".repeat(1025)), Err(Error::KeyTooLong)));
        // 512 two-byte characters are 1024 bytes; one more is too long.
        assert!(validate_key(&"é".repeat(512)).is_ok());
        assert!(matches!(validate_key(&"é".repeat(513)), Err(Error::KeyTooLong)));
        assert!(validate_key("").is_err());
    }
}
