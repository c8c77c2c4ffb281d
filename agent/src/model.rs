//! The agent's resources as the API shows them (and as its state database stores them).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A disk to create or declare: an image file on this host that the agent serves to peers and
/// to its VMs (every write through the agent is dirty-tracked).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Its name: letters, digits, `-`, `_`, `.`; unique on this agent.
    pub name: String,
    /// A raw image file (or block device). Created sparse when absent and `size` is given.
    pub path: String,
    /// Size in bytes for a new image (ignored when the image exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Chunk size in bytes (a power of two from 4096 to 1048576); default 65536.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u64>,
}

/// A disk on this agent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Disk {
    /// What it was created with.
    pub spec: DiskSpec,
    /// `image`: served by this agent; `replica`: held in this agent's store (seeded).
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// Chunks in the disk.
    pub chunks: u64,
    /// The VM it is attached to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<String>,
}

/// A replica in this agent's destination store.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Replica {
    /// The disk's name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Chunks present.
    pub chunks_present: u64,
    /// Chunks in the disk.
    pub chunks: u64,
    /// Whether a seed completed (later sync rounds keep it current).
    pub seeded: bool,
}

/// A network interface of a VM.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// `user` (QEMU's user-mode network) or `tap:IFNAME` (an existing TAP device).
    pub network: String,
    /// MAC address; QEMU picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// How a VM boots: a kernel (with initrd and command line), or firmware from its first disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BootSpec {
    /// A kernel image; without it the VM boots its firmware (SeaBIOS) from the first disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// An initrd for the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// A VM to create.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Its name, unique on this agent.
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    #[serde(default = "one")]
    pub vcpus: u32,
    /// How it boots.
    #[serde(default)]
    pub boot: BootSpec,
    /// Heliotrope disk names, attached in order as virtio disks through the agent's tracking
    /// NBD exports.
    #[serde(default)]
    pub disks: Vec<String>,
    /// Network interfaces (virtio-net).
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// `auto` (KVM where QEMU guests run, else TCG), `kvm` or `tcg`.
    #[serde(default = "auto")]
    pub accel: String,
    /// Extra QEMU arguments, appended as given.
    #[serde(default)]
    pub qemu_args: Vec<String>,
    /// Start it once created (default true).
    #[serde(default = "yes")]
    pub start: bool,
}

fn one() -> u32 {
    1
}
fn auto() -> String {
    "auto".into()
}
fn yes() -> bool {
    true
}

/// A VM and how it is.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    /// What it was created with.
    pub spec: VmSpec,
    /// `stopped`, `starting`, `incoming` (waiting for a migration stream), `running`, `died`
    /// (QEMU exited without being asked), `moved` (migrated away).
    pub state: String,
    /// QEMU's own run state from `query-status` (`running`, `paused`, `inmigrate`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_status: Option<String>,
    /// The accelerator QEMU runs with: `kvm` or `tcg`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// Why that accelerator (e.g. "/dev/kvm is KVM-PVM: QEMU guests do not boot there").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel_reason: Option<String>,
    /// QEMU's process id while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The serial console log.
    pub serial_log: String,
    /// QEMU's last words when it died: the end of its stderr and of the console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_words: Option<String>,
    /// When QEMU was started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Whether this agent process started it or re-adopted it after a restart.
    #[serde(default)]
    pub adopted: bool,
    /// Where it moved to (state `moved`): its disks here are the base for the way back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
}

/// A job to create.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// `seed` (pull a disk from a peer agent into this agent's store), `sync` (ship what
    /// changed since the last round) or `export` (serve the replica over NBD, fetching absent
    /// chunks from `from` on demand and in the background, until cancelled).
    pub kind: String,
    /// The disk's name.
    pub disk: String,
    /// The peer agent serving the disk (`HOST:PORT` of its replication listener, or the name
    /// of a configured peer); optional for `export` (then the replica must be complete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// `export`: where to serve, `unix:PATH` or `HOST:PORT` (loopback); default
    /// `unix:STATE/exports/DISK.sock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
    /// A client-chosen name: creating a job with a name that exists returns that job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// WAN cap, e.g. `100Mbit`, `20MiB/s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<String>,
    /// Parallel TCP connections (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<usize>,
}

/// A job's progress; `bytes_done` never goes backwards.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Progress {
    /// Bytes accounted for.
    pub bytes_done: u64,
    /// Bytes the job covers (0 until known).
    pub bytes_total: u64,
    /// Recent rate, bytes a second.
    pub rate_bps: u64,
    /// Estimated seconds left, when a rate is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
}

/// A job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Job {
    /// Its id (`job-N`).
    pub id: String,
    /// `seed`, `sync`.
    pub kind: String,
    /// What it was created with.
    pub spec: JobSpec,
    /// `queued`, `transferring`, `serving` (an export whose replica is complete), `done`,
    /// `failed`, `cancelled`.
    pub phase: String,
    /// Why the phase last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_reason: Option<String>,
    /// Progress; final figures are kept after the job ends.
    pub progress: Progress,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339, once ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Kind-specific figures (for a seed: the seed report's chunk counts).
    #[serde(default)]
    pub figures: serde_json::Value,
    /// Times the agent resumed it after a restart.
    #[serde(default)]
    pub resumed: u32,
}

impl Job {
    /// Whether the job has ended.
    pub fn ended(&self) -> bool {
        matches!(self.phase.as_str(), "done" | "failed" | "cancelled")
    }
}

/// One entry of the event stream.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Increasing; resume with `Last-Event-ID`.
    pub id: u64,
    /// RFC 3339.
    pub at: String,
    /// `job.phase`, `job.progress`, `vm.state`, `disk.created`, `disk.deleted`, ...
    pub kind: String,
    /// The job, VM or disk.
    pub object: String,
    /// Details.
    pub data: serde_json::Value,
}

/// The agent itself.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentInfo {
    /// `--name`.
    pub name: String,
    /// heliotrope's version.
    pub version: String,
    /// The replication listener, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The accelerator new VMs get with `accel: auto`, and why.
    pub accel: String,
    /// Why.
    pub accel_reason: String,
    /// Counts.
    pub disks: usize,
    /// VMs.
    pub vms: usize,
    /// Jobs not ended.
    pub jobs_active: usize,
}

/// A peer agent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    /// The name jobs use.
    pub name: String,
    /// Its replication listener, `HOST:PORT`.
    pub addr: String,
}

/// A migration to create (`POST /v1/migrations` on the source agent).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MigrationSpec {
    /// The VM (running on this agent).
    pub vm: String,
    /// The destination agent: a peer's name or `HOST:PORT` of its replication listener.
    pub to: String,
    /// `replicate` (default): the destination seeds and syncs the disks from this agent, runs
    /// the VM on exports of its replicas, and at the switchover learns which chunks were
    /// written since the last round (fetched on demand after). `shared`: both hosts reach the
    /// disks (each agent has them under the same names); only memory and device state move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// With `replicate`: this agent's replication listener as the destination reaches it
    /// (default: its `--listen` address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_addr: Option<String>,
    /// QEMU's downtime limit in milliseconds (default 300, as QEMU's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// Cap on the migration stream's rate, e.g. `200Mbit` (QEMU's `max-bandwidth`); the
    /// prediction uses it as the link's bandwidth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<String>,
    /// Start no earlier than this time (RFC 3339); the migration waits in `scheduled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// Finish by this time (RFC 3339): the disk jobs are paced to fill the window rather than
    /// the link, and a prediction that cannot make it is said at `checking`
    /// (`figures.deadline`, event `migration.deadline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// Parallel streams for the memory (QEMU's multifd channels, 2 to 16; each its own agent
    /// connection across the link). Default 1: QEMU's single stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u32>,
    /// `live` (default: iterative pre-copy while the VM runs), `warm` (the VM pauses at the
    /// start and its whole memory moves paused: the downtime is the transfer) or `postcopy`
    /// (after the first pass over memory the VM runs at the destination; the pages it lacks
    /// come on demand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// When pre-copy does not converge (the remaining memory stops shrinking over 3 QEMU
    /// iterations): `throttle` (default: QEMU's auto-converge slows the guest's vCPUs),
    /// `postcopy` (QEMU switches to post-copy) or `abort` (the migration is cancelled; the VM
    /// keeps running here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_diverge: Option<String>,
    /// `auto` (default) or `manual`: the migration waits in `ready` (the disks in step, kept so
    /// by a round every 30 s; the VM running here, its memory not yet moving) for
    /// `POST /v1/migrations/{id}/switchover`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover: Option<String>,
    /// Stop after `checking`: the prerequisites and the prediction, nothing moved. The
    /// request answers once the check is done.
    #[serde(default)]
    pub dry_run: bool,
}

/// A migration.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Migration {
    /// Its id (`mig-N`).
    pub id: String,
    /// What it was created with.
    pub spec: MigrationSpec,
    /// `checking`, `seeding`, `syncing`, `precopy`, `ready` (a manual switchover held),
    /// `switchover`, `running_at_destination`, `completed`, `failed`, `cancelled`.
    pub phase: String,
    /// Why the phase last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_reason: Option<String>,
    /// Memory transferred of the VM's RAM (QEMU's figures); never backwards.
    pub progress: Progress,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339, once ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// QEMU's figures at completion (`downtime_ms`, `total_time_ms`, `setup_time_ms`, `ram`)
    /// and the agents' (`destination_ready_ms`, `tunnel_bytes_sent`).
    #[serde(default)]
    pub figures: serde_json::Value,
}

impl Migration {
    /// Whether it has ended.
    pub fn ended(&self) -> bool {
        matches!(self.phase.as_str(), "completed" | "failed" | "cancelled")
    }
}
