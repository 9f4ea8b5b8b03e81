//! Micro-benchmarks of the data path's per-frame work: encoding and decoding
//! a DATA frame of 4 KiB and 64 KiB (without and with the cluster key), and
//! the lock-free queue between the capture thread and the TX worker.
//!
//! `cargo bench -p msl-bench --bench micro -- frame`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use msl_wire::{
    buffer_len, emit, emit_eth, parse, parse_eth, Data, Expect, Header, Key, Message,
    ETH_HEADER_LEN,
};

const BLOCK: usize = 4096;

fn header() -> Header {
    Header {
        cluster_id: 7,
        sender: 1,
        generation: 3,
        seq: 1 << 32 | 5,
        ack: 0,
        flags: 0,
        frag_index: 0,
        frag_count: 1,
    }
}

fn data_msg(len: usize) -> Message {
    Message::Data(Data {
        write_id: 5,
        offset: 5 * BLOCK as u64,
        len: len as u32,
        flags: 0,
    })
}

fn encode_frame(key: Option<&Key>, payload: &[u8], out: &mut [u8]) -> usize {
    emit_eth([2; 6], [4; 6], out).unwrap();
    ETH_HEADER_LEN
        + emit(
            &header(),
            &data_msg(payload.len()),
            payload,
            key,
            &mut out[ETH_HEADER_LEN..],
        )
        .unwrap()
}

/// Encode (Ethernet + MSL header, payload copy, checksum and tag) and
/// decode (every check, no copy) of one DATA frame, for each payload size,
/// keyless and keyed. Only the wire API's `emit` / `parse` are used, so the
/// same file measures any wire version.
fn bench_frame(c: &mut Criterion) {
    let key = Key([9u8; 32]);
    for (size, len) in [("4k", BLOCK), ("64k", 16 * BLOCK)] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let mut g = c.benchmark_group(format!("frame_{size}"));
        g.throughput(Throughput::Bytes(len as u64));
        for (name, k) in [("keyless", None), ("keyed", Some(&key))] {
            let mut buf = vec![0u8; ETH_HEADER_LEN + buffer_len(&data_msg(len), len, true)];
            g.bench_function(format!("encode/{name}"), |b| {
                b.iter(|| black_box(encode_frame(k, black_box(&payload), &mut buf)))
            });
            let n = encode_frame(k, &payload, &mut buf);
            let expect = Expect {
                cluster_id: 7,
                key: k,
            };
            g.bench_function(format!("decode/{name}"), |b| {
                b.iter(|| {
                    let (_, body) = parse_eth(black_box(&buf[..n])).unwrap();
                    let p = parse(body, &expect).unwrap();
                    black_box(p.payload.len())
                })
            });
        }
        g.finish();
    }
}

fn bench_queue(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue");
    // What moves through the capture -> TX queue: a pooled block and its id.
    let q: ArrayQueue<(Box<[u8; BLOCK]>, u64)> = ArrayQueue::new(1024);
    let mut spare = Some(Box::new([0u8; BLOCK]));
    g.throughput(Throughput::Elements(1));
    g.bench_function("array_queue/push_pop", |b| {
        b.iter(|| {
            let blk = spare.take().unwrap();
            q.push((blk, 1)).ok().unwrap();
            let (blk, id) = q.pop().unwrap();
            black_box(id);
            spare = Some(blk);
        })
    });
    g.throughput(Throughput::Elements(64));
    let q64: ArrayQueue<u64> = ArrayQueue::new(1024);
    g.bench_function("array_queue/push64_pop64", |b| {
        b.iter(|| {
            for i in 0..64u64 {
                let _ = q64.push(i);
            }
            let mut s = 0u64;
            while let Some(v) = q64.pop() {
                s += v;
            }
            black_box(s)
        })
    });
    g.finish();
}

/// Dirty-bitmap work on a 1 GiB volume of 4 KiB blocks (262,144 bits):
/// marking a 2 MiB write, and scanning for the next dirty block as resync
/// does (sparse: one bit in 4,096 set).
fn bench_bitmap(c: &mut Criterion) {
    use msl_core::bitmap::Bitmap;
    let blocks = 262_144u64;
    let mut g = c.benchmark_group("bitmap_1gib");
    g.throughput(Throughput::Elements(512));
    g.bench_function("set_range_512_blocks", |b| {
        let mut bm = Bitmap::new(blocks);
        let mut at = 0u64;
        b.iter(|| {
            bm.set_range(at, 512);
            at = (at + 512) % blocks;
            if at == 0 {
                bm.clear_all();
            }
        })
    });
    let mut sparse = Bitmap::new(blocks);
    for i in (0..blocks).step_by(4096) {
        sparse.set(i);
    }
    g.throughput(Throughput::Elements(blocks));
    g.bench_function("scan_all_sparse", |b| {
        b.iter(|| {
            let mut n = 0u64;
            let mut at = 0;
            while let Some(i) = sparse.next_set(at) {
                n += 1;
                at = i + 1;
            }
            assert_eq!(n, 64);
            n
        })
    });
    g.finish();
}

criterion_group!(benches, bench_frame, bench_queue, bench_bitmap);
criterion_main!(benches);
