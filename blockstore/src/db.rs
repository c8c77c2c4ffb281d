//! Opening RocksDB with named column families and a layout version in the default family.

use crate::error::{Result, StoreError};
use rocksdb::{ColumnFamilyDescriptor, Options, WriteOptions, DB};
use std::path::{Path, PathBuf};

const LAYOUT_KEY: &[u8] = b"layout_version";

/// A RocksDB database with its path, for error messages.
pub struct Db {
    /// The database.
    pub db: DB,
    /// Its directory.
    pub path: PathBuf,
}

/// Options of a column family; `prefix`: its keys are sought by their first `prefix` bytes.
fn family_options(prefix: Option<usize>) -> Options {
    let mut opts = Options::default();
    // Metadata is hashes and small records: compression would cost CPU and save nothing (the
    // families' own options, not only the database's, must say so: they default to Snappy).
    opts.set_compression_type(rocksdb::DBCompressionType::None);
    let mut table = rocksdb::BlockBasedOptions::default();
    // A sync round reads the states of its chunks, scattered over the whole table, in a
    // process that starts with an empty block cache: with 4 KiB blocks a 1% round of a 4 GiB
    // disk made ~520 reads, with 32 KiB blocks ~140.
    table.set_block_size(32 << 10);
    if let Some(len) = prefix {
        // Most lookups by prefix miss (content never seen before): bloom filters on the prefix
        // answer those without reading the tables' blocks. No bloom on the memtable: it is
        // sized from the write buffer (6.4 MB at a ratio of 0.1) and zeroed at every open and
        // flush, which cost a sync round ~3,500 page faults for a memtable of ~1,000 keys.
        opts.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(len));
        table.set_bloom_filter(10.0, false);
        table.set_whole_key_filtering(false);
    }
    opts.set_block_based_table_factory(&table);
    opts
}

impl Db {
    /// Opens (creating if needed) the database at `path` with `families`, checking that its
    /// layout version is `version` (a new database is stamped with it).
    pub fn open(path: &Path, families: &[&str], version: u32) -> Result<Db> {
        Db::open_with_prefixes(path, families, &[], version)
    }

    /// [`Db::open`], where the families named in `prefixes` are sought by key prefixes of the
    /// given lengths (see [`Db::prefix_reads`]).
    pub fn open_with_prefixes(
        path: &Path,
        families: &[&str],
        prefixes: &[(&str, usize)],
        version: u32,
    ) -> Result<Db> {
        std::fs::create_dir_all(path).map_err(crate::error::io_err("cannot create", path))?;
        let mut opts = family_options(None);
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Each open starts a new info log; the old ones only fill the directory.
        opts.set_keep_log_file_num(2);
        // RocksDB opens table files with 16 threads per column family by default: 48 thread
        // starts for a few small files, a third of a short command's time on these machines.
        opts.set_max_file_opening_threads(1);
        // At the info level every open writes some 500 lines of options, a system call each.
        opts.set_log_level(rocksdb::LogLevel::Warn);
        // Table blocks are read in place from the page cache: a short-lived command (a sync
        // round) starts with an empty block cache, and copying each block into fresh memory
        // cost more than the lookups themselves.
        opts.set_allow_mmap_reads(true);
        let cfs = families.iter().map(|name| {
            let prefix = prefixes.iter().find(|(n, _)| n == name).map(|&(_, l)| l);
            ColumnFamilyDescriptor::new(*name, family_options(prefix))
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| StoreError::Db {
            path: path.to_path_buf(),
            source,
        })?;
        let this = Db {
            db,
            path: path.to_path_buf(),
        };
        match this.db.get(LAYOUT_KEY).map_err(|e| this.err(e))? {
            None => this.put_sync(LAYOUT_KEY, &version.to_be_bytes())?,
            Some(v) => {
                let found = v
                    .as_slice()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| this.corrupt("layout version is not 4 bytes"))?;
                if found != version {
                    return Err(StoreError::Layout {
                        path: path.to_path_buf(),
                        found,
                        expected: version,
                    });
                }
            }
        }
        Ok(this)
    }

    /// Read options for seeking within one key prefix of a family opened with one.
    pub fn prefix_reads() -> rocksdb::ReadOptions {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_prefix_same_as_start(true);
        ro
    }

    /// Wraps a RocksDB error with the path.
    pub fn err(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// A corrupt-record error.
    pub fn corrupt(&self, detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    /// A column family that `open` created.
    pub fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // Invariant: every family name used by this crate is passed to `open`.
        self.db
            .cf_handle(name)
            .unwrap_or_else(|| panic!("column family {name} was not opened"))
    }

    /// Writes one key in the default family, synced.
    pub fn put_sync(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let mut b = rocksdb::WriteBatch::default();
        b.put(key, value);
        self.write_sync(b)
    }

    /// Writes one key in family `cf`, synced.
    pub fn put_cf_sync(&self, cf: &str, key: &[u8], value: &[u8]) -> Result<()> {
        let mut b = rocksdb::WriteBatch::default();
        b.put_cf(self.cf(cf), key, value);
        self.write_sync(b)
    }

    /// Writes a batch atomically and durably.
    pub fn write_sync(&self, batch: rocksdb::WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).map_err(|e| self.err(e))
    }
}
