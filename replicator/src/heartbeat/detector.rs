//! The failure detector: a pure machine fed the instants at which beats arrived on each path
//! and what they said about health, asked at an instant what the peer is. No clock of its own,
//! no IO: the runtime passes `Instant`s in, the tests pass made-up ones.
//!
//! * **Dead**: no beat on any path for `deadtime`.
//! * **Sick**: every beat for `sicktime` reported `healthy = false` (one healthy beat resets it).
//! * **Alive**: otherwise, with the paths silent for `deadtime` listed in `paths_down` — one path
//!   down is a warning, never a failover.
//! * **Unknown**: no beat accepted yet. A peer never heard from is not called dead: a wrong key
//!   or address looks exactly like that, and the quorum store settles the rest.

use std::time::{Duration, Instant};

/// A heartbeat path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Path {
    /// UDP datagrams between the two `udp_listen` addresses.
    Udp,
    /// The `concord.v1.Heartbeat` gRPC stream.
    Grpc,
}

impl Path {
    /// Both paths.
    pub const ALL: [Path; 2] = [Path::Udp, Path::Grpc];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Path::Udp => "udp",
            Path::Grpc => "grpc",
        }
    }

    fn index(self) -> usize {
        match self {
            Path::Udp => 0,
            Path::Grpc => 1,
        }
    }
}

/// What the detector makes of the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// No beat accepted yet.
    Unknown,
    /// Beats arrive; `paths_down` lists the paths silent for `deadtime` (a warning).
    Alive {
        /// The silent paths, in [`Path::ALL`] order.
        paths_down: Vec<Path>,
    },
    /// The peer's beats have reported failed probes for `for_ms` (at least `sicktime`).
    Sick {
        /// How long continuously unhealthy (milliseconds).
        for_ms: u64,
    },
    /// No beat on any path for `silent_ms` (at least `deadtime`).
    Dead {
        /// How long silent (milliseconds).
        silent_ms: u64,
    },
}

/// The detector's state (see the module documentation).
#[derive(Debug)]
pub struct Detector {
    deadtime: Duration,
    sicktime: Duration,
    heard: [Option<Instant>; 2],
    unhealthy_since: Option<Instant>,
    reported_up: [Option<bool>; 2],
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Detector {
    /// A detector that has heard nothing.
    pub fn new(deadtime_ms: u64, sicktime_ms: u64) -> Detector {
        Detector {
            deadtime: Duration::from_millis(deadtime_ms),
            sicktime: Duration::from_millis(sicktime_ms),
            heard: [None; 2],
            unhealthy_since: None,
            reported_up: [None; 2],
        }
    }

    /// An authenticated beat arrived on `path` at `now`, reporting `healthy`.
    pub fn on_beat(&mut self, path: Path, now: Instant, healthy: bool) {
        let slot = &mut self.heard[path.index()];
        *slot = Some(slot.map_or(now, |t| t.max(now)));
        if healthy {
            self.unhealthy_since = None;
        } else if self.unhealthy_since.is_none() {
            self.unhealthy_since = Some(now);
        }
    }

    /// How long ago the last beat on `path` arrived (milliseconds), if one did.
    pub fn ms_ago(&self, path: Path, now: Instant) -> Option<u64> {
        self.heard[path.index()].map(|t| ms(now.saturating_duration_since(t)))
    }

    fn path_up(&self, path: Path, now: Instant) -> bool {
        self.heard[path.index()].is_some_and(|t| now.saturating_duration_since(t) < self.deadtime)
    }

    /// The peer's state at `now`.
    pub fn state(&self, now: Instant) -> PeerState {
        let Some(latest) = self.heard.iter().flatten().max() else {
            return PeerState::Unknown;
        };
        let silent = now.saturating_duration_since(*latest);
        if silent >= self.deadtime {
            return PeerState::Dead {
                silent_ms: ms(silent),
            };
        }
        if let Some(since) = self.unhealthy_since {
            let sick = now.saturating_duration_since(since);
            if sick >= self.sicktime {
                return PeerState::Sick { for_ms: ms(sick) };
            }
        }
        let paths_down = Path::ALL
            .into_iter()
            .filter(|p| !self.path_up(*p, now))
            .collect();
        PeerState::Alive { paths_down }
    }

    /// Each path whose up/down state changed since the last call, with its new state (`true`:
    /// up). Nothing before the first beat; after it, a path never heard on counts as down.
    pub fn path_changes(&mut self, now: Instant) -> Vec<(Path, bool)> {
        if self.heard.iter().all(Option::is_none) {
            return Vec::new();
        }
        let mut changes = Vec::new();
        for path in Path::ALL {
            let up = self.path_up(path, now);
            let reported = &mut self.reported_up[path.index()];
            if *reported != Some(up) {
                *reported = Some(up);
                changes.push((path, up));
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEAD_MS: u64 = 800;
    const SICK_MS: u64 = 2000;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn beat_both(d: &mut Detector, now: Instant, healthy: bool) {
        d.on_beat(Path::Udp, now, healthy);
        d.on_beat(Path::Grpc, now, healthy);
    }

    #[test]
    fn unknown_until_the_first_beat_then_alive() {
        let t0 = Instant::now();
        let mut d = Detector::new(DEAD_MS, SICK_MS);
        assert_eq!(d.state(at(t0, 10_000)), PeerState::Unknown);
        assert!(d.path_changes(at(t0, 10_000)).is_empty());
        beat_both(&mut d, at(t0, 10_000), true);
        assert_eq!(
            d.state(at(t0, 10_100)),
            PeerState::Alive { paths_down: vec![] }
        );
    }

    #[test]
    fn dead_after_deadtime_of_silence_on_every_path() {
        let t0 = Instant::now();
        let mut d = Detector::new(DEAD_MS, SICK_MS);
        beat_both(&mut d, t0, true);
        assert!(matches!(
            d.state(at(t0, DEAD_MS - 1)),
            PeerState::Alive { .. }
        ));
        assert_eq!(
            d.state(at(t0, DEAD_MS)),
            PeerState::Dead { silent_ms: DEAD_MS }
        );
        beat_both(&mut d, at(t0, DEAD_MS + 50), true);
        assert!(matches!(
            d.state(at(t0, DEAD_MS + 60)),
            PeerState::Alive { .. }
        ));
    }

    #[test]
    fn one_path_down_is_alive_with_a_warning_never_dead() {
        let t0 = Instant::now();
        let mut d = Detector::new(DEAD_MS, SICK_MS);
        beat_both(&mut d, t0, true);
        assert_eq!(
            d.path_changes(t0),
            vec![(Path::Udp, true), (Path::Grpc, true)]
        );
        for step in 1..=50 {
            d.on_beat(Path::Grpc, at(t0, step * 100), true);
        }
        let now = at(t0, 5000);
        assert_eq!(
            d.state(now),
            PeerState::Alive {
                paths_down: vec![Path::Udp]
            }
        );
        assert_eq!(d.path_changes(now), vec![(Path::Udp, false)]);
        assert!(d.path_changes(now).is_empty(), "a change is reported once");
        assert_eq!(d.ms_ago(Path::Udp, now), Some(5000));
        d.on_beat(Path::Udp, now, true);
        assert_eq!(d.path_changes(now), vec![(Path::Udp, true)]);
    }

    #[test]
    fn sick_after_sicktime_of_unhealthy_beats_and_a_healthy_one_resets() {
        let t0 = Instant::now();
        let mut d = Detector::new(DEAD_MS, SICK_MS);
        let mut now = t0;
        for step in 0..=20 {
            now = at(t0, step * 100);
            beat_both(&mut d, now, false);
        }
        assert_eq!(d.state(now), PeerState::Sick { for_ms: SICK_MS });
        beat_both(&mut d, at(t0, 2100), true);
        assert!(matches!(d.state(at(t0, 2100)), PeerState::Alive { .. }));
        beat_both(&mut d, at(t0, 2200), false);
        assert!(matches!(d.state(at(t0, 2300)), PeerState::Alive { .. }));
    }

    #[test]
    fn dead_wins_over_sick() {
        let t0 = Instant::now();
        let mut d = Detector::new(DEAD_MS, SICK_MS);
        beat_both(&mut d, t0, false);
        assert!(matches!(d.state(at(t0, 5000)), PeerState::Dead { .. }));
    }

    #[test]
    fn a_late_instant_never_moves_the_last_beat_back() {
        let t0 = Instant::now();
        let mut d = Detector::new(DEAD_MS, SICK_MS);
        d.on_beat(Path::Udp, at(t0, 500), true);
        d.on_beat(Path::Udp, t0, true);
        assert_eq!(d.ms_ago(Path::Udp, at(t0, 600)), Some(100));
    }
}
