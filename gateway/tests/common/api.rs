//! The server API called with curl: an HTTP client independent of the
//! gateway's own code.

use std::{net::SocketAddr, process::Command};

use serde_json::Value;

/// The key the API tests start gateways with.
pub const KEY: &str = "test-api-key-0123456789";

/// The flags that serve the API on a free loopback port with [`KEY`].
pub fn flags() -> [&'static str; 4] {
    ["--api-listen", "127.0.0.1:0", "--api-key", KEY]
}

/// POSTs `body` to `path` with `Authorization: apikey KEY`; the status and
/// the JSON answer.
pub fn call(api: SocketAddr, path: &str, body: &str) -> (u16, Value) {
    call_with(
        api,
        &["-H", &format!("Authorization: apikey {KEY}")],
        path,
        body,
    )
}

/// A call with the given curl arguments instead of the key (other headers,
/// another method).
pub fn call_with(api: SocketAddr, args: &[&str], path: &str, body: &str) -> (u16, Value) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
        .args(["-X", "POST", "-H", "Content-Type: application/json"])
        .args(args)
        .args(["--data-binary", "@-"])
        .arg(format!("http://{api}{path}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(body.as_bytes())?;
            child.wait_with_output()
        })
        .expect("curl runs (scripts/deps.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (json, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status: u16 = status.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {path}: no status in {text:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let v = serde_json::from_str(json).unwrap_or(Value::Null);
    (status, v)
}

/// A call that must succeed: its answer.
pub fn ok(api: SocketAddr, path: &str, body: &str) -> Value {
    let (status, v) = call(api, path, body);
    assert_eq!(status, 200, "{path} {body}: {v}");
    v
}

/// A call that must fail with `status`: the error's code.
pub fn refused(api: SocketAddr, path: &str, body: &str, status: u16) -> String {
    let (got, v) = call(api, path, body);
    assert_eq!(got, status, "{path} {body}: {v}");
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    e["code"].as_str().unwrap().to_string()
}
