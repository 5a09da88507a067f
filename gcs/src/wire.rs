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
}

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

impl Request {
    /// The shard addressed.
    pub fn shard(&self) -> u32 {
        match self {
            Request::Write { shard, .. }
            | Request::Read { shard, .. }
            | Request::Watch { shard, .. } => *shard,
        }
    }

    /// Encodes the request.
    pub fn encode(&self) -> Bytes {
        let mut w = Writer::with_capacity(64);
        match self {
            Request::Write { shard, cmd } => {
                w.u8(1);
                w.u32(*shard);
                encode_command(&mut w, cmd);
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
                w.u64(wr.revision);
                w.bool(wr.succeeded);
                w.u64(wr.prev_revision);
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
                match e {
                    ServerError::NotLeader { leader } => {
                        w.u8(1);
                        opt_u64(&mut w, *leader);
                    }
                    ServerError::LeadershipLost { leader } => {
                        w.u8(2);
                        opt_u64(&mut w, *leader);
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
                }
            }
        }
        Bytes::from(w.finish())
    }

    /// Decodes a response from untrusted bytes.
    pub fn decode(buf: &[u8]) -> Result<Response, DecodeError> {
        let mut r = Reader::new(buf);
        let usize_of = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let resp = match r.u8()? {
            1 => Response::Write(WriteResult {
                revision: r.u64()?,
                succeeded: r.bool()?,
                prev_revision: r.u64()?,
            }),
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
            5 => Response::Err(match r.u8()? {
                1 => ServerError::NotLeader {
                    leader: read_opt_u64(&mut r)?,
                },
                2 => ServerError::LeadershipLost {
                    leader: read_opt_u64(&mut r)?,
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
                tag => {
                    return Err(DecodeError::BadTag {
                        what: "server error",
                        tag,
                    });
                }
            }),
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
        ];
        for p in resps {
            assert_eq!(Response::decode(&p.encode()).unwrap(), p);
        }
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(buf in proptest::collection::vec(0u8..255, 0..128)) {
            let _ = Request::decode(&buf);
            let _ = Response::decode(&buf);
            let _ = decode_raft(&buf);
        }
    }
}
