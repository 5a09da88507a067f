//! Batches of small messages to one peer: task submissions and actor calls one way, results the other way.
//!
//! Sending each call as its own request costs a QUIC stream, a task hand-off and a syscall per call. Instead, each
//! destination has one sender task that drains everything queued for that peer into one message. Under load, one
//! message then carries hundreds of calls. At rest, a lone call goes out at once: there is no timer and no waiting
//! for a batch to fill.
//!
//! Layout, little-endian: a 16-byte batch header (magic, item count), then per item a 16-byte header (kind, length,
//! call id) and the payload padded to 16 bytes. Every payload therefore starts 16-byte aligned inside the
//! (aligned) message body, so a receiver can read each item's rkyv archive in place and keep it as a zero-copy slice.
//!
//! This module only frames and sends. What the items mean is `cluster`'s business.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{BufMut, Bytes, BytesMut};
use oxray_transport::{Mesh, NodeId, TransportError};

const MAGIC: u32 = u32::from_le_bytes(*b"OXB1");
const HEADER: usize = 16;
/// Most items in one batch: bounds the work a receiver does per message.
pub(crate) const MAX_ITEMS: usize = 1024;
/// Most payload bytes in one batch: well under the transport's message limit, and small enough that one big item
/// does not hold many small ones back for long.
pub(crate) const MAX_BYTES: usize = 4 << 20;
/// Items larger than this do not go into batches (results use a stream; arguments this big should be `put`).
pub(crate) const MAX_ITEM_BYTES: usize = 48 << 20;

/// One framed item.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub(crate) kind: u16,
    pub(crate) call: u64,
    pub(crate) body: Bytes,
}

fn padded(len: usize) -> usize {
    len.div_ceil(16) * 16
}

/// Frames `items` into one aligned buffer.
pub(crate) fn encode(items: &[Item]) -> Bytes {
    let total = HEADER
        + items
            .iter()
            .map(|i| HEADER + padded(i.body.len()))
            .sum::<usize>();
    let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(total);
    let mut head = BytesMut::with_capacity(HEADER);
    head.put_u32_le(MAGIC);
    head.put_u32_le(items.len() as u32);
    head.put_u64_le(0);
    buf.extend_from_slice(&head);
    for i in items {
        let mut h = BytesMut::with_capacity(HEADER);
        h.put_u16_le(i.kind);
        h.put_u16_le(0);
        h.put_u32_le(i.body.len() as u32);
        h.put_u64_le(i.call);
        buf.extend_from_slice(&h);
        buf.extend_from_slice(&i.body);
        let pad = padded(i.body.len()) - i.body.len();
        buf.extend_from_slice(&[0u8; 16][..pad]);
    }
    Bytes::from_owner(buf)
}

/// Splits a received batch into items whose bodies are zero-copy slices of `body`. Malformed input is an error
/// (for that message only), never a panic.
pub(crate) fn decode(body: &Bytes) -> Result<Vec<Item>, String> {
    let b = body.as_ref();
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(x)
    };
    if b.len() < HEADER || u32_at(0) != MAGIC {
        return Err("not a batch".into());
    }
    let count = u32_at(4) as usize;
    if count > MAX_ITEMS {
        return Err(format!(
            "batch of {count} items exceeds the limit of {MAX_ITEMS}"
        ));
    }
    let mut items = Vec::with_capacity(count);
    let mut off = HEADER;
    for n in 0..count {
        if b.len() < off + HEADER {
            return Err(format!("batch truncated at item {n}"));
        }
        let kind = u16_at(off);
        let len = u32_at(off + 4) as usize;
        let call = u64_at(off + 8);
        let start = off + HEADER;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= b.len())
            .ok_or_else(|| format!("item {n} overruns the batch"))?;
        items.push(Item {
            kind,
            call,
            body: body.slice(start..end),
        });
        off = start + padded(len);
    }
    Ok(items)
}

/// Told of each item that could not be delivered, with the reason.
pub(crate) type OnFail = Arc<dyn Fn(Item, &TransportError) + Send + Sync>;

/// Asked to learn a peer's address when the mesh knows none (a node that joined a moment ago, named in a handle
/// or a ref before this node's membership view caught up); the send is tried once more after it.
pub(crate) type Resolve =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

/// Most items queued for one peer before a pusher outside the I/O runtime waits for the sender to catch up.
const MAX_QUEUED: usize = 1 << 16;

/// The queue of items for one peer, drained by one sender task.
///
/// The queue is tokio's lock-free channel, not `flume`: flume wakes an async receiver while it still holds the
/// channel's lock, so the woken sender task, scheduled at once on the pusher's CPU, found the lock taken, slept
/// on it and had to be woken again, two extra context switches on every synchronous call.
pub(crate) struct Outbox {
    tx: tokio::sync::mpsc::UnboundedSender<Item>,
    queued: Arc<AtomicUsize>,
    cap: usize,
}

/// The draining end of an [`Outbox`].
struct Backlog {
    rx: tokio::sync::mpsc::UnboundedReceiver<Item>,
    queued: Arc<AtomicUsize>,
}

/// A queue that makes pushers outside the I/O runtime wait while `cap` items are queued.
fn queue(cap: usize) -> (Outbox, Backlog) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        Outbox {
            tx,
            queued: queued.clone(),
            cap,
        },
        Backlog { rx, queued },
    )
}

impl Backlog {
    /// Waits for an item, then takes whatever else is queued into `batch`, up to [`MAX_ITEMS`] items or
    /// [`MAX_BYTES`]. Returns false once every pusher is gone and the queue is empty.
    async fn next_batch(&mut self, batch: &mut Vec<Item>) -> bool {
        let Some(first) = self.rx.recv().await else {
            return false;
        };
        let mut bytes = first.body.len();
        batch.push(first);
        while batch.len() < MAX_ITEMS && bytes < MAX_BYTES {
            match self.rx.try_recv() {
                Ok(i) => {
                    bytes += i.body.len();
                    batch.push(i);
                }
                Err(_) => break,
            }
        }
        self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
        true
    }
}

impl Outbox {
    /// Starts the sender task for `to`. `kind` is the mesh message kind of the batches; `on_fail` is told of every
    /// item that could not be delivered.
    pub(crate) fn start(
        tokio: &tokio::runtime::Handle,
        mesh: Mesh,
        to: NodeId,
        kind: u16,
        on_fail: OnFail,
        resolve: Resolve,
    ) -> Outbox {
        let (outbox, mut backlog) = queue(MAX_QUEUED);
        tokio.spawn(async move {
            let mut batch: Vec<Item> = Vec::with_capacity(64);
            while backlog.next_batch(&mut batch).await {
                let body = encode(&batch);
                let mut sent = mesh.send(to, kind, body.clone()).await;
                crate::spin::io_message(batch.len() == 1);
                if let Err(TransportError::PeerUnknown(_)) = sent {
                    resolve().await;
                    sent = mesh.send(to, kind, body).await;
                }
                if let Err(e) = sent {
                    tracing::warn!(peer = %to, cause = %e, items = batch.len(), "batch not delivered");
                    for i in batch.drain(..) {
                        on_fail(i, &e);
                    }
                }
                batch.clear();
            }
        });
        outbox
    }

    /// Queues an item. A thread outside the I/O runtime waits while the peer is [`MAX_QUEUED`] items behind, so a
    /// peer that stops reading pushes back on its submitters instead of growing memory; a task on the runtime
    /// never waits (it could be the one that drains the queue).
    pub(crate) fn push(&self, item: Item) -> Result<(), Item> {
        if self.queued.load(Ordering::Acquire) >= self.cap
            && tokio::runtime::Handle::try_current().is_err()
        {
            let mut pause = std::time::Duration::from_micros(50);
            while self.queued.load(Ordering::Acquire) >= self.cap && !self.tx.is_closed() {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(5));
            }
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.tx.send(item).map_err(|e| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            e.0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_items_aligned_and_in_order() {
        let items: Vec<Item> = (0..50u64)
            .map(|i| Item {
                kind: (i % 3) as u16,
                call: i * 7,
                body: Bytes::from(vec![i as u8; (i * 13) as usize]),
            })
            .collect();
        let body = encode(&items);
        let back = decode(&body).unwrap();
        assert_eq!(back.len(), 50);
        for (a, b) in items.iter().zip(&back) {
            assert_eq!((a.kind, a.call, &a.body), (b.kind, b.call, &b.body));
            assert_eq!((b.body.as_ptr() as usize) % 16, 0, "item body not aligned");
        }
    }

    fn item(call: u64) -> Item {
        Item {
            kind: 0,
            call,
            body: Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn a_full_queue_holds_back_pushers_outside_the_runtime_until_it_drains() {
        let (outbox, mut backlog) = queue(2);
        let outbox = Arc::new(outbox);
        outbox.push(item(1)).expect("room");
        outbox.push(item(2)).expect("room");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let pusher = {
            let outbox = outbox.clone();
            std::thread::spawn(move || {
                outbox.push(item(3)).expect("pushed once drained");
                done_tx.send(()).expect("report");
            })
        };
        assert!(
            done_rx
                .recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "a third push went through a full queue"
        );

        let io = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        // A task on the runtime never waits, even past the cap: it may be the one that drains the queue.
        io.block_on(async { outbox.push(item(9)).expect("no wait on the runtime") });
        let mut batch = Vec::new();
        assert!(io.block_on(backlog.next_batch(&mut batch)));
        assert_eq!(
            batch.iter().map(|i| i.call).collect::<Vec<_>>(),
            [1, 2, 9],
            "one batch takes everything queued, in order"
        );
        done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the held-back push went through once the queue drained");
        pusher.join().expect("join");
        batch.clear();
        assert!(io.block_on(backlog.next_batch(&mut batch)));
        assert_eq!(batch[0].call, 3);
        drop(outbox);
        batch.clear();
        assert!(
            !io.block_on(backlog.next_batch(&mut batch)),
            "every pusher gone"
        );
    }

    #[test]
    fn malformed_batches_are_errors() {
        assert!(decode(&Bytes::from_static(b"short")).is_err());
        let good = encode(&[Item {
            kind: 1,
            call: 1,
            body: Bytes::from_static(b"hello"),
        }]);
        // Truncated anywhere: an error, never a panic.
        for cut in 0..good.len() {
            let _ = decode(&good.slice(..cut));
        }
        assert!(decode(&good.slice(..good.len() - 16)).is_err());
        // A huge item length is refused, not trusted.
        let mut bad = good.to_vec();
        bad[HEADER + 4..HEADER + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&Bytes::from(bad)).is_err());
        // Too many items is refused before any allocation proportional to the count.
        let mut many = good.to_vec();
        many[4..8].copy_from_slice(&(MAX_ITEMS as u32 + 1).to_le_bytes());
        assert!(decode(&Bytes::from(many)).is_err());
    }
}
