//! What became of an xid: the coordinator's [`Outcome`] (or open, or unknown) as a
//! [`TxnOutcome`], and back.

use super::*;

/// What became of an xid: the domain side of [`TxnOutcome`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XidOutcome {
    /// The transaction.
    pub xid: Xid,
    /// Its state.
    pub state: XidState,
}

/// The state of an xid, as `Outcome` answers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XidState {
    /// Committed, rolled back or in doubt, as the coordinator answered its commit.
    Ended(Outcome),
    /// Still open.
    Open,
    /// Nothing is known of it.
    Unknown,
}

impl RollbackCause {
    /// The cause of a coordinator's [`Outcome::RolledBack`]: the branch's error when one made
    /// it roll back ([`RollbackKind::Branch`]), else the coordinator's words
    /// ([`RollbackKind::Coordinator`]).
    pub fn from_outcome(reason: &str, failed: Option<&adapters::ResourceError>) -> RollbackCause {
        let kind = if failed.is_some() {
            RollbackKind::Branch
        } else {
            RollbackKind::Coordinator
        };
        RollbackCause {
            kind: kind as i32,
            reason: reason.to_string(),
            timeout_ms: 0,
            branch_error: failed.map(Into::into),
            retryable: failed.is_some_and(branch_error_retryable),
        }
    }
}

impl From<&XidOutcome> for TxnOutcome {
    fn from(outcome: &XidOutcome) -> TxnOutcome {
        use txn_outcome::State;
        let state = match &outcome.state {
            XidState::Ended(Outcome::Committed { lsn }) => State::Committed(v1::Committed {
                decision_lsn: lsn.map(|l| l.0),
            }),
            XidState::Ended(Outcome::RolledBack { reason, failed }) => {
                State::RolledBack(v1::RolledBack {
                    cause: Some(RollbackCause::from_outcome(reason, failed.as_ref())),
                })
            }
            XidState::Ended(Outcome::InDoubt { error, branch }) => State::InDoubt(v1::InDoubt {
                error: error.clone(),
                branch: branch.clone(),
            }),
            XidState::Open => State::Open(v1::Open {}),
            XidState::Unknown => State::Unknown(v1::Unknown {}),
        };
        TxnOutcome {
            xid: xid_text(outcome.xid),
            state: Some(state),
        }
    }
}

impl TryFrom<TxnOutcome> for XidOutcome {
    type Error = WireError;

    fn try_from(outcome: TxnOutcome) -> Result<XidOutcome, WireError> {
        use txn_outcome::State;
        let xid = parse_xid("TxnOutcome.xid", &outcome.xid)?;
        let state = match outcome.state.ok_or(WireError::Missing {
            field: "TxnOutcome.state",
        })? {
            State::Committed(c) => XidState::Ended(Outcome::Committed {
                lsn: c
                    .decision_lsn
                    .map(|l| parse_lsn("Committed.decision_lsn", l))
                    .transpose()?,
            }),
            State::RolledBack(r) => {
                let cause = r.cause.ok_or(WireError::Missing {
                    field: "RolledBack.cause",
                })?;
                let kind: RollbackKind = parse_enum("RollbackCause.kind", cause.kind)?;
                let failed = match (kind, cause.branch_error) {
                    (RollbackKind::Branch, None) => {
                        return Err(WireError::Missing {
                            field: "RollbackCause.branch_error",
                        });
                    }
                    (_, error) => error.map(adapters::ResourceError::try_from).transpose()?,
                };
                XidState::Ended(Outcome::RolledBack {
                    reason: cause.reason,
                    failed,
                })
            }
            State::InDoubt(d) => XidState::Ended(Outcome::InDoubt {
                error: d.error,
                branch: d.branch,
            }),
            State::Unknown(_) => XidState::Unknown,
            State::Open(_) => XidState::Open,
        };
        Ok(XidOutcome { xid, state })
    }
}
