//! A standby's promise as the primary counts it. Each of the primary's beats has a seq; the
//! primary notes the instant it built each one (a ring of [`SENT_RING_LEN`]). A standby's beat
//! names the last seq it received (`echo_seq`) and promises not to promote for `confirm_ms`,
//! counted from no earlier than when it received that beat. The primary counts the same
//! `confirm_ms` from when it *sent* that beat, which came first: its view of the promise never
//! ends later than the standby's own. Pure: instants are passed in.

use std::time::{Duration, Instant};

/// How many sent beats are remembered (at 100 ms a beat, about 100 s: an echo older than that
/// confirms nothing).
pub const SENT_RING_LEN: usize = 1024;

/// The sent instants and the latest end of the promises received.
#[derive(Debug)]
pub struct Promises {
    sent: Vec<Option<(u64, Instant)>>,
    until: Option<Instant>,
}

impl Default for Promises {
    fn default() -> Self {
        Promises {
            sent: vec![None; SENT_RING_LEN],
            until: None,
        }
    }
}

impl Promises {
    fn slot(seq: u64) -> usize {
        // The remainder is below SENT_RING_LEN, so it fits.
        usize::try_from(seq % SENT_RING_LEN as u64).unwrap_or(0)
    }

    /// This node built beat `seq` at `at` (the first instant is kept).
    pub fn sent(&mut self, seq: u64, at: Instant) {
        let slot = &mut self.sent[Self::slot(seq)];
        if slot.is_none_or(|(s, _)| s != seq) {
            *slot = Some((seq, at));
        }
    }

    /// When beat `seq` was built, if it is still remembered.
    pub fn sent_at(&self, seq: u64) -> Option<Instant> {
        match self.sent[Self::slot(seq)] {
            Some((s, at)) if s == seq => Some(at),
            _ => None,
        }
    }

    /// The peer echoed `echo_seq` with a promise of `confirm_ms` (0: none). Promises made
    /// stand: the end only moves later.
    pub fn received(&mut self, echo_seq: u64, confirm_ms: u64) {
        if confirm_ms == 0 {
            return;
        }
        let Some(sent) = self.sent_at(echo_seq) else {
            return;
        };
        let Some(end) = sent.checked_add(Duration::from_millis(confirm_ms)) else {
            return;
        };
        self.until = Some(self.until.map_or(end, |u| u.max(end)));
    }

    /// Until when the peer promised not to promote, as this node counts it.
    pub fn until(&self) -> Option<Instant> {
        self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_from_the_send_of_the_echoed_beat() {
        let t0 = Instant::now();
        let mut p = Promises::default();
        p.sent(10, t0);
        p.sent(11, t0 + Duration::from_millis(100));
        p.received(10, 0);
        assert_eq!(p.until(), None, "no promise without confirm_ms");
        p.received(10, 1500);
        assert_eq!(p.until(), Some(t0 + Duration::from_millis(1500)));
        p.received(11, 1500);
        assert_eq!(p.until(), Some(t0 + Duration::from_millis(1600)));
        p.received(10, 1500);
        assert_eq!(
            p.until(),
            Some(t0 + Duration::from_millis(1600)),
            "never earlier"
        );
    }

    #[test]
    fn unknown_or_forgotten_seqs_confirm_nothing() {
        let t0 = Instant::now();
        let mut p = Promises::default();
        p.received(99, 1500);
        assert_eq!(p.until(), None);
        p.sent(5, t0);
        p.sent(5 + SENT_RING_LEN as u64, t0);
        p.received(5, 1500);
        assert_eq!(p.until(), None, "the slot now holds a later seq");
    }
}
