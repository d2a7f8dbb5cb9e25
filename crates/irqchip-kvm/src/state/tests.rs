//! Tests of the state conversions (no KVM).

use irqchip::apic_bus::{Message, TriggerMode};
use irqchip::ioapic::{Ioapic, IoapicConfig, RedirectionEntry};
use irqchip::lapic::{Lapic, LapicState};

use super::*;

fn target(mode: Mode) -> Target {
    Target {
        mode,
        cpus: 2,
        x2apic: true,
        phys_addr_bits: 36,
        tsc_deadline: true,
    }
}

/// Our LAPIC of vCPU `index`, software-enabled, with `vectors` requested.
fn our_lapic(index: usize, vectors: &[u8]) -> LapicState {
    let mut l = Lapic::new(target(Mode::User).lapic_config(index));
    assert_eq!(l.mmio_write(0xf0, &0x1ffu32.to_le_bytes(), 0), None);
    assert_eq!(l.mmio_write(0x80, &0x20u32.to_le_bytes(), 0), None);
    for &v in vectors {
        let mut m = Message::fixed_physical(index as u32, v);
        m.trigger_mode = TriggerMode::Level;
        let _ = l.accept(&m);
    }
    l.save()
}

fn level_entry(vector: u8) -> RedirectionEntry {
    RedirectionEntry::new()
        .with_vector(vector)
        .with_level_triggered(true)
        .with_masked(false)
}

fn user_state() -> ChipState {
    let mut ioapic = Ioapic::new(IoapicConfig::default());
    let _ = ioapic.write_rte(16, level_entry(0x60));
    let _ = ioapic.set_line(16, true);
    let mut lines = vec![0u64; NUM_PINS];
    lines[16] = 1;
    ChipState {
        version: CHIP_STATE_VERSION,
        mode: Mode::User,
        x2apic: true,
        ioapic: IoapicSnapshot::Ours(Box::new(ioapic.save())),
        pic: None,
        vcpus: vec![
            VcpuChipState {
                lapic: LapicSnapshot::Ours(Box::new(our_lapic(0, &[0x60]))),
                activity: Activity::Running,
            },
            VcpuChipState {
                lapic: LapicSnapshot::Ours(Box::new(our_lapic(1, &[0x41]))),
                activity: Activity::Halted,
            },
        ],
        arbiter: Some(Default::default()),
        clock_ns: 5_000,
        lines,
        line_assertions: vec![0; NUM_PINS],
        counters: CountersState::default(),
    }
}

fn kvm_pic(imr: u8) -> Vec<u8> {
    let mut bytes = vec![0u8; 8 + 512];
    bytes[PIC_IMR_OFFSET] = imr;
    bytes
}

#[test]
fn convert_same_mode_keeps_everything() {
    // Arrange
    let state = user_state();
    // Act
    let out = state.convert(&target(Mode::User));
    // Assert
    assert_eq!(out, Ok(state));
}

#[test]
fn convert_user_to_split_then_back_keeps_registers() {
    // Arrange
    let state = user_state();
    // Act
    let split = state.convert(&target(Mode::Split)).unwrap();
    let back = split.convert(&target(Mode::User)).unwrap();
    // Assert
    assert!(matches!(split.vcpus[0].lapic, LapicSnapshot::Kvm { .. }));
    assert_eq!(split.ioapic, state.ioapic, "split and user share the model");
    for (a, b) in state.vcpus.iter().zip(&back.vcpus) {
        let (LapicSnapshot::Ours(a), LapicSnapshot::Ours(b)) = (&a.lapic, &b.lapic) else {
            panic!("not converted back");
        };
        assert_eq!(
            (a.irr, a.isr, a.tmr, a.tpr, a.svr),
            (b.irr, b.isr, b.tmr, b.tpr, b.svr)
        );
        assert_eq!(a.apic_base, b.apic_base);
    }
    assert_eq!(back.vcpus[1].activity, Activity::Halted);
}

#[test]
fn convert_user_to_split_refuses_a_pending_nmi_naming_the_vcpu() {
    // Arrange
    let mut state = user_state();
    if let LapicSnapshot::Ours(l) = &mut state.vcpus[1].lapic {
        l.events.nmis = 1;
    }
    // Act
    let err = state.convert(&target(Mode::Split)).unwrap_err();
    // Assert
    let text = err.to_string();
    assert!(text.contains("vCPU 1") && text.contains("an NMI"), "{text}");
    assert!(!text.contains('\n'));
}

#[test]
fn convert_to_kernel_is_refused() {
    // Arrange
    let state = user_state();
    // Act
    let err = state.convert(&target(Mode::Kernel)).unwrap_err();
    // Assert
    assert!(err.to_string().contains("EOI register"), "{err}");
}

fn kernel_state() -> ChipState {
    let mut split = user_state().convert(&target(Mode::Split)).unwrap();
    let mut entries = vec![0u64; NUM_PINS];
    entries[16] = level_entry(0x60).with_remote_irr(true).into_bits();
    entries[17] = RedirectionEntry::new()
        .with_vector(0x61)
        .with_masked(false)
        .into_bits()
        | irqchip::ioapic::spec::RTE_DELIVERY_STATUS;
    split.mode = Mode::Kernel;
    split.ioapic = IoapicSnapshot::Kvm(KvmIoapicState {
        base_address: 0xfec0_0000,
        ioregsel: 0x10,
        id: 0,
        irr: 1 << 16,
        entries,
    });
    split.pic = Some([kvm_pic(0xff), kvm_pic(0xff)]);
    split.arbiter = None;
    split.clock_ns = 0;
    split
}

#[test]
fn convert_kernel_to_user_carries_entries_lines_and_lapics() {
    // Arrange
    let state = kernel_state();
    // Act
    let user = state.convert(&target(Mode::User)).unwrap();
    // Assert
    let IoapicSnapshot::Ours(ioapic) = &user.ioapic else {
        panic!("not converted");
    };
    let pin16 = RedirectionEntry::from_bits(ioapic.entries[16]);
    assert!(pin16.remote_irr() && pin16.level_triggered() && pin16.vector() == 0x60);
    let pin17 = RedirectionEntry::from_bits(ioapic.entries[17]);
    assert!(
        !pin17.delivery_status(),
        "our model's delivery is immediate"
    );
    assert_eq!(ioapic.lines, 1 << 16);
    assert_eq!(ioapic.storm_counts, [0; NUM_PINS]);
    assert_eq!(ioapic.ioregsel, 0x10);
    assert!(user.pic.is_none());
    let mut restored = Ioapic::new(IoapicConfig::default());
    assert!(
        restored.restore(ioapic).is_ok(),
        "a state our model accepts"
    );
    let LapicSnapshot::Ours(l) = &user.vcpus[0].lapic else {
        panic!("not converted");
    };
    assert_eq!(l.irr[3], 1, "vector 0x60 requested");
    assert_eq!(l.tpr, 0x20);
}

#[test]
fn convert_kernel_to_user_refuses_an_unmasked_8259() {
    // Arrange
    let mut state = kernel_state();
    state.pic = Some([kvm_pic(0xfb), kvm_pic(0xff)]);
    // Act
    let err = state.convert(&target(Mode::User)).unwrap_err();
    // Assert
    assert!(err.to_string().contains("master 8259"), "{err}");
}

#[test]
fn convert_checks_version_count_and_kinds() {
    let mut state = user_state();
    state.version = 7;
    assert_eq!(
        state.convert(&target(Mode::User)),
        Err(ConvertError::Version { found: 7 })
    );
    let mut state = user_state();
    state.vcpus.pop();
    assert!(matches!(
        state.convert(&target(Mode::User)),
        Err(ConvertError::Mismatch(_))
    ));
    let mut state = user_state();
    state.mode = Mode::Kernel;
    assert!(matches!(
        state.convert(&target(Mode::User)),
        Err(ConvertError::Corrupt(_))
    ));
    let mut state = user_state();
    state.lines.push(0);
    assert!(matches!(
        state.convert(&target(Mode::User)),
        Err(ConvertError::Corrupt(_))
    ));
}

/// The user state with every LAPIC switched to x2APIC mode.
fn user_state_x2apic() -> ChipState {
    let mut state = user_state();
    for (index, vcpu) in state.vcpus.iter_mut().enumerate() {
        let LapicSnapshot::Ours(saved) = &vcpu.lapic else {
            panic!("user state");
        };
        let mut l = Lapic::restore(saved);
        let base = saved.apic_base | APIC_BASE_X2APIC;
        assert!(l.msr_write(IA32_APIC_BASE, base, 0).is_ok(), "vCPU {index}");
        vcpu.lapic = LapicSnapshot::Ours(Box::new(l.save()));
    }
    state
}

fn page_id(lapic: &LapicSnapshot) -> u32 {
    let LapicSnapshot::Kvm { page, .. } = lapic else {
        panic!("not KVM's page");
    };
    u32::from_le_bytes([page[0x20], page[0x21], page[0x22], page[0x23]])
}

#[test]
fn convert_x2apic_ids_in_the_form_each_kvm_mode_takes() {
    // Arrange
    let state = user_state_x2apic();
    // Act
    let split = state.convert(&target(Mode::Split)).unwrap();
    let mut kernel = split.clone();
    kernel.mode = Mode::Kernel;
    kernel.ioapic = kernel_state().ioapic;
    kernel.pic = kernel_state().pic;
    kernel.arbiter = None;
    for vcpu in &mut kernel.vcpus {
        let id = page_id(&vcpu.lapic) << 24;
        if let LapicSnapshot::Kvm { page, .. } = &mut vcpu.lapic {
            page[0x20..0x24].copy_from_slice(&id.to_le_bytes());
        }
    }
    let from_kernel = kernel.convert(&target(Mode::Split)).unwrap();
    // Assert: split mode's KVM takes 32-bit IDs (KVM_X2APIC_API), and
    // refuses a page whose ID is not the vCPU's; kernel mode's the
    // shifted form.
    assert_eq!(page_id(&split.vcpus[1].lapic), 1);
    assert_eq!(page_id(&kernel.vcpus[1].lapic), 1 << 24);
    assert_eq!(page_id(&from_kernel.vcpus[1].lapic), 1);
    assert_eq!(page_id(&from_kernel.vcpus[0].lapic), 0);
}
