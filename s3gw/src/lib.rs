//! `s3gw`: the S3 gateway over Basalt storage (not built yet; see the S3 issue).
