//! Room namespaces in the config file: `[namespaces."typing:"]` tables,
//! each a room-name prefix with its own options (see docs/operations.md).
//! Options a namespace leaves out have the default namespace's values, the
//! flags'. Re-read on SIGHUP ([`NamespaceFile::reload`]).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use corecast_router::{
    namespace::{Namespace, Namespaces, Rate, Table},
    proto::{valid_room, MAX_ROOM_BYTES},
};
use serde::Deserialize;
use toml::Spanned;

use super::{file::line_of, ConfigError};

/// The file's key that holds the namespaces (not a flag).
pub const KEY: &str = "namespaces";

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    namespaces: BTreeMap<Spanned<String>, Spec>,
}

/// One `[namespaces."prefix"]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    ephemeral: Option<bool>,
    presence: Option<bool>,
    presence_max_members: Option<usize>,
    client_publish: Option<bool>,
    join_requires_claim: Option<bool>,
    max_body_bytes: Option<usize>,
    history_size: Option<usize>,
    history_ttl_s: Option<u64>,
    publish_rate_per_s: Option<u32>,
    publish_burst: Option<u32>,
}

/// The most messages a room may keep (as `--history-size`).
const MAX_HISTORY_SIZE: usize = 1_000_000;

/// Parses the namespaces of the TOML document `text` (from `origin`) over
/// `default`; a history may not outlive `meta_ttl` (`--history-meta-ttl-s`).
pub fn parse(
    text: &str,
    origin: &str,
    default: &Namespace,
    meta_ttl: Duration,
) -> Result<Table, ConfigError> {
    let file: File = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| format!(":{}", line_of(text, s.start)))
            .unwrap_or_default();
        ConfigError(format!("{origin}{line}: {}", e.message()))
    })?;
    let mut spaces = Vec::with_capacity(file.namespaces.len());
    for (prefix, spec) in file.namespaces {
        let line = line_of(text, prefix.span().start);
        let at = |what: String| {
            ConfigError(format!(
                "{origin}:{line}: namespace {:?}: {what}",
                prefix.get_ref()
            ))
        };
        let p = prefix.get_ref();
        if p.is_empty() || p.len() > MAX_ROOM_BYTES || !valid_room(p) {
            return Err(at(format!(
                "a prefix is 1-{MAX_ROOM_BYTES} bytes of letters, digits and _ - . : @ / (the start of room names)"
            )));
        }
        let presence_max_members = match (spec.presence, spec.presence_max_members) {
            (Some(false), Some(_)) => {
                return Err(at(
                    "presence = false and presence_max_members: give one".into()
                ))
            }
            (Some(false), None) => 0,
            (_, Some(n)) => n,
            (_, None) => default.presence_max_members,
        };
        let max_body_bytes = spec.max_body_bytes.unwrap_or(default.max_body_bytes);
        if max_body_bytes == 0 {
            return Err(at("max_body_bytes must be at least 1".into()));
        }
        let publish_rate = match (spec.publish_rate_per_s, spec.publish_burst) {
            (None, None) => default.publish_rate,
            (None, Some(_)) => return Err(at("publish_burst needs publish_rate_per_s".into())),
            (Some(0), _) | (_, Some(0)) => {
                return Err(at(
                    "publish_rate_per_s and publish_burst are at least 1 (client_publish = false stops clients' publishes)".into(),
                ))
            }
            (Some(per_s), burst) => Some(Rate {
                per_s,
                burst: burst.unwrap_or(per_s),
            }),
        };
        let history_size = spec.history_size.unwrap_or(default.history_size);
        if history_size > MAX_HISTORY_SIZE {
            return Err(at(format!("history_size is at most {MAX_HISTORY_SIZE}")));
        }
        let history_ttl = spec
            .history_ttl_s
            .map_or(default.history_ttl, Duration::from_secs);
        if history_ttl.is_zero() || history_ttl > meta_ttl {
            return Err(at(format!(
                "history_ttl_s must be 1 to --history-meta-ttl-s ({} s)",
                meta_ttl.as_secs()
            )));
        }
        spaces.push(Namespace {
            prefix: p.as_str().into(),
            ephemeral: spec.ephemeral.unwrap_or(default.ephemeral),
            presence_max_members,
            client_publish: spec.client_publish.unwrap_or(default.client_publish),
            join_requires_claim: spec
                .join_requires_claim
                .unwrap_or(default.join_requires_claim),
            max_body_bytes,
            history_size,
            history_ttl,
            publish_rate,
        });
    }
    Ok(Table::new(default.clone(), spaces))
}

/// The prefix of the namespace `--dev` adds.
pub const DEV_TYPING_PREFIX: &str = "typing:";

/// The namespace `--dev` adds for the demo page's typing indicator:
/// `typing:` rooms, ephemeral and without presence, the rest as `default`.
pub fn dev_typing(default: &Namespace) -> Namespace {
    Namespace {
        prefix: DEV_TYPING_PREFIX.into(),
        ephemeral: true,
        presence_max_members: 0,
        ..default.clone()
    }
}

/// The node's namespaces and the file they came from, for SIGHUP.
#[derive(Debug, Clone)]
pub struct NamespaceFile {
    path: Option<PathBuf>,
    default: Namespace,
    /// Namespaces the flags add (`--dev`'s `typing:`), kept over every
    /// reload unless the file defines the same prefix: without them a
    /// SIGHUP would drop them.
    implied: Vec<Namespace>,
    meta_ttl: Duration,
    pub namespaces: Namespaces,
}

impl NamespaceFile {
    /// The namespaces of the config file at `path` (none without a file),
    /// and each of `implied` whose prefix the file does not define.
    pub fn load(
        path: Option<PathBuf>,
        default: Namespace,
        implied: Vec<Namespace>,
        meta_ttl: Duration,
    ) -> Result<NamespaceFile, ConfigError> {
        let table = with_implied(read(path.as_ref(), &default, meta_ttl)?, &implied);
        Ok(NamespaceFile {
            path,
            default,
            implied,
            meta_ttl,
            namespaces: Namespaces::new(table),
        })
    }

    /// Reads the file again and replaces the namespaces (new joins and
    /// publishes see them); a broken file changes nothing. The number of
    /// namespaces besides the default one.
    pub fn reload(&self) -> Result<usize, ConfigError> {
        let table = read(self.path.as_ref(), &self.default, self.meta_ttl)?;
        let table = with_implied(table, &self.implied);
        let n = table.spaces().len();
        self.namespaces.replace(table);
        Ok(n)
    }

    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }
}

/// `table` with each of `implied` whose prefix it does not have.
fn with_implied(table: Table, implied: &[Namespace]) -> Table {
    let missing = implied
        .iter()
        .filter(|i| table.spaces().iter().all(|n| n.prefix != i.prefix));
    let spaces: Vec<Namespace> = table.spaces().iter().chain(missing).cloned().collect();
    Table::new(table.default_namespace().clone(), spaces)
}

fn read(
    path: Option<&PathBuf>,
    default: &Namespace,
    meta_ttl: Duration,
) -> Result<Table, ConfigError> {
    let Some(path) = path else {
        return Ok(Table::new(default.clone(), Vec::new()));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("--config {}: cannot read it: {e}", path.display())))?;
    parse(&text, &path.display().to_string(), default, meta_ttl)
}

/// The commented example of a namespace (`gateway config example`).
pub const EXAMPLE: &str = r#"
# ---- Room namespaces ----
# A namespace is a room-name prefix with its own options; a room belongs to
# the namespace with the longest prefix its name starts with, others to the
# default namespace (the flags above). Options left out take the default's.
# SIGHUP re-reads them (new joins and publishes; see docs/operations.md).
#
# [namespaces."typing:"]
# ephemeral = true            # not stored: acked at once ("stored":false), no history
# presence = false            # no presence events, presence answers the count only
#
# [namespaces."notify:"]
# client_publish = false      # only the server API publishes
# join_requires_claim = true  # only tokens whose rooms claim lists the room
# max_body_bytes = 4096
# presence_max_members = 100
# history_size = 50           # messages the store keeps per room (0: none)
# history_ttl_s = 3600        # history dropped this long after the last message
# publish_rate_per_s = 2      # each connection's publishes here, per second
# publish_burst = 5
"#;

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn default() -> Namespace {
        Namespace::default_with(1000, 65536)
    }

    #[test]
    fn namespaces_take_the_defaults_they_leave_out() {
        let text = "listen = \"127.0.0.1:0\"\n[namespaces.\"typing:\"]\nephemeral = true\npresence = false\n\n[namespaces.\"notify:\"]\nclient_publish = false\njoin_requires_claim = true\nmax_body_bytes = 10\npresence_max_members = 5\nhistory_size = 0\nhistory_ttl_s = 60\npublish_rate_per_s = 2\n";
        let t = parse(text, "f.toml", &default(), DAY).unwrap();
        let typing = t.of("typing:lobby");
        assert!(typing.ephemeral && typing.client_publish && !typing.join_requires_claim);
        assert_eq!(
            (typing.presence_max_members, typing.max_body_bytes),
            (0, 65536)
        );
        let notify = t.of("notify:alice");
        assert!(!notify.ephemeral && !notify.client_publish && notify.join_requires_claim);
        assert_eq!(
            (notify.presence_max_members, notify.max_body_bytes),
            (5, 10)
        );
        assert_eq!(t.of("lobby"), &default());
    }

    #[test]
    fn the_example_loads_once_uncommented() {
        let live: String = EXAMPLE
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with("[namespaces.") || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let t = parse(&live, "example", &default(), DAY).unwrap_or_else(|e| panic!("{e}\n{live}"));
        assert_eq!(t.spaces().len(), 2);
        assert!(t.of("typing:x").ephemeral && !t.of("notify:x").client_publish);
    }

    #[test]
    fn an_implied_namespace_yields_to_the_files_own() {
        let implied = [dev_typing(&default())];
        let t = with_implied(Table::new(default(), Vec::new()), &implied);
        let typing = t.of("typing:lobby");
        assert!(typing.ephemeral && typing.presence_max_members == 0);
        assert_eq!(typing.max_body_bytes, 65536, "the rest is the default's");
        assert_eq!(t.of("lobby"), &default());
        // The file's `typing:` (stored, with presence) wins over --dev's.
        let text = "[namespaces.\"typing:\"]\nmax_body_bytes = 10\n";
        let file = parse(text, "f.toml", &default(), DAY).unwrap();
        let t = with_implied(file, &implied);
        assert_eq!(t.spaces().len(), 1);
        let typing = t.of("typing:lobby");
        assert!(!typing.ephemeral && typing.presence_max_members == 1000);
        assert_eq!(typing.max_body_bytes, 10);
    }

    #[test]
    fn bad_namespaces_name_the_line() {
        let cases = [
            (
                "[namespaces.\"typing:\"]\nephemral = true\n",
                "f.toml:2: unknown field `ephemral`",
            ),
            (
                "\n[namespaces.\"a b\"]\nephemeral = true\n",
                "f.toml:2: namespace \"a b\": a prefix is",
            ),
            (
                "[namespaces.\"x\"]\nmax_body_bytes = 0\n",
                "f.toml:1: namespace \"x\": max_body_bytes must be",
            ),
            (
                "[namespaces.\"x\"]\npresence = false\npresence_max_members = 3\n",
                "give one",
            ),
            (
                "[namespaces.\"x\"]\nephemeral = \"yes\"\n",
                "f.toml:2: invalid type",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text, "f.toml", &default(), DAY).unwrap_err().0;
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
