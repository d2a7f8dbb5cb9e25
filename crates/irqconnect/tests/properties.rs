//! Property tests: any sequence of connects and disconnects, valid and
//! invalid mixed, keeps the service's invariants.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use irqchip::apic_bus::TriggerMode as Trigger;
use irqconnect::devices::{DeviceTable, InterruptMode};
use irqconnect::platform::{Platform, PlatformFacts};
use irqconnect::registry::Connection;
use irqconnect::route::PinRoute;
use irqconnect::{
    ApicDestination, ConnectRequest, FlatRam, Handle, ProcessorSet, Service, Violation,
};
use irqconnect_abi::layout::IOAPIC_PINS;
use proptest::prelude::*;

const QUOTA: u32 = 24;
const RAM_SIZE: usize = 0x1_0000;

#[derive(Clone, Debug)]
enum Op {
    Connect {
        device: u32,
        resource: usize,
        flip_mode: bool,
        share: bool,
        mask: u64,
        sync_extra: u8,
        spin_lock: bool,
        routine: bool,
        vector_delta: u32,
    },
    /// Disconnect the `n`-th handle ever returned (live or dead).
    Disconnect(usize),
    /// Disconnect a forged handle.
    Forged(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (
            0u32..9,
            0usize..2,
            prop::bool::weighted(0.15),
            prop::bool::weighted(0.8),
            0u64..64,
            0u8..3,
            prop::bool::weighted(0.7),
            prop::bool::weighted(0.95),
            prop_oneof![8 => Just(0u32), 1 => 0u32..0x200],
        )
            .prop_map(
                |(device, resource, flip_mode, share, mask, sync_extra, spin_lock, routine, vector_delta)| {
                    Op::Connect {
                        device,
                        resource,
                        flip_mode,
                        share,
                        mask,
                        sync_extra,
                        spin_lock,
                        routine,
                        vector_delta,
                    }
                }
            ),
        3 => (0usize..64).prop_map(Op::Disconnect),
        1 => any::<u64>().prop_map(Op::Forged),
    ]
}

fn service(cpus: u32, online: u64) -> Service {
    let mut facts = PlatformFacts::uniform(cpus);
    facts.online_mask = online;
    let platform = Platform::new(facts).unwrap();
    let devices = DeviceTable::default_for(&platform);
    Service::new(platform, devices, QUOTA).unwrap()
}

fn request(s: &Service, op: &Op) -> Option<ConnectRequest> {
    let Op::Connect {
        device,
        resource,
        flip_mode,
        share,
        mask,
        sync_extra,
        spin_lock,
        routine,
        vector_delta,
    } = *op
    else {
        return None;
    };
    // Device 8 does not exist: use device 0's resource with it.
    let dev = s
        .devices()
        .device(device)
        .or_else(|| s.devices().device(0))?;
    let r = dev
        .resources()
        .get(resource)
        .or_else(|| dev.resources().first())?;
    let mode = match (r.mode, flip_mode) {
        (m, false) => m,
        (InterruptMode::Latched, true) => InterruptMode::LevelSensitive,
        (InterruptMode::LevelSensitive, true) => InterruptMode::Latched,
    };
    let vector = u32::from(r.vector).wrapping_add(vector_delta);
    let irql = (vector >> 4) as u8;
    Some(ConnectRequest {
        device_id: device,
        vector,
        irql,
        synchronize_irql: irql.saturating_add(sync_extra),
        interrupt_mode: mode,
        share_vector: share,
        floating_save: false,
        processor_enable_mask: mask,
        service_routine: if routine { 0x1000 } else { 0 },
        service_context: 0x2000,
        spin_lock: if spin_lock { 0x3000 } else { 0 },
        version: irqconnect_abi::pv::connect_version::FULLY_SPECIFIED,
    })
}

/// The route every pin must have, computed from the live connections alone.
fn implied_routes(s: &Service) -> Vec<PinRoute> {
    let live: Vec<(Handle, Connection)> = s.registry().iter().map(|(h, c)| (h, *c)).collect();
    (0..IOAPIC_PINS)
        .map(|pin| {
            let Some(r) = s.devices().resource_on_pin(pin) else {
                return PinRoute::UNUSED;
            };
            let on: Vec<&Connection> = live
                .iter()
                .map(|(_, c)| c)
                .filter(|c| c.vector == r.vector)
                .collect();
            let destination = on.iter().fold(0, |m, c| m | c.mask);
            let target = s
                .topology()
                .choose(ProcessorSet::of_group(0, destination), ProcessorSet::EMPTY)
                .map_or(ApicDestination::None, |c| c.destination);
            let first_mode = s
                .registry()
                .on_vector(r.vector)
                .next()
                .map_or(r.mode, |(_, c)| c.mode);
            PinRoute {
                masked: destination == 0,
                vector: r.vector,
                trigger: match first_mode {
                    InterruptMode::LevelSensitive => Trigger::Level,
                    InterruptMode::Latched => Trigger::Edge,
                },
                group: 0,
                destination,
                lowest_priority: destination.count_ones() > 1,
                connections: on.len() as u32,
                target,
            }
        })
        .collect()
}

fn check(
    s: &Service,
    dead: &[Handle],
    order: &BTreeMap<u8, Vec<Handle>>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(s.check_invariants(), Ok(()));
    prop_assert_eq!(s.routes(), implied_routes(s));
    let online = s.platform().online_mask();
    let mut objects = 0;
    for (h, c) in s.registry().iter() {
        prop_assert!(
            c.mask != 0 && c.mask & !online == 0,
            "object outside the mask"
        );
        objects += c.mask.count_ones();
        for cpu in 0..s.platform().cpu_count().min(64) {
            let in_chain = s.registry().chain(cpu, c.vector).contains(&h);
            prop_assert_eq!(in_chain, c.mask & (1 << cpu) != 0);
        }
    }
    prop_assert_eq!(objects, s.registry().objects_in_use());
    prop_assert!(objects <= QUOTA);
    for h in dead {
        prop_assert!(s.registry().get(*h).is_none(), "stale handle accepted");
    }
    for (vector, handles) in order {
        let actual: Vec<Handle> = s.registry().on_vector(*vector).map(|(h, _)| h).collect();
        prop_assert_eq!(&actual, handles, "chain order on {:#x}", vector);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn prop_any_sequence_keeps_invariants_and_unwinds_to_fresh(
        cpus in 1u32..7,
        online_bits in 1u64..64,
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let online = online_bits & ((1u64 << cpus) - 1);
        let online = if online == 0 { 1 } else { online };
        let fresh = service(cpus, online);
        let mut s = fresh.clone();
        let ram = FlatRam::new(0, RAM_SIZE);
        let mut issued: Vec<Handle> = Vec::new();
        let mut dead: Vec<Handle> = Vec::new();
        let mut order: BTreeMap<u8, Vec<Handle>> = BTreeMap::new();
        for op in &ops {
            let before = s.clone();
            match op {
                Op::Connect { .. } => {
                    let Some(req) = request(&s, op) else { continue };
                    match s.connect(&req, &ram) {
                        Ok(done) => {
                            prop_assert_ne!(done.handle.raw(), 0);
                            prop_assert_eq!(done.effective_mask, req.processor_enable_mask & online);
                            issued.push(done.handle);
                            let v = s.registry().get(done.handle).map(|c| c.vector);
                            order.entry(v.unwrap_or(0)).or_default().push(done.handle);
                        }
                        Err(_) => prop_assert_eq!(&s, &before, "a refused connect changed state"),
                    }
                }
                Op::Disconnect(n) => {
                    let Some(&h) = issued.get(n % issued.len().max(1)) else { continue };
                    let was_live = s.registry().get(h).is_some();
                    match s.disconnect(h) {
                        Ok(_) => {
                            prop_assert!(was_live);
                            dead.push(h);
                            for list in order.values_mut() {
                                list.retain(|x| *x != h);
                            }
                        }
                        Err(v) => {
                            prop_assert_eq!(v, Violation::UnknownHandle);
                            prop_assert!(!was_live);
                            prop_assert_eq!(&s, &before);
                        }
                    }
                }
                Op::Forged(raw) => {
                    let h = Handle::from_raw(*raw);
                    if s.registry().get(h).is_none() {
                        prop_assert_eq!(s.disconnect(h), Err(Violation::UnknownHandle));
                        prop_assert_eq!(&s, &before);
                    }
                }
            }
            check(&s, &dead, &order)?;
        }
        let live: Vec<Handle> = s.registry().iter().map(|(h, _)| h).collect();
        for h in live {
            prop_assert!(s.disconnect(h).is_ok());
        }
        prop_assert!(s.same_live_state(&fresh));
        prop_assert_eq!(s.routes(), fresh.routes());
        prop_assert_eq!(s.registry().objects_in_use(), 0);
        prop_assert_eq!(s.registry().connections(), 0);
    }

    #[test]
    fn prop_doorbell_on_arbitrary_memory_never_panics(
        memory in prop::collection::vec(any::<u8>(), 0..1200),
        doorbell in prop_oneof![0u32..1200, any::<u32>()],
    ) {
        irqconnect::harness::one_request(&memory, doorbell);
    }

    #[test]
    fn prop_session_on_arbitrary_bytes_keeps_invariants(
        data in prop::collection::vec(any::<u8>(), 0..2000),
    ) {
        irqconnect::harness::run_session(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn prop_mutated_seed_sessions_keep_invariants(
        seed in 0usize..16,
        flips in prop::collection::vec((any::<u16>(), any::<u8>()), 0..6),
    ) {
        let seeds = irqconnect::harness::seed_corpus();
        let (_, data) = &seeds[seed % seeds.len()];
        let mut data = data.clone();
        for (at, value) in flips {
            let len = data.len();
            data[usize::from(at) % len] = value;
        }
        irqconnect::harness::run_session(&data);
    }
}
