//! Sample disk images: 256 KiB regions of random bytes, zeros and log-like text, the mix used by
//! heliotrope's tests, benchmarks and demo (and by the anchor measurements in shared/ANCHORS.md).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Size of one region.
pub const REGION: usize = 256 * 1024;

/// Fills `buf` with a region's content of the given kind, deterministically from `seed`.
fn fill(buf: &mut [u8], kind: u32, seed: u64) {
    match kind {
        0 => buf.fill(0),
        1 => {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&seed.to_le_bytes());
            blake3::Hasher::new_keyed(&key).finalize_xof().fill(buf);
        }
        _ => {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut out = Vec::with_capacity(buf.len() + 256);
            let daemons = ["sshd", "kernel", "nginx", "postgres", "systemd", "cron"];
            let verbs = [
                "accepted connection from",
                "served GET /api/v1/items for",
                "checkpoint complete at",
                "session opened for",
                "timeout waiting for",
            ];
            while out.len() < buf.len() {
                let _ = writeln!(
                    out,
                    "2026-11-{:02}T{:02}:{:02}:{:02}.{:03}Z host-{:02} {}[{}]: {} 10.{}.{}.{} port {} id={:08x}",
                    rng.gen_range(1..29),
                    rng.gen_range(0..24),
                    rng.gen_range(0..60),
                    rng.gen_range(0..60),
                    rng.gen_range(0..1000),
                    rng.gen_range(0..40),
                    daemons[rng.gen_range(0..daemons.len())],
                    rng.gen_range(100..30000),
                    verbs[rng.gen_range(0..verbs.len())],
                    rng.gen_range(0..4),
                    rng.gen_range(0..255),
                    rng.gen_range(1..255),
                    rng.gen_range(1024..65535),
                    rng.gen::<u32>(),
                );
            }
            buf.copy_from_slice(&out[..buf.len()]);
        }
    }
}

/// Writes a fresh image of `size` bytes: per region, 50% random, 25% zero, 25% text.
pub fn write_image(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; REGION];
    let regions = size.div_ceil(REGION as u64);
    for r in 0..regions {
        let roll = rng.gen_range(0..4);
        let kind = match roll {
            0 | 1 => 1,
            2 => 0,
            _ => 2,
        };
        let off = r * REGION as u64;
        let len = (size - off).min(REGION as u64) as usize;
        if kind == 0 {
            continue; // sparse
        }
        fill(
            &mut buf[..len],
            kind,
            seed.wrapping_mul(1_000_003).wrapping_add(r),
        );
        f.write_all_at(&buf[..len], off)?;
    }
    f.sync_all()
}

/// Writes a copy of `base` into `path` with a fraction `replace` of its regions replaced by new
/// random bytes (a disk that shares the rest with `base`). Returns the regions replaced.
pub fn derive_image(base: &Path, path: &Path, replace: f64, seed: u64) -> std::io::Result<u64> {
    let src = std::fs::File::open(base)?;
    let size = src.metadata()?.len();
    let dst = std::fs::File::create(path)?;
    dst.set_len(size)?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut buf = vec![0u8; REGION];
    let mut replaced = 0;
    let regions = size.div_ceil(REGION as u64);
    for r in 0..regions {
        let off = r * REGION as u64;
        let len = (size - off).min(REGION as u64) as usize;
        if rng.gen_bool(replace.clamp(0.0, 1.0)) {
            fill(
                &mut buf[..len],
                1,
                seed.wrapping_mul(7_000_003).wrapping_add(r) ^ 0xd15c,
            );
            replaced += 1;
        } else {
            src.read_exact_at(&mut buf[..len], off)?;
            if buf[..len].iter().all(|&b| b == 0) {
                continue;
            }
        }
        dst.write_all_at(&buf[..len], off)?;
    }
    dst.sync_all()?;
    Ok(replaced)
}
