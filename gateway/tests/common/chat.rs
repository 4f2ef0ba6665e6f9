//! The chat client the integration tests share: tungstenite speaking
//! `corecast.v1`, with tokens minted from the test secret.

use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use corecast_gateway::auth::{mint, Claims};
use serde_json::{json, Value};
use tungstenite::{client::IntoClientRequest, Message};

use super::{Client, TestServer};

pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";

pub fn token(sub: &str) -> String {
    token_with(Claims {
        sub: sub.into(),
        ..Default::default()
    })
}

pub fn token_with(claims: Claims) -> String {
    mint(SECRET.as_bytes(), &claims)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn chat_server(extra: &[&str]) -> TestServer {
    let mut args = vec!["--jwt-secret", SECRET];
    args.extend_from_slice(extra);
    TestServer::start(&args)
}

pub struct Chat {
    pub ws: Client,
    pub user: String,
}

impl Chat {
    /// Connects with `?token=` and waits for the welcome.
    pub fn connect(server: &TestServer, user: &str) -> Chat {
        let mut c = Chat::connect_raw(server, Some(&token(user)));
        let w = c.recv();
        assert_eq!(w["type"], "welcome", "{w}");
        c.user = w["user"].as_str().unwrap().to_string();
        c
    }

    pub fn connect_raw(server: &TestServer, token: Option<&str>) -> Chat {
        Chat::connect_addr_raw(server.addr, token)
    }

    /// Connects to the gateway at `addr` (e.g. one node of a cluster).
    pub fn connect_addr(addr: SocketAddr, user: &str) -> std::io::Result<Chat> {
        // Refused connections are for the caller to handle (a dead node).
        TcpStream::connect(addr)?;
        let mut c = Chat::connect_addr_raw(addr, Some(&token(user)));
        let w = c.recv();
        assert_eq!(w["type"], "welcome", "{w}");
        c.user = w["user"].as_str().unwrap().to_string();
        Ok(c)
    }

    pub fn connect_addr_raw(addr: SocketAddr, token: Option<&str>) -> Chat {
        let url = match token {
            Some(t) => format!("ws://{addr}/ws?token={t}"),
            None => format!("ws://{addr}/ws"),
        };
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "corecast.v1".parse().unwrap());
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (ws, resp) = tungstenite::client(req, stream).expect("handshake");
        assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], "corecast.v1");
        Chat {
            ws,
            user: String::new(),
        }
    }

    pub fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }

    /// The next JSON frame.
    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read().expect("a frame") {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// The next frame of `kind`, skipping others (e.g. presence events).
    pub fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv();
            if v["type"] == kind {
                return v;
            }
        }
    }

    pub fn join(&mut self, room: &str) -> u64 {
        self.send(json!({"type":"join","room":room}));
        let j = self.recv_type("joined");
        assert_eq!(j["room"], room);
        j["seq"].as_u64().unwrap()
    }

    /// The next JSON frame, or the close code and reason if the server
    /// closes instead.
    pub fn recv_or_close(&mut self) -> Result<Value, (u16, String)> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return Ok(serde_json::from_str(&t).unwrap()),
                Ok(Message::Close(Some(f))) => return Err((f.code.into(), f.reason.to_string())),
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// The close code and reason the server ends the connection with.
    pub fn close_code(&mut self) -> (u16, String) {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(f))) => return (f.code.into(), f.reason.to_string()),
                Ok(Message::Close(None)) => panic!("close without code"),
                Ok(_) => continue,
                Err(e) => panic!("no close frame: {e}"),
            }
        }
    }
}
