//! Connect + disconnect with 1,000 live connections: the cost of one
//! IoConnectInterrupt / IoDisconnectInterrupt pair on a busy VM, and of one
//! MESSAGE_BASED IoConnectInterruptEx / IoDisconnectInterruptEx pair of the
//! 8-message MSI-X device (device 10); and the destination choice for a
//! mask of all 255 processors in each APIC model.
//!
//! `cargo bench -p irqconnect`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use irqconnect::connect_ex::{BlockSpan, ConnectExRequest};
use irqconnect::devices::{DeviceTable, InterruptMode};
use irqconnect::platform::{Platform, PlatformFacts};
use irqconnect::{ConnectRequest, FlatRam, Handle, Service};
use irqconnect_abi::pv::{
    Connect, ConnectEx, Disconnect, DisconnectEx, RequestHeader, connect_version, interrupt_mode,
    opcode,
};
use zerocopy::{FromZeros, IntoBytes};

const CPUS: u32 = 64;
const LIVE: usize = 1000;
/// The processors the sharers spread over: 0..7, which one xAPIC flat
/// destination names together (rule R refuses a shared vector whose
/// processors no one destination names).
const SHARED_CPUS: u32 = 8;

fn shared(device: u32, vector: u32, cpu: u32) -> ConnectRequest {
    ConnectRequest {
        device_id: device,
        vector,
        irql: (vector >> 4) as u8,
        synchronize_irql: (vector >> 4) as u8,
        interrupt_mode: if vector == 0x80 {
            InterruptMode::Latched
        } else {
            InterruptMode::LevelSensitive
        },
        share_vector: true,
        floating_save: false,
        processor_enable_mask: 1 << (cpu % SHARED_CPUS),
        service_routine: 0x10_0000,
        service_context: 0x2000,
        spin_lock: 0x3000,
        version: connect_version::FULLY_SPECIFIED,
    }
}

/// 64 processors, quota 4096, 1,000 live connections: 500 on vector 0x70
/// (devices 2 and 3, pin 18) and 500 on vector 0x80 (devices 4 and 5, pins
/// 19 and 20), one processor each, spread over processors 0..7.
fn busy_service(ram: &FlatRam) -> Service {
    let platform = Platform::new(PlatformFacts::uniform(CPUS)).unwrap();
    let devices = DeviceTable::default_for(&platform);
    let mut s = Service::new(platform, devices, 4096).unwrap();
    for i in 0..LIVE as u32 {
        let (device, vector) = match i % 4 {
            0 => (2, 0x70),
            1 => (3, 0x70),
            2 => (4, 0x80),
            _ => (5, 0x80),
        };
        s.connect(&shared(device, vector, i), ram).unwrap();
    }
    assert_eq!(s.registry().connections() as usize, LIVE);
    s
}

fn bench(c: &mut Criterion) {
    let ram = FlatRam::new(0, 0x10_0000);
    let mut s = busy_service(&ram);
    let req = shared(2, 0x70, 7);
    c.bench_function("connect+disconnect, 1000 live", |b| {
        b.iter(|| {
            let done = s.connect(black_box(&req), &ram).unwrap();
            let routes = s.disconnect(black_box(done.handle)).unwrap();
            black_box(routes);
        })
    });

    // The same pair through the doorbell path: decode, validate, answer.
    let mut mem = FlatRam::new(0, 0x10_0000);
    let mut block = Connect::new_zeroed();
    block.header = RequestHeader::new::<Connect>(opcode::CONNECT);
    block.device_id = 4;
    block.vector = 0x80;
    block.irql = 8;
    block.synchronize_irql = 8;
    block.interrupt_mode = interrupt_mode::LATCHED;
    block.share_vector = 1;
    block.processor_enable_mask = 0b1010;
    block.service_routine = 0x10_0000;
    let mut bye = Disconnect::new_zeroed();
    bye.header = RequestHeader::new::<Disconnect>(opcode::DISCONNECT);
    use irqconnect::GuestRam;
    mem.write(0x1000, block.as_bytes()).unwrap();
    c.bench_function("doorbell connect+disconnect, 1000 live", |b| {
        b.iter(|| {
            let o = s.handle_doorbell(&mut mem, 0x1000);
            let mut raw = [0u8; 8];
            mem.read(0x1000 + 64, &mut raw).unwrap();
            bye.handle = Handle::from_raw(u64::from_le_bytes(raw)).raw();
            mem.write(0x2000, bye.as_bytes()).unwrap();
            let d = s.handle_doorbell(&mut mem, 0x2000);
            black_box((o, d));
        })
    });
}

/// MESSAGE_BASED CONNECT_EX of device 10 (8 MSI-X messages spread over
/// processors 0..7) and its DISCONNECT_EX, beside the 1,000 live
/// connections; directly and through the doorbell (the table written to
/// guest RAM).
fn bench_ex(c: &mut Criterion) {
    let mut ram = FlatRam::new(0, 0x10_0000);
    let mut s = busy_service(&ram);
    let req = ConnectExRequest {
        version: connect_version::MESSAGE_BASED,
        device_id: 10,
        service_routine: 0x10_0000,
        service_context: 0x2000,
        message_table: 0x4000,
        message_table_length: 0x1000,
        ..ConnectExRequest::default()
    };
    let block = BlockSpan {
        start: 0x3000,
        len: 120,
    };
    c.bench_function("connect_ex+disconnect_ex, 8 messages, 1000 live", |b| {
        b.iter(|| {
            let done = s.connect_ex(black_box(&req), block, &ram).unwrap();
            assert_eq!(done.count, 8);
            let gone = s
                .disconnect_ex(connect_version::MESSAGE_BASED, black_box(done.handle))
                .unwrap();
            black_box((done, gone));
        })
    });

    use irqconnect::GuestRam;
    let mut cx = ConnectEx::new_zeroed();
    cx.header = RequestHeader::new::<ConnectEx>(opcode::CONNECT_EX);
    cx.version = req.version;
    cx.device_id = req.device_id;
    cx.service_routine = req.service_routine;
    cx.service_context = req.service_context;
    cx.message_table = req.message_table;
    cx.message_table_length = req.message_table_length;
    ram.write(0x3000, cx.as_bytes()).unwrap();
    let mut dx = DisconnectEx::new_zeroed();
    dx.header = RequestHeader::new::<DisconnectEx>(opcode::DISCONNECT_EX);
    dx.version = connect_version::MESSAGE_BASED;
    let handle_at = 0x3000 + core::mem::offset_of!(ConnectEx, handle) as u64;
    c.bench_function(
        "doorbell connect_ex+disconnect_ex, 8 messages, 1000 live",
        |b| {
            b.iter(|| {
                let o = s.handle_doorbell(&mut ram, 0x3000);
                let mut raw = [0u8; 8];
                ram.read(handle_at, &mut raw).unwrap();
                dx.handle = u64::from_le_bytes(raw);
                ram.write(0x3100, dx.as_bytes()).unwrap();
                let d = s.handle_doorbell(&mut ram, 0x3100);
                assert_eq!(d.messages().len(), 8);
                black_box((o, d));
            })
        },
    );
}

/// The destination choice for a mask of all 255 processors (four groups)
/// in each model: the work CONNECT, CONNECT_EX and RETARGET do per route.
fn bench_choose(c: &mut Criterion) {
    use irqconnect::platform::IrqchipMode;
    use irqconnect::{ApicModel, ProcessorSet, Topology};
    let mut facts = PlatformFacts::uniform(255);
    facts.x2apic = true;
    facts.irqchip_mode = IrqchipMode::Split;
    let platform = Platform::new(facts).unwrap();
    let all = ProcessorSet::first_n(255);
    for model in [
        ApicModel::X2apic,
        ApicModel::XapicCluster,
        ApicModel::XapicFlat,
        ApicModel::Physical,
    ] {
        let t = Topology::new(&platform, model);
        c.bench_function(&format!("choose, 255-processor mask, {model:?}"), |b| {
            b.iter(|| black_box(t.choose(black_box(all), ProcessorSet::EMPTY)))
        });
    }
}

criterion_group!(benches, bench, bench_ex, bench_choose);
criterion_main!(benches);
