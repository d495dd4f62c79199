//! Scaling schedules (`autoscalingPolicy.scalingSchedules`): named windows in which a
//! deployment keeps more replicas than its own `minReplicaCount`, for load that comes at known
//! times (a business day, a weekly batch).
//!
//! Each schedule starts at the times of a standard 5-field cron expression (minute, hour, day
//! of month, month, day of week; `0 8 * * Mon-Fri`), read in its IANA time zone (so 8am stays
//! 8am across daylight-saving changes), and stays active for its `duration` (5 minutes to 7
//! days, whole seconds). While schedules are active the deployment's minimum is the highest
//! `minReplicaCount` among them and its own ("max wins"); a disabled schedule counts for
//! nothing. Parsing and time-zone rules are croner's and chrono-tz's, not hearth's.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use hearth_api::duration::ProtoDuration;
use hearth_api::resources::ScalingSchedule;
use serde::{Deserialize, Serialize};

use crate::error::{ControlError, Result};

/// The most schedules one deployment may have, as the spec says.
pub const MAX_SCHEDULES: usize = 5;
const MIN_DURATION: u64 = 300;
const MAX_DURATION: u64 = 7 * 24 * 3600;

/// A schedule as stored: validated, in hearth's own shape.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Schedule {
    pub schedule: String,
    pub duration_seconds: u64,
    pub timezone: String,
    pub min_replica_count: i32,
    pub description: Option<String>,
    pub disabled: bool,
}

fn parser() -> CronParser {
    CronParser::builder().seconds(Seconds::Disallowed).year(Year::Disallowed).build()
}

impl Schedule {
    /// Checks one schedule of a request; `max_replicas` is the deployment's
    /// `maxReplicaCount`. Every error names the field at fault.
    pub fn from_wire(name: &str, wire: &ScalingSchedule, max_replicas: i32) -> Result<Schedule> {
        let field = |f: &str| format!("autoscalingPolicy.scalingSchedules.{name}.{f}");
        let bad = |f: &str, why: String| ControlError::InvalidArgument(format!("{}: {why}", field(f)));
        if name.is_empty() || name.len() > 63 {
            return Err(ControlError::InvalidArgument(format!(
                "autoscalingPolicy.scalingSchedules: a schedule's name is 1 to 63 characters, got {name:?}"
            )));
        }
        let schedule = wire.schedule.clone().unwrap_or_default();
        if schedule.split_whitespace().count() != 5 {
            return Err(bad(
                "schedule",
                format!("{schedule:?} is not a 5-field cron expression (minute hour day-of-month month day-of-week)"),
            ));
        }
        parser()
            .parse(&schedule)
            .map_err(|e| bad("schedule", format!("{schedule:?} is not a valid cron expression: {e}")))?;
        let duration =
            wire.duration.map(|d| d.0).ok_or_else(|| bad("duration", "is required, e.g. \"36000s\"".into()))?;
        if duration.subsec_nanos() != 0 || !(MIN_DURATION..=MAX_DURATION).contains(&duration.as_secs()) {
            return Err(bad(
                "duration",
                format!(
                    "{}s is not a whole number of seconds between {MIN_DURATION}s and {MAX_DURATION}s",
                    duration.as_secs_f64()
                ),
            ));
        }
        let timezone = wire.timezone.clone().unwrap_or_default();
        if chrono_tz::Tz::from_str(&timezone).is_err() {
            return Err(bad(
                "timezone",
                format!("{timezone:?} is not an IANA time zone such as \"Europe/London\" or \"UTC\""),
            ));
        }
        let min = wire.min_replica_count.unwrap_or(0);
        if min < 0 || min > max_replicas {
            return Err(bad("minReplicaCount", format!("{min} is not between 0 and maxReplicaCount ({max_replicas})")));
        }
        Ok(Schedule {
            schedule,
            duration_seconds: duration.as_secs(),
            timezone,
            min_replica_count: min,
            description: wire.description.clone().filter(|d| !d.is_empty()),
            disabled: wire.disabled.unwrap_or(false),
        })
    }

    pub fn to_wire(&self) -> ScalingSchedule {
        ScalingSchedule {
            min_replica_count: Some(self.min_replica_count),
            schedule: Some(self.schedule.clone()),
            duration: Some(ProtoDuration(Duration::from_secs(self.duration_seconds))),
            timezone: Some(self.timezone.clone()),
            description: self.description.clone(),
            disabled: Some(self.disabled),
        }
    }

    /// Whether the schedule is active at `now`: its last start at or before `now` (in its
    /// time zone) was less than its duration ago. A stored schedule that no longer parses
    /// (it was validated when written) is inactive.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        if self.disabled {
            return false;
        }
        let (Ok(cron), Ok(tz)) = (parser().parse(&self.schedule), chrono_tz::Tz::from_str(&self.timezone)) else {
            return false;
        };
        last_start(&cron, now.with_timezone(&tz))
            .is_some_and(|start| now.signed_duration_since(start).num_seconds() < self.duration_seconds as i64)
    }
}

fn last_start(cron: &Cron, now: DateTime<chrono_tz::Tz>) -> Option<DateTime<Utc>> {
    cron.find_previous_occurrence(&now, true).ok().map(|t| t.with_timezone(&Utc))
}

/// The minimum replica count in force at `now`: the highest of `base` and every active
/// schedule's.
pub fn effective_min(base: i32, schedules: &BTreeMap<String, Schedule>, now: DateTime<Utc>) -> i32 {
    schedules.values().filter(|s| s.is_active(now)).map(|s| s.min_replica_count).fold(base, i32::max)
}

/// Checks a request's schedules and returns them as stored.
pub fn from_wire(wire: &BTreeMap<String, ScalingSchedule>, max_replicas: i32) -> Result<BTreeMap<String, Schedule>> {
    if wire.len() > MAX_SCHEDULES {
        return Err(ControlError::InvalidArgument(format!(
            "autoscalingPolicy.scalingSchedules has {} schedules; a deployment may have at most {MAX_SCHEDULES}",
            wire.len()
        )));
    }
    wire.iter().map(|(name, s)| Ok((name.clone(), Schedule::from_wire(name, s, max_replicas)?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn wire(schedule: &str, duration: u64, tz: &str, min: i32) -> ScalingSchedule {
        ScalingSchedule {
            min_replica_count: Some(min),
            schedule: Some(schedule.into()),
            duration: Some(ProtoDuration(Duration::from_secs(duration))),
            timezone: Some(tz.into()),
            description: None,
            disabled: None,
        }
    }

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).single().expect("a valid time")
    }

    #[test]
    fn a_business_day_schedule_is_active_from_its_start_for_its_duration() {
        // 8am to 6pm New York time on weekdays; 2026-12-07 is a Monday, EST is UTC-5.
        let s = Schedule::from_wire("weekdays", &wire("0 8 * * Mon-Fri", 36_000, "America/New_York", 3), 4).unwrap();
        assert!(!s.is_active(at(2026, 12, 7, 12, 59)), "7:59 local");
        assert!(s.is_active(at(2026, 12, 7, 13, 0)), "8:00 local: starts");
        assert!(s.is_active(at(2026, 12, 7, 22, 59)), "17:59 local");
        assert!(!s.is_active(at(2026, 12, 7, 23, 0)), "18:00 local: ended");
        assert!(!s.is_active(at(2026, 12, 5, 15, 0)), "a Saturday");
        // In July New York is UTC-4: the window follows the wall clock.
        assert!(s.is_active(at(2026, 7, 6, 12, 0)) && !s.is_active(at(2026, 7, 6, 11, 59)));
    }

    #[test]
    fn overlapping_schedules_take_the_highest_minimum_and_disabled_ones_count_for_nothing() {
        let mut all = from_wire(
            &[
                ("day".to_string(), wire("0 8 * * *", 36_000, "UTC", 2)),
                ("peak".to_string(), wire("0 12 * * *", 3_600, "UTC", 4)),
            ]
            .into(),
            4,
        )
        .unwrap();
        assert_eq!(effective_min(1, &all, at(2026, 12, 7, 7, 0)), 1, "none active: the deployment's own");
        assert_eq!(effective_min(1, &all, at(2026, 12, 7, 9, 0)), 2);
        assert_eq!(effective_min(1, &all, at(2026, 12, 7, 12, 30)), 4, "both: max wins");
        assert_eq!(effective_min(3, &all, at(2026, 12, 7, 9, 0)), 3, "the base wins when higher");
        assert_eq!(effective_min(1, &all, at(2026, 12, 7, 13, 0)), 2, "peak ended");
        all.get_mut("peak").unwrap().disabled = true;
        assert_eq!(effective_min(1, &all, at(2026, 12, 7, 12, 30)), 2);
    }

    #[test]
    fn a_window_that_spans_midnight_and_a_month_start_schedule() {
        let night = Schedule::from_wire("night", &wire("0 22 * * *", 6 * 3600, "UTC", 1), 1).unwrap();
        assert!(night.is_active(at(2026, 12, 8, 3, 59)) && !night.is_active(at(2026, 12, 8, 4, 0)));
        let monthly = Schedule::from_wire("m", &wire("0 0 1 * *", 86_400, "UTC", 1), 1).unwrap();
        assert!(monthly.is_active(at(2027, 1, 1, 23, 0)) && !monthly.is_active(at(2027, 1, 2, 0, 0)));
    }

    #[test]
    fn bad_schedules_are_refused_naming_the_field() {
        let err = |s: ScalingSchedule, max: i32| Schedule::from_wire("x", &s, max).unwrap_err().to_string();
        assert!(err(wire("0 8 * *", 3600, "UTC", 1), 1).contains("scalingSchedules.x.schedule"));
        assert!(err(wire("0 25 * * *", 3600, "UTC", 1), 1).contains("not a valid cron expression"));
        assert!(err(wire("0 0 8 * * *", 3600, "UTC", 1), 1).contains("5-field"));
        assert!(err(wire("0 8 * * *", 299, "UTC", 1), 1).contains("scalingSchedules.x.duration"));
        assert!(err(wire("0 8 * * *", 604_801, "UTC", 1), 1).contains("duration"));
        assert!(err(wire("0 8 * * *", 3600, "Mars/Olympus", 1), 1).contains("scalingSchedules.x.timezone"));
        assert!(err(wire("0 8 * * *", 3600, "UTC", 5), 4).contains("scalingSchedules.x.minReplicaCount"));
        let mut half = wire("0 8 * * *", 3600, "UTC", 1);
        half.duration = Some(ProtoDuration(Duration::from_millis(3_600_500)));
        assert!(err(half, 1).contains("whole number of seconds"));
        let six: BTreeMap<String, ScalingSchedule> =
            (0..6).map(|i| (format!("s{i}"), wire("0 8 * * *", 3600, "UTC", 1))).collect();
        assert!(from_wire(&six, 1).unwrap_err().to_string().contains("at most 5"));
    }
}
