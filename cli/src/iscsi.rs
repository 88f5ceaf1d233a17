//! `basalt iscsi ...`: targets, LUNs, CHAP and initiator ACLs, stored in cluster metadata
//! (every node's target serves them; changes apply to new logins, and end the live sessions
//! they shut out), and the sessions logged in through every node.

use anyhow::{anyhow, Result};
use basalt_iscsi::cluster::{self, LunDef, TargetDef};
use basalt_iscsi::lu::Chap;
use basalt_storaged_client::StorageClient;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum IscsiCmd {
    /// Create a target (an iSCSI name such as iqn.2026-11.io.basalt:db1).
    Create {
        name: String,
        #[arg(long)]
        alias: Option<String>,
    },
    /// Delete a target (its volumes are kept).
    Delete { name: String },
    /// List targets with their LUNs, CHAP user and ACL.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Export a volume as a LUN of a target.
    LunAdd {
        target: String,
        #[arg(long)]
        lun: u64,
        #[arg(long)]
        volume: String,
        /// Export it read-only: initiators see a write-protected disk, writes fail with
        /// DATA PROTECT, and the LUN never takes the volume's write lease.
        #[arg(long)]
        read_only: bool,
    },
    /// Remove a LUN from a target (the volume is kept).
    LunRemove {
        target: String,
        #[arg(long)]
        lun: u64,
    },
    /// Require CHAP for the target (secrets of 12 to 255 bytes); with --mutual-user and
    /// --mutual-secret the target also proves itself to the initiator.
    ChapSet {
        target: String,
        #[arg(long)]
        user: String,
        #[arg(long)]
        secret: String,
        #[arg(long, requires = "mutual_secret")]
        mutual_user: Option<String>,
        #[arg(long, requires = "mutual_user")]
        mutual_secret: Option<String>,
    },
    /// Stop requiring CHAP.
    ChapClear { target: String },
    /// Allow an initiator name (once any is listed, only listed initiators may log in).
    AclAdd { target: String, initiator: String },
    AclRemove { target: String, initiator: String },
    /// List the sessions logged in through every node's portal.
    Sessions {
        /// Only the sessions of this target.
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(client: &StorageClient, cmd: IscsiCmd) -> Result<()> {
    let e = |m: String| anyhow!(m);
    match cmd {
        IscsiCmd::Create { name, alias } => {
            if cluster::get_target(client, &name).await.map_err(e)?.is_some() {
                return Err(anyhow!("target {name} already exists"));
            }
            cluster::update_target(client, &name, true, |t| {
                t.alias = alias.clone();
                Ok(())
            })
            .await
            .map_err(e)?;
            println!("target {name} created");
        }
        IscsiCmd::Delete { name } => {
            cluster::delete_target(client, &name).await.map_err(e)?;
            println!("target {name} deleted");
        }
        IscsiCmd::List { json } => {
            let targets = cluster::list_targets(client).await.map_err(e)?;
            let portals = cluster::live_portals(client).await.map_err(e)?;
            if json {
                // Secrets stay out of listings.
                let shown: Vec<serde_json::Value> = targets
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "name": t.name,
                            "alias": t.alias,
                            "luns": t.luns,
                            "chap_user": t.chap.as_ref().map(|c| c.user.clone()),
                            "mutual_chap": t.chap.as_ref().is_some_and(|c| c.mutual.is_some()),
                            "initiators": t.initiators,
                        })
                    })
                    .collect();
                let portals: Vec<String> = portals.values().map(|a| a.to_string()).collect();
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "targets": shown, "portals": portals }))?);
                return Ok(());
            }
            if targets.is_empty() {
                println!("no targets");
            }
            for t in &targets {
                let auth = match &t.chap {
                    None => "no CHAP".to_string(),
                    Some(c) if c.mutual.is_some() => format!("mutual CHAP (user {})", c.user),
                    Some(c) => format!("CHAP (user {})", c.user),
                };
                let acl = if t.initiators.is_empty() { "any initiator".to_string() } else { t.initiators.join(", ") };
                println!("{}  [{auth}; {acl}]", t.name);
                for l in &t.luns {
                    println!("  LUN {:<4} volume {}{}", l.lun, l.volume, if l.read_only { " (read-only)" } else { "" });
                }
            }
            let list: Vec<String> = portals.iter().map(|(n, a)| format!("{a} (node {n})")).collect();
            println!("portals: {}", if list.is_empty() { "none".into() } else { list.join(", ") });
        }
        IscsiCmd::LunAdd { target, lun, volume, read_only } => {
            cluster::update_target(client, &target, false, |t| {
                if t.luns.iter().any(|l| l.lun == lun) {
                    return Err(format!("LUN {lun} of {target} is already in use"));
                }
                t.luns.push(LunDef { lun, volume: volume.clone(), read_only });
                t.luns.sort_by_key(|l| l.lun);
                Ok(())
            })
            .await
            .map_err(e)?;
            println!("volume {volume} is LUN {lun} of {target}{}", if read_only { ", read-only" } else { "" });
        }
        IscsiCmd::LunRemove { target, lun } => {
            cluster::update_target(client, &target, false, |t| {
                let before = t.luns.len();
                t.luns.retain(|l| l.lun != lun);
                if t.luns.len() == before {
                    return Err(format!("{target} has no LUN {lun}"));
                }
                Ok(())
            })
            .await
            .map_err(e)?;
            println!("LUN {lun} removed from {target}");
        }
        IscsiCmd::ChapSet { target, user, secret, mutual_user, mutual_secret } => {
            let mutual = mutual_user.zip(mutual_secret);
            cluster::update_target(client, &target, false, |t: &mut TargetDef| {
                t.chap = Some(Chap { user: user.clone(), secret: secret.clone(), mutual: mutual.clone() });
                Ok(())
            })
            .await
            .map_err(e)?;
            println!("CHAP required for {target}");
        }
        IscsiCmd::ChapClear { target } => {
            cluster::update_target(client, &target, false, |t| {
                t.chap = None;
                Ok(())
            })
            .await
            .map_err(e)?;
            println!("CHAP no longer required for {target}");
        }
        IscsiCmd::AclAdd { target, initiator } => {
            cluster::update_target(client, &target, false, |t| {
                if !t.initiators.contains(&initiator) {
                    t.initiators.push(initiator.clone());
                }
                Ok(())
            })
            .await
            .map_err(e)?;
            println!("{initiator} may log in to {target}");
        }
        IscsiCmd::AclRemove { target, initiator } => {
            cluster::update_target(client, &target, false, |t| {
                let before = t.initiators.len();
                t.initiators.retain(|i| i != &initiator);
                if t.initiators.len() == before {
                    return Err(format!("{initiator} is not in the ACL of {target}"));
                }
                Ok(())
            })
            .await
            .map_err(e)?;
            println!("{initiator} removed from the ACL of {target}");
        }
        IscsiCmd::Sessions { target, json } => {
            let (answered, silent) = client.iscsi_sessions().await?;
            let mut rows: Vec<(&basalt_types::NodeInfo, &basalt_types::IscsiSession)> = answered
                .iter()
                .flat_map(|(n, list)| list.iter().map(move |s| (n, s)))
                .filter(|(_, s)| target.as_ref().is_none_or(|t| &s.target == t))
                .collect();
            rows.sort_by(|a, b| (&a.1.target, &a.1.initiator, a.0.id).cmp(&(&b.1.target, &b.1.initiator, b.0.id)));
            if json {
                let shown: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(n, s)| {
                        serde_json::json!({
                            "node": n.name,
                            "node_id": n.id,
                            "target": s.target,
                            "initiator": s.initiator,
                            "isid": hex_isid(&s.isid),
                            "tsih": s.tsih,
                            "peer": s.peer,
                            "since_ms": s.since_ms,
                            "chap": s.chap,
                            "header_digest": s.header_digest,
                            "data_digest": s.data_digest,
                        })
                    })
                    .collect();
                let silent: Vec<&str> = silent.iter().map(|n| n.name.as_str()).collect();
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "sessions": shown, "unreachable": silent }))?);
                return Ok(());
            }
            if rows.is_empty() {
                println!("no sessions");
            }
            let now = std::time::SystemTime::now();
            for (n, s) in &rows {
                let since = std::time::UNIX_EPOCH + std::time::Duration::from_millis(s.since_ms);
                let age = now.duration_since(since).unwrap_or_default();
                let age = humantime::format_duration(std::time::Duration::from_secs(age.as_secs()));
                let isid = hex_isid(&s.isid);
                let auth = if s.chap { "CHAP" } else { "no auth" };
                let digests = match (s.header_digest, s.data_digest) {
                    (false, false) => "no digests",
                    (true, false) => "header digest",
                    (false, true) => "data digest",
                    (true, true) => "header+data digests",
                };
                println!(
                    "{}  {}  ISID {isid} TSIH {}  via {} from {}  {auth}, {digests}, up {age}",
                    s.target,
                    s.initiator,
                    s.tsih,
                    n.name,
                    s.peer.as_deref().unwrap_or("?"),
                );
            }
            for n in &silent {
                println!("node {} did not answer: its sessions are not listed", n.name);
            }
        }
    }
    Ok(())
}

fn hex_isid(isid: &[u8; 6]) -> String {
    isid.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deletes a volume unless an iSCSI target exports it: a LUN whose volume is gone fails
/// every command of the sessions that use it, so the LUN must be removed first.
pub async fn delete_volume_unless_exported(client: &StorageClient, name: &str) -> Result<()> {
    let exports = cluster::exports_of_volume(client, name).await.map_err(|m| anyhow!(m))?;
    if let Some((target, lun)) = exports.first() {
        let all: Vec<String> = exports.iter().map(|(t, l)| format!("LUN {l} of {t}")).collect();
        return Err(anyhow!(
            "volume {name} is exported as {}; remove it first (basalt iscsi lun-remove {target} --lun {lun})",
            all.join(", ")
        ));
    }
    client.delete_volume(name).await?;
    Ok(())
}
