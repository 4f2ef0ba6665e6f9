//! Per-shard pools of I/O buffers, so idle connections hold none.
//!
//! # Invariants
//! - Owned by one shard (`RefCell`, `!Send`); never held across an `.await`.
//! - Bounded: at most [`POOL_MAX`] free buffers of each kind are kept, and a
//!   buffer that grew past [`POOLED_MAX_BYTES`] (a big message) is freed
//!   instead of pooled, so one burst does not pin memory for good.

use std::cell::{Cell, RefCell};

/// Size of a fresh read buffer; most frames of a chat workload fit.
pub const READ_CHUNK: usize = 16 * 1024;
/// Buffers larger than this go back to the allocator, not the pool.
pub const POOLED_MAX_BYTES: usize = 64 * 1024;
/// Free buffers kept per kind per shard.
pub const POOL_MAX: usize = 1024;
/// Most bytes gathered for one `send` (see [`BufPool::gather`]).
pub const GATHER_BYTES: usize = 64 * 1024;

/// A read buffer: initialized bytes with a filled window `[head, tail)`.
#[derive(Debug)]
pub struct InBuf {
    /// INVARIANT: `head <= tail <= data.len()`; `data` is fully initialized
    /// so its spare part can be handed to `read` without unsafe code.
    data: Vec<u8>,
    head: usize,
    tail: usize,
}

impl InBuf {
    pub fn new(capacity: usize) -> InBuf {
        InBuf {
            data: vec![0; capacity],
            head: 0,
            tail: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.tail - self.head
    }

    pub fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    pub fn capacity(&self) -> usize {
        self.data.len()
    }

    /// The bytes read and not yet consumed.
    pub fn filled_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.head..self.tail]
    }

    pub fn filled(&self) -> &[u8] {
        &self.data[self.head..self.tail]
    }

    /// Drops `n` bytes from the front.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.head += n;
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        }
    }

    /// Makes room for at least `want` more bytes after the filled window:
    /// first by moving the window to the front, then by growing.
    pub fn reserve(&mut self, want: usize) {
        if self.data.len() - self.tail >= want {
            return;
        }
        if self.head > 0 {
            self.data.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        let need = self.tail + want;
        if self.data.len() < need {
            self.data.resize(need.max(self.data.len() * 2), 0);
        }
    }

    /// The free space after the filled window, to read into.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.tail..]
    }

    /// Marks `n` bytes of the spare space as filled (after a read).
    pub fn advance(&mut self, n: usize) {
        debug_assert!(self.tail + n <= self.data.len());
        self.tail += n;
    }
}

/// Free read and write buffers of one shard.
#[derive(Debug, Default)]
pub struct BufPool {
    reads: RefCell<Vec<InBuf>>,
    writes: RefCell<Vec<Vec<u8>>>,
    /// Buffers taken and not yet given back: held by connections.
    lent: Cell<u64>,
    /// The shard's one gather buffer (see [`BufPool::gather`]).
    gather: RefCell<Vec<u8>>,
}

impl BufPool {
    pub fn take_read(&self) -> InBuf {
        self.lent.set(self.lent.get() + 1);
        self.reads
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| InBuf::new(READ_CHUNK))
    }

    /// Returns an empty read buffer.
    pub fn put_read(&self, buf: InBuf) {
        debug_assert!(buf.is_empty());
        self.lent.set(self.lent.get().saturating_sub(1));
        let mut reads = self.reads.borrow_mut();
        if buf.capacity() <= POOLED_MAX_BYTES && reads.len() < POOL_MAX {
            reads.push(buf);
        }
    }

    pub fn take_write(&self) -> Vec<u8> {
        self.lent.set(self.lent.get() + 1);
        self.writes
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(READ_CHUNK))
    }

    /// Returns a write buffer; its contents are discarded.
    pub fn put_write(&self, mut buf: Vec<u8>) {
        buf.clear();
        self.lent.set(self.lent.get().saturating_sub(1));
        let mut writes = self.writes.borrow_mut();
        if buf.capacity() > 0 && buf.capacity() <= POOLED_MAX_BYTES && writes.len() < POOL_MAX {
            writes.push(buf);
        }
    }
}

impl BufPool {
    /// Runs `f` on the shard's gather buffer, emptied: a connection lays
    /// out one `send` there (its own output and its rooms' frames, at most
    /// [`GATHER_BYTES`]). One buffer serves every connection of the shard,
    /// so it stays in cache, and the kernel copies one run of bytes instead
    /// of dozens of small slices.
    pub fn gather<R>(&self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let mut g = self.gather.borrow_mut();
        g.clear();
        g.reserve(GATHER_BYTES);
        f(&mut g)
    }

    /// Read and write buffers connections hold right now: idle connections
    /// hold none, so this follows the connections moving bytes.
    pub fn lent(&self) -> u64 {
        self.lent.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_compacts_before_growing() {
        let mut b = InBuf::new(8);
        b.spare_mut()[..6].copy_from_slice(b"abcdef");
        b.advance(6);
        b.consume(4);
        b.reserve(5);
        assert_eq!(b.capacity(), 8, "compacting made room");
        assert_eq!(b.filled(), b"ef");
        b.reserve(20);
        assert!(b.capacity() >= 22);
        assert_eq!(b.filled(), b"ef");
    }

    #[test]
    fn big_buffers_are_not_pooled() {
        let pool = BufPool::default();
        pool.put_read(InBuf::new(POOLED_MAX_BYTES + 1));
        assert_eq!(pool.take_read().capacity(), READ_CHUNK);
        let mut v = pool.take_write();
        v.extend_from_slice(&[1; 10]);
        pool.put_write(v);
        assert!(pool.take_write().is_empty());
    }
}
