//! Object tags: the `x-amz-tagging` header (PutObject, CreateMultipartUpload, CopyObject)
//! and the `Tagging` XML of the `?tagging` operations, checked as S3 checks them.

use super::errors::with_status;
use crate::backend::{MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE};
use http::StatusCode;
use s3s::dto;
use s3s::{S3Error, S3ErrorCode, S3Result};

fn invalid_tag(message: impl Into<String>) -> S3Error {
    with_status(S3ErrorCode::InvalidTag, StatusCode::BAD_REQUEST, message)
}

/// The tags of an `x-amz-tagging` header: URL query parameters (`k1=v1&k2=v2`, `+` and
/// `%20` for spaces). No header, or an empty one, is no tags.
pub fn from_header(header: Option<&str>) -> S3Result<Vec<(String, String)>> {
    let Some(header) = header.filter(|h| !h.is_empty()) else {
        return Ok(Vec::new());
    };
    let tags: Vec<(String, String)> =
        form_urlencoded::parse(header.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    check(&tags)?;
    Ok(tags)
}

/// The tags of a `Tagging` document, in its order.
pub fn from_xml(tagging: dto::Tagging) -> S3Result<Vec<(String, String)>> {
    let tags = tagging
        .tag_set
        .into_iter()
        .map(|t| match t.key {
            Some(k) => Ok((k, t.value.unwrap_or_default())),
            None => Err(invalid_tag("A tag must have a Key")),
        })
        .collect::<S3Result<Vec<_>>>()?;
    check(&tags)?;
    Ok(tags)
}

/// The `TagSet` S3 answers with.
pub fn tag_set(tags: &[(String, String)]) -> dto::TagSet {
    tags.iter().map(|(k, v)| dto::Tag { key: Some(k.clone()), value: Some(v.clone()) }).collect()
}

/// S3's limits: at most 10 tags with distinct keys, keys of 1 to 128 characters not starting
/// with `aws:`, values of at most 256; no control characters.
fn check(tags: &[(String, String)]) -> S3Result<()> {
    if tags.len() > MAX_TAGS {
        return Err(invalid_tag(format!("Object tags cannot be greater than {MAX_TAGS}")));
    }
    for (i, (k, v)) in tags.iter().enumerate() {
        if k.is_empty() || k.chars().count() > MAX_TAG_KEY {
            return Err(invalid_tag(format!("The TagKey you have provided is invalid: keys are 1 to {MAX_TAG_KEY} characters")));
        }
        if v.chars().count() > MAX_TAG_VALUE {
            return Err(invalid_tag(format!("The TagValue you have provided is too long: at most {MAX_TAG_VALUE} characters")));
        }
        if k.chars().chain(v.chars()).any(char::is_control) {
            return Err(invalid_tag("Tag keys and values may not hold control characters"));
        }
        if k.starts_with("aws:") {
            return Err(invalid_tag("Your TagKey cannot be prefixed with aws:"));
        }
        if tags[..i].iter().any(|(other, _)| other == k) {
            return Err(invalid_tag("Cannot provide multiple Tags with the same key"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: S3Result<Vec<(String, String)>>) -> String {
        r.err().map(|e| e.code().as_str().to_owned()).unwrap_or_default()
    }

    #[test]
    fn header_tags_are_query_parameters() {
        let tags = from_header(Some("Hello=World&foo=bar&empty=&sp=a+b%20c&%F0%9F%A6%80=crab")).expect("valid");
        let want: Vec<(String, String)> = [("Hello", "World"), ("foo", "bar"), ("empty", ""), ("sp", "a b c"), ("🦀", "crab")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(tags, want);
        assert!(from_header(None).expect("none").is_empty());
        assert!(from_header(Some("")).expect("empty").is_empty());
    }

    #[test]
    fn limits_are_s3s() {
        let n = |count: usize| (0..count).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join("&");
        assert_eq!(from_header(Some(&n(10))).map(|t| t.len()).ok(), Some(10));
        assert_eq!(code(from_header(Some(&n(11)))), "InvalidTag");
        let key = |len: usize| "k".repeat(len);
        assert!(from_header(Some(&format!("{}={}", key(128), "v".repeat(256)))).is_ok());
        assert_eq!(code(from_header(Some(&format!("{}=v", key(129))))), "InvalidTag");
        assert_eq!(code(from_header(Some(&format!("k={}", "v".repeat(257))))), "InvalidTag");
        // Characters, not bytes: 128 two-byte characters are a valid key.
        assert!(from_header(Some(&format!("{}=v", "é".repeat(128)))).is_ok());
        assert_eq!(code(from_header(Some("a=1&a=2"))), "InvalidTag");
        assert_eq!(code(from_header(Some("aws:x=1"))), "InvalidTag");
        assert_eq!(code(from_header(Some("=v"))), "InvalidTag");
        assert_eq!(code(from_header(Some("k=%00"))), "InvalidTag");
    }

    #[test]
    fn xml_tags_keep_their_order() {
        let tagging = dto::Tagging {
            tag_set: vec![
                dto::Tag { key: Some("z".into()), value: Some("1".into()) },
                dto::Tag { key: Some("a".into()), value: None },
            ],
        };
        let tags = from_xml(tagging).expect("valid");
        assert_eq!(tags, vec![("z".to_string(), "1".to_string()), ("a".to_string(), String::new())]);
        assert_eq!(tag_set(&tags).len(), 2);
        let keyless = dto::Tagging { tag_set: vec![dto::Tag { key: None, value: Some("1".into()) }] };
        assert_eq!(code(from_xml(keyless)), "InvalidTag");
    }
}
