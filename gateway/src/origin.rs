//! Which page origins may open a WebSocket: the defence against cross-site
//! WebSocket hijacking.
//!
//! A browser sends the `Origin` of the page that opens a WebSocket, and a
//! page on another site cannot forge it. `--allowed-origins` lists the
//! origins whose pages may connect; a browser upgrade from any other origin
//! is refused with 403. Clients that are not browsers usually send no
//! `Origin` and are let through, unless `--require-origin`.
//!
//! An entry is `*` (any origin), an exact origin (`https://chat.example.com`,
//! `http://localhost:8080`), or one with a wildcard first label
//! (`https://*.example.com`: any subdomain of `example.com` at any depth, not
//! `example.com` itself). An entry without a scheme (`*.example.com`,
//! `chat.example.com`) matches it over any scheme. A port must match
//! exactly: an entry without one matches only origins without one. Matching
//! ignores case.

use crate::ws::handshake::Refusal;

/// The origins allowed to upgrade, as `--allowed-origins` and
/// `--require-origin` set them.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    /// Empty: every origin (no list given).
    allowed: Vec<Pattern>,
    require: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Origin {
        /// `None`: any scheme.
        scheme: Option<String>,
        host: Host,
        port: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Exact(String),
    /// `*.example.com`, kept as `.example.com`.
    Below(String),
}

/// An origin split into its parts, lowercased.
struct Parts<'a> {
    scheme: &'a str,
    host: &'a str,
    port: Option<&'a str>,
}

/// Splits `scheme://host[:port]`; `None` for anything else (an opaque
/// `null` origin, a path, userinfo).
fn split(origin: &str) -> Option<Parts<'_>> {
    let (scheme, rest) = origin.split_once("://")?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok || rest.is_empty() || rest.contains(['/', '@', '?', '#', ' ']) {
        return None;
    }
    // An IPv6 literal keeps its colons inside brackets.
    let (host, port) = match rest.strip_prefix('[') {
        Some(inner) => {
            let (addr, after) = inner.split_once(']')?;
            let host = &rest[..addr.len() + 2];
            match after {
                "" => (host, None),
                p => (host, Some(p.strip_prefix(':')?)),
            }
        }
        None => match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        },
    };
    if host.is_empty()
        || port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    Some(Parts { scheme, host, port })
}

impl Pattern {
    fn parse(entry: &str) -> Result<Pattern, String> {
        let entry = entry.trim().to_ascii_lowercase();
        if entry == "*" {
            return Ok(Pattern::Any);
        }
        let bad = || {
            format!(
                "--allowed-origins: {entry:?} is not an origin: write scheme://host[:port] \
                 (e.g. https://chat.example.com), https://*.example.com, or *"
            )
        };
        let with_scheme = if entry.contains("://") {
            entry.clone()
        } else {
            format!("any://{entry}")
        };
        let parts = split(&with_scheme).ok_or_else(bad)?;
        let host = match parts.host.strip_prefix("*.") {
            Some(rest) if !rest.is_empty() && !rest.contains('*') => {
                Host::Below(format!(".{rest}"))
            }
            Some(_) => return Err(bad()),
            None if parts.host.contains('*') => return Err(bad()),
            None => Host::Exact(parts.host.to_string()),
        };
        Ok(Pattern::Origin {
            scheme: entry.contains("://").then(|| parts.scheme.to_string()),
            host,
            port: parts.port.map(str::to_string),
        })
    }

    fn matches(&self, origin: &Parts<'_>) -> bool {
        let Pattern::Origin { scheme, host, port } = self else {
            return true;
        };
        scheme.as_deref().is_none_or(|s| s == origin.scheme)
            && port.as_deref() == origin.port
            && match host {
                Host::Exact(h) => h == origin.host,
                Host::Below(suffix) => {
                    origin.host.len() > suffix.len() && origin.host.ends_with(suffix.as_str())
                }
            }
    }
}

impl Origins {
    /// The policy from the flags' values; an entry that is not an origin is
    /// an error that names it.
    pub fn parse(entries: &[String], require: bool) -> Result<Origins, String> {
        let allowed = entries
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| Pattern::parse(e))
            .collect::<Result<_, _>>()?;
        Ok(Origins { allowed, require })
    }

    /// Whether every origin may connect (no list, or `*` in it).
    pub fn open(&self) -> bool {
        self.allowed.is_empty() || self.allowed.contains(&Pattern::Any)
    }

    /// Checks an upgrade's `Origin` header (`None`: it had none).
    pub fn check(&self, origin: Option<&str>) -> Result<(), Refusal> {
        let Some(origin) = origin else {
            return match self.require {
                true => Err(Refusal::OriginRequired),
                false => Ok(()),
            };
        };
        if self.open() {
            return Ok(());
        }
        let origin = origin.to_ascii_lowercase();
        match split(&origin) {
            Some(parts) if self.allowed.iter().any(|p| p.matches(&parts)) => Ok(()),
            _ => Err(Refusal::OriginNotAllowed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str], require: bool) -> Origins {
        let entries: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        Origins::parse(&entries, require).unwrap()
    }

    #[test]
    fn origins_match_as_documented() {
        let p = policy(
            &[
                "https://chat.example.com",
                "https://*.example.org",
                "*.example.net",
                "http://localhost:8080",
                "http://[::1]:3000",
            ],
            false,
        );
        let cases: &[(Option<&str>, bool)] = &[
            (None, true),
            (Some("https://chat.example.com"), true),
            (Some("HTTPS://Chat.Example.COM"), true),
            (Some("http://chat.example.com"), false),
            (Some("https://chat.example.com:8443"), false),
            (Some("https://evil.com"), false),
            (Some("https://chat.example.com.evil.com"), false),
            (Some("https://a.example.org"), true),
            (Some("https://a.b.example.org"), true),
            (Some("https://example.org"), false),
            (Some("https://badexample.org"), false),
            (Some("http://a.example.org"), false),
            (Some("http://a.example.net"), true),
            (Some("https://a.example.net"), true),
            (Some("https://a.example.net:444"), false),
            (Some("http://localhost:8080"), true),
            (Some("http://localhost"), false),
            (Some("http://localhost:8081"), false),
            (Some("http://[::1]:3000"), true),
            (Some("http://[::1]"), false),
            (Some("null"), false),
            (Some(""), false),
            (Some("https://chat.example.com/path"), false),
            (Some("https://user@chat.example.com"), false),
        ];
        for &(origin, ok) in cases {
            let got = p.check(origin);
            let want = if ok {
                Ok(())
            } else {
                Err(Refusal::OriginNotAllowed)
            };
            assert_eq!(got, want, "{origin:?}");
        }
    }

    #[test]
    fn no_list_or_a_star_allows_every_origin_and_require_wants_one() {
        for p in [policy(&[], false), policy(&["*"], false)] {
            assert!(p.open());
            assert_eq!(p.check(Some("https://anything.example")), Ok(()));
            assert_eq!(p.check(Some("null")), Ok(()));
            assert_eq!(p.check(None), Ok(()));
        }
        let required = policy(&["https://chat.example.com"], true);
        assert_eq!(required.check(None), Err(Refusal::OriginRequired));
        assert_eq!(required.check(Some("https://chat.example.com")), Ok(()));
        assert_eq!(policy(&[], true).check(None), Err(Refusal::OriginRequired));
    }

    #[test]
    fn an_entry_that_is_not_an_origin_is_refused_by_name() {
        for bad in [
            "https://chat.example.com/",
            "https://*",
            "https://a.*.example.com",
            "https://*example.com",
            "ftp//x",
            "https://host:port",
            "https://",
        ] {
            let err = Origins::parse(&[bad.to_string()], false).unwrap_err();
            assert!(
                err.contains("--allowed-origins") && err.contains(&bad.to_ascii_lowercase()),
                "{bad}: {err}"
            );
        }
    }
}
