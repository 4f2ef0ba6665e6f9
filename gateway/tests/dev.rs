//! `--dev`: the demo page and its files, `/dev/token`, anonymous clients,
//! the `typing:` namespace and the address it listens on, against a
//! running gateway; and that none of it is there without `--dev`.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use clap::Parser;
use common::{chat::*, *};
use corecast_gateway::{Config, Server};
use serde_json::{json, Value};

fn get(server: &TestServer, target: &str) -> (u16, String, String) {
    http(
        server.addr,
        &format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n"),
    )
}

/// The value of header `name` in a response head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A file of the repository, as the gateway was built with it.
fn repo_file(path: &str) -> String {
    let full = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
}

/// A token from `/dev/token` for `user`.
fn dev_token(server: &TestServer, user: &str) -> Value {
    let (status, head, body) = get(server, &format!("/dev/token?user={user}"));
    assert_eq!(status, 200, "{head}\n{body}");
    assert_eq!(header(&head, "Content-Type"), Some("application/json"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn the_demo_page_is_served_only_in_dev_mode() {
    let dev = TestServer::start(&["--dev"]);
    let (status, head, page) = get(&dev, "/");
    assert_eq!(status, 200, "{head}");
    assert_eq!(
        header(&head, "Content-Type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(header(&head, "Cache-Control"), Some("no-store"));
    assert_eq!(page, repo_file("clients/demo/index.html"));
    assert!(page.to_ascii_lowercase().contains("<html"), "{page}");
    // The page loads the client, itself or through the script it loads.
    let (_, _, script) = get(&dev, "/app.js");
    assert!(
        page.contains("corecast.js")
            || (page.contains("/app.js") && script.contains("/corecast.js")),
        "neither the page nor its /app.js loads /corecast.js"
    );

    let plain = TestServer::start(&["--allow-anonymous"]);
    for target in [
        "/",
        "/app.js",
        "/app.css",
        "/corecast.js",
        "/dev/token?user=alice",
    ] {
        let (status, _, body) = get(&plain, target);
        assert_eq!(status, 404, "{target} without --dev");
        assert_eq!(
            body,
            "no such path (try /ws, /echo, /healthz, /readyz or /metrics)\n"
        );
    }
}

#[test]
fn the_pages_files_come_with_their_content_types() {
    let dev = TestServer::start(&["--dev"]);
    // (path, content type, the file)
    let cases = [
        (
            "/corecast.js",
            "text/javascript; charset=utf-8",
            "clients/js/src/index.js",
        ),
        (
            "/app.js",
            "text/javascript; charset=utf-8",
            "clients/demo/app.js",
        ),
        (
            "/app.css",
            "text/css; charset=utf-8",
            "clients/demo/app.css",
        ),
    ];
    for (path, content_type, file) in cases {
        let (status, head, body) = get(&dev, path);
        assert_eq!(status, 200, "{path}: {head}");
        assert_eq!(header(&head, "Content-Type"), Some(content_type), "{path}");
        assert_eq!(body, repo_file(file), "{path} is {file}");
    }
    // Other paths stay unknown, and the side doors are as ever.
    for path in ["/index.html", "/dev/", "/clients/demo/app.js", "/app.js/x"] {
        assert_eq!(get(&dev, path).0, 404, "{path}");
    }
    assert_eq!(get(&dev, "/healthz").2, "ok\n");
}

#[test]
fn a_dev_token_opens_ws_as_its_user() {
    let dev = TestServer::start(&["--dev"]);
    let before = unix_now();
    let t = dev_token(&dev, "alice");
    assert_eq!(t["user"], "alice");
    let exp = t["exp"].as_u64().unwrap();
    assert!(
        (before + 600..=unix_now() + 600).contains(&exp),
        "exp {exp}: ten minutes from now"
    );
    let mut alice = Chat::connect_raw(&dev, Some(t["token"].as_str().unwrap()));
    let w = alice.recv();
    assert_eq!(
        (w["type"].as_str(), w["user"].as_str()),
        (Some("welcome"), Some("alice")),
        "{w}"
    );
    // Any room: the token's rooms claim is "*".
    alice.join("lobby");
    // The same query with other parameters around it.
    let t = dev_token(&dev, "bob.b-2_x");
    let mut bob = Chat::connect_raw(&dev, Some(t["token"].as_str().unwrap()));
    assert_eq!(bob.recv()["user"], "bob.b-2_x");
    let (_, _, body) = get(&dev, "/dev/token?x=1&user=carol&y=2");
    let t: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(t["user"], "carol");
    // A token from a gateway with another (generated) secret is refused.
    let other = TestServer::start(&["--dev"]);
    let foreign = dev_token(&other, "mallory");
    let mut m = Chat::connect_raw(&dev, Some(foreign["token"].as_str().unwrap()));
    assert_eq!(m.close_code().0, 4002, "signed with another node's secret");
}

#[test]
fn a_bad_or_missing_user_is_refused() {
    let dev = TestServer::start(&["--dev"]);
    let long = format!("/dev/token?user={}", "a".repeat(33));
    for target in [
        "/dev/token",
        "/dev/token?",
        "/dev/token?user=",
        "/dev/token?name=alice",
        "/dev/token?user=al%20ice",
        "/dev/token?user=%61lice",
        "/dev/token?user=a/b",
        "/dev/token?user=a:b",
        long.as_str(),
    ] {
        let (status, head, body) = get(&dev, target);
        assert_eq!(status, 400, "{target}");
        assert_eq!(
            header(&head, "Content-Type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(
            body, "user must be 1-32 letters, digits, _ - or .\n",
            "{target}"
        );
    }
    let longest = format!("/dev/token?user={}", "a".repeat(32));
    assert_eq!(get(&dev, &longest).0, 200);
}

#[test]
fn dev_mode_lets_anonymous_clients_in_and_typing_is_ephemeral() {
    let dev = TestServer::start(&["--dev"]);
    let mut anon = Chat::connect_raw(&dev, None);
    let w = anon.recv();
    assert_eq!(w["type"], "welcome", "{w}");
    assert!(w["user"].as_str().unwrap().starts_with("anon-"), "{w}");
    let t = dev_token(&dev, "alice");
    let mut alice = Chat::connect_raw(&dev, Some(t["token"].as_str().unwrap()));
    alice.recv_type("welcome");
    for c in [&mut anon, &mut alice] {
        c.join("typing:x");
        c.join("x");
    }
    anon.send(json!({"type":"publish","room":"typing:x","id":"t1","body":{"typing":true}}));
    let ack = anon.recv_type("ack");
    assert_eq!(ack["stored"], json!(false), "{ack}");
    assert_eq!(alice.recv_type("msg")["room"], "typing:x");
    // No presence in typing: rooms: the count only.
    alice.send(json!({"type":"presence","room":"typing:x"}));
    let p = alice.recv_type("presence");
    assert_eq!(p["users"], Value::Null, "{p}");
    // Other rooms are stored as ever.
    anon.send(json!({"type":"publish","room":"x","id":"m1","body":"hi"}));
    assert_eq!(anon.recv_type("ack")["stored"], json!(true));

    // Without --dev the same publish is stored, and nobody gets in
    // without a token.
    let plain = chat_server(&[]);
    let mut alice = Chat::connect(&plain, "alice");
    alice.join("typing:x");
    alice.send(json!({"type":"publish","room":"typing:x","id":"t1","body":{"typing":true}}));
    assert_eq!(alice.recv_type("ack")["stored"], json!(true));
    let mut anon = Chat::connect_raw(&plain, None);
    anon.send(json!({"type":"join","room":"x"}));
    assert_eq!(anon.close_code().0, 4001);
}

#[test]
fn a_config_files_typing_namespace_wins_over_devs() {
    let dir = std::env::temp_dir().join(format!("corecast-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("corecast.toml");
    std::fs::write(&file, "[namespaces.\"typing:\"]\nmax_body_bytes = 64\n").unwrap();
    let dev = TestServer::start(&["--dev", "--config", file.to_str().unwrap()]);
    let mut anon = Chat::connect_raw(&dev, None);
    anon.recv_type("welcome");
    anon.join("typing:x");
    anon.send(json!({"type":"publish","room":"typing:x","id":"t1","body":"hi"}));
    assert_eq!(
        anon.recv_type("ack")["stored"],
        json!(true),
        "the file's: stored"
    );
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn dev_mode_with_a_listen_binds_it() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = addr.to_string();
    let config = Config::try_parse_from(["gateway", "--dev", "--listen", &listen]).unwrap();
    assert_eq!(config.listen(), addr);
    let dev = TestServer::start_bound(Server::bind(config).expect("bind"));
    assert_eq!(dev.addr, addr);
    assert_eq!(get(&dev, "/").0, 200);
    assert_eq!(dev_token(&dev, "alice")["user"], "alice");
}

/// The gateway binary with `args` and `env`: its log up to the line saying
/// where it listens (then it is stopped).
fn start_log(args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .env_remove("CORECAST_DEV")
        .env_remove("CORECAST_LISTEN")
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("the gateway binary starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|e| panic!("no listening line ({e}): {lines:#?}"));
        let done = line.contains("listening on");
        lines.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

#[test]
fn the_binary_warns_loudly_in_dev_mode() {
    let listen = format!("127.0.0.1:{}", free_port());
    for env in [&[][..], &[("CORECAST_DEV", "true")][..]] {
        let args: &[&str] = match env.is_empty() {
            true => &["--dev", "--listen", &listen],
            false => &["--listen", &listen],
        };
        let log = start_log(args, env);
        let warning = log
            .iter()
            .find(|l| l.contains("DEVELOPMENT MODE (--dev)"))
            .unwrap_or_else(|| panic!("no warning: {log:#?}"));
        assert!(warning.contains("WARN"), "{warning}");
        assert!(warning.contains("a generated token secret"), "{warning}");
        assert!(warning.contains(&format!("http://{listen}/")), "{warning}");
        assert!(warning.contains("not for production"), "{warning}");
        assert!(log.last().unwrap().contains(&listen), "{log:#?}");
    }
    let log = start_log(&["--listen", &listen, "--allow-anonymous"], &[]);
    assert!(
        !log.iter().any(|l| l.contains("DEVELOPMENT MODE")),
        "{log:#?}"
    );
}
