//! Load-based autoscaling: how many replicas a deployment should run, from the load the
//! gateway observes, within `minReplicaCount..=maxReplicaCount`.
//!
//! The algorithm, after Knative's KPA and Ray Serve's autoscaler, with the Gateway API's
//! knobs:
//!
//! 1. **Load** is the requests in flight on the deployment's replicas plus the requests
//!    waiting for one (a deployment woken from zero), sampled at every reconciler pass.
//! 2. **Utilization** is load over capacity, where one replica's capacity is the sequences it
//!    decodes together ([`REPLICA_BATCH_SIZE`](hearth_control::deployments::REPLICA_BATCH_SIZE)). `autoscalingPolicy.loadTargets.default` (0.8
//!    unless set) is the utilization to keep, so the recommendation is
//!    `ceil(load / (target × REPLICA_BATCH_SIZE))`, clamped to `[min, max]`.
//! 3. A deployment used within its `scaleToZeroWindow` keeps at least one replica; one with
//!    no request for that long may fall to zero (when `minReplicaCount` is 0).
//! 4. A change must **hold for its window** before it is made: the recommendation must stay
//!    above the current count for `scaleUpWindow` to scale up, and below it for
//!    `scaleDownWindow` to scale down. The new count is the level that held throughout the
//!    window: the lowest recommendation seen while scaling up, the highest while scaling down.
//!    A spike shorter than the window changes nothing; a lull does not drop replicas that the
//!    next burst needs.
//! 5. Two moves act at once, without a window: waking from zero (a request is waiting, and
//!    holding it longer helps nobody) and falling to zero (the scale-to-zero window already
//!    held). A count outside `[min, max]` (the bounds were just changed) is clamped at once.
//!
//! The minimum is `minReplicaCount` raised by the scaling schedules active at the time
//! (`hearth_control::schedules`): when one starts the count is raised at once (step 5's clamp),
//! and when it ends the count falls back through the scale-down window like any other lull.
//!
//! `:scale` sets the count directly; the autoscaler moves on from there as load dictates.
//! The windows' state lives in the gateway's memory: a restarted gateway starts them afresh,
//! which can only delay a change, never make one early.

use std::time::{Duration, Instant};

use hearth_control::deployments::REPLICA_BATCH_SIZE;
use hearth_control::observe::DeploymentSpec;

/// A deployment's scaling knobs, read from its spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub min: i32,
    pub max: i32,
    /// Utilization to keep, as a fraction of a replica's batch capacity.
    pub target: f64,
    pub scale_up_window: Duration,
    pub scale_down_window: Duration,
    pub scale_to_zero_window: Duration,
}

impl Policy {
    /// A deployment's policy at calendar time `wall`, from its spec (whose defaults were
    /// filled in on create): its minimum is raised by the scaling schedules active then.
    pub fn of(spec: &DeploymentSpec, wall: chrono::DateTime<chrono::Utc>) -> Policy {
        Policy {
            min: spec.effective_min_replica_count(wall),
            max: spec.max_replica_count,
            target: spec.autoscaling.load_target,
            scale_up_window: spec.autoscaling.scale_up_window(),
            scale_down_window: spec.autoscaling.scale_down_window(),
            scale_to_zero_window: spec.autoscaling.scale_to_zero_window(),
        }
    }
}

/// What the gateway saw of a deployment at one pass.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    /// Requests in flight plus requests waiting for a replica.
    pub load: usize,
    /// When the last request for it arrived, if one did since the gateway started.
    pub last_request: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Direction {
    Up,
    Down,
}

/// A change under way: which way, since when the recommendation has pointed there, and
/// the level that has held throughout.
#[derive(Debug, Clone, Copy)]
struct Pending {
    direction: Direction,
    since: Instant,
    level: i32,
}

/// One deployment's autoscaler: the pending change, if any.
#[derive(Debug, Default)]
pub struct Scaler {
    pending: Option<Pending>,
}

/// The replica count the load alone asks for (steps 2 and 3), from `current`. Recent use
/// keeps a running deployment warm; only load (a request waiting) wakes one at zero, so a
/// deployment scaled to zero on purpose stays there.
pub fn recommend(p: &Policy, o: &Observation, current: i32, now: Instant) -> i32 {
    let per_replica = (p.target * REPLICA_BATCH_SIZE as f64).max(f64::MIN_POSITIVE);
    let by_load = (o.load as f64 / per_replica).ceil().min(i32::MAX as f64) as i32;
    let recently_used = o.last_request.is_some_and(|t| now.saturating_duration_since(t) < p.scale_to_zero_window);
    let floor = if o.load > 0 || (recently_used && current > 0) { 1 } else { 0 };
    by_load.max(floor).clamp(p.min.max(0), p.max.max(0))
}

impl Scaler {
    /// The count to run now, given the current one.
    pub fn decide(&mut self, p: &Policy, o: &Observation, current: i32, now: Instant) -> i32 {
        let (lo, hi) = (p.min.max(0), p.max.max(0));
        if current < lo || current > hi {
            self.pending = None;
            return current.clamp(lo, hi);
        }
        let rec = recommend(p, o, current, now);
        if rec == current {
            self.pending = None;
            return current;
        }
        if current == 0 || rec == 0 {
            // Waking, or the scale-to-zero window has already held.
            self.pending = None;
            return rec;
        }
        let (direction, window) =
            if rec > current { (Direction::Up, p.scale_up_window) } else { (Direction::Down, p.scale_down_window) };
        let pending = match self.pending {
            Some(mut q) if q.direction == direction => {
                q.level = match direction {
                    Direction::Up => q.level.min(rec),
                    Direction::Down => q.level.max(rec),
                };
                q
            }
            _ => Pending { direction, since: now, level: rec },
        };
        if now.saturating_duration_since(pending.since) >= window {
            self.pending = None;
            pending.level
        } else {
            self.pending = Some(pending);
            current
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min: 0,
            max: 4,
            // One request per replica: 1/64 of a replica's batch.
            target: 1.0 / REPLICA_BATCH_SIZE as f64,
            scale_up_window: Duration::from_secs(30),
            scale_down_window: Duration::from_secs(600),
            scale_to_zero_window: Duration::from_secs(3600),
        }
    }

    fn seen(load: usize, last: Option<Instant>) -> Observation {
        Observation { load, last_request: last }
    }

    #[test]
    fn recommendation_follows_load_within_bounds() {
        let p = policy();
        let t = Instant::now();
        assert_eq!(recommend(&p, &seen(0, None), 1, t), 0);
        assert_eq!(recommend(&p, &seen(3, Some(t)), 1, t), 3);
        assert_eq!(recommend(&p, &seen(9, Some(t)), 1, t), 4, "capped at max");
        let later = t + Duration::from_secs(10);
        assert_eq!(recommend(&p, &seen(0, Some(t)), 1, later), 1, "recently used stays warm");
        assert_eq!(recommend(&p, &seen(0, Some(t)), 0, later), 0, "but is not woken without a request waiting");
        assert_eq!(recommend(&p, &seen(0, Some(t)), 1, t + Duration::from_secs(3600)), 0, "idle for the window");
        let default_target = Policy { target: 0.8, ..policy() };
        assert_eq!(recommend(&default_target, &seen(51, Some(t)), 1, t), 1, "51 of 64 is under 80%");
        assert_eq!(recommend(&default_target, &seen(52, Some(t)), 1, t), 2);
        assert_eq!(recommend(&Policy { min: 2, ..policy() }, &seen(0, None), 0, t), 2, "never below min");
    }

    #[test]
    fn scaling_up_waits_for_the_window_and_takes_the_level_that_held() {
        let p = policy();
        let mut s = Scaler::default();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert_eq!(s.decide(&p, &seen(4, Some(t0)), 1, at(0)), 1, "not before the window");
        assert_eq!(s.decide(&p, &seen(2, Some(t0)), 1, at(10)), 1);
        assert_eq!(s.decide(&p, &seen(4, Some(t0)), 1, at(29)), 1);
        assert_eq!(s.decide(&p, &seen(4, Some(t0)), 1, at(30)), 2, "2 is what held throughout");
    }

    #[test]
    fn a_spike_shorter_than_the_window_changes_nothing() {
        let p = policy();
        let mut s = Scaler::default();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert_eq!(s.decide(&p, &seen(4, Some(t0)), 1, at(0)), 1);
        assert_eq!(s.decide(&p, &seen(1, Some(t0)), 1, at(20)), 1, "the spike ended: the pending change is dropped");
        assert_eq!(s.decide(&p, &seen(4, Some(t0)), 1, at(25)), 1, "a new spike starts a new window");
        assert_eq!(s.decide(&p, &seen(4, Some(t0)), 1, at(54)), 1);
        assert_eq!(s.decide(&p, &seen(4, Some(t0)), 1, at(55)), 4);
    }

    #[test]
    fn scaling_down_waits_for_its_window_and_keeps_what_bursts_needed() {
        let p = policy();
        let mut s = Scaler::default();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert_eq!(s.decide(&p, &seen(1, Some(at(0))), 4, at(0)), 4);
        assert_eq!(s.decide(&p, &seen(3, Some(at(300))), 4, at(300)), 4, "a burst to 3 during the lull");
        assert_eq!(s.decide(&p, &seen(1, Some(at(600))), 4, at(600)), 3, "the highest level seen while going down");
    }

    #[test]
    fn waking_and_falling_to_zero_act_at_once_and_bounds_clamp() {
        let p = policy();
        let mut s = Scaler::default();
        let t0 = Instant::now();
        assert_eq!(s.decide(&p, &seen(1, Some(t0)), 0, t0), 1, "a waiting request wakes it now");
        let idle = t0 + Duration::from_secs(3600);
        assert_eq!(s.decide(&p, &seen(0, Some(t0)), 1, idle), 0, "idle for the scale-to-zero window");
        let narrowed = Policy { max: 2, ..policy() };
        assert_eq!(s.decide(&narrowed, &seen(4, Some(t0)), 4, t0), 2, "max lowered: clamped at once");
        let raised = Policy { min: 3, ..policy() };
        assert_eq!(s.decide(&raised, &seen(0, None), 1, t0), 3, "min raised: clamped at once");
        assert_eq!(s.decide(&p, &seen(0, Some(t0)), 0, t0), 0, "scaled to zero on purpose: stays there");
    }
}
