//! Failover: when a standby may take over, and why a resumed old primary decides nothing.
//!
//! The idea in three rules:
//!
//! 1. **Only the authority decides.** A primary records a decision only while it holds the
//!    lease of its epoch in the quorum store, or every standby's confirmation over the
//!    heartbeats, less a safety margin ([`authority::Authority`], checked by the
//!    [`AuthorityGate`] just before each `Commit`/`OnePhase` record and again before the
//!    answer). A sick node stops renewing and stops deciding by itself.
//! 2. **One epoch, one winner.** A promotion raises the epoch by compare-and-swap in the
//!    quorum store; the loser is told who won. A standby that confirmed the primary promised
//!    not to promote until its confirmation runs out, so the lease and the confirmations never
//!    let two nodes decide at once (the argument is written out in `docs/failover.md`).
//! 3. **Every step is journaled.** Each step of a promote, demote or switchover is a `Role`
//!    record in the node's own journal ([`RoleHistory`]), so a re-run resumes after the last
//!    step done, or answers that it is already done.
//!
//! The parts: [`authority`] (the right to decide), [`LeaseKeeper`] (renews the lease, notices
//! a lost epoch), [`RoleHistory`] (the steps already journaled), [`loss`] (what a promotion
//! would lose). The orchestration of the role changes lives in the node (`cli`), which owns
//! the services.

pub mod authority;
pub mod loss;

use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::CommitGate;
use coordinator::record::{CoordRecord, ROLE};
use journal::{Epoch, Journal, Lsn};
use tokio::sync::watch;

pub use authority::{Authority, NoAuthority};

use crate::quorum::{Holder, QuorumError, QuorumStore};

/// The commit gate of a failover-capable primary: its authority first, then (in sync mode)
/// the standby's acknowledgement, then its authority again before the answer.
pub struct AuthorityGate {
    authority: Arc<Authority>,
    inner: Option<Arc<dyn CommitGate>>,
}

impl AuthorityGate {
    /// A gate checking `authority`, wrapping sync replication's gate when there is one.
    pub fn new(authority: Arc<Authority>, inner: Option<Arc<dyn CommitGate>>) -> AuthorityGate {
        AuthorityGate { authority, inner }
    }
}

#[async_trait::async_trait]
impl CommitGate for AuthorityGate {
    async fn confirm(&self, lsn: Lsn) -> Result<(), String> {
        if let Some(inner) = &self.inner {
            inner.confirm(lsn).await?;
        }
        self.authority
            .check()
            .map_err(|why| format!("this node lost its authority before answering: {why}"))
    }

    fn may_decide(&self) -> Result<(), String> {
        self.authority.check().map_err(|why| why.to_string())
    }
}

/// What ended a lease keeper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Asked to stop.
    Stopped,
    /// The epoch moved on: `epoch` and its holder, as the store said.
    Lost {
        /// The store's epoch.
        epoch: u64,
        /// Who holds it.
        holder: Option<Holder>,
    },
}

/// Renews a primary's lease every quarter of its length, while the node is healthy; while it is
/// sick, reads the store instead, so that a lost epoch is noticed and given up all the same.
pub struct LeaseKeeper {
    /// The quorum store.
    pub store: Arc<dyn QuorumStore>,
    /// This node.
    pub me: Holder,
    /// Its authority (granted leases are recorded there).
    pub authority: Arc<Authority>,
    /// The lease's length.
    pub ttl_ms: u64,
    /// Deadline of one call.
    pub call_timeout_ms: u64,
}

impl LeaseKeeper {
    /// Renews until `stop` turns true or the epoch is lost (recorded in the authority too).
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> LeaseEnd {
        let period = Duration::from_millis((self.ttl_ms / 4).max(20));
        let epoch = self.authority.epoch();
        let mut unreachable_since: Option<Instant> = None;
        loop {
            if *stop.borrow() {
                return LeaseEnd::Stopped;
            }
            if self.authority.sick().is_some() {
                // A sick node does not renew, but it still reads the store: once a standby has
                // taken the epoch, it must learn it and follow instead of staying a primary
                // that refuses every commit.
                if let Some(end) = self.epoch_moved(epoch).await {
                    return end;
                }
            } else {
                let sent = Instant::now();
                let call = self.store.renew(&self.me, epoch, self.ttl_ms);
                let answer =
                    match tokio::time::timeout(Duration::from_millis(self.call_timeout_ms), call)
                        .await
                    {
                        Ok(answer) => answer,
                        Err(_) => Err(QuorumError::Unreachable {
                            store: self.store.describe(),
                            detail: format!("no answer within {} ms", self.call_timeout_ms),
                        }),
                    };
                match answer {
                    Ok(grant) => {
                        self.authority.lease_granted(sent, grant.ttl_ms);
                        if let Some(since) = unreachable_since.take() {
                            tracing::info!(
                                after_ms = since.elapsed().as_millis() as u64,
                                "the quorum store answers again; lease renewed"
                            );
                        }
                    }
                    Err(QuorumError::EpochMoved { epoch: now, holder })
                    | Err(QuorumError::NotHolder { epoch: now, holder }) => {
                        let who = holder.as_ref().map_or("another node".to_string(), |h| {
                            format!("{} ({})", h.node, h.address)
                        });
                        let why = format!(
                            "epoch {epoch} is over: the quorum store gives epoch {now} to {who}"
                        );
                        tracing::warn!("{why}; this node stops committing");
                        self.authority.lose(why);
                        return LeaseEnd::Lost { epoch: now, holder };
                    }
                    Err(e) => {
                        self.authority.quorum_unreachable();
                        if unreachable_since.is_none() {
                            unreachable_since = Some(Instant::now());
                            tracing::warn!(
                                error = %e,
                                "cannot renew the lease; committing goes on only while the lease \
                                 or the standbys' confirmations last"
                            );
                        }
                    }
                }
            }
            let wait = if unreachable_since.is_some() {
                period.min(Duration::from_millis(50))
            } else {
                period
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

impl LeaseKeeper {
    /// Whether the store has moved past `epoch` (read with `state`, not renewing): then the
    /// authority is lost, as when a renew is refused. An unreachable store says nothing.
    async fn epoch_moved(&self, epoch: u64) -> Option<LeaseEnd> {
        let call = self.store.state();
        let timeout = Duration::from_millis(self.call_timeout_ms);
        let state = tokio::time::timeout(timeout, call).await.ok()?.ok()?;
        let other = state
            .holder
            .as_ref()
            .is_some_and(|h| h.node != self.me.node);
        if state.epoch == epoch && !other {
            return None;
        }
        let who = state
            .holder
            .as_ref()
            .map_or("another node".to_string(), |h| {
                format!("{} ({})", h.node, h.address)
            });
        let why = format!(
            "epoch {epoch} is over: the quorum store gives epoch {} to {who}",
            state.epoch
        );
        tracing::warn!("{why}; this sick node stops being the primary");
        self.authority.lose(why);
        Some(LeaseEnd::Lost {
            epoch: state.epoch,
            holder: state.holder,
        })
    }
}

/// One `Role` record: a step of a role change, done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleStep {
    /// Where it is in the journal.
    pub lsn: Lsn,
    /// The change (`promote …`, `demote …`).
    pub op: String,
    /// The step.
    pub step: String,
    /// The epoch of the change.
    pub epoch: u64,
    /// What was done.
    pub detail: String,
}

/// The role changes a journal records, oldest first.
#[derive(Clone, Debug, Default)]
pub struct RoleHistory {
    /// Every step.
    pub steps: Vec<RoleStep>,
}

impl RoleHistory {
    /// Reads every `Role` record of `journal` (its retained records).
    pub fn read(journal: &Journal) -> Result<RoleHistory, journal::JournalError> {
        let mut steps = Vec::new();
        let from = journal.oldest_lsn();
        if journal.durable_lsn() < from {
            return Ok(RoleHistory { steps });
        }
        for record in journal.read_from(from)? {
            let record = record?;
            if record.kind != ROLE {
                continue;
            }
            if let Ok(CoordRecord::Role {
                op,
                step,
                epoch,
                detail,
                ..
            }) = CoordRecord::decode(record.kind, &record.payload)
            {
                steps.push(RoleStep {
                    lsn: record.lsn,
                    op,
                    step,
                    epoch,
                    detail,
                });
            }
        }
        Ok(RoleHistory { steps })
    }

    /// Whether `step` of a change named `kind` (`promote`, `demote`) at `epoch` is done.
    pub fn done(&self, kind: &str, epoch: u64, step: &str) -> bool {
        self.steps
            .iter()
            .any(|s| s.epoch == epoch && s.step == step && s.op.split(' ').next() == Some(kind))
    }

    /// The last step recorded.
    pub fn last(&self) -> Option<&RoleStep> {
        self.steps.last()
    }

    /// Records a step in memory (after [`append_role`] made it durable).
    pub fn push(&mut self, step: RoleStep) {
        self.steps.push(step);
    }
}

/// Appends a `Role` record and waits until it is durable; returns the step as recorded.
pub async fn append_role(
    journal: &Journal,
    epoch: u64,
    op: &str,
    step: &str,
    detail: &str,
) -> Result<RoleStep, journal::JournalError> {
    let record = CoordRecord::Role {
        at_ms: now_ms(),
        op: op.to_string(),
        step: step.to_string(),
        epoch,
        detail: detail.to_string(),
    };
    let lsn = journal
        .append(Epoch(epoch), ROLE, &record.encode())?
        .await?;
    Ok(RoleStep {
        lsn,
        op: op.to_string(),
        step: step.to_string(),
        epoch,
        detail: detail.to_string(),
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;

    use super::*;
    use crate::quorum::ClusterState;

    /// A store in memory: one epoch and holder; a renew succeeds for the holder at its epoch.
    struct MemoryStore(Mutex<(u64, Holder)>);

    #[async_trait::async_trait]
    impl QuorumStore for MemoryStore {
        fn describe(&self) -> String {
            "memory".into()
        }

        async fn state(&self) -> Result<ClusterState, QuorumError> {
            let (epoch, holder) = self.0.lock().unwrap().clone();
            Ok(ClusterState {
                epoch,
                holder: Some(holder),
                lease_remaining_ms: None,
            })
        }

        async fn claim(
            &self,
            _: &Holder,
            _: u64,
            _: u64,
            _: u64,
            _: bool,
        ) -> Result<crate::quorum::Grant, QuorumError> {
            unreachable!("the lease keeper never claims")
        }

        async fn renew(
            &self,
            me: &Holder,
            epoch: u64,
            ttl_ms: u64,
        ) -> Result<crate::quorum::Grant, QuorumError> {
            let (now, holder) = self.0.lock().unwrap().clone();
            if now != epoch {
                return Err(QuorumError::EpochMoved {
                    epoch: now,
                    holder: Some(holder),
                });
            }
            if holder.node != me.node {
                return Err(QuorumError::NotHolder {
                    epoch: now,
                    holder: Some(holder),
                });
            }
            Ok(crate::quorum::Grant { epoch, ttl_ms })
        }

        async fn release(&self, _: &Holder, _: u64) -> Result<(), QuorumError> {
            Ok(())
        }
    }

    fn holder(node: &str) -> Holder {
        Holder {
            node: node.into(),
            address: format!("http://{node}"),
        }
    }

    #[tokio::test]
    async fn a_sick_primary_that_stopped_renewing_still_learns_its_epoch_is_over() {
        let store = Arc::new(MemoryStore(Mutex::new((1, holder("a")))));
        let authority = Arc::new(Authority::new(1, 50));
        let keeper = LeaseKeeper {
            store: store.clone(),
            me: holder("a"),
            authority: authority.clone(),
            ttl_ms: 400,
            call_timeout_ms: 100,
        };
        let (_stop, stop_rx) = watch::channel(false);
        let run = tokio::spawn(keeper.run(stop_rx));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(authority.check().is_ok(), "the lease was renewed");
        authority.set_sick(Some("journal: no space left".into()));
        *store.0.lock().unwrap() = (2, holder("b"));
        let end = tokio::time::timeout(Duration::from_secs(2), run)
            .await
            .expect("the keeper noticed the lost epoch within 2 s")
            .unwrap();
        assert_eq!(
            end,
            LeaseEnd::Lost {
                epoch: 2,
                holder: Some(holder("b"))
            }
        );
        assert!(authority.lost().is_some_and(|why| why.contains("epoch 2")));
    }
}
