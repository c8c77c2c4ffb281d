//! Sizes and names as operators type them.

use anyhow::{bail, Context};

/// Parses `64KiB`, `64K`, `1M`, `4GiB`, `512MB`, or plain bytes. K/M/G without `B` are binary,
/// as in qemu-img.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .with_context(|| format!("cannot read size {s:?}: expected e.g. 64KiB, 4GiB or 65536"))?;
    let f: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "k" | "KiB" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TiB" => 1024.0f64.powi(4),
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        u => bail!("cannot read size {s:?}: unknown unit {u:?} (use KiB, MiB, GiB, KB, MB, GB)"),
    };
    Ok((v * f) as u64)
}

/// A disk name: letters, digits, `.`, `_`, `-`; 1 to 128 characters.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    protocol::check_name("disk", name).map_err(anyhow::Error::msg)
}

/// `12.3 MiB`-style rendering.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("1MB").unwrap(), 1_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 furlongs").is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("web-01.disk_0").is_ok());
        for bad in ["", "a/b", "a b", "../x"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
