//! `helio verify`: re-hash a replica, optionally against an image.

use blockstore::{ChunkState, Image};
use protocol::{chunk::is_zero, ChunkHash};
use rayon::prelude::*;
use serde::Serialize;
use std::path::PathBuf;

/// Arguments of `helio verify`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    disk: super::args::StoreDisk,
    /// An image the replica must equal, byte for byte.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Print a JSON report as the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// One chunk that does not verify.
#[derive(Serialize)]
pub struct Mismatch {
    /// Chunk index.
    pub chunk: u64,
    /// Byte offset.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

#[derive(Serialize)]
struct Report {
    disk: String,
    chunks: u64,
    mismatches: Vec<Mismatch>,
    /// Chunk records that opening the replica dropped: the data file no longer backed them
    /// (missing, short, or other bytes). They are absent now and will be fetched again.
    repaired: usize,
    ok: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let store = a.disk.open()?;
    let replica = store.replica(&a.disk.name)?;
    let g = replica.geometry();
    let image = a.image.as_deref().map(Image::open).transpose()?;
    if let Some(img) = &image {
        if img.size() != g.size {
            anyhow::bail!(
                "image {} is {} bytes, replica {:?} is {} bytes",
                img.path().display(),
                img.size(),
                a.disk.name,
                g.size
            );
        }
    }
    let mismatches = check(&replica, image.as_ref())?;
    let repaired = replica.repaired();
    let ok = mismatches.is_empty() && repaired == 0;
    if a.json {
        let report = Report {
            disk: a.disk.name.clone(),
            chunks: g.chunk_count(),
            mismatches,
            repaired,
            ok,
        };
        println!("{}", serde_json::to_string(&report)?);
    } else {
        if repaired > 0 {
            println!(
                "{}: {repaired} chunk records did not match the data file and were dropped; \
                 those chunks are absent now: seed or sync again to fetch them",
                a.disk.name
            );
        }
        for m in &mismatches {
            println!("chunk {} (offset {}): {}", m.chunk, m.offset, m.reason);
        }
        if ok {
            println!(
                "{}: all {} chunks verified{}",
                a.disk.name,
                g.chunk_count(),
                if image.is_some() {
                    " and equal to the image"
                } else {
                    ""
                }
            );
        } else {
            println!(
                "{}: {} of {} chunks do not verify",
                a.disk.name,
                mismatches.len(),
                g.chunk_count()
            );
        }
    }
    Ok(if ok { 0 } else { 1 })
}

/// Re-hashes every chunk of `replica` against its record (and `image`, when given).
pub fn check(
    replica: &blockstore::Replica,
    image: Option<&Image>,
) -> anyhow::Result<Vec<Mismatch>> {
    let g = replica.geometry();
    let states = replica.states()?;
    let mut mismatches: Vec<Mismatch> = (0..g.chunk_count())
        .into_par_iter()
        .filter_map(|i| {
            let bad = |reason: String| {
                Some(Mismatch {
                    chunk: i,
                    offset: g.offset(i),
                    reason,
                })
            };
            let data = match replica.read_chunk(i) {
                Ok(d) => d,
                Err(e) => return bad(format!("unreadable: {e}")),
            };
            match states[i as usize] {
                None => return bad("absent (not seeded yet)".into()),
                Some(ChunkState::Zero) if !is_zero(&data) => {
                    return bad("recorded as zeros but holds data".into())
                }
                Some(ChunkState::Data(h)) if ChunkHash::of(&data) != h => {
                    return bad(format!(
                        "content hash {} differs from recorded {h}",
                        ChunkHash::of(&data)
                    ))
                }
                _ => {}
            }
            if let Some(img) = image {
                match img.read_chunk(&g, i) {
                    Ok(src) if src != data => {
                        return bad(format!(
                            "differs from the image (image {}, replica {})",
                            ChunkHash::of(&src),
                            ChunkHash::of(&data)
                        ))
                    }
                    Err(e) => return bad(format!("image unreadable: {e}")),
                    _ => {}
                }
            }
            None
        })
        .collect();
    mismatches.sort_by_key(|m| m.chunk);
    Ok(mismatches)
}
