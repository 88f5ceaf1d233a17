//! openraft's storage conformance suite against the RocksDB log store and state machine.

use basalt_meta::store::{open_db, open_stores, LogStore, StateMachineStore};
use basalt_meta::TypeConfig;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{StorageError, StorageIOError};
use tempfile::TempDir;

/// Every store the suite asks for gets a fresh database in its own temp dir, removed when
/// the suite drops the guard.
struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let dir = TempDir::new().map_err(|e| StorageIOError::write(&e))?;
        let db = open_db(dir.path()).map_err(|e| StorageIOError::write(&e))?;
        let (log, sm) = open_stores(db).map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn rocksdb_store_passes_openraft_suite() -> Result<(), StorageError<u64>> {
    Suite::test_all(RocksBuilder)?;
    Ok(())
}

mod persistence {
    use basalt_meta::store::{open_db, open_stores};
    use basalt_types::{MetaCommand, MetaReply};
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftSnapshotBuilder, StoredMembership};
    use std::collections::BTreeSet;

    fn log_id(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn create(name: &str) -> MetaCommand {
        MetaCommand::CreateVolume { name: name.into(), size: 1 << 30, chunk_size: 64 << 20, now_ms: 1 }
    }

    #[tokio::test]
    async fn state_machine_is_loaded_from_rocksdb_on_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let membership = Membership::new(vec![BTreeSet::from([1u64, 2, 3])], None);
        {
            let (_log, mut sm) = open_stores(open_db(dir.path()).expect("open")).expect("stores");
            let replies = sm
                .apply([
                    Entry { log_id: log_id(1, 1), payload: EntryPayload::Membership(membership.clone()) },
                    Entry { log_id: log_id(1, 2), payload: EntryPayload::Normal(create("a")) },
                    Entry { log_id: log_id(1, 3), payload: EntryPayload::Normal(create("a")) },
                ])
                .await
                .expect("apply");
            assert_eq!(replies[0], MetaReply::Ok);
            assert!(matches!(replies[1], MetaReply::Volume(_)), "{:?}", replies[1]);
            assert!(matches!(replies[2], MetaReply::Error(_)), "duplicate name refused: {:?}", replies[2]);
        }
        // Nothing is replayed here: the map comes from the `sm` column family.
        let (_log, mut sm) = open_stores(open_db(dir.path()).expect("reopen")).expect("stores");
        let (applied, stored) = sm.applied_state().await.expect("applied state");
        assert_eq!(applied, Some(log_id(1, 3)));
        assert_eq!(stored, StoredMembership::new(Some(log_id(1, 1)), membership));
        let map = sm.map();
        let map = map.read().expect("map lock");
        assert_eq!(map.volumes().count(), 1);
        assert!(map.volume_by_name("a").is_some());
    }

    #[tokio::test]
    async fn installed_snapshot_replaces_state_and_survives_restart() {
        let leader_dir = tempfile::tempdir().expect("tempdir");
        let follower_dir = tempfile::tempdir().expect("tempdir");
        let (_l, mut leader) = open_stores(open_db(leader_dir.path()).expect("open")).expect("stores");
        leader
            .apply([
                Entry { log_id: log_id(1, 1), payload: EntryPayload::Normal(create("x")) },
                Entry { log_id: log_id(1, 2), payload: EntryPayload::Normal(create("y")) },
            ])
            .await
            .expect("apply");
        let snap = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");

        {
            let (_f, mut follower) = open_stores(open_db(follower_dir.path()).expect("open")).expect("stores");
            // State the snapshot must wipe out.
            follower
                .apply([Entry { log_id: log_id(1, 1), payload: EntryPayload::Normal(create("stale")) }])
                .await
                .expect("apply");
            follower.install_snapshot(&snap.meta, snap.snapshot.clone()).await.expect("install");
            let map = follower.map();
            let names: BTreeSet<String> =
                map.read().expect("map lock").volumes().map(|v| v.name.clone()).collect();
            assert_eq!(names, BTreeSet::from(["x".to_string(), "y".to_string()]));
        }
        let (_f, mut follower) = open_stores(open_db(follower_dir.path()).expect("reopen")).expect("stores");
        assert_eq!(follower.applied_state().await.expect("applied").0, Some(log_id(1, 2)));
        let current = follower.get_current_snapshot().await.expect("read snapshot").expect("a snapshot");
        assert_eq!(current.meta, snap.meta);
        let map = follower.map();
        let map = map.read().expect("map lock");
        assert!(map.volume_by_name("stale").is_none());
        assert!(map.volume_by_name("x").is_some() && map.volume_by_name("y").is_some());
    }
}
