//! PATCH semantics (AIP-134): the fields present in the body, or those `updateMask` names,
//! replace the stored ones; output-only fields are ignored; everything else is checked.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{ControlError, Result};

/// Which fields of a resource a PATCH may touch.
pub(crate) struct Patchable {
    pub resource: &'static str,
    /// Fields the server sets; present in a PATCH body they are ignored, as AIP-203 asks.
    pub output_only: &'static [&'static str],
    /// Fields a PATCH may change.
    pub mutable: &'static [&'static str],
}

/// `displayName` from `display_name`; camelCase passes through.
pub(crate) fn camel(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    let mut upper = false;
    for c in segment.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A PATCH request, parsed once: the body as the resource's wire type (so unknown fields and
/// bad values are refused here, before anything is read from the store), and the fields it
/// changes: `updateMask`'s paths, or the body's own fields.
#[derive(Debug, Clone)]
pub(crate) struct Patch<T> {
    /// The body, parsed.
    pub value: T,
    /// The same body as JSON, after parsing: what `apply` copies fields from.
    parsed: Value,
    /// The field paths to change, checked against the resource's rules.
    paths: Vec<String>,
    resource: &'static str,
}

impl<T: Serialize + DeserializeOwned> Patch<T> {
    pub(crate) fn parse(body: &Value, update_mask: Option<&str>, rules: &Patchable) -> Result<Patch<T>> {
        let patch_obj = body.as_object().ok_or_else(|| {
            ControlError::InvalidArgument(format!("the body of a {} update must be a JSON object", rules.resource))
        })?;
        let value: T = serde_json::from_value(body.clone())
            .map_err(|e| ControlError::InvalidArgument(format!("invalid {}: {e}", rules.resource)))?;
        let parsed = serde_json::to_value(&value).map_err(ControlError::internal)?;
        let requested: Vec<String> = match update_mask.map(str::trim).filter(|m| !m.is_empty()) {
            Some("*") => rules.mutable.iter().map(|s| s.to_string()).collect(),
            Some(mask) => {
                mask.split(',').map(|p| p.trim().split('.').map(camel).collect::<Vec<_>>().join(".")).collect()
            }
            None => patch_obj.keys().cloned().collect(),
        };
        let mut paths = Vec::new();
        for path in requested {
            let top = path.split('.').next().unwrap_or("");
            if rules.output_only.contains(&top) {
                continue;
            }
            if !rules.mutable.contains(&top) {
                return Err(ControlError::InvalidArgument(format!(
                    "{} field `{top}` cannot be changed by an update (fields that can: {})",
                    rules.resource,
                    rules.mutable.join(", ")
                )));
            }
            paths.push(path);
        }
        Ok(Patch { value, parsed, paths, resource: rules.resource })
    }

    /// `current` with the patch's fields replaced (a field the body leaves out, named by the
    /// mask, is cleared).
    pub(crate) fn apply(&self, current: &T) -> Result<T> {
        let mut merged = serde_json::to_value(current).map_err(ControlError::internal)?;
        for path in &self.paths {
            set(&mut merged, path, lookup(&self.parsed, path).cloned())?;
        }
        serde_json::from_value(merged)
            .map_err(|e| ControlError::InvalidArgument(format!("invalid {} update: {e}", self.resource)))
    }
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, seg| v.get(seg))
}

fn set(root: &mut Value, path: &str, value: Option<Value>) -> Result<()> {
    let segs: Vec<&str> = path.split('.').collect();
    let (last, parents) =
        segs.split_last().ok_or_else(|| ControlError::InvalidArgument("empty updateMask path".to_string()))?;
    let mut cur = root;
    for seg in parents {
        let obj = cur.as_object_mut().ok_or_else(|| {
            ControlError::InvalidArgument(format!("updateMask path {path:?} goes through a non-object"))
        })?;
        cur = obj.entry(seg.to_string()).or_insert_with(|| Value::Object(Map::new()));
    }
    let obj = cur
        .as_object_mut()
        .ok_or_else(|| ControlError::InvalidArgument(format!("updateMask path {path:?} goes through a non-object")))?;
    match value {
        Some(v) if !v.is_null() => {
            obj.insert(last.to_string(), v);
        }
        _ => {
            obj.remove(*last);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_api::resources::Deployment;
    use serde_json::json;

    const RULES: Patchable = Patchable {
        resource: "deployment",
        output_only: &["name", "state"],
        mutable: &["displayName", "minReplicaCount", "autoscalingPolicy"],
    };

    #[test]
    fn body_fields_are_the_mask_and_output_only_fields_are_ignored() {
        let cur: Deployment =
            serde_json::from_value(json!({"displayName": "a", "minReplicaCount": 1, "state": "READY"})).unwrap();
        let out = Patch::parse(&json!({"displayName": "b", "state": "FAILED"}), None, &RULES)
            .and_then(|p| p.apply(&cur))
            .unwrap();
        assert_eq!(out.display_name.as_deref(), Some("b"));
        assert_eq!(out.min_replica_count, Some(1));
        assert_eq!(out.state, cur.state);
    }

    #[test]
    fn an_update_mask_can_clear_and_reach_sub_fields() {
        let cur: Deployment = serde_json::from_value(json!({"displayName": "a",
            "autoscalingPolicy": {"scaleUpWindow": "30s", "scaleDownWindow": "600s"}}))
        .unwrap();
        let out = Patch::parse(
            &json!({"autoscalingPolicy": {"scaleUpWindow": "60s"}}),
            Some("display_name,autoscaling_policy.scale_up_window"),
            &RULES,
        )
        .and_then(|p| p.apply(&cur))
        .unwrap();
        assert_eq!(out.display_name, None);
        let p = out.autoscaling_policy.unwrap();
        assert_eq!(p.scale_up_window.unwrap().to_string(), "60s");
        assert_eq!(p.scale_down_window.unwrap().to_string(), "600s");
    }

    #[test]
    fn immutable_fields_are_refused_by_name() {
        let err = Patch::<Deployment>::parse(&json!({"baseModel": "x"}), None, &RULES).unwrap_err();
        assert!(err.to_string().contains("`baseModel`"), "{err}");
    }
}
