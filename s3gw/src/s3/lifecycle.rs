//! Bucket lifecycle over HTTP: Put/Get/DeleteBucketLifecycleConfiguration mapped to the
//! store's [`LifecycleRule`]s. What the store cannot do — transitions to other storage
//! classes, expiration on a date, tag and object-size filters, keeping a number of newer
//! noncurrent versions — is refused (`NotImplemented`), never silently dropped.

use super::errors::{invalid_argument, not_implemented, to_s3, with_status};
use super::{requester, Gateway};
use crate::backend::{Backend, LifecycleRule};
use http::StatusCode;
use s3s::dto;
use s3s::{S3ErrorCode, S3Request, S3Response, S3Result};

/// S3's limit on the rules of one configuration.
pub const MAX_RULES: usize = 1000;

fn malformed(message: &str) -> s3s::S3Error {
    with_status(S3ErrorCode::MalformedXML, StatusCode::BAD_REQUEST, message.to_owned())
}

fn days(d: i32, what: &str) -> S3Result<u32> {
    u32::try_from(d)
        .ok()
        .filter(|d| *d > 0)
        .ok_or_else(|| invalid_argument(format!("'{what}' in a lifecycle rule must be a positive integer")))
}

/// One S3 rule as the store keeps it (`n`: its place, for the id S3 makes up when the
/// client gives none).
fn to_rule(r: dto::LifecycleRule, n: usize) -> S3Result<LifecycleRule> {
    if r.transitions.as_ref().is_some_and(|t| !t.is_empty())
        || r.noncurrent_version_transitions.as_ref().is_some_and(|t| !t.is_empty())
    {
        return Err(not_implemented("lifecycle transitions are not supported: this store has one storage class"));
    }
    let prefix = match (r.prefix, r.filter) {
        (Some(_), Some(_)) => return Err(malformed("A lifecycle rule may have a Prefix or a Filter, not both")),
        (Some(p), None) => p,
        (None, None) => String::new(),
        (None, Some(f)) => {
            if f.tag.is_some() {
                return Err(not_implemented("lifecycle rules filtered by tag are not supported"));
            }
            if f.object_size_greater_than.is_some() || f.object_size_less_than.is_some() {
                return Err(not_implemented("lifecycle rules filtered by object size are not supported"));
            }
            match f.and {
                Some(and) => {
                    if and.tags.as_ref().is_some_and(|t| !t.is_empty()) {
                        return Err(not_implemented("lifecycle rules filtered by tag are not supported"));
                    }
                    if and.object_size_greater_than.is_some() || and.object_size_less_than.is_some() {
                        return Err(not_implemented("lifecycle rules filtered by object size are not supported"));
                    }
                    if f.prefix.is_some() {
                        return Err(malformed("A lifecycle filter may have a Prefix or an And, not both"));
                    }
                    and.prefix.unwrap_or_default()
                }
                None => f.prefix.unwrap_or_default(),
            }
        }
    };
    let enabled = match r.status.as_str() {
        dto::ExpirationStatus::ENABLED => true,
        dto::ExpirationStatus::DISABLED => false,
        other => return Err(malformed(&format!("Unknown lifecycle rule status {other:?}"))),
    };
    let mut rule = LifecycleRule { id: r.id.unwrap_or_default(), enabled, prefix, ..Default::default() };
    if rule.id.is_empty() {
        rule.id = format!("rule-{}", n + 1);
    }
    if rule.id.len() > 255 {
        return Err(invalid_argument("The ID of a lifecycle rule is at most 255 characters long"));
    }
    if let Some(e) = r.expiration {
        if e.date.is_some() {
            return Err(not_implemented("lifecycle expiration on a date is not supported; use Days"));
        }
        let marker = e.expired_object_delete_marker.unwrap_or(false);
        if let Some(d) = e.days {
            if marker {
                return Err(invalid_argument(
                    "ExpiredObjectDeleteMarker cannot be specified with Days or Date in a Lifecycle Expiration Policy",
                ));
            }
            rule.expiration_days = Some(days(d, "Days")?);
        }
        rule.expired_delete_markers = marker;
    }
    if let Some(nc) = r.noncurrent_version_expiration {
        if nc.newer_noncurrent_versions.is_some() {
            return Err(not_implemented("NewerNoncurrentVersions is not supported"));
        }
        let d = nc.noncurrent_days.ok_or_else(|| malformed("NoncurrentVersionExpiration needs NoncurrentDays"))?;
        rule.noncurrent_days = Some(days(d, "NoncurrentDays")?);
    }
    if let Some(a) = r.abort_incomplete_multipart_upload {
        let d = a.days_after_initiation.ok_or_else(|| malformed("AbortIncompleteMultipartUpload needs DaysAfterInitiation"))?;
        rule.abort_multipart_days = Some(days(d, "DaysAfterInitiation")?);
    }
    if rule.expiration_days.is_none()
        && rule.noncurrent_days.is_none()
        && rule.abort_multipart_days.is_none()
        && !rule.expired_delete_markers
    {
        return Err(invalid_argument("At least one action needs to be specified in a rule"));
    }
    Ok(rule)
}

fn to_dto(r: LifecycleRule) -> dto::LifecycleRule {
    let status = if r.enabled { dto::ExpirationStatus::ENABLED } else { dto::ExpirationStatus::DISABLED };
    let expiration = (r.expiration_days.is_some() || r.expired_delete_markers).then(|| dto::LifecycleExpiration {
        days: r.expiration_days.map(|d| i32::try_from(d).unwrap_or(i32::MAX)),
        expired_object_delete_marker: r.expired_delete_markers.then_some(true),
        date: None,
    });
    dto::LifecycleRule {
        id: Some(r.id),
        status: dto::ExpirationStatus::from_static(status),
        filter: Some(dto::LifecycleRuleFilter { prefix: Some(r.prefix), ..Default::default() }),
        expiration,
        noncurrent_version_expiration: r.noncurrent_days.map(|d| dto::NoncurrentVersionExpiration {
            noncurrent_days: Some(i32::try_from(d).unwrap_or(i32::MAX)),
            newer_noncurrent_versions: None,
        }),
        abort_incomplete_multipart_upload: r.abort_multipart_days.map(|d| dto::AbortIncompleteMultipartUpload {
            days_after_initiation: Some(i32::try_from(d).unwrap_or(i32::MAX)),
        }),
        prefix: None,
        transitions: None,
        noncurrent_version_transitions: None,
    }
}

/// A configuration's rules as the store keeps them, checked as S3 checks them.
pub fn rules_of(config: dto::BucketLifecycleConfiguration) -> S3Result<Vec<LifecycleRule>> {
    if config.rules.is_empty() {
        return Err(malformed("A lifecycle configuration needs at least one rule"));
    }
    if config.rules.len() > MAX_RULES {
        return Err(invalid_argument(format!("A lifecycle configuration has at most {MAX_RULES} rules")));
    }
    let rules = config.rules.into_iter().enumerate().map(|(n, r)| to_rule(r, n)).collect::<S3Result<Vec<_>>>()?;
    let mut ids: Vec<&str> = rules.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err(invalid_argument("Rule ID must be unique. Found same ID for more than one rule"));
    }
    Ok(rules)
}

impl<B: Backend> Gateway<B> {
    pub(super) async fn put_lifecycle(
        &self,
        req: S3Request<dto::PutBucketLifecycleConfigurationInput>,
    ) -> S3Result<S3Response<dto::PutBucketLifecycleConfigurationOutput>> {
        let caller = requester(&req);
        let input = req.input;
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:PutLifecycleConfiguration", None).await?;
        let config = input.lifecycle_configuration.ok_or_else(|| malformed("A lifecycle configuration is required"))?;
        let rules = rules_of(config)?;
        self.backend.set_lifecycle(&input.bucket, rules).await.map_err(to_s3)?;
        Ok(S3Response::new(dto::PutBucketLifecycleConfigurationOutput::default()))
    }

    pub(super) async fn get_lifecycle(
        &self,
        req: S3Request<dto::GetBucketLifecycleConfigurationInput>,
    ) -> S3Result<S3Response<dto::GetBucketLifecycleConfigurationOutput>> {
        let caller = requester(&req);
        let input = req.input;
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:GetLifecycleConfiguration", None).await?;
        let rules = self.backend.lifecycle(&input.bucket).await.map_err(to_s3)?;
        if rules.is_empty() {
            return Err(with_status(
                S3ErrorCode::NoSuchLifecycleConfiguration,
                StatusCode::NOT_FOUND,
                "The lifecycle configuration does not exist",
            ));
        }
        Ok(S3Response::new(dto::GetBucketLifecycleConfigurationOutput {
            rules: Some(rules.into_iter().map(to_dto).collect()),
            transition_default_minimum_object_size: None,
        }))
    }

    pub(super) async fn delete_lifecycle(
        &self,
        req: S3Request<dto::DeleteBucketLifecycleInput>,
    ) -> S3Result<S3Response<dto::DeleteBucketLifecycleOutput>> {
        let caller = requester(&req);
        let input = req.input;
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:PutLifecycleConfiguration", None).await?;
        self.backend.set_lifecycle(&input.bucket, Vec::new()).await.map_err(to_s3)?;
        Ok(S3Response::new(dto::DeleteBucketLifecycleOutput::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(f: impl FnOnce(&mut dto::LifecycleRule)) -> dto::LifecycleRule {
        let mut r = dto::LifecycleRule {
            abort_incomplete_multipart_upload: None,
            expiration: Some(dto::LifecycleExpiration { days: Some(3), ..Default::default() }),
            filter: Some(dto::LifecycleRuleFilter { prefix: Some("logs/".into()), ..Default::default() }),
            id: Some("r1".into()),
            noncurrent_version_expiration: None,
            noncurrent_version_transitions: None,
            prefix: None,
            status: dto::ExpirationStatus::from_static(dto::ExpirationStatus::ENABLED),
            transitions: None,
        };
        f(&mut r);
        r
    }

    fn config(rules: Vec<dto::LifecycleRule>) -> dto::BucketLifecycleConfiguration {
        dto::BucketLifecycleConfiguration { rules }
    }

    #[test]
    fn rules_map_to_the_store_and_back() {
        let r = rule(|r| {
            r.noncurrent_version_expiration =
                Some(dto::NoncurrentVersionExpiration { noncurrent_days: Some(7), newer_noncurrent_versions: None });
            r.abort_incomplete_multipart_upload =
                Some(dto::AbortIncompleteMultipartUpload { days_after_initiation: Some(2) });
        });
        let rules = rules_of(config(vec![r])).expect("valid");
        let want = LifecycleRule {
            id: "r1".into(),
            enabled: true,
            prefix: "logs/".into(),
            expiration_days: Some(3),
            noncurrent_days: Some(7),
            abort_multipart_days: Some(2),
            expired_delete_markers: false,
        };
        assert_eq!(rules, vec![want.clone()]);
        let back = to_dto(want.clone());
        assert_eq!(rules_of(config(vec![back])).expect("round trip"), vec![want]);
        // The old top-level prefix, and a rule without an id.
        let r = rule(|r| {
            r.filter = None;
            r.prefix = Some("tmp/".into());
            r.id = None;
        });
        let rules = rules_of(config(vec![r])).expect("valid");
        assert_eq!((rules[0].prefix.as_str(), rules[0].id.as_str()), ("tmp/", "rule-1"));
    }

    #[test]
    fn what_the_store_cannot_do_is_refused() {
        let code = |r: dto::LifecycleRule| rules_of(config(vec![r])).err().map(|e| e.code().as_str().to_owned());
        let transition = dto::Transition { days: Some(30), date: None, storage_class: None };
        assert_eq!(code(rule(|r| r.transitions = Some(vec![transition]))).as_deref(), Some("NotImplemented"));
        let date = s3s::dto::Timestamp::from(std::time::UNIX_EPOCH);
        assert_eq!(
            code(rule(|r| r.expiration = Some(dto::LifecycleExpiration { date: Some(date), ..Default::default() })))
                .as_deref(),
            Some("NotImplemented")
        );
        let tag = dto::Tag { key: Some("k".into()), value: Some("v".into()) };
        assert_eq!(
            code(rule(|r| r.filter = Some(dto::LifecycleRuleFilter { tag: Some(tag), ..Default::default() }))).as_deref(),
            Some("NotImplemented")
        );
        assert_eq!(code(rule(|r| r.expiration = None)).as_deref(), Some("InvalidArgument"));
        assert_eq!(
            code(rule(|r| r.expiration = Some(dto::LifecycleExpiration { days: Some(0), ..Default::default() })))
                .as_deref(),
            Some("InvalidArgument")
        );
        assert!(rules_of(config(vec![rule(|_| {}), rule(|_| {})])).is_err(), "ids are unique");
        assert!(rules_of(config(vec![])).is_err());
    }
}
