//! This crate's one `unsafe` call: waiting through glommio's reactor for a
//! descriptor glommio has no type for (the executor's epoll set).
//!
//! glommio 0.9 polls only descriptors wrapped in its own socket types, and
//! a stream it wraps arms an io_uring readiness poll the moment it is
//! created. So we wrap a duplicate of the descriptor in a glommio
//! `UnixStream` whose only use is that first poll: the first read waits
//! for it, and the stream (with the duplicate) is dropped as soon as it
//! fires. The stream is never read from: the read that would follow the
//! poll is a `recv`, which the epoll descriptor refuses.
#![allow(unsafe_code)]

use std::{
    future::poll_fn,
    io,
    os::fd::{BorrowedFd, FromRawFd, IntoRawFd},
    pin::Pin,
    task::Poll,
};

use futures_lite::AsyncRead;

/// Completes once `fd` is readable (or failed). Costs a `dup`, one io_uring
/// poll and a `close`. Must be called on a glommio executor thread.
pub async fn readable(fd: BorrowedFd<'_>) -> io::Result<()> {
    let dup = rustix::io::fcntl_dupfd_cloexec(fd, 0)?;
    let raw = dup.into_raw_fd();
    // SAFETY: `raw` comes from an `OwnedFd` we just gave up, so it is an open
    // descriptor nobody else owns; the stream takes ownership and closes it
    // on drop. Creating the stream only arms a poll for input on it.
    let mut stream = unsafe { glommio::net::UnixStream::from_raw_fd(raw) };
    let mut nothing = [0u8; 0];
    poll_fn(|cx| {
        // While the stream's first poll is armed, a read only registers the
        // waker; once it fired the read tries `recv`, which fails with
        // ENOTSOCK: either way the descriptor is readable now.
        match Pin::new(&mut stream).poll_read(cx, &mut nothing) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(()),
        }
    })
    .await;
    Ok(())
}
