//! Prometheus metrics of the HTTP server: requests by route, method and status, and their
//! latency as a histogram. Routes are the matched patterns, never raw paths, so ids in
//! paths cannot grow the label set without bound.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
struct Series {
    count: u64,
    sum: f64,
    buckets: [u64; BUCKETS.len()],
}

#[derive(Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<(String, String, u16), Series>>,
    /// The last hour of inference relayed, for the console (`recent.rs`).
    pub recent: Arc<crate::recent::RecentInference>,
}

impl Metrics {
    pub fn observe(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let Ok(mut series) = self.series.lock() else { return };
        let s = series.entry((route.to_string(), method.to_string(), status)).or_default();
        s.count += 1;
        s.sum += seconds;
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le {
                s.buckets[i] += 1;
            }
        }
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(series) = self.series.lock() else { return out };
        out.push_str("# HELP hearth_http_requests_total HTTP requests served, by route, method and status.\n");
        out.push_str("# TYPE hearth_http_requests_total counter\n");
        for ((route, method, status), s) in series.iter() {
            let _ = writeln!(
                out,
                "hearth_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {}",
                s.count
            );
        }
        out.push_str("# HELP hearth_http_request_duration_seconds Time to produce the response headers.\n");
        out.push_str("# TYPE hearth_http_request_duration_seconds histogram\n");
        for ((route, method, status), s) in series.iter() {
            let labels = format!("route=\"{route}\",method=\"{method}\",status=\"{status}\"");
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "hearth_http_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {}",
                    s.buckets[i]
                );
            }
            let _ = writeln!(out, "hearth_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", s.count);
            let _ = writeln!(out, "hearth_http_request_duration_seconds_sum{{{labels}}} {}", s.sum);
            let _ = writeln!(out, "hearth_http_request_duration_seconds_count{{{labels}}} {}", s.count);
        }
        out
    }
}

/// Speculative decoding by deployment, summed over the replicas it runs now (so a replaced
/// replica's counts leave the sums, as any counter restarts with its process): tokens
/// drafted, tokens accepted, and their ratio.
pub fn render_speculation(deployments: &[(String, u64, u64)]) -> String {
    let mut out = String::new();
    if deployments.is_empty() {
        return out;
    }
    let families: [(&str, &str, &str); 3] = [
        (
            "hearth_deployment_spec_drafted_tokens_total",
            "counter",
            "Tokens speculation proposed on the deployment's replicas.",
        ),
        (
            "hearth_deployment_spec_accepted_tokens_total",
            "counter",
            "Proposed tokens the replicas' sampling agreed with.",
        ),
        ("hearth_deployment_spec_acceptance_rate", "gauge", "Accepted over drafted tokens (0 before any draft)."),
    ];
    for (i, (name, kind, help)) in families.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (deployment, drafted, accepted) in deployments {
            let value = match i {
                0 => *drafted as f64,
                1 => *accepted as f64,
                _ if *drafted == 0 => 0.0,
                _ => *accepted as f64 / *drafted as f64,
            };
            let _ = writeln!(out, "{name}{{deployment=\"{deployment}\"}} {value}");
        }
    }
    out
}

/// Middleware that records every request.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().as_str().to_string();
    let response = next.run(req).await;
    metrics.observe(&route, &method, response.status().as_u16(), start.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.observe("/health", "GET", 200, 0.002);
        m.observe("/health", "GET", 200, 0.2);
        let text = m.render();
        assert!(
            text.contains("hearth_http_requests_total{route=\"/health\",method=\"GET\",status=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains("le=\"0.0025\"} 1"), "{text}");
        assert!(text.contains("le=\"0.25\"} 2"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 2"), "{text}");
    }
}
