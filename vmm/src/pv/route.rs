//! From the PV service's routes to what the interrupt controller programs.
//!
//! The service decides routes as processor masks ([`PinRoute`]);
//! [`ApicDestination::for_route`] turns a mask into an APIC destination for
//! the platform's convention (an 8-bit logical destination for masks within
//! processors 0..7: xAPIC flat with LDR = 1 << index, and, when x2APIC is
//! offered and APIC ID = index, x2APIC cluster 0 as well; else physical to
//! the lowest processor's APIC ID),
//! and [`pin_program`] into the [`PinProgram`] every irqchip mode takes.

use irqconnect::route::ApicDestination;
use irqconnect::{PinRoute, Platform, Trigger};

use crate::irq::{PinDelivery, PinDestMode, PinProgram, PinTrigger};

/// The program of a pin routed as `route` on `platform`. A masked route,
/// or one that names no processor, becomes a masked program that keeps the
/// route's vector and trigger mode.
pub(crate) fn pin_program(route: &PinRoute, platform: &Platform) -> PinProgram {
    let trigger = match route.trigger {
        Trigger::Edge => PinTrigger::Edge,
        Trigger::Level => PinTrigger::Level,
    };
    let base = PinProgram {
        vector: route.vector,
        trigger,
        dest_mode: PinDestMode::Physical,
        destination: 0,
        delivery: PinDelivery::Fixed,
        masked: true,
    };
    match ApicDestination::for_route(route, platform) {
        ApicDestination::Logical {
            mask,
            lowest_priority,
        } => PinProgram {
            dest_mode: PinDestMode::Logical,
            destination: u32::from(mask),
            delivery: if lowest_priority {
                PinDelivery::LowestPriority
            } else {
                PinDelivery::Fixed
            },
            masked: false,
            ..base
        },
        ApicDestination::Physical { apic_id } => PinProgram {
            destination: apic_id,
            masked: false,
            ..base
        },
        ApicDestination::None => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqconnect::PlatformFacts;

    fn platform(cpus: u32, x2apic: bool) -> Platform {
        let mut facts = PlatformFacts::uniform(cpus);
        facts.x2apic = x2apic;
        facts.apic_ids = (0..cpus).map(|i| i * 2).collect();
        Platform::new(facts).unwrap()
    }

    fn route(destination: u64, trigger: Trigger) -> PinRoute {
        PinRoute {
            masked: false,
            vector: 0x70,
            trigger,
            destination,
            lowest_priority: destination.count_ones() > 1,
            connections: 1,
        }
    }

    #[test]
    fn pin_program_several_low_processors_logical_lowest_priority() {
        let p = pin_program(&route(0b1010, Trigger::Level), &platform(4, false));
        assert_eq!(
            p,
            PinProgram {
                vector: 0x70,
                trigger: PinTrigger::Level,
                dest_mode: PinDestMode::Logical,
                destination: 0b1010,
                delivery: PinDelivery::LowestPriority,
                masked: false,
            }
        );
    }

    #[test]
    fn pin_program_one_processor_logical_fixed() {
        let p = pin_program(&route(0b0100, Trigger::Edge), &platform(4, false));
        assert_eq!(
            (p.dest_mode, p.destination, p.delivery, p.trigger, p.masked),
            (
                PinDestMode::Logical,
                0b0100,
                PinDelivery::Fixed,
                PinTrigger::Edge,
                false
            )
        );
    }

    #[test]
    fn pin_program_processor_above_7_physical_to_lowest_apic_id() {
        // Processors 3 and 9; APIC ID of processor i is 2i here.
        let p = pin_program(
            &route((1 << 9) | (1 << 3), Trigger::Level),
            &platform(12, false),
        );
        assert_eq!(
            (p.dest_mode, p.destination, p.delivery, p.masked),
            (PinDestMode::Physical, 6, PinDelivery::Fixed, false)
        );
    }

    #[test]
    fn pin_program_x2apic_ids_equal_indices_logical_lowest_priority() {
        let mut facts = PlatformFacts::uniform(4);
        facts.x2apic = true;
        let p = pin_program(
            &route(0b110, Trigger::Level),
            &Platform::new(facts).unwrap(),
        );
        assert_eq!(
            (p.dest_mode, p.destination, p.delivery),
            (PinDestMode::Logical, 0b110, PinDelivery::LowestPriority)
        );
    }

    #[test]
    fn pin_program_x2apic_ids_not_indices_physical_fixed() {
        // Here processor i has APIC ID 2i: no logical byte fits both modes.
        let p = pin_program(&route(0b110, Trigger::Level), &platform(4, true));
        assert_eq!(
            (p.dest_mode, p.destination, p.delivery),
            (PinDestMode::Physical, 2, PinDelivery::Fixed)
        );
    }

    #[test]
    fn pin_program_masked_or_empty_route_masked_keeps_vector_and_trigger() {
        let plat = platform(4, false);
        let mut r = route(0b1, Trigger::Level);
        r.masked = true;
        let p = pin_program(&r, &plat);
        assert!(p.masked);
        assert_eq!((p.vector, p.trigger), (0x70, PinTrigger::Level));
        let empty = pin_program(&route(0, Trigger::Edge), &plat);
        assert!(empty.masked);
        let unused = pin_program(&PinRoute::UNUSED, &plat);
        assert!(unused.masked);
        assert_eq!(unused.vector, 0);
    }
}
