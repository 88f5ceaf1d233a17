//! Conditional requests (`If-Match`, `If-None-Match`, `If-Modified-Since`,
//! `If-Unmodified-Since` and their `x-amz-copy-source-` forms) with S3's precedence:
//! `If-Match` that holds makes `If-Unmodified-Since` irrelevant, `If-None-Match` that is
//! present decides alone over `If-Modified-Since`, and failed preconditions (412) win over
//! "not modified" (304).

use crate::backend::ObjectInfo;
use s3s::dto::{ETagCondition, Timestamp};

#[derive(Clone, Copy, Debug, Default)]
pub struct Conditions<'a> {
    pub if_match: Option<&'a ETagCondition>,
    pub if_none_match: Option<&'a ETagCondition>,
    pub if_modified_since: Option<&'a Timestamp>,
    pub if_unmodified_since: Option<&'a Timestamp>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Proceed,
    /// 304 for GET and HEAD (412 for a copy source).
    NotModified,
    /// 412.
    PreconditionFailed,
}

fn seconds(t: &Timestamp) -> i64 {
    time::OffsetDateTime::from(t.clone()).unix_timestamp()
}

/// HTTP dates have whole seconds: an object is "modified since" a date when its
/// Last-Modified, truncated to the second, is later.
fn modified_secs(info: &ObjectInfo) -> i64 {
    i64::try_from(info.last_modified_ms / 1000).unwrap_or(i64::MAX)
}

fn matches(cond: &ETagCondition, info: &ObjectInfo, strong: bool) -> bool {
    match cond {
        ETagCondition::Any => true,
        ETagCondition::ETag(tag) => {
            (!strong || tag.as_strong().is_some()) && tag.value().trim_matches('"') == info.etag.as_str()
        }
    }
}

impl Conditions<'_> {
    pub fn is_empty(&self) -> bool {
        self.if_match.is_none()
            && self.if_none_match.is_none()
            && self.if_modified_since.is_none()
            && self.if_unmodified_since.is_none()
    }

    pub fn evaluate(&self, info: &ObjectInfo) -> Outcome {
        let modified = modified_secs(info);
        match self.if_match {
            Some(c) if !matches(c, info, true) => return Outcome::PreconditionFailed,
            Some(_) => {}
            None => {
                if self.if_unmodified_since.is_some_and(|t| modified > seconds(t)) {
                    return Outcome::PreconditionFailed;
                }
            }
        }
        match self.if_none_match {
            Some(c) if matches(c, info, false) => return Outcome::NotModified,
            Some(_) => {}
            None => {
                if self.if_modified_since.is_some_and(|t| modified <= seconds(t)) {
                    return Outcome::NotModified;
                }
            }
        }
        Outcome::Proceed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use s3s::dto::ETag;

    fn info() -> ObjectInfo {
        ObjectInfo { etag: "abc".into(), last_modified_ms: 1_000_500, ..Default::default() }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from(time::OffsetDateTime::from_unix_timestamp(secs).expect("valid time"))
    }

    fn tag(s: &str) -> ETagCondition {
        ETagCondition::ETag(ETag::Strong(s.into()))
    }

    #[test]
    fn precedence_follows_s3() {
        let same = tag("abc");
        let other = tag("xyz");
        let (before, at_mod, after) = (at(999), at(1000), at(1001));
        let c = |m, n, ms, us| Conditions { if_match: m, if_none_match: n, if_modified_since: ms, if_unmodified_since: us };
        assert_eq!(c(None, None, None, None).evaluate(&info()), Outcome::Proceed);
        assert_eq!(c(Some(&same), None, None, None).evaluate(&info()), Outcome::Proceed);
        assert_eq!(c(Some(&other), None, None, None).evaluate(&info()), Outcome::PreconditionFailed);
        assert_eq!(c(Some(&ETagCondition::Any), None, None, None).evaluate(&info()), Outcome::Proceed);
        // If-Match holds: If-Unmodified-Since that fails is ignored.
        assert_eq!(c(Some(&same), None, None, Some(&before)).evaluate(&info()), Outcome::Proceed);
        assert_eq!(c(None, None, None, Some(&before)).evaluate(&info()), Outcome::PreconditionFailed);
        assert_eq!(c(None, None, None, Some(&at_mod)).evaluate(&info()), Outcome::Proceed);
        assert_eq!(c(None, Some(&same), None, None).evaluate(&info()), Outcome::NotModified);
        assert_eq!(c(None, Some(&other), None, None).evaluate(&info()), Outcome::Proceed);
        // If-None-Match present decides alone.
        assert_eq!(c(None, Some(&other), Some(&after), None).evaluate(&info()), Outcome::Proceed);
        assert_eq!(c(None, Some(&same), Some(&before), None).evaluate(&info()), Outcome::NotModified);
        assert_eq!(c(None, None, Some(&at_mod), None).evaluate(&info()), Outcome::NotModified);
        assert_eq!(c(None, None, Some(&before), None).evaluate(&info()), Outcome::Proceed);
        // 412 wins over 304.
        assert_eq!(c(Some(&other), Some(&same), None, None).evaluate(&info()), Outcome::PreconditionFailed);
        // A weak tag never satisfies If-Match, but does If-None-Match.
        let weak = ETagCondition::ETag(ETag::Weak("abc".into()));
        assert_eq!(c(Some(&weak), None, None, None).evaluate(&info()), Outcome::PreconditionFailed);
        assert_eq!(c(None, Some(&weak), None, None).evaluate(&info()), Outcome::NotModified);
    }
}
