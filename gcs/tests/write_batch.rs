//! Write batches ([`Request::WriteBatch`]): per-command results for mixed ops, exactly-once when a whole
//! batch is retried (by hand, and by the client after a lost answer), limits refused whole and clearly, and
//! the client coalescing concurrent writes into few requests. Real files and real fsync.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use oxray_gcs::client::{CallError, ClientConfig, Connector, GcsClient};
use oxray_gcs::server::{GcsServer, LocalNet, ServerConfig};
use oxray_gcs::shard::{Command, Expect, Op, ValidateError};
use oxray_gcs::wire::{MAX_BATCH_BYTES, MAX_BATCH_OPS, Request, Response, ServerError};

fn single(dir: &std::path::Path) -> (GcsServer, Arc<LocalNet>) {
    let net = LocalNet::new();
    let server = GcsServer::start(ServerConfig::new(1, vec![1], 1, dir), net.clone()).unwrap();
    net.add(1, server.clone());
    (server, net)
}

fn put(client: u64, seq: u64, key: &str, value: &str) -> Command {
    Command {
        client,
        seq,
        op: Op::Put {
            key: key.as_bytes().to_vec(),
            value: Bytes::copy_from_slice(value.as_bytes()),
        },
    }
}

async fn revision(server: &GcsServer) -> u64 {
    // Poll until the lone member leads (it campaigns at start), then read its revision.
    loop {
        let st = server.status().await;
        if st[0].is_leader {
            return st[0].revision;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batch_answers_each_op_and_a_retried_batch_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _net) = single(dir.path());
    revision(&server).await;
    let cmds = vec![
        put(9, 1, "b/a", "1"),
        put(9, 2, "b/gone", "x"),
        Command {
            client: 9,
            seq: 3,
            op: Op::Cas {
                key: b"b/a".to_vec(),
                expect: Expect::Value(Bytes::from_static(b"1")),
                new: Some(Bytes::from_static(b"2")),
            },
        },
        Command {
            client: 9,
            seq: 4,
            op: Op::Cas {
                key: b"b/a".to_vec(),
                expect: Expect::Absent,
                new: Some(Bytes::from_static(b"never")),
            },
        },
        Command {
            client: 9,
            seq: 5,
            op: Op::Delete {
                key: b"b/gone".to_vec(),
            },
        },
        Command {
            client: 9,
            seq: 6,
            op: Op::Delete {
                key: b"b/absent".to_vec(),
            },
        },
        // Invalid: refused on its own, the rest of the batch is unaffected.
        put(9, 7, "", "v"),
    ];
    let req = Request::WriteBatch { shard: 0, cmds };
    let first = match server.handle(req.clone()).await {
        Response::Writes(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(first.len(), 7);
    let ok: Vec<_> = first[..6]
        .iter()
        .map(|r| r.as_ref().expect("applied"))
        .collect();
    // Commands apply in batch order: put (1), put (2), cas ok (3), cas refused, delete (4), delete of nothing.
    assert_eq!(
        ok.iter()
            .map(|w| (w.revision, w.succeeded))
            .collect::<Vec<_>>(),
        vec![
            (1, true),
            (2, true),
            (3, true),
            (3, false),
            (4, true),
            (4, false)
        ]
    );
    assert_eq!(first[6], Err(ServerError::Invalid(ValidateError::EmptyKey)));
    assert_eq!(revision(&server).await, 4);

    // The same batch again (a client retrying after a lost answer): every applied command answers from the
    // dedup table with its original result, nothing applies twice.
    let again = match server.handle(req.clone()).await {
        Response::Writes(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(again, first);
    assert_eq!(revision(&server).await, 4);
    // And over bytes, as the mesh carries it.
    let bytes = server.handle_bytes(&req.encode()).await;
    assert_eq!(Response::decode(&bytes).unwrap(), Response::Writes(first));
    assert_eq!(revision(&server).await, 4);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_the_limits_are_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _net) = single(dir.path());
    revision(&server).await;

    let too_many: Vec<Command> = (0..=MAX_BATCH_OPS as u64)
        .map(|i| put(5, i + 1, &format!("l/{i}"), "v"))
        .collect();
    let req = Request::WriteBatch {
        shard: 0,
        cmds: too_many,
    };
    let want_ops = MAX_BATCH_OPS as u64 + 1;
    match server.handle(req.clone()).await {
        Response::Err(ServerError::BatchTooLarge { ops, .. }) => assert_eq!(ops, want_ops),
        other => panic!("{other:?}"),
    }
    let resp = Response::decode(&server.handle_bytes(&req.encode()).await).unwrap();
    let Response::Err(e @ ServerError::BatchTooLarge { ops, .. }) = resp else {
        panic!("{resp:?}")
    };
    assert_eq!(ops, want_ops);
    assert!(e.to_string().contains("send smaller batches"), "{e}");

    // Few commands but too many bytes: 17 values of ~1 MB (each within the value limit).
    let big = Bytes::from(vec![1u8; 1_000_000]);
    let heavy: Vec<Command> = (0..17u64)
        .map(|i| Command {
            client: 6,
            seq: i + 1,
            op: Op::Put {
                key: format!("h/{i}").into_bytes(),
                value: big.clone(),
            },
        })
        .collect();
    let enc = Request::WriteBatch {
        shard: 0,
        cmds: heavy,
    }
    .encode();
    assert!(enc.len() > MAX_BATCH_BYTES);
    let resp = Response::decode(&server.handle_bytes(&enc).await).unwrap();
    assert!(
        matches!(resp, Response::Err(ServerError::BatchTooLarge { ops: 17, bytes }) if bytes == enc.len() as u64),
        "{resp:?}"
    );
    // Nothing of either batch was applied.
    assert_eq!(revision(&server).await, 0);
    server.shutdown();
}

/// A connector that counts requests by kind and can lose the answer to the first write batch (after the
/// server applied it), as a dropped connection would.
struct Flaky {
    net: Arc<LocalNet>,
    singles: AtomicUsize,
    batches: AtomicUsize,
    batched_ops: AtomicUsize,
    lose_first_batch: bool,
}

impl Connector for Flaky {
    fn call(
        &self,
        member: u64,
        req: Request,
    ) -> Pin<Box<dyn Future<Output = Result<Response, CallError>> + Send + '_>> {
        Box::pin(async move {
            let lose = match &req {
                Request::Write { .. } => {
                    self.singles.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Request::WriteBatch { cmds, .. } => {
                    self.batched_ops.fetch_add(cmds.len(), Ordering::Relaxed);
                    self.batches.fetch_add(1, Ordering::Relaxed) == 0 && self.lose_first_batch
                }
                _ => false,
            };
            let resp = self.net.call(member, req).await;
            if lose {
                return Err(CallError::Unreachable("answer lost".into()));
            }
            resp
        })
    }
}

async fn concurrent_puts(client: &GcsClient, n: usize) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.put(format!("c/{i}"), Bytes::from(i.to_string()))
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().succeeded);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_coalesces_concurrent_writes_and_retries_a_lost_batch_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (server, net) = single(dir.path());
    revision(&server).await;
    let flaky = Arc::new(Flaky {
        net,
        singles: AtomicUsize::new(0),
        batches: AtomicUsize::new(0),
        batched_ops: AtomicUsize::new(0),
        lose_first_batch: true,
    });
    let client = GcsClient::new(flaky.clone(), vec![1], 1, ClientConfig::default());
    // Warm up the leader hint so the burst below queues behind one batch on the wire.
    client.put("c/warm", Bytes::new()).await.unwrap();
    let n = 200;
    concurrent_puts(&client, n).await;
    let batches = flaky.batches.load(Ordering::Relaxed);
    let singles = flaky.singles.load(Ordering::Relaxed);
    assert!(batches >= 1, "no batch was sent");
    assert!(
        batches + singles < n,
        "{n} writes took {batches} batches and {singles} single requests"
    );
    // Every write went out at least once (the lost batch's ones twice).
    assert!(flaky.batched_ops.load(Ordering::Relaxed) + singles > n);
    // The first batch applied but its answer was lost; its writes were retried (same seqs) and each key
    // was written exactly once: one revision per distinct write, version 1 everywhere.
    assert_eq!(revision(&server).await, n as u64 + 1);
    let (kvs, _) = client.scan_prefix("c/").await.unwrap();
    assert_eq!(kvs.len(), n + 1);
    assert!(
        kvs.iter().all(|kv| kv.version == 1),
        "a write applied twice"
    );
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_off_sends_every_write_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (server, net) = single(dir.path());
    revision(&server).await;
    let flaky = Arc::new(Flaky {
        net,
        singles: AtomicUsize::new(0),
        batches: AtomicUsize::new(0),
        batched_ops: AtomicUsize::new(0),
        lose_first_batch: false,
    });
    let cfg = ClientConfig {
        max_batch_ops: 1,
        ..ClientConfig::default()
    };
    let client = GcsClient::new(flaky.clone(), vec![1], 1, cfg);
    concurrent_puts(&client, 50).await;
    assert_eq!(flaky.batches.load(Ordering::Relaxed), 0);
    assert_eq!(flaky.singles.load(Ordering::Relaxed), 50);
    assert_eq!(revision(&server).await, 50);
    server.shutdown();
}
