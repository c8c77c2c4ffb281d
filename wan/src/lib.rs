//! A WAN on one machine: byte rates, pacing, and a TCP link emulator.
//!
//! This machine has no kernel netem, so heliotrope carries its own: [`Link`] forwards TCP
//! connections with a one-way delay of RTT/2 in each direction and a per-direction bandwidth, and
//! can cut its connections or go down on command. Tests, benchmarks, the demo and
//! `helio wan-proxy` all use it. [`TokenBucket`] caps a transfer's rate; [`Rate`] parses the
//! operator's `100Mbit`, `20MiB/s` and the like.

mod link;
mod pace;
mod rate;

pub use link::{Link, LinkSpec, LinkStats};
pub use pace::TokenBucket;
pub use rate::{Rate, RateParseError};
