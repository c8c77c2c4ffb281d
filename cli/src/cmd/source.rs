//! `helio source`: serve disks to destination agents.

use crate::progress::bytes_bar;
use crate::units::{check_name, parse_size};
use anyhow::{bail, Context};
use blockstore::{catalog::ManifestOrigin, Catalog, Image};
use protocol::Geometry;
use server::{Acceptor, Source, SourceDisk};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Arguments of `helio source`.
#[derive(clap::Args)]
pub struct Args {
    /// A raw image file or block device to serve (repeat with --name for several disks).
    #[arg(long, required = true)]
    image: Vec<PathBuf>,
    /// The name destinations use for the disk of the --image at the same position.
    #[arg(long, required = true)]
    name: Vec<String>,
    /// Address to listen on (HOST:PORT); plain TCP only on loopback.
    #[arg(long)]
    listen: String,
    /// Directory for the source's state (manifests, in RocksDB).
    #[arg(long)]
    state: PathBuf,
    /// Directory with cert.pem, key.pem and ca.pem (from `helio pki issue`).
    #[arg(long)]
    tls: Option<PathBuf>,
    /// Chunk size, a power of two from 4KiB to 1MiB.
    #[arg(long, default_value = "64KiB")]
    chunk_size: String,
    /// Also serve the disks to the local VM over NBD (unix:PATH or HOST:PORT), tracking every
    /// write for `helio sync`. The NBD export name is the disk name.
    #[arg(long)]
    nbd: Option<server::nbd::listener::NbdAddr>,
    /// Take dirty extents from this QEMU persistent dirty bitmap of the NBD images
    /// (`--image 'nbd+unix:///NAME?socket=PATH'`, exported with `qemu-nbd -B BITMAP`).
    #[arg(long)]
    dirty_bitmap: Option<String>,
    /// zstd level for chunks on the wire (negative levels are faster still).
    #[arg(long, default_value_t = protocol::codec::DEFAULT_LEVEL, allow_hyphen_values = true)]
    compress_level: i32,
}

/// Opens each image and gets its manifest from the catalog (scanning with a progress bar).
pub fn load_disks(
    state: &Path,
    images: &[(PathBuf, String)],
    chunk_size: u64,
    track: bool,
    bitmap: Option<&str>,
) -> anyhow::Result<Vec<SourceDisk>> {
    let catalog = Arc::new(
        Catalog::open(state)
            .with_context(|| format!("cannot open source state {}", state.display()))?,
    );
    let mut disks = Vec::new();
    for (path, name) in images {
        check_name(name)?;
        let nbd = path
            .to_str()
            .and_then(blockstore::nbd_client::NbdUri::parse);
        let image = match (&nbd, bitmap) {
            (Some(uri), Some(b)) => Image::open_nbd(uri, path, Some(b))?,
            (None, Some(_)) => bail!(
                "--dirty-bitmap needs an NBD image (nbd+unix:///NAME?socket=PATH), not {}",
                path.display()
            ),
            _ => Image::open(path)?,
        };
        let geometry = Geometry::new(image.size(), chunk_size)?;
        let bar = bytes_bar(image.size(), "scan");
        bar.set_message(name.clone());
        let (manifest, origin) = catalog.manifest(name, &image, &geometry, &|n| bar.inc(n))?;
        bar.finish_and_clear();
        let zero = manifest
            .iter()
            .filter(|e| matches!(e, protocol::ChunkEntry::Zero))
            .count();
        tracing::info!(
            disk = %name, image = %path.display(), chunks = manifest.len(), zero,
            manifest = if origin == ManifestOrigin::Reused { "reused" } else { "scanned" },
            "serving disk"
        );
        let tracker = if track {
            Some(Arc::new(server::tracked::Tracker::load(
                catalog.clone(),
                name,
                geometry,
            )?))
        } else {
            None
        };
        // The scan saw every write stamped before this start.
        let generation = tracker.as_ref().map_or(0, |t| t.generation() - 1);
        disks.push(SourceDisk {
            name: name.clone(),
            image,
            geometry,
            manifest: std::sync::RwLock::new(server::source::Manifest::new(manifest, generation)),
            bitmap: bitmap.is_some() && nbd.is_some(),
            tracker,
            planned: Default::default(),
        });
    }
    Ok(disks)
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    if a.image.len() != a.name.len() {
        bail!(
            "give one --name for each --image ({} images, {} names)",
            a.image.len(),
            a.name.len()
        );
    }
    let chunk_size = parse_size(&a.chunk_size)?;
    let pairs: Vec<_> = a
        .image
        .iter()
        .cloned()
        .zip(a.name.iter().cloned())
        .collect();
    let mut seen = std::collections::HashSet::new();
    for (_, n) in &pairs {
        if !seen.insert(n) {
            bail!("disk name {n:?} is given twice");
        }
    }
    let tls = super::tls_server(a.tls.as_deref())?;
    let state = a.state.clone();
    let track = a.nbd.is_some();
    let bitmap = a.dirty_bitmap.clone();
    if track && bitmap.is_some() {
        bail!("--nbd and --dirty-bitmap exclude each other: either helio serves the VM's disk, or QEMU does and keeps the bitmap");
    }
    let disks = tokio::task::spawn_blocking(move || {
        load_disks(&state, &pairs, chunk_size, track, bitmap.as_deref())
    })
    .await??;
    let mut exports = Vec::new();
    for d in &disks {
        if let (Some(t), Some(_)) = (&d.tracker, &a.nbd) {
            let dev = server::tracked::TrackedImage::open(d.image.path(), d.geometry, t.clone())
                .with_context(|| format!("cannot open {} for writing", d.image.path().display()))?;
            exports.push(server::nbd::handshake::Export {
                name: d.name.clone(),
                device: Arc::new(dev),
            });
        }
    }
    let nbd_task = match &a.nbd {
        Some(addr) => {
            let listener = server::nbd::listener::NbdListener::bind(addr, false).await?;
            println!("nbd on {}", listener.describe());
            Some(tokio::spawn(listener.run(exports, None)))
        }
        None => None,
    };
    let acceptor = Acceptor::bind(&a.listen, tls).await?;
    let addr = acceptor.local_addr()?;
    let source = Source::new(disks, "helio-source", a.compress_level);
    // Scripts and tests wait for this line to learn the bound port.
    println!("listening on {addr}");
    let serve = tokio::spawn(Arc::clone(&source).serve(acceptor));
    super::interrupted().await;
    serve.abort();
    if let Some(t) = nbd_task {
        t.abort();
    }
    tracing::info!("source stopped");
    Ok(0)
}
