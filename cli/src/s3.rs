//! `basalt s3 ...`: S3 accounts and access keys, stored in cluster metadata (every node's
//! gateway serves them; a deleted key stops working within seconds).

use anyhow::{anyhow, Result};
use basalt_s3gw::store::{ObjectStore, StoreConfig};
use basalt_storaged_client::StorageClient;
use clap::Subcommand;
use std::sync::Arc;

#[derive(Subcommand)]
pub enum S3Cmd {
    /// Tenants: each sees only its own buckets.
    Account {
        #[command(subcommand)]
        cmd: AccountCmd,
    },
    /// Access keys (an account may have several).
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Buckets of every account: usage, quotas, versioning.
    Bucket {
        #[command(subcommand)]
        cmd: BucketCmd,
    },
}

#[derive(Subcommand)]
pub enum BucketCmd {
    List {
        #[arg(long)]
        json: bool,
    },
    /// Set a bucket's quota (sizes like 10G; 0 or "none" removes a limit).
    Quota {
        bucket: String,
        #[arg(long)]
        max_bytes: Option<String>,
        #[arg(long)]
        max_objects: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum AccountCmd {
    /// Create an account and its first access key (the secret is shown once).
    Create {
        name: String,
        #[arg(long)]
        json: bool,
    },
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// A new access key for an account (the secret is shown once).
    Create {
        account: String,
        #[arg(long)]
        json: bool,
    },
    /// Access key ids, by account.
    List {
        #[arg(long)]
        account: Option<String>,
    },
    Delete { id: String },
}

/// The store as the CLI uses it: accounts and keys only, it never writes object data.
pub fn admin_store(client: Arc<StorageClient>) -> Arc<ObjectStore> {
    ObjectStore::new(client, StoreConfig::new(0, "cli"))
}

/// Account names by account id.
async fn account_names(store: &ObjectStore) -> Result<std::collections::HashMap<String, String>, basalt_s3gw::backend::Error> {
    Ok(store.list_accounts().await?.into_iter().map(|a| (a.id, a.name)).collect())
}

pub async fn run(client: Arc<StorageClient>, cmd: S3Cmd) -> Result<()> {
    let store = admin_store(client);
    let e = |e: basalt_s3gw::backend::Error| anyhow!(e.to_string());
    match cmd {
        S3Cmd::Account { cmd: AccountCmd::Create { name, json } } => {
            let (account, key) = store.create_account(&name).await.map_err(e)?;
            if json {
                let v = serde_json::json!({"account": account.id, "name": account.name, "access_key": key.id, "secret_key": key.secret});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("account {} ({})\naccess key  {}\nsecret key  {}", account.name, account.id, key.id, key.secret);
            }
        }
        S3Cmd::Account { cmd: AccountCmd::List { json } } => {
            let accounts = store.list_accounts().await.map_err(e)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&accounts)?);
            } else {
                for a in accounts {
                    println!("{:<24} {}", a.name, a.id);
                }
            }
        }
        S3Cmd::Key { cmd: KeyCmd::Create { account, json } } => {
            let account = store.account_by_name(&account).await.map_err(e)?;
            let key = store.create_key(&account).await.map_err(e)?;
            if json {
                let v = serde_json::json!({"account": account.id, "access_key": key.id, "secret_key": key.secret});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("access key  {}\nsecret key  {}", key.id, key.secret);
            }
        }
        S3Cmd::Key { cmd: KeyCmd::List { account } } => {
            let account = match account {
                Some(name) => Some(store.account_by_name(&name).await.map_err(e)?),
                None => None,
            };
            let names = account_names(&store).await.map_err(e)?;
            for k in store.list_keys(account.as_ref()).await.map_err(e)? {
                let owner = names.get(&k.account).map(String::as_str).unwrap_or("?");
                println!("{:<22} {:<24} {}", k.id, owner, if k.enabled { "enabled" } else { "disabled" });
            }
        }
        S3Cmd::Bucket { cmd: BucketCmd::List { json } } => {
            let names = account_names(&store).await.map_err(e)?;
            let mut rows = Vec::new();
            for b in store.all_buckets().await.map_err(e)? {
                let usage = store.usage(&b.bucket.name).await.map_err(e)?;
                rows.push((b, usage));
            }
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(b, u)| {
                        serde_json::json!({
                            "name": b.bucket.name, "owner": b.bucket.owner,
                            "owner_name": names.get(&b.bucket.owner), "versioning": format!("{:?}", b.versioning),
                            "bytes": u.bytes, "objects": u.objects,
                            "max_bytes": b.quota.max_bytes, "max_objects": b.quota.max_objects,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<32} {:<16} {:<12} {:>12} {:>10} {:>12} {:>10}", "BUCKET", "OWNER", "VERSIONING", "BYTES", "OBJECTS", "MAX BYTES", "MAX OBJ");
                let lim = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
                for (b, u) in rows {
                    let owner = names.get(&b.bucket.owner).map(String::as_str).unwrap_or("?");
                    println!(
                        "{:<32} {:<16} {:<12} {:>12} {:>10} {:>12} {:>10}",
                        b.bucket.name, owner, format!("{:?}", b.versioning), u.bytes, u.objects,
                        lim(b.quota.max_bytes), lim(b.quota.max_objects)
                    );
                }
            }
        }
        S3Cmd::Bucket { cmd: BucketCmd::Quota { bucket, max_bytes, max_objects } } => {
            let mut quota = store.quota(&bucket).await.map_err(e)?;
            let parse = |v: &str, size: bool| -> Result<Option<u64>> {
                if v == "none" || v == "0" {
                    return Ok(None);
                }
                Ok(Some(if size { crate::sizes::parse_size(v)? } else { v.parse()? }))
            };
            if let Some(v) = max_bytes {
                quota.max_bytes = parse(&v, true)?;
            }
            if let Some(v) = max_objects {
                quota.max_objects = parse(&v, false)?;
            }
            store.set_quota(&bucket, quota).await.map_err(e)?;
            println!("{bucket}: max bytes {:?}, max objects {:?}", quota.max_bytes, quota.max_objects);
        }
        S3Cmd::Key { cmd: KeyCmd::Delete { id } } => {
            store.delete_key(&id).await.map_err(e)?;
            println!("deleted access key {id}");
        }
    }
    Ok(())
}
