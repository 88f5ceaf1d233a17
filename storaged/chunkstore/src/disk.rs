//! One data directory: its identity file, its lock, where replicas and epochs live in it, and
//! the atomic small-file writes everything persistent here goes through.

use crate::error::{Error, IoContext, Result};
use basalt_types::{ChunkId, ChunkVersion, Epoch, VolumeId};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

const IDENTITY_FILE: &str = "disk.json";
const LOCK_FILE: &str = "lock";
const CHUNKS_DIR: &str = "chunks";
const EPOCHS_DIR: &str = "epochs";
const JOURNAL_FILE: &str = "journal";
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Identity {
    format: u32,
    disk: u32,
    uuid: String,
}

/// Version and size of one replica, kept in its `.meta` file.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ReplicaMeta {
    pub version: ChunkVersion,
    pub chunk_size: u64,
    /// Random per creation (0 in replicas made before the journal existed); see `Replica::nonce`.
    #[serde(default)]
    pub nonce: u64,
}

/// A replica found by the scan at open.
pub(crate) struct FoundReplica {
    pub chunk: ChunkId,
    pub meta: ReplicaMeta,
}

/// Where the three files of one replica live.
#[derive(Clone, Debug)]
pub(crate) struct ReplicaPaths {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub sums: PathBuf,
    pub meta_name: String,
}

pub(crate) struct Disk {
    pub index: u32,
    pub root: PathBuf,
    pub uuid: String,
    /// Held for the life of the store so a second process cannot open the same directory and
    /// interleave writes with ours.
    _lock: Flock<File>,
}

impl Disk {
    /// Opens (creating if needed) the data directory of disk `index`, checking its identity.
    pub fn open(index: u32, root: PathBuf) -> Result<Disk> {
        fs::create_dir_all(&root).at(&root)?;
        let lock_path = root.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .at(&lock_path)?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            Error::BadDisk(format!("{} is in use by another process ({errno})", root.display()))
        })?;

        let id_path = root.join(IDENTITY_FILE);
        let uuid = match fs::read(&id_path) {
            Ok(bytes) => {
                let id: Identity = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::BadDisk(format!("{}: unreadable identity: {e}", id_path.display()))
                })?;
                if id.format != FORMAT {
                    return Err(Error::BadDisk(format!(
                        "{}: format {} is not the supported {FORMAT}",
                        id_path.display(),
                        id.format
                    )));
                }
                if id.disk != index {
                    return Err(Error::BadDisk(format!(
                        "{} is disk {} (uuid {}), but was given as disk {index}; \
                         the order of data directories must not change",
                        root.display(),
                        id.disk,
                        id.uuid
                    )));
                }
                id.uuid
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let uuid = new_uuid();
                let id = Identity { format: FORMAT, disk: index, uuid: uuid.clone() };
                let bytes = serde_json::to_vec_pretty(&id)
                    .map_err(|e| Error::BadDisk(format!("cannot encode identity: {e}")))?;
                write_atomic(&root, IDENTITY_FILE, &bytes)?;
                tracing::info!(disk = index, path = %root.display(), %uuid, "initialised data directory");
                uuid
            }
            Err(e) => return Err(Error::io(&id_path, e)),
        };
        for sub in [CHUNKS_DIR, EPOCHS_DIR] {
            let p = root.join(sub);
            if !p.is_dir() {
                fs::create_dir(&p).at(&p)?;
                fsync_dir(&root)?;
            }
        }
        Ok(Disk { index, root, uuid, _lock: lock })
    }

    pub fn journal_path(&self) -> PathBuf {
        self.root.join(JOURNAL_FILE)
    }

    pub fn chunks_dir(&self) -> PathBuf {
        self.root.join(CHUNKS_DIR)
    }

    pub fn volume_dir(&self, volume: VolumeId) -> PathBuf {
        self.chunks_dir().join(volume.to_string())
    }

    pub fn replica_paths(&self, chunk: ChunkId) -> ReplicaPaths {
        let dir = self.volume_dir(chunk.volume);
        ReplicaPaths {
            data: dir.join(format!("{}.data", chunk.index)),
            sums: dir.join(format!("{}.sums", chunk.index)),
            meta_name: format!("{}.meta", chunk.index),
            dir,
        }
    }

    /// Makes sure the volume directory exists and its entry is durable.
    pub fn ensure_volume_dir(&self, volume: VolumeId) -> Result<PathBuf> {
        let dir = self.volume_dir(volume);
        if !dir.is_dir() {
            match fs::create_dir(&dir) {
                Ok(()) => fsync_dir(&self.chunks_dir())?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(&dir, e)),
            }
        }
        Ok(dir)
    }

    /// Lists the replicas of this disk. Cleans up what an interrupted creation or deletion left
    /// behind: a replica exists exactly when its `.meta` file does (it is written last on
    /// creation and removed first on deletion), so `.data`/`.sums` without one are garbage.
    pub fn scan(&self) -> Result<Vec<FoundReplica>> {
        let mut found = Vec::new();
        let chunks = self.chunks_dir();
        for vol_entry in fs::read_dir(&chunks).at(&chunks)? {
            let vol_entry = vol_entry.at(&chunks)?;
            let name = vol_entry.file_name();
            let Some(volume) = name.to_str().and_then(|s| s.parse::<VolumeId>().ok()) else {
                tracing::warn!(disk = self.index, path = %vol_entry.path().display(), "unexpected entry in chunks directory");
                continue;
            };
            let dir = vol_entry.path();
            let mut metas: HashMap<u64, ReplicaMeta> = HashMap::new();
            let mut others: Vec<(u64, PathBuf)> = Vec::new();
            for entry in fs::read_dir(&dir).at(&dir)? {
                let entry = entry.at(&dir)?;
                let path = entry.path();
                let fname = entry.file_name();
                let Some(fname) = fname.to_str() else { continue };
                if fname.ends_with(".tmp") {
                    fs::remove_file(&path).at(&path)?;
                    continue;
                }
                let Some((stem, ext)) = fname.split_once('.') else { continue };
                let Ok(index) = stem.parse::<u64>() else { continue };
                match ext {
                    "meta" => match fs::read(&path).map(|b| serde_json::from_slice::<ReplicaMeta>(&b)) {
                        Ok(Ok(meta)) => {
                            metas.insert(index, meta);
                        }
                        // Not deleted: an operator may want to look at it. It is not listed, so
                        // the cluster treats the replica as missing and re-replicates.
                        Ok(Err(e)) => tracing::error!(path = %path.display(), error = %e, "unreadable replica metadata; ignoring replica"),
                        Err(e) => return Err(Error::io(&path, e)),
                    },
                    "data" | "sums" => others.push((index, path)),
                    _ => {}
                }
            }
            for (index, path) in others {
                if !metas.contains_key(&index) {
                    tracing::info!(path = %path.display(), "removing leftover of an unfinished replica creation or deletion");
                    fs::remove_file(&path).at(&path)?;
                }
            }
            found.extend(
                metas.into_iter().map(|(index, meta)| FoundReplica { chunk: ChunkId { volume, index }, meta }),
            );
        }
        Ok(found)
    }

    pub fn load_epochs(&self) -> Result<HashMap<VolumeId, Epoch>> {
        let dir = self.root.join(EPOCHS_DIR);
        let mut epochs = HashMap::new();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            let path = entry.path();
            let fname = entry.file_name();
            let Some(fname) = fname.to_str() else { continue };
            if fname.ends_with(".tmp") {
                fs::remove_file(&path).at(&path)?;
                continue;
            }
            let Ok(volume) = fname.parse::<VolumeId>() else { continue };
            let text = fs::read_to_string(&path).at(&path)?;
            match text.trim().parse::<Epoch>() {
                Ok(epoch) => {
                    epochs.insert(volume, epoch);
                }
                // Another disk of the node normally has the same record; the store takes the
                // maximum over all disks.
                Err(e) => tracing::error!(path = %path.display(), error = %e, "unreadable epoch record"),
            }
        }
        Ok(epochs)
    }

    pub fn store_epoch(&self, volume: VolumeId, epoch: Epoch) -> Result<()> {
        write_atomic(&self.root.join(EPOCHS_DIR), &volume.to_string(), epoch.to_string().as_bytes())
    }
}

/// Replaces `dir/name` with `bytes` so that after a crash the file holds either the old or the
/// new contents: write a temporary file, fsync it, rename it over, fsync the directory.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    {
        let mut f = File::create(&tmp).at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        f.sync_all().at(&tmp)?;
    }
    fs::rename(&tmp, &path).at(&path)?;
    fsync_dir(dir)
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

pub(crate) fn write_meta(paths: &ReplicaPaths, meta: &ReplicaMeta) -> Result<()> {
    let bytes = serde_json::to_vec(meta).map_err(|e| Error::BadDisk(format!("cannot encode replica metadata: {e}")))?;
    write_atomic(&paths.dir, &paths.meta_name, &bytes)
}

/// A random (version 4) UUID in the usual text form.
fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}
