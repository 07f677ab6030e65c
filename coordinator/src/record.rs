//! The coordinator's journal records and their encoding.
//!
//! | kind | record | when |
//! |---:|---|---|
//! | 1 | `Commit { xid, at_ms, branches: [(resource, redo)] }` | the decision: durable before the caller hears "committed" |
//! | 2 | `End { xid }` | every branch acknowledged phase 2 (appended without waiting) |
//! | 3 | `Resolve { xid, commit, operator, at_ms }` | an operator's decision for an in-doubt or stuck transaction |
//! | 4 | `OnePhase { xid, at_ms, resource, redo }` | a lone branch is about to commit in one phase: durable before its commit, while it holds its locks |
//! | 5 | `Abort { xid, reason }` | the branch of a `OnePhase` record did not commit (durable before the caller hears it) |
//! | 6 | `Forget { xid, resource, operator, reason, at_ms }` | an operator ended a branch whose resource is lost for good (a heuristic hazard: its outcome there is unknown) |
//! | 7 | `Checkpoint { at_ms }` | a shutdown's last record, written after asking the journal for a new segment, so that the checkpoint can remove every finished record before it; about no transaction |
//! | 8 | `Role { at_ms, op, step, epoch, detail }` | a step of a promote, demote or switchover done (see `replicator::failover`), so that a re-run resumes it or reports it done; about no transaction |
//!
//! Presumed abort: a transaction with no `Commit` record never committed, so nothing is journaled
//! for rollbacks. A `OnePhase` record is the exception: its outcome is the resource's, so it is
//! followed by `End` (committed) or `Abort` (not), and until one of them is read the transaction
//! counts as undecided (recovery asks the resource; a standby waits before applying it). Payload encoding, version 1, little-endian: an xid is its text form with a `u16`
//! length; a string is a `u32` length and UTF-8 bytes; bytes are a `u32` length and the bytes. A
//! decoder refuses a payload version above 1 ([`RecordError::NewerVersion`]), a kind it does not
//! know, and any length that runs past the payload, before allocating. [`encode_commit`] and
//! [`encode_end`] write the same bytes from borrowed parts, in one allocation of the exact size;
//! the runtime uses them on the commit path.

use adapters::Xid;
use adapters::xid::XidText;
use journal::RecordKind;

/// Kind of the decision record.
pub const COMMIT: RecordKind = RecordKind::new(1, 1);
/// Kind of the end record.
pub const END: RecordKind = RecordKind::new(2, 1);
/// Kind of an operator's resolution.
pub const RESOLVE: RecordKind = RecordKind::new(3, 1);
/// Kind of a one-phase commit's record.
pub const ONE_PHASE: RecordKind = RecordKind::new(4, 1);
/// Kind of the record of a one-phase commit that did not happen.
pub const ABORT: RecordKind = RecordKind::new(5, 1);
/// Kind of an operator's forgetting of a branch whose resource is lost for good.
pub const FORGET: RecordKind = RecordKind::new(6, 1);
/// Kind of the checkpoint marker a shutdown writes last.
pub const CHECKPOINT: RecordKind = RecordKind::new(7, 1);
/// Kind of a role change's step record.
pub const ROLE: RecordKind = RecordKind::new(8, 1);

/// A coordinator record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoordRecord {
    /// The commit decision with every writing branch's redo.
    Commit {
        /// The transaction.
        xid: Xid,
        /// When the decision was made, in milliseconds since the Unix epoch (for operators).
        at_ms: u64,
        /// `(resource name, redo)` of each writing branch.
        branches: Vec<(String, Vec<u8>)>,
    },
    /// Phase 2 finished.
    End {
        /// The transaction.
        xid: Xid,
    },
    /// An operator decided the outcome by hand.
    Resolve {
        /// The transaction.
        xid: Xid,
        /// Commit (true) or roll back (false).
        commit: bool,
        /// Who decided (user name as given).
        operator: String,
        /// When, in milliseconds since the Unix epoch.
        at_ms: u64,
    },
    /// A lone branch commits in one phase after this record is durable; `End` or `Abort` tells
    /// whether it did.
    OnePhase {
        /// The transaction.
        xid: Xid,
        /// When the record was made, in milliseconds since the Unix epoch (for operators).
        at_ms: u64,
        /// The branch's resource.
        resource: String,
        /// Its redo (never empty: a branch with nothing to replicate is not journaled).
        redo: Vec<u8>,
    },
    /// The branch of a `OnePhase` record did not commit.
    Abort {
        /// The transaction.
        xid: Xid,
        /// Why, for operators.
        reason: String,
    },
    /// An operator ended the transaction's branch in `resource` without its resource's answer:
    /// the resource is lost for good, so what became of the branch there is unknown (a
    /// heuristic hazard). The transaction no longer waits for that branch.
    Forget {
        /// The transaction.
        xid: Xid,
        /// The branch's resource.
        resource: String,
        /// Who decided.
        operator: String,
        /// Why, as the operator gave it.
        reason: String,
        /// When, in milliseconds since the Unix epoch.
        at_ms: u64,
    },
    /// Written last by a shutdown, after asking the journal to start a new segment once the
    /// current one holds enough: the finished records before it can then all be removed, and the
    /// next start reads little. About no transaction; the ledger passes over it.
    Checkpoint {
        /// When, in milliseconds since the Unix epoch (for operators).
        at_ms: u64,
    },
    /// A step of a role change (promote, demote, switchover) is done. About no transaction;
    /// the ledger passes over it, and so does a standby's replay.
    Role {
        /// When, in milliseconds since the Unix epoch (for operators).
        at_ms: u64,
        /// Which change: its name and identity, e.g. `promote 7f3a…`.
        op: String,
        /// The step done.
        step: String,
        /// The epoch the change is for.
        epoch: u64,
        /// What was done, for operators.
        detail: String,
    },
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The record was written by a newer concord.
    #[error(
        "record kind {code} has payload version {version}; this concord reads version 1: run a newer concord"
    )]
    NewerVersion {
        /// Kind code.
        code: u8,
        /// Its version.
        version: u8,
    },
    /// The kind is not a coordinator record.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// The payload is malformed.
    #[error("malformed {kind} record: {reason}")]
    Malformed {
        /// Which record.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl CoordRecord {
    /// Its kind.
    pub fn kind(&self) -> RecordKind {
        match self {
            CoordRecord::Commit { .. } => COMMIT,
            CoordRecord::End { .. } => END,
            CoordRecord::Resolve { .. } => RESOLVE,
            CoordRecord::OnePhase { .. } => ONE_PHASE,
            CoordRecord::Abort { .. } => ABORT,
            CoordRecord::Forget { .. } => FORGET,
            CoordRecord::Checkpoint { .. } => CHECKPOINT,
            CoordRecord::Role { .. } => ROLE,
        }
    }

    /// The transaction it is about (`None`: a `Checkpoint`).
    pub fn xid(&self) -> Option<Xid> {
        match self {
            CoordRecord::Commit { xid, .. }
            | CoordRecord::End { xid }
            | CoordRecord::Resolve { xid, .. }
            | CoordRecord::OnePhase { xid, .. }
            | CoordRecord::Abort { xid, .. }
            | CoordRecord::Forget { xid, .. } => Some(*xid),
            CoordRecord::Checkpoint { .. } | CoordRecord::Role { .. } => None,
        }
    }

    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            CoordRecord::Commit {
                xid,
                at_ms,
                branches,
            } => encode_commit(
                &xid.text(),
                *at_ms,
                branches
                    .iter()
                    .map(|(resource, redo)| (resource.as_str(), redo.as_slice())),
            ),
            CoordRecord::End { xid } => encode_end(&xid.text()),
            CoordRecord::Resolve {
                xid,
                commit,
                operator,
                at_ms,
            } => {
                let text = xid.text();
                let mut out =
                    Vec::with_capacity(2 + text.as_bytes().len() + 1 + 4 + operator.len() + 8);
                put_xid(&mut out, text.as_bytes());
                out.push(u8::from(*commit));
                put_bytes(&mut out, operator.as_bytes());
                out.extend_from_slice(&at_ms.to_le_bytes());
                out
            }
            CoordRecord::OnePhase {
                xid,
                at_ms,
                resource,
                redo,
            } => encode_one_phase(&xid.text(), *at_ms, resource, redo),
            CoordRecord::Abort { xid, reason } => encode_abort(&xid.text(), reason),
            CoordRecord::Forget {
                xid,
                resource,
                operator,
                reason,
                at_ms,
            } => {
                let text = xid.text();
                let mut out = Vec::with_capacity(
                    2 + text.as_bytes().len()
                        + 12
                        + resource.len()
                        + operator.len()
                        + reason.len()
                        + 8,
                );
                put_xid(&mut out, text.as_bytes());
                put_bytes(&mut out, resource.as_bytes());
                put_bytes(&mut out, operator.as_bytes());
                put_bytes(&mut out, reason.as_bytes());
                out.extend_from_slice(&at_ms.to_le_bytes());
                out
            }
            CoordRecord::Checkpoint { at_ms } => at_ms.to_le_bytes().to_vec(),
            CoordRecord::Role {
                at_ms,
                op,
                step,
                epoch,
                detail,
            } => {
                let mut out = Vec::with_capacity(16 + 12 + op.len() + step.len() + detail.len());
                out.extend_from_slice(&at_ms.to_le_bytes());
                put_bytes(&mut out, op.as_bytes());
                put_bytes(&mut out, step.as_bytes());
                out.extend_from_slice(&epoch.to_le_bytes());
                put_bytes(&mut out, detail.as_bytes());
                out
            }
        }
    }

    /// Decodes a payload of the given kind.
    pub fn decode(kind: RecordKind, payload: &[u8]) -> Result<CoordRecord, RecordError> {
        let name = match kind.code {
            1 => "Commit",
            2 => "End",
            3 => "Resolve",
            4 => "OnePhase",
            5 => "Abort",
            6 => "Forget",
            7 => "Checkpoint",
            8 => "Role",
            other => return Err(RecordError::UnknownKind(other)),
        };
        if kind.version != 1 {
            return Err(RecordError::NewerVersion {
                code: kind.code,
                version: kind.version,
            });
        }
        let mut r = Reader {
            bytes: payload,
            kind: name,
        };
        if kind.code == 7 {
            let at_ms = u64::from_le_bytes(r.array::<8>()?);
            return match r.bytes.len() {
                0 => Ok(CoordRecord::Checkpoint { at_ms }),
                n => Err(r.malformed(format!("{n} bytes left over"))),
            };
        }
        if kind.code == 8 {
            let at_ms = u64::from_le_bytes(r.array::<8>()?);
            let op = r.string()?;
            let step = r.string()?;
            let epoch = u64::from_le_bytes(r.array::<8>()?);
            let detail = r.string()?;
            return match r.bytes.len() {
                0 => Ok(CoordRecord::Role {
                    at_ms,
                    op,
                    step,
                    epoch,
                    detail,
                }),
                n => Err(r.malformed(format!("{n} bytes left over"))),
            };
        }
        let xid = r.xid()?;
        let record = match kind.code {
            1 => {
                let at_ms = u64::from_le_bytes(r.array::<8>()?);
                let count = r.u32()?;
                let mut branches = Vec::new();
                for _ in 0..count {
                    let resource = r.string()?;
                    let redo = r.bytes()?.to_vec();
                    branches.push((resource, redo));
                }
                CoordRecord::Commit {
                    xid,
                    at_ms,
                    branches,
                }
            }
            2 => CoordRecord::End { xid },
            4 => {
                let at_ms = u64::from_le_bytes(r.array::<8>()?);
                let resource = r.string()?;
                let redo = r.bytes()?.to_vec();
                CoordRecord::OnePhase {
                    xid,
                    at_ms,
                    resource,
                    redo,
                }
            }
            5 => {
                let reason = r.string()?;
                CoordRecord::Abort { xid, reason }
            }
            6 => {
                let resource = r.string()?;
                let operator = r.string()?;
                let reason = r.string()?;
                let at_ms = u64::from_le_bytes(r.array::<8>()?);
                CoordRecord::Forget {
                    xid,
                    resource,
                    operator,
                    reason,
                    at_ms,
                }
            }
            _ => {
                let commit = r.take(1)?[0] != 0;
                let operator = r.string()?;
                let at_ms = u64::from_le_bytes(r.array::<8>()?);
                CoordRecord::Resolve {
                    xid,
                    commit,
                    operator,
                    at_ms,
                }
            }
        };
        if !r.bytes.is_empty() {
            return Err(r.malformed(format!("{} bytes left over", r.bytes.len())));
        }
        Ok(record)
    }
}

/// The payload of `Commit { xid, at_ms, branches }` from the xid's text ([`Xid::text`]) and
/// borrowed `(resource, redo)` pairs, the same bytes as [`CoordRecord::encode`] gives, in one
/// allocation of the exact size.
pub fn encode_commit<'a, I>(text: &XidText, at_ms: u64, branches: I) -> Vec<u8>
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
    I::IntoIter: Clone,
{
    let branches = branches.into_iter();
    let (count, branch_bytes) = branches
        .clone()
        .fold((0usize, 0usize), |(n, bytes), (resource, redo)| {
            (n + 1, bytes + 4 + resource.len() + 4 + redo.len())
        });
    let mut out = Vec::with_capacity(2 + text.as_bytes().len() + 8 + 4 + branch_bytes);
    put_xid(&mut out, text.as_bytes());
    out.extend_from_slice(&at_ms.to_le_bytes());
    out.extend_from_slice(&(count as u32).to_le_bytes());
    for (resource, redo) in branches {
        put_bytes(&mut out, resource.as_bytes());
        put_bytes(&mut out, redo);
    }
    out
}

/// The payload of `End { xid }` from the xid's text, the same bytes as [`CoordRecord::encode`]
/// gives.
pub fn encode_end(text: &XidText) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + text.as_bytes().len());
    put_xid(&mut out, text.as_bytes());
    out
}

/// The payload of `OnePhase { xid, at_ms, resource, redo }` from borrowed parts, the same bytes
/// as [`CoordRecord::encode`] gives.
pub fn encode_one_phase(text: &XidText, at_ms: u64, resource: &str, redo: &[u8]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(2 + text.as_bytes().len() + 8 + 4 + resource.len() + 4 + redo.len());
    put_xid(&mut out, text.as_bytes());
    out.extend_from_slice(&at_ms.to_le_bytes());
    put_bytes(&mut out, resource.as_bytes());
    put_bytes(&mut out, redo);
    out
}

/// The payload of `Abort { xid, reason }`, the same bytes as [`CoordRecord::encode`] gives.
pub fn encode_abort(text: &XidText, reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + text.as_bytes().len() + 4 + reason.len());
    put_xid(&mut out, text.as_bytes());
    put_bytes(&mut out, reason.as_bytes());
    out
}

fn put_xid(out: &mut Vec<u8>, text: &[u8]) {
    out.extend_from_slice(&(text.len() as u16).to_le_bytes());
    out.extend_from_slice(text);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
    kind: &'static str,
}

impl<'a> Reader<'a> {
    fn malformed(&self, reason: String) -> RecordError {
        RecordError::Malformed {
            kind: self.kind,
            reason,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if n > self.bytes.len() {
            return Err(self.malformed(format!("needs {n} bytes, {} remain", self.bytes.len())));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.array::<4>()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], RecordError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, RecordError> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.malformed("a text field is not UTF-8".into()))
    }

    fn xid(&mut self) -> Result<Xid, RecordError> {
        let len = u16::from_le_bytes(self.array::<2>()?) as usize;
        let text = self.take(len)?;
        let text =
            std::str::from_utf8(text).map_err(|_| self.malformed("xid is not UTF-8".into()))?;
        text.parse().map_err(|e| self.malformed(format!("{e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use journal::Epoch;

    fn xid() -> Xid {
        Xid {
            node: 1,
            epoch: Epoch(2),
            seq: 3,
        }
    }

    #[test]
    fn records_round_trip() {
        let records = [
            CoordRecord::Commit {
                xid: xid(),
                at_ms: 99,
                branches: vec![("files".into(), vec![1, 2, 3]), ("kv".into(), vec![])],
            },
            CoordRecord::End { xid: xid() },
            CoordRecord::Resolve {
                xid: xid(),
                commit: true,
                operator: "ops".into(),
                at_ms: 17,
            },
            CoordRecord::OnePhase {
                xid: xid(),
                at_ms: 5,
                resource: "orders".into(),
                redo: b"{\"v\":1}".to_vec(),
            },
            CoordRecord::Abort {
                xid: xid(),
                reason: "serialization failure".into(),
            },
            CoordRecord::Forget {
                xid: xid(),
                resource: "orders".into(),
                operator: "ops".into(),
                reason: "database lost".into(),
                at_ms: 21,
            },
            CoordRecord::Checkpoint { at_ms: 22 },
            CoordRecord::Role {
                at_ms: 23,
                op: "promote 1f".into(),
                step: "epoch".into(),
                epoch: 4,
                detail: "won epoch 4".into(),
            },
        ];
        for record in records {
            let payload = record.encode();
            assert_eq!(payload.len(), payload.capacity(), "{record:?}");
            let decoded = CoordRecord::decode(record.kind(), &payload).unwrap();
            assert_eq!(decoded, record);
        }
    }

    #[test]
    fn borrowed_encodings_match_the_records() {
        let commit = CoordRecord::Commit {
            xid: xid(),
            at_ms: 1_700_000_000_000,
            branches: vec![("a".into(), vec![]), ("files".into(), vec![7; 300])],
        };
        let borrowed = encode_commit(
            &xid().text(),
            1_700_000_000_000,
            [("a", &[][..]), ("files", &[7u8; 300][..])],
        );
        assert_eq!(borrowed, commit.encode());
        assert_eq!(
            encode_end(&xid().text()),
            CoordRecord::End { xid: xid() }.encode()
        );
        // Version 1 as written before: the xid's text with a u16 length first.
        let mut end = vec![6, 0];
        end.extend_from_slice(b"n1e2s3");
        assert_eq!(encode_end(&xid().text()), end);
    }

    #[test]
    fn newer_versions_unknown_kinds_and_short_payloads_are_refused() {
        let commit = CoordRecord::Commit {
            xid: xid(),
            at_ms: 1,
            branches: vec![("files".into(), vec![9; 40])],
        };
        let payload = commit.encode();
        assert!(matches!(
            CoordRecord::decode(RecordKind::new(1, 2), &payload),
            Err(RecordError::NewerVersion {
                code: 1,
                version: 2
            })
        ));
        assert!(matches!(
            CoordRecord::decode(RecordKind::new(9, 1), &payload),
            Err(RecordError::UnknownKind(9))
        ));
        for cut in 0..payload.len() {
            assert!(
                CoordRecord::decode(COMMIT, &payload[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut huge = payload.clone();
        let at = 2 + xid().to_string().len() + 8;
        huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(CoordRecord::decode(COMMIT, &huge).is_err());
    }
}
