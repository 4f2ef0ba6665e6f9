//! RS256 and ES256 tokens end to end: keys and tokens made by
//! `scripts/jwt-keys.py` (Python `cryptography`), checked by a running
//! gateway over `/ws`, and the key files reloaded while it runs.

mod common;

use std::{path::PathBuf, process::Command};

use common::{chat::*, *};
use serde_json::json;

fn python() -> String {
    std::env::var("CORECAST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn script(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/jwt-keys.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs (scripts/deps.sh installs cryptography)");
    assert!(
        out.status.success(),
        "jwt-keys.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A fresh directory of keys whose kids are `rsa-<tag>` and `ec-<tag>`.
fn keys(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("corecast-jwt-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (rsa, ec) = (format!("rsa-{tag}"), format!("ec-{tag}"));
    script(&[
        "keys",
        dir.to_str().unwrap(),
        "--kid-rsa",
        &rsa,
        "--kid-ec",
        &ec,
    ]);
    dir
}

fn sign(dir: &std::path::Path, alg: &str, sub: &str, extra: &[&str]) -> String {
    let mut args = vec!["sign", dir.to_str().unwrap(), alg, sub];
    args.extend_from_slice(extra);
    script(&args)
}

fn welcome(server: &TestServer, token: &str) -> Option<String> {
    let mut c = Chat::connect_raw(server, Some(token));
    let v = c.recv_or_close();
    v.ok()
        .map(|v| v["user"].as_str().unwrap_or_default().to_string())
}

#[test]
fn rs256_and_es256_tokens_from_a_jwks_are_accepted_and_a_reload_swaps_the_keys() {
    let first = keys("a");
    let jwks = first.join("jwks.json");
    let server = bind(&["--jwt-jwks", jwks.to_str().unwrap(), "--jwt-secret", SECRET]);
    let files = server.key_files().expect("key files");
    let server = TestServer::start_bound(server);

    let rs = sign(&first, "RS256", "rosa", &["--kid", "rsa-a"]);
    let es = sign(&first, "ES256", "emil", &["--kid", "ec-a"]);
    assert_eq!(welcome(&server, &rs).as_deref(), Some("rosa"));
    assert_eq!(welcome(&server, &es).as_deref(), Some("emil"));
    assert_eq!(
        welcome(&server, &token("hana")).as_deref(),
        Some("hana"),
        "HS256 too"
    );
    let refused = [
        (
            sign(&first, "ES256", "x", &["--kid", "ec-a", "--tamper"]),
            4002,
            "signature",
        ),
        (
            sign(&first, "RS256", "x", &["--kid", "rsa-zzz"]),
            4002,
            "unknown key",
        ),
        // An RS256 token claiming the EC key's kid finds no RSA key by that name.
        (
            sign(&first, "RS256", "x", &["--kid", "ec-a"]),
            4002,
            "unknown key",
        ),
    ];
    for (t, code, says) in &refused {
        let mut c = Chat::connect_raw(&server, Some(t));
        let (got, reason) = c.close_code();
        assert_eq!((got, reason.contains(says)), (*code, true), "{reason}");
    }
    assert!(server.metric("corecast_auth_failures_total", "reason=\"unknown_key\"") >= 2);

    // A connection made with the old key; then the issuer rotates.
    let mut old = Chat::connect_raw(&server, Some(&rs));
    assert_eq!(old.recv()["type"], "welcome");
    let second = keys("b");
    std::fs::copy(second.join("jwks.json"), &jwks).unwrap();
    assert_eq!(files.reload(), Ok(2));
    let rs_new = sign(&second, "RS256", "rosa", &["--kid", "rsa-b"]);
    assert_eq!(welcome(&server, &rs_new).as_deref(), Some("rosa"));
    let mut c = Chat::connect_raw(&server, Some(&rs));
    assert_eq!(c.close_code().0, 4002, "the old key is gone");
    assert_eq!(old.join("still-here"), 0, "connections made before stay");

    // A broken file on reload: the error says which, the keys stay.
    std::fs::write(&jwks, "{\"keys\": [").unwrap();
    let err = files.reload().unwrap_err();
    assert!(
        err.contains("--jwt-jwks") && err.contains("jwks.json"),
        "{err}"
    );
    assert_eq!(welcome(&server, &rs_new).as_deref(), Some("rosa"));
    old.send(json!({"type":"leave","room":"still-here"}));
    assert_eq!(old.recv_type("left")["room"], "still-here");
}

#[test]
fn a_pem_public_key_accepts_tokens_with_or_without_kid() {
    let dir = keys("pem");
    let pem = dir.join("ec.pub.pem");
    let server = TestServer::start(&["--jwt-public-key", pem.to_str().unwrap()]);
    let bare = sign(&dir, "ES256", "nia", &[]);
    let named = sign(&dir, "ES256", "nia", &["--kid", "whatever"]);
    assert_eq!(welcome(&server, &bare).as_deref(), Some("nia"));
    assert_eq!(welcome(&server, &named).as_deref(), Some("nia"));
    // Without --jwt-secret an HS256 token is an algorithm this node has no key for.
    let mut c = Chat::connect_raw(&server, Some(&token("hana")));
    let (code, reason) = c.close_code();
    assert_eq!(code, 4002, "{reason}");
    assert!(reason.contains("algorithm"), "{reason}");
}

#[test]
fn key_files_that_do_not_load_stop_the_start_by_name() {
    use clap::Parser;
    let dir = keys("bad");
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let cases = [
        (
            "--jwt-jwks",
            "/nonexistent/jwks.json".to_string(),
            "cannot read it",
        ),
        ("--jwt-public-key", path("rsa.key"), "private key"),
        ("--jwt-jwks", path("rsa.pub.pem"), "not a JWKS"),
    ];
    for (flag, file, says) in cases {
        let argv = ["gateway", flag, &file];
        let config = corecast_gateway::Config::try_parse_from(argv).expect("parses");
        let err = config.validate().expect_err("refused").to_string();
        assert!(
            err.contains(flag) && err.contains(&file) && err.contains(says),
            "{err}"
        );
    }
}

#[test]
fn sighup_reloads_the_key_files_of_a_running_gateway() {
    let dir = keys("hup");
    let jwks = dir.join("jwks.json");
    let gw = Logged::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--shards",
        "1",
        "--jwt-jwks",
        jwks.to_str().unwrap(),
    ]);
    gw.wait_for("shards serving");
    gw.signal("HUP");
    gw.wait_for("SIGHUP: token keys reloaded (2 keys)");
    std::fs::write(&jwks, "not json").unwrap();
    gw.signal("HUP");
    let line = gw.wait_for("the old token keys stay in use");
    assert!(line.contains("--jwt-jwks"), "{line}");
    assert!(gw.stop(), "a clean stop after the reloads");
}
