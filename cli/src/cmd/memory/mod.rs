//! `helio memory`: memory migration. `demo` runs a source and a destination process over the
//! emulated link; `source` and `dest` are those two agents; `model` prints the d/r prediction.

pub mod agents;
pub mod demo;
pub mod guest_args;
pub mod model;

/// Memory migration commands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Migrate a guest between two processes over the emulated WAN and verify it.
    Demo(demo::Args),
    /// Print what the d/r model predicts for a guest and a link.
    Model(model::Args),
    /// Run a guest and migrate it to a destination agent.
    Source(agents::SourceArgs),
    /// Receive one guest from a source agent, resume it and verify it.
    Dest(agents::DestArgs),
}

pub async fn run(c: Command) -> anyhow::Result<i32> {
    match c {
        Command::Demo(a) => demo::run(a).await,
        Command::Model(a) => model::run(a),
        Command::Source(a) => agents::source(a).await,
        Command::Dest(a) => agents::dest(a).await,
    }
}
