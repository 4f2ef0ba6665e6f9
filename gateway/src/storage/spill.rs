//! The spill file: where the worker puts messages the store could not take,
//! until it can replay them in order.
//!
//! One JSON object per line, appended and fsynced before the messages are
//! acked. The file is locked (flock) so two gateways cannot share it.
//!
//! # Invariants
//! - Lines are appended whole, in the order received; replay reads them in
//!   that order, so each room's messages stay in seq order.
//! - A torn last line (a crash mid-write) was never acked: it is cut off
//!   when the file is opened.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;
use serde_json::value::RawValue;

use super::Record;

pub struct Spill {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    len: u64,
    /// Where replay has read up to.
    read_offset: u64,
}

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    room: std::borrow::Cow<'a, str>,
    seq: u64,
    #[serde(borrow)]
    from: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    ts: u64,
    #[serde(borrow)]
    body: &'a RawValue,
    #[serde(borrow, default)]
    epoch: std::borrow::Cow<'a, str>,
}

/// Checks that `dir/<node>.spill` can be created, written and locked, and
/// lets it go again: a start refuses an unusable spill directory before it
/// binds anything.
pub fn check(dir: &Path, node: &str) -> io::Result<()> {
    open_locked(dir, node).map(drop)
}

fn open_locked(dir: &Path, node: &str) -> io::Result<(File, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{node}.spill"));
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(&path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(io::Error::other(format!(
                "{} is locked by another gateway (give each node its own --node-id or --spill-dir)",
                path.display()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    Ok((file, path))
}

impl Spill {
    /// Opens (or creates) `dir/<node>.spill` and locks it.
    pub fn open(dir: &Path, node: &str) -> io::Result<Spill> {
        let (file, path) = open_locked(dir, node)?;
        let mut len = file.metadata()?.len();
        if len > 0 {
            let whole = last_newline(&file, len)?;
            if whole < len {
                log::warn!(
                    "spill file {}: cutting off a torn last record ({} bytes, never acked)",
                    path.display(),
                    len - whole
                );
                file.set_len(whole)?;
                file.sync_data()?;
                len = whole;
            }
            if len > 0 {
                log::warn!(
                    "spill file {} holds {len} bytes from an earlier run: they are replayed once the store answers",
                    path.display()
                );
            }
        }
        Ok(Spill {
            path,
            file,
            len,
            read_offset: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Nothing waits for replay.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// Appends records and syncs them to disk.
    pub fn append(&mut self, records: &[Record]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(records.len() * 128);
        for r in records {
            encode(&mut buf, r);
        }
        let written = self
            .file
            .write_all(&buf)
            .and_then(|_| self.file.sync_data());
        if let Err(e) = written {
            // Cut off what part of the batch reached the file: later batches
            // must start on a line of their own, at `len`.
            let _ = self.file.set_len(self.len);
            let _ = self.file.sync_data();
            return Err(e);
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Reads up to `max` records from where replay stands, without moving
    /// on (call [`Spill::advance`] once they are stored). Returns the records
    /// and how many bytes they span.
    pub fn peek(&self, max: usize) -> io::Result<(Vec<Record>, u64)> {
        let mut out = Vec::new();
        // Bytes of whole lines taken so far.
        let mut consumed = 0u64;
        // File offset read up to; `buf[start..]` holds what follows `consumed`.
        let mut read_to = self.read_offset;
        let mut buf: Vec<u8> = Vec::new();
        let mut start = 0;
        while out.len() < max {
            if let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
                let line = &buf[start..start + nl];
                match decode(line) {
                    Some(r) => out.push(r),
                    None => log::error!(
                        "spill file {}: skipping an unreadable record: {}",
                        self.path.display(),
                        String::from_utf8_lossy(&line[..line.len().min(200)])
                    ),
                }
                start += nl + 1;
                consumed += nl as u64 + 1;
                continue;
            }
            if read_to >= self.len {
                break;
            }
            buf.drain(..start);
            start = 0;
            let want = (256 * 1024).min(self.len - read_to) as usize;
            let old = buf.len();
            buf.resize(old + want, 0);
            let n = self.file.read_at(&mut buf[old..], read_to)?;
            buf.truncate(old + n);
            if n == 0 {
                break;
            }
            read_to += n as u64;
        }
        Ok((out, consumed))
    }

    pub fn advance(&mut self, bytes: u64) {
        self.read_offset = (self.read_offset + bytes).min(self.len);
    }

    /// Everything was replayed: empty the file.
    pub fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_data()?;
        self.len = 0;
        self.read_offset = 0;
        Ok(())
    }

    /// Replay must start over (the store failed mid-replay; appends are
    /// idempotent, so re-sending is safe).
    pub fn rewind(&mut self) {
        self.read_offset = 0;
    }

    pub fn fully_read(&self) -> bool {
        self.read_offset >= self.len
    }
}

fn last_newline(file: &File, len: u64) -> io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        file.read_exact_at(&mut buf[..n], start)?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

fn encode(buf: &mut Vec<u8>, r: &Record) {
    // Writing to a Vec cannot fail.
    buf.extend_from_slice(b"{\"room\":");
    let _ = serde_json::to_writer(&mut *buf, &*r.room);
    let _ = write!(buf, ",\"seq\":{},\"from\":", r.seq);
    let _ = serde_json::to_writer(&mut *buf, &*r.from);
    buf.extend_from_slice(b",\"id\":");
    let _ = serde_json::to_writer(&mut *buf, &*r.id);
    buf.extend_from_slice(b",\"epoch\":");
    let _ = serde_json::to_writer(&mut *buf, &*r.epoch);
    let _ = write!(buf, ",\"ts\":{},\"body\":", r.ts);
    // One record per line: a raw line break in valid JSON can only be
    // whitespace between tokens (strings escape theirs), so a space keeps
    // the body's meaning.
    buf.extend(
        r.body
            .bytes()
            .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
    );
    buf.extend_from_slice(b"}\n");
}

fn decode(line: &[u8]) -> Option<Record> {
    let l: Line<'_> = serde_json::from_slice(line).ok()?;
    Some(Record {
        room: Arc::from(&*l.room),
        seq: l.seq,
        from: Arc::from(&*l.from),
        id: l.id.into(),
        ts: l.ts,
        body: l.body.get().into(),
        epoch: Arc::from(&*l.epoch),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(room: &str, seq: u64) -> Record {
        Record {
            from: Arc::from("al\"ice"),
            id: format!("id-{seq}").into(),
            ts: 1000 + seq,
            body: "{\n  \"text\": \"hi\\nthere\",\r\n  \"n\": [1, 2]\n}".into(),
            epoch: Arc::from("e1"),
            ..crate::storage::test_record(room, seq)
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("corecast-spill-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn replays_in_order_in_chunks_and_clears() {
        let d = dir("order");
        let mut s = Spill::open(&d, "n1").unwrap();
        let all: Vec<_> = (1..=25)
            .map(|i| rec(if i % 2 == 0 { "a" } else { "b" }, i))
            .collect();
        s.append(&all[..10]).unwrap();
        s.append(&all[10..]).unwrap();
        let mut got = Vec::new();
        loop {
            let (chunk, bytes) = s.peek(7).unwrap();
            if chunk.is_empty() {
                break;
            }
            s.advance(bytes);
            got.extend(chunk);
        }
        assert!(s.fully_read());
        assert_eq!(got.len(), all.len());
        for (g, a) in got.iter().zip(&all) {
            assert_eq!(
                (&g.room, g.seq, &g.from, &g.id, g.ts, &g.epoch),
                (&a.room, a.seq, &a.from, &a.id, a.ts, &a.epoch)
            );
            let (gv, av): (serde_json::Value, serde_json::Value) = (
                serde_json::from_str(&g.body).unwrap(),
                serde_json::from_str(&a.body).unwrap(),
            );
            assert_eq!(gv, av, "a pretty-printed body keeps its meaning");
        }
        s.clear().unwrap();
        assert!(s.is_empty());
        drop(s);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_file_is_locked() {
        let d = dir("torn");
        {
            let mut s = Spill::open(&d, "n1").unwrap();
            s.append(&[rec("a", 1), rec("a", 2)]).unwrap();
            assert!(Spill::open(&d, "n1").is_err(), "second opener is refused");
            s.file.write_all(b"{\"room\":\"a\",\"se").unwrap();
        }
        let s = Spill::open(&d, "n1").unwrap();
        let (got, _) = s.peek(10).unwrap();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
        drop(s);
        let _ = std::fs::remove_dir_all(&d);
    }
}
