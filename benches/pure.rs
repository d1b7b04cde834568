//! Micro-benchmarks of the pure paths: envelope decoding, key templates, each reducer, one
//! redb batch apply (1,000 events, durable commit), and the applying thread's whole work for a
//! batch of the end-to-end bench (decode, keys, fold, commit, drop).
//!
//! `MIMALLOC_ALLOW_THP=0 MIMALLOC_PURGE_DELAY=50 cargo bench --bench pure` (the allocator
//! settings the binary sets for itself).

use std::path::Path;

// The binary's allocator, so allocation costs are the ones the projector pays.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use nats_projector::config::Config;
use nats_projector::decode::{Decoder, Event};
use nats_projector::key::{Context, Template};
use nats_projector::reduce::{Counter, Latest, Merge, Projection};
use nats_projector::spec::{MessageView, Spec};
use nats_projector::store::{Housekeeping, Item, Store};
use serde_json::json;

fn payload(n: usize, key: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0", "id": format!("evt-{n:08}"), "source": "bench", "type": "order.updated",
        "time": "2026-11-23T10:00:00Z",
        "data": {"order_id": format!("ord-{key:05}"), "status": "paid", "lines": {"sku1": 2, "sku7": 1},
                 "amount": 42, "note": "x".repeat(64)},
    }))
    .unwrap()
}

fn spec(reducer: &str) -> Spec {
    spec_with(reducer, "{data.order_id}", "kv_bucket = \"b\"\n")
}

/// A projection `bench` keyed by `key`, with `extra` TOML lines.
fn spec_with(reducer: &str, key: &str, extra: &str) -> Spec {
    let sum = if reducer == "counter" {
        "sum = \"{data.amount}\"\n"
    } else {
        ""
    };
    let toml = format!(
        "[[projection]]\nname = \"bench\"\nstream = \"S\"\nkey = \"{key}\"\nreducer = \"{reducer}\"\n{sum}{extra}"
    );
    let config = Config::parse(&toml, Path::new(".")).unwrap();
    Spec::compile(&config.projection[0], None).unwrap()
}

/// `payload` as stream message `seq`, prepared for the store.
fn prepared(spec: &Spec, seq: u64, payload: &[u8], publish_ms: u64) -> Item {
    let view = MessageView {
        seq,
        subject: "s",
        headers: None,
        payload,
        publish_ms,
    };
    Item::Event(spec.prepare(&view).unwrap())
}

fn decode(c: &mut Criterion) {
    let bytes = payload(1, 1);
    let decoder = Decoder::default();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("cloudevent_256b", |b| {
        b.iter(|| decoder.decode(&bytes).unwrap())
    });
    // The end-to-end bench's event.
    let bytes = serde_json::to_vec(&json!({
        "specversion": "1.0", "id": "e123456", "source": "bench", "type": "upd",
        "data": {"k": 3456, "n": 123456, "amount": 56, "ts": 1_796_000_000_000_000u64,
                 "pad": "x".repeat(96)},
    }))
    .unwrap();
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("e2e_bench_event", |b| {
        b.iter(|| decoder.decode(&bytes).unwrap())
    });
    // What the applying thread does per event of a `latest` catch-up: decode (the data's
    // text kept, only `k` parsed) and render the key.
    let latest = spec_with("latest", "{data.k}", "");
    g.bench_function("e2e_bench_event_latest_prepared", |b| {
        b.iter(|| prepared(&latest, 1, &bytes, 1))
    });
    g.finish();
}

fn key_template(c: &mut Criterion) {
    let event = Decoder::default().decode(&payload(1, 1)).unwrap();
    let simple = Template::parse("{data.order_id}").unwrap();
    let composite = Template::parse("tenant.{subject.1}.order.{data.order_id}.{type}").unwrap();
    let ctx = Context {
        subject: "orders.acme.updated",
        headers: None,
        event: &event,
    };
    c.bench_function("key/data_field", |b| {
        b.iter(|| simple.render_key(&ctx).unwrap())
    });
    c.bench_function("key/composite_escaped", |b| {
        b.iter(|| composite.render_key(&ctx).unwrap())
    });
}

/// The ack subject of every delivered message (the durable's reply subject, 2.9+ form).
fn ack_subject(c: &mut Criterion) {
    let reply = "$JS.ACK._.ACCHASH.K10K.projector__bench_v1.1.1042977.1042977.1764800000123456789.\
                 398123.a1b2c3";
    c.bench_function("consume/parse_reply", |b| {
        b.iter(|| nats_projector::consume::parse_reply(std::hint::black_box(reply)).unwrap())
    });
}

fn reducers(c: &mut Criterion) {
    let event: Event = Decoder::default().decode(&payload(1, 1)).unwrap();
    let state =
        Some(json!({"order_id": "ord-1", "status": "new", "lines": {"sku1": 1}, "note": "y"}));
    let counter = Counter {
        sum: Some(vec!["amount".into()]),
    };
    let cases: [(&str, &dyn Projection); 3] = [
        ("latest", &Latest),
        ("merge", &Merge),
        ("counter_sum", &counter),
    ];
    for (name, reducer) in cases {
        c.bench_function(&format!("reduce/{name}"), |b| {
            b.iter_batched(
                || state.clone(),
                |s| reducer.apply(s, &event).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
}

fn batch_apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("store");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1000));
    for (name, keys) in [
        ("1000_events_100_keys", 100),
        ("1000_events_1000_keys", 1000),
    ] {
        let spec = spec("merge");
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("bench.redb"), 64).unwrap();
        let payloads: Vec<Vec<u8>> = (0..1000).map(|n| payload(n, (n * 7919) % keys)).collect();
        let mut seq = 0u64;
        g.bench_function(format!("apply_merge_{name}"), |b| {
            b.iter_batched(
                || {
                    payloads
                        .iter()
                        .map(|p| {
                            seq += 1;
                            prepared(&spec, seq, p, seq)
                        })
                        .collect::<Vec<_>>()
                },
                |items| {
                    store
                        .apply(&spec, items, &Housekeeping::default(), None)
                        .unwrap()
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

/// The applying thread's whole work for one batch of the end-to-end bench's shape: 2,048
/// ~256-byte events over `keys` keys (round robin, one event a millisecond), decoded, keyed,
/// folded, committed with their dedupe markers (or without: `window` 0s), then dropped.
fn batch_whole(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch");
    g.sample_size(20);
    const BATCH: usize = 2048;
    g.throughput(Throughput::Elements(BATCH as u64));
    for (reducer, keys, kv, window, synced) in [
        ("latest", 10_000, false, "10m", true),
        // Committed without an fsync, as most batches of a catch-up without KV are: the
        // applying thread's CPU without the disk's latency.
        ("latest", 10_000, false, "10m", false),
        ("latest", 10_000, false, "0s", true),
        ("latest", 100, false, "10m", true),
        ("latest", 100, false, "0s", true),
        ("latest", 10_000, true, "10m", true),
        ("merge", 10_000, true, "10m", true),
    ] {
        let name = format!(
            "{reducer}_{keys}_keys{}{}{}",
            if kv { "_kv" } else { "" },
            if window == "0s" { "_no_dedupe" } else { "" },
            if synced { "" } else { "_unsynced" }
        );
        let bucket = if kv { "kv_bucket = \"b\"\n" } else { "" };
        let spec = spec_with(
            reducer,
            "{data.k}",
            &format!("{bucket}dedupe_window = \"{window}\"\n"),
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("bench.redb"), 32).unwrap();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let event = |n: usize| {
            serde_json::to_vec(&json!({
                "specversion": "1.0", "id": format!("e{n}"), "source": "bench", "type": "upd",
                "data": {"k": n % keys, "n": n, "amount": n % 100, "ts": now_ms * 1000,
                         "pad": "x".repeat(96)},
            }))
            .unwrap()
        };
        let mut next = 0usize;
        let mut batch = || {
            let payloads: Vec<Vec<u8>> = (next..next + BATCH).map(event).collect();
            next += BATCH;
            (next - BATCH, payloads)
        };
        let apply = |(first, payloads): (usize, Vec<Vec<u8>>)| {
            let items: Vec<Item> = payloads
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    prepared(
                        &spec,
                        (first + i + 1) as u64,
                        p,
                        now_ms + (first + i) as u64,
                    )
                })
                .collect();
            let mut items = items;
            let house = Housekeeping::default();
            store
                .apply_deferring(&spec, &mut items, &house, None, || !synced)
                .unwrap()
        };
        // Every key stored once before timing, as in a catch-up's steady middle.
        for _ in 0..5 {
            apply(batch());
        }
        g.bench_function(&name, |b| {
            b.iter_batched(&mut batch, apply, BatchSize::LargeInput)
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    decode,
    key_template,
    ack_subject,
    reducers,
    batch_apply,
    batch_whole
);
criterion_main!(benches);
