//! The agent's config file (TOML): disks, VMs and peers that must exist. At start each one
//! absent from the state database is created; the API changes them at run time, and those
//! changes persist in the database.
//!
//! ```toml
//! [[peer]]
//! name = "site-b"
//! addr = "10.0.0.2:7000"
//!
//! [[disk]]
//! name = "web-01"
//! path = "/var/lib/helio/web-01.raw"
//! size = 10737418240
//!
//! [[vm]]
//! name = "web-01"
//! memory_mib = 1024
//! disks = ["web-01"]
//! ```

use crate::model::{DiskSpec, PeerSpec, VmSpec};
use serde::Deserialize;
use std::path::Path;

/// The file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Peers.
    #[serde(default)]
    pub peer: Vec<PeerSpec>,
    /// Disks.
    #[serde(default)]
    pub disk: Vec<DiskSpec>,
    /// VMs.
    #[serde(default)]
    pub vm: Vec<VmSpec>,
}

impl Config {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_unknown_keys() {
        let c: Config = toml::from_str(
            "[[peer]]\nname='b'\naddr='127.0.0.1:1'\n[[disk]]\nname='d'\npath='/x'\n[[vm]]\nname='v'\nmemory_mib=64\ndisks=['d']\n",
        )
        .unwrap();
        assert_eq!((c.peer.len(), c.disk.len(), c.vm.len()), (1, 1, 1));
        assert_eq!(c.vm[0].vcpus, 1);
        assert!(toml::from_str::<Config>("[[disk]]\nname='d'\npath='/x'\ncolour='red'\n").is_err());
    }
}
