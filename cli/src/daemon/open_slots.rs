//! The open transactions of each client, counted as they begin and end, so that `Begin` keeps
//! a client to `txns_per_client_max` without walking every transaction the daemon holds (it
//! holds each finished one for `FINISHED_KEEP_MS`: at a thousand commits a second, hundreds of
//! thousands).
//!
//! [`OpenSlots::take`] counts a new transaction of a peer and returns its [`Slot`]; the slot
//! gives its place back when dropped: when the transaction finishes, or when the daemon forgets
//! it. The count is an upper bound of the exact one: a transaction the coordinator's reaper
//! rolled back keeps its slot until the daemon notices or forgets it, so a count at the limit
//! is checked again exactly before a `Begin` is refused.
//!
//! The forgetting of finished transactions walks them all; [`PrunePacer`] lets it run at most
//! once per [`PRUNE_INTERVAL_MS`] instead of at every `Begin`.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often, at most, the daemon walks its transactions to forget old ones (milliseconds).
pub const PRUNE_INTERVAL_MS: u64 = 1_000;

/// The open transactions of each client (`K`: how the daemon tells clients apart).
pub struct OpenSlots<K> {
    peers: Mutex<HashMap<K, Arc<AtomicUsize>>>,
}

impl<K> Default for OpenSlots<K> {
    fn default() -> Self {
        OpenSlots {
            peers: Mutex::new(HashMap::new()),
        }
    }
}

/// One open transaction's place in its peer's count, given back when dropped.
pub struct Slot {
    count: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<K: Hash + Eq + Clone> OpenSlots<K> {
    /// Counts a new open transaction of `peer`; returns its slot and the count before it.
    pub fn take(&self, peer: &K) -> (Slot, usize) {
        let count = {
            let mut peers = self
                .peers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(peers.entry(peer.clone()).or_default())
        };
        let before = count.fetch_add(1, Ordering::SeqCst);
        (Slot { count }, before)
    }

    /// Forgets the peers without an open transaction.
    pub fn forget_idle(&self) {
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        peers.retain(|_, count| count.load(Ordering::SeqCst) > 0 || Arc::strong_count(count) > 1);
    }
}

/// Says when the next walk over the transactions is due.
pub struct PrunePacer {
    last: Mutex<Instant>,
}

impl PrunePacer {
    /// A pacer whose first walk is due after one interval.
    pub fn new() -> PrunePacer {
        PrunePacer {
            last: Mutex::new(Instant::now()),
        }
    }

    /// Whether a walk is due now (and, if so, the next one an interval from now).
    pub fn due(&self) -> bool {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.elapsed() < Duration::from_millis(PRUNE_INTERVAL_MS) {
            return false;
        }
        *last = Instant::now();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_until_dropped() {
        let slots = OpenSlots::default();
        let peer = "127.0.0.1";
        let (a, before) = slots.take(&peer);
        assert_eq!(before, 0);
        let (b, before) = slots.take(&peer);
        assert_eq!(before, 1);
        let (_other, before) = slots.take(&"other");
        assert_eq!(before, 0, "each peer has its own count");
        drop(a);
        let (_c, before) = slots.take(&peer);
        assert_eq!(before, 1);
        drop(b);
        slots.forget_idle();
        assert_eq!(slots.take(&peer).1, 1, "a peer with an open slot is kept");
    }

    #[test]
    fn the_pacer_lets_one_walk_through_per_interval() {
        let pacer = PrunePacer::new();
        assert!(!pacer.due());
    }
}
