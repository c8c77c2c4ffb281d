//! `helio demo`: the whole story on the sample guest ([`super::demo_vm`]); with `--parts`, the
//! parts without QEMU, on one machine, with nothing to set up:
//!
//! Two VM disks that share a base image are served by a source agent behind an emulated WAN
//! (40 ms RTT, 200 Mbit/s by default) over mutual TLS. Both are seeded into a destination store,
//! verified against their images, and a report shows what crossed the link.

use super::seed::seed_with_progress;
use crate::sample;
use crate::units::{human, parse_size};
use anyhow::{bail, Context};
use client::session::Peer;
use client::{SeedOptions, SeedReport};
use server::{Acceptor, Source};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use wan::{Link, LinkSpec, Rate};

/// Arguments of `helio demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Working directory (default: a fresh temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of each sample disk.
    #[arg(long, default_value = "256MiB")]
    size: String,
    /// Emulated round-trip time.
    #[arg(long, default_value = "40ms", value_parser = humantime::parse_duration)]
    rtt: Duration,
    /// Emulated link bandwidth.
    #[arg(long, default_value = "200Mbit")]
    bandwidth: Rate,
    /// The parts without QEMU instead: pre-seeding two disks with dedup, sync rounds under
    /// writes, and a KVM micro-VM's memory migration.
    #[arg(long)]
    parts: bool,
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let tmp;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("helio-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let size = parse_size(&a.size)?;
    println!("heliotrope demo in {}", dir.display());
    if !a.parts {
        let setup = super::demo_vm::Setup {
            dir: dir.clone(),
            os_size: size,
            rtt: a.rtt,
            bandwidth: a.bandwidth,
        };
        return super::demo_vm::run(setup).await;
    }
    println!(
        "1. building two {} VM disks that share a base image (zeros, OS blocks, unique data)",
        human(size)
    );
    let base = dir.join("base.img");
    let disks = [
        ("web-01", dir.join("web-01.img"), 11u64),
        ("web-02", dir.join("web-02.img"), 12u64),
    ];
    {
        let (base, disks) = (base.clone(), disks.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            sample::write_image(&base, size, 1)?;
            for (_, path, seed) in &disks {
                sample::derive_image(&base, path, 0.2, *seed)?;
            }
            Ok(())
        })
        .await??;
    }

    println!("2. issuing agent certificates from a fresh CA");
    let pki = dir.join("pki");
    super::pki::demo_pki(&pki)?;

    println!(
        "3. starting the source agent (TLS) behind an emulated WAN: {:?} RTT, {}",
        a.rtt, a.bandwidth
    );
    let images: Vec<_> = disks
        .iter()
        .map(|(n, p, _)| (p.clone(), n.to_string()))
        .collect();
    let state = dir.join("source-state");
    let loaded = tokio::task::spawn_blocking(move || {
        super::source::load_disks(&state, &images, 64 * 1024, true, None)
    })
    .await??;
    let acceptor =
        Acceptor::bind("127.0.0.1:0", super::tls_server(Some(&pki.join("source")))?).await?;
    let source_addr = acceptor.local_addr()?;
    // The first disk is also served to "its VM" over NBD, with every write tracked.
    let vm_sock = dir.join("web-01-vm.sock");
    let vm_disk = &loaded[0];
    let tracked = server::tracked::TrackedImage::open(
        vm_disk.image.path(),
        vm_disk.geometry,
        vm_disk.tracker.clone().context("web-01 is tracked")?,
    )?;
    let vm_listener = server::nbd::listener::NbdListener::bind(
        &server::nbd::listener::NbdAddr::Unix(vm_sock.clone()),
        false,
    )
    .await?;
    let vm_export = tokio::spawn(vm_listener.run(
        vec![server::nbd::handshake::Export {
            name: "web-01".into(),
            device: std::sync::Arc::new(tracked),
        }],
        None,
    ));
    let serve = tokio::spawn(
        Source::new(loaded, "demo-source", protocol::codec::DEFAULT_LEVEL).serve(acceptor),
    );
    let spec = LinkSpec {
        rtt: a.rtt,
        bandwidth: Some(a.bandwidth),
        corrupt_every: None,
    };
    let link = Link::start("127.0.0.1:0", &source_addr.to_string(), spec).await?;

    println!("4. seeding both disks into the destination store across the link");
    let store_dir = dir.join("destination-store");
    let store = blockstore::Store::open(&store_dir)?;
    let peer = Peer {
        addr: link.local_addr().to_string(),
        tls: super::tls_client(Some(&pki.join("destination")))?,
        agent: "demo-destination".into(),
        timeout: client::session::DEFAULT_TIMEOUT,
    };
    let mut reports: Vec<SeedReport> = Vec::new();
    for (name, path, _) in &disks {
        let opts = SeedOptions {
            peer: peer.clone(),
            name: name.to_string(),
            bandwidth: None,
            streams: 4,
            retries: 4,
            compress: client::Compress::Auto,
        };
        let r = seed_with_progress(&store, opts, CancellationToken::new()).await?;
        super::seed::print_report(&r);
        let replica = store.replica(name)?;
        let image = blockstore::Image::open(path)?;
        let bad = super::verify::check(&replica, Some(&image))?;
        if !bad.is_empty() {
            bail!(
                "{name}: {} chunks differ from the source image after seeding",
                bad.len()
            );
        }
        println!("   verified: {name} equals its source image, chunk for chunk");
        reports.push(r);
    }

    println!("\n5. web-01's VM keeps writing (through the source's tracking NBD export); sync rounds catch up");
    let sync_opts = |until_converged| client::sync::SyncOptions {
        seed: SeedOptions {
            peer: peer.clone(),
            name: "web-01".into(),
            bandwidth: None,
            streams: 4,
            retries: 4,
            compress: client::Compress::Auto,
        },
        until_converged,
        max_dirty: 2 << 20,
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (sock, stop) = (vm_sock.clone(), stop.clone());
        std::thread::spawn(move || vm_workload(&sock, size, &stop))
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let live = client::sync::sync(&store, sync_opts(true), CancellationToken::new()).await?;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("VM workload panicked"))??;
    println!(
        "   the VM wrote {} in 64 KiB blocks, then paused for the switch-over",
        human(written)
    );
    let last = client::sync::sync(&store, sync_opts(false), CancellationToken::new()).await?;
    let mut rounds = live.rounds.clone();
    rounds.extend(last.rounds.iter().cloned());
    for (i, r) in rounds.iter().enumerate() {
        let tag = if i + 1 == rounds.len() {
            "  (VM paused)"
        } else {
            ""
        };
        println!(
            "   round {}: {:>10} dirty, {:>10} on the wire, {:.2} s{tag}",
            i + 1,
            human(r.dirty_bytes),
            human(r.wire_bytes),
            r.elapsed_s
        );
    }
    let bad = super::verify::check(
        &store.replica("web-01")?,
        Some(&blockstore::Image::open(&disks[0].1)?),
    )?;
    if !bad.is_empty() {
        bail!(
            "web-01: {} chunks differ from the source after the final round",
            bad.len()
        );
    }
    println!(
        "   after the final round the replica of web-01 equals the source disk, byte for byte"
    );
    vm_export.abort();
    serve.abort();

    println!("\n6. report");
    println!(
        "{:<8} {:>10} {:>10} {:>6} {:>8} {:>7} {:>6} {:>7} {:>12} {:>10}",
        "disk",
        "logical",
        "wire",
        "wire%",
        "fetched",
        "dedup",
        "zero",
        "time",
        "logical/s",
        "link use"
    );
    let link_rate = a.bandwidth.bytes_per_sec() as f64;
    for r in &reports {
        let secs = r.elapsed_s.max(1e-9);
        println!(
            "{:<8} {:>10} {:>10} {:>5.1}% {:>8} {:>7} {:>6} {:>6.1}s {:>10}/s {:>9.0}%",
            r.disk,
            human(r.logical_bytes),
            human(r.wire_bytes),
            100.0 * r.wire_bytes as f64 / r.logical_bytes as f64,
            r.chunks_fetched,
            r.chunks_deduplicated,
            r.chunks_zero,
            r.elapsed_s,
            human((r.logical_bytes as f64 / secs) as u64),
            100.0 * (r.wire_bytes as f64 / secs) / link_rate,
        );
    }
    let logical: u64 = reports.iter().map(|r| r.logical_bytes).sum();
    let wire: u64 = reports.iter().map(|r| r.wire_bytes).sum();
    println!(
        "total: {} of disks moved with {} on the wire ({:.1}x less); the second disk reused the shared base already at the destination",
        human(logical),
        human(wire),
        logical as f64 / wire.max(1) as f64
    );
    let stats = link.stats();
    println!(
        "link carried {} towards the destination",
        human(stats.to_client)
    );
    drop(link);
    let _ = store_dir
        .canonicalize()
        .context("store directory vanished")?;

    let backend = match memory::kvm_available() {
        Ok(()) => "kvm",
        Err(why) => {
            println!("\n   ({why}: the memory migration uses the synthetic guest instead of KVM)");
            "synthetic"
        }
    };
    println!(
        "\n7. a VM's memory, apart from the disks above (the migrate job will couple the two): a {backend} guest of 128 MiB,\n   \
         writing 5000 pages/s, moves live (pre-copy) between two agent processes over a new emulated link of the\n   \
         same RTT and bandwidth, with mutual TLS from its own demo CA"
    );
    let mem =
        super::memory::demo::Args::for_demo(backend, a.rtt, a.bandwidth, &dir.join("memory"))?;
    let (report, ok) = super::memory::demo::migrate(&mem).await?;
    super::memory::agents::print_report(&report);
    if !ok {
        bail!("the memory migration did not verify");
    }
    Ok(0)
}

/// "The VM": writes random 64 KiB blocks through the tracking NBD export (with the `nbd` crate,
/// a client we did not write), fast for a second, then slower, until told to stop.
fn vm_workload(
    sock: &std::path::Path,
    size: u64,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<u64> {
    use rand::Rng;
    use std::io::{Seek, SeekFrom, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(sock)?;
    let export = nbd::client::handshake(&mut stream, b"web-01")?;
    let mut client = nbd::client::NbdClient::new(&mut stream, &export);
    let mut rng = rand::thread_rng();
    let mut block = vec![0u8; 65536];
    let started = std::time::Instant::now();
    let mut written = 0u64;
    while !stop.load(std::sync::atomic::Ordering::SeqCst)
        && started.elapsed() < Duration::from_secs(30)
    {
        rng.fill(&mut block[..]);
        client.seek(SeekFrom::Start(rng.gen_range(0..size / 65536) * 65536))?;
        client.write_all(&block)?;
        written += block.len() as u64;
        if written.is_multiple_of(16 * 65536) {
            client.flush()?;
        }
        // A burst while the first round runs, then a steadier trickle.
        let pause = if started.elapsed() < Duration::from_secs(1) {
            1
        } else {
            40
        };
        std::thread::sleep(Duration::from_millis(pause));
    }
    client.flush()?;
    Ok(written)
}
