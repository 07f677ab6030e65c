//! The primary's right to decide: a lease from the quorum store, or confirmations from every
//! standby, less a safety margin, and a healthy node.
//!
//! Every grant is counted from the instant *before* its request left this node, on the
//! monotonic clock: the quorum store counts a lease from when it received the request, and a
//! standby counts its promise from when it answered a heartbeat, so this node's view of either
//! always ends first. The margin covers the rate difference of the two clocks and the time a
//! decision takes between its check and its record.
//!
//! Once the epoch is lost (the store names another holder or a higher epoch) the authority
//! never comes back: the node must become a standby of the new primary.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why this node may not decide now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoAuthority {
    /// A role change stopped new work.
    Stopped(String),
    /// Another node won a later epoch.
    EpochLost(String),
    /// The node has been sick for `sicktime`.
    Sick(String),
    /// Neither the lease nor the confirmations are valid.
    Expired(String),
}

impl std::fmt::Display for NoAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoAuthority::Stopped(why)
            | NoAuthority::EpochLost(why)
            | NoAuthority::Sick(why)
            | NoAuthority::Expired(why) => f.write_str(why),
        }
    }
}

/// The primary's authority at one epoch; shared by the commit gate, the lease keeper, the
/// heartbeats and status.
pub struct Authority {
    epoch: u64,
    anchor: Instant,
    margin_ms: u64,
    /// Milliseconds since `anchor` until which the lease runs (0: none yet).
    lease_until_ms: AtomicU64,
    /// Milliseconds since `anchor` until which every standby promised not to promote.
    confirmed_until_ms: AtomicU64,
    stopped: Mutex<Option<String>>,
    lost: Mutex<Option<String>>,
    sick: Mutex<Option<String>>,
    quorum_reachable: AtomicBool,
}

impl Authority {
    /// No authority yet at `epoch`, with a safety margin of `margin_ms`.
    pub fn new(epoch: u64, margin_ms: u64) -> Authority {
        Authority {
            epoch,
            anchor: Instant::now(),
            margin_ms,
            lease_until_ms: AtomicU64::new(0),
            confirmed_until_ms: AtomicU64::new(0),
            stopped: Mutex::new(None),
            lost: Mutex::new(None),
            sick: Mutex::new(None),
            quorum_reachable: AtomicBool::new(true),
        }
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.anchor).as_millis()).unwrap_or(u64::MAX)
    }

    fn now_ms(&self) -> u64 {
        self.ms(Instant::now())
    }

    /// A lease of `ttl_ms` was granted for a request sent at `sent`.
    pub fn lease_granted(&self, sent: Instant, ttl_ms: u64) {
        let until = self.ms(sent).saturating_add(ttl_ms);
        self.lease_until_ms.fetch_max(until, Ordering::AcqRel);
        self.quorum_reachable.store(true, Ordering::Release);
    }

    /// The quorum store did not answer.
    pub fn quorum_unreachable(&self) {
        self.quorum_reachable.store(false, Ordering::Release);
    }

    /// Whether the last call reached the quorum store.
    pub fn quorum_reachable(&self) -> bool {
        self.quorum_reachable.load(Ordering::Acquire)
    }

    /// Every standby promised not to promote until `until` (counted from this node's sending).
    pub fn confirmed_until(&self, until: Instant) {
        self.confirmed_until_ms
            .fetch_max(self.ms(until), Ordering::AcqRel);
    }

    /// Stops new decisions for good (a role change); `why` is what callers hear.
    pub fn stop(&self, why: impl Into<String>) {
        if let Ok(mut stopped) = self.stopped.lock() {
            stopped.get_or_insert(why.into());
        }
    }

    /// The epoch was lost: `why` names the winner.
    pub fn lose(&self, why: impl Into<String>) {
        if let Ok(mut lost) = self.lost.lock() {
            lost.get_or_insert(why.into());
        }
    }

    /// Whether the epoch was lost, and why.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().ok().and_then(|l| l.clone())
    }

    /// The node has been sick for `sicktime` (`Some(reasons)`) or is not (`None`).
    pub fn set_sick(&self, reasons: Option<String>) {
        if let Ok(mut sick) = self.sick.lock() {
            *sick = reasons;
        }
    }

    /// Whether the node is sick, and why.
    pub fn sick(&self) -> Option<String> {
        self.sick.lock().ok().and_then(|s| s.clone())
    }

    /// How much longer the lease runs (after the margin).
    pub fn lease_remaining(&self) -> Duration {
        let until = self
            .lease_until_ms
            .load(Ordering::Acquire)
            .saturating_sub(self.margin_ms);
        Duration::from_millis(until.saturating_sub(self.now_ms()))
    }

    /// How much longer the confirmations run (after the margin).
    pub fn confirmed_remaining(&self) -> Duration {
        let until = self
            .confirmed_until_ms
            .load(Ordering::Acquire)
            .saturating_sub(self.margin_ms);
        Duration::from_millis(until.saturating_sub(self.now_ms()))
    }

    /// Whether this node may decide now, and why not.
    pub fn check(&self) -> Result<(), NoAuthority> {
        if let Some(why) = self.stopped.lock().ok().and_then(|s| s.clone()) {
            return Err(NoAuthority::Stopped(why));
        }
        if let Some(why) = self.lost() {
            return Err(NoAuthority::EpochLost(why));
        }
        if let Some(why) = self.sick() {
            return Err(NoAuthority::Sick(format!(
                "this node is sick ({why}); it stopped committing"
            )));
        }
        if self.lease_remaining().is_zero() && self.confirmed_remaining().is_zero() {
            return Err(NoAuthority::Expired(format!(
                "the lease at epoch {} ran out (less the {} ms margin) and no standby confirms \
                 this primary: it stopped committing until it renews its lease",
                self.epoch, self.margin_ms
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_less_margin_then_confirmations() {
        let a = Authority::new(3, 100);
        assert!(matches!(a.check(), Err(NoAuthority::Expired(_))));
        a.lease_granted(Instant::now(), 1_000);
        assert!(a.check().is_ok());
        assert!(a.lease_remaining() <= Duration::from_millis(900));
        // A lease shorter than the margin gives nothing.
        let b = Authority::new(3, 100);
        b.lease_granted(Instant::now(), 50);
        assert!(b.check().is_err());
        b.confirmed_until(Instant::now() + Duration::from_millis(500));
        assert!(b.check().is_ok());
    }

    #[test]
    fn stopped_lost_and_sick_win_over_a_valid_lease() {
        let a = Authority::new(1, 10);
        a.lease_granted(Instant::now(), 10_000);
        a.set_sick(Some("journal: sync took 1200 ms".into()));
        assert!(matches!(a.check(), Err(NoAuthority::Sick(_))));
        a.set_sick(None);
        assert!(a.check().is_ok());
        a.lose("node b holds epoch 2");
        assert!(matches!(a.check(), Err(NoAuthority::EpochLost(_))));
        a.stop("demoting");
        assert!(matches!(a.check(), Err(NoAuthority::Stopped(_))));
    }

    #[test]
    fn a_grant_counts_from_its_sending() {
        let a = Authority::new(1, 0);
        let sent = Instant::now()
            .checked_sub(Duration::from_millis(400))
            .unwrap_or_else(Instant::now);
        a.lease_granted(sent, 500);
        assert!(a.lease_remaining() <= Duration::from_millis(100));
    }
}
