//! Per-chunk costs on the seeding path: classify (zero check + blake3), compress, decompress.
//! Run: `cargo bench -p helio-benches`. Compare with `b3sum` (4.4 GB/s a core) and `zstd -1`
//! (1.07 GB/s) from shared/ANCHORS.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use protocol::{codec, ChunkEntry, Encoding};

const CHUNK: usize = 64 * 1024;

fn chunks() -> Vec<(&'static str, Vec<u8>)> {
    let mut random = vec![0u8; CHUNK];
    blake3::Hasher::new().finalize_xof().fill(&mut random);
    let text: Vec<u8> = (0..)
        .flat_map(|i: u32| {
            format!(
                "2026-11-25T10:{:02}:{:02}Z host-{} sshd[{}]: accepted\n",
                i % 60,
                i % 59,
                i % 40,
                i * 7
            )
            .into_bytes()
        })
        .take(CHUNK)
        .collect();
    vec![
        ("zero", vec![0u8; CHUNK]),
        ("random", random),
        ("text", text),
    ]
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    for (kind, data) in chunks() {
        g.bench_with_input(BenchmarkId::new("classify", kind), &data, |b, d| {
            b.iter(|| ChunkEntry::of(d))
        });
        g.bench_with_input(BenchmarkId::new("compress_zstd1", kind), &data, |b, d| {
            b.iter(|| codec::compress(d, codec::DEFAULT_LEVEL))
        });
        if let Some(z) = codec::compress(&data, codec::DEFAULT_LEVEL).map(bytes::Bytes::from) {
            g.bench_with_input(BenchmarkId::new("decompress", kind), &z, |b, z| {
                b.iter(|| codec::decompress(Encoding::Zstd, z, CHUNK).map(|v| v.len()))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
