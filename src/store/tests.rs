use super::*;
use crate::config::Config;
use crate::spec::MessageView;
use std::path::Path;

pub(crate) fn spec_for(reducer: &str, extra: &str) -> Spec {
    let toml = format!(
        "[[projection]]\nname = \"t\"\nstream = \"S\"\nkey = \"{{data.k}}\"\nreducer = \"{reducer}\"\nkv_bucket = \"kv\"\n{extra}\n"
    );
    let config = Config::parse(&toml, Path::new(".")).expect("valid config");
    Spec::compile(&config.projection[0], None).expect("compiles")
}

/// Applies one batch and returns its outcomes.
fn outcomes(store: &Store, spec: &Spec, items: Vec<Item>) -> Vec<Outcome> {
    store
        .apply(spec, items, &Housekeeping::default(), None)
        .unwrap()
        .outcomes
}

fn item(spec: &Spec, seq: u64, ms: u64, id: &str, data: serde_json::Value) -> Item {
    typed_item(spec, seq, ms, id, "updated", data)
}

/// An event of type `event_type`, prepared as the pipeline would.
fn typed_item(
    spec: &Spec,
    seq: u64,
    ms: u64,
    id: &str,
    event_type: &str,
    data: serde_json::Value,
) -> Item {
    let payload = serde_json::to_vec(&serde_json::json!({"specversion": "1.0", "id": id,
        "source": "t", "type": event_type, "data": data}))
    .unwrap();
    let view = MessageView {
        seq,
        subject: "s",
        headers: None,
        payload: &payload,
        publish_ms: ms,
    };
    Item::Event(spec.prepare(&view).unwrap())
}

#[test]
fn republished_id_in_one_batch_is_a_duplicate() {
    for reducer in ["merge", "counter", "latest"] {
        let spec = spec_for(reducer, "dedupe_window = \"50ms\"");
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb"), 4).unwrap();
        let d = serde_json::json!({"k": "k1", "f0": 0});
        let items = vec![
            item(&spec, 1, 1_000_014, "e1", d.clone()),
            item(&spec, 2, 1_000_015, "e1", d.clone()),
            item(&spec, 3, 1_000_016, "e1", d),
        ];
        assert_eq!(
            outcomes(&store, &spec, items),
            vec![Outcome::Applied, Outcome::Duplicate, Outcome::Duplicate],
            "{reducer}"
        );
    }
}

/// The dedupe filter of a fresh handle loads the markers already in the file, in every bucket
/// the window reaches (the one before, the same, the one after), and an import replaces them.
#[test]
fn dedupe_markers_survive_a_reopen_and_an_import() {
    let spec = spec_for("counter", "dedupe_window = \"1s\"");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let d = |k: &str| serde_json::json!({"k": k});
    {
        let store = Store::open(&path, 4).unwrap();
        let items = vec![
            item(&spec, 1, 10_999, "early", d("a")),
            item(&spec, 2, 11_500, "mid", d("b")),
            item(&spec, 3, 12_001, "late", d("c")),
        ];
        assert_eq!(outcomes(&store, &spec, items), vec![Outcome::Applied; 3]);
    }
    let store = Store::open(&path, 4).unwrap();
    // Re-published within the window, under other keys, from the neighbouring buckets.
    let again = vec![
        item(&spec, 4, 11_600, "early", d("x")),
        item(&spec, 5, 11_600, "mid", d("y")),
        item(&spec, 6, 11_600, "late", d("z")),
        item(&spec, 7, 11_600, "new", d("w")),
    ];
    let mut expected = vec![Outcome::Duplicate; 3];
    expected.push(Outcome::Applied);
    assert_eq!(outcomes(&store, &spec, again), expected);

    // An import that carries a marker the filter has never seen.
    let mut contents = store.export(&spec.namespace).unwrap();
    contents.markers.push((11, "imported".into(), 8, 11_700));
    store.import(&spec.namespace, &contents, false).unwrap();
    let imported = vec![item(&spec, 9, 11_800, "imported", d("v"))];
    assert_eq!(outcomes(&store, &spec, imported), vec![Outcome::Duplicate]);
}

/// An id of the UUIDv4 kind: ids in no particular order.
fn random_id(i: u64) -> String {
    format!("{:016x}-{i}", runs::hash(i.to_string().as_bytes()))
}

/// Rows of the runs table and of the by-id marker table.
fn marker_rows(store: &Store, spec: &Spec) -> (u64, u64) {
    let tables = Tables::new(&spec.namespace);
    let txn = store.db().unwrap().begin_read().unwrap();
    let runs = txn.open_table(tables.runs()).unwrap().len().unwrap();
    let by_id = txn.open_table(tables.dedupe()).unwrap().len().unwrap();
    (runs, by_id)
}

/// Markers go into runs until a bucket's index is full, then one row per id; a re-published
/// id is a duplicate whichever table holds its marker, before and after a reopen (which
/// reloads both caches from the tables), and an export carries both kinds.
#[test]
fn random_ids_are_deduplicated_from_runs_and_past_the_index_limit() {
    let spec = spec_for("counter", "dedupe_window = \"1h\"");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    // One bucket: every publish time within the same hour.
    let ms = 5 * 3_600_000 + 10;
    let n = 2 * runs::MAX_INDEXED as u64 + 5;
    let d = |i: u64| serde_json::json!({"k": format!("k{}", i % 5)});
    let republish = |store: &Store, first_seq: u64| {
        let again: Vec<Item> = (1..=n)
            .map(|i| {
                item(
                    &spec,
                    first_seq + i,
                    ms + first_seq + i,
                    &random_id(i),
                    d(i),
                )
            })
            .collect();
        assert_eq!(
            outcomes(store, &spec, again),
            vec![Outcome::Duplicate; n as usize]
        );
    };
    {
        let store = Store::open(&path, 4).unwrap();
        let seqs: Vec<u64> = (1..=n).collect();
        for chunk in seqs.chunks(7) {
            let items = chunk
                .iter()
                .map(|&i| item(&spec, i, ms + i, &random_id(i), d(i)))
                .collect();
            assert_eq!(
                outcomes(&store, &spec, items),
                vec![Outcome::Applied; chunk.len()]
            );
        }
        let (run_rows, by_id) = marker_rows(&store, &spec);
        assert!(
            run_rows >= (runs::MAX_INDEXED / 7) as u64,
            "{run_rows} runs"
        );
        assert_eq!(by_id, n - runs::MAX_INDEXED as u64);
        republish(&store, n);
    }
    let store = Store::open(&path, 4).unwrap();
    republish(&store, 2 * n);
    let fresh = vec![item(&spec, 3 * n + 1, ms + 3 * n + 1, "fresh", d(0))];
    assert_eq!(outcomes(&store, &spec, fresh), vec![Outcome::Applied]);
    let markers = store.export(&spec.namespace).unwrap().markers;
    assert_eq!(markers.len() as u64, n + 1);
    assert!(markers.windows(2).all(|w| w[0] < w[1]), "in one order");
    assert!(
        markers
            .iter()
            .any(|m| m.1 == random_id(1) && m.2 == 1 && m.3 == ms + 1)
    );
}

/// Runs expire with their bucket, like by-id markers: the rows are deleted and the index
/// forgets them, so the id counts as new again.
#[test]
fn expired_runs_are_deleted_and_their_ids_are_new_again() {
    let spec = spec_for("counter", "dedupe_window = \"1s\"");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb"), 4).unwrap();
    let d = serde_json::json!({"k": "a"});
    let position = |seq: u64, publish_ms: u64| Position {
        stream: "S".into(),
        stream_created_ns: 0,
        seq,
        publish_ms,
        payload_sha256: [0; 32],
    };
    let items = vec![
        item(&spec, 1, 10_100, "x", d.clone()),
        item(&spec, 2, 10_200, "y", d.clone()),
    ];
    let applied = store
        .apply(
            &spec,
            items,
            &Housekeeping::default(),
            Some(&position(2, 10_200)),
        )
        .unwrap();
    assert_eq!(applied.outcomes, vec![Outcome::Applied; 2]);
    assert_eq!(marker_rows(&store, &spec), (1, 0));
    // Still within the window: a duplicate.
    let again = vec![item(&spec, 3, 10_900, "x", d.clone())];
    assert_eq!(outcomes(&store, &spec, again), vec![Outcome::Duplicate]);
    // The consumer acked everything published up to 12.5 s: bucket 10 can never match again.
    let house = Housekeeping {
        ack_floor: Some((2, 12_500)),
        ..Housekeeping::default()
    };
    store.housekeep(&spec, &house).unwrap();
    assert_eq!(marker_rows(&store, &spec), (0, 0));
    let later = vec![item(&spec, 4, 12_600, "x", d)];
    assert_eq!(outcomes(&store, &spec, later), vec![Outcome::Applied]);
}

/// A store of format 1 (by-id markers only) is taken over; a newer format is refused.
#[test]
fn a_format_1_store_is_upgraded_and_a_newer_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let set_format = |store: &Store, format: u32| {
        let txn = store.db().unwrap().begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("format", encode(&format).unwrap().as_slice())
            .unwrap();
        txn.commit().unwrap();
    };
    set_format(&Store::open(&path, 4).unwrap(), 1);
    let store = Store::open(&path, 4).unwrap();
    let txn = store.db().unwrap().begin_read().unwrap();
    let format = txn
        .open_table(META)
        .unwrap()
        .get("format")
        .unwrap()
        .unwrap();
    assert_eq!(decode::<u32>(format.value()).unwrap(), FORMAT_VERSION);
    drop((format, txn));
    set_format(&store, FORMAT_VERSION + 1);
    drop(store);
    assert!(matches!(
        Store::open(&path, 4),
        Err(StoreError::Format { found }) if found == FORMAT_VERSION + 1
    ));
}

#[test]
fn a_record_read_in_place_is_the_record_stored() {
    for state in [
        Some(br#"{"a":"\u00e9 x"}"#.to_vec()),
        Some(Vec::new()),
        None,
    ] {
        let record = Record {
            state: state.clone(),
            seq: 300,
            event_id: "évt-1".into(),
            epoch: Some(7),
            kv_revision: 1 << 40,
        };
        let bytes = encode(&record).unwrap();
        let read: RecordRef<'_> = decode(&bytes).unwrap();
        assert_eq!(read.state, state.as_deref());
        assert_eq!(
            (read.seq, read.event_id, read.epoch, read.kv_revision),
            (300, "évt-1", Some(7), 1 << 40)
        );
    }
}

/// A key left unchanged by a batch (a duplicate, a stale epoch) keeps its stored state and
/// event id, whether or not the reducer reads the state; a changed one gets the new ones.
#[test]
fn unchanged_keys_keep_their_state_and_changed_ones_are_rewritten() {
    for reducer in ["latest", "merge", "counter"] {
        let spec = spec_for(reducer, "");
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb"), 8).unwrap();
        let first = vec![
            item(&spec, 1, 1, "e1", serde_json::json!({"k": "a", "v": 1})),
            item(&spec, 2, 2, "e2", serde_json::json!({"k": "b", "v": 2})),
        ];
        outcomes(&store, &spec, first);
        let before = store.record(&spec.namespace, "a").unwrap().unwrap();
        // Seq 1 again (a duplicate of a) and a new event for b.
        let second = vec![
            item(&spec, 1, 1, "e1", serde_json::json!({"k": "a", "v": 1})),
            item(&spec, 3, 3, "e3", serde_json::json!({"k": "b", "v": 3})),
        ];
        let got = outcomes(&store, &spec, second);
        assert!(
            matches!(got[..], [Outcome::Duplicate, Outcome::Applied]),
            "{reducer}"
        );
        assert_eq!(
            store.record(&spec.namespace, "a").unwrap().unwrap(),
            before,
            "{reducer}"
        );
        let b = store.record(&spec.namespace, "b").unwrap().unwrap();
        assert_eq!((b.seq, b.event_id.as_str()), (3, "e3"), "{reducer}");
    }
}

/// `apply_from` applies every item (the same outcomes as `apply`) and leaves them in place, for
/// the caller to free and the vector to take the next batch.
#[test]
fn apply_from_leaves_the_items_to_the_caller() {
    let spec = spec_for("latest", "");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb"), 4).unwrap();
    let mut items = Vec::with_capacity(64);
    for seq in 1..=3 {
        items.push(item(
            &spec,
            seq,
            seq,
            &format!("e{seq}"),
            serde_json::json!({"k": "a"}),
        ));
    }
    let capacity = items.capacity();
    let applied = store
        .apply_from(&spec, &mut items, &Housekeeping::default(), None)
        .unwrap();
    assert_eq!(applied.outcomes, vec![Outcome::Applied; 3]);
    assert_eq!(items.len(), 3);
    assert_eq!(items.capacity(), capacity);
    items.clear();
    assert_eq!(store.record(&spec.namespace, "a").unwrap().unwrap().seq, 3);
    items.push(item(&spec, 2, 2, "e2", serde_json::json!({"k": "a"})));
    let applied = store
        .apply_from(&spec, &mut items, &Housekeeping::default(), None)
        .unwrap();
    assert_eq!(applied.outcomes, vec![Outcome::Duplicate]);
    assert_eq!(items.len(), 1);
}

#[test]
fn a_store_open_elsewhere_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let _held = Store::open(&path, 4).unwrap();
    let Err(err) = Store::open(&path, 4) else {
        panic!("the second open is refused");
    };
    assert_eq!(err.kind(), StoreErrorKind::Locked, "{err}");
}

/// What [`unread_records_change_nothing`] does to both stores.
#[derive(Debug, Clone)]
enum Step {
    /// A batch of new events `(key, delete, epoch)`; with `redeliver`, the batch also carries
    /// the event that many sequences back again (older than the newest applied).
    Batch {
        events: Vec<(u8, bool, Option<u8>)>,
        redeliver: Option<u8>,
    },
    /// Events far ahead of the stream position applied as a backfill (a replay past the
    /// checkpoint): the live events after it are older for those keys.
    Backfill(Vec<u8>),
    /// KV confirms every stored key at a new revision (folded into the next batch).
    Confirm,
    /// The namespace exported from the first store and imported into both.
    Import,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let event = (
        0u8..12,
        prop::bool::weighted(0.1),
        prop::option::weighted(0.15, 0u8..4),
    );
    prop_oneof![
        8 => (prop::collection::vec(event, 1..20), prop::option::weighted(0.2, 1u8..30))
            .prop_map(|(events, redeliver)| Step::Batch { events, redeliver }),
        1 => prop::collection::vec(0u8..12, 1..4).prop_map(Step::Backfill),
        1 => Just(Step::Confirm),
        1 => Just(Step::Import),
    ]
}

/// A `latest` projection with or without KV and an epoch field (same namespace either way).
fn latest_spec(kv: bool, epoch: bool) -> Spec {
    let toml = format!(
        "[[projection]]\nname = \"t\"\nstream = \"S\"\nkey = \"{{data.k}}\"\nreducer = \"latest\"\n\
         delete_on = [\"deleted\"]\n{}{}",
        if kv { "kv_bucket = \"kv\"\n" } else { "" },
        if epoch {
            "epoch = \"{data.epoch}\"\n"
        } else {
            ""
        },
    );
    let config = Config::parse(&toml, Path::new(".")).expect("valid config");
    Spec::compile(&config.projection[0], None).expect("compiles")
}

fn event_item(spec: &Spec, seq: u64, key: u8, delete: bool, epoch: Option<u8>) -> Item {
    let event_type = if delete { "deleted" } else { "set" };
    let data = serde_json::json!({"k": format!("k{key}"), "v": seq, "epoch": epoch});
    typed_item(spec, seq, seq, &format!("e{seq}"), event_type, data)
}

/// Runs `steps` against two stores, one that may skip reading records and one that always
/// reads them: every batch has the same outcomes and KV writes, and the stores end equal.
/// Returns how many batches the first store applied without reading a record.
fn compare_unread(kv: bool, steps: &[Step]) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let unread = Store::open(&dir.path().join("a.redb"), 4).unwrap();
    let read = Store::open(&dir.path().join("b.redb"), 4).unwrap();
    read.unread_keys
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let (plain, with_epoch) = (latest_spec(kv, false), latest_spec(kv, true));
    let namespace = plain.namespace.clone();
    let (mut next, mut house, mut skipped, mut revision) = (1u64, Housekeeping::default(), 0, 0);
    for step in steps {
        match step {
            Step::Batch { events, redeliver } => {
                let epochs = events.iter().any(|(_, _, e)| e.is_some());
                let spec = if epochs { &with_epoch } else { &plain };
                let mut batch: Vec<(u64, u8, bool, Option<u8>)> = Vec::new();
                // With an epoch field every event must carry one.
                let epoch_of = |e: Option<u8>| if epochs { Some(e.unwrap_or(0)) } else { None };
                for (key, delete, epoch) in events {
                    batch.push((next, *key, *delete, epoch_of(*epoch)));
                    next += 1;
                }
                if let Some(back) = redeliver {
                    let seq = next.saturating_sub(u64::from(*back) + 1).max(1);
                    batch.push((seq, (seq % 12) as u8, false, epoch_of(None)));
                }
                let make = || {
                    batch
                        .iter()
                        .map(|&(seq, key, delete, epoch)| event_item(spec, seq, key, delete, epoch))
                        .collect::<Vec<_>>()
                };
                let a = unread.apply(spec, make(), &house, None).unwrap();
                let b = read.apply(spec, make(), &house, None).unwrap();
                house = Housekeeping::default();
                assert_eq!(a.outcomes, b.outcomes, "{step:?}");
                assert_eq!(a.kv_writes, b.kv_writes, "{step:?}");
                assert_eq!(a.keys, b.keys);
                assert!(b.records_read > 0);
                if a.records_read == 0 {
                    skipped += 1;
                }
            }
            Step::Backfill(keys) => {
                let items = |store: &Store| {
                    let items = keys
                        .iter()
                        .enumerate()
                        .map(|(i, key)| {
                            event_item(&plain, next + 100 + i as u64, *key, false, None)
                        })
                        .collect();
                    store.backfill(&plain, items).unwrap().outcomes
                };
                assert_eq!(items(&unread), items(&read));
            }
            Step::Confirm => {
                revision += 1;
                house.kv_confirmed = unread
                    .records(&namespace)
                    .unwrap()
                    .into_iter()
                    .map(|(key, r)| KvConfirmed {
                        key,
                        seq: r.seq,
                        revision: revision * 1000 + r.seq,
                    })
                    .collect();
            }
            Step::Import => {
                let contents = unread.export(&namespace).unwrap();
                unread.import(&namespace, &contents, kv).unwrap();
                read.import(&namespace, &contents, kv).unwrap();
            }
        }
    }
    assert_eq!(
        unread.export(&namespace).unwrap(),
        read.export(&namespace).unwrap()
    );
    skipped
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Skipping the records' reads is invisible: outcomes, KV writes (revision hints
    /// included) and every stored record (epochs and KV revisions kept from before) are those
    /// of a store that reads every record, across backfills past the stream position,
    /// redeliveries, epochs that come and go, KV confirmations and imports.
    #[test]
    fn unread_records_change_nothing(
        kv in proptest::bool::ANY,
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        compare_unread(kv, &steps);
    }
}

/// The comparison above does exercise the unread path (and the read one after a backfill).
#[test]
fn the_unread_path_is_taken_while_events_are_newer_than_every_record() {
    let batch = |keys: &[u8]| Step::Batch {
        events: keys.iter().map(|k| (*k, false, None)).collect(),
        redeliver: None,
    };
    let steps = [
        batch(&[1, 2, 3]),
        batch(&[1, 4]),
        Step::Backfill(vec![2]),
        batch(&[2, 5]),
    ];
    // Two batches skip reading; the one after the backfill (its key 2 is ahead) reads.
    assert_eq!(compare_unread(false, &steps), 2);
    assert_eq!(compare_unread(true, &steps), 2);
}

#[test]
fn a_read_past_the_end_of_the_file_is_corruption_other_io_errors_are_transient() {
    use std::io::{Error, ErrorKind};
    let eof = StoreError::from(redb::StorageError::Io(Error::from(
        ErrorKind::UnexpectedEof,
    )));
    assert_eq!(eof.kind(), StoreErrorKind::Corrupted);
    assert!(eof.to_string().contains("corrupted"), "{eof}");
    let full = StoreError::from(redb::StorageError::Io(Error::from(ErrorKind::StorageFull)));
    assert_eq!(full.kind(), StoreErrorKind::Transient);
    let eof = StoreError::from(redb::CommitError::Storage(redb::StorageError::Io(
        Error::from(ErrorKind::UnexpectedEof),
    )));
    assert_eq!(eof.kind(), StoreErrorKind::Corrupted);
}
