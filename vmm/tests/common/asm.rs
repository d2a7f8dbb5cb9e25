//! A tiny two-pass x86 assembler for the test kernels: just the
//! instructions the tests use, hand-encoded (Intel SDM Vol. 2), with labels.
//!
//! Unless a method says otherwise, an encoding means the same in 32-bit
//! protected mode and in 64-bit mode, so one body runs in either: memory
//! operands go through EDI (`mov edi, imm32` zero-extends; a disp32 would
//! be sign-extended or RIP-relative in 64-bit mode, and the APIC windows
//! are above 2 GiB), and there are no one-byte `inc`/`dec` (REX prefixes in
//! 64-bit mode). Memory helpers clobber EDI.

use std::collections::HashMap;

/// Instruction emitter. Run a program twice through [`assemble`]: the first
/// pass learns the labels, the second emits with them resolved.
pub struct Asm {
    base: u32,
    code: Vec<u8>,
    labels: HashMap<&'static str, u32>,
    known: HashMap<&'static str, u32>,
}

/// Assembles `program` to run at `base`.
pub fn assemble(base: u32, program: impl Fn(&mut Asm)) -> Vec<u8> {
    let mut first = Asm::new(base, HashMap::new());
    program(&mut first);
    let mut second = Asm::new(base, first.labels);
    program(&mut second);
    assert_eq!(second.labels, second.known, "labels moved between passes");
    second.code
}

impl Asm {
    fn new(base: u32, known: HashMap<&'static str, u32>) -> Self {
        Self {
            base,
            code: Vec::new(),
            labels: HashMap::new(),
            known,
        }
    }

    /// The address of the next byte.
    pub fn here(&self) -> u32 {
        self.base + self.code.len() as u32
    }

    /// Defines `name` here.
    pub fn label(&mut self, name: &'static str) {
        let here = self.here();
        assert!(
            self.labels.insert(name, here).is_none(),
            "label {name} twice"
        );
    }

    /// The address of `name` (0 in the first pass).
    pub fn addr(&self, name: &'static str) -> u32 {
        self.known.get(name).copied().unwrap_or(0)
    }

    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.code.extend_from_slice(b);
    }

    /// A little-endian dword.
    pub fn dd(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    /// A little-endian word.
    pub fn dw(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }

    /// Pads with zeros to a multiple of `n`.
    pub fn align(&mut self, n: u32) {
        while !self.here().is_multiple_of(n) {
            self.code.push(0);
        }
    }

    fn rel32(&mut self, target: &'static str) {
        let next = self.here() + 4;
        let rel = self.addr(target).wrapping_sub(next);
        self.dd(rel);
    }

    /// `mov r32, imm32` (r: 0 eax, 1 ecx, 2 edx, 3 ebx, 4 esp, 5 ebp, 6 esi, 7 edi).
    pub fn mov_r_imm(&mut self, r: u8, imm: u32) {
        self.bytes(&[0xb8 + r]);
        self.dd(imm);
    }

    /// `mov eax, imm32`.
    pub fn mov_eax(&mut self, imm: u32) {
        self.mov_r_imm(0, imm);
    }

    /// `mov dx, imm16`.
    pub fn mov_dx(&mut self, imm: u16) {
        self.bytes(&[0x66, 0xba]);
        self.dw(imm);
    }

    /// `mov al, imm8`.
    pub fn mov_al(&mut self, imm: u8) {
        self.bytes(&[0xb0, imm]);
    }

    /// `out dx, al`.
    pub fn out_dx_al(&mut self) {
        self.bytes(&[0xee]);
    }

    /// `out dx, eax`.
    pub fn out_dx_eax(&mut self) {
        self.bytes(&[0xef]);
    }

    /// `in al, dx`.
    pub fn in_al_dx(&mut self) {
        self.bytes(&[0xec]);
    }

    /// `in eax, dx`.
    pub fn in_eax_dx(&mut self) {
        self.bytes(&[0xed]);
    }

    /// `out port, al` with a byte write of `value` to `port`.
    pub fn outb(&mut self, port: u16, value: u8) {
        self.mov_dx(port);
        self.mov_al(value);
        self.out_dx_al();
    }

    /// 32-bit `out port, eax` of `value`.
    pub fn outl(&mut self, port: u16, value: u32) {
        self.mov_dx(port);
        self.mov_eax(value);
        self.out_dx_eax();
    }

    /// 32-bit `in eax, port`.
    pub fn inl(&mut self, port: u16) {
        self.mov_dx(port);
        self.in_eax_dx();
    }

    fn edi(&mut self, addr: u32) {
        self.mov_r_imm(7, addr);
    }

    /// `mov [addr], eax`.
    pub fn store_eax(&mut self, addr: u32) {
        self.edi(addr);
        self.bytes(&[0x89, 0x07]);
    }

    /// `mov eax, [addr]`.
    pub fn load_eax(&mut self, addr: u32) {
        self.edi(addr);
        self.bytes(&[0x8b, 0x07]);
    }

    /// `add eax, [addr]`.
    pub fn add_eax_mem(&mut self, addr: u32) {
        self.edi(addr);
        self.bytes(&[0x03, 0x07]);
    }

    /// `cmp eax, [addr]`.
    pub fn cmp_eax_mem(&mut self, addr: u32) {
        self.edi(addr);
        self.bytes(&[0x3b, 0x07]);
    }

    /// `jb label`.
    pub fn jb(&mut self, target: &'static str) {
        self.jcc(0x2, target);
    }

    /// `shl eax, n`.
    pub fn shl_eax(&mut self, n: u8) {
        self.bytes(&[0xc1, 0xe0, n]);
    }

    /// `mov dword [addr], imm32`.
    pub fn store_imm(&mut self, addr: u32, imm: u32) {
        self.edi(addr);
        self.bytes(&[0xc7, 0x07]);
        self.dd(imm);
    }

    /// `inc dword [addr]`.
    pub fn inc_mem(&mut self, addr: u32) {
        self.edi(addr);
        self.bytes(&[0xff, 0x07]);
    }

    /// `cmp eax, imm32`.
    pub fn cmp_eax(&mut self, imm: u32) {
        self.bytes(&[0x3d]);
        self.dd(imm);
    }

    /// `cmp dword [addr], imm32`.
    pub fn cmp_mem(&mut self, addr: u32, imm: u32) {
        self.edi(addr);
        self.bytes(&[0x81, 0x3f]);
        self.dd(imm);
    }

    /// `test eax, eax`.
    pub fn test_eax(&mut self) {
        self.bytes(&[0x85, 0xc0]);
    }

    /// `test al, al`.
    pub fn test_al(&mut self) {
        self.bytes(&[0x84, 0xc0]);
    }

    /// `mov esi, [ebx + disp8]`.
    pub fn mov_esi_ebx_disp(&mut self, disp: u8) {
        self.bytes(&[0x8b, 0x73, disp]);
    }

    /// `mov al, [esi]`.
    pub fn mov_al_esi(&mut self) {
        self.bytes(&[0x8a, 0x06]);
    }

    /// `inc esi`.
    pub fn inc_esi(&mut self) {
        self.bytes(&[0xff, 0xc6]);
    }

    /// `dec ecx`.
    pub fn dec_ecx(&mut self) {
        self.bytes(&[0xff, 0xc9]);
    }

    /// `jmp label`.
    pub fn jmp(&mut self, target: &'static str) {
        self.bytes(&[0xe9]);
        self.rel32(target);
    }

    /// `jcc label` with condition code `cc` (0x4 e/z, 0x5 ne/nz, 0x2 b, 0x3 ae).
    pub fn jcc(&mut self, cc: u8, target: &'static str) {
        self.bytes(&[0x0f, 0x80 + cc]);
        self.rel32(target);
    }

    /// `je label`.
    pub fn je(&mut self, target: &'static str) {
        self.jcc(0x4, target);
    }

    /// `jne label`.
    pub fn jne(&mut self, target: &'static str) {
        self.jcc(0x5, target);
    }

    /// `jae label`.
    pub fn jae(&mut self, target: &'static str) {
        self.jcc(0x3, target);
    }

    /// `cli`.
    pub fn cli(&mut self) {
        self.bytes(&[0xfa]);
    }

    /// `sti`.
    pub fn sti(&mut self) {
        self.bytes(&[0xfb]);
    }

    /// `hlt`.
    pub fn hlt(&mut self) {
        self.bytes(&[0xf4]);
    }

    /// `iretq` (64-bit mode only).
    pub fn iretq(&mut self) {
        self.bytes(&[0x48, 0xcf]);
    }

    /// Pushes the registers the test handlers clobber (rax, rcx, rdx,
    /// rsi, rdi).
    pub fn push_scratch(&mut self) {
        self.bytes(&[0x50, 0x51, 0x52, 0x56, 0x57]);
    }

    /// Pops what [`Asm::push_scratch`] pushed.
    pub fn pop_scratch(&mut self) {
        self.bytes(&[0x5f, 0x5e, 0x5a, 0x59, 0x58]);
    }

    /// `lgdt [addr]` (32-bit mode).
    pub fn lgdt(&mut self, addr: u32) {
        self.bytes(&[0x0f, 0x01, 0x15]);
        self.dd(addr);
    }

    /// `lidt [addr]` (32-bit mode).
    pub fn lidt(&mut self, addr: u32) {
        self.bytes(&[0x0f, 0x01, 0x1d]);
        self.dd(addr);
    }

    /// `jmp far sel:label` (32-bit mode).
    pub fn ljmp(&mut self, sel: u16, target: &'static str) {
        self.bytes(&[0xea]);
        let a = self.addr(target);
        self.dd(a);
        self.dw(sel);
    }

    /// Loads DS, ES, FS, GS and SS with `sel` (through CX, so EAX and
    /// EBX keep the loader's values).
    pub fn load_data_segments(&mut self, sel: u16) {
        self.bytes(&[0x66, 0xb9]);
        self.dw(sel);
        for modrm in [0xd9, 0xc1, 0xe1, 0xe9, 0xd1] {
            self.bytes(&[0x8e, modrm]);
        }
    }

    /// `mov edi, ...` style raw helpers for the long-mode switch (32-bit mode):
    /// fills `count` 8-byte page-directory entries at `table` with 2 MiB
    /// identity mappings starting at 0 (clobbers EAX, ECX, EDI).
    pub fn fill_2m_identity(&mut self, table: u32, count: u32, loop_label: &'static str) {
        self.mov_r_imm(7, table); // edi
        self.mov_eax(0x83); // present | writable | 2 MiB page
        self.mov_r_imm(1, count); // ecx
        self.label(loop_label);
        self.bytes(&[0x89, 0x07]); // mov [edi], eax
        self.bytes(&[0xc7, 0x47, 0x04, 0, 0, 0, 0]); // mov dword [edi+4], 0
        self.bytes(&[0x05]); // add eax, 2 MiB
        self.dd(0x20_0000);
        self.bytes(&[0x83, 0xc7, 0x08]); // add edi, 8
        self.dec_ecx();
        self.jne(loop_label);
    }

    /// Enables PAE, loads CR3 with `pml4`, sets EFER.LME and turns paging on
    /// (32-bit mode; clobbers EAX, ECX, EDX).
    pub fn enable_long_mode(&mut self, pml4: u32) {
        self.bytes(&[0x0f, 0x20, 0xe0]); // mov eax, cr4
        self.bytes(&[0x0d]); // or eax, PAE
        self.dd(1 << 5);
        self.bytes(&[0x0f, 0x22, 0xe0]); // mov cr4, eax
        self.mov_eax(pml4);
        self.bytes(&[0x0f, 0x22, 0xd8]); // mov cr3, eax
        self.mov_r_imm(1, 0xc000_0080); // ecx = IA32_EFER
        self.bytes(&[0x0f, 0x32]); // rdmsr
        self.bytes(&[0x0d]); // or eax, LME
        self.dd(1 << 8);
        self.bytes(&[0x0f, 0x30]); // wrmsr
        self.bytes(&[0x0f, 0x20, 0xc0]); // mov eax, cr0
        self.bytes(&[0x0d]); // or eax, PG | PE
        self.dd(0x8000_0001);
        self.bytes(&[0x0f, 0x22, 0xc0]); // mov cr0, eax
    }

    /// `call label`.
    pub fn call(&mut self, target: &'static str) {
        self.bytes(&[0xe8]);
        self.rel32(target);
    }

    /// `ret`.
    pub fn ret(&mut self) {
        self.bytes(&[0xc3]);
    }

    /// `int imm8`.
    pub fn int(&mut self, v: u8) {
        self.bytes(&[0xcd, v]);
    }
}
