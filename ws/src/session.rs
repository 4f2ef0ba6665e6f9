//! The session rules of RFC 6455 for either end, sans-IO: which frames make
//! a message (§5.4), which replies the protocol obliges (a pong for a ping,
//! §5.5.2; a close for a close, §5.5.1), and where the closing handshake
//! stands (§7). The caller owns the socket and the buffers: it hands the
//! session its input and sends the replies the session returns as data.
//!
//! # Invariants
//! - Input starts at a frame boundary (the [`Decoder`]'s contract). One
//!   [`Session::read`] returns at most one event, passing over the frames
//!   before it that mean nothing alone; the caller drops [`Step::consumed`]
//!   bytes once it is done with the step.
//! - A message in one frame is handed out as a borrow of the input (no
//!   copy); one in fragments is reassembled in the session's buffer, which
//!   the decoder's `max_message_bytes` bounds. An idle session holds no
//!   buffer: one that grew past [`KEEP_REASSEMBLY_BYTES`] is freed after its
//!   message.
//! - At most one close frame leaves this end: the reply to the peer's close,
//!   a failure's close or [`Session::close`], whichever comes first.
//! - After this end's close frame, data frames are discarded and pings get
//!   no pong (nothing but the peer's close is awaited). After the peer's
//!   close frame or a protocol error, nothing more is read.
//! - No randomness: a client's masking keys come from the caller, one per
//!   frame, at [`Reply::encode`].

use crate::{
    close,
    frame::{encode_close, encode_frame, Decoder, Limits, OpCode, ProtocolError, Role},
};

/// A reassembly buffer that grew past this is freed after its message
/// rather than kept for the next one.
pub const KEEP_REASSEMBLY_BYTES: usize = 16 * 1024;

/// Where the closing handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Messages flow both ways.
    Open,
    /// This end sent its close frame and awaits the peer's.
    CloseSent,
    /// Both close frames are out (ours may still be in the caller's send
    /// buffer): flush, then close TCP.
    Closed,
    /// A protocol error: a close frame with its code was returned (if none
    /// had gone out), and the input is unusable.
    Failed,
}

/// What one frame meant.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole data message; `opcode` is `Text` (valid UTF-8, checked) or
    /// `Binary`.
    Message {
        opcode: OpCode,
        data: &'a [u8],
    },
    /// A ping; the pong, if one is owed, is the step's reply.
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// The peer's close frame (`code` is `None` for an empty one). If this
    /// end had not sent its close yet, the echo is the step's reply; either
    /// way the handshake is complete.
    Close {
        code: Option<u16>,
        reason: &'a str,
    },
}

/// A frame this end must send, as data; [`Reply::encode`] writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<'a> {
    kind: ReplyKind<'a>,
    role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ReplyKind<'a> {
    Pong(&'a [u8]),
    Ping(&'a [u8]),
    Close { code: Option<u16>, reason: &'a str },
}

impl Reply<'_> {
    /// Appends the frame to `out`. A client passes a fresh masking key for
    /// every frame (§5.3); a server passes `None`.
    pub fn encode(&self, out: &mut Vec<u8>, mask: Option<[u8; 4]>) {
        debug_assert_eq!(mask.is_some(), self.role == Role::Client);
        match self.kind {
            ReplyKind::Pong(payload) => encode_frame(out, true, OpCode::Pong, payload, mask),
            ReplyKind::Ping(payload) => encode_frame(out, true, OpCode::Ping, payload, mask),
            ReplyKind::Close { code, reason } => encode_close(out, code, reason, mask),
        }
    }
}

/// The outcome of one decoded frame.
#[derive(Debug)]
pub struct Step<'a> {
    /// Input bytes the step took: its frame, and the frames before it that
    /// were passed over.
    pub consumed: usize,
    /// Frames the step took (its own and those passed over).
    pub frames: u32,
    /// What the frame meant; `None` when the step only passed over frames
    /// (fragments that do not end their message, data after this end's
    /// close) and the rest of the input is incomplete.
    pub event: Option<Event<'a>>,
    /// A frame the protocol obliges this end to send now.
    pub reply: Option<Reply<'a>>,
}

/// A broken framing rule: the connection is failed (§7.1.7).
#[derive(Debug)]
pub struct Failure {
    pub error: ProtocolError,
    /// The close frame to send, unless one went out already.
    pub reply: Option<Reply<'static>>,
}

/// One end of one WebSocket connection.
#[derive(Debug)]
pub struct Session {
    decoder: Decoder,
    role: Role,
    state: State,
    /// Payload of the fragmented message being reassembled.
    fragments: Vec<u8>,
    /// `fragments` holds a message the last read handed out.
    handed_out: bool,
    /// Pongs returned since the caller last said its send buffer drained.
    pongs_unflushed: u8,
    /// Past this many, pings go unanswered until [`Session::flushed`]
    /// (§5.5.3 lets an endpoint answer only the latest ping). `u8::MAX`:
    /// every ping is answered.
    pong_limit: u8,
}

impl Session {
    pub fn new(role: Role, limits: Limits) -> Session {
        Session {
            decoder: Decoder::new(role, limits),
            role,
            state: State::Open,
            fragments: Vec::new(),
            handed_out: false,
            pongs_unflushed: 0,
            pong_limit: u8::MAX,
        }
    }

    /// Answers at most `n` pings between two [`Session::flushed`] calls,
    /// which bounds the send buffer against a peer that pings but does not
    /// read. Without it every ping gets its pong.
    pub fn with_pong_limit(mut self, n: u8) -> Session {
        self.pong_limit = n;
        self
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Whether reading is over: both close frames were exchanged, or the
    /// connection failed.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Closed | State::Failed)
    }

    /// The kind (`Text` or `Binary`) of a fragmented message in progress,
    /// known from its first frame.
    pub fn message_in_progress(&self) -> Option<OpCode> {
        self.decoder.message_in_progress()
    }

    /// Bytes the frame in progress needs in all, once its header is known.
    pub fn frame_len_hint(&self) -> Option<usize> {
        self.decoder.frame_len_hint()
    }

    /// The caller's send buffer drained: pings get pongs again.
    pub fn flushed(&mut self) {
        self.pongs_unflushed = 0;
    }

    /// Starts the closing handshake from this end. `None` if a close frame
    /// already went out (or the session failed).
    pub fn close<'r>(&mut self, code: u16, reason: &'r str) -> Option<Reply<'r>> {
        if self.state != State::Open {
            return None;
        }
        self.state = State::CloseSent;
        self.release_fragments();
        Some(self.reply(ReplyKind::Close {
            code: Some(code),
            reason,
        }))
    }

    /// A ping of this end's own (a keep-alive), if the session is open.
    pub fn ping<'p>(&self, payload: &'p [u8]) -> Option<Reply<'p>> {
        self.is_open().then(|| self.reply(ReplyKind::Ping(payload)))
    }

    /// Decodes and handles the next frame of `input` that means something
    /// by itself, passing over the ones that do not (a fragment that does
    /// not end its message; data after this end's close). `Ok(None)`:
    /// nothing was consumed and more bytes are needed (pass the same bytes
    /// again with more appended), or reading is over ([`Session::is_done`];
    /// discard the input). A step without an event consumed frames that
    /// were passed over, and the rest of the input is incomplete.
    pub fn read<'a>(&'a mut self, input: &'a mut [u8]) -> Result<Option<Step<'a>>, Failure> {
        if self.is_done() {
            return Ok(None);
        }
        if self.handed_out {
            self.handed_out = false;
            self.release_fragments();
        }
        let mut at = 0;
        let mut frames = 0;
        // Each turn either returns a step or consumes a frame that is
        // passed over; every borrow of `input` or `fragments` that a step
        // carries is taken on the way out.
        loop {
            let frame = match self.decoder.decode(&mut input[at..]) {
                Ok(Some(frame)) => frame,
                Ok(None) if at == 0 => return Ok(None),
                Ok(None) => {
                    return Ok(Some(Step {
                        consumed: at,
                        frames,
                        event: None,
                        reply: None,
                    }))
                }
                Err(error) => return Err(self.fail(error)),
            };
            let payload = frame.payload.start + at..frame.payload.end + at;
            at += frame.consumed;
            frames += 1;
            let mut step = Step {
                consumed: at,
                frames,
                event: None,
                reply: None,
            };
            match frame.opcode {
                OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                    if self.state != State::Open {
                        continue; // After our close, data is discarded.
                    }
                    if frame.fin && frame.opcode != OpCode::Continuation {
                        step.event = Some(Event::Message {
                            opcode: frame.opcode,
                            data: &input[payload],
                        });
                        return Ok(Some(step));
                    }
                    self.fragments.extend_from_slice(&input[payload]);
                    if !frame.fin {
                        continue;
                    }
                    self.handed_out = true;
                    step.event = Some(Event::Message {
                        opcode: frame.message,
                        data: &self.fragments,
                    });
                }
                OpCode::Ping => {
                    let payload = &input[payload];
                    if self.state == State::Open && self.pongs_unflushed < self.pong_limit {
                        if self.pong_limit != u8::MAX {
                            self.pongs_unflushed += 1;
                        }
                        step.reply = Some(self.reply(ReplyKind::Pong(payload)));
                    }
                    step.event = Some(Event::Ping(payload));
                }
                OpCode::Pong => step.event = Some(Event::Pong(&input[payload])),
                OpCode::Close => {
                    // The decoder checked the payload: empty, or a valid
                    // code and a UTF-8 reason.
                    let (code, reason) = match close::parse_close(&input[payload]) {
                        Ok(Some(c)) => (Some(c.code), c.reason),
                        _ => (None, ""),
                    };
                    if self.state == State::Open {
                        // Echo the code, as §5.5.1 suggests; no reason.
                        step.reply = Some(self.reply(ReplyKind::Close { code, reason: "" }));
                    }
                    self.state = State::Closed;
                    self.release_fragments();
                    step.event = Some(Event::Close { code, reason });
                }
            }
            return Ok(Some(step));
        }
    }

    fn fail(&mut self, error: ProtocolError) -> Failure {
        let reply = (self.state == State::Open).then(|| {
            self.reply(ReplyKind::Close {
                code: Some(error.close_code()),
                reason: error.reason(),
            })
        });
        self.state = State::Failed;
        self.release_fragments();
        Failure { error, reply }
    }

    fn reply<'r>(&self, kind: ReplyKind<'r>) -> Reply<'r> {
        Reply {
            kind,
            role: self.role,
        }
    }

    fn release_fragments(&mut self) {
        if self.fragments.capacity() > KEEP_REASSEMBLY_BYTES || !self.is_open() {
            self.fragments = Vec::new();
        } else {
            self.fragments.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_frame;

    const LIMITS: Limits = Limits {
        max_frame_bytes: 1 << 20,
        max_message_bytes: 1 << 20,
    };
    const KEY: [u8; 4] = [1, 2, 3, 4];

    /// A frame as the peer of `role` sends it: masked when it comes from a
    /// client.
    fn from_peer(of: Role, fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mask = (of == Role::Server).then_some(KEY);
        encode_frame(&mut out, fin, opcode, payload, mask);
        out
    }

    fn close_from_peer(of: Role, code: u16, reason: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode_close(
            &mut out,
            Some(code),
            reason,
            (of == Role::Server).then_some(KEY),
        );
        out
    }

    /// What one end does with a byte stream: the events (as text) and the
    /// replies it sends (decoded by a peer), in order.
    fn run(role: Role, session: &mut Session, input: &[u8]) -> (Vec<String>, Vec<String>) {
        let mut buf = input.to_vec();
        let mut events = Vec::new();
        let mut sent = Vec::new();
        loop {
            let step = match session.read(&mut buf) {
                Ok(Some(step)) => step,
                Ok(None) => break,
                Err(f) => {
                    events.push(format!("failed {}", f.error.close_code()));
                    if let Some(r) = f.reply {
                        r.encode(&mut sent, (role == Role::Client).then_some(KEY));
                    }
                    break;
                }
            };
            if let Some(r) = &step.reply {
                r.encode(&mut sent, (role == Role::Client).then_some(KEY));
            }
            events.push(step.event.map_or("-".to_string(), describe));
            let n = step.consumed;
            buf.drain(..n);
        }
        (events, decode_sent(role, &sent))
    }

    fn describe(e: Event<'_>) -> String {
        match e {
            Event::Message { opcode, data } => {
                format!("{opcode:?} {}", String::from_utf8_lossy(data))
            }
            Event::Ping(p) => format!("ping {}", String::from_utf8_lossy(p)),
            Event::Pong(p) => format!("pong {}", String::from_utf8_lossy(p)),
            Event::Close { code, reason } => format!("close {code:?} {reason}"),
        }
    }

    /// Reads what this end sent as its peer would.
    fn decode_sent(role: Role, sent: &[u8]) -> Vec<String> {
        let peer = match role {
            Role::Server => Role::Client,
            Role::Client => Role::Server,
        };
        let mut d = Decoder::new(peer, LIMITS);
        let mut buf = sent.to_vec();
        let mut out = Vec::new();
        while let Ok(Some(f)) = d.decode(&mut buf) {
            let p = &buf[f.payload.clone()];
            out.push(match f.opcode {
                OpCode::Close => match close::parse_close(p) {
                    Ok(Some(c)) => format!("close {} {}", c.code, c.reason),
                    _ => "close".to_string(),
                },
                op => format!("{op:?} {}", String::from_utf8_lossy(p)),
            });
            let n = f.consumed;
            buf.drain(..n);
        }
        out
    }

    fn cat(frames: &[Vec<u8>]) -> Vec<u8> {
        frames.concat()
    }

    #[test]
    fn the_rules_hold_for_both_roles() {
        use OpCode::*;
        for role in [Role::Server, Role::Client] {
            let f = |fin, op, p: &str| from_peer(role, fin, op, p.as_bytes());
            // (input, events, replies)
            let cases: Vec<(Vec<u8>, Vec<&str>, Vec<&str>)> = vec![
                (f(true, Text, "hi"), vec!["Text hi"], vec![]),
                (f(true, Binary, "b"), vec!["Binary b"], vec![]),
                // A ping between fragments is answered at once; the message
                // is whole at its last fragment.
                (
                    cat(&[
                        f(false, Text, "he"),
                        f(true, Ping, "p"),
                        f(false, Continuation, "ll"),
                        f(true, Continuation, "o"),
                    ]),
                    vec!["ping p", "Text hello"],
                    vec!["Pong p"],
                ),
                (f(true, Pong, "x"), vec!["pong x"], vec![]),
                // The peer's close is echoed with its code and no reason;
                // nothing after it is read.
                (
                    cat(&[close_from_peer(role, 4000, "bye"), f(true, Text, "late")]),
                    vec!["close Some(4000) bye"],
                    vec!["close 4000 "],
                ),
                // An empty close is echoed empty.
                (f(true, Close, ""), vec!["close None "], vec!["close"]),
                // A continuation with nothing to continue fails with 1002.
                (
                    f(true, Continuation, "x"),
                    vec!["failed 1002"],
                    vec!["close 1002 unexpected continuation frame"],
                ),
                // Invalid UTF-8 in a text message fails with 1007.
                (
                    from_peer(role, true, Text, &[0xff, 0xfe]),
                    vec!["failed 1007"],
                    vec!["close 1007 invalid UTF-8 in text message"],
                ),
            ];
            for (input, events, replies) in cases {
                let mut s = Session::new(role, LIMITS);
                let (got_events, got_replies) = run(role, &mut s, &input);
                assert_eq!(got_events, events, "{role:?} events");
                assert_eq!(got_replies, replies, "{role:?} replies");
            }
        }
    }

    /// Feeds `input` one byte at a time, as a slow socket would, and
    /// returns the events.
    fn run_bytewise(session: &mut Session, input: &[u8]) -> Vec<String> {
        let mut buf = Vec::new();
        let mut events = Vec::new();
        for &b in input {
            buf.push(b);
            while let Ok(Some(step)) = session.read(&mut buf) {
                if let Some(e) = step.event {
                    events.push(describe(e));
                }
                let n = step.consumed;
                buf.drain(..n);
            }
        }
        events
    }

    #[test]
    fn input_in_any_pieces_gives_the_same_events() {
        let input = cat(&[
            from_peer(Role::Server, false, OpCode::Text, b"frag"),
            from_peer(Role::Server, true, OpCode::Ping, b"p"),
            from_peer(Role::Server, false, OpCode::Continuation, b"men"),
            from_peer(Role::Server, true, OpCode::Continuation, b"ted"),
            from_peer(Role::Server, true, OpCode::Binary, b"bin"),
            close_from_peer(Role::Server, 1000, "done"),
        ]);
        let expected = [
            "ping p",
            "Text fragmented",
            "Binary bin",
            "close Some(1000) done",
        ];
        let mut whole = Session::new(Role::Server, LIMITS);
        assert_eq!(run(Role::Server, &mut whole, &input).0, expected);
        let mut slow = Session::new(Role::Server, LIMITS);
        assert_eq!(run_bytewise(&mut slow, &input), expected);
        assert_eq!(slow.state(), State::Closed);
    }

    #[test]
    fn after_our_close_data_is_discarded_and_the_peers_close_completes() {
        for role in [Role::Server, Role::Client] {
            let mut s = Session::new(role, LIMITS);
            let mut sent = Vec::new();
            let mask = (role == Role::Client).then_some(KEY);
            s.close(1001, "going away").unwrap().encode(&mut sent, mask);
            assert_eq!(s.state(), State::CloseSent);
            assert!(s.close(1000, "again").is_none(), "one close frame only");
            assert!(s.ping(b"").is_none());
            let input = cat(&[
                from_peer(role, true, OpCode::Text, b"in flight"),
                from_peer(role, true, OpCode::Ping, b"p"),
                close_from_peer(role, 1001, ""),
            ]);
            let (events, replies) = run(role, &mut s, &input);
            assert_eq!(events, ["ping p", "close Some(1001) "]);
            assert!(replies.is_empty(), "no pong, no second close: {replies:?}");
            assert_eq!(decode_sent(role, &sent), ["close 1001 going away"]);
            assert_eq!(s.state(), State::Closed);
            assert!(s.is_done());
        }
    }

    #[test]
    fn a_failure_after_our_close_sends_nothing_more() {
        let mut s = Session::new(Role::Server, LIMITS);
        s.close(1000, "").unwrap();
        let mut bad = from_peer(Role::Server, true, OpCode::Continuation, b"x");
        let f = s.read(&mut bad).unwrap_err();
        assert_eq!(f.error, ProtocolError::UnexpectedContinuation);
        assert!(f.reply.is_none());
        assert_eq!(s.state(), State::Failed);
        assert!(
            s.read(&mut bad).unwrap().is_none(),
            "nothing read after a failure"
        );
    }

    #[test]
    fn the_pong_limit_holds_until_the_send_buffer_drains() {
        let mut s = Session::new(Role::Client, LIMITS).with_pong_limit(2);
        let ping = from_peer(Role::Client, true, OpCode::Ping, b"p");
        let input = cat(&[ping.clone(), ping.clone(), ping.clone()]);
        let (events, replies) = run(Role::Client, &mut s, &input);
        assert_eq!(events, ["ping p", "ping p", "ping p"]);
        assert_eq!(
            replies,
            ["Pong p", "Pong p"],
            "the third ping waits for a flush"
        );
        s.flushed();
        let (_, replies) = run(Role::Client, &mut s, &ping);
        assert_eq!(replies, ["Pong p"]);
        // Without a limit every ping is answered.
        let mut s = Session::new(Role::Client, LIMITS);
        let input = cat(&vec![ping; 300]);
        assert_eq!(run(Role::Client, &mut s, &input).1.len(), 300);
    }

    #[test]
    fn a_single_frame_message_is_not_copied_and_big_buffers_are_freed() {
        let mut s = Session::new(Role::Server, LIMITS);
        let mut one = from_peer(Role::Server, true, OpCode::Text, b"whole");
        let input_range = one.as_ptr_range();
        let step = s.read(&mut one).unwrap().unwrap();
        let Some(Event::Message { data, .. }) = step.event else {
            panic!("expected a message");
        };
        assert!(
            input_range.contains(&data.as_ptr()),
            "borrowed from the input"
        );

        let big = vec![b'a'; KEEP_REASSEMBLY_BYTES + 1];
        let input = cat(&[
            from_peer(Role::Server, false, OpCode::Binary, &big),
            from_peer(Role::Server, true, OpCode::Continuation, b"z"),
            from_peer(Role::Server, true, OpCode::Text, b"next"),
        ]);
        let (events, _) = run(Role::Server, &mut s, &input);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1], "Text next");
        assert_eq!(s.fragments.capacity(), 0, "the big buffer was freed");
    }

    #[test]
    fn a_fragmented_message_says_its_kind_from_the_first_frame() {
        let mut s = Session::new(Role::Server, LIMITS);
        let mut first = from_peer(Role::Server, false, OpCode::Binary, b"b");
        // The fragment is passed over: consumed, no event.
        let step = s.read(&mut first).unwrap().unwrap();
        assert!(step.event.is_none());
        assert_eq!((step.consumed, step.frames), (first.len(), 1));
        assert_eq!(s.message_in_progress(), Some(OpCode::Binary));
    }
}
