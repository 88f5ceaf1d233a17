//! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/`) through the entry points
//! the cargo-fuzz targets call, so every test run on stable checks the same invariants on
//! the seeds and on every input fuzzing ever kept.

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    // The runtime value first: cargo and nextest set it for the test process, and a binary
    // reused from a build cache made in another checkout would carry that checkout's path.
    let root = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let dir = root.join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{target}: corpus has {} files, expected seeds", files.len());
    for f in files {
        let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        // Name the input on failure: the panic message alone does not say which file.
        if let Err(e) = std::panic::catch_unwind(|| run(&data)) {
            eprintln!("corpus input {} failed", f.display());
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn pdu_corpus_decodes_and_round_trips() {
    replay("pdu", basalt_iscsi::fuzzing::pdu);
}

#[test]
fn login_keys_corpus_negotiates_without_breaking_invariants() {
    replay("login_keys", basalt_iscsi::fuzzing::login_keys);
}

#[test]
fn scsi_cdb_corpus_executes_with_bounded_data_and_valid_sense() {
    replay("scsi_cdb", basalt_iscsi::fuzzing::scsi_cdb);
}

/// Every opcode the unit supports, sent with its CDB usage map as the CDB (every bit we
/// evaluate set, so allocation lengths are at their largest) and the NACA bit cleared:
/// the fuzz target's data-in limits must know each command that returns data, or a new
/// command would only be caught by a nightly fuzz run.
#[test]
fn every_supported_opcode_respects_the_fuzz_targets_data_in_limits() {
    let commands: Vec<Vec<u8>> = basalt_iscsi::scsi::opcodes::OPS
        .iter()
        .map(|o| {
            let mut cdb = o.usage.to_vec();
            if let Some(control) = cdb.last_mut() {
                *control = 0;
            }
            let mut c = vec![0, u8::try_from(cdb.len()).expect("CDB length")]; // LUN 0
            c.extend_from_slice(&cdb);
            c.extend_from_slice(&[0, 0]); // no Data-Out
            c
        })
        .collect();
    // The entry point runs at most 32 commands per input.
    for batch in commands.chunks(32) {
        basalt_iscsi::fuzzing::scsi_cdb(&batch.concat());
    }
}
