//! A minimal VMM on `irqchip-kvm`, sharing no code with this project's
//! `vmm`: it boots a Multiboot v1 image (a.out-kludge header; default: the
//! embedded guest suite) with 2 vCPUs in each irqchip mode, or the one
//! `--irqchip MODE` names, and exits 0 when every guest exits 0. Devices:
//! COM1 output, the QEMU exit port (0xf4), the pc-testdev line ports (0x2000
//! + pin, through the chip's lines) and fw_cfg's CPU count.
//!
//! `cargo run --release --example minimal_vmm -p irqchip-kvm -- [--irqchip MODE] [IMAGE]`

use std::error::Error;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use irqchip_kvm::{IrqLine, Irqchip, Mode, Run};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const RAM: usize = 64 << 20;
const CPUS: usize = 2;
const INFO: u64 = 0x9000; // Multiboot information block; command line after it.
const TESTS: &str = "tests=ioapic_,lapic_,ipi_,tpr_,timer_";

type Res<T> = Result<T, Box<dyn Error>>;

/// Loads a Multiboot v1 image whose header gives its load addresses
/// (flag 16); returns the entry point.
fn load(mem: &GuestMemoryMmap, image: &[u8]) -> Res<u32> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?))
    };
    let at = (0..8192.min(image.len()))
        .step_by(4)
        .find(|&i| word(i) == Some(0x1bad_b002))
        .ok_or("no Multiboot header in the first 8 KiB")?;
    let field = |n: usize| word(at + 4 * n).ok_or("truncated Multiboot header");
    if field(1)? & (1 << 16) == 0 {
        return Err("the Multiboot header has no load addresses (flag 16)".into());
    }
    let (header, load, load_end, bss_end) = (field(3)?, field(4)?, field(5)?, field(6)?);
    let start = (at as u64 + u64::from(load)).checked_sub(u64::from(header));
    let start = start.ok_or("bad load address")? as usize;
    // load_end 0: to the end of the file; below `load`: out of the file.
    let len = match load_end {
        0 => image.len().saturating_sub(start),
        _ => load_end.wrapping_sub(load) as usize,
    };
    let segment = image.get(start..start.saturating_add(len));
    let bytes = segment.ok_or("the load segment is not in the file")?;
    mem.write_slice(bytes, GuestAddress(u64::from(load)))?;
    let bss_start = u64::from(load) + bytes.len() as u64;
    let bss = (u64::from(bss_end)).saturating_sub(bss_start) as usize;
    mem.write_slice(&vec![0; bss], GuestAddress(bss_start))?;
    field(7).map_err(Into::into)
}

/// The BSP in 32-bit protected mode, flat segments, paging off (Multiboot).
fn setup_bsp(fd: &VcpuFd, entry: u32) -> Res<()> {
    let mut sregs = fd.get_sregs()?;
    let flat = |type_, selector| kvm_segment {
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        db: 1,
        s: 1,
        g: 1,
        ..Default::default()
    };
    (sregs.cs, sregs.ds, sregs.es) = (flat(0xb, 8), flat(3, 16), flat(3, 16));
    (sregs.fs, sregs.gs, sregs.ss) = (flat(3, 16), flat(3, 16), flat(3, 16));
    sregs.cr0 = 0x11;
    fd.set_sregs(&sregs)?;
    let mut regs = fd.get_regs()?;
    (regs.rip, regs.rax, regs.rbx, regs.rflags) = (entry.into(), 0x2bad_b002, INFO, 2);
    fd.set_regs(&regs)?;
    Ok(irqchip_kvm::startup::reset_fpu(fd)?)
}

/// The devices every vCPU shares: the chip's lines, and what the ports
/// hold behind one lock.
struct Board {
    chip: Irqchip,
    lines: Vec<IrqLine>,
    echo: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    out: Vec<u8>,
    fw_cfg: (u16, usize), // selected key, offset in its item
    exit: Option<u32>,
}

impl Board {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn port_out(&self, port: u16, data: &[u8]) {
        let byte = data.first().copied().unwrap_or(0);
        match port {
            0x3f8 => {
                self.state().out.push(byte);
                if self.echo {
                    let _ = std::io::stdout().write_all(&[byte]);
                }
            }
            0xf4 => {
                let mut code = [0u8; 4];
                code.iter_mut().zip(data).for_each(|(c, d)| *c = *d);
                self.state().exit = Some(u32::from_le_bytes(code));
                self.chip.shutdown();
            }
            0x2000..0x2018 => self.lines[usize::from(port - 0x2000)].set(byte != 0),
            0x510 => self.state().fw_cfg = (u16::from(byte), 0),
            _ => {}
        }
    }

    fn port_in(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        let mut st = self.state();
        match port {
            0x3fd => data[0] = 0x60, // LSR: transmitter empty
            0x511 => {
                let (key, at) = st.fw_cfg;
                let item = match key {
                    0 => u64::from(u32::from_le_bytes(*b"QEMU")), // signature
                    5 => CPUS as u64,
                    3 => RAM as u64,
                    _ => 0,
                };
                data[0] = item.to_le_bytes().get(at).copied().unwrap_or(0);
                st.fw_cfg.1 += 1;
            }
            _ => {}
        }
    }
}

/// One vCPU's loop until the chip is shut down.
fn vcpu_loop(board: &Board, mut fd: VcpuFd, mut part: irqchip_kvm::VcpuChip) -> Res<()> {
    loop {
        let run = part.run(&mut fd, |exit| {
            match exit {
                VcpuExit::IoOut(port, data) => board.port_out(port, data),
                VcpuExit::IoIn(port, data) => board.port_in(port, data),
                VcpuExit::MmioRead(addr, data) => {
                    if !board.chip.mmio_read(addr, data) {
                        data.fill(0xff);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    board.chip.mmio_write(addr, data);
                }
                other => return Err(format!("exit {other:?}")),
            }
            Ok(())
        })?;
        match run {
            Run::Exit(result) => result?,
            // This VMM never pauses its chip.
            Run::Handled | Run::Paused => {}
            Run::Stopped => return Ok(()),
        }
    }
}

/// Boots `image` in `mode` (its COM1 output echoed to stdout if `echo`);
/// returns the guest's exit code and its output.
pub(crate) fn boot(kvm: &Kvm, mode: Mode, image: &[u8], echo: bool) -> Res<(u32, String)> {
    let vm: Arc<VmFd> = Arc::new(kvm.create_vm()?);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)])?;
    let host = mem.get_host_address(GuestAddress(0))? as u64;
    let (memory_size, userspace_addr) = (RAM as u64, host);
    let region = kvm_userspace_memory_region {
        memory_size,
        userspace_addr,
        ..Default::default()
    };
    // SAFETY: `mem` maps RAM bytes at `host` and outlives the VM (it is
    // dropped after every vCPU thread has been joined, below).
    unsafe { vm.set_user_memory_region(region)? };
    vm.set_tss_address(0xfffb_d000)?;
    let chip = Irqchip::builder(Arc::clone(&vm), mode).cpus(CPUS).build()?;
    let entry = load(&mem, image)?;
    let cmdline = format!("{TESTS}\0");
    mem.write_slice(cmdline.as_bytes(), GuestAddress(INFO + 0x100))?;
    mem.write_obj(1u32 << 2, GuestAddress(INFO))?; // flags: command line
    mem.write_obj((INFO + 0x100) as u32, GuestAddress(INFO + 16))?;
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let mut parts = Vec::new();
    for i in 0..CPUS {
        let fd = vm.create_vcpu(i as u64)?;
        let mut cpuid = supported.clone();
        irqchip_kvm::cpuid::apply(cpuid.as_mut_slice(), i as u32, chip.cpuid_features());
        fd.set_cpuid2(&cpuid)?;
        if i == 0 {
            setup_bsp(&fd, entry)?;
        }
        parts.push(fd);
    }
    let parts = parts.into_iter().enumerate();
    let parts = parts
        .map(|(i, fd)| Ok((chip.vcpu(i, &fd)?, fd)))
        .collect::<Res<Vec<_>>>()?;
    let lines = (0..24).map(|p| chip.line(p).ok_or("no line"));
    let board = Arc::new(Board {
        lines: lines.collect::<Result<_, _>>()?,
        chip: chip.clone(),
        echo,
        state: Mutex::new(State::default()),
    });
    let threads: Vec<_> = parts
        .into_iter()
        .map(|(part, fd)| {
            let board = Arc::clone(&board);
            std::thread::spawn(move || vcpu_loop(&board, fd, part).map_err(|e| e.to_string()))
        })
        .collect();
    // The chip's timers (user mode: the LAPIC timers; split: the EOI watch).
    let epoll = Epoll::new()?;
    for (i, fd) in chip.timer_fds().into_iter().enumerate() {
        let event = EpollEvent::new(EventSet::IN, i as u64);
        epoll.ctl(ControlOperation::Add, fd, event)?;
    }
    let mut events = [EpollEvent::default(); 8];
    while board.state().exit.is_none() && !threads.iter().all(|t| t.is_finished()) {
        let ready = epoll.wait(10, &mut events)?;
        for e in &events[..ready] {
            chip.on_timer(e.data() as usize);
        }
    }
    chip.shutdown();
    for t in threads {
        t.join().map_err(|_| "a vCPU thread panicked")??;
    }
    let st = board.state();
    let code = st.exit.ok_or("the guest stopped without an exit code")?;
    let out = String::from_utf8_lossy(&st.out).into_owned();
    Ok((code, out))
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let (mut modes, mut path) = (Mode::ALL.to_vec(), None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--irqchip" => modes = vec![args.next().ok_or("--irqchip needs a mode")?.parse()?],
            _ => path = Some(arg),
        }
    }
    let image = match path {
        Some(p) => std::fs::read(&p).map_err(|e| format!("read {p}: {e}"))?,
        None => guest_image::IMAGE.to_vec(),
    };
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    let mut failed = false;
    for mode in modes {
        println!("== minimal_vmm: --irqchip {mode}");
        let (code, _) = boot(&kvm, mode, &image, true)?;
        println!("== minimal_vmm: {mode}: the guest exited with {code}");
        failed |= code != 0;
    }
    std::process::exit(i32::from(failed));
}
