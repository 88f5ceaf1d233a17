//! Who may do what to a bucket, as S3 clients set and read it: bucket policies
//! (`PutBucketPolicy`, `GetBucketPolicy`, `DeleteBucketPolicy`, `GetBucketPolicyStatus`,
//! evaluated by `super::permits`) and the ACL requests of a bucket whose ACLs are off.
//!
//! Buckets work as S3 buckets created since 2023 do by default (object ownership "bucket
//! owner enforced"): the bucket's owner owns every object in it, ACLs show the owner's
//! full control and cannot grant anything (`AccessControlListNotSupported`), and a bucket
//! is made public on purpose with a policy granting `"Principal": "*"`.

use super::errors::{not_implemented, to_s3, with_status};
use super::policy::{Policy, PolicyError};
use super::{requester, Gateway, Requester};
use crate::backend::{Backend, Bucket};
use http::StatusCode;
use s3s::dto;
use s3s::{S3ErrorCode, S3Request, S3Response, S3Result};

fn acls_not_supported() -> s3s::S3Error {
    with_status(S3ErrorCode::AccessControlListNotSupported, StatusCode::BAD_REQUEST, "The bucket does not allow ACLs")
}

/// The ACL every bucket and object has: full control to the bucket's owner.
fn owner_full_control(bucket: &Bucket, caller: &Requester) -> (dto::Owner, dto::Grants) {
    let owner = super::owner_of(bucket, caller);
    let grantee = dto::Grantee {
        display_name: owner.display_name.clone(),
        email_address: None,
        id: owner.id.clone(),
        type_: dto::Type::from_static(dto::Type::CANONICAL_USER),
        uri: None,
    };
    let grant =
        dto::Grant { grantee: Some(grantee), permission: Some(dto::Permission::from_static(dto::Permission::FULL_CONTROL)) };
    (owner, vec![grant])
}

/// Accepts what sets the ACL buckets have anyway (canned `private`, or `bucket-owner-full-
/// control`; an explicit policy granting only the owner full control), refuses the rest.
fn check_acl_request(
    bucket: &Bucket,
    canned: Option<&str>,
    grants_in_headers: bool,
    body: Option<&dto::AccessControlPolicy>,
) -> S3Result<()> {
    if grants_in_headers {
        return Err(acls_not_supported());
    }
    match canned {
        None | Some("private" | "bucket-owner-full-control") => {}
        Some(_) => return Err(acls_not_supported()),
    }
    if let Some(acp) = body {
        let owner_only = acp.grants.iter().flatten().all(|g| {
            g.permission.as_ref().is_some_and(|p| p.as_str() == dto::Permission::FULL_CONTROL)
                && g.grantee.as_ref().is_some_and(|who| who.id.as_deref() == Some(bucket.owner.as_str()))
        });
        if !owner_only {
            return Err(acls_not_supported());
        }
    }
    Ok(())
}

impl<B: Backend> Gateway<B> {
    pub(super) async fn put_policy(
        &self,
        req: S3Request<dto::PutBucketPolicyInput>,
    ) -> S3Result<S3Response<dto::PutBucketPolicyOutput>> {
        let caller = requester(&req);
        let input = req.input;
        self.owned_bucket(&caller, &input.bucket, input.expected_bucket_owner.as_ref()).await?;
        match Policy::parse(&input.policy, &input.bucket) {
            Ok(_) => {}
            Err(PolicyError::Malformed(m)) => return Err(with_status(S3ErrorCode::MalformedPolicy, StatusCode::BAD_REQUEST, m)),
            Err(PolicyError::Unsupported(m)) => return Err(not_implemented(m)),
        }
        self.backend.set_policy(&input.bucket, Some(input.policy)).await.map_err(to_s3)?;
        Ok(S3Response::new(dto::PutBucketPolicyOutput::default()))
    }

    pub(super) async fn get_policy(
        &self,
        req: S3Request<dto::GetBucketPolicyInput>,
    ) -> S3Result<S3Response<dto::GetBucketPolicyOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let bucket = self.owned_bucket(&caller, &input.bucket, input.expected_bucket_owner.as_ref()).await?;
        let Some(policy) = bucket.policy else {
            return Err(with_status(S3ErrorCode::NoSuchBucketPolicy, StatusCode::NOT_FOUND, "The bucket policy does not exist"));
        };
        Ok(S3Response::new(dto::GetBucketPolicyOutput { policy: Some(policy) }))
    }

    pub(super) async fn delete_policy(
        &self,
        req: S3Request<dto::DeleteBucketPolicyInput>,
    ) -> S3Result<S3Response<dto::DeleteBucketPolicyOutput>> {
        let caller = requester(&req);
        let input = req.input;
        self.owned_bucket(&caller, &input.bucket, input.expected_bucket_owner.as_ref()).await?;
        self.backend.set_policy(&input.bucket, None).await.map_err(to_s3)?;
        Ok(S3Response::new(dto::DeleteBucketPolicyOutput::default()))
    }

    pub(super) async fn policy_status(
        &self,
        req: S3Request<dto::GetBucketPolicyStatusInput>,
    ) -> S3Result<S3Response<dto::GetBucketPolicyStatusOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let bucket = self
            .authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:GetBucketPolicyStatus", None)
            .await?;
        let Some(text) = &bucket.policy else {
            return Err(with_status(S3ErrorCode::NoSuchBucketPolicy, StatusCode::NOT_FOUND, "The bucket policy does not exist"));
        };
        let is_public = Policy::parse(text, &bucket.name).is_ok_and(|p| p.is_public());
        Ok(S3Response::new(dto::GetBucketPolicyStatusOutput {
            policy_status: Some(dto::PolicyStatus { is_public: Some(is_public) }),
        }))
    }

    pub(super) async fn ownership_controls(
        &self,
        req: S3Request<dto::GetBucketOwnershipControlsInput>,
    ) -> S3Result<S3Response<dto::GetBucketOwnershipControlsOutput>> {
        let caller = requester(&req);
        let input = req.input;
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:GetBucketOwnershipControls", None)
            .await?;
        let rule = dto::OwnershipControlsRule {
            object_ownership: dto::ObjectOwnership::from_static(dto::ObjectOwnership::BUCKET_OWNER_ENFORCED),
        };
        Ok(S3Response::new(dto::GetBucketOwnershipControlsOutput {
            ownership_controls: Some(dto::OwnershipControls { rules: vec![rule] }),
        }))
    }

    pub(super) async fn bucket_acl(
        &self,
        req: S3Request<dto::GetBucketAclInput>,
    ) -> S3Result<S3Response<dto::GetBucketAclOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let bucket =
            self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:GetBucketAcl", None).await?;
        let (owner, grants) = owner_full_control(&bucket, &caller);
        Ok(S3Response::new(dto::GetBucketAclOutput { grants: Some(grants), owner: Some(owner) }))
    }

    pub(super) async fn set_bucket_acl(
        &self,
        req: S3Request<dto::PutBucketAclInput>,
    ) -> S3Result<S3Response<dto::PutBucketAclOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let bucket =
            self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:PutBucketAcl", None).await?;
        let grants_in_headers = input.grant_full_control.is_some()
            || input.grant_read.is_some()
            || input.grant_read_acp.is_some()
            || input.grant_write.is_some()
            || input.grant_write_acp.is_some();
        let canned = input.acl.as_ref().map(dto::BucketCannedACL::as_str);
        check_acl_request(&bucket, canned, grants_in_headers, input.access_control_policy.as_ref())?;
        Ok(S3Response::new(dto::PutBucketAclOutput::default()))
    }

    pub(super) async fn object_acl(
        &self,
        req: S3Request<dto::GetObjectAclInput>,
    ) -> S3Result<S3Response<dto::GetObjectAclOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let action = if input.version_id.is_some() { "s3:GetObjectVersionAcl" } else { "s3:GetObjectAcl" };
        let bucket =
            self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), action, Some(&input.key)).await?;
        let version = input.version_id.as_deref();
        if let Err(e) = self.head_of(&input.bucket, &input.key, version).await {
            return Err(self.read_error(&input.bucket, &input.key, version, e).await);
        }
        let (owner, grants) = owner_full_control(&bucket, &caller);
        Ok(S3Response::new(dto::GetObjectAclOutput { grants: Some(grants), owner: Some(owner), request_charged: None }))
    }

    pub(super) async fn set_object_acl(
        &self,
        req: S3Request<dto::PutObjectAclInput>,
    ) -> S3Result<S3Response<dto::PutObjectAclOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let action = if input.version_id.is_some() { "s3:PutObjectVersionAcl" } else { "s3:PutObjectAcl" };
        let bucket =
            self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), action, Some(&input.key)).await?;
        let version = input.version_id.as_deref();
        if let Err(e) = self.head_of(&input.bucket, &input.key, version).await {
            return Err(self.read_error(&input.bucket, &input.key, version, e).await);
        }
        let grants_in_headers = input.grant_full_control.is_some()
            || input.grant_read.is_some()
            || input.grant_read_acp.is_some()
            || input.grant_write.is_some()
            || input.grant_write_acp.is_some();
        let canned = input.acl.as_ref().map(dto::ObjectCannedACL::as_str);
        check_acl_request(&bucket, canned, grants_in_headers, input.access_control_policy.as_ref())?;
        Ok(S3Response::new(dto::PutObjectAclOutput::default()))
    }
}

/// For the canned ACLs of a PUT, copy or upload: refused as S3 refuses them on a bucket
/// whose ACLs are off.
pub(super) fn object_canned_acl(acl: Option<&dto::ObjectCannedACL>) -> S3Result<()> {
    match acl.map(dto::ObjectCannedACL::as_str) {
        None | Some("private" | "bucket-owner-full-control") => Ok(()),
        Some(_) => Err(acls_not_supported()),
    }
}

