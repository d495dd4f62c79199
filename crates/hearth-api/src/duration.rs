//! Protobuf JSON durations (`"30s"`, `"1.5s"`), the form autoscaling windows travel in.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A non-negative duration that (de)serializes as protobuf's JSON mapping: decimal seconds
/// with an `s` suffix and at most nine fractional digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtoDuration(pub Duration);

impl ProtoDuration {
    pub fn from_secs(secs: u64) -> ProtoDuration {
        ProtoDuration(Duration::from_secs(secs))
    }

    pub fn parse(s: &str) -> Result<ProtoDuration, String> {
        let bad = || format!("invalid duration {s:?}: expected seconds with an \"s\" suffix, e.g. \"30s\" or \"1.5s\"");
        let body = s.strip_suffix('s').ok_or_else(bad)?;
        let (whole, frac) = match body.split_once('.') {
            Some((w, f)) => (w, f),
            None => (body, ""),
        };
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || whole.len() > 12 {
            return Err(bad());
        }
        if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) || (body.contains('.') && frac.is_empty()) {
            return Err(bad());
        }
        let secs: u64 = whole.parse().map_err(|_| bad())?;
        let nanos: u32 = if frac.is_empty() {
            0
        } else {
            let padded = format!("{frac:0<9}");
            padded.parse().map_err(|_| bad())?
        };
        Ok(ProtoDuration(Duration::new(secs, nanos)))
    }
}

impl fmt::Display for ProtoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.subsec_nanos();
        if nanos == 0 {
            write!(f, "{}s", self.0.as_secs())
        } else {
            let frac = format!("{nanos:09}");
            write!(f, "{}.{}s", self.0.as_secs(), frac.trim_end_matches('0'))
        }
    }
}

impl schemars::JsonSchema for ProtoDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "pattern": "^[0-9]+(\\.[0-9]{1,9})?s$", "description": "protobuf JSON duration, e.g. \"30s\""})
    }
}

impl Serialize for ProtoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ProtoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ProtoDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_protobuf_json() {
        assert_eq!(ProtoDuration::parse("30s").unwrap().0, Duration::from_secs(30));
        assert_eq!(ProtoDuration::parse("1.5s").unwrap().0, Duration::from_millis(1500));
        assert_eq!(ProtoDuration::parse("1.5s").unwrap().to_string(), "1.5s");
        assert_eq!(ProtoDuration::from_secs(600).to_string(), "600s");
        for bad in ["", "s", "10", "10m", "-1s", "1.s", ".5s", "1.0000000001s", "1e3s", "99999999999999s"] {
            assert!(ProtoDuration::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
