//! Demote and switchover: a planned, lossless handover.
//!
//! Demote, on the primary: **stop_work** (no new decision; `Begin` is refused, naming the
//! peer), **drain** (commits in flight finish), **handover** (a `Role` record, the last of this
//! epoch here), **ship_tail** (wait until the standby acknowledged every record, the handover
//! record included: nothing is lost), **release** (the lease ends now in the quorum store, so
//! the standby may claim the next epoch without waiting), **follow** (the coordinator closes
//! without a checkpoint record — its journal stays a prefix of the standby's — and the node
//! follows the peer).
//!
//! Switchover is demote, then the peer's promotion (told the epoch handed over, so it needs no
//! fence), then following it; the window with no primary runs from **stop_work** to the
//! peer's answer, and is printed. When the standby never acknowledges, or the peer refuses,
//! the node serves again at the same epoch (it still holds it) and says why.

use std::sync::Arc;
use std::time::{Duration, Instant};

use journal::Lsn;
use proto::v1;
use replicator::failover::append_role;

use super::promote::Report;
use super::{Node, Role};

/// How long the handover waits for the standby's acknowledgement.
const SHIP_TAIL_MS_MAX: u64 = 10_000;

/// Demotes `node` (and with `switchover`, promotes the peer).
pub(crate) async fn demote(
    node: &Arc<Node>,
    force: bool,
    operator: &str,
    switchover: bool,
) -> v1::RoleChangeReply {
    let mut report = Report::new();
    let what = if switchover {
        "a switchover"
    } else {
        "a demotion"
    };
    let _change = match node.begin_change(what) {
        Ok(guard) => guard,
        Err(running) => return report.busy(running),
    };
    let mut role = node.role.lock().await;
    let Role::Primary(serving) = &*role else {
        let view = node.view();
        report.step(
            "follow",
            "already done",
            format!(
                "this node is not the primary (it is {}; the primary is {})",
                view.role,
                view.primary.as_deref().unwrap_or("not known")
            ),
        );
        return v1::RoleChangeReply {
            epoch: view.epoch,
            primary: view.primary.unwrap_or_default(),
            ..report.reply(v1::ChangeOutcome::AlreadyDone)
        };
    };
    let epoch = serving.authority.epoch();
    let op = format!(
        "{} by {operator}",
        if switchover { "switchover" } else { "demote" }
    );
    let window_start = Instant::now();
    node.set_view(|v| v.role = "demoting");
    serving
        .authority
        .stop(format!("this node is handing over ({op})"));
    serving.daemon.drain();
    report.step(
        "stop_work",
        "done",
        "no new transactions; new ones are refused",
    );
    let settled = serving
        .daemon
        .wait_settled(Duration::from_millis(super::DRAIN_MS_MAX))
        .await;
    if !settled && !force {
        let reply = report.refuse(
            "drain",
            format!("commits still in flight after {} ms", super::DRAIN_MS_MAX),
            "try again when the load is lower, or --force",
        );
        resume_serving(node, serving);
        return reply;
    }
    report.step("drain", "done", "no commit in flight");
    let handover = match append_role(
        serving.journal(),
        epoch,
        &op,
        "handover",
        &format!(
            "the primary at epoch {epoch} hands over to {}",
            node.fo.peer
        ),
    )
    .await
    {
        Ok(step) => step.lsn,
        Err(e) => {
            let reply = report.fail(
                "handover",
                format!("journal the step: {e}"),
                "the journal failed: restart the node",
            );
            return reply;
        }
    };
    report.step("handover", "done", format!("journaled at lsn {handover}"));
    match wait_acknowledged(serving, handover).await {
        Ok(ms) => report.step(
            "ship_tail",
            "done",
            format!("the standby acknowledged everything up to lsn {handover} ({ms} ms)"),
        ),
        Err(why) if !force => {
            let reply = report.refuse(
                "ship_tail",
                why,
                "check the standby (concord status on it); demoting now would lose what it lacks — --force does it anyway",
            );
            resume_serving(node, serving);
            return reply;
        }
        Err(why) => report.step(
            "ship_tail",
            "failed",
            format!("{why}; --force: handing over anyway"),
        ),
    }
    let released = node.store.release(&node.me, epoch).await;
    if let Err(e) = released {
        // The lease then runs out by itself within lease_ttl_ms.
        report.step(
            "release",
            "failed",
            format!(
                "{e}; the lease runs out by itself within {} ms",
                node.fo.lease_ttl_ms
            ),
        );
    } else {
        report.step(
            "release",
            "done",
            format!("gave up the lease of epoch {epoch}"),
        );
    }
    let Role::Primary(serving) = std::mem::replace(&mut *role, Role::Vacant) else {
        return report.fail(
            "follow",
            "the role changed during the handover",
            "run `concord status`",
        );
    };
    node.coordinator_slot.set(None);
    node.replication_slot.set(None);
    if let Err(e) = serving
        .stop_with(&format!("handed over ({op})"), true)
        .await
    {
        return report.fail(
            "follow",
            format!("{e:#}"),
            "restart the node: it starts as a standby",
        );
    }
    if let Err(e) =
        replicator::replay::write_floor(&node.cfg.data_dir.join("replication"), handover)
    {
        tracing::warn!(error = %e, "could not write the replay restart point");
    }
    let mut window_ms = 0;
    let mut primary = node.fo.peer.clone();
    let mut follow_epoch = epoch;
    if switchover {
        match promote_peer(node, epoch).await {
            Ok(reply) if reply.outcome == v1::ChangeOutcome::Done as i32 => {
                window_ms = window_start.elapsed().as_millis() as u64;
                follow_epoch = reply.epoch;
                if !reply.primary.is_empty() {
                    primary = reply.primary.clone();
                }
                report.step(
                    "promote_peer",
                    "done",
                    format!("{} is the primary at epoch {}", primary, reply.epoch),
                );
            }
            Ok(reply) => {
                report.step(
                    "promote_peer",
                    "refused",
                    format!("{} {}", reply.reason, reply.what_to_do),
                );
                return serve_again(node, &mut role, epoch, report, "the peer did not take over")
                    .await;
            }
            Err(e) => {
                report.step("promote_peer", "failed", e.clone());
                return serve_again(
                    node,
                    &mut role,
                    epoch,
                    report,
                    "the peer could not be asked to take over",
                )
                .await;
            }
        }
    }
    match node.start_following(&primary, follow_epoch).await {
        Ok(following) => *role = Role::Standby(following),
        Err(e) => {
            return report.fail(
                "follow",
                format!("{e:#}"),
                "restart the node: it starts as a standby",
            );
        }
    }
    report.step("follow", "done", format!("following {primary}"));
    let summary = if switchover {
        format!("switchover to {primary} done; no primary for {window_ms} ms")
    } else {
        format!("demote at epoch {epoch} done")
    };
    node.set_view(|v| v.last_change = summary);
    v1::RoleChangeReply {
        epoch: follow_epoch,
        primary: if switchover { primary } else { String::new() },
        window_ms,
        what_to_do: if switchover {
            String::new()
        } else {
            format!(
                "no node is the primary now: promote the standby (`concord promote --node {}`){}",
                node.fo.peer,
                if node.fo.automatic {
                    ", or let it promote itself (automatic)"
                } else {
                    ""
                }
            )
        },
        risk: if force {
            "--force: what the standby had not acknowledged is not on it".into()
        } else {
            String::new()
        },
        ..report.reply(v1::ChangeOutcome::Done)
    }
}

/// Refused before the handover record: the node decides again.
fn resume_serving(node: &Node, serving: &super::primary::Serving) {
    serving.authority.resume();
    serving.daemon.undrain();
    node.set_view(|v| v.role = "primary");
}

/// Waits until the standby acknowledged `lsn`; returns how long it took.
async fn wait_acknowledged(serving: &super::primary::Serving, lsn: Lsn) -> Result<u64, String> {
    let started = Instant::now();
    let deadline = started + Duration::from_millis(SHIP_TAIL_MS_MAX);
    loop {
        let states = serving.shipper.standby_states();
        if states.values().any(|s| s.acknowledged >= lsn) {
            return Ok(started.elapsed().as_millis() as u64);
        }
        if Instant::now() >= deadline {
            let best = states.values().map(|s| s.acknowledged).max();
            return Err(match best {
                Some(ack) => format!(
                    "the standby acknowledged up to lsn {ack} only, not {lsn}, within {SHIP_TAIL_MS_MAX} ms"
                ),
                None => format!("no standby is connected (waited {SHIP_TAIL_MS_MAX} ms)"),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Asks the peer to take over after a handover at `epoch`.
async fn promote_peer(node: &Node, epoch: u64) -> Result<v1::RoleChangeReply, String> {
    let channel = proto::client::connect_failover(&node.fo.peer, &node.peer_credentials)
        .await
        .map_err(|e| format!("connect to {}: {e}", node.fo.peer))?;
    let mut client = channel;
    client
        .promote(v1::PromoteRequest {
            force: false,
            dry_run: false,
            operator: format!("switchover from {}", node.fo.name),
            handover_epoch: epoch,
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("{}: {}", node.fo.peer, s.message()))
}

/// The peer did not take over after this node handed over: it takes its epoch back.
async fn serve_again(
    node: &Arc<Node>,
    role: &mut Role,
    epoch: u64,
    mut report: Report,
    why: &str,
) -> v1::RoleChangeReply {
    let reply = super::promote::promote_locked(node, super::promote::Ask::resume(), role).await;
    let outcome = if reply.outcome == v1::ChangeOutcome::Done as i32 {
        report.step(
            "serve",
            "done",
            format!("{why}: this node serves again at epoch {epoch}"),
        );
        v1::ChangeOutcome::Refused
    } else {
        report.step(
            "serve",
            "failed",
            format!(
                "{why}, and this node could not serve again: {}",
                reply.reason
            ),
        );
        v1::ChangeOutcome::Failed
    };
    v1::RoleChangeReply {
        reason: why.to_string(),
        what_to_do: "check the peer (concord status --node PEER) and switch over again".into(),
        epoch,
        primary: node.fo.address.clone(),
        ..report.reply(outcome)
    }
}
