//! Host glue of the test devices: the port window on the bus, the line into
//! the wiring and the host timer (a non-blocking timerfd the event loop
//! watches). Model, line and timer sit under one mutex so a timer program
//! from a vCPU and an expiry on the event loop cannot reorder.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::timerfd::TimerFd;

use super::testdev::{TestDevice, TimerCommand};
use crate::bus::{Access, BusDevice};
use crate::error::{Error, Result};
use irqchip_kvm::ratelimit::RateLimiter;
use irqchip_kvm::{IrqLine, LineSink};

/// A test device with its line (`L`, a [`LineSink`]) and its host timer.
pub(crate) struct TestdevSlot<L = IrqLine> {
    model: TestDevice,
    line: L,
    timer: TimerFd,
}

/// Shared between the bus (vCPU threads) and the event loop.
pub(crate) type SharedTestdev<L = IrqLine> = Arc<Mutex<TestdevSlot<L>>>;

/// A test device's snapshot state.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct TestdevState {
    /// The model.
    pub(crate) model: TestDevice,
    /// The host timer: ns to the next expiration and the period (0: one
    /// shot); `None` when disarmed.
    pub(crate) timer: Option<(u64, u64)>,
}

impl<L: LineSink> TestdevSlot<L> {
    /// `model` driving `line`, with a fresh non-blocking timer.
    pub(crate) fn new(model: TestDevice, line: L) -> Result<SharedTestdev<L>> {
        let timer = TimerFd::new().map_err(Error::host("create a test-device timerfd"))?;
        set_nonblocking(&timer)?;
        Ok(Arc::new(Mutex::new(Self { model, line, timer })))
    }

    /// The timerfd, for the event loop.
    pub(crate) fn timer_fd(&self) -> std::os::fd::RawFd {
        self.timer.as_raw_fd()
    }

    /// The timer became readable: raise what its expirations call for.
    pub(crate) fn on_timer(&mut self) {
        let expirations = match self.timer.wait() {
            Ok(n) => n,
            // Re-armed or disarmed between readiness and this read.
            Err(e) if e.errno() == libc::EAGAIN => return,
            Err(e) => {
                log::warn!("test device timer: {e}");
                return;
            }
        };
        self.expired(expirations);
    }

    /// The host timer expired `expirations` times.
    pub(crate) fn expired(&mut self, expirations: u64) {
        let cmd = self.model.timer_expired(expirations, &mut self.line);
        self.apply(cmd);
    }

    /// The snapshot state: the model, and the host timer as the time to
    /// its next expiration and its period (ns).
    pub(crate) fn save(&self) -> Result<TestdevState> {
        let mut spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        // SAFETY: timerfd_gettime writes one itimerspec into `spec`, which
        // lives across the call; the descriptor is our timerfd.
        let rc = unsafe { libc::timerfd_gettime(self.timer.as_raw_fd(), &mut spec) };
        if rc != 0 {
            return Err(Error::host("read a test-device timer")(
                std::io::Error::last_os_error(),
            ));
        }
        let ns = |t: libc::timespec| {
            u64::try_from(t.tv_sec)
                .unwrap_or(0)
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
        };
        let left = ns(spec.it_value);
        Ok(TestdevState {
            model: self.model.clone(),
            timer: (left != 0).then_some((left, ns(spec.it_interval))),
        })
    }

    /// Restores a snapshot state: the model (which must be this device's)
    /// and the timer, re-armed for the time that was left.
    pub(crate) fn restore(
        &mut self,
        state: &TestdevState,
        spec: super::testdev::TestdevSpec,
    ) -> std::result::Result<(), String> {
        if !state.model.matches(spec) {
            return Err(format!(
                "test device {}: the saved device has another line or trigger",
                spec.index
            ));
        }
        self.model = state.model.clone();
        let result = match state.timer {
            None => self.timer.clear(),
            Some((left, period)) => self.timer.reset(
                std::time::Duration::from_nanos(left.max(1)),
                (period != 0).then(|| std::time::Duration::from_nanos(period)),
            ),
        };
        result.map_err(|e| format!("test device {}: arm its timer: {e}", spec.index))
    }

    fn apply(&mut self, cmd: Option<TimerCommand>) {
        let result = match cmd {
            None => return,
            Some(TimerCommand::Start { period }) => self.timer.reset(period, Some(period)),
            Some(TimerCommand::Stop) => self.timer.clear(),
        };
        if let Err(e) = result {
            log::warn!("test device timer: {e}");
        }
    }
}

fn set_nonblocking(timer: &TimerFd) -> Result<()> {
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL read and set
    // its status flags and touch no memory of ours.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if ok {
        Ok(())
    } else {
        Err(Error::host("make a timerfd non-blocking")(
            std::io::Error::last_os_error(),
        ))
    }
}

/// One test device's port window on the bus. Registers are 32 bits wide;
/// other widths or unaligned offsets read all ones and are ignored.
pub(crate) struct TestdevPort<L> {
    slot: SharedTestdev<L>,
    warn: RateLimiter,
}

impl<L: LineSink> TestdevPort<L> {
    /// The port window of `slot`.
    pub(crate) fn new(slot: SharedTestdev<L>) -> Self {
        Self {
            slot,
            warn: RateLimiter::new(),
        }
    }

    fn bad_access(&self, offset: u64, len: usize) {
        if self.warn.allow() {
            log::warn!(
                "test device: {len}-byte access at offset {offset:#x} ignored (registers are 32-bit)"
            );
        }
    }
}

impl<L: LineSink + Send> BusDevice for TestdevPort<L> {
    fn read(&mut self, _access: Access, offset: u64, data: &mut [u8]) {
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0xff);
            self.bad_access(offset, data.len());
            return;
        }
        let slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        data.copy_from_slice(&slot.model.read(offset as u16).to_le_bytes());
    }

    fn write(&mut self, _access: Access, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad_access(offset, data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            self.bad_access(offset, data.len());
            return;
        }
        let mut guard = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = &mut *guard;
        let cmd = slot
            .model
            .write(offset as u16, u32::from_le_bytes(bytes), &mut slot.line);
        slot.apply(cmd);
    }
}
