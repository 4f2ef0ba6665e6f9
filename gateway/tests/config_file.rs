//! The configuration file through the real binary: `--config`, flags and
//! `CORECAST_*` variables over it, `gateway config check` and `example`.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

fn file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("corecast-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts the gateway, returns its "listening on" log line, stops it.
fn listening_line(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = Command::new(GATEWAY)
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let line = lines.next().expect("a log line").unwrap();
        if line.contains("listening on") {
            break line;
        }
        assert!(Instant::now() < deadline, "no listening line");
    };
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    line
}

#[test]
fn flags_and_variables_override_the_file() {
    let conf = file(
        "over.toml",
        "listen = \"127.0.0.1:0\"\nshards = 2\nbacklog = 77\n",
    );
    let conf = conf.to_str().unwrap();
    let from_file = listening_line(&["--config", conf], &[]);
    assert!(
        from_file.contains(": 2 shards") && from_file.contains("backlog 77"),
        "{from_file}"
    );
    let by_flag = listening_line(&["--config", conf, "--shards", "1"], &[]);
    assert!(
        by_flag.contains(": 1 shards") && by_flag.contains("backlog 77"),
        "{by_flag}"
    );
    let by_env = listening_line(&["--config", conf], &[("CORECAST_BACKLOG", "55")]);
    assert!(
        by_env.contains(": 2 shards") && by_env.contains("backlog 55"),
        "{by_env}"
    );
    let by_env_file = listening_line(&[], &[("CORECAST_CONFIG", conf)]);
    assert!(by_env_file.contains("backlog 77"), "{by_env_file}");
}

fn check(file: &std::path::Path) -> std::process::Output {
    let check = Command::new(GATEWAY)
        .args(["config", "check"])
        .arg(file)
        .output();
    check.unwrap()
}

#[test]
fn config_check_and_example() {
    let example = Command::new(GATEWAY)
        .args(["config", "example"])
        .output()
        .unwrap();
    assert!(example.status.success());
    let ex = file("example.toml", &String::from_utf8(example.stdout).unwrap());
    let ok = check(&ex);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).ends_with(": ok\n"));

    let bad = file("bad.toml", "shards = 2\nlisen = \"127.0.0.1:1\"\n");
    let out = check(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":2: unknown key \"lisen\": did you mean listen?"),
        "{err}"
    );
    // The same file refused at start, before anything binds.
    let out = Command::new(GATEWAY)
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key \"lisen\""));
    // Values the file accepts but the configuration refuses name the flag.
    let zero = file("zero.toml", "outbound_budget_bytes = 0\n");
    let out = check(&zero);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--outbound-budget-bytes"));
}
