//! The sample guest's disk records (`scripts/guest/load.c`), checked block by block from the
//! host: every 4 KiB block holds either nothing (zeros) or one whole record of the last pass
//! that reached it; a torn, stale or corrupt record is counted.

use std::io::Read;
use std::path::Path;

const BLOCK: usize = 4096;
const MAGIC: u64 = 0x4845_4c49_4f52_4543; // "HELIOREC"

/// What the records on a disk say.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Records {
    /// Blocks holding a whole record.
    pub valid: u64,
    /// Blocks holding zeros (never written).
    pub empty: u64,
    /// Blocks holding something else: a torn or corrupt record.
    pub corrupt: u64,
    /// Records whose block is not where their sequence number puts them.
    pub misplaced: u64,
    /// The highest sequence number found.
    pub max_seq: u64,
    /// Distinct guest boots that wrote records.
    pub boots: u64,
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn word(block: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&block[i * 8..i * 8 + 8]);
    u64::from_le_bytes(w)
}

/// Reads every block of `path` and checks its record.
pub fn check(path: &Path) -> std::io::Result<Records> {
    let mut f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let blocks = f.get_ref().metadata()?.len() / BLOCK as u64;
    let mut r = Records::default();
    let mut boots = std::collections::HashSet::new();
    let mut block = vec![0u8; BLOCK];
    for index in 0..blocks {
        f.read_exact(&mut block)?;
        if block.iter().all(|b| *b == 0) {
            r.empty += 1;
            continue;
        }
        let whole = word(&block, 0) == MAGIC
            && fnv(&block[..BLOCK - 8]) == word(&block, BLOCK / 8 - 1)
            && block[32..BLOCK - 8]
                .iter()
                .all(|b| *b == (word(&block, 1) & 0xff) as u8);
        if !whole {
            r.corrupt += 1;
            continue;
        }
        let (seq, at) = (word(&block, 1), word(&block, 2));
        r.valid += 1;
        r.max_seq = r.max_seq.max(seq);
        boots.insert(word(&block, 3));
        if at != index || (seq - 1) % blocks != index {
            r.misplaced += 1;
        }
    }
    r.boots = boots.len() as u64;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, block: u64, boot: u64) -> Vec<u8> {
        let mut b = vec![(seq & 0xff) as u8; BLOCK];
        for (i, w) in [MAGIC, seq, block, boot].iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        let sum = fnv(&b[..BLOCK - 8]);
        b[BLOCK - 8..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    #[test]
    fn whole_records_count_and_torn_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let mut img = Vec::new();
        img.extend(record(1, 0, 7));
        img.extend(record(2, 1, 7));
        let mut torn = record(3, 2, 7);
        torn[100] ^= 1;
        img.extend(torn);
        img.extend(vec![0u8; BLOCK]);
        std::fs::write(&path, &img).unwrap();
        let r = check(&path).unwrap();
        assert_eq!(
            (r.valid, r.corrupt, r.empty, r.max_seq, r.boots, r.misplaced),
            (2, 1, 1, 2, 1, 0)
        );
    }
}
