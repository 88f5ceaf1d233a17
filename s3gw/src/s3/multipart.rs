//! Multipart uploads over HTTP: CreateMultipartUpload, UploadPart (the body streamed and
//! verified like a PUT's), UploadPartCopy (a range of another object), CompleteMultipartUpload,
//! AbortMultipartUpload, ListParts and ListMultipartUploads (prefix, delimiter, markers).
//!
//! Part checksums (`x-amz-checksum-*` on UploadPart) are verified as the part streams in
//! and returned, but not kept: CompleteMultipartUpload identifies parts by their ETags, and
//! a whole-object checksum for the completed object is refused (`NotImplemented`).

use super::body::{Algorithm, Upload as BodyUpload};
use super::errors::{invalid_argument, not_implemented, to_s3, with_status};
use super::{
    anonymous, check_conditions, content_length, content_md5, empty_body, encode, etag, expected_checksums, known_checksums,
    opt_nonempty, requester, stored_headers, sums, timestamp, unsupported_storage_class, url_encoding, user_meta, Requester,
    Gateway,
};
use crate::backend::{Backend, ByteStream, CompletedPart, ObjectInfo, PutOptions, UploadQuery, MAX_PART_NUMBER};
use super::conditions::Conditions;
use http::StatusCode;
use s3s::dto;
use s3s::{S3ErrorCode, S3Request, S3Response, S3Result};

/// Parts or uploads in one listing page, at most.
pub const MAX_LIST_PARTS: usize = 1000;
/// S3's limit for one part (and for the range an UploadPartCopy takes).
pub const MAX_PART_SIZE: u64 = 5 << 30;

fn part_number(n: i32) -> S3Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|n| (1..=MAX_PART_NUMBER).contains(n))
        .ok_or_else(|| invalid_argument(format!("Part number must be an integer between 1 and {MAX_PART_NUMBER}, inclusive")))
}

fn max_entries(requested: Option<i32>, what: &str) -> S3Result<usize> {
    match requested {
        None => Ok(MAX_LIST_PARTS),
        Some(n) => usize::try_from(n)
            .map(|n| n.min(MAX_LIST_PARTS))
            .map_err(|_| invalid_argument(format!("{what} must be a non-negative number"))),
    }
}

fn malformed_xml() -> s3s::S3Error {
    with_status(
        S3ErrorCode::MalformedXML,
        StatusCode::BAD_REQUEST,
        "The XML you provided was not well-formed or did not validate against our published schema",
    )
}

fn initiator(id: &str, caller: &Requester) -> dto::Initiator {
    // Names are shown only to their own account.
    let display_name = caller.as_ref().filter(|c| c.id == id).map(|c| c.name.clone());
    dto::Initiator { id: Some(id.to_owned()), display_name }
}

/// `bytes=first-last` of `x-amz-copy-source-range`, within an object of `size` bytes, as
/// a half-open range.
fn copy_source_range(value: &str, size: u64) -> S3Result<(u64, u64)> {
    let invalid = || invalid_argument(format!("Range specified is not valid for source object of size: {size}"));
    let spec = value.trim().strip_prefix("bytes=").ok_or_else(invalid)?;
    let (first, last) = spec.split_once('-').ok_or_else(invalid)?;
    let first: u64 = first.trim().parse().map_err(|_| invalid())?;
    let last: u64 = last.trim().parse().map_err(|_| invalid())?;
    if first > last || last >= size {
        return Err(invalid());
    }
    Ok((first, last + 1))
}

impl<B: Backend> Gateway<B> {
    pub(super) async fn create_upload(
        &self,
        req: S3Request<dto::CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::CreateMultipartUploadOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let bucket =
            self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:PutObject", Some(&input.key)).await?;
        crate::s3::validate_key(&input.key).map_err(to_s3)?;
        if input.server_side_encryption.is_some() || input.sse_customer_algorithm.is_some() || input.ssekms_key_id.is_some() {
            return Err(not_implemented("server-side encryption is not supported"));
        }
        let tags = super::tagging::from_header(input.tagging.as_deref())?;
        if !tags.is_empty() && !super::permits(&bucket, &caller, "s3:PutObjectTagging", Some(&input.key)) {
            return Err(super::errors::access_denied());
        }
        if input.object_lock_mode.is_some() || input.object_lock_legal_hold_status.is_some() {
            return Err(not_implemented("object lock is not supported"));
        }
        if input.website_redirect_location.is_some() {
            return Err(not_implemented("website redirects are not supported"));
        }
        if input.grant_full_control.is_some() || input.grant_read.is_some() || input.grant_read_acp.is_some() || input.grant_write_acp.is_some() {
            return Err(not_implemented("ACL grants are not supported; objects are private"));
        }
        if input.checksum_type.as_ref().is_some_and(|t| t.as_str().eq_ignore_ascii_case(dto::ChecksumType::FULL_OBJECT)) {
            return Err(not_implemented("full-object checksums of multipart uploads are not supported"));
        }
        if let Some(a) = &input.checksum_algorithm {
            Algorithm::from_name(a.as_str())
                .ok_or_else(|| invalid_argument(format!("unsupported checksum algorithm {:?}", a.as_str())))?;
        }
        super::permissions::object_canned_acl(input.acl.as_ref())?;
        unsupported_storage_class(input.storage_class.as_ref())?;
        let opts = PutOptions {
            content_type: opt_nonempty(input.content_type),
            user_meta: user_meta(input.metadata)?,
            headers: stored_headers(
                input.cache_control,
                input.content_disposition,
                input.content_encoding,
                input.content_language,
                input.expires.as_ref(),
            ),
            tags,
            ..Default::default()
        };
        let upload = self.backend.create_upload(&caller.clone().unwrap_or_else(anonymous), &input.bucket, &input.key, opts).await.map_err(to_s3)?;
        Ok(S3Response::new(dto::CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload.id),
            ..Default::default()
        }))
    }

    pub(super) async fn upload_part(
        &self,
        req: S3Request<dto::UploadPartInput>,
    ) -> S3Result<S3Response<dto::UploadPartOutput>> {
        let caller = requester(&req);
        let trailers = req.trailing_headers.clone();
        let input = req.input;
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:PutObject", Some(&input.key)).await?;
        let number = part_number(input.part_number)?;
        if input.sse_customer_algorithm.is_some() {
            return Err(not_implemented("server-side encryption is not supported"));
        }
        let expected = expected_checksums(
            &req.headers,
            [
                (Algorithm::Crc32, input.checksum_crc32),
                (Algorithm::Crc32c, input.checksum_crc32c),
                (Algorithm::Crc64Nvme, input.checksum_crc64nvme),
                (Algorithm::Sha1, input.checksum_sha1),
                (Algorithm::Sha256, input.checksum_sha256),
            ],
            input.checksum_algorithm.as_ref(),
        )?;
        let known = known_checksums(&expected);
        let opts = PutOptions {
            content_md5: content_md5(input.content_md5.as_deref())?,
            length: content_length(input.content_length)?,
            ..Default::default()
        };
        let body = input.body.unwrap_or_else(empty_body);
        let (upload, report) = BodyUpload::new(body, expected, trailers);
        let part = match self
            .backend
            .upload_part(&input.bucket, &input.key, &input.upload_id, number, opts, upload.into_stream())
            .await
        {
            Ok(part) => part,
            Err(e) => return Err(report.failure().map_or_else(|| to_s3(e), |f| f.to_s3())),
        };
        let mut checksums = known;
        checksums.extend(report.checksums());
        let s = sums(&checksums);
        Ok(S3Response::new(dto::UploadPartOutput {
            e_tag: Some(dto::ETag::Strong(part.etag)),
            checksum_crc32: s.crc32,
            checksum_crc32c: s.crc32c,
            checksum_crc64nvme: s.crc64nvme,
            checksum_sha1: s.sha1,
            checksum_sha256: s.sha256,
            ..Default::default()
        }))
    }

    /// The source of a copy (a version, or the current one) once `conds` hold, and the
    /// data of `range` (`x-amz-copy-source-range`) or all of it.
    pub(super) async fn copy_source(
        &self,
        bucket: &str,
        key: &str,
        version: Option<&str>,
        range: Option<&str>,
        conds: &Conditions<'_>,
    ) -> S3Result<(ObjectInfo, (u64, u64), ByteStream)> {
        for _ in 0..3 {
            let head = match self.head_of(bucket, key, version).await {
                Ok(head) => head,
                Err(e) => return Err(self.read_error(bucket, key, version, e).await),
            };
            check_conditions(conds, &head, true)?;
            let span = match range {
                Some(r) => copy_source_range(r, head.size)?,
                None => (0, head.size),
            };
            let (info, stream) = self.get_of(bucket, key, version, Some(span)).await.map_err(to_s3)?;
            if super::same_object(&info, &head) {
                return Ok((info, span, stream));
            }
        }
        Err(with_status(
            S3ErrorCode::SlowDown,
            StatusCode::SERVICE_UNAVAILABLE,
            "The object kept changing while it was read; please retry.",
        ))
    }

    pub(super) async fn upload_part_copy(
        &self,
        req: S3Request<dto::UploadPartCopyInput>,
    ) -> S3Result<S3Response<dto::UploadPartCopyOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let dto::CopySource::Bucket { bucket: src_bucket, key: src_key, version_id } = &input.copy_source else {
            return Err(not_implemented("copy sources other than bucket/key are not supported"));
        };
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:PutObject", Some(&input.key)).await?;
        let read = if version_id.is_some() { "s3:GetObjectVersion" } else { "s3:GetObject" };
        self.authorize(&caller, src_bucket, input.expected_source_bucket_owner.as_ref(), read, Some(src_key)).await?;
        let number = part_number(input.part_number)?;
        crate::s3::validate_key(src_key).map_err(to_s3)?;
        if input.sse_customer_algorithm.is_some() || input.copy_source_sse_customer_algorithm.is_some() {
            return Err(not_implemented("server-side encryption is not supported"));
        }
        // The upload first: a copy into an upload that is gone reads nothing.
        self.backend.list_parts(&input.bucket, &input.key, &input.upload_id, 0, 1).await.map_err(to_s3)?;
        let conds = Conditions {
            if_match: input.copy_source_if_match.as_ref(),
            if_none_match: input.copy_source_if_none_match.as_ref(),
            if_modified_since: input.copy_source_if_modified_since.as_ref(),
            if_unmodified_since: input.copy_source_if_unmodified_since.as_ref(),
        };
        let (source, (start, end), stream) = self
            .copy_source(src_bucket, src_key, version_id.as_deref(), input.copy_source_range.as_deref(), &conds)
            .await?;
        if end - start > MAX_PART_SIZE {
            return Err(with_status(
                S3ErrorCode::InvalidRequest,
                StatusCode::BAD_REQUEST,
                format!("The specified copy range is larger than the maximum allowable size for a part: {MAX_PART_SIZE}"),
            ));
        }
        let opts = PutOptions { length: Some(end - start), ..Default::default() };
        let (upload, _) = BodyUpload::from_backend(stream, Vec::new());
        let part = self
            .backend
            .upload_part(&input.bucket, &input.key, &input.upload_id, number, opts, upload.into_stream())
            .await
            .map_err(to_s3)?;
        Ok(S3Response::new(dto::UploadPartCopyOutput {
            copy_part_result: Some(dto::CopyPartResult {
                e_tag: Some(dto::ETag::Strong(part.etag)),
                last_modified: Some(timestamp(part.last_modified_ms)),
                ..Default::default()
            }),
            copy_source_version_id: source.version_id,
            ..Default::default()
        }))
    }

    pub(super) async fn complete_upload(
        &self,
        req: S3Request<dto::CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::CompleteMultipartUploadOutput>> {
        let caller = requester(&req);
        let host = req.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned);
        let input = req.input;
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:PutObject", Some(&input.key)).await?;
        if input.if_match.is_some() || input.if_none_match.is_some() {
            return Err(not_implemented("conditional writes (If-Match, If-None-Match) are not supported"));
        }
        if input.checksum_crc32.is_some()
            || input.checksum_crc32c.is_some()
            || input.checksum_crc64nvme.is_some()
            || input.checksum_sha1.is_some()
            || input.checksum_sha256.is_some()
            || input.checksum_type.is_some()
        {
            return Err(not_implemented("whole-object checksums of multipart uploads are not supported"));
        }
        if input.mpu_object_size.is_some() {
            return Err(not_implemented("x-amz-mp-object-size is not supported"));
        }
        let listed = input.multipart_upload.and_then(|m| m.parts).unwrap_or_default();
        if listed.is_empty() {
            return Err(malformed_xml());
        }
        let mut parts = Vec::with_capacity(listed.len());
        for p in listed {
            let number = p.part_number.ok_or_else(malformed_xml)?;
            let number = u32::try_from(number).map_err(|_| invalid_argument("invalid part number"))?;
            // A part listed without its ETag cannot be the part uploaded.
            let etag = p.e_tag.map(|t| t.value().to_owned()).ok_or(crate::backend::Error::InvalidPart(number)).map_err(to_s3)?;
            parts.push(CompletedPart { number, etag });
        }
        let info = self.backend.complete_upload(&input.bucket, &input.key, &input.upload_id, &parts).await.map_err(to_s3)?;
        let key = encode(true, input.key.clone());
        // Where the object is, addressed the way the client addressed it.
        let location = host.map(|h| match h.strip_prefix(&format!("{}.", input.bucket)) {
            Some(_) => format!("http://{h}/{key}"),
            None => format!("http://{h}/{}/{key}", input.bucket),
        });
        Ok(S3Response::new(dto::CompleteMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            e_tag: Some(etag(&info)),
            location,
            version_id: info.version_id,
            ..Default::default()
        }))
    }

    pub(super) async fn abort_upload(
        &self,
        req: S3Request<dto::AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::AbortMultipartUploadOutput>> {
        let caller = requester(&req);
        let input = req.input;
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:AbortMultipartUpload", Some(&input.key)).await?;
        if let Some(t) = &input.if_match_initiated_time {
            let (upload, _, _) =
                self.backend.list_parts(&input.bucket, &input.key, &input.upload_id, 0, 1).await.map_err(to_s3)?;
            let want = time::OffsetDateTime::from(t.clone()).unix_timestamp();
            if i64::try_from(upload.initiated_ms / 1000).ok() != Some(want) {
                return Err(with_status(
                    S3ErrorCode::PreconditionFailed,
                    StatusCode::PRECONDITION_FAILED,
                    "At least one of the pre-conditions you specified did not hold",
                ));
            }
        }
        self.backend.abort_upload(&input.bucket, &input.key, &input.upload_id).await.map_err(to_s3)?;
        Ok(S3Response::new(dto::AbortMultipartUploadOutput::default()))
    }

    pub(super) async fn list_upload_parts(
        &self,
        req: S3Request<dto::ListPartsInput>,
    ) -> S3Result<S3Response<dto::ListPartsOutput>> {
        let caller = requester(&req);
        let input = req.input;
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:ListMultipartUploadParts", Some(&input.key)).await?;
        let max = max_entries(input.max_parts, "max-parts")?;
        let after = match input.part_number_marker {
            None => 0,
            Some(n) => u32::try_from(n).map_err(|_| invalid_argument("part-number-marker must be a non-negative number"))?,
        };
        // max-parts=0 still names the upload: it must exist.
        let (upload, parts, more) = self
            .backend
            .list_parts(&input.bucket, &input.key, &input.upload_id, after, max.max(1))
            .await
            .map_err(to_s3)?;
        let (parts, truncated) = if max == 0 { (Vec::new(), !parts.is_empty()) } else { (parts, more) };
        let next = if truncated { parts.last().map_or(after, |p| p.number) } else { 0 };
        let who = initiator(&upload.initiator, &caller);
        Ok(S3Response::new(dto::ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload.id),
            part_number_marker: input.part_number_marker,
            next_part_number_marker: truncated.then(|| i32::try_from(next).unwrap_or(i32::MAX)),
            max_parts: Some(i32::try_from(max).unwrap_or(i32::MAX)),
            is_truncated: Some(truncated),
            parts: Some(
                parts
                    .into_iter()
                    .map(|p| dto::Part {
                        part_number: Some(i32::try_from(p.number).unwrap_or(i32::MAX)),
                        e_tag: Some(dto::ETag::Strong(p.etag)),
                        size: Some(i64::try_from(p.size).unwrap_or(i64::MAX)),
                        last_modified: Some(timestamp(p.last_modified_ms)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            owner: Some(dto::Owner { id: who.id.clone(), display_name: who.display_name.clone() }),
            initiator: Some(who),
            storage_class: Some(dto::StorageClass::from_static(dto::StorageClass::STANDARD)),
            ..Default::default()
        }))
    }

    pub(super) async fn list_uploads(
        &self,
        req: S3Request<dto::ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<dto::ListMultipartUploadsOutput>> {
        let caller = requester(&req);
        let input = req.input;
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:ListBucketMultipartUploads", None).await?;
        let url = url_encoding(input.encoding_type.as_ref())?;
        let max = max_entries(input.max_uploads, "max-uploads")?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = opt_nonempty(input.delimiter.clone());
        let key_marker = opt_nonempty(input.key_marker.clone());
        // S3 ignores the upload id marker without a key marker.
        let id_marker = key_marker.as_ref().and_then(|_| opt_nonempty(input.upload_id_marker.clone()));
        let mut uploads = Vec::new();
        let mut prefixes: Vec<String> = Vec::new();
        let mut truncated = false;
        // Where the next page would start: the last upload or common prefix returned.
        let mut next: Option<(String, Option<String>)> = None;
        let mut query = UploadQuery {
            prefix: prefix.clone(),
            key_marker: key_marker.clone(),
            upload_id_marker: id_marker.clone(),
            max_uploads: MAX_LIST_PARTS,
        };
        if max > 0 {
            'pages: loop {
                let (page, more) = self.backend.list_uploads(&input.bucket, &query).await.map_err(to_s3)?;
                let Some(last) = page.last() else { break };
                query.key_marker = Some(last.key.clone());
                query.upload_id_marker = Some(last.id.clone());
                for u in page {
                    let rolled = delimiter.as_deref().and_then(|d| {
                        let rest = u.key.get(prefix.len()..)?;
                        rest.find(d).map(|at| u.key[..prefix.len() + at + d.len()].to_owned())
                    });
                    if let Some(cp) = &rolled {
                        // Uploads under a common prefix at or before the key marker were
                        // listed already, as that prefix.
                        if prefixes.last() == Some(cp) || key_marker.as_ref().is_some_and(|m| cp <= m) {
                            continue;
                        }
                    }
                    if uploads.len() + prefixes.len() == max {
                        truncated = true;
                        break 'pages;
                    }
                    match rolled {
                        Some(cp) => {
                            next = Some((cp.clone(), None));
                            prefixes.push(cp);
                        }
                        None => {
                            next = Some((u.key.clone(), Some(u.id.clone())));
                            uploads.push(u);
                        }
                    }
                }
                if !more {
                    break;
                }
            }
        }
        let (next_key, next_id) = match next.filter(|_| truncated) {
            Some((k, id)) => (Some(k), id),
            None => (None, None),
        };
        Ok(S3Response::new(dto::ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: Some(encode(url, prefix)),
            delimiter: delimiter.map(|d| encode(url, d)),
            key_marker: Some(encode(url, key_marker.unwrap_or_default())),
            upload_id_marker: Some(id_marker.unwrap_or_default()),
            next_key_marker: next_key.map(|k| encode(url, k)),
            next_upload_id_marker: next_id,
            max_uploads: Some(i32::try_from(max).unwrap_or(i32::MAX)),
            is_truncated: Some(truncated),
            uploads: Some(
                uploads
                    .into_iter()
                    .map(|u| {
                        let who = initiator(&u.initiator, &caller);
                        dto::MultipartUpload {
                            key: Some(encode(url, u.key)),
                            upload_id: Some(u.id),
                            initiated: Some(timestamp(u.initiated_ms)),
                            owner: Some(dto::Owner { id: who.id.clone(), display_name: who.display_name.clone() }),
                            initiator: Some(who),
                            storage_class: Some(dto::StorageClass::from_static(dto::StorageClass::STANDARD)),
                            ..Default::default()
                        }
                    })
                    .collect(),
            ),
            common_prefixes: Some(
                prefixes.into_iter().map(|p| dto::CommonPrefix { prefix: Some(encode(url, p)) }).collect(),
            ),
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_source_ranges_must_lie_within_the_source() {
        assert_eq!(copy_source_range("bytes=0-9", 10).ok(), Some((0, 10)));
        assert_eq!(copy_source_range("bytes=5-5", 10).ok(), Some((5, 6)));
        for bad in ["bytes=0-10", "bytes=5-4", "bytes=-5", "bytes=3-", "0-4", "bytes=a-b"] {
            assert!(copy_source_range(bad, 10).is_err(), "{bad}");
        }
    }

    #[test]
    fn part_numbers_are_1_to_10000() {
        assert_eq!(part_number(1).ok(), Some(1));
        assert_eq!(part_number(10_000).ok(), Some(10_000));
        assert!(part_number(0).is_err() && part_number(10_001).is_err() && part_number(-1).is_err());
    }
}
