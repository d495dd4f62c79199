//! Query parameters: typed, and strict. A parameter hearth does not know is refused, so a
//! typo never silently changes what a request does.

use std::collections::HashMap;

use crate::error::{ApiError, ApiResult};

pub(crate) struct Params {
    map: HashMap<String, String>,
}

/// `validateOnly` and `validate_only` both name the same parameter: the official clients use
/// camelCase, gRPC-transcoding conventions allow the proto name.
fn camel(name: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in name.chars() {
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

impl Params {
    pub fn parse(query: Option<&str>) -> ApiResult<Params> {
        let mut map = HashMap::new();
        for (k, v) in form_pairs(query.unwrap_or("")) {
            let key = camel(&k);
            if map.insert(key.clone(), v).is_some() {
                return Err(ApiError::invalid(format!("query parameter {key} is given more than once")));
            }
        }
        Ok(Params { map })
    }

    pub fn str(&mut self, name: &str) -> Option<String> {
        self.map.remove(name)
    }

    pub fn bool(&mut self, name: &str) -> ApiResult<bool> {
        match self.map.remove(name).as_deref() {
            None | Some("") => Ok(false),
            Some("true") | Some("1") | Some("True") => Ok(true),
            Some("false") | Some("0") | Some("False") => Ok(false),
            Some(other) => {
                Err(ApiError::invalid(format!("query parameter {name} must be true or false, got {other:?}")))
            }
        }
    }

    pub fn i32(&mut self, name: &str) -> ApiResult<Option<i32>> {
        match self.map.remove(name) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| ApiError::invalid(format!("query parameter {name} must be an integer, got {v:?}"))),
        }
    }

    /// Refuses whatever was not taken.
    pub fn finish(self) -> ApiResult<()> {
        let mut left: Vec<&String> = self.map.keys().collect();
        left.sort();
        match left.first() {
            None => Ok(()),
            Some(_) => Err(ApiError::invalid(format!(
                "unknown query parameter(s): {}",
                left.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

/// Decodes `application/x-www-form-urlencoded` pairs (`+` is a space, `%XX` a byte).
fn form_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_normalises_names() {
        let mut p =
            Params::parse(Some("validate_only=true&filter=state%3D%22READY%22&orderBy=name+desc&x=%zz")).unwrap();
        assert!(p.bool("validateOnly").unwrap());
        assert_eq!(p.str("filter").as_deref(), Some("state=\"READY\""));
        assert_eq!(p.str("orderBy").as_deref(), Some("name desc"));
        assert_eq!(p.str("x").as_deref(), Some("%zz"));
        p.finish().unwrap();
    }

    #[test]
    fn unknown_and_malformed_parameters_are_refused() {
        let p = Params::parse(Some("hard=true&bogus=1")).unwrap();
        let mut p2 = p;
        p2.bool("hard").unwrap();
        assert!(p2.finish().unwrap_err().message.contains("bogus"));
        let mut p3 = Params::parse(Some("hard=yes")).unwrap();
        assert!(p3.bool("hard").is_err());
        assert!(Params::parse(Some("a=1&a=2")).is_err());
        let mut p4 = Params::parse(Some("pageSize=%")).unwrap();
        assert!(p4.i32("pageSize").is_err());
    }
}
