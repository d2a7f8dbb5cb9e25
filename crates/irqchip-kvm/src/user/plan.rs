//! The decisions of a user-mode vCPU loop, as pure functions of the LAPIC
//! model and what `kvm_run` said at the last exit, so they are unit-tested
//! without KVM: INIT/SIPI transitions, when a halted or waiting vCPU may
//! run again, and whether to inject or ask for an interrupt window.

use irqchip::lapic::Lapic;

/// Where a vCPU is with respect to INIT and SIPI (SDM Vol. 3A 9.4.4, 11.4.7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activity {
    /// Executing (or halted, which the loop tracks separately).
    Running,
    /// An AP after power-up or INIT: holds until a start-up IPI. KVM without
    /// an in-kernel LAPIC has no such MP state, so the vCPU thread holds it.
    WaitForSipi,
}

/// What INIT and SIPI events ask the vCPU loop to do to the registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Startup {
    /// Put every register in its INIT state (SDM Vol. 3A Table 9-1); the
    /// BSP then runs at the reset vector, an AP waits for SIPI.
    pub(crate) init: bool,
    /// Start in real mode at CS = vector << 8, IP = 0.
    pub(crate) sipi: Option<u8>,
    /// A SIPI arrived while the vCPU was not waiting for one: ignored, as
    /// the processor does.
    pub(crate) dropped_sipi: bool,
}

/// Applies a pending INIT (first) and SIPI (second) to `activity`.
pub(crate) fn startup(
    activity: Activity,
    bsp: bool,
    init: bool,
    sipi: Option<u8>,
) -> (Activity, Startup) {
    let mut next = activity;
    let mut out = Startup {
        init,
        ..Startup::default()
    };
    if init {
        next = if bsp {
            Activity::Running
        } else {
            Activity::WaitForSipi
        };
    }
    if let Some(vector) = sipi {
        if next == Activity::WaitForSipi {
            next = Activity::Running;
            out.sipi = Some(vector);
        } else {
            out.dropped_sipi = true;
        }
    }
    (next, out)
}

/// Whether a vCPU halted by `hlt` wakes: an NMI, SMI, INIT or SIPI is
/// pending, or (interrupts enabled at the `hlt`) a vector is deliverable
/// above the processor priority (SDM Vol. 3A 11.8.3.1).
pub(crate) fn halt_ends(lapic: &Lapic, if_flag: bool) -> bool {
    lapic.has_pending_event() || (if_flag && lapic.highest_deliverable().is_some())
}

/// Whether a requested vector waits only because of the task priority: its
/// class is above the in-service class but not above the TPR's. Lowering
/// CR8 would make it deliverable, and on hosts where a guest CR8 write does
/// not exit (`KVM_EXIT_SET_TPR` never comes), only a later exit shows the
/// new CR8: the caller polls while this holds.
pub(crate) fn tpr_blocked(lapic: &Lapic) -> bool {
    let highest = |f: &dyn Fn(u8) -> bool| (FIRST_VECTOR..=u8::MAX).rev().find(|&v| f(v));
    let Some(requested) = highest(&|v| lapic.is_requested(v)) else {
        return false;
    };
    let in_service = highest(&|v| lapic.is_in_service(v)).unwrap_or(0);
    lapic.highest_deliverable().is_none() && requested >> 4 > in_service >> 4
}

/// The lowest vector a LAPIC can request (0..15 are illegal).
const FIRST_VECTOR: u8 = 16;

/// What to do about maskable interrupts before entering the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Injection {
    /// Inject this vector (`KVM_INTERRUPT`) and acknowledge it in the LAPIC.
    Inject(u8),
    /// Something is deliverable but the vCPU cannot take it now (IF clear,
    /// interrupt shadow, an event being injected): ask KVM to exit when it can.
    Window,
    /// Nothing deliverable.
    Idle,
}

/// The injection decision: `ready` is `kvm_run.ready_for_interrupt_injection`
/// from the last exit (IF set, no shadow, nothing pending in KVM);
/// `nmi_held` says KVM may hold an NMI it has not delivered yet. An NMI
/// goes before a maskable interrupt (SDM Vol. 3A 7.9, priority among
/// simultaneous events), but KVM injects a vector queued with
/// `KVM_INTERRUPT` ahead of an NMI it holds (it counts the vector as
/// already injected), so the vector waits for a window after the NMI.
pub(crate) fn injection(deliverable: Option<u8>, ready: bool, nmi_held: bool) -> Injection {
    match deliverable {
        Some(vector) if ready && !nmi_held => Injection::Inject(vector),
        Some(_) => Injection::Window,
        None => Injection::Idle,
    }
}

#[cfg(test)]
mod tests {
    use irqchip::apic_bus::Message;
    use irqchip::lapic::LapicConfig;

    use super::*;

    fn enabled_lapic() -> Lapic {
        let mut l = Lapic::new(LapicConfig::new(1, false));
        assert_eq!(l.mmio_write(0xf0, &0x1ffu32.to_le_bytes(), 0), None);
        l
    }

    #[test]
    fn startup_ap_init_then_sipi_starts_at_vector() {
        let (a, s) = startup(Activity::WaitForSipi, false, true, Some(0x08));
        assert_eq!(a, Activity::Running);
        assert_eq!(
            s,
            Startup {
                init: true,
                sipi: Some(0x08),
                dropped_sipi: false
            }
        );
    }

    #[test]
    fn startup_running_ap_init_waits_for_sipi() {
        let (a, s) = startup(Activity::Running, false, true, None);
        assert_eq!(a, Activity::WaitForSipi);
        assert!(s.init && s.sipi.is_none());
    }

    #[test]
    fn startup_second_sipi_to_running_ap_is_dropped() {
        let (a, s) = startup(Activity::Running, false, false, Some(0x08));
        assert_eq!(a, Activity::Running);
        assert!(s.dropped_sipi && s.sipi.is_none() && !s.init);
    }

    #[test]
    fn startup_bsp_init_runs_at_reset_vector_and_ignores_sipi() {
        let (a, s) = startup(Activity::Running, true, true, Some(0x08));
        assert_eq!(a, Activity::Running);
        assert!(s.init && s.dropped_sipi && s.sipi.is_none());
    }

    #[test]
    fn startup_nothing_pending_changes_nothing() {
        for a in [Activity::Running, Activity::WaitForSipi] {
            assert_eq!(startup(a, false, false, None), (a, Startup::default()));
        }
    }

    #[test]
    fn injection_ready_injects_not_ready_asks_for_window() {
        assert_eq!(injection(Some(0x41), true, false), Injection::Inject(0x41));
        assert_eq!(injection(Some(0x41), false, false), Injection::Window);
        assert_eq!(injection(None, true, false), Injection::Idle);
        assert_eq!(injection(None, false, false), Injection::Idle);
    }

    #[test]
    fn injection_while_kvm_holds_an_nmi_waits_for_window() {
        assert_eq!(injection(Some(0x41), true, true), Injection::Window);
        assert_eq!(injection(None, true, true), Injection::Idle);
    }

    #[test]
    fn halt_ends_on_deliverable_vector_only_with_if_set() {
        let mut l = enabled_lapic();
        assert!(!halt_ends(&l, true));
        let _ = l.accept(&Message::fixed_physical(1, 0x51));
        assert!(halt_ends(&l, true));
        assert!(!halt_ends(&l, false));
    }

    #[test]
    fn halt_ends_not_while_cr8_masks_the_vector() {
        let mut l = enabled_lapic();
        let _ = l.accept(&Message::fixed_physical(1, 0x51));
        assert_eq!(l.set_cr8(6), None);
        assert!(!halt_ends(&l, true));
        // Lowering CR8 below the vector's class makes it deliverable.
        assert_eq!(l.set_cr8(4), Some(0x51));
        assert!(halt_ends(&l, true));
    }

    #[test]
    fn halt_ends_on_nmi_even_with_if_clear() {
        let mut l = enabled_lapic();
        let mut nmi = Message::fixed_physical(1, 0);
        nmi.delivery_mode = irqchip::apic_bus::DeliveryMode::Nmi;
        let _ = l.accept(&nmi);
        assert!(halt_ends(&l, false));
    }

    #[test]
    fn tpr_blocked_only_when_the_tpr_alone_holds_the_vector() {
        let mut l = enabled_lapic();
        assert!(!tpr_blocked(&l));
        let _ = l.accept(&Message::fixed_physical(1, 0x51));
        assert!(!tpr_blocked(&l), "deliverable is not blocked");
        assert_eq!(l.set_cr8(5), None);
        assert!(tpr_blocked(&l));
        assert_eq!(l.set_cr8(0), Some(0x51));
        // In service 0x61 holds 0x51: an EOI (an exit) releases it, no poll.
        let _ = l.accept(&Message::fixed_physical(1, 0x61));
        assert_eq!(l.acknowledge(), Some(0x61));
        assert!(!tpr_blocked(&l));
    }

    #[test]
    fn injection_follows_acknowledge_priority() {
        let mut l = enabled_lapic();
        let _ = l.accept(&Message::fixed_physical(1, 0x51));
        let _ = l.accept(&Message::fixed_physical(1, 0x61));
        assert_eq!(
            injection(l.highest_deliverable(), true, false),
            Injection::Inject(0x61)
        );
        assert_eq!(l.acknowledge(), Some(0x61));
        // 0x51 is below the in-service class now: nothing until the EOI.
        assert_eq!(
            injection(l.highest_deliverable(), true, false),
            Injection::Idle
        );
        assert_eq!(l.eoi(), None);
        assert_eq!(
            injection(l.highest_deliverable(), true, false),
            Injection::Inject(0x51)
        );
    }
}
