//! A fast path for the one frame a chat run receives by the million: `msg`.
//!
//! Parsing each delivery with serde was two thirds of loadgen's CPU in a
//! fan-out run, which made loadgen, not the server, the limit. `msg` reads a
//! compact JSON object (what corecast and the benchmark peer send) and takes
//! out what the run checks: room, seq and the body's `t`, `p`, `n`.
//!
//! # Invariants
//! - Never wrong, only sometimes unable: anything this scanner is not sure
//!   about (whitespace, an escape, a duplicate key, a value type it does not
//!   skip, a number serde would refuse or read differently) gives `None`,
//!   and the caller parses the frame with serde as before. What it returns
//!   is what serde would have read from the same bytes.
//! - Frames other than `msg` give `None` too: they are rare.
//! - Works on the bytes of a text message, which the codec has checked as
//!   UTF-8 already, and returns the strings it takes out as bytes: the run
//!   only compares them, so nothing is checked twice.

/// The fields of a `msg` frame a chat run checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg<'a> {
    pub room: Option<&'a [u8]>,
    pub seq: Option<u64>,
    pub body: Option<Body>,
}

/// A publish body's fields (loadgen's own publishes carry all three; serde
/// skips `pad`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub struct Body {
    pub t: Option<u64>,
    pub p: Option<u64>,
    pub n: Option<u64>,
}

/// Reads a compact `msg` frame; `None` for anything else, or anything
/// unusual (see the module's invariants).
pub fn msg(text: &[u8]) -> Option<Msg<'_>> {
    // No escapes and no control characters anywhere: then every string
    // ends at its next quote, and nothing outside strings is whitespace
    // but a space, which the structure refuses. One pass with no early
    // exit, which compiles to a vector loop.
    if text
        .iter()
        .fold(false, |bad, &c| bad | (c == b'\\') | (c < 0x20))
    {
        return None;
    }
    let mut c = Cursor { b: text, at: 0 };
    let mut kind = None;
    // Not returned (a run does not check a msg's id), but read like the
    // rest so that a frame with two ids goes to serde, which refuses it.
    let mut id = None;
    let mut m = Msg {
        room: None,
        seq: None,
        body: None,
    };
    c.object(|c, key| match key {
        b"type" => set(&mut kind, c.raw_str()?),
        b"room" => set(&mut m.room, c.raw_str()?),
        b"seq" => set(&mut m.seq, c.u64()?),
        b"id" => set(&mut id, c.raw_str()?),
        b"body" => set(&mut m.body, c.body()?),
        _ => c.skip_value(),
    })?;
    (c.at == text.len() && kind == Some(&b"msg"[..])).then_some(m)
}

/// Records a field once: a key seen twice is for serde to judge.
fn set<T>(slot: &mut Option<T>, v: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(v);
    Some(())
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// `{"k":v,...}` with no whitespace; `field` reads each value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let key = self.raw_str()?;
            self.eat(b':')?;
            field(self, key)?;
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A string's bytes (`msg` made sure there is no escape in the text).
    fn raw_str(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let rest = &self.b[self.at..];
        // Most strings here are a few bytes: a plain loop finds their end
        // sooner than memchr's setup; the padding goes to memchr.
        let head = rest.len().min(16);
        let len = match rest[..head].iter().position(|&c| c == b'"') {
            Some(i) => i,
            None => head + memchr::memchr(b'"', &rest[head..])?,
        };
        self.at += len + 1;
        Some(&rest[..len])
    }

    /// A non-negative integer as JSON writes it (no leading zero, no
    /// fraction or exponent) that fits in a u64.
    fn u64(&mut self) -> Option<u64> {
        let rest = &self.b[self.at..];
        let mut v: u64 = 0;
        let mut len = 0;
        while let Some(&d) = rest.get(len).filter(|d| d.is_ascii_digit()) {
            v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            len += 1;
        }
        if len == 0 || (len > 1 && rest[0] == b'0') {
            return None;
        }
        if matches!(rest.get(len), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        self.at += len;
        Some(v)
    }

    fn body(&mut self) -> Option<Body> {
        let mut body = Body::default();
        self.object(|c, key| match key {
            b"t" => set(&mut body.t, c.u64()?),
            b"p" => set(&mut body.p, c.u64()?),
            b"n" => set(&mut body.n, c.u64()?),
            _ => c.skip_value(),
        })?;
        Some(body)
    }

    /// Skips a string or a non-negative integer; anything else is `None`.
    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.raw_str().map(drop),
            b'0'..=b'9' => self.u64().map(drop),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What serde reads from the same bytes, in the same shape.
    fn serde_view(text: &str) -> Option<Msg<'_>> {
        #[derive(serde::Deserialize)]
        struct M<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            room: Option<&'a str>,
            seq: Option<u64>,
            /// Unused, but there: as in the run's own struct, two ids
            /// make serde refuse the frame.
            #[serde(rename = "id")]
            _id: Option<&'a str>,
            body: Option<Body>,
        }
        let m: M = serde_json::from_str(text).ok()?;
        (m.kind == "msg").then_some(Msg {
            room: m.room.map(str::as_bytes),
            seq: m.seq,
            body: m.body,
        })
    }

    const FRAME: &str = r#"{"type":"msg","room":"lg-3","seq":42,"from":"anon-7","id":"r0.3-17","ts":1764230000000,"body":{"t":123456789,"p":31,"n":17,"pad":"xxxxxxxx"}}"#;

    #[test]
    fn reads_what_serde_reads_from_a_server_frame() {
        let m = msg(FRAME.as_bytes()).expect("the fast path takes it");
        assert_eq!(Some(m), serde_view(FRAME));
        assert_eq!(
            (m.room, m.seq, m.body.and_then(|b| b.n)),
            (Some(&b"lg-3"[..]), Some(42), Some(17))
        );
    }

    #[test]
    fn takes_any_key_order_and_foreign_bodies() {
        for f in [
            r#"{"seq":1,"body":{"pad":"","n":2},"room":"a","type":"msg"}"#,
            r#"{"type":"msg","room":"a","seq":18446744073709551615,"body":{}}"#,
            r#"{"type":"msg","room":"a","seq":0,"body":{"x":"y","t":5}}"#,
            r#"{"type":"msg"}"#,
        ] {
            assert!(msg(f.as_bytes()).is_some(), "{f}");
            assert_eq!(msg(f.as_bytes()), serde_view(f), "{f}");
        }
    }

    /// Each is either refused (serde decides) or read exactly as serde does.
    #[test]
    fn leaves_anything_unusual_to_serde() {
        let refused = [
            // Not a msg, or not only one.
            r#"{"type":"ack","id":"a-1","room":"a","seq":1,"stored":true}"#,
            r#"{"type":"msg","room":"a","seq":1}x"#,
            r#"{"type":"msg","room":"a","seq":1"#,
            "",
            // Whitespace, escapes, control characters.
            r#"{ "type":"msg","room":"a","seq":1}"#,
            r#"{"type":"msg","room":"a\"b","seq":1}"#,
            r#"{"type":"m\u0073g","room":"a","seq":1}"#,
            "{\"type\":\"msg\",\"room\":\"a\tb\",\"seq\":1}",
            // Numbers serde refuses or reads another way.
            r#"{"type":"msg","room":"a","seq":01}"#,
            r#"{"type":"msg","room":"a","seq":1.0}"#,
            r#"{"type":"msg","room":"a","seq":1e3}"#,
            r#"{"type":"msg","room":"a","seq":-1}"#,
            r#"{"type":"msg","room":"a","seq":18446744073709551616}"#,
            // Values it does not skip, duplicate keys.
            r#"{"type":"msg","room":"a","seq":1,"x":null}"#,
            r#"{"type":"msg","room":"a","seq":1,"body":{"pad":[1]}}"#,
            r#"{"type":"msg","room":"a","seq":1,"seq":2}"#,
            r#"{"type":"msg","room":"a","seq":1,"id":"x","id":"y"}"#,
            r#"{"type":"msg","room":"a","seq":1,"body":{"n":1,"n":2}}"#,
            r#"{"type":"msg","room":"a","seq":"1"}"#,
        ];
        for f in refused {
            assert_eq!(msg(f.as_bytes()), None, "{f}");
        }
        // Characters beyond ASCII are read whole.
        let f = r#"{"type":"msg","room":"ré","seq":1,"body":{"pad":"ü€"}}"#;
        assert_eq!(
            msg(f.as_bytes()).and_then(|m| m.room),
            Some("ré".as_bytes())
        );
    }

    /// Every prefix of a real frame, and every single-byte change to it:
    /// the scanner never reads something serde would not.
    #[test]
    fn agrees_with_serde_on_every_mangled_frame() {
        for end in 0..FRAME.len() {
            if let Some(m) = msg(&FRAME.as_bytes()[..end]) {
                panic!("a cut frame was read: {m:?}");
            }
        }
        for i in 0..FRAME.len() {
            for b in [' ', '"', '\\', '0', '9', '{', '}', ',', ':', 'a', '\t'] {
                let mut g = FRAME.to_string();
                g.replace_range(i..i + 1, b.encode_utf8(&mut [0; 4]));
                if let Some(m) = msg(g.as_bytes()) {
                    assert_eq!(Some(m), serde_view(&g), "{g}");
                }
            }
        }
    }
}
