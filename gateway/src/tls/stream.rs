//! One connection's TLS: rustls' unbuffered state machine between the
//! socket and the WebSocket codec, in the shard's readiness path.
//!
//! The connection reads and writes through this instead of the socket when
//! it came in on a TLS listener; everything above (HTTP request, frames,
//! rooms' feeds) sees plaintext as on a plain connection.
//!
//! # Invariants
//! - No buffer while idle: ciphertext is read into a buffer borrowed from
//!   the shard pool and kept only while it holds part of a record;
//!   decrypted bytes go to the connection's plaintext input buffer (the one
//!   the plain path reads into, also pooled). Ciphertext to send is a pooled
//!   write buffer, given back once sent. What stays per idle connection is
//!   rustls' own state (traffic keys, sequence numbers).
//! - Plaintext is encrypted only once all earlier ciphertext is out, and at
//!   most [`MAX_PLAINTEXT`] at a time: the rest waits in the connection's
//!   queue, where the outbound budget counts it.
//! - Output order is the order things were queued: handshake records,
//!   alerts and application records all go to the one ciphertext buffer.

use std::{os::fd::BorrowedFd, sync::Arc};

use rustix::io::Errno;
use rustls::{
    server::UnbufferedServerConnection,
    unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus},
    ServerConfig,
};

use super::Failure;
use crate::{
    buf::{BufPool, InBuf, READ_CHUNK},
    readiness::Io,
};

/// A TLS record's header: type, version, length.
const RECORD_HEADER: usize = 5;

/// Most plaintext encrypted at a time: 63 KiB, so the records (16 KiB each
/// plus a header, a tag and the content type) fit a pooled 64 KiB buffer.
pub const MAX_PLAINTEXT: usize = 63 * 1024;

/// What one read brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Plaintext was added to the input buffer.
    Plaintext,
    /// Ciphertext that made no plaintext (handshake records, a partial
    /// record): look at the output, then read again.
    Nothing,
    /// The client closed: TCP end of stream or a TLS close_notify.
    End,
}

/// Why a read stopped.
#[derive(Debug)]
pub enum Error {
    /// The socket: `EAGAIN` (wait for its next edge) or a failure.
    Io(Errno),
    /// The TLS layer refused the peer; an alert (or, for plain HTTP, a 400
    /// response) is queued to go out before the socket closes.
    Tls(Failure),
}

pub struct TlsStream {
    conn: UnbufferedServerConnection,
    /// Ciphertext read and not yet processed; `None` when there is none.
    incoming: Option<InBuf>,
    /// Ciphertext to send (capacity 0 when all is sent), and how much of it
    /// went out.
    outgoing: Vec<u8>,
    sent: usize,
    /// The handshake finished: application data flows both ways.
    open: bool,
    /// The client sent close_notify.
    peer_closed: bool,
    /// Some ciphertext arrived (a first byte that is not a TLS record is
    /// plain HTTP or garbage).
    started: bool,
    failed: bool,
}

impl TlsStream {
    pub fn new(config: Arc<ServerConfig>) -> Result<TlsStream, rustls::Error> {
        Ok(TlsStream {
            conn: UnbufferedServerConnection::new(config)?,
            incoming: None,
            outgoing: Vec::new(),
            sent: 0,
            open: false,
            peer_closed: false,
            started: false,
            failed: false,
        })
    }

    /// The handshake has not finished yet.
    pub fn handshaking(&self) -> bool {
        !self.open
    }

    /// Ciphertext waiting for the socket.
    pub fn pending(&self) -> usize {
        self.outgoing.len() - self.sent
    }

    /// Reads once from the socket and decrypts every whole record into
    /// `plain` (taken from the pool if `None`, given back if left empty).
    /// Returns how many bytes the socket gave, and what they made.
    pub fn read(
        &mut self,
        io: &Io,
        fd: BorrowedFd<'_>,
        pool: &BufPool,
        plain: &mut Option<InBuf>,
    ) -> Result<(usize, Read), Error> {
        if self.peer_closed || self.failed {
            return Ok((0, Read::End));
        }
        let mut buf = self.incoming.take().unwrap_or_else(|| pool.take_read());
        buf.reserve(record_rest(buf.filled()).max(READ_CHUNK / 4));
        let n = match io.recv(fd, buf.spare_mut()) {
            Ok(n) => n,
            Err(e) => {
                self.keep_incoming(buf, pool);
                return Err(Error::Io(e));
            }
        };
        if n == 0 {
            self.keep_incoming(buf, pool);
            if self.open {
                return Ok((0, Read::End));
            }
            self.failed = true;
            return Err(Error::Tls(Failure::Closed));
        }
        buf.advance(n);
        if !self.started {
            self.started = true;
            let first = buf.filled()[0];
            if first != 0x16 {
                self.keep_incoming(buf, pool);
                return Err(Error::Tls(self.not_tls(first, pool)));
            }
        }
        self.incoming = Some(buf);
        let had = plain.as_ref().map_or(0, InBuf::len);
        let step = self.process(pool, plain);
        if let Some(b) = self.incoming.take() {
            self.keep_incoming(b, pool);
        }
        if let Err(e) = step {
            return Err(Error::Tls(self.fail(&e, pool)));
        }
        let got = plain.as_ref().map_or(0, InBuf::len) > had;
        let what = if got {
            Read::Plaintext
        } else if self.peer_closed {
            Read::End
        } else {
            Read::Nothing
        };
        Ok((n, what))
    }

    /// Encrypts `plaintext` (all of it) into the ciphertext buffer, which
    /// must be empty. Only once the handshake is done.
    pub fn encrypt(
        &mut self,
        plaintext: &[u8],
        pool: &BufPool,
        plain: &mut Option<InBuf>,
    ) -> Result<(), Failure> {
        debug_assert!(self.open && self.pending() == 0);
        if self.outgoing.capacity() == 0 {
            self.outgoing = pool.take_write();
        }
        self.sent = 0;
        self.outgoing.clear();
        let r = self.pump(pool, plain, Some(plaintext));
        if let Some(b) = self.incoming.take() {
            self.keep_incoming(b, pool);
        }
        match r {
            Ok(true) => Ok(()),
            // rustls would not take application data now: never drop it
            // silently, close instead.
            Ok(false) => {
                self.failed = true;
                Err(Failure::Other)
            }
            Err(e) => Err(self.fail(&e, pool)),
        }
    }

    /// Sends queued ciphertext; the buffer goes back to the pool once all of
    /// it is out. Returns the bytes sent.
    pub fn send(&mut self, io: &Io, fd: BorrowedFd<'_>, pool: &BufPool) -> Result<usize, Errno> {
        let n = io.send(fd, &self.outgoing[self.sent..])?;
        self.sent += n;
        if self.sent == self.outgoing.len() {
            pool.put_write(std::mem::take(&mut self.outgoing));
            self.sent = 0;
        }
        Ok(n)
    }

    /// Gives the buffers back (the connection is dropped).
    pub fn release(&mut self, pool: &BufPool) {
        if let Some(mut b) = self.incoming.take() {
            b.consume(b.len());
            pool.put_read(b);
        }
        if self.outgoing.capacity() > 0 {
            pool.put_write(std::mem::take(&mut self.outgoing));
        }
    }

    fn keep_incoming(&mut self, buf: InBuf, pool: &BufPool) {
        if buf.is_empty() {
            pool.put_read(buf);
        } else {
            self.incoming = Some(buf);
        }
    }

    /// The first byte is not a TLS handshake record. A client speaking
    /// plain HTTP gets a readable 400 (in the clear: it cannot read
    /// anything else), anything else just the close.
    fn not_tls(&mut self, first: u8, pool: &BufPool) -> Failure {
        self.failed = true;
        if !first.is_ascii_uppercase() {
            return Failure::Malformed;
        }
        let body = "this port speaks TLS: connect with wss:// or https://\n";
        if self.outgoing.capacity() == 0 {
            self.outgoing = pool.take_write();
        }
        self.outgoing.extend_from_slice(
            format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        Failure::PlainHttp
    }

    /// rustls refused the peer: queue the alert it wants to send.
    fn fail(&mut self, e: &rustls::Error, pool: &BufPool) -> Failure {
        self.failed = true;
        // The alert is queued behind the error, and rustls hands it over
        // before it looks at the input again. The input must be what is left
        // of the buffer the error came from: rustls remembers positions in it.
        for _ in 0..4 {
            let input: &mut [u8] = match self.incoming.as_mut() {
                Some(b) => b.filled_mut(),
                None => &mut [],
            };
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(input);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    if self.outgoing.capacity() == 0 {
                        self.outgoing = pool.take_write();
                    }
                    if encode(&mut self.outgoing, |b| e.encode(b)).is_err() {
                        break;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                _ => break,
            }
        }
        if let Some(mut b) = self.incoming.take() {
            b.consume(b.len());
            pool.put_read(b);
        }
        Failure::of(e)
    }

    /// Decrypts what `incoming` holds, answering the handshake as it goes.
    fn process(&mut self, pool: &BufPool, plain: &mut Option<InBuf>) -> Result<(), rustls::Error> {
        self.pump(pool, plain, None).map(|_| ())
    }

    /// Runs rustls over `incoming` until it needs more input, queueing what
    /// it wants sent; with `payload`, encrypts it once application data may
    /// flow. Returns whether the payload (if any) was encrypted.
    fn pump(
        &mut self,
        pool: &BufPool,
        plain: &mut Option<InBuf>,
        mut payload: Option<&[u8]>,
    ) -> Result<bool, rustls::Error> {
        let TlsStream {
            conn,
            incoming,
            outgoing,
            open,
            peer_closed,
            ..
        } = self;
        loop {
            let input: &mut [u8] = match incoming.as_mut() {
                Some(b) => b.filled_mut(),
                None => &mut [],
            };
            let UnbufferedStatus { mut discard, state } = conn.process_tls_records(input);
            let again = match state {
                Err(e) => {
                    consume(incoming, discard);
                    return Err(e);
                }
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    while let Some(record) = r.next_record() {
                        let record = record?;
                        discard += record.discard;
                        let into = plain.get_or_insert_with(|| pool.take_read());
                        into.reserve(record.payload.len());
                        into.spare_mut()[..record.payload.len()].copy_from_slice(record.payload);
                        into.advance(record.payload.len());
                    }
                    true
                }
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    if outgoing.capacity() == 0 {
                        *outgoing = pool.take_write();
                    }
                    encode(outgoing, |b| e.encode(b))
                        .map_err(|e| rustls::Error::General(e.to_string()))?;
                    true
                }
                // The bytes are in `outgoing`, ahead of anything queued
                // later; the connection's flush sends them.
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    true
                }
                Ok(ConnectionState::PeerClosed) => {
                    *peer_closed = true;
                    true
                }
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    *open = true;
                    if let Some(p) = payload.take() {
                        if outgoing.capacity() == 0 {
                            *outgoing = pool.take_write();
                        }
                        encrypt(outgoing, sealed_len(p.len()), |b| w.encrypt(p, b))?;
                    }
                    false
                }
                Ok(ConnectionState::Closed) => {
                    *peer_closed = true;
                    false
                }
                // BlockedHandshake (more input needed), and early data,
                // which the configuration never accepts.
                Ok(_) => false,
            };
            consume(incoming, discard);
            if !again {
                return Ok(payload.is_none());
            }
        }
    }
}

fn consume(incoming: &mut Option<InBuf>, n: usize) {
    if let Some(b) = incoming.as_mut() {
        b.consume(n);
    }
}

/// Bytes still missing from the record at the head of `input`.
fn record_rest(input: &[u8]) -> usize {
    if input.len() < RECORD_HEADER {
        return 0;
    }
    let len = RECORD_HEADER + usize::from(u16::from_be_bytes([input[3], input[4]]));
    len.saturating_sub(input.len())
}

/// Appends what `f` writes into the spare room of `out`, growing the room
/// to the size rustls asks for (`needs` reads it from the error) if the
/// first guess was short.
fn grow_into<E>(
    out: &mut Vec<u8>,
    mut room: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needs: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = out.len();
    loop {
        out.resize(start + room, 0);
        match f(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match needs(&e) {
                Some(required) if required > room => room = required,
                _ => {
                    out.truncate(start);
                    return Err(e);
                }
            },
        }
    }
}

/// A handshake record or alert, into `out`.
fn encode(
    out: &mut Vec<u8>,
    f: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), EncodeError> {
    grow_into(out, 1024, f, |e| match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    })
}

/// Room for `plaintext` bytes as records: a record per 16 KiB, each with at
/// most 29 bytes around it (TLS 1.2 GCM: header 5, explicit nonce 8, tag 16;
/// TLS 1.3: header 5, content type 1, tag 16). So one `encrypt` call does,
/// not one to ask the size and one to write.
fn sealed_len(plaintext: usize) -> usize {
    plaintext + (plaintext / (16 * 1024) + 1) * 29
}

/// Application data, as records, into `out`.
fn encrypt(
    out: &mut Vec<u8>,
    room: usize,
    f: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), rustls::Error> {
    grow_into(out, room, f, |e| match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    })
    .map_err(|e| rustls::Error::General(format!("TLS encryption: {e}")))
}
