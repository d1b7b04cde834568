//! Micro-benchmarks of the pure paths: envelope decoding, key templates, each reducer, and one
//! redb batch apply (1,000 events, durable commit).
//!
//! `cargo bench --bench pure`

use std::path::Path;

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
    let sum = if reducer == "counter" {
        "sum = \"{data.amount}\"\n"
    } else {
        ""
    };
    let toml = format!(
        "[[projection]]\nname = \"bench\"\nstream = \"S\"\nkey = \"{{data.order_id}}\"\nreducer = \"{reducer}\"\n{sum}kv_bucket = \"b\"\n"
    );
    let config = Config::parse(&toml, Path::new(".")).unwrap();
    Spec::compile(&config.projection[0], None).unwrap()
}

fn decode(c: &mut Criterion) {
    let bytes = payload(1, 1);
    let decoder = Decoder::default();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("cloudevent_256b", |b| {
        b.iter(|| decoder.decode(&bytes).unwrap())
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
                            let view = MessageView {
                                seq,
                                subject: "s",
                                headers: None,
                                payload: p,
                                publish_ms: seq,
                            };
                            Item::Event(spec.prepare(&view).unwrap())
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

criterion_group!(benches, decode, key_template, reducers, batch_apply);
criterion_main!(benches);
