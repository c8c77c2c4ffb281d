//! `helio materialize`: write a replica out as a raw sparse image.

use anyhow::{bail, Context};
use blockstore::ChunkState;
use std::path::PathBuf;

/// Arguments of `helio materialize`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    disk: super::args::StoreDisk,
    /// The raw image to write (created or truncated).
    #[arg(long)]
    out: PathBuf,
    /// Write even if chunks are absent (they read as zeros).
    #[arg(long)]
    allow_partial: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let store = a.disk.open()?;
    let replica = store.replica(&a.disk.name)?;
    let g = replica.geometry();
    let states = replica.states()?;
    let absent = states.iter().filter(|s| s.is_none()).count();
    if absent > 0 && !a.allow_partial {
        bail!("disk {:?} is incomplete: {absent} of {} chunks are absent (finish `helio seed`, or pass --allow-partial)", a.disk.name, states.len());
    }
    let out = std::fs::File::create(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    out.set_len(g.size)
        .with_context(|| format!("cannot size {}", a.out.display()))?;
    let src = std::fs::File::open(replica.data_path())
        .with_context(|| format!("cannot open {}", replica.data_path().display()))?;
    // Runs of present chunks are copied in one call; zeros and absent chunks stay holes.
    let mut i = 0u64;
    let n = g.chunk_count();
    while i < n {
        if !matches!(
            states[i as usize],
            Some(ChunkState::Data(_) | ChunkState::Written)
        ) {
            i += 1;
            continue;
        }
        let start = i;
        while i < n
            && matches!(
                states[i as usize],
                Some(ChunkState::Data(_) | ChunkState::Written)
            )
        {
            i += 1;
        }
        let off = g.offset(start);
        let len = (g.offset(i).min(g.size) - off) as usize;
        blockstore::replica::copy_range(&src, off, &out, off, len)
            .with_context(|| format!("cannot write {}", a.out.display()))?;
    }
    out.sync_all()
        .with_context(|| format!("cannot sync {}", a.out.display()))?;
    println!("wrote {} ({} bytes)", a.out.display(), g.size);
    Ok(0)
}
