//! Byte rates as operators write them: `100Mbit`, `1Gbit/s`, `20MiB/s`, `50MB/s`, `12345` (bytes/s).

use std::fmt;
use std::str::FromStr;

/// A rate in bytes per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rate(pub u64);

/// A rate that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "cannot read rate {0:?}: write a number with a unit such as 100Mbit, 1Gbit, 20MiB/s or 50MB/s"
)]
pub struct RateParseError(pub String);

impl Rate {
    /// Bytes per second.
    pub fn bytes_per_sec(self) -> u64 {
        self.0
    }
}

impl FromStr for Rate {
    type Err = RateParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || RateParseError(s.to_string());
        let t = s.trim();
        let t = t
            .strip_suffix("/s")
            .or_else(|| t.strip_suffix("ps"))
            .unwrap_or(t);
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: f64 = num.parse().map_err(|_| err())?;
        // Bits for "bit"/"b", bytes for "B"; decimal prefixes unless "i" says binary.
        let factor: f64 = match unit.trim() {
            "" | "B" => 1.0,
            "kbit" | "Kbit" | "kb" => 1e3 / 8.0,
            "Mbit" | "mbit" | "Mb" => 1e6 / 8.0,
            "Gbit" | "gbit" | "Gb" => 1e9 / 8.0,
            "KB" | "kB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            _ => return Err(err()),
        };
        let bytes = value * factor;
        if !(bytes.is_finite() && bytes >= 1.0) {
            return Err(err());
        }
        Ok(Rate(bytes as u64))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = self.0 as f64 * 8.0;
        if bits >= 1e9 {
            write!(f, "{:.2} Gbit/s", bits / 1e9)
        } else if bits >= 1e6 {
            write!(f, "{:.1} Mbit/s", bits / 1e6)
        } else {
            write!(f, "{:.1} kbit/s", bits / 1e3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_units_parse() {
        assert_eq!("100Mbit".parse::<Rate>().unwrap(), Rate(12_500_000));
        assert_eq!("1Gbit".parse::<Rate>().unwrap(), Rate(125_000_000));
        assert_eq!("1Gbit/s".parse::<Rate>().unwrap(), Rate(125_000_000));
        assert_eq!("20MiB/s".parse::<Rate>().unwrap(), Rate(20 * 1024 * 1024));
        assert_eq!("50MB/s".parse::<Rate>().unwrap(), Rate(50_000_000));
        assert_eq!("4096".parse::<Rate>().unwrap(), Rate(4096));
        assert_eq!("1.5Gbit".parse::<Rate>().unwrap(), Rate(187_500_000));
        for bad in ["", "fast", "10 parsecs", "-5MB/s", "0"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }
}
