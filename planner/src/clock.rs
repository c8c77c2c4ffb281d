//! Time: the plan's hours (UTC, whole hours from its start), local hours in a time zone, and
//! `HH:MM` window bounds. Time zones come from jiff's bundled database, so a plan is the same
//! on every machine.

use jiff::tz::TimeZone;
use jiff::Timestamp;

/// The IANA zone `name`.
pub fn zone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name).map_err(|e| format!("time zone {name:?}: {e}"))
}

/// The hour of `HH:MM` (minutes must be 00: plans work in whole hours); `24:00` is 24.
pub fn hour_of(hhmm: &str) -> Result<u32, String> {
    let bad = || format!("{hhmm:?}: write HH:00, e.g. 08:00");
    let (h, m) = hhmm.split_once(':').ok_or_else(bad)?;
    let h: u32 = h.parse().map_err(|_| bad())?;
    if m != "00" || h > 24 {
        return Err(bad());
    }
    Ok(h)
}

/// Whether local hour `h` lies in `[from, to)` (wrapping past midnight when `to <= from`).
pub fn in_window(h: u32, from: u32, to: u32) -> bool {
    if from == to {
        return true;
    }
    if from < to {
        (from..to).contains(&h)
    } else {
        h >= from || h < to
    }
}

/// The hours a plan covers.
#[derive(Debug, Clone, Copy)]
pub struct Horizon {
    /// Its first hour, seconds since the epoch (a multiple of 3600).
    pub start: i64,
    /// How many hours.
    pub hours: usize,
}

impl Horizon {
    /// From `from` rounded down to the hour, for `hours` hours.
    pub fn new(from: Timestamp, hours: usize) -> Horizon {
        let s = from.as_second();
        Horizon {
            start: s - s.rem_euclid(3600),
            hours,
        }
    }

    /// The start of hour `h`.
    pub fn at(&self, h: usize) -> Timestamp {
        // In range: plans are at most a few weeks long (checked by the caller).
        Timestamp::from_second(self.start + h as i64 * 3600).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    /// Local hour (0..23) in `tz` at the start of plan hour `h`.
    pub fn local_hour(&self, h: usize, tz: &TimeZone) -> u32 {
        self.at(h).to_zoned(tz.clone()).hour() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_hours_follow_the_zone_and_its_summer_time() {
        let hz = Horizon::new("2026-07-01T06:30:00Z".parse().unwrap(), 24);
        assert_eq!(hz.at(0).to_string(), "2026-07-01T06:00:00Z");
        assert_eq!(hz.local_hour(0, &zone("Europe/Paris").unwrap()), 8);
        assert_eq!(hz.local_hour(0, &zone("Asia/Tokyo").unwrap()), 15);
        let winter = Horizon::new("2026-12-01T06:00:00Z".parse().unwrap(), 1);
        assert_eq!(winter.local_hour(0, &zone("Europe/Paris").unwrap()), 7);
        assert!(zone("Mars/Olympus").is_err());
    }

    #[test]
    fn windows_wrap_past_midnight() {
        assert!(in_window(9, 8, 18) && !in_window(18, 8, 18));
        assert!(in_window(23, 22, 6) && in_window(3, 22, 6) && !in_window(12, 22, 6));
        assert_eq!(hour_of("08:00"), Ok(8));
        assert!(hour_of("08:30").is_err() && hour_of("25:00").is_err());
    }
}
