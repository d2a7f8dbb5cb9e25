//! Counts the warnings and errors the device layer logs, per thread (the
//! replay tests run harnesses on several threads at once), so that a
//! harness can bound them. Debug and info records are not what a user sees
//! by default (the VMM's filter is `warn`) and are not counted or built.

use std::cell::Cell;
use std::sync::OnceLock;

thread_local! {
    static WARNINGS: Cell<u64> = const { Cell::new(0) };
}

struct Counter;

impl log::Log for Counter {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            WARNINGS.with(|w| w.set(w.get() + 1));
        }
    }

    fn flush(&self) {}
}

static COUNTER: Counter = Counter;

/// Installs the counter as the process's logger (the first call does);
/// `Err` when another logger was there first, whose output no harness
/// could count.
pub(crate) fn install() -> Result<(), String> {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    let installed = *INSTALLED.get_or_init(|| {
        let ok = log::set_logger(&COUNTER).is_ok();
        if ok {
            log::set_max_level(log::LevelFilter::Warn);
        }
        ok
    });
    if installed {
        Ok(())
    } else {
        Err("another logger is installed: the log output cannot be counted".into())
    }
}

/// Warnings and errors logged on this thread so far.
pub(crate) fn warnings() -> u64 {
    WARNINGS.with(Cell::get)
}
