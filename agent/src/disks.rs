//! The agent's disks: image files it serves to peers over the replication protocol and to its
//! VMs over NBD, with every write dirty-tracked (the wiring of `helio source --nbd`, made
//! dynamic), and the replicas its destination store holds.

use crate::error::{check_name, AgentError, Result};
use crate::events::Events;
use crate::metrics::Metrics;
use crate::model::{Disk, DiskSpec, Replica};
use crate::observed::Observed;
use crate::state::State;
use blockstore::{Catalog, Image};
use protocol::{Geometry, PatchedChunk};
use server::nbd::handshake::Export;
use server::nbd::listener::SharedExports;
use server::source::{Manifest, SourceDisk};
use server::tracked::{TrackedImage, Tracker};
use server::Source;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const KIND: &str = "disk";
/// Chunk size when a spec gives none.
pub const DEFAULT_CHUNK: u64 = 64 * 1024;

/// An open disk.
struct Open {
    spec: DiskSpec,
    source: Arc<SourceDisk>,
}

/// The disks.
pub struct Disks {
    state: Arc<State>,
    events: Arc<Events>,
    catalog: Arc<Catalog>,
    source: Arc<Source>,
    exports: SharedExports<Observed<TrackedImage>>,
    store: blockstore::Store,
    metrics: Metrics,
    open: Mutex<HashMap<String, Open>>,
    /// Chunks patched into each disk since its last patch commit (a migration's way back).
    patched: Mutex<HashMap<String, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoned only if a holder panicked; the map is replaced entry by entry, so whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Disks {
    /// The disks of `state`, served through `source` and `exports` (opened by [`Disks::load`]).
    pub fn new(
        state: Arc<State>,
        events: Arc<Events>,
        catalog: Arc<Catalog>,
        source: Arc<Source>,
        exports: SharedExports<Observed<TrackedImage>>,
        store: blockstore::Store,
        metrics: Metrics,
    ) -> Disks {
        Disks {
            state,
            events,
            catalog,
            source,
            exports,
            store,
            metrics,
            open: Mutex::new(HashMap::new()),
            patched: Mutex::new(HashMap::new()),
        }
    }

    /// The destination store.
    pub fn store(&self) -> &blockstore::Store {
        &self.store
    }

    /// Opens every disk recorded in the state; a disk that cannot be opened is logged and
    /// left recorded (its image may come back, e.g. a storage mount).
    pub fn load(&self) -> Result<()> {
        for (name, spec) in self.state.list::<DiskSpec>(KIND)? {
            if let Err(e) = self.open_disk(&spec) {
                tracing::error!(disk = %name, error = %e, "cannot open a recorded disk; it is not served until the agent restarts with its image back");
            }
        }
        Ok(())
    }

    /// Creates (or, with the same spec, returns) a disk.
    pub fn create(&self, spec: DiskSpec) -> Result<(Disk, bool)> {
        check_name("disk", &spec.name)?;
        if let Some(existing) = self.state.get::<DiskSpec>(KIND, &spec.name)? {
            if existing == spec {
                return Ok((self.show(&spec.name)?, false));
            }
            return Err(AgentError::Conflict(format!(
                "disk {:?} exists with another spec (path {}); delete it first or pick another name",
                spec.name, existing.path
            )));
        }
        let chunk = spec.chunk_size.unwrap_or(DEFAULT_CHUNK);
        if !chunk.is_power_of_two() || !(4096..=1 << 20).contains(&chunk) {
            return Err(AgentError::Invalid(format!(
                "chunk_size {chunk} of disk {:?}: use a power of two from 4096 to 1048576",
                spec.name
            )));
        }
        let path = std::path::Path::new(&spec.path);
        if !path.is_absolute() {
            return Err(AgentError::Invalid(format!(
                "path {:?} of disk {:?} must be absolute (the agent's working directory is not the client's)",
                spec.path, spec.name
            )));
        }
        if !path.exists() {
            let size = spec.size.ok_or_else(|| {
                AgentError::Invalid(format!(
                    "image {} of disk {:?} does not exist: give `size` to create it",
                    spec.path, spec.name
                ))
            })?;
            if size == 0 || size % 512 != 0 {
                return Err(AgentError::Invalid(format!(
                    "size {size} of disk {:?}: use a positive multiple of 512 bytes",
                    spec.name
                )));
            }
            let f = std::fs::File::create_new(path)
                .map_err(AgentError::io(format!("creating image {}", spec.path)))?;
            f.set_len(size)
                .map_err(AgentError::io(format!("sizing image {}", spec.path)))?;
        }
        self.open_disk(&spec)?;
        self.state.put(KIND, &spec.name, &spec, true)?;
        self.events.emit(
            "disk.created",
            &spec.name,
            serde_json::json!({"path": spec.path}),
        );
        Ok((self.show(&spec.name)?, true))
    }

    fn open_disk(&self, spec: &DiskSpec) -> Result<()> {
        let what = |e: &dyn std::fmt::Display| {
            AgentError::Internal(format!("opening disk {:?} ({}): {e}", spec.name, spec.path))
        };
        let image = Image::open(std::path::Path::new(&spec.path)).map_err(|e| what(&e))?;
        let geometry = Geometry::new(image.size(), spec.chunk_size.unwrap_or(DEFAULT_CHUNK))
            .map_err(|e| AgentError::Invalid(format!("disk {:?}: {e}", spec.name)))?;
        let (entries, _) = self
            .catalog
            .manifest(&spec.name, &image, &geometry, &|_| {})
            .map_err(|e| what(&e))?;
        let tracker = Arc::new(
            Tracker::load(self.catalog.clone(), &spec.name, geometry).map_err(|e| what(&e))?,
        );
        // The scan saw every write stamped before this start.
        let generation = tracker.generation() - 1;
        let device = TrackedImage::open(image.path(), geometry, tracker.clone())
            .map_err(AgentError::io(format!("opening {} for writing", spec.path)))?;
        let disk = Arc::new(SourceDisk {
            name: spec.name.clone(),
            image,
            geometry,
            manifest: std::sync::RwLock::new(Manifest::new(entries, generation)),
            bitmap: false,
            tracker: Some(tracker),
            planned: Default::default(),
        });
        self.source.add_disk(disk.clone());
        {
            // Poisoned only if a writer panicked mid-push; the list is still a list.
            let mut exports = self.exports.write().unwrap_or_else(|p| p.into_inner());
            exports.retain(|e| e.name != spec.name);
            exports.push(Export {
                name: spec.name.clone(),
                device: Arc::new(Observed::new(device, &spec.name, self.metrics.clone())),
            });
        }
        lock(&self.open).insert(
            spec.name.clone(),
            Open {
                spec: spec.clone(),
                source: disk,
            },
        );
        Ok(())
    }

    /// One disk.
    pub fn show(&self, name: &str) -> Result<Disk> {
        let open = lock(&self.open);
        let Some(o) = open.get(name) else {
            return match self.state.get::<DiskSpec>(KIND, name)? {
                Some(spec) => Err(AgentError::Internal(format!(
                    "disk {name:?} is recorded but its image {} could not be opened (see the agent's log); restore it and restart the agent, or delete the disk",
                    spec.path
                ))),
                None => Err(AgentError::not_found("disk", name, "list disks with GET /v1/disks")),
            };
        };
        Ok(Disk {
            spec: o.spec.clone(),
            kind: "image".into(),
            size: o.source.geometry.size,
            chunks: o.source.geometry.chunk_count(),
            attached_to: None,
        })
    }

    /// Every disk.
    pub fn list(&self) -> Result<Vec<Disk>> {
        let names: Vec<String> = self
            .state
            .list::<DiskSpec>(KIND)?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        Ok(names.iter().filter_map(|n| self.show(n).ok()).collect())
    }

    /// The chunks of disk `name` written since the replica `replica` last synced (every chunk
    /// ever written when it never registered): what a migration's switchover invalidates.
    pub fn dirty_since(&self, name: &str, replica: &[u8; 16]) -> Result<Vec<u64>> {
        let tracker = lock(&self.open)
            .get(name)
            .and_then(|o| o.source.tracker.clone())
            .ok_or_else(|| AgentError::not_found("disk", name, "it is not served here"))?;
        let since = tracker
            .synced(replica)
            .map_err(|e| AgentError::Internal(format!("disk {name:?}: {e}")))?
            .unwrap_or(0);
        Ok(tracker.written_between(since, u64::MAX))
    }

    /// A migration's way back: writes `chunks` of image disk `name` through its tracked
    /// export, so the disk's own tracking sees them. `data` is zstd (one frame or several) of the chunks
    /// that are not zeros, in order; everything about it is checked before it sizes anything.
    /// The caller checked that no VM runs on the disk.
    pub async fn patch(&self, name: &str, chunks: &[PatchedChunk], data: &[u8]) -> Result<()> {
        use server::nbd::Device;
        let (device, g) = self.device(name)?;
        let raw = patch_size(name, g, chunks)?;
        // Bounded by the checked total: a peer cannot make this allocate more.
        let bytes = if raw == 0 {
            Vec::new()
        } else {
            zstd::bulk::decompress(data, raw as usize).map_err(|e| {
                AgentError::Invalid(format!(
                    "the chunks patched into disk {name:?} do not decompress: {e}"
                ))
            })?
        };
        if bytes.len() as u64 != raw {
            return Err(AgentError::Invalid(format!(
                "the chunks patched into disk {name:?} hold {} bytes, not the {raw} listed",
                bytes.len()
            )));
        }
        let mut at = 0;
        for c in chunks {
            let (offset, len) = (g.offset(c.index), g.len(c.index));
            let io = |e: server::nbd::DeviceError| {
                AgentError::Internal(format!("patching chunk {} of disk {name:?}: {e}", c.index))
            };
            if c.zero {
                let have = device.read(offset, len as u32).await.map_err(io)?;
                if have.iter().any(|&b| b != 0) {
                    device
                        .write_zeroes(offset, len as u32, false, false)
                        .await
                        .map_err(io)?;
                }
            } else {
                device
                    .write(offset, bytes[at..at + len].to_vec(), false)
                    .await
                    .map_err(io)?;
                at += len;
            }
        }
        *lock(&self.patched).entry(name.to_string()).or_default() += chunks.len() as u64;
        Ok(())
    }

    /// Makes the chunks patched into disk `name` durable; how many since the last commit.
    pub async fn patch_commit(&self, name: &str) -> Result<u64> {
        use server::nbd::Device;
        let (device, _) = self.device(name)?;
        device.flush().await.map_err(|e| {
            AgentError::Internal(format!(
                "flushing the chunks patched into disk {name:?}: {e}"
            ))
        })?;
        Ok(lock(&self.patched).remove(name).unwrap_or(0))
    }

    fn device(&self, name: &str) -> Result<(Arc<Observed<TrackedImage>>, Geometry)> {
        let g = lock(&self.open)
            .get(name)
            .map(|o| o.source.geometry)
            .ok_or_else(|| {
                AgentError::not_found("disk", name, "no image disk of that name here")
            })?;
        let exports = self.exports.read().unwrap_or_else(|p| p.into_inner());
        let device = exports
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.device.clone())
            .ok_or_else(|| AgentError::not_found("disk", name, "it is not exported here"))?;
        Ok((device, g))
    }

    /// Bytes of disk `name`'s chunks that hold data: those its last manifest says are not
    /// zeros, and those written since (the manifest is refreshed only when a peer asks). What a
    /// first seed of it moves, before compression.
    pub fn data_bytes(&self, name: &str) -> Result<u64> {
        let open = lock(&self.open);
        let o = open
            .get(name)
            .ok_or_else(|| AgentError::not_found("disk", name, "it is not served here"))?;
        let manifest = o.source.manifest.read().unwrap_or_else(|p| p.into_inner());
        let mut data: std::collections::HashSet<u64> = manifest
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, protocol::ChunkEntry::Data(_)))
            .map(|(i, _)| i as u64)
            .collect();
        if let Some(t) = &o.source.tracker {
            data.extend(t.written_between(manifest.generation, u64::MAX));
        }
        Ok(data.len() as u64 * o.source.geometry.chunk_size as u64)
    }

    /// Whether disk `name` exists.
    pub fn exists(&self, name: &str) -> bool {
        lock(&self.open).contains_key(name)
    }

    /// Stops serving and forgets disk `name` (its image file is kept).
    pub fn delete(&self, name: &str) -> Result<DiskSpec> {
        let spec = self
            .state
            .get::<DiskSpec>(KIND, name)?
            .ok_or_else(|| AgentError::not_found("disk", name, ""))?;
        if let Some(o) = lock(&self.open).remove(name) {
            if let Some(t) = &o.source.tracker {
                // Retires the activity log so the next open re-hashes nothing.
                let _ = t.flush();
            }
        }
        self.source.remove_disk(name);
        self.exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|e| e.name != name);
        self.state.delete(KIND, name)?;
        self.events.emit(
            "disk.deleted",
            name,
            serde_json::json!({"image_kept": spec.path}),
        );
        Ok(spec)
    }

    /// The replicas in the destination store.
    pub fn replicas(&self) -> Result<Vec<Replica>> {
        let recs = self
            .store
            .disks()
            .map_err(|e| AgentError::Internal(format!("listing the store's replicas: {e}")))?;
        let mut out = Vec::new();
        for r in recs {
            let present = self
                .store
                .replica(&r.name)
                .and_then(|rep| rep.states())
                .map(|s| s.iter().filter(|c| c.is_some()).count() as u64)
                .unwrap_or(0);
            out.push(Replica {
                name: r.name.clone(),
                size: r.geometry.size,
                chunks: r.geometry.chunk_count(),
                chunks_present: present,
                seeded: r.seeded_digest.is_some(),
            });
        }
        Ok(out)
    }
}

/// The bytes a patch of `chunks` of disk `name` decompresses to, once every index is checked
/// against the disk and the batch against the protocol's caps.
fn patch_size(name: &str, g: Geometry, chunks: &[PatchedChunk]) -> Result<u64> {
    if chunks.len() > protocol::MAX_PATCH_CHUNKS {
        return Err(AgentError::Invalid(format!(
            "a patch of disk {name:?} lists {} chunks; at most {} go in one",
            chunks.len(),
            protocol::MAX_PATCH_CHUNKS
        )));
    }
    let mut raw = 0u64;
    for c in chunks {
        if c.index >= g.chunk_count() {
            return Err(AgentError::Invalid(format!(
                "chunk {} is beyond disk {name:?} ({} chunks)",
                c.index,
                g.chunk_count()
            )));
        }
        if !c.zero {
            raw += g.len(c.index) as u64;
        }
    }
    if raw > protocol::MAX_PATCH_RAW {
        return Err(AgentError::Invalid(format!(
            "a patch of disk {name:?} holds {raw} bytes; at most {} go in one",
            protocol::MAX_PATCH_RAW
        )));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(index: u64, zero: bool) -> PatchedChunk {
        PatchedChunk { index, zero }
    }

    #[test]
    fn concatenated_zstd_frames_decompress_to_their_chunks_in_order() {
        let (a, b) = (vec![1u8; 65536], vec![2u8; 4096]);
        let mut data = zstd::bulk::compress(&a, 3).expect("compress");
        data.extend(zstd::bulk::compress(&b, 3).expect("compress"));
        let both = zstd::bulk::decompress(&data, a.len() + b.len()).expect("decompress");
        assert_eq!(both, [a, b].concat());
    }

    #[test]
    fn a_patch_is_sized_from_the_disk_and_refused_past_its_end_or_the_caps() {
        // 10 chunks of 64 KiB, the last one 4 KiB.
        let g = Geometry::new(9 * 65536 + 4096, 65536).expect("a valid geometry");
        let ok = [chunk(0, false), chunk(3, true), chunk(9, false)];
        assert_eq!(patch_size("d", g, &ok).expect("in range"), 65536 + 4096);
        let past = patch_size("d", g, &[chunk(10, false)]).expect_err("past the end");
        assert!(past.to_string().contains("beyond"), "{past}");
        let many = vec![chunk(0, true); protocol::MAX_PATCH_CHUNKS + 1];
        assert!(
            patch_size("d", g, &many).is_err(),
            "more chunks than a batch may list"
        );
        let big = Geometry::new(1 << 30, 1 << 20).expect("a valid geometry");
        let heavy: Vec<_> = (0..17).map(|i| chunk(i, false)).collect();
        assert!(patch_size("d", big, &heavy).is_err(), "17 MiB in one batch");
    }
}
