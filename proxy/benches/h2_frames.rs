//! The cost of the HTTP/2 frame budgets (`h2budget`): following the frame headers of a
//! connection's bytes both ways. Inbound: a client's small frames (HEADERS, WINDOW_UPDATE,
//! short DATA); outbound: the server's 16 KiB DATA frames. Reported per frame and per
//! byte, to set beside the rest of a request's cost in the proxy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use proxy::h2budget::{Budgets, FrameCounter};

fn frame(kind: u8, flags: u8, stream: u32, len: usize) -> Vec<u8> {
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend(std::iter::repeat_n(0u8, len));
    f
}

const BUDGETS: Budgets = Budgets {
    priority_per_stream: u32::MAX,
    window_updates_per_data_frame: u32::MAX,
    control: u32::MAX,
};

fn frames(c: &mut Criterion) {
    // 1,000 requests: HEADERS (40 bytes), a DATA frame of 100 bytes, a WINDOW_UPDATE
    let mut inbound = Vec::new();
    for i in 0..1000u32 {
        inbound.extend(frame(0x1, 0x4, 2 * i + 1, 40));
        inbound.extend(frame(0x0, 0x1, 2 * i + 1, 100));
        inbound.extend(frame(0x8, 0, 0, 4));
    }
    let mut g = c.benchmark_group("h2_frames");
    g.throughput(Throughput::Elements(3000));
    g.bench_function("inbound 3000 small frames", |b| {
        b.iter(|| {
            let mut counter = FrameCounter::new(BUDGETS);
            counter.inbound(proxy::detect::H2_PREFACE);
            // as reads of 16 KiB
            for chunk in inbound.chunks(16384) {
                black_box(counter.inbound(black_box(chunk)));
            }
        })
    });
    let outbound: Vec<u8> = (0..64).flat_map(|_| frame(0x0, 0, 1, 16384)).collect();
    g.throughput(Throughput::Bytes(outbound.len() as u64));
    g.bench_function("outbound 64 DATA frames of 16 KiB", |b| {
        b.iter(|| {
            let mut counter = FrameCounter::new(BUDGETS);
            for chunk in outbound.chunks(65536) {
                counter.outbound(black_box(chunk));
            }
            black_box(&counter);
        })
    });
    g.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
