//! The one place the gateway needs `unsafe`: adopting a listening socket we
//! created (with our own backlog and SO_REUSEPORT) into glommio.
#![allow(unsafe_code)]

use std::os::fd::{IntoRawFd, OwnedFd};

/// Hands a bound, listening TCP socket to the current shard's reactor.
///
/// Must be called on a glommio executor thread.
pub fn adopt_listener(fd: OwnedFd) -> glommio::net::TcpListener {
    use std::os::fd::FromRawFd;
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` comes from an `OwnedFd` we just gave up, so it is an
    // open descriptor nobody else owns; glommio's listener takes ownership
    // and closes it on drop. The caller created it as a listening TCP socket.
    unsafe { glommio::net::TcpListener::from_raw_fd(raw) }
}
