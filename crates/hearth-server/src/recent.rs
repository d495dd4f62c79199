//! The last hour of inference as the gateway relayed it, per deployment and model (a base
//! model or a LoRA addon), in one-minute buckets: requests, tokens, time to first token and
//! time per output token. This is what the console plots; Prometheus gets the engine's own
//! histograms from each replica. Each gateway keeps what it relayed, in memory.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use hearth_api::resources::{InferenceMetrics, InferencePoint, InferenceSeries};

/// Buckets kept per series: one hour of minutes.
const KEPT_MINUTES: i64 = 60;
/// Latency samples kept per bucket for its percentiles (a uniform sample beyond that).
const SAMPLES: usize = 1024;
/// Series kept per gateway; the least recently used goes first beyond this.
const MAX_SERIES: usize = 4096;

/// Whose figures: an account's deployment serving one model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SeriesKey {
    pub account: String,
    pub deployment: String,
    pub model: String,
    pub adapter: bool,
}

/// One finished request.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Seconds from the request's arrival to its first streamed chunk (streams only).
    pub time_to_first_token: Option<f64>,
    /// Seconds per generated token after the first (or over the whole answer if not streamed).
    pub time_per_output_token: Option<f64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, Default)]
struct Bucket {
    minute: i64,
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    ttft: Samples,
    tpot: Samples,
}

/// A bounded uniform sample of latencies (reservoir sampling).
#[derive(Debug, Default)]
struct Samples {
    seen: u64,
    kept: Vec<f64>,
}

impl Samples {
    fn add(&mut self, value: f64) {
        self.seen += 1;
        if self.kept.len() < SAMPLES {
            self.kept.push(value);
        } else {
            let slot = rand::random::<u64>() % self.seen;
            if (slot as usize) < SAMPLES {
                self.kept[slot as usize] = value;
            }
        }
    }

    /// The nearest-rank percentile `p` (0 to 100), if there is any sample.
    fn percentile(&self, p: f64) -> Option<f64> {
        if self.kept.is_empty() {
            return None;
        }
        let mut sorted = self.kept.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        Some(sorted[rank.clamp(1, sorted.len()) - 1])
    }
}

#[derive(Default)]
pub struct RecentInference {
    series: Mutex<BTreeMap<SeriesKey, VecDeque<Bucket>>>,
}

fn minute_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64 / 60).unwrap_or(0)
}

impl RecentInference {
    pub fn record(&self, key: SeriesKey, sample: Sample, now: SystemTime) {
        let minute = minute_of(now);
        let Ok(mut series) = self.series.lock() else { return };
        if !series.contains_key(&key) && series.len() >= MAX_SERIES {
            // The series whose newest bucket is oldest makes room.
            let stalest = series.iter().min_by_key(|(_, b)| b.back().map_or(0, |b| b.minute)).map(|(k, _)| k.clone());
            if let Some(k) = stalest {
                series.remove(&k);
            }
        }
        let buckets = series.entry(key).or_default();
        if buckets.back().is_none_or(|b| b.minute != minute) {
            buckets.push_back(Bucket { minute, ..Bucket::default() });
        }
        while buckets.front().is_some_and(|b| b.minute <= minute - KEPT_MINUTES) {
            buckets.pop_front();
        }
        let Some(b) = buckets.back_mut() else { return };
        b.requests += 1;
        b.prompt_tokens += sample.prompt_tokens;
        b.completion_tokens += sample.completion_tokens;
        if let Some(t) = sample.time_to_first_token {
            b.ttft.add(t);
        }
        if let Some(t) = sample.time_per_output_token {
            b.tpot.add(t);
        }
    }

    /// The account's series over the last hour, minutes with requests only.
    pub fn of_account(&self, account: &str, now: SystemTime) -> InferenceMetrics {
        let oldest = minute_of(now) - KEPT_MINUTES;
        let series = self.series.lock().map(|s| {
            s.iter()
                .filter(|(k, _)| k.account == account)
                .map(|(k, buckets)| InferenceSeries {
                    deployment: k.deployment.clone(),
                    model: k.model.clone(),
                    adapter: k.adapter,
                    points: buckets.iter().filter(|b| b.minute > oldest).map(point).collect(),
                })
                .filter(|s| !s.points.is_empty())
                .collect()
        });
        InferenceMetrics { bucket_seconds: 60, series: series.unwrap_or_default() }
    }
}

fn point(b: &Bucket) -> InferencePoint {
    InferencePoint {
        time: DateTime::<Utc>::from_timestamp(b.minute * 60, 0).unwrap_or_default(),
        requests: b.requests,
        prompt_tokens: b.prompt_tokens,
        completion_tokens: b.completion_tokens,
        tokens_per_second: b.completion_tokens as f64 / 60.0,
        time_to_first_token_p50: b.ttft.percentile(50.0),
        time_to_first_token_p95: b.ttft.percentile(95.0),
        time_per_output_token_p50: b.tpot.percentile(50.0),
        time_per_output_token_p95: b.tpot.percentile(95.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(account: &str, model: &str) -> SeriesKey {
        SeriesKey {
            account: account.into(),
            deployment: "accounts/a/deployments/d".into(),
            model: model.into(),
            adapter: false,
        }
    }

    #[test]
    fn buckets_by_minute_with_percentiles_and_an_hour_kept() {
        let recent = RecentInference::default();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000 * 60);
        for i in 1..=100 {
            let s = Sample {
                time_to_first_token: Some(i as f64 / 100.0),
                time_per_output_token: Some(0.01),
                prompt_tokens: 10,
                completion_tokens: 6,
            };
            recent.record(key("a", "m"), s, t0);
        }
        recent.record(
            key("a", "m"),
            Sample { completion_tokens: 60, ..Sample::default() },
            t0 + Duration::from_secs(60),
        );
        recent.record(key("b", "m"), Sample::default(), t0);
        let out = recent.of_account("a", t0 + Duration::from_secs(60));
        assert_eq!(out.series.len(), 1, "only the account's own series");
        let points = &out.series[0].points;
        assert_eq!(points.len(), 2);
        assert_eq!((points[0].requests, points[0].prompt_tokens, points[0].completion_tokens), (100, 1000, 600));
        assert_eq!(points[0].time_to_first_token_p50, Some(0.5));
        assert_eq!(points[0].time_to_first_token_p95, Some(0.95));
        assert_eq!(points[0].tokens_per_second, 10.0);
        assert_eq!(points[1].time_to_first_token_p50, None);
        // An hour later the first minute is gone; two hours later everything is.
        assert_eq!(recent.of_account("a", t0 + Duration::from_secs(60 * 60)).series[0].points.len(), 1);
        assert!(recent.of_account("a", t0 + Duration::from_secs(2 * 60 * 60)).series.is_empty());
    }

    #[test]
    fn samples_stay_bounded() {
        let mut s = Samples::default();
        for i in 0..100_000 {
            s.add(i as f64);
        }
        assert_eq!(s.kept.len(), SAMPLES);
        let median = s.percentile(50.0).unwrap();
        assert!((30_000.0..70_000.0).contains(&median), "{median}");
    }
}
