//! The configuration file (`--config corecast.toml`): one key per flag.
//!
//! A key is its flag's name without the dashes, in snake case
//! (`--max-connections-per-user` is `max_connections_per_user`), at the top
//! level of the file. The file's values become the flags' defaults, so a
//! flag on the command line and a `CORECAST_*` variable both override the
//! file, and the file overrides the built-in defaults. An unknown key, or a
//! value of the wrong type, is an error that names the key and its line.

use std::path::Path;

use clap::Command;
use toml::{Spanned, Value};

use super::ConfigError;

/// Arguments that are not configuration (or would be circular in a file).
const NOT_IN_FILES: &[&str] = &["config", "help", "version"];

/// The line (from 1) of byte `at` in `text`.
pub(super) fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// `cmd` with the file at `path` as its arguments' defaults.
pub fn with_file(cmd: Command, path: &Path) -> Result<Command, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("--config {}: cannot read it: {e}", path.display())))?;
    with_text(cmd, &text, &path.display().to_string())
}

/// `cmd` with `text` (a TOML document from `origin`) as its defaults.
pub fn with_text(mut cmd: Command, text: &str, origin: &str) -> Result<Command, ConfigError> {
    let spanned: std::collections::BTreeMap<Spanned<String>, Spanned<Value>> = toml::from_str(text)
        .map_err(|e| {
            let line = e
                .span()
                .map(|s| format!(":{}", line_of(text, s.start)))
                .unwrap_or_default();
            ConfigError(format!("{origin}{line}: not valid TOML: {}", e.message()))
        })?;
    for (key, value) in spanned {
        // Not a flag: read by `namespaces`, which checks it.
        if key.get_ref() == super::namespaces::KEY {
            continue;
        }
        let line = line_of(text, key.span().start);
        let at = |what: String| ConfigError(format!("{origin}:{line}: {what}"));
        let name = key.get_ref();
        let known = cmd
            .get_arguments()
            .find(|a| a.get_id() == name.as_str() && a.get_long().is_some())
            .filter(|_| !NOT_IN_FILES.contains(&name.as_str()));
        let Some(arg) = known else {
            let keys = cmd.get_arguments().filter(|a| a.get_long().is_some());
            let keys = keys
                .map(|a| a.get_id().as_str())
                .filter(|k| !NOT_IN_FILES.contains(k));
            let closest = keys
                .min_by_key(|k| distance(k, name))
                .filter(|k| distance(k, name) <= close_enough(k, name));
            let hint = match closest {
                Some(k) => format!("did you mean {k}?"),
                None => "`gateway config example` lists every key".into(),
            };
            return Err(at(format!("unknown key {name:?}: {hint}")));
        };
        let takes_many = takes_many(arg);
        let flag = format!("--{}", arg.get_long().unwrap_or_default());
        let values: Vec<String> = match value.into_inner() {
            Value::Array(items) if takes_many => items
                .into_iter()
                .map(|v| {
                    scalar(v).ok_or_else(|| at(format!("{name}: the list holds a table or list")))
                })
                .collect::<Result<_, _>>()?,
            Value::Array(_) => {
                return Err(at(format!("{name} ({flag}) takes one value, not a list")))
            }
            v => vec![scalar(v)
                .ok_or_else(|| at(format!("{name} ({flag}) takes a value, not a table")))?],
        };
        // Checked here, so the error names the file's line rather than a
        // default the command line never saw.
        let is_flag = !arg.get_action().takes_values();
        for v in &values {
            let ok = if is_flag {
                matches!(v.as_str(), "true" | "false")
                    .then_some(())
                    .ok_or_else(|| "takes true or false".to_string())
            } else {
                // The flag's own parser, on a command of that flag alone.
                let one = Command::new("gateway").arg(arg.clone().env(None::<&str>));
                one.try_get_matches_from(["gateway", &flag, v])
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            };
            if let Err(why) = ok {
                let why = why
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("error: ");
                return Err(at(format!("{name} = {v:?}: {why}")));
            }
        }
        let id = arg.get_id().clone();
        cmd = cmd.mut_arg(id, |a| a.default_values(values));
    }
    Ok(cmd)
}

/// The most edits between a typo and the key it suggests: up to 3, fewer
/// for short keys, so that `zzz` does not suggest `dev`.
fn close_enough(a: &str, b: &str) -> usize {
    (a.len().max(b.len()) / 3).clamp(1, 3)
}

/// Edits (insertions, deletions, substitutions) between two keys.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(here + 1);
            prev = here;
        }
    }
    row[b.len()]
}

/// `text` in lines of at most `width` characters, each starting with `# `.
fn comment(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            out.push_str(&format!("# {line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(&format!("# {line}\n"));
    }
    out
}

/// Whether a flag takes a list (a TOML array in the file).
fn takes_many(arg: &clap::Arg) -> bool {
    arg.get_num_args().is_some_and(|n| n.max_values() > 1) || arg.get_value_delimiter().is_some()
}

/// A TOML scalar as the text a flag would take.
fn scalar(v: Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s),
        Value::Integer(i) => Some(i.to_string()),
        Value::Float(f) => Some(f.to_string()),
        Value::Boolean(b) => Some(b.to_string()),
        Value::Datetime(d) => Some(d.to_string()),
        Value::Array(_) | Value::Table(_) => None,
    }
}

/// A commented example file: every key, under its flag's section, with its
/// help and its default (commented out: the built-in default applies).
pub fn example(cmd: &Command) -> String {
    let mut out = flags_example(cmd);
    out.push_str(super::namespaces::EXAMPLE);
    out
}

fn flags_example(cmd: &Command) -> String {
    let mut out = String::from(
        "# corecast gateway configuration (gateway --config FILE).\n\
         # Every key is a flag's name in snake case; a flag or a CORECAST_* variable\n\
         # overrides the file. Uncomment what you change.\n",
    );
    let mut heading = None;
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.get_long().is_none() || NOT_IN_FILES.contains(&id) || arg.is_hide_set() {
            continue;
        }
        if arg.get_help_heading() != heading {
            heading = arg.get_help_heading();
            out.push_str(&format!("\n# ---- {} ----\n", heading.unwrap_or("General")));
        }
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string());
        out.push('\n');
        out.push_str(&comment(&help.unwrap_or_default(), 76));
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let takes_many = takes_many(arg);
        let is_flag = !arg.get_action().takes_values();
        let value = match (defaults.as_slice(), takes_many, is_flag) {
            (_, _, true) => "false".to_string(),
            ([], true, _) => "[]".to_string(),
            ([], false, _) => {
                out.push_str(&format!("# {id} = ...  (unset by default)\n"));
                continue;
            }
            (d, true, _) => format!(
                "[{}]",
                d.iter()
                    .map(|v| toml_value(v))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            ([d], false, _) => toml_value(d),
            (d, false, _) => toml_value(&d.join(",")),
        };
        out.push_str(&format!("# {id} = {value}\n"));
    }
    out
}

/// A default as a TOML value: numbers and booleans bare, the rest quoted.
fn toml_value(v: &str) -> String {
    let bare = v.parse::<i64>().is_ok()
        || (v.parse::<f64>().is_ok() && v.contains('.'))
        || v == "true"
        || v == "false";
    match bare {
        true => v.to_string(),
        false => Value::String(v.to_string()).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;
    use crate::Config;

    fn load(text: &str, argv: &[&str]) -> Result<Config, ConfigError> {
        let cmd = with_text(Config::command(), text, "test.toml")?;
        let mut full = vec!["gateway"];
        full.extend_from_slice(argv);
        let m = cmd
            .try_get_matches_from(full)
            .map_err(|e| ConfigError(e.to_string()))?;
        Config::from_arg_matches(&m).map_err(|e| ConfigError(e.to_string()))
    }

    #[test]
    fn the_file_sets_defaults_and_flags_override_it() {
        let text = "listen = \"127.0.0.1:9001\"\nshards = 3\nallow_anonymous = true\n\
                    allowed_origins = [\"https://a.example\", \"https://*.b.example\"]\n\
                    rate_limit_per_s = 12.5\n";
        let c = load(text, &[]).unwrap();
        assert_eq!(c.listen().to_string(), "127.0.0.1:9001");
        assert_eq!(c.node.shards, Some(3));
        assert!(c.chat.allow_anonymous);
        assert_eq!(
            c.conn.allowed_origins,
            ["https://a.example", "https://*.b.example"]
        );
        assert_eq!(c.chat.rate_limit_per_s, 12.5);
        let c = load(text, &["--shards", "1", "--listen", "127.0.0.1:9002"]).unwrap();
        assert_eq!((c.node.shards, c.listen().port()), (Some(1), 9002));
        assert_eq!(
            c.chat.rate_limit_per_s, 12.5,
            "what the flags leave stays the file's"
        );
    }

    #[test]
    fn bad_keys_and_values_name_the_line() {
        let cases = [
            ("listen = \"127.0.0.1:1\"\n\nmax_conections_per_user = 3\n", "test.toml:3: unknown key \"max_conections_per_user\": did you mean max_connections_per_user?"),
            ("zzz = 1\n", "test.toml:1: unknown key \"zzz\": `gateway config example` lists every key"),
            ("deb = true\n", "test.toml:1: unknown key \"deb\": did you mean dev?"),
            ("shard = 2\n", "test.toml:1: unknown key \"shard\": did you mean shards?"),
            ("config = \"other.toml\"\n", "test.toml:1: unknown key \"config\""),
            ("shards = \"two\"\n", "test.toml:1: shards = \"two\": invalid value 'two' for '--shards"),
            ("listen = [\"a\", \"b\"]\n", "test.toml:1: listen (--listen) takes one value, not a list"),
            ("allow_anonymous = 3\n", "test.toml:1: allow_anonymous = \"3\": takes true or false"),
            ("\n\nlisten = \n", "test.toml:3: not valid TOML"),
            ("[namespaces]\nx = 1\n", "test.toml:1: listen"),
        ];
        for (text, says) in cases.iter().take(9) {
            let err = load(text, &[]).expect_err(text).to_string();
            assert!(err.starts_with(says), "{text:?}: {err}");
        }
        // The namespaces table is not a flag: `namespaces` reads it.
        assert!(load(cases[9].0, &[]).is_ok());
    }

    #[test]
    fn the_example_lists_every_key_and_loads_back() {
        let cmd = Config::command();
        let text = example(&cmd);
        for arg in cmd.get_arguments().filter(|a| a.get_long().is_some()) {
            let id = arg.get_id().as_str();
            if NOT_IN_FILES.contains(&id) || arg.is_hide_set() {
                continue;
            }
            assert!(text.contains(&format!("# {id} = ")), "{id} missing");
        }
        assert!(
            text.lines().all(|l| l.is_empty() || l.starts_with('#')),
            "all commented"
        );
        // Uncommented, every key that has a default loads as it stands.
        let flags = text.split("# ---- Room namespaces").next().unwrap();
        let live: String = flags
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.contains(" = ") && !l.ends_with("(unset by default)"))
            .filter(|l| l.split(" = ").next().is_some_and(|k| !k.contains(' ')))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = load(&live, &[]).unwrap_or_else(|e| panic!("{e}\n{live}"));
        assert_eq!(c.listen().to_string(), "0.0.0.0:8080");
        assert!(!c.node.dev);
        assert!(
            text.contains("\n# Development mode"),
            "--dev's help is its comment"
        );
        assert!(text.contains("# dev = false\n"));
    }

    #[test]
    fn dev_listens_on_loopback_unless_a_listen_is_given() {
        // (file, flags, the address bound)
        let cases: &[(&str, &[&str], &str)] = &[
            ("", &[], "0.0.0.0:8080"),
            ("dev = true\n", &[], "127.0.0.1:8080"),
            ("", &["--dev"], "127.0.0.1:8080"),
            (
                "dev = true\nlisten = \"0.0.0.0:8080\"\n",
                &[],
                "0.0.0.0:8080",
            ),
            ("listen = \"0.0.0.0:9000\"\n", &["--dev"], "0.0.0.0:9000"),
            (
                "dev = true\n",
                &["--listen", "127.0.0.1:9001"],
                "127.0.0.1:9001",
            ),
            ("dev = false\n", &["--listen", "[::1]:9002"], "[::1]:9002"),
        ];
        for (text, flags, want) in cases {
            let c = load(text, flags).unwrap();
            assert_eq!(c.listen().to_string(), *want, "{text:?} {flags:?}");
        }
        assert!(load("dev = true\n", &[]).unwrap().node.dev);
        let e = load("dev = \"yes\"\n", &[]).unwrap_err().to_string();
        assert!(
            e.starts_with("test.toml:1: dev = \"yes\": takes true or false"),
            "{e}"
        );
    }
}
