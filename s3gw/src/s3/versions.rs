//! Bucket versioning over HTTP: PutBucketVersioning, GetBucketVersioning and
//! ListObjectVersions (prefix, delimiter, key and version-id markers, delete markers as
//! `DeleteMarker` entries). Reads, copies and deletes of one version are in `mod.rs`, with
//! the unversioned forms of those operations.

use super::errors::{invalid_argument, not_implemented, to_s3, with_status};
use super::{encode, etag, max_keys, opt_nonempty, owner_of, requester, timestamp, url_encoding, Gateway};
use crate::backend::{Backend, ListQuery, Versioning};
use http::StatusCode;
use s3s::dto;
use s3s::{S3ErrorCode, S3Request, S3Response, S3Result};

impl<B: Backend> Gateway<B> {
    pub(super) async fn put_versioning(
        &self,
        req: S3Request<dto::PutBucketVersioningInput>,
    ) -> S3Result<S3Response<dto::PutBucketVersioningOutput>> {
        let caller = requester(&req);
        let input = req.input;
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:PutBucketVersioning", None).await?;
        let config = input.versioning_configuration;
        if config.mfa_delete.as_ref().is_some_and(|m| m.as_str() == dto::MFADelete::ENABLED) || input.mfa.is_some() {
            return Err(not_implemented("MFA delete is not supported"));
        }
        let state = match config.status.as_ref().map(dto::BucketVersioningStatus::as_str) {
            Some(dto::BucketVersioningStatus::ENABLED) => Versioning::Enabled,
            Some(dto::BucketVersioningStatus::SUSPENDED) => Versioning::Suspended,
            _ => {
                return Err(with_status(
                    S3ErrorCode::IllegalVersioningConfigurationException,
                    StatusCode::BAD_REQUEST,
                    "The versioning status must be Enabled or Suspended",
                ))
            }
        };
        self.backend.set_versioning(&input.bucket, state).await.map_err(to_s3)?;
        Ok(S3Response::new(dto::PutBucketVersioningOutput::default()))
    }

    pub(super) async fn get_versioning(
        &self,
        req: S3Request<dto::GetBucketVersioningInput>,
    ) -> S3Result<S3Response<dto::GetBucketVersioningOutput>> {
        let caller = requester(&req);
        let input = req.input;
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:GetBucketVersioning", None).await?;
        let status = match self.backend.versioning(&input.bucket).await.map_err(to_s3)? {
            // A bucket that never had versioning shows no status at all.
            Versioning::Unversioned => None,
            Versioning::Enabled => Some(dto::BucketVersioningStatus::from_static(dto::BucketVersioningStatus::ENABLED)),
            Versioning::Suspended => {
                Some(dto::BucketVersioningStatus::from_static(dto::BucketVersioningStatus::SUSPENDED))
            }
        };
        Ok(S3Response::new(dto::GetBucketVersioningOutput { status, mfa_delete: None }))
    }

    pub(super) async fn list_versions(
        &self,
        req: S3Request<dto::ListObjectVersionsInput>,
    ) -> S3Result<S3Response<dto::ListObjectVersionsOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let bucket = self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:ListBucketVersions", None).await?;
        let url = url_encoding(input.encoding_type.as_ref())?;
        let max = max_keys(input.max_keys)?;
        let prefix = input.prefix.unwrap_or_default();
        let delimiter = opt_nonempty(input.delimiter);
        let key_marker = opt_nonempty(input.key_marker);
        let version_marker = opt_nonempty(input.version_id_marker);
        if version_marker.is_some() && key_marker.is_none() {
            return Err(invalid_argument("A version-id marker cannot be specified without a key marker."));
        }
        let query = ListQuery { prefix: prefix.clone(), delimiter: delimiter.clone(), start_after: None, max_keys: max };
        let page = if max == 0 {
            Default::default()
        } else {
            self.backend
                .list_versions(&input.bucket, &query, key_marker.as_deref(), version_marker.as_deref())
                .await
                .map_err(to_s3)?
        };
        let mut versions = Vec::new();
        let mut markers = Vec::new();
        for v in page.versions {
            let key = Some(encode(url, v.info.key.clone()));
            if v.delete_marker {
                markers.push(dto::DeleteMarkerEntry {
                    key,
                    version_id: Some(v.version_id),
                    is_latest: Some(v.is_latest),
                    last_modified: Some(timestamp(v.info.last_modified_ms)),
                    owner: Some(owner_of(&bucket, &caller)),
                });
            } else {
                let checksum_algorithm = (!v.info.checksums.is_empty())
                    .then(|| v.info.checksums.keys().map(|k| dto::ChecksumAlgorithm::from(k.clone())).collect());
                versions.push(dto::ObjectVersion {
                    key,
                    version_id: Some(v.version_id),
                    is_latest: Some(v.is_latest),
                    e_tag: Some(etag(&v.info)),
                    last_modified: Some(timestamp(v.info.last_modified_ms)),
                    size: Some(i64::try_from(v.info.size).unwrap_or(i64::MAX)),
                    storage_class: Some(dto::ObjectVersionStorageClass::from_static(
                        dto::ObjectVersionStorageClass::STANDARD,
                    )),
                    owner: Some(owner_of(&bucket, &caller)),
                    checksum_algorithm,
                    ..Default::default()
                });
            }
        }
        let (next_key, next_version) = match page.next.filter(|_| page.truncated) {
            Some((k, v)) => (Some(encode(url, k)), opt_nonempty(Some(v))),
            None => (None, None),
        };
        Ok(S3Response::new(dto::ListObjectVersionsOutput {
            name: Some(input.bucket),
            prefix: Some(encode(url, prefix)),
            delimiter: delimiter.map(|d| encode(url, d)),
            key_marker: Some(encode(url, key_marker.unwrap_or_default())),
            version_id_marker: Some(version_marker.unwrap_or_default()),
            next_key_marker: next_key,
            next_version_id_marker: next_version,
            max_keys: Some(i32::try_from(max).unwrap_or(i32::MAX)),
            is_truncated: Some(page.truncated),
            versions: Some(versions),
            delete_markers: Some(markers),
            common_prefixes: Some(
                page.common_prefixes.into_iter().map(|p| dto::CommonPrefix { prefix: Some(encode(url, p)) }).collect(),
            ),
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }
}
