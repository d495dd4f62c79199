//! `--wait`: polling a resource until it reaches a state, behind a spinner.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use indicatif::{ProgressBar, ProgressStyle};

/// The flags of every command that can wait.
#[derive(clap::Args, Debug, Clone)]
pub struct WaitArgs {
    /// Wait until the change has taken effect (the state named in the command's help).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits: seconds, or a number with s, m or h.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// What one look at the resource found.
pub enum Poll<T> {
    /// The wanted state: stop, with this.
    Done(T),
    /// Not yet; the text says where it stands (shown beside the spinner).
    Pending(String),
    /// It will not get there (FAILED): the text says why.
    Failed(String),
}

/// How often the resource is looked at.
const INTERVAL: Duration = Duration::from_millis(500);

/// Polls `check` until it is done, failed, or `timeout` passed. `what` names the resource
/// and the state waited for, for the spinner and the timeout message.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Poll<T>>>,
{
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner.set_message(format!("waiting for {what}"));
    let deadline = Instant::now() + timeout;
    let result = loop {
        match check().await {
            Ok(Poll::Done(v)) => break Ok(v),
            Ok(Poll::Failed(why)) => break Err(anyhow!(why)),
            Ok(Poll::Pending(status)) => {
                spinner.set_message(format!("waiting for {what}: {status}"));
                if Instant::now() >= deadline {
                    break Err(anyhow!("timed out after {} waiting for {what}; it is {status}", humanize(timeout)));
                }
            }
            Err(e) => break Err(e),
        }
        tokio::time::sleep(INTERVAL).await;
    };
    spinner.finish_and_clear();
    result
}

/// Parses `90`, `90s`, `5m`, `1h`, `1.5h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit {other:?} in {s:?}: use s, m or h")),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a duration like 30s, 10m or 1h"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{s:?} is not a duration like 30s, 10m or 1h"));
    }
    Ok(Duration::from_secs_f64(n * scale))
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[tokio::test]
    async fn waiting_ends_done_failed_or_timed_out() {
        let mut n = 0;
        let v = until("x", Duration::from_secs(5), || {
            n += 1;
            let k = n;
            async move { Ok(if k < 2 { Poll::Pending("CREATING".into()) } else { Poll::Done(k) }) }
        })
        .await
        .unwrap();
        assert_eq!(v, 2);
        let e = until::<(), _, _>("x", Duration::from_secs(5), || async { Ok(Poll::Failed("it broke".into())) })
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "it broke");
        let e = until::<(), _, _>("deployment d to be READY", Duration::ZERO, || async {
            Ok(Poll::Pending("CREATING".into()))
        })
        .await
        .unwrap_err();
        assert!(e.to_string().contains("timed out") && e.to_string().contains("CREATING"), "{e}");
    }
}
