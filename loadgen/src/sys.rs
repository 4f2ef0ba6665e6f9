//! The load generator's only `unsafe` code: two knobs that std and socket2
//! 0.5 do not expose.
//!
//! # Invariants
//! - Every function borrows or consumes an owned, open descriptor; none keeps
//!   a raw fd beyond the call.
#![allow(unsafe_code)]

use std::{io, os::fd::AsRawFd};

/// Sets `IP_BIND_ADDRESS_NO_PORT`, so that binding a source address defers
/// the port choice to `connect`. Without it every bind reserves a port for
/// all destinations and one source address runs out after ~28k sockets.
pub fn set_bind_address_no_port(socket: &socket2::Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the descriptor stays open for the borrow of `socket`; `optval`
    // points to a live `c_int` and `optlen` is its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raises the soft open-files limit to the hard one and returns the soft
/// limit now in force. A hold of thousands of connections needs one
/// descriptor each; many shells start with a soft limit of 1024.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `rlimit` for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid `rlimit`, only read during the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(raised.rlim_cur);
        }
    }
    Ok(lim.rlim_cur)
}
