//! A small linearizability checker for histories of register/CAS operations, in the style of Knossos and
//! Porcupine (Wing & Gong's search with Lowe's memoisation), used by the deterministic simulation tests.
//!
//! The model is one register per key holding `Option<u64>` (absent or a value). Each key is checked
//! independently (linearizability is compositional). An operation is *invoked* at one instant and either
//! *returned* at a later instant with an observed output, or has an **unknown** outcome (the client gave up):
//! such an operation may take effect at any point after its invocation, or never. Unknown reads carry no
//! information and are dropped.
//!
//! The search is bounded by [`MAX_STEPS`] states so a pathological history cannot hang a test: exceeding it is
//! reported as [`CheckError::Inconclusive`], never as success. This is test tooling; it does no I/O.

use std::collections::{BTreeMap, HashSet};

/// Most search states explored per key before giving up.
pub const MAX_STEPS: usize = 2_000_000;

/// What an operation does to the register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegOp {
    /// Observe the value.
    Read,
    /// Set the value.
    Write(u64),
    /// Remove the value.
    Delete,
    /// Set `new` if the current value equals `expect` (`None` = absent).
    Cas {
        /// Expected current value.
        expect: Option<u64>,
        /// New value.
        new: u64,
    },
}

/// What the client saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A read's value.
    Value(Option<u64>),
    /// A write's acknowledgement.
    Done,
    /// A delete's or CAS's success flag (delete: whether the key existed).
    Flag(bool),
    /// No answer: the operation may or may not have taken effect.
    Unknown,
}

/// One operation of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The register.
    pub key: u64,
    /// What was asked.
    pub op: RegOp,
    /// When it was invoked (any monotonic event counter; all instants must be distinct).
    pub invoke: u64,
    /// When it returned; ignored when `output` is [`Output::Unknown`].
    pub ret: u64,
    /// What came back.
    pub output: Output,
}

/// Why a history was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// No linearization exists for this key's operations.
    #[error("history of key {key} is not linearizable ({ops} operations)")]
    NotLinearizable {
        /// The key.
        key: u64,
        /// How many operations the key had.
        ops: usize,
    },
    /// The search budget ran out before an answer; treat as a failure and shrink the history.
    #[error("search for key {key} exceeded {MAX_STEPS} states")]
    Inconclusive {
        /// The key.
        key: u64,
    },
}

/// Checks a whole history, key by key.
pub fn check(history: &[Operation]) -> Result<(), CheckError> {
    let mut by_key: BTreeMap<u64, Vec<Operation>> = BTreeMap::new();
    for op in history {
        if op.op == RegOp::Read && op.output == Output::Unknown {
            continue;
        }
        by_key.entry(op.key).or_default().push(op.clone());
    }
    for (key, mut ops) in by_key {
        ops.sort_by_key(|o| o.invoke);
        check_key(key, &ops)?;
    }
    Ok(())
}

/// Applies `op` to `state`; `None` if the observed output is impossible from `state`.
fn step(state: Option<u64>, op: RegOp, out: Output) -> Option<Option<u64>> {
    let unknown = out == Output::Unknown;
    match op {
        RegOp::Read => (unknown || out == Output::Value(state)).then_some(state),
        RegOp::Write(v) => Some(Some(v)),
        RegOp::Delete => (unknown || out == Output::Flag(state.is_some())).then_some(None),
        RegOp::Cas { expect, new } => {
            let holds = state == expect;
            if !unknown && out != Output::Flag(holds) {
                return None;
            }
            Some(if holds { Some(new) } else { state })
        }
    }
}

fn check_key(key: u64, ops: &[Operation]) -> Result<(), CheckError> {
    let n = ops.len();
    let ret: Vec<u64> = ops
        .iter()
        .map(|o| {
            if o.output == Output::Unknown {
                u64::MAX
            } else {
                o.ret
            }
        })
        .collect();
    let required = ops.iter().filter(|o| o.output != Output::Unknown).count();
    let words = n.div_ceil(64);
    let mut seen: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut steps = 0usize;
    // Depth-first search over (set of linearized ops, register state).
    let mut stack: Vec<(Vec<u64>, Option<u64>, usize)> = vec![(vec![0; words], None, 0)];
    while let Some((done, state, done_required)) = stack.pop() {
        if done_required == required {
            return Ok(());
        }
        steps += 1;
        if steps > MAX_STEPS {
            return Err(CheckError::Inconclusive { key });
        }
        let is_done = |i: usize| done[i / 64] >> (i % 64) & 1 == 1;
        // An op may go next only if it was invoked before every pending completed op returned.
        let min_ret = (0..n)
            .filter(|&i| !is_done(i))
            .map(|i| ret[i])
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..n {
            if ops[i].invoke >= min_ret {
                break;
            }
            if is_done(i) {
                continue;
            }
            let Some(next) = step(state, ops[i].op, ops[i].output) else {
                continue;
            };
            let mut d = done.clone();
            d[i / 64] |= 1 << (i % 64);
            if seen.insert((d.clone(), next)) {
                let r = done_required + usize::from(ops[i].output != Output::Unknown);
                stack.push((d, next, r));
            }
        }
    }
    Err(CheckError::NotLinearizable { key, ops: n })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(op: RegOp, invoke: u64, ret: u64, output: Output) -> Operation {
        Operation {
            key: 1,
            op,
            invoke,
            ret,
            output,
        }
    }

    #[test]
    fn accepts_concurrent_overlap() {
        // A write overlapping a read may be seen or not.
        let h = vec![
            op(RegOp::Write(1), 1, 4, Output::Done),
            op(RegOp::Read, 2, 3, Output::Value(Some(1))),
            op(RegOp::Read, 5, 6, Output::Value(Some(1))),
        ];
        check(&h).unwrap();
        let h = vec![
            op(RegOp::Write(1), 1, 4, Output::Done),
            op(RegOp::Read, 2, 3, Output::Value(None)),
        ];
        check(&h).unwrap();
    }

    #[test]
    fn rejects_stale_read_after_acknowledged_write() {
        let h = vec![
            op(RegOp::Write(1), 1, 2, Output::Done),
            op(RegOp::Read, 3, 4, Output::Value(None)),
        ];
        assert_eq!(
            check(&h),
            Err(CheckError::NotLinearizable { key: 1, ops: 2 })
        );
    }

    #[test]
    fn rejects_reads_that_go_back_in_time() {
        // Two sequential reads observe 2 then 1, although 1 was overwritten by 2 before both.
        let h = vec![
            op(RegOp::Write(1), 1, 2, Output::Done),
            op(RegOp::Write(2), 3, 10, Output::Done),
            op(RegOp::Read, 4, 5, Output::Value(Some(2))),
            op(RegOp::Read, 6, 7, Output::Value(Some(1))),
        ];
        assert!(matches!(check(&h), Err(CheckError::NotLinearizable { .. })));
    }

    #[test]
    fn rejects_double_cas_success() {
        // Two CASes from the same expected value cannot both succeed.
        let h = vec![
            op(RegOp::Write(0), 1, 2, Output::Done),
            op(
                RegOp::Cas {
                    expect: Some(0),
                    new: 1,
                },
                3,
                6,
                Output::Flag(true),
            ),
            op(
                RegOp::Cas {
                    expect: Some(0),
                    new: 2,
                },
                4,
                7,
                Output::Flag(true),
            ),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn unknown_write_may_or_may_not_apply() {
        let seen = vec![
            op(RegOp::Write(7), 1, 0, Output::Unknown),
            op(RegOp::Read, 5, 6, Output::Value(Some(7))),
        ];
        check(&seen).unwrap();
        let unseen = vec![
            op(RegOp::Write(7), 1, 0, Output::Unknown),
            op(RegOp::Read, 5, 6, Output::Value(None)),
        ];
        check(&unseen).unwrap();
        // But it cannot apply before it was invoked.
        let early = vec![
            op(RegOp::Read, 1, 2, Output::Value(Some(7))),
            op(RegOp::Write(7), 3, 0, Output::Unknown),
        ];
        assert!(check(&early).is_err());
    }
}
