//! Shared helpers of the KVM integration tests: the KVM check, a test
//! kernel builder on top of the mini assembler, and running `vmm`.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

pub mod asm;
pub mod expect;
pub mod suite;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use asm::{Asm, assemble};

/// Where the test kernels load (1 MiB).
pub const LOAD: u32 = 0x10_0000;
/// Top of the test kernels' stack.
pub const STACK_TOP: u32 = 0x9_0000;
/// Scratch dwords in low memory (below the stack, above the info area).
pub const VAR0: u32 = 0x7000;
/// Second scratch dword.
pub const VAR1: u32 = 0x7004;
/// Third scratch dword.
pub const VAR2: u32 = 0x7008;
/// EAX as the loader left it.
pub const BOOT_EAX: u32 = 0x700c;
/// Long-mode page tables: PML4, PDPT, then four page directories (2 MiB
/// pages identity-mapping the low 4 GiB, MMIO windows included).
pub const PML4: u32 = 0x2_0000;
const PDPT: u32 = 0x2_1000;
const PD: u32 = 0x2_2000;

/// Multiboot header magic and flags (a.out kludge | memory info).
const MB_MAGIC: u32 = 0x1bad_b002;
const MB_FLAGS: u32 = (1 << 16) | (1 << 1);
const MB_HEADER_LEN: u32 = 32;

/// Local APIC registers (xAPIC MMIO).
pub const LAPIC_SVR: u32 = 0xfee0_00f0;
/// EOI register.
pub const LAPIC_EOI: u32 = 0xfee0_00b0;
/// ICR low.
pub const LAPIC_ICR_LO: u32 = 0xfee0_0300;
/// ICR high.
pub const LAPIC_ICR_HI: u32 = 0xfee0_0310;
/// IOAPIC index register.
pub const IOAPIC_SEL: u32 = 0xfec0_0000;
/// IOAPIC data window.
pub const IOAPIC_WIN: u32 = 0xfec0_0010;
/// RTE bit 15: level-triggered.
pub const RTE_LEVEL: u32 = 1 << 15;

/// True when the KVM tests can run (`guest_image::require_kvm`: without
/// /dev/kvm this fails the test with a clear message, unless
/// `VMM_SKIP_KVM_TESTS=1` asks to skip).
pub fn require_kvm() -> bool {
    guest_image::require_kvm()
}

/// A Multiboot a.out-kludge image of `code` assembled to start right after
/// the header.
pub fn multiboot_image(code: &[u8], bss: u32) -> Vec<u8> {
    let total = MB_HEADER_LEN + code.len() as u32;
    let mut img = Vec::new();
    for v in [
        MB_MAGIC,
        MB_FLAGS,
        0u32.wrapping_sub(MB_MAGIC.wrapping_add(MB_FLAGS)),
        LOAD,
        LOAD,
        LOAD + total,
        LOAD + total + bss,
        LOAD + MB_HEADER_LEN,
    ] {
        img.extend_from_slice(&v.to_le_bytes());
    }
    img.extend_from_slice(code);
    img
}

/// A test kernel. From the 32-bit Multiboot entry it loads its own GDT
/// and a 64-bit IDT with `handlers` (`(vector, label)`; the body defines
/// the labels, ending them with `iretq`), identity-maps 4 GiB with 2 MiB
/// pages and enters long mode, like the guest kernel does. (A KVM that runs
/// guest code through an instruction emulator may not emulate a 32-bit
/// protected-mode `iret`, so interrupt tests use long mode; see the
/// README's "Host KVM quirks".) Then `body` runs in 64-bit mode with
/// EAX/EBX as the loader left them. Subroutines the body may call: `print`
/// (ESI = NUL-terminated string; clobbers EAX, EDX, ESI) and `exit_eax`
/// (exit port <- EAX). Falling off the body exits with 0xee.
pub fn kernel(handlers: &[(u8, &'static str)], body: impl Fn(&mut Asm)) -> Vec<u8> {
    let code = assemble(LOAD + MB_HEADER_LEN, |a| {
        a.cli();
        a.mov_r_imm(4, STACK_TOP); // esp
        a.store_eax(BOOT_EAX);
        a.lgdt(a.addr("gdtr"));
        a.ljmp(0x08, "flat");
        a.label("flat");
        a.load_data_segments(0x10);
        a.lidt(a.addr("idtr"));
        a.store_imm(PML4, PDPT | 3);
        a.store_imm(PML4 + 4, 0);
        for i in 0..4 {
            a.store_imm(PDPT + 8 * i, (PD + 0x1000 * i) | 3);
            a.store_imm(PDPT + 8 * i + 4, 0);
        }
        a.fill_2m_identity(PD, 4 * 512, "pt_loop");
        a.enable_long_mode(PML4);
        a.ljmp(0x18, "long");
        a.label("long");
        a.bytes(&[0x89, 0xdb]); // mov ebx, ebx: clear the upper half
        a.load_eax(BOOT_EAX);
        body(a);
        a.mov_eax(0xee);
        a.label("exit_eax");
        a.mov_dx(0xf4);
        a.out_dx_eax();
        a.label("halt");
        a.cli();
        a.hlt();
        a.jmp("halt");

        a.label("print");
        a.label("print_loop");
        a.mov_al_esi();
        a.test_al();
        a.je("print_done");
        a.mov_dx(0x3f8);
        a.out_dx_al();
        a.inc_esi();
        a.jmp("print_loop");
        a.label("print_done");
        a.ret();

        a.align(8);
        a.label("gdt");
        for d in [
            0u64,
            0x00cf_9a00_0000_ffff, // 0x08: 32-bit code
            0x00cf_9200_0000_ffff, // 0x10: data
            0x00af_9a00_0000_ffff, // 0x18: 64-bit code
        ] {
            a.bytes(&d.to_le_bytes());
        }
        a.label("gdtr");
        a.dw(31);
        let gdt = a.addr("gdt");
        a.dd(gdt);
        a.align(8);
        a.label("idt");
        for v in 0..=255u8 {
            match handlers.iter().find(|(hv, _)| *hv == v) {
                Some((_, label)) => {
                    let off = a.addr(label);
                    a.dd((0x18 << 16) | (off & 0xffff));
                    a.dd((off & 0xffff_0000) | 0x8e00);
                    a.dd(0);
                    a.dd(0);
                }
                None => a.bytes(&[0; 16]),
            }
        }
        a.label("idtr");
        a.dw(256 * 16 - 1);
        let idt = a.addr("idt");
        a.dd(idt);
    });
    multiboot_image(&code, 0)
}

/// Emits: print the string at label `s`.
pub fn print(a: &mut Asm, s: &'static str) {
    let addr = a.addr(s);
    a.mov_r_imm(6, addr); // esi
    a.call("print");
}

/// Emits: exit with `code`.
pub fn exit(a: &mut Asm, code: u32) {
    a.mov_eax(code);
    a.jmp("exit_eax");
}

/// Emits: mask both 8259s.
pub fn mask_pic(a: &mut Asm) {
    a.outb(0x21, 0xff);
    a.outb(0xa1, 0xff);
}

/// Emits: software-enable the local APIC (SVR = 0x1ff).
pub fn lapic_enable(a: &mut Asm) {
    a.store_imm(LAPIC_SVR, 0x1ff);
}

/// Emits: program IOAPIC pin `pin` (low dword `low`, destination APIC `dest`).
pub fn ioapic_route(a: &mut Asm, pin: u32, low: u32, dest: u32) {
    a.store_imm(IOAPIC_SEL, 0x11 + 2 * pin);
    a.store_imm(IOAPIC_WIN, dest << 24);
    a.store_imm(IOAPIC_SEL, 0x10 + 2 * pin);
    a.store_imm(IOAPIC_WIN, low);
}

/// Local APIC destination format register.
pub const LAPIC_DFR: u32 = 0xfee0_00e0;
/// Local APIC logical destination register.
pub const LAPIC_LDR: u32 = 0xfee0_00d0;

/// The default device table's device 8: one MSI, its vector, and the
/// message-signaled test device that raises it (index 0).
pub const MSI_DEVICE: u32 = 8;
/// Device 8's message vector.
pub const MSI_VECTOR: u8 = 0x5f;
/// Where [`connect_msi_device`] builds its CONNECT_EX block and table.
const MSI_BLOCK: u32 = 0x8000;
const MSI_TABLE: u32 = 0x8100;

/// Emits: the PV platform's logical-destination convention on this
/// (only) processor (flat, logical ID `1 << 0`), then a MESSAGE_BASED
/// CONNECT_EX of [`MSI_DEVICE`] through the PV doorbell, so the host
/// programs its message; jumps to `fail` unless it answered
/// STATUS_SUCCESS.
pub fn connect_msi_device(a: &mut Asm, fail: &'static str) {
    use irqconnect_abi::pv::{ConnectEx, RequestHeader, connect_version, opcode};
    use zerocopy::{FromZeros, IntoBytes};
    a.store_imm(LAPIC_DFR, 0xffff_ffff);
    a.store_imm(LAPIC_LDR, 1 << 24);
    let mut c = ConnectEx::new_zeroed();
    c.header = RequestHeader::new::<ConnectEx>(opcode::CONNECT_EX);
    c.version = connect_version::MESSAGE_BASED;
    c.device_id = MSI_DEVICE;
    c.service_routine = u64::from(LOAD);
    c.message_table = u64::from(MSI_TABLE);
    c.message_table_length = 0x100;
    for (i, word) in c.as_bytes().chunks_exact(4).enumerate() {
        let v = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        a.store_imm(MSI_BLOCK + 4 * i as u32, v);
    }
    a.outl(irqconnect_abi::layout::PV_DOORBELL_PORT, MSI_BLOCK);
    let status = MSI_BLOCK + core::mem::offset_of!(RequestHeader, status) as u32;
    a.cmp_mem(status, 0);
    a.jne(fail);
}

/// Emits: EOI to the local APIC.
pub fn eoi(a: &mut Asm) {
    a.store_imm(LAPIC_EOI, 0);
}

/// Emits: `cli; while [var] < n { sti; hlt; cli }` — wait for interrupts
/// without sleeping through one that arrives between the check and `hlt`.
pub fn wait_until_at_least(a: &mut Asm, var: u32, n: u32, label: &'static str, done: &'static str) {
    a.label(label);
    a.cli();
    a.cmp_mem(var, n);
    a.jae(done);
    a.sti();
    a.hlt();
    a.jmp(label);
    a.label(done);
}

/// The result of one `vmm` run.
#[derive(Debug)]
pub struct Run {
    /// Exit status (None: killed by a signal).
    pub status: Option<i32>,
    /// The guest's serial output.
    pub stdout: String,
    /// Diagnostics and the statistics line.
    pub stderr: String,
}

/// A scratch file `name` in a fresh temporary directory; the directory and
/// everything in it are removed when the guard drops, whether the test
/// passed or panicked.
pub struct Scratch {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.path
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.path.as_os_str()
    }
}

/// A scratch file path for `name` (see [`Scratch`]).
pub fn scratch(name: &str) -> Scratch {
    let dir = tempfile::Builder::new()
        .prefix("vmm-tests-")
        .tempdir()
        .unwrap();
    let path = dir.path().join(name);
    Scratch { _dir: dir, path }
}

/// Runs `vmm` on `image` (written to a scratch file) with `args`; stdin
/// gets `stdin` (then EOF) or /dev/null.
pub fn run_vmm(name: &str, image: &[u8], args: &[&str], stdin: Option<&[u8]>) -> Run {
    let path = scratch(&format!("{name}.elf"));
    std::fs::write(&path, image).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.arg("--kernel").arg(&path).args(args);
    run_cmd(cmd, stdin)
}

/// Runs `vmm` with `args` only (no `--kernel`).
pub fn run_vmm_args(args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.args(args);
    run_cmd(cmd, None)
}

/// Runs `vmm` with `args` and requires exit status 0 (the guest passed);
/// the panic shows `what` and both outputs.
pub fn run_vmm_ok(what: &str, args: &[&str]) -> Run {
    let run = run_vmm_args(args);
    assert_eq!(
        run.status,
        Some(0),
        "{what}: {}\n{}",
        run.stdout,
        run.stderr
    );
    run
}

fn run_cmd(mut cmd: Command, stdin: Option<&[u8]>) -> Run {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().expect("spawn vmm");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input).unwrap();
        // Dropping the pipe sends EOF.
    }
    let out = child.wait_with_output().unwrap();
    Run {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
