//! Per-packet media costs on the bridge's hot path. `cargo bench --bench media`.
#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Instant;

use callgate::media::g711::ulaw_decode;
use callgate::media::rewrite::{PtMap, Rewriter};
use callgate::media::rtp::RtpPacket;
use callgate::media::stats::ReceiveStats;
use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let mut pkt = Vec::new();
    RtpPacket {
        marker: false,
        payload_type: 0,
        sequence: 1,
        timestamp: 160,
        ssrc: 42,
        payload: &[0x55; 160],
    }
    .write(&mut pkt);
    let mut rw = Rewriter::new(
        7,
        8000,
        vec![PtMap { from: 0, to: 0 }, PtMap { from: 101, to: 126 }],
    );
    let now = Instant::now();
    let mut g = c.benchmark_group("media");
    g.bench_function("parse RTP (20 ms PCMU)", |b| {
        b.iter(|| RtpPacket::parse(black_box(&pkt)).is_ok())
    });
    g.bench_function("parse + rewrite RTP (20 ms PCMU)", |b| {
        b.iter(|| {
            let p = RtpPacket::parse(black_box(&pkt)).unwrap();
            rw.rewrite(now, &p).map(<[u8]>::len)
        })
    });
    let mut stats = ReceiveStats::default();
    let mut seq = 0u16;
    g.bench_function("receive stats update", |b| {
        b.iter(|| {
            seq = seq.wrapping_add(1);
            stats.on_packet(seq, u32::from(seq) * 160, 160, u64::from(seq) * 160);
        })
    });
    g.bench_function("G.711 u-law decode 160 samples", |b| {
        b.iter(|| {
            black_box(&pkt[12..])
                .iter()
                .map(|&x| i32::from(ulaw_decode(x)))
                .sum::<i32>()
        })
    });
    // One 20 ms tick of a conference: every party's frame decoded, mixed, encoded back.
    for parties in [3u32, 6] {
        let mut m = callgate::media::mixer::Mixer::new();
        for id in 0..parties {
            m.add(id, callgate::media::mixer::Law::Ulaw).unwrap();
        }
        let frame = [0x55u8; 160];
        g.bench_function(
            format!("mixer tick, {parties} parties (20 ms G.711)"),
            |b| {
                b.iter(|| {
                    for id in 0..parties {
                        m.handle_frame(id, black_box(&frame));
                    }
                    m.mix().map(|(_, f)| usize::from(f[0])).sum::<usize>()
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
