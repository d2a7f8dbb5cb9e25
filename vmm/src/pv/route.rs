//! From the PV service's routes to the redirection entry the interrupt
//! controller programs.
//!
//! The service decides each route's processors and the APIC destination
//! that reaches them ([`PinRoute::target`], chosen by
//! `irqconnect::destination::Topology::choose` for the guest's declared
//! APIC model and the platform's destination width); [`entry_for`] turns it
//! into the [`RedirectionEntry`] every irqchip mode takes: the one place a
//! route becomes an entry.

use irqchip::apic_bus::{DeliveryMode, TriggerMode};
use irqchip::ioapic::RedirectionEntry;
use irqconnect::{ApicDestination, PinRoute, Platform};

/// The entry of a pin routed as `route` on `platform`: active high, with
/// the route's vector and trigger mode, and its destination ID in the
/// platform's format (bits 8..14 in entry bits 49..55 with the extended
/// destination ID). A masked route, one that names no processor, or one
/// whose destination does not fit the format is a masked entry (it keeps
/// the vector and trigger mode, so Remote IRR handling does not change
/// under it).
pub(crate) fn entry_for(route: &PinRoute, platform: &Platform) -> RedirectionEntry {
    let base = RedirectionEntry::new()
        .with_vector(route.vector)
        .with_level_triggered(route.trigger == TriggerMode::Level)
        .with_masked(true);
    if route.masked {
        return base;
    }
    let ext = platform.destination_bits() > 8;
    let (entry, id) = match route.target {
        ApicDestination::Logical {
            destination,
            lowest_priority,
        } => (
            base.with_logical(true)
                .with_delivery_mode(if lowest_priority {
                    DeliveryMode::LowestPriority
                } else {
                    DeliveryMode::Fixed
                }),
            destination,
        ),
        ApicDestination::Physical { apic_id } => (base, apic_id),
        ApicDestination::None => return base,
    };
    match entry.with_destination_id(id, ext) {
        Some(e) => e.with_masked(false),
        // A destination the entry cannot carry: the pin cannot reach it, so
        // it stays masked rather than go elsewhere.
        None => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqconnect::destination::{ApicModel, Topology};
    use irqconnect::{PlatformFacts, ProcessorSet};

    fn platform(cpus: u32, x2apic: bool) -> Platform {
        let mut facts = PlatformFacts::uniform(cpus);
        facts.x2apic = x2apic;
        facts.apic_ids = (0..cpus).map(|i| i * 2).collect();
        Platform::new(facts).unwrap()
    }

    /// The route the service makes for `destination` on `platform`.
    fn route(destination: u64, trigger: TriggerMode, platform: &Platform) -> PinRoute {
        route_with(destination, trigger, platform, ApicModel::Undeclared)
    }

    fn route_with(
        destination: u64,
        trigger: TriggerMode,
        platform: &Platform,
        model: ApicModel,
    ) -> PinRoute {
        let choice = Topology::new(platform, model)
            .choose(ProcessorSet::of_group(0, destination), ProcessorSet::EMPTY);
        PinRoute {
            masked: false,
            vector: 0x70,
            trigger,
            group: 0,
            destination,
            lowest_priority: destination.count_ones() > 1,
            connections: 1,
            target: choice.map_or(ApicDestination::None, |c| c.destination),
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
        let p = platform(4, false);
        let e = entry_for(&route(0b1010, TriggerMode::Level, &p), &p);
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
        let p = platform(4, false);
        let e = entry_for(&route(0b0100, TriggerMode::Edge, &p), &p);
        assert_eq!(fields(e), (true, 0b0100, DeliveryMode::Fixed, false, false));
    }

    #[test]
    fn entry_for_processor_above_7_physical() {
        // APIC ID of processor i is 2i here.
        let p = platform(12, false);
        let e = entry_for(&route(1 << 9, TriggerMode::Level, &p), &p);
        assert_eq!(fields(e), (false, 18, DeliveryMode::Fixed, true, false));
    }

    #[test]
    fn entry_for_x2apic_ids_equal_indices_logical_lowest_priority() {
        let mut facts = PlatformFacts::uniform(4);
        facts.x2apic = true;
        let p = Platform::new(facts).unwrap();
        let e = entry_for(&route(0b110, TriggerMode::Level, &p), &p);
        assert_eq!(
            fields(e),
            (true, 0b110, DeliveryMode::LowestPriority, true, false)
        );
    }

    #[test]
    fn entry_for_x2apic_ids_not_indices_physical_fixed() {
        // Processor 1 has APIC ID 2: no logical byte fits both modes.
        let p = platform(4, true);
        let e = entry_for(&route(0b010, TriggerMode::Level, &p), &p);
        assert_eq!(fields(e), (false, 2, DeliveryMode::Fixed, true, false));
    }

    /// With the extended destination ID (split and user modes) an x2APIC
    /// guest's cluster 0 reaches APIC IDs 8..14 too: destination bits 8..14
    /// in entry bits 49..55.
    #[test]
    fn entry_for_x2apic_cluster_0_above_id_7_uses_the_extended_destination() {
        let mut facts = PlatformFacts::uniform(16);
        facts.x2apic = true;
        facts.irqchip_mode = irqchip::Mode::Split;
        let p = Platform::new(facts).unwrap();
        let e = entry_for(
            &route_with(0b11 << 9, TriggerMode::Edge, &p, ApicModel::X2apic),
            &p,
        );
        assert!(e.logical() && !e.masked());
        assert_eq!((e.destination(), e.extended_destination()), (0, 0b110 << 1));
    }

    #[test]
    fn entry_for_masked_or_empty_route_masked_keeps_vector_and_trigger() {
        let plat = platform(4, false);
        let mut r = route(0b1, TriggerMode::Level, &plat);
        r.masked = true;
        let e = entry_for(&r, &plat);
        assert!(e.masked());
        assert_eq!((e.vector(), e.level_triggered()), (0x70, true));
        let empty = entry_for(&route(0, TriggerMode::Edge, &plat), &plat);
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
        let p = Platform::new(facts).unwrap();
        let mut r = route(0b1, TriggerMode::Edge, &p);
        r.target = ApicDestination::Physical { apic_id: 0x100 };
        assert!(entry_for(&r, &p).masked());
    }
}
