//! From the PV service's routes to the redirection entry the interrupt
//! controller programs.
//!
//! The service decides routes as processor masks ([`PinRoute`]);
//! [`ApicDestination::for_route`] turns a mask into an APIC destination for
//! the platform's convention (an 8-bit logical destination for masks within
//! processors 0..7: xAPIC flat with LDR = 1 << index, and, when x2APIC is
//! offered and APIC ID = index, x2APIC cluster 0 as well; else physical to
//! the lowest processor's APIC ID), and [`entry_for`] into the
//! [`RedirectionEntry`] every irqchip mode takes: the one place a route
//! becomes an entry.

use irqchip::apic_bus::{DeliveryMode, TriggerMode};
use irqchip::ioapic::RedirectionEntry;
use irqconnect::route::ApicDestination;
use irqconnect::{PinRoute, Platform};

/// The entry of a pin routed as `route` on `platform`: active high, with
/// the route's vector and trigger mode. A masked route, or one that names
/// no processor, is a masked entry (it keeps the vector and trigger mode,
/// so Remote IRR handling does not change under it).
pub(crate) fn entry_for(route: &PinRoute, platform: &Platform) -> RedirectionEntry {
    let base = RedirectionEntry::new()
        .with_vector(route.vector)
        .with_level_triggered(route.trigger == TriggerMode::Level)
        .with_masked(true);
    match ApicDestination::for_route(route, platform) {
        ApicDestination::Logical {
            mask,
            lowest_priority,
        } => base
            .with_logical(true)
            .with_destination(mask)
            .with_delivery_mode(if lowest_priority {
                DeliveryMode::LowestPriority
            } else {
                DeliveryMode::Fixed
            })
            .with_masked(false),
        ApicDestination::Physical { apic_id } => match u8::try_from(apic_id) {
            Ok(id) => base.with_destination(id).with_masked(false),
            // An APIC ID the 8-bit destination cannot name: the pin cannot
            // reach it, so it stays masked rather than go elsewhere.
            Err(_) => base,
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

    fn route(destination: u64, trigger: TriggerMode) -> PinRoute {
        PinRoute {
            masked: false,
            vector: 0x70,
            trigger,
            destination,
            lowest_priority: destination.count_ones() > 1,
            connections: 1,
        }
    }

    /// The fields a route decides: (logical, destination, delivery mode,
    /// level, masked).
    fn fields(e: RedirectionEntry) -> (bool, u8, DeliveryMode, bool, bool) {
        (
            e.logical(),
            e.destination(),
            e.delivery_mode(),
            e.level_triggered(),
            e.masked(),
        )
    }

    #[test]
    fn entry_for_several_low_processors_logical_lowest_priority() {
        let e = entry_for(&route(0b1010, TriggerMode::Level), &platform(4, false));
        assert_eq!(e.vector(), 0x70);
        assert_eq!(
            fields(e),
            (true, 0b1010, DeliveryMode::LowestPriority, true, false)
        );
        assert!(!e.active_low() && !e.remote_irr());
        assert_eq!(e.extended_destination(), 0);
    }

    #[test]
    fn entry_for_one_processor_logical_fixed() {
        let e = entry_for(&route(0b0100, TriggerMode::Edge), &platform(4, false));
        assert_eq!(fields(e), (true, 0b0100, DeliveryMode::Fixed, false, false));
    }

    #[test]
    fn entry_for_processor_above_7_physical_to_lowest_apic_id() {
        // Processors 3 and 9; APIC ID of processor i is 2i here.
        let e = entry_for(
            &route((1 << 9) | (1 << 3), TriggerMode::Level),
            &platform(12, false),
        );
        assert_eq!(fields(e), (false, 6, DeliveryMode::Fixed, true, false));
    }

    #[test]
    fn entry_for_x2apic_ids_equal_indices_logical_lowest_priority() {
        let mut facts = PlatformFacts::uniform(4);
        facts.x2apic = true;
        let e = entry_for(
            &route(0b110, TriggerMode::Level),
            &Platform::new(facts).unwrap(),
        );
        assert_eq!(
            fields(e),
            (true, 0b110, DeliveryMode::LowestPriority, true, false)
        );
    }

    #[test]
    fn entry_for_x2apic_ids_not_indices_physical_fixed() {
        // Here processor i has APIC ID 2i: no logical byte fits both modes.
        let e = entry_for(&route(0b110, TriggerMode::Level), &platform(4, true));
        assert_eq!(fields(e), (false, 2, DeliveryMode::Fixed, true, false));
    }

    #[test]
    fn entry_for_masked_or_empty_route_masked_keeps_vector_and_trigger() {
        let plat = platform(4, false);
        let mut r = route(0b1, TriggerMode::Level);
        r.masked = true;
        let e = entry_for(&r, &plat);
        assert!(e.masked());
        assert_eq!((e.vector(), e.level_triggered()), (0x70, true));
        let empty = entry_for(&route(0, TriggerMode::Edge), &plat);
        assert!(empty.masked());
        let unused = entry_for(&PinRoute::UNUSED, &plat);
        assert!(unused.masked());
        assert_eq!(unused.vector(), 0);
    }

    #[test]
    fn entry_for_apic_id_above_8_bits_stays_masked() {
        let mut facts = PlatformFacts::uniform(2);
        facts.apic_ids = vec![0x100, 0x101];
        facts.x2apic = true;
        let e = entry_for(
            &route(0b1, TriggerMode::Edge),
            &Platform::new(facts).unwrap(),
        );
        assert!(e.masked());
    }
}
