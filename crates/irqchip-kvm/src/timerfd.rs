//! Non-blocking timerfds for the chip's timers (the split mode's EOI watch,
//! the user mode's LAPIC timers).

use std::os::fd::AsRawFd;

use vmm_sys_util::timerfd::TimerFd;

use crate::error::Error;

/// A non-blocking timerfd (so a read after a re-arm cannot stall the event
/// loop that watches it); `what` names it in the error.
pub(crate) fn nonblocking(what: &'static str) -> Result<TimerFd, Error> {
    let timer = TimerFd::new().map_err(Error::host(what))?;
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl F_GETFL/F_SETFL on a descriptor we own; no memory is
    // passed.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if ok {
        Ok(timer)
    } else {
        Err(Error::host(what)(std::io::Error::last_os_error()))
    }
}
