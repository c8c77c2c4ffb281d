//! The agent's state database (RocksDB under `--state`): disks, VMs, peers, jobs, events and
//! idempotency keys, each a JSON value under a `kind/name` key.
//!
//! Specs and phase changes are written with sync (they survive a host crash); progress
//! figures are written without (a `kill -9` of the agent keeps them, since RocksDB's log is in
//! the page cache, and a host crash loses at most a few seconds of figures, which the resumed
//! job recomputes).

use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

/// What went wrong with the state database.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// RocksDB failed.
    #[error("agent state database: {0} (is another agent using this --state directory?)")]
    Db(#[from] rocksdb::Error),
    /// A stored value does not parse.
    #[error("agent state: the value under {key:?} is corrupt: {source}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// The database.
pub struct State {
    db: rocksdb::DB,
}

impl State {
    /// Opens (creating) the database in `dir`.
    pub fn open(dir: &Path) -> Result<State, StateError> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        Ok(State {
            db: rocksdb::DB::open(&opts, dir)?,
        })
    }

    fn key(kind: &str, name: &str) -> String {
        format!("{kind}/{name}")
    }

    /// Stores `value` under `kind/name`; `durable` syncs the write.
    pub fn put<T: Serialize>(
        &self,
        kind: &str,
        name: &str,
        value: &T,
        durable: bool,
    ) -> Result<(), StateError> {
        // Invariant: our model types serialise infallibly (no maps with non-string keys).
        let bytes = serde_json::to_vec(value).expect("model types serialise");
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(durable);
        Ok(self.db.put_opt(Self::key(kind, name), bytes, &w)?)
    }

    /// The value under `kind/name`.
    pub fn get<T: DeserializeOwned>(
        &self,
        kind: &str,
        name: &str,
    ) -> Result<Option<T>, StateError> {
        let key = Self::key(kind, name);
        match self.db.get(&key)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| StateError::Corrupt { key, source }),
        }
    }

    /// Deletes `kind/name` (synced).
    pub fn delete(&self, kind: &str, name: &str) -> Result<(), StateError> {
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        Ok(self.db.delete_opt(Self::key(kind, name), &w)?)
    }

    /// Deletes the keys of `kind` from `from` (inclusive) to `to` (exclusive), unsynced.
    pub fn delete_range(&self, kind: &str, from: &str, to: &str) -> Result<(), StateError> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.delete_range(Self::key(kind, from), Self::key(kind, to));
        Ok(self.db.write(batch)?)
    }

    /// Every value of `kind`, in key order.
    pub fn list<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<(String, T)>, StateError> {
        // Names are never empty and never start with a control character: "" + \u{1} sorts
        // before every one of them.
        self.list_after(kind, "", usize::MAX)
    }

    /// Values of `kind` whose names sort after `after`, at most `limit`.
    pub fn list_after<T: DeserializeOwned>(
        &self,
        kind: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, T)>, StateError> {
        let prefix = format!("{kind}/");
        let start = format!("{prefix}{after}\u{1}");
        let mut out = Vec::new();
        let iter = self.db.iterator(rocksdb::IteratorMode::From(
            start.as_bytes(),
            rocksdb::Direction::Forward,
        ));
        for item in iter {
            let (k, v) = item?;
            let Some(name) = std::str::from_utf8(&k)
                .ok()
                .and_then(|k| k.strip_prefix(&prefix))
            else {
                break;
            };
            if out.len() >= limit {
                break;
            }
            let value = serde_json::from_slice(&v).map_err(|source| StateError::Corrupt {
                key: format!("{prefix}{name}"),
                source,
            })?;
            out.push((name.to_string(), value));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_list_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        s.put("a", "x", &1u32, true).unwrap();
        s.put("a", "y", &2u32, false).unwrap();
        s.put("b", "x", &3u32, true).unwrap();
        let a: Vec<(String, u32)> = s.list("a").unwrap();
        assert_eq!(a, vec![("x".into(), 1), ("y".into(), 2)]);
        let after: Vec<(String, u32)> = s.list_after("a", "x", 10).unwrap();
        assert_eq!(after, vec![("y".into(), 2)]);
        s.delete("a", "x").unwrap();
        assert_eq!(s.get::<u32>("a", "x").unwrap(), None);
        assert_eq!(s.get::<u32>("b", "x").unwrap(), Some(3));
    }
}
