//! Where the client commands find their server: flags, then the environment
//! (`HEARTH_BASE_URL`, `HEARTH_API_KEY`, `HEARTH_ACCOUNT`), then a config file
//! (`$HEARTH_CONFIG`, else `$XDG_CONFIG_HOME/hearth/config.toml`, else
//! `~/.config/hearth/config.toml`) with the keys `base_url`, `api_key` and `account`.
//!
//! The file is a TOML subset read by hand (three string keys, comments, blank lines): a TOML
//! library would be the larger part of this module for no gain.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

pub const DEFAULT_BASE_URL: &str = "http://127.0.0.1:8080";

/// The three settings, each possibly unset at one level.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub base_url: Option<String>,
    pub api_key: Option<String>,
    pub account: Option<String>,
}

impl Settings {
    /// Each setting from the first level that has it.
    pub fn or(self, lower: Settings) -> Settings {
        Settings {
            base_url: self.base_url.or(lower.base_url),
            api_key: self.api_key.or(lower.api_key),
            account: self.account.or(lower.account),
        }
    }

    /// The settings found in the environment, through `var` (so tests need not change the
    /// process environment). Empty values count as unset.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Settings {
        let get = |k: &str| var(k).filter(|v| !v.is_empty());
        Settings { base_url: get("HEARTH_BASE_URL"), api_key: get("HEARTH_API_KEY"), account: get("HEARTH_ACCOUNT") }
    }
}

/// The config file to read: `$HEARTH_CONFIG` (which must exist), else the XDG location
/// (used only if it exists).
pub fn config_path(var: impl Fn(&str) -> Option<String>) -> Option<(PathBuf, bool)> {
    let var = |k: &str| var(k).filter(|v| !v.is_empty());
    if let Some(p) = var("HEARTH_CONFIG") {
        return Some((PathBuf::from(p), true));
    }
    let base = match var("XDG_CONFIG_HOME") {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(var("HOME")?).join(".config"),
    };
    Some((base.join("hearth").join("config.toml"), false))
}

/// Reads the config file, if there is one.
pub fn load_file(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Settings> {
    let Some((path, required)) = config_path(var) else { return Ok(Settings::default()) };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(Settings::default()),
        Err(e) => return Err(e).with_context(|| format!("reading the config file {}", path.display())),
    };
    parse(&text, &path)
}

/// Parses `key = "value"` lines; `#` starts a comment.
pub fn parse(text: &str, path: &Path) -> anyhow::Result<Settings> {
    let mut s = Settings::default();
    for (n, raw) in text.lines().enumerate() {
        let at = || format!("{}:{}", path.display(), n + 1);
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("{}: expected key = \"value\", got {line:?}", at());
        };
        let value = parse_string(value.trim()).with_context(at)?;
        let slot = match key.trim() {
            "base_url" => &mut s.base_url,
            "api_key" => &mut s.api_key,
            "account" => &mut s.account,
            other => bail!("{}: unknown key {other:?} (the keys are base_url, api_key and account)", at()),
        };
        *slot = Some(value).filter(|v| !v.is_empty());
    }
    Ok(s)
}

/// A TOML basic ("...", with escapes) or literal ('...') string, optionally followed by a
/// comment.
fn parse_string(v: &str) -> anyhow::Result<String> {
    let mut chars = v.chars();
    let quote = match chars.next() {
        Some(q @ ('"' | '\'')) => q,
        _ => bail!("the value must be a quoted string, got {v:?}"),
    };
    let mut out = String::new();
    loop {
        match chars.next() {
            None => bail!("unterminated string {v:?}"),
            Some(c) if c == quote => break,
            Some('\\') if quote == '"' => match chars.next() {
                Some('"') => out.push('"'),
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                other => bail!("unsupported escape \\{} in {v:?}", other.map(String::from).unwrap_or_default()),
            },
            Some(c) => out.push(c),
        }
    }
    let rest = chars.as_str().trim();
    if !rest.is_empty() && !rest.starts_with('#') {
        bail!("unexpected {rest:?} after the value");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file() {
        let flags = Settings { api_key: Some("flag-key".into()), ..Settings::default() };
        let from_env = Settings::from_env(env(&[("HEARTH_API_KEY", "env-key"), ("HEARTH_ACCOUNT", "env-acct")]));
        let file =
            parse("base_url = \"http://file:1\"\napi_key = 'file-key'\naccount = \"file-acct\"\n", Path::new("c"))
                .expect("parse");
        let s = flags.or(from_env).or(file);
        assert_eq!(s.api_key.as_deref(), Some("flag-key"));
        assert_eq!(s.account.as_deref(), Some("env-acct"));
        assert_eq!(s.base_url.as_deref(), Some("http://file:1"));
        // An empty variable is unset, not an empty key.
        assert_eq!(Settings::from_env(env(&[("HEARTH_API_KEY", "")])).api_key, None);
    }

    #[test]
    fn the_file_is_found_where_the_environment_says() {
        let p = config_path(env(&[("HEARTH_CONFIG", "/x/c.toml"), ("XDG_CONFIG_HOME", "/xdg")]));
        assert_eq!(p, Some((PathBuf::from("/x/c.toml"), true)));
        let p = config_path(env(&[("XDG_CONFIG_HOME", "/xdg"), ("HOME", "/home/u")]));
        assert_eq!(p, Some((PathBuf::from("/xdg/hearth/config.toml"), false)));
        let p = config_path(env(&[("HOME", "/home/u")]));
        assert_eq!(p, Some((PathBuf::from("/home/u/.config/hearth/config.toml"), false)));
        // A missing default file is fine; a missing named one is an error.
        let dir = tempfile::tempdir().expect("tempdir");
        let xdg = dir.path().to_string_lossy().into_owned();
        assert_eq!(load_file(env(&[("XDG_CONFIG_HOME", &xdg)])).expect("none"), Settings::default());
        let named = dir.path().join("nope.toml").to_string_lossy().into_owned();
        assert!(load_file(env(&[("HEARTH_CONFIG", &named)])).is_err());
    }

    #[test]
    fn the_file_format_is_strict_and_says_where() {
        let s = parse("# hearth\n\n api_key = \"a\\\"b\" # trailing\n", Path::new("c")).expect("parse");
        assert_eq!(s.api_key.as_deref(), Some("a\"b"));
        for (bad, why) in [
            ("api_key = a", "quoted"),
            ("api_key = \"a", "unterminated"),
            ("apikey = \"a\"", "unknown key"),
            ("api_key", "expected key"),
            ("api_key = \"a\" b", "unexpected"),
        ] {
            let e = format!("{:#}", parse(bad, Path::new("conf.toml")).expect_err(bad));
            assert!(e.contains(why) && e.contains("conf.toml:1"), "{bad}: {e}");
        }
    }
}
