//! Block sums (the blake3 of each 4 KiB block), many blocks at a time.
//!
//! Why not `blake3::hash` per block: BLAKE3 parallelises within one input, and a 4 KiB input
//! has only 4 chunks, so each hash fills 4 of AVX-512's 16 lanes (2 of AVX2's 8 pairs). Hashed
//! block by block, the sums of a 1 MiB write ran at ~1.6 GB/s here and were 40% of a storage
//! node's CPU in sequential iSCSI writes (perf, `basalt bench iscsi`). The tree of a 4 KiB
//! input is always the same (4 chunks, 2 parents, 1 root), so the same compressions can run
//! across blocks instead: chunk `k` of every block at once (all with chunk counter `k`), then
//! every block's two parents, then every root. The blake3 crate exposes its SIMD kernel for
//! exactly that shape of work (`platform::hash_many`, which its own tree hashing uses) but no
//! public multi-input API, so this module drives the kernel itself. The kernel is documented
//! as unstable, so the workspace pins blake3 to one exact version, and the tests below check
//! every result against `blake3::hash` (all block counts across several SIMD widths, random
//! data), so an upgrade that changes the kernel's contract fails loudly instead of writing
//! wrong sums.

use crate::chunk::BlockSum;
use blake3::platform::Platform;
use blake3::IncrementCounter;
use std::sync::OnceLock;

const BLOCK: usize = crate::BLOCK_SIZE as usize;
const CHUNK: usize = blake3::CHUNK_LEN;
const CHUNKS: usize = BLOCK / CHUNK;
const OUT: usize = blake3::OUT_LEN;
/// Blocks hashed per pass: enough for several SIMD widths, small enough for the stack.
const BATCH: usize = 64;
/// Batches are a multiple of this many blocks (and smaller inputs are not batched).
const MIN_BATCH: usize = 8;

// From the BLAKE3 specification (section 2.1 and table 3): the IV (SHA-256's) is the key
// words of an unkeyed hash, and the domain flags.
const IV: [u32; 8] = [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19];
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;

const _: () = assert!(CHUNKS == 4, "the tree below is the one of a 4-chunk input");

fn platform() -> Platform {
    static PLATFORM: OnceLock<Platform> = OnceLock::new();
    *PLATFORM.get_or_init(Platform::detect)
}

/// The blake3 of each whole `BLOCK_SIZE` block of `data`, in order (a partial block at the end
/// is left out). Equal to `blake3::hash` of each block.
pub fn block_sums(data: &[u8]) -> Vec<BlockSum> {
    let n = data.len() / BLOCK;
    let mut sums = vec![[0u8; OUT]; n];
    let platform = platform();
    // Whole lanes' worth across blocks; the few blocks left over are hashed one by one, each
    // with its own 4 chunks in parallel (`blake3::hash`), which beats a batch that fills
    // fewer lanes than that: measured here (AVX-512), one block alone took 4.8 µs batched
    // and 1.4 µs by `blake3::hash`; batches of 8 or more take 0.8 µs a block.
    let batched = n - n % MIN_BATCH;
    for (batch, out) in data[..batched * BLOCK].chunks(BATCH * BLOCK).zip(sums[..batched].chunks_mut(BATCH)) {
        hash_batch(platform, batch, out);
    }
    for (block, sum) in data[batched * BLOCK..n * BLOCK].chunks_exact(BLOCK).zip(&mut sums[batched..]) {
        *sum = *blake3::hash(block).as_bytes();
    }
    sums
}

/// `batch` is `out.len()` (at most `BATCH`) whole blocks.
fn hash_batch(platform: Platform, batch: &[u8], out: &mut [BlockSum]) {
    let m = out.len();
    let (blocks, _) = batch.as_chunks::<BLOCK>();
    // The chunk chaining values of each block side by side: [c0 c1 c2 c3], so that (c0 c1) and
    // (c2 c3) are the 64-byte inputs of its two parents.
    let mut cvs = [0u8; BATCH * CHUNKS * OUT];
    let mut cv = [0u8; BATCH * OUT];
    for k in 0..CHUNKS {
        let inputs: Vec<&[u8; CHUNK]> = blocks.iter().map(|b| &b.as_chunks::<CHUNK>().0[k]).collect();
        platform.hash_many(&inputs, &IV, k as u64, IncrementCounter::No, 0, CHUNK_START, CHUNK_END, &mut cv[..m * OUT]);
        for (b, c) in cv[..m * OUT].chunks_exact(OUT).enumerate() {
            cvs[(b * CHUNKS + k) * OUT..][..OUT].copy_from_slice(c);
        }
    }
    // Parents: each block's (c0 c1) and (c2 c3), which land side by side as its root input.
    let mut parents = [0u8; BATCH * 2 * OUT];
    let inputs: Vec<&[u8; 2 * OUT]> = cvs[..m * CHUNKS * OUT].as_chunks::<{ 2 * OUT }>().0.iter().collect();
    platform.hash_many(&inputs, &IV, 0, IncrementCounter::No, PARENT, 0, 0, &mut parents[..m * 2 * OUT]);
    // Roots: the first 32 bytes of a root's output are its hash.
    let inputs: Vec<&[u8; 2 * OUT]> = parents[..m * 2 * OUT].as_chunks::<{ 2 * OUT }>().0.iter().collect();
    let mut roots = [0u8; BATCH * OUT];
    platform.hash_many(&inputs, &IV, 0, IncrementCounter::No, PARENT | ROOT, 0, 0, &mut roots[..m * OUT]);
    for (sum, r) in out.iter_mut().zip(roots.chunks_exact(OUT)) {
        sum.copy_from_slice(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<u8> {
        use rand::{RngCore, SeedableRng};
        let mut d = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut d);
        d
    }

    #[test]
    fn equal_to_blake3_hash_of_each_block_for_every_count() {
        for n in 0..=(2 * BATCH + 17) {
            let d = data(n * BLOCK, n as u64 + 1);
            let want: Vec<BlockSum> = d.chunks_exact(BLOCK).map(|b| *blake3::hash(b).as_bytes()).collect();
            assert_eq!(block_sums(&d), want, "{n} blocks");
        }
    }

    #[test]
    fn a_batch_of_every_size_is_right() {
        // block_sums only batches multiples of MIN_BATCH; the kernel must hold for any count.
        for m in 1..=BATCH {
            let d = data(m * BLOCK, 1000 + m as u64);
            let want: Vec<BlockSum> = d.chunks_exact(BLOCK).map(|b| *blake3::hash(b).as_bytes()).collect();
            let mut got = vec![[0u8; OUT]; m];
            hash_batch(platform(), &d, &mut got);
            assert_eq!(got, want, "{m} blocks");
        }
    }

    #[test]
    fn zeros_and_a_trailing_partial_block() {
        let mut d = vec![0u8; 3 * BLOCK + 100];
        d[BLOCK + 5] = 1;
        let sums = block_sums(&d);
        assert_eq!(sums.len(), 3);
        assert_eq!(sums[0], *blake3::hash(&[0u8; BLOCK]).as_bytes());
        assert_eq!(sums[1], *blake3::hash(&d[BLOCK..2 * BLOCK]).as_bytes());
        assert!(block_sums(&d[..BLOCK - 1]).is_empty());
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn every_platform_kernel_agrees() {
        // The kernels this machine has (the detected one is the widest), and the portable
        // one, on one uneven batch.
        let d = data(37 * BLOCK, 99);
        let want: Vec<BlockSum> = d.chunks_exact(BLOCK).map(|b| *blake3::hash(b).as_bytes()).collect();
        let kernels =
            [Some(Platform::portable()), Platform::sse2(), Platform::sse41(), Platform::avx2(), Some(Platform::detect())];
        for p in kernels.into_iter().flatten() {
            let mut got = vec![[0u8; OUT]; 37];
            hash_batch(p, &d, &mut got);
            assert_eq!(got, want, "{p:?}");
        }
    }
}
