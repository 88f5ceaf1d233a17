//! Who is calling: access keys checked against the backend (`s3s` verifies the signature
//! with the secret we return), and the account behind the key attached to the request.

use super::errors::{access_denied, to_s3};
use crate::backend::{Account, Backend};
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::{S3Error, S3ErrorCode, S3Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The account whose key signed the request (None: the request was not signed), put in
/// the request's extensions by [`KeyAuth`]'s access check.
#[derive(Clone, Debug)]
pub struct Caller(pub Option<Account>);

/// At most this many key→account pairs are remembered between the signature check and
/// the access check of a request (and for later requests with the same key).
const ACCOUNT_CACHE: usize = 4096;

/// `s3s` authentication and access control over [`Backend::access_key`].
///
/// A key belongs to one account for its whole life, so the account found while checking
/// the signature is kept for the access check instead of asking the backend twice; whether
/// the key is still enabled is asked anew for every request.
pub struct KeyAuth<B> {
    backend: Arc<B>,
    accounts: Arc<Mutex<HashMap<String, Account>>>,
}

impl<B> Clone for KeyAuth<B> {
    fn clone(&self) -> Self {
        KeyAuth { backend: Arc::clone(&self.backend), accounts: Arc::clone(&self.accounts) }
    }
}

impl<B: Backend> KeyAuth<B> {
    pub fn new(backend: Arc<B>) -> Self {
        KeyAuth { backend, accounts: Arc::new(Mutex::new(HashMap::new())) }
    }

    fn remember(&self, key: &str, account: &Account) {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if accounts.len() >= ACCOUNT_CACHE && !accounts.contains_key(key) {
            accounts.clear();
        }
        accounts.insert(key.to_owned(), account.clone());
    }

    fn remembered(&self, key: &str) -> Option<Account> {
        self.accounts.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }
}

#[async_trait::async_trait]
impl<B: Backend> S3Auth for KeyAuth<B> {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        match self.backend.access_key(access_key).await.map_err(to_s3)? {
            Some((account, secret)) => {
                self.remember(access_key, &account);
                Ok(SecretKey::from(secret))
            }
            None => Err(S3Error::with_message(
                S3ErrorCode::InvalidAccessKeyId,
                "The AWS Access Key Id you provided does not exist in our records.",
            )),
        }
    }
}

/// Operations S3 lets send their body aws-chunked (`x-amz-content-sha256: STREAMING-…`).
const STREAMING_OPERATIONS: [&str; 2] = ["PutObject", "UploadPart"];

/// Refuses an aws-chunked body anywhere but [`STREAMING_OPERATIONS`]. `s3s` reads the
/// whole body of the other operations (DeleteObjects, CompleteMultipartUpload…) right
/// after this check and answers a malformed aws-chunked one with 500 InternalError; S3
/// takes chunked bodies only for object data, so this is refused as a bad request first.
/// An unsigned request's body is never decoded as aws-chunked (that belongs to SigV4), so
/// one announcing it is refused too rather than stored with its chunk framing.
fn check_streaming_payload(cx: &S3AccessContext<'_>) -> S3Result<()> {
    let streaming = cx
        .headers()
        .get_all("x-amz-content-sha256")
        .iter()
        .any(|v| v.as_bytes().starts_with(b"STREAMING-"));
    if streaming && cx.credentials().is_none() {
        return Err(S3Error::with_message(
            S3ErrorCode::InvalidRequest,
            "An aws-chunked (STREAMING-*) payload must be signed.",
        ));
    }
    if streaming && !STREAMING_OPERATIONS.contains(&cx.s3_op().name()) {
        return Err(S3Error::with_message(
            S3ErrorCode::InvalidRequest,
            format!("{} does not take an aws-chunked (STREAMING-*) payload.", cx.s3_op().name()),
        ));
    }
    Ok(())
}

#[async_trait::async_trait]
impl<B: Backend> S3Access for KeyAuth<B> {
    /// Names the caller: the account of the signing key, or nobody for an unsigned request
    /// (whose signature `s3s` did not have to check). What the caller may do is decided by
    /// each operation, which knows the bucket, its owner and its policy: an unsigned
    /// request gets only what a bucket policy grants to everyone.
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        check_streaming_payload(cx)?;
        // `s3s` reads the body of every operation but these whole, right after this check.
        if !STREAMING_OPERATIONS.contains(&cx.s3_op().name()) && cx.s3_op().name() != "PostObject" {
            if let Some(watch) = cx.extensions_mut().get::<super::payload::Watch>() {
                watch.arm();
            }
        }
        let Some(credentials) = cx.credentials() else {
            cx.extensions_mut().insert(Caller(None));
            return Ok(());
        };
        let key = credentials.access_key.clone();
        let account = match self.remembered(&key) {
            Some(account) => account,
            None => match self.backend.access_key(&key).await.map_err(to_s3)? {
                Some((account, _)) => {
                    self.remember(&key, &account);
                    account
                }
                None => return Err(access_denied()),
            },
        };
        cx.extensions_mut().insert(Caller(Some(account)));
        Ok(())
    }
}
