//! `helio sample-image`: generate test images.

use crate::units::parse_size;
use std::path::PathBuf;

/// Arguments of `helio sample-image`.
#[derive(clap::Args)]
pub struct Args {
    /// Output path.
    #[arg(long)]
    out: PathBuf,
    /// Size (e.g. 4GiB); ignored with --base.
    #[arg(long, default_value = "256MiB")]
    size: String,
    /// Seed for the generator (same seed, same image).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Derive from this image instead: a copy with --replace of its regions rewritten.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Fraction of regions to rewrite with new random data, with --base.
    #[arg(long, default_value_t = 0.3)]
    replace: f64,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    match &a.base {
        Some(base) => {
            let n = crate::sample::derive_image(base, &a.out, a.replace, a.seed)?;
            println!(
                "wrote {} from {} with {n} regions replaced",
                a.out.display(),
                base.display()
            );
        }
        None => {
            crate::sample::write_image(&a.out, parse_size(&a.size)?, a.seed)?;
            println!("wrote {}", a.out.display());
        }
    }
    Ok(0)
}
