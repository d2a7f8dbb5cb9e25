//! The main thread's event loop (event-manager over epoll): the exit event,
//! stdin into the UART, the `--timeout` timer, the test devices' timers and
//! the interrupt controller's timers (user mode: the LAPIC timers).

use std::io::Read;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber};
use irqchip_kvm::Irqchip;
use vmm_sys_util::timerfd::TimerFd;

use crate::control::{Outcome, VmControl};
use crate::devices::serial::Uart;
use crate::devices::testdev_port::SharedTestdev;
use crate::error::{Error, Result};
use crate::report::GuestReport;

/// Wakes the loop when the VM stops; the loop then sees `stopping()`.
struct ExitWatch {
    control: Arc<VmControl>,
}

impl MutEventSubscriber for ExitWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.control.exit_event().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.control.exit_event(), EventSet::IN)) {
            log::error!("watch the exit event: {e:?}");
        }
    }
}

/// Standard input to the UART's receive FIFO. Not registered when stdin
/// cannot be polled (a regular file, /dev/null, closed) or is a terminal we
/// do not own (background job), so the VMM never blocks or stops on it.
struct StdinToSerial {
    /// fd 0; never closed (it belongs to the process).
    stdin: ManuallyDrop<std::fs::File>,
    uart: Arc<Mutex<Uart>>,
    dropped: u64,
}

impl MutEventSubscriber for StdinToSerial {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = if events.event_set().contains(EventSet::IN) {
            (&*self.stdin).read(&mut buf).unwrap_or(0)
        } else {
            0
        };
        if n == 0 {
            // EOF, error or hang-up: stop watching.
            let _ = ops.remove(Events::new(&*self.stdin, EventSet::IN));
            return;
        }
        let mut uart = self.uart.lock().unwrap_or_else(PoisonError::into_inner);
        let accepted = uart.enqueue_raw_bytes(&buf[..n]).unwrap_or(0);
        self.dropped += (n - accepted) as u64;
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.stdin, EventSet::IN)) {
            log::debug!("stdin is not pollable ({e:?}); guest input disabled");
        }
    }
}

impl Drop for StdinToSerial {
    fn drop(&mut self) {
        if self.dropped > 0 {
            log::warn!(
                "{} input bytes dropped: the UART FIFO was full",
                self.dropped
            );
        }
    }
}

/// `--timeout`: ends the VM naming the running test.
struct TimeoutWatch {
    timer: TimerFd,
    secs: u64,
    control: Arc<VmControl>,
    report: Arc<Mutex<GuestReport>>,
}

impl MutEventSubscriber for TimeoutWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let test = self
            .report
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .current_test()
            .map(str::to_string);
        self.control.finish(Outcome::Failed(Error::Timeout {
            secs: self.secs,
            test,
        }));
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::error!("watch the timeout timer: {e:?}");
        }
    }
}

/// The test devices' host timers.
struct TestdevTimers {
    slots: Vec<SharedTestdev>,
}

impl MutEventSubscriber for TestdevTimers {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if let Some(slot) = self.slots.get(events.data() as usize) {
            slot.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .on_timer();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, slot) in self.slots.iter().enumerate() {
            let fd = slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .timer_fd();
            if let Err(e) = ops.add(Events::with_data_raw(fd, i as u32, EventSet::IN)) {
                log::error!("watch test device {i}'s timer: {e:?}");
            }
        }
    }
}

/// The interrupt controller's timers (user mode: one per LAPIC timer;
/// split: the EOI watch).
struct IrqTimers {
    chip: Irqchip,
    fds: Vec<std::os::fd::RawFd>,
}

impl MutEventSubscriber for IrqTimers {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        self.chip.on_timer(events.data() as usize);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, &fd) in self.fds.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data_raw(fd, i as u32, EventSet::IN)) {
                log::error!("watch interrupt-controller timer {i}: {e:?}");
            }
        }
    }
}

/// Snapshot requests (the guest's, SIGUSR1's): taken on this thread.
struct SnapshotWatch {
    snapshotter: crate::snapshot::Snapshotter,
}

impl MutEventSubscriber for SnapshotWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.snapshotter.on_request();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(
            self.snapshotter.coordinator.event(),
            EventSet::IN,
        )) {
            log::error!("watch snapshot requests: {e:?}");
        }
    }
}

/// What the loop watches.
pub(crate) struct LoopConfig {
    /// The VM's control.
    pub(crate) control: Arc<VmControl>,
    /// COM1.
    pub(crate) uart: Arc<Mutex<Uart>>,
    /// Test devices.
    pub(crate) testdevs: Vec<SharedTestdev>,
    /// Results (for the timeout message).
    pub(crate) report: Arc<Mutex<GuestReport>>,
    /// `--timeout`.
    pub(crate) timeout: Option<u64>,
    /// Forward stdin to the UART.
    pub(crate) stdin: bool,
    /// The interrupt controller, whose timers the loop drives.
    pub(crate) chip: Irqchip,
    /// Takes snapshots when asked.
    pub(crate) snapshotter: Option<crate::snapshot::Snapshotter>,
}

/// The event loop, ready to run.
pub(crate) struct EventLoop {
    manager: EventManager<Box<dyn MutEventSubscriber + Send>>,
    control: Arc<VmControl>,
}

impl EventLoop {
    /// Registers every source.
    pub(crate) fn new(cfg: LoopConfig) -> Result<Self> {
        let mut manager: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new()
            .map_err(|e| {
                Error::host("create the event loop")(std::io::Error::other(format!("{e:?}")))
            })?;
        use event_manager::SubscriberOps;
        manager.add_subscriber(Box::new(ExitWatch {
            control: Arc::clone(&cfg.control),
        }));
        if cfg.stdin && stdin_usable() {
            // SAFETY: fd 0 is open (checked by `stdin_usable`) and stays
            // open: the File is wrapped in ManuallyDrop and never closed.
            let stdin =
                ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(libc::STDIN_FILENO) });
            manager.add_subscriber(Box::new(StdinToSerial {
                stdin,
                uart: Arc::clone(&cfg.uart),
                dropped: 0,
            }));
        }
        if let Some(secs) = cfg.timeout {
            let mut timer = TimerFd::new().map_err(Error::host("create the timeout timer"))?;
            timer
                .reset(Duration::from_secs(secs), None)
                .map_err(Error::host("arm the timeout timer"))?;
            manager.add_subscriber(Box::new(TimeoutWatch {
                timer,
                secs,
                control: Arc::clone(&cfg.control),
                report: Arc::clone(&cfg.report),
            }));
        }
        if !cfg.testdevs.is_empty() {
            manager.add_subscriber(Box::new(TestdevTimers {
                slots: cfg.testdevs,
            }));
        }
        if let Some(snapshotter) = cfg.snapshotter {
            manager.add_subscriber(Box::new(SnapshotWatch { snapshotter }));
        }
        let fds = cfg.chip.timer_fds();
        if !fds.is_empty() {
            manager.add_subscriber(Box::new(IrqTimers {
                chip: cfg.chip,
                fds,
            }));
        }
        Ok(Self {
            manager,
            control: cfg.control,
        })
    }

    /// Runs until the VM stops.
    pub(crate) fn run(&mut self) -> Result<()> {
        while !self.control.stopping() {
            self.manager
                .run()
                .map_err(|e| Error::host("event loop")(std::io::Error::other(format!("{e:?}"))))?;
        }
        Ok(())
    }
}

/// Whether stdin is open and, if it is a terminal, ours to read (we are in
/// its foreground process group; reading it from the background would stop
/// the process with SIGTTIN).
fn stdin_usable() -> bool {
    let fd = libc::STDIN_FILENO;
    // SAFETY: fcntl(F_GETFD), isatty, tcgetpgrp and getpgrp only query the
    // process's own state and touch no memory of ours.
    unsafe {
        if libc::fcntl(fd, libc::F_GETFD) < 0 {
            return false;
        }
        if libc::isatty(fd) == 1 {
            return libc::tcgetpgrp(fd) == libc::getpgrp();
        }
    }
    true
}
