//! The GCS's request/response messages and their byte encoding, so that any transport (the in-process
//! [`crate::server::LocalNet`], or the QUIC mesh through a thin adapter) only has to carry opaque bytes.
//!
//! Decoding is strict and bounded (see [`crate::codec`]): a malformed message is a [`DecodeError`] for that
//! peer, never a panic. This module does no I/O.

use bytes::Bytes;
use protobuf::Message as _;
use raft::prelude::Message;

use crate::codec::{DecodeError, Reader, Writer};
use crate::replica::Query;
use crate::shard::{
    Command, Event, KeyValue, ValidateError, WriteResult, decode_command, encode_command,
};

/// Most events one watch poll may ask for.
pub const MAX_WATCH_BATCH: u32 = 4096;
/// Most keys one response may carry (bounds decoding allocations).
const MAX_ITEMS: usize = 1 << 20;
/// Most writes one [`Request::WriteBatch`] may carry. A member refuses a larger batch as a whole with
/// [`ServerError::BatchTooLarge`] before proposing any of it. Equal to the replica's default entry size
/// ([`crate::replica::ReplicaConfig::max_batch_cmds`]), so one full batch fills at most one Raft entry.
pub const MAX_BATCH_OPS: usize = 1024;
/// Most encoded bytes one [`Request::WriteBatch`] may take (16 MiB, a quarter of the transport's message
/// limit). A write whose value alone is larger than a client's batch byte budget travels as a lone
/// [`Request::Write`], which only the shard's value limit bounds.
pub const MAX_BATCH_BYTES: usize = 16 << 20;

/// A client request to one shard on one GCS member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A mutation; answered with [`Response::Write`].
    Write {
        /// Target shard.
        shard: u32,
        /// The command (carries client id and seq for exactly-once retries).
        cmd: Command,
    },
    /// Several mutations of one shard in one envelope (client-side batching); answered with
    /// [`Response::Writes`], one result per command in the same order. Each command keeps its own
    /// `(client, seq)`, so retrying the whole batch, or any of its commands alone or in another batch,
    /// applies each command at most once. At most [`MAX_BATCH_OPS`] commands and [`MAX_BATCH_BYTES`] bytes.
    WriteBatch {
        /// Target shard.
        shard: u32,
        /// The commands, applied in this order.
        cmds: Vec<Command>,
    },
    /// A linearizable read; answered with [`Response::Get`] or [`Response::Range`].
    Read {
        /// Target shard.
        shard: u32,
        /// What to read.
        query: Query,
    },
    /// A watch long-poll: changes under `prefix` after revision `after`, waiting up to `wait_ms` for one.
    /// Served by any replica (leader or follower), from its applied change log.
    Watch {
        /// Target shard.
        shard: u32,
        /// Key prefix.
        prefix: Vec<u8>,
        /// Return changes with revision greater than this.
        after: u64,
        /// Most events to return (capped at [`MAX_WATCH_BATCH`]).
        max: u32,
        /// How long to wait when nothing is new yet (capped by the server).
        wait_ms: u32,
    },
}

/// A member's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The write's result.
    Write(WriteResult),
    /// Per-command results of a [`Request::WriteBatch`], in the batch's order. A command that failed
    /// (not leader, leadership lost, invalid, ...) carries its own error; the others are unaffected.
    Writes(Vec<Result<WriteResult, ServerError>>),
    /// A get's answer.
    Get {
        /// The value, if present.
        kv: Option<KeyValue>,
        /// Shard revision at the read.
        revision: u64,
    },
    /// A range's answer.
    Range {
        /// Keys found.
        kvs: Vec<KeyValue>,
        /// Whether more keys remained.
        more: bool,
        /// Shard revision at the read.
        revision: u64,
    },
    /// A watch poll's answer.
    Events {
        /// Matching changes, oldest first.
        events: Vec<Event>,
        /// The log was scanned through this revision: the next poll may ask for changes after it.
        covered: u64,
    },
    /// The request failed.
    Err(ServerError),
}

/// Errors a member reports for one request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    /// This member's replica of the shard is not the leader; nothing was done. Retry at `leader`.
    #[error("not leader (hint {leader:?})")]
    NotLeader {
        /// Member id of the leader, if known.
        leader: Option<u64>,
    },
    /// Leadership changed with the write in flight; retry with the same seq (exactly-once via dedup).
    #[error("leadership lost (hint {leader:?})")]
    LeadershipLost {
        /// Member id of the new leader, if known.
        leader: Option<u64>,
    },
    /// The request breaks a limit.
    #[error(transparent)]
    Invalid(#[from] ValidateError),
    /// The retried seq is older than the shard's dedup window; the outcome is unknown.
    #[error("request seq {seq} of client {client:x} is older than the dedup window")]
    DedupExpired {
        /// Client.
        client: u64,
        /// Seq.
        seq: u64,
    },
    /// The member is overloaded (request queue or watch waiters full); back off and retry.
    #[error("member busy")]
    Busy,
    /// The watch asked for revisions no longer retained; re-read the prefix and watch from its revision.
    #[error("revisions up to {oldest} were compacted")]
    Compacted {
        /// The watch can resume after this revision only.
        oldest: u64,
    },
    /// The member hosts no such shard.
    #[error("no shard {shard} on this member")]
    NoSuchShard {
        /// The shard asked for.
        shard: u32,
    },
    /// The member's replica stopped (storage failure or shutdown).
    #[error("replica stopped: {0}")]
    Stopped(String),
    /// The request did not decode; retrying the same bytes will not help.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A [`Request::WriteBatch`] broke [`MAX_BATCH_OPS`] or [`MAX_BATCH_BYTES`]; none of it was proposed.
    /// Split it into smaller batches.
    #[error(
        "write batch of {ops} ops in {bytes} bytes is over the limit of {MAX_BATCH_OPS} ops and \
         {MAX_BATCH_BYTES} bytes; nothing was applied, send smaller batches"
    )]
    BatchTooLarge {
        /// Commands in the batch.
        ops: u64,
        /// Its encoded size (0 when it did not arrive as bytes).
        bytes: u64,
    },
}

/// Whether an encoded request is a [`Request::WriteBatch`] over the limits, checked from its header alone
/// (before decoding any command), so an oversized batch is refused with a precise answer.
pub fn batch_over_limit(buf: &[u8]) -> Option<ServerError> {
    if buf.first() != Some(&TAG_WRITE_BATCH) {
        return None;
    }
    // tag u8, shard u32, count u32.
    let count = buf.get(5..9)?;
    let ops = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
    (ops > MAX_BATCH_OPS || buf.len() > MAX_BATCH_BYTES).then_some(ServerError::BatchTooLarge {
        ops: ops as u64,
        bytes: buf.len() as u64,
    })
}

const TAG_WRITE_BATCH: u8 = 4;

fn encode_kv(w: &mut Writer, kv: &KeyValue) {
    w.bytes(&kv.key);
    w.bytes(&kv.value);
    w.u64(kv.create_revision);
    w.u64(kv.mod_revision);
    w.u64(kv.version);
}

fn decode_kv(r: &mut Reader<'_>) -> Result<KeyValue, DecodeError> {
    Ok(KeyValue {
        key: r.vec()?,
        value: r.bytes()?,
        create_revision: r.u64()?,
        mod_revision: r.u64()?,
        version: r.u64()?,
    })
}

fn opt_u64(w: &mut Writer, v: Option<u64>) {
    match v {
        None => w.u8(0),
        Some(x) => {
            w.u8(1);
            w.u64(x);
        }
    }
}

fn read_opt_u64(r: &mut Reader<'_>) -> Result<Option<u64>, DecodeError> {
    Ok(if r.bool()? { Some(r.u64()?) } else { None })
}

/// Encoded size of a command (for sizing buffers and batches; an estimate that never undercounts by much).
pub fn command_len(c: &Command) -> usize {
    use crate::shard::{Expect, Op};
    // client, seq, op tag, key length prefix and key.
    let head = 8 + 8 + 1 + 4 + c.op.key().len();
    head + match &c.op {
        Op::Put { value, .. } => 4 + value.len(),
        Op::Delete { .. } => 0,
        Op::Cas { expect, new, .. } => {
            let e = match expect {
                Expect::Absent => 1,
                Expect::Value(v) => 5 + v.len(),
                Expect::ModRevision(_) => 9,
            };
            e + 5 + new.as_ref().map_or(0, |v| v.len())
        }
    }
}

fn encode_write_result(w: &mut Writer, wr: &WriteResult) {
    w.u64(wr.revision);
    w.bool(wr.succeeded);
    w.u64(wr.prev_revision);
}

fn decode_write_result(r: &mut Reader<'_>) -> Result<WriteResult, DecodeError> {
    Ok(WriteResult {
        revision: r.u64()?,
        succeeded: r.bool()?,
        prev_revision: r.u64()?,
    })
}

fn encode_error(w: &mut Writer, e: &ServerError) {
    match e {
        ServerError::NotLeader { leader } => {
            w.u8(1);
            opt_u64(w, *leader);
        }
        ServerError::LeadershipLost { leader } => {
            w.u8(2);
            opt_u64(w, *leader);
        }
        ServerError::Invalid(v) => {
            w.u8(3);
            match v {
                ValidateError::EmptyKey => w.u8(0),
                ValidateError::KeyTooLarge { len, max } => {
                    w.u8(1);
                    w.u64(*len as u64);
                    w.u64(*max as u64);
                }
                ValidateError::ValueTooLarge { len, max } => {
                    w.u8(2);
                    w.u64(*len as u64);
                    w.u64(*max as u64);
                }
            }
        }
        ServerError::DedupExpired { client, seq } => {
            w.u8(4);
            w.u64(*client);
            w.u64(*seq);
        }
        ServerError::Busy => w.u8(5),
        ServerError::Compacted { oldest } => {
            w.u8(6);
            w.u64(*oldest);
        }
        ServerError::NoSuchShard { shard } => {
            w.u8(7);
            w.u32(*shard);
        }
        ServerError::Stopped(why) => {
            w.u8(8);
            w.bytes(why.as_bytes());
        }
        ServerError::BadRequest(why) => {
            w.u8(9);
            w.bytes(why.as_bytes());
        }
        ServerError::BatchTooLarge { ops, bytes } => {
            w.u8(10);
            w.u64(*ops);
            w.u64(*bytes);
        }
    }
}

fn decode_error(r: &mut Reader<'_>) -> Result<ServerError, DecodeError> {
    let usize_of = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    Ok(match r.u8()? {
        1 => ServerError::NotLeader {
            leader: read_opt_u64(r)?,
        },
        2 => ServerError::LeadershipLost {
            leader: read_opt_u64(r)?,
        },
        3 => ServerError::Invalid(match r.u8()? {
            0 => ValidateError::EmptyKey,
            1 => ValidateError::KeyTooLarge {
                len: usize_of(r.u64()?),
                max: usize_of(r.u64()?),
            },
            2 => ValidateError::ValueTooLarge {
                len: usize_of(r.u64()?),
                max: usize_of(r.u64()?),
            },
            tag => {
                return Err(DecodeError::BadTag {
                    what: "validate error",
                    tag,
                });
            }
        }),
        4 => ServerError::DedupExpired {
            client: r.u64()?,
            seq: r.u64()?,
        },
        5 => ServerError::Busy,
        6 => ServerError::Compacted { oldest: r.u64()? },
        7 => ServerError::NoSuchShard { shard: r.u32()? },
        8 => ServerError::Stopped(String::from_utf8_lossy(r.slice()?).into_owned()),
        9 => ServerError::BadRequest(String::from_utf8_lossy(r.slice()?).into_owned()),
        10 => ServerError::BatchTooLarge {
            ops: r.u64()?,
            bytes: r.u64()?,
        },
        tag => {
            return Err(DecodeError::BadTag {
                what: "server error",
                tag,
            });
        }
    })
}

impl Request {
    /// The shard addressed.
    pub fn shard(&self) -> u32 {
        match self {
            Request::Write { shard, .. }
            | Request::WriteBatch { shard, .. }
            | Request::Read { shard, .. }
            | Request::Watch { shard, .. } => *shard,
        }
    }

    /// Encodes the request.
    pub fn encode(&self) -> Bytes {
        let cap = match self {
            Request::WriteBatch { cmds, .. } => 16 + cmds.iter().map(command_len).sum::<usize>(),
            _ => 64,
        };
        let mut w = Writer::with_capacity(cap);
        match self {
            Request::Write { shard, cmd } => {
                w.u8(1);
                w.u32(*shard);
                encode_command(&mut w, cmd);
            }
            Request::WriteBatch { shard, cmds } => {
                w.u8(TAG_WRITE_BATCH);
                w.u32(*shard);
                w.u32(cmds.len() as u32);
                for c in cmds {
                    encode_command(&mut w, c);
                }
            }
            Request::Read { shard, query } => {
                w.u8(2);
                w.u32(*shard);
                match query {
                    Query::Get { key } => {
                        w.u8(0);
                        w.bytes(key);
                    }
                    Query::Range { start, end, limit } => {
                        w.u8(1);
                        w.bytes(start);
                        w.opt_bytes(end.as_deref());
                        w.u64(*limit as u64);
                    }
                }
            }
            Request::Watch {
                shard,
                prefix,
                after,
                max,
                wait_ms,
            } => {
                w.u8(3);
                w.u32(*shard);
                w.bytes(prefix);
                w.u64(*after);
                w.u32(*max);
                w.u32(*wait_ms);
            }
        }
        Bytes::from(w.finish())
    }

    /// Decodes a request from untrusted bytes.
    pub fn decode(buf: &[u8]) -> Result<Request, DecodeError> {
        let mut r = Reader::new(buf);
        let req = match r.u8()? {
            1 => Request::Write {
                shard: r.u32()?,
                cmd: decode_command(&mut r)?,
            },
            TAG_WRITE_BATCH => {
                let shard = r.u32()?;
                let n = r.len(MAX_BATCH_OPS)?;
                let mut cmds = Vec::with_capacity(n);
                for _ in 0..n {
                    cmds.push(decode_command(&mut r)?);
                }
                Request::WriteBatch { shard, cmds }
            }
            2 => {
                let shard = r.u32()?;
                let query = match r.u8()? {
                    0 => Query::Get { key: r.vec()? },
                    1 => Query::Range {
                        start: r.vec()?,
                        end: r.opt_bytes()?.map(|b| b.to_vec()),
                        limit: usize::try_from(r.u64()?).unwrap_or(usize::MAX),
                    },
                    tag => return Err(DecodeError::BadTag { what: "query", tag }),
                };
                Request::Read { shard, query }
            }
            3 => Request::Watch {
                shard: r.u32()?,
                prefix: r.vec()?,
                after: r.u64()?,
                max: r.u32()?,
                wait_ms: r.u32()?,
            },
            tag => {
                return Err(DecodeError::BadTag {
                    what: "request",
                    tag,
                });
            }
        };
        r.finish()?;
        Ok(req)
    }
}

impl Response {
    /// Encodes the response.
    pub fn encode(&self) -> Bytes {
        let mut w = Writer::with_capacity(64);
        match self {
            Response::Write(wr) => {
                w.u8(1);
                encode_write_result(&mut w, wr);
            }
            Response::Get { kv, revision } => {
                w.u8(2);
                w.u64(*revision);
                match kv {
                    None => w.u8(0),
                    Some(kv) => {
                        w.u8(1);
                        encode_kv(&mut w, kv);
                    }
                }
            }
            Response::Range {
                kvs,
                more,
                revision,
            } => {
                w.u8(3);
                w.u64(*revision);
                w.bool(*more);
                w.u32(kvs.len() as u32);
                for kv in kvs {
                    encode_kv(&mut w, kv);
                }
            }
            Response::Events { events, covered } => {
                w.u8(4);
                w.u64(*covered);
                w.u32(events.len() as u32);
                for e in events {
                    w.u64(e.revision);
                    w.bytes(&e.key);
                    w.opt_bytes(e.value.as_deref());
                }
            }
            Response::Err(e) => {
                w.u8(5);
                encode_error(&mut w, e);
            }
            Response::Writes(results) => {
                w.u8(6);
                w.u32(results.len() as u32);
                for r in results {
                    match r {
                        Ok(wr) => {
                            w.u8(0);
                            encode_write_result(&mut w, wr);
                        }
                        Err(e) => {
                            w.u8(1);
                            encode_error(&mut w, e);
                        }
                    }
                }
            }
        }
        Bytes::from(w.finish())
    }

    /// Decodes a response from untrusted bytes.
    pub fn decode(buf: &[u8]) -> Result<Response, DecodeError> {
        let mut r = Reader::new(buf);
        let resp = match r.u8()? {
            1 => Response::Write(decode_write_result(&mut r)?),
            2 => {
                let revision = r.u64()?;
                let kv = if r.bool()? {
                    Some(decode_kv(&mut r)?)
                } else {
                    None
                };
                Response::Get { kv, revision }
            }
            3 => {
                let revision = r.u64()?;
                let more = r.bool()?;
                let n = r.len(MAX_ITEMS)?;
                let mut kvs = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    kvs.push(decode_kv(&mut r)?);
                }
                Response::Range {
                    kvs,
                    more,
                    revision,
                }
            }
            4 => {
                let covered = r.u64()?;
                let n = r.len(MAX_ITEMS)?;
                let mut events = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    events.push(Event {
                        revision: r.u64()?,
                        key: r.vec()?,
                        value: r.opt_bytes()?,
                    });
                }
                Response::Events { events, covered }
            }
            5 => Response::Err(decode_error(&mut r)?),
            6 => {
                let n = r.len(MAX_BATCH_OPS)?;
                let mut results = Vec::with_capacity(n);
                for _ in 0..n {
                    results.push(if r.bool()? {
                        Err(decode_error(&mut r)?)
                    } else {
                        Ok(decode_write_result(&mut r)?)
                    });
                }
                Response::Writes(results)
            }
            tag => {
                return Err(DecodeError::BadTag {
                    what: "response",
                    tag,
                });
            }
        };
        r.finish()?;
        Ok(resp)
    }
}

/// Encodes a Raft message for `shard` for the peer-to-peer path.
pub fn encode_raft(shard: u32, msg: &Message) -> Bytes {
    let body = msg.write_to_bytes().unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&shard.to_le_bytes());
    out.extend_from_slice(&body);
    Bytes::from(out)
}

/// Most Raft messages in one [`encode_raft_batch`].
pub const MAX_RAFT_BATCH: usize = 4096;

/// Packs encoded Raft messages ([`encode_raft`]) into one body: a `u32` count, then each as a `u32` length
/// and its bytes. The caller keeps to [`MAX_RAFT_BATCH`] messages.
pub fn encode_raft_batch(msgs: &[Bytes]) -> Bytes {
    let total: usize = msgs.iter().map(|m| 4 + m.len()).sum();
    let mut w = Writer::with_capacity(4 + total);
    w.u32(msgs.len() as u32);
    for m in msgs {
        w.bytes(m);
    }
    Bytes::from(w.finish())
}

/// Splits an [`encode_raft_batch`] body from untrusted bytes into its messages (still encoded; each is
/// decoded with [`decode_raft`]). Lengths are checked against the buffer and the count against
/// [`MAX_RAFT_BATCH`] before anything is allocated.
pub fn decode_raft_batch(buf: &[u8]) -> Result<Vec<&[u8]>, DecodeError> {
    let mut r = Reader::new(buf);
    let n = r.len(MAX_RAFT_BATCH)?;
    // Each part takes at least its 4-byte length, which bounds the allocation by the buffer, too.
    let mut out = Vec::with_capacity(n.min(buf.len() / 4));
    for _ in 0..n {
        out.push(r.slice()?);
    }
    r.finish()?;
    Ok(out)
}

/// Decodes a peer Raft message (shard, message) from untrusted bytes.
pub fn decode_raft(buf: &[u8]) -> Result<(u32, Message), DecodeError> {
    let mut r = Reader::new(buf);
    let shard = r.u32()?;
    let msg = Message::parse_from_bytes(&buf[4..]).map_err(|_| DecodeError::BadTag {
        what: "raft message",
        tag: 0,
    })?;
    Ok((shard, msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::{Expect, Op};

    #[test]
    fn requests_and_responses_round_trip() {
        let reqs = vec![
            Request::Write {
                shard: 3,
                cmd: Command {
                    client: 1,
                    seq: 2,
                    op: Op::Cas {
                        key: b"k".to_vec(),
                        expect: Expect::ModRevision(4),
                        new: Some(Bytes::from_static(b"v")),
                    },
                },
            },
            Request::Read {
                shard: 0,
                query: Query::Range {
                    start: b"a".to_vec(),
                    end: None,
                    limit: 10,
                },
            },
            Request::WriteBatch {
                shard: 2,
                cmds: vec![
                    Command {
                        client: 1,
                        seq: 3,
                        op: Op::Put {
                            key: b"p".to_vec(),
                            value: Bytes::from_static(b"v"),
                        },
                    },
                    Command {
                        client: 1,
                        seq: 4,
                        op: Op::Delete { key: b"d".to_vec() },
                    },
                ],
            },
            Request::WriteBatch {
                shard: 0,
                cmds: Vec::new(),
            },
            Request::Watch {
                shard: 1,
                prefix: b"nodes/".to_vec(),
                after: 9,
                max: 100,
                wait_ms: 1000,
            },
        ];
        for q in reqs {
            assert_eq!(Request::decode(&q.encode()).unwrap(), q);
        }
        let kv = KeyValue {
            key: b"k".to_vec(),
            value: Bytes::from_static(b"v"),
            create_revision: 1,
            mod_revision: 2,
            version: 3,
        };
        let resps = vec![
            Response::Get {
                kv: Some(kv.clone()),
                revision: 5,
            },
            Response::Range {
                kvs: vec![kv.clone(), kv],
                more: true,
                revision: 5,
            },
            Response::Events {
                events: vec![Event {
                    revision: 4,
                    key: b"x".to_vec(),
                    value: None,
                }],
                covered: 7,
            },
            Response::Err(ServerError::NotLeader { leader: Some(2) }),
            Response::Err(ServerError::Invalid(ValidateError::KeyTooLarge {
                len: 9,
                max: 4,
            })),
            Response::Err(ServerError::Compacted { oldest: 3 }),
            Response::Err(ServerError::Stopped("disk".into())),
            Response::Err(ServerError::BadRequest("tag".into())),
            Response::Err(ServerError::BatchTooLarge {
                ops: 2000,
                bytes: 9,
            }),
            Response::Writes(vec![
                Ok(WriteResult {
                    revision: 4,
                    succeeded: true,
                    prev_revision: 1,
                }),
                Err(ServerError::LeadershipLost { leader: Some(3) }),
                Err(ServerError::Invalid(ValidateError::EmptyKey)),
            ]),
        ];
        for p in resps {
            assert_eq!(Response::decode(&p.encode()).unwrap(), p);
        }
    }

    #[test]
    fn command_len_matches_the_encoding() {
        let cmds = [
            Op::Put {
                key: b"key".to_vec(),
                value: Bytes::from_static(b"value"),
            },
            Op::Delete { key: b"k".to_vec() },
            Op::Cas {
                key: b"k".to_vec(),
                expect: Expect::Value(Bytes::from_static(b"old")),
                new: Some(Bytes::from_static(b"new")),
            },
            Op::Cas {
                key: b"k".to_vec(),
                expect: Expect::Absent,
                new: None,
            },
        ];
        for op in cmds {
            let c = Command {
                client: 1,
                seq: 2,
                op,
            };
            let mut w = Writer::default();
            encode_command(&mut w, &c);
            // Exact, or over by at most the few bytes of an absent CAS value: never under.
            let (enc, est) = (w.len(), command_len(&c));
            assert!(est >= enc && est <= enc + 4, "{c:?}: {est} vs {enc}");
        }
    }

    #[test]
    fn batch_limits_are_read_from_the_header() {
        let req = Request::WriteBatch {
            shard: 0,
            cmds: Vec::new(),
        };
        let mut enc = req.encode().to_vec();
        assert_eq!(batch_over_limit(&enc), None);
        enc[5..9].copy_from_slice(&(MAX_BATCH_OPS as u32 + 1).to_le_bytes());
        assert!(matches!(
            batch_over_limit(&enc),
            Some(ServerError::BatchTooLarge { ops, .. }) if ops == MAX_BATCH_OPS as u64 + 1
        ));
        // A truncated header is left to the decoder (which reports it), never read out of bounds.
        assert_eq!(batch_over_limit(&enc[..6]), None);
        assert!(Request::decode(&enc[..6]).is_err());
        // Other requests are not batches.
        assert_eq!(batch_over_limit(&[1, 0, 0, 0, 0, 255, 255, 255, 255]), None);
    }

    #[test]
    fn raft_batches_round_trip() {
        let msgs: Vec<Bytes> = (0..3u64)
            .map(|i| {
                let m = Message {
                    to: i + 1,
                    from: 9,
                    ..Default::default()
                };
                encode_raft(7, &m)
            })
            .collect();
        let body = encode_raft_batch(&msgs);
        let parts = decode_raft_batch(&body).unwrap();
        assert_eq!(parts.len(), 3);
        for (i, p) in parts.iter().enumerate() {
            let (shard, m) = decode_raft(p).unwrap();
            assert_eq!((shard, m.to, m.from), (7, i as u64 + 1, 9));
        }
        assert!(decode_raft_batch(&body[..body.len() - 1]).is_err());
        let mut huge = body.to_vec();
        huge[..4].copy_from_slice(&(MAX_RAFT_BATCH as u32 + 1).to_le_bytes());
        assert!(decode_raft_batch(&huge).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(buf in proptest::collection::vec(0u8..255, 0..128)) {
            let _ = Request::decode(&buf);
            let _ = Response::decode(&buf);
            let _ = decode_raft(&buf);
            let _ = decode_raft_batch(&buf);
            let _ = batch_over_limit(&buf);
        }
    }
}
