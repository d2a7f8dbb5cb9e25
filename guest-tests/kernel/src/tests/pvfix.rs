//! What the PV/WDM suites share: the skip when the PV device is absent, the
//! per-test wrapper (platform baseline, clean-up, leak checks), device roles
//! found from the PnP resources and QUERY_MESSAGES (never hard-coded ids,
//! vectors or pins), ISR contexts and the ISR that claims a test device's
//! causes. Devices with line resources and an interrupt-source test device
//! are [`Dev`]s; devices with message-signaled interrupts and a message
//! test device are [`MsgDev`]s (`msgfix.rs` has their service routine).
//!
//! Claims are counted from the device (STATUS read, ACK written), not from
//! ISR entries: on hosts whose LAPIC EOIs at injection a level interrupt may
//! arrive once more after it was serviced, and that extra call finds no work
//! and returns FALSE.

use core::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};

use irqconnect_abi::layout::MSIDEV_MAX_DEVICES;
use irqconnect_abi::ntstatus::{STATUS_SUCCESS, status_name};
use irqconnect_abi::pv::{
    GROUP_SIZE, PlatformGroups, QueryMessages, QueryPlatform, QueryRoute, QueryRouteV2,
    message_kind,
};

use crate::msidev::MsiDev;
use crate::percpu::{self, MAX_CPUS};
use crate::runner::{Failure, TestResult};
use crate::testdev::TestDev;
use crate::wdm::{
    self, CM_PARTIAL_RESOURCE_DESCRIPTOR, DEVICE_OBJECT,
    IO_CONNECT_INTERRUPT_FULLY_SPECIFIED_PARAMETERS, IO_CONNECT_INTERRUPT_PARAMETERS,
    IO_DISCONNECT_INTERRUPT_PARAMETERS, IO_INTERRUPT_CONNECTION_CONTEXT, IoConnectInterrupt,
    IoConnectInterruptEx, IoDisconnectInterrupt, IoDisconnectInterruptEx, KAFFINITY, KINTERRUPT,
    KINTERRUPT_MODE, KIRQL, KSERVICE_ROUTINE, KSPIN_LOCK, NTSTATUS, PKINTERRUPT, PVOID,
};
use crate::{check, cpu, fail, lines, pv, skip, time};

/// How long a test waits for an expected interrupt or claim.
pub const TIMEOUT_US: u64 = 1_000_000;
/// How long a test waits before asserting that nothing (more) happens.
pub const SETTLE_US: u64 = 3_000;
/// Most devices of the host's table the fixture looks at.
pub const MAX_DEVICES: usize = 16;
/// Most message-signaled devices (one message test device each).
pub const MAX_MSG_DEVICES: usize = MSIDEV_MAX_DEVICES as usize;

/// A device of the host's table: its PnP object, its test-device registers
/// and its first translated interrupt resource.
#[derive(Clone, Copy)]
pub struct Dev {
    /// The device object (id and translated resources).
    pub obj: DEVICE_OBJECT,
    /// The interrupt-source test device with the same id.
    pub td: TestDev,
}

impl Dev {
    /// Translated resource `i`.
    pub fn res(&self, i: usize) -> CM_PARTIAL_RESOURCE_DESCRIPTOR {
        self.obj
            .allocated_resources_translated()
            .get(i)
            .copied()
            .unwrap_or_default()
    }

    /// Number of interrupt resources.
    pub fn res_count(&self) -> usize {
        self.obj.allocated_resources_translated().len()
    }

    /// The vector of resource 0 (a `u8`: the host keeps device vectors in
    /// 0x30..=0xbf).
    pub fn vector(&self) -> u8 {
        self.res(0).vector as u8
    }

    /// The pin of resource 0.
    pub fn line(&self) -> u32 {
        self.res(0).line
    }

    /// The device id.
    pub fn id(&self) -> u32 {
        self.obj.device_id()
    }

    /// Fails unless the test device answers at this id and drives the pin
    /// and trigger its first resource names.
    pub fn check_wiring(&self) -> TestResult {
        let r = self.res(0);
        let level = r.interrupt_mode() == KINTERRUPT_MODE::LevelSensitive;
        match self.td.id() {
            Some((id, line)) if u32::from(id) == self.id() && u32::from(line) == r.line => {}
            Some((id, line)) => fail!(
                "platform: test device {} reports id {} on pin {}, its resource names pin {}",
                crate::display::dec(self.id()),
                crate::display::dec(id),
                crate::display::dec(line),
                crate::display::dec(r.line)
            ),
            None => fail!(
                "platform: test device {} does not answer at its ports",
                crate::display::dec(self.id())
            ),
        }
        check!(
            self.td.is_level() == level,
            "platform: test device {} is {}-triggered, its resource says {}",
            crate::display::dec(self.id()),
            if self.td.is_level() { "level" } else { "edge" },
            if level { "level-sensitive" } else { "latched" }
        );
        Ok(())
    }
}

/// A device with message-signaled interrupts: its PnP object (no line
/// resources), what QUERY_MESSAGES says of it, and its message test device.
#[derive(Clone, Copy)]
pub struct MsgDev {
    /// The device object.
    pub obj: DEVICE_OBJECT,
    /// QUERY_MESSAGES of the device.
    pub info: QueryMessages,
    /// The message-signaled test device that raises its messages.
    pub md: MsiDev,
}

impl MsgDev {
    /// The device id.
    pub fn id(&self) -> u32 {
        self.obj.device_id()
    }

    /// Its messages.
    pub fn count(&self) -> u32 {
        self.info.message_count
    }

    /// MSI-X (else MSI).
    pub fn is_msix(&self) -> bool {
        self.info.kind == message_kind::MSIX
    }

    /// Every message's mask bit.
    pub fn all(&self) -> u32 {
        MsiDev::all(self.count())
    }

    /// A short description for failure messages.
    pub fn name(&self) -> &'static str {
        if self.is_msix() {
            "MSI-X device"
        } else {
            "MSI device"
        }
    }

    /// Fails unless the message test device answers with this device's
    /// id, kind and message count.
    pub fn check_wiring(&self) -> TestResult {
        let want = (self.id() as u8, u32::from(self.info.kind), self.count());
        match self.md.id() {
            Some(got) if got == want => Ok(()),
            Some((id, kind, count)) => fail!(
                "platform: message test device {} reports device {} kind {} with {} messages, QUERY_MESSAGES of device {} says kind {} with {}",
                crate::display::dec(self.md.index()),
                crate::display::dec(id),
                crate::display::dec(kind),
                crate::display::dec(count),
                crate::display::dec(self.id()),
                crate::display::dec(want.1),
                crate::display::dec(want.2)
            ),
            None => fail!(
                "platform: message test device {} of device {} does not answer",
                crate::display::dec(self.md.index()),
                crate::display::dec(self.id())
            ),
        }
    }
}

/// The platform as the test found it.
pub struct Env {
    /// QUERY_PLATFORM at the start of the test.
    pub platform: QueryPlatform,
    /// Its processor groups (version 2).
    pub groups: PlatformGroups,
    devices: [Option<Dev>; MAX_DEVICES],
    messages: [Option<MsgDev>; MAX_MSG_DEVICES],
}

impl Env {
    /// Processors online (the host's view, which the guest's must match).
    pub fn online(&self) -> KAFFINITY {
        self.platform.online_mask
    }

    /// Where the host routes a connection of `mask` (group 0) alone on its
    /// vector: the online processors of the mask, narrowed to the largest
    /// set one APIC destination names (`docs/semantics.md` rule R, as
    /// `super::topo::Topo::expected` reads it). With at most 8 processors
    /// that is every online processor of the mask.
    pub fn effective(&self, mask: KAFFINITY) -> Result<KAFFINITY, Failure> {
        Ok(super::topo::Topo::get()?.expected(0, mask & self.online()))
    }

    /// Device `id`, when the host has it.
    pub fn device(&self, id: usize) -> Option<&Dev> {
        self.devices.get(id).and_then(Option::as_ref)
    }

    fn all(&self) -> impl Iterator<Item = &Dev> {
        self.devices.iter().flatten()
    }

    /// Every device with message-signaled interrupts.
    pub fn message_devices(&self) -> impl Iterator<Item = &MsgDev> {
        self.messages.iter().flatten()
    }

    /// True when device `id` has message-signaled interrupts.
    pub fn has_messages(&self, id: u32) -> bool {
        self.message_devices().any(|m| m.id() == id)
    }

    /// True when some device owns `vector`: a line resource's, or one of a
    /// device's messages.
    pub fn vector_owned(&self, vector: u32) -> bool {
        self.all().any(|d| {
            d.obj
                .allocated_resources_translated()
                .iter()
                .any(|r| r.vector == vector)
        }) || self.message_devices().any(|m| {
            let first = u32::from(m.info.first_vector);
            (first..first + m.count()).contains(&vector)
        })
    }

    /// The first message-signaled device `pred` accepts (its test device
    /// checked), or a skip naming `what`.
    pub fn message_device(
        &self,
        what: &str,
        pred: impl Fn(&MsgDev) -> bool,
    ) -> Result<MsgDev, Failure> {
        match self.message_devices().find(|m| pred(m)) {
            Some(m) => {
                m.check_wiring()?;
                Ok(*m)
            }
            None => skip!("the host's device table has no {}", what),
        }
    }

    /// Every message-signaled device (test devices checked), as the first
    /// `n` entries of the array.
    pub fn message_wired(&self) -> Result<([Option<MsgDev>; MAX_MSG_DEVICES], usize), Failure> {
        let mut out = [None; MAX_MSG_DEVICES];
        let mut n = 0;
        for m in self.message_devices() {
            m.check_wiring()?;
            out[n] = Some(*m);
            n += 1;
        }
        if n == 0 {
            skip!("the host's device table has no message-signaled device");
        }
        Ok((out, n))
    }

    /// The first device with one resource, exclusive, in `mode`.
    pub fn exclusive(&self, mode: KINTERRUPT_MODE) -> Result<Dev, Failure> {
        match self.all().find(|d| {
            let r = d.res(0);
            d.res_count() == 1 && !r.share_vector() && r.interrupt_mode() == mode
        }) {
            Some(d) => {
                d.check_wiring()?;
                Ok(*d)
            }
            None => skip!("the host's device table has no exclusive {:?} device", mode),
        }
    }

    /// Two devices whose first resources share one vector in `mode`, on one
    /// pin (`same_pin`) or on two.
    pub fn shared_pair(
        &self,
        mode: KINTERRUPT_MODE,
        same_pin: bool,
    ) -> Result<(Dev, Dev), Failure> {
        for a in self.all() {
            for b in self.all() {
                let (ra, rb) = (a.res(0), b.res(0));
                if b.id() > a.id()
                    && ra.share_vector()
                    && rb.share_vector()
                    && ra.vector == rb.vector
                    && ra.interrupt_mode() == mode
                    && rb.interrupt_mode() == mode
                    && (ra.line == rb.line) == same_pin
                {
                    a.check_wiring()?;
                    b.check_wiring()?;
                    return Ok((*a, *b));
                }
            }
        }
        skip!(
            "the host's device table has no two {:?} devices sharing a vector on {}",
            mode,
            if same_pin { "one pin" } else { "two pins" }
        )
    }

    /// A device with two or more interrupt resources (one ISR, two vectors).
    pub fn multi_vector(&self) -> Result<Dev, Failure> {
        match self.all().find(|d| d.res_count() >= 2) {
            Some(d) => {
                d.check_wiring()?;
                Ok(*d)
            }
            None => skip!("the host's device table has no device with two interrupt resources"),
        }
    }

    /// Every device (its test device checked against its resource), as
    /// the first `n` entries of the array.
    pub fn wired(&self) -> Result<([Dev; MAX_DEVICES], usize), Failure> {
        let Some(first) = self.all().next() else {
            skip!("the host's device table is empty");
        };
        let mut out = [*first; MAX_DEVICES];
        let mut n = 0;
        for d in self.all() {
            d.check_wiring()?;
            out[n] = *d;
            n += 1;
        }
        Ok((out, n))
    }
}

/// Skips unless the PV device answers the doorbell with its signature.
pub fn need_pv() -> TestResult {
    if !pv::present() {
        let raw = pv::doorbell_read();
        if raw == u32::MAX {
            skip!("{}", pv::ABSENT_REASON);
        }
        skip!(
            "no PV device (doorbell reads {}, not the signature)",
            crate::display::hex(raw)
        );
    }
    Ok(())
}

/// QUERY_PLATFORM, or a failure naming the status.
pub fn platform() -> Result<QueryPlatform, Failure> {
    match pv::query_platform() {
        Ok(p) => Ok(p),
        Err(s) => fail!("QUERY_PLATFORM answered {}", status_name(s)),
    }
}

/// QUERY_PLATFORM version 2's groups, or a failure naming the status.
pub fn groups() -> Result<PlatformGroups, Failure> {
    match pv::query_platform_v2() {
        Ok(p) => Ok(p.groups),
        Err(s) => fail!("QUERY_PLATFORM (version 2) answered {}", status_name(s)),
    }
}

/// QUERY_ROUTE version 2 of `pin`, or a failure naming the status.
pub fn route_v2(pin: u32) -> Result<QueryRouteV2, Failure> {
    match pv::query_route_v2(pin) {
        Ok(r) => Ok(r),
        Err(s) => fail!(
            "QUERY_ROUTE (version 2) of pin {} answered {}",
            crate::display::dec(pin),
            status_name(s)
        ),
    }
}

/// QUERY_ROUTE of `pin`, or a failure naming the status.
pub fn route(pin: u32) -> Result<QueryRoute, Failure> {
    match pv::query_route(pin) {
        Ok(r) => Ok(r),
        Err(s) => fail!(
            "QUERY_ROUTE of pin {} answered {}",
            crate::display::dec(pin),
            status_name(s)
        ),
    }
}

/// Objects in use on the host now.
pub fn objects_in_use() -> Result<u32, Failure> {
    Ok(platform()?.objects_in_use)
}

fn quiesce(env: &Env) -> u32 {
    let mut left = 0;
    // A message test device that does not answer is the message tests'
    // failure (`MsgDev::check_wiring`), not every test's.
    for m in env.message_devices().filter(|m| m.md.id().is_some()) {
        left += m.md.quiet(m.count()).count_ones();
    }
    for d in env.all() {
        quiet(d);
        left += d.td.status();
    }
    left
}

/// Stops every cause of `d`: timer off, source disabled, causes drained,
/// its lines low.
fn quiet(d: &Dev) {
    d.td.timer_stop();
    d.td.enable(false);
    d.td.drain(100_000);
    for r in d.obj.allocated_resources_translated() {
        if let Ok(line) = u8::try_from(r.line) {
            lines::set(line, false);
        }
    }
}

/// The started devices: with line resources and a test device, and with
/// messages and a message test device.
type Started = (
    [Option<Dev>; MAX_DEVICES],
    [Option<MsgDev>; MAX_MSG_DEVICES],
);

/// The PnP step, done once per boot as a PnP manager does (the host's
/// table does not change while the VM runs): QUERY_RESOURCES and
/// QUERY_MESSAGES of every device, kept for the following tests.
static STARTED: crate::spinlock::SpinLock<Option<(u32, Started)>> =
    crate::spinlock::SpinLock::new(None);

/// The started devices of a table of `count` devices.
fn started(count: u32) -> Started {
    let mut cache = STARTED.lock();
    if let Some((n, table)) = cache.as_ref()
        && *n == count
    {
        return *table;
    }
    let mut devices = [None; MAX_DEVICES];
    let mut messages = [None; MAX_MSG_DEVICES];
    let mut n_messages = 0;
    for (id, slot) in devices
        .iter_mut()
        .enumerate()
        .take((count as usize).min(MAX_DEVICES))
    {
        let Ok(obj) = DEVICE_OBJECT::start(id as u32) else {
            continue;
        };
        if let Some(td) = TestDev::new(id as u32)
            && !obj.allocated_resources_translated().is_empty()
        {
            *slot = Some(Dev { obj, td });
        }
        // A host without QUERY_MESSAGES has no message-signaled devices.
        if let Ok(info) = pv::query_messages(id as u32)
            && info.message_count > 0
            && let Some(md) = MsiDev::new(info.test_device)
            && let Some(m) = messages.get_mut(n_messages)
        {
            *m = Some(MsgDev { obj, info, md });
            n_messages += 1;
        }
    }
    *cache = Some((count, (devices, messages)));
    (devices, messages)
}

/// Runs a PV test: skips without the PV device; records the platform;
/// quiets every test device and resets the ISR contexts; runs `body`; then
/// disconnects whatever is still connected, quiets the devices again and
/// checks that the host is back at its baseline (objects, connections, no
/// pin masked by the storm guard).
pub fn run(body: fn(&Env) -> TestResult) -> TestResult {
    need_pv()?;
    let start = platform()?;
    let groups = groups()?;
    let (devices, messages) = started(start.device_count);
    let env = Env {
        platform: start,
        groups,
        devices,
        messages,
    };
    let online: u32 = groups.group_online.iter().map(|m| m.count_ones()).sum();
    check!(
        online as usize == percpu::count()
            && start.online_mask == groups.group_online[0]
            && usize::from(groups.group_count) == usize::from(wdm::KeQueryActiveGroupCount()),
        "the host has {} processors online in {} groups (group 0: {}), {} are online here in {} groups",
        crate::display::dec(online),
        crate::display::dec(groups.group_count),
        crate::display::hex(start.online_mask),
        crate::display::dec(percpu::count()),
        crate::display::dec(wdm::KeQueryActiveGroupCount())
    );
    quiesce(&env);
    reset_contexts();
    wdm::reset_counters();

    let result = body(&env);

    let leaked = wdm::disconnect_all();
    let pending = quiesce(&env);
    reset_contexts();
    result?;
    check!(
        leaked == 0,
        "the test left {} connections connected",
        crate::display::dec(leaked)
    );
    let after = platform()?;
    check!(
        after.objects_in_use == env.platform.objects_in_use
            && after.connections == env.platform.connections,
        "host not back at its baseline: {} objects / {} connections, was {} / {}",
        crate::display::dec(after.objects_in_use),
        crate::display::dec(after.connections),
        crate::display::dec(env.platform.objects_in_use),
        crate::display::dec(env.platform.connections)
    );
    check!(
        after.storm_masked_pins == env.platform.storm_masked_pins,
        "the host's storm guard masked {} pins during the test",
        crate::display::dec(after.storm_masked_pins - env.platform.storm_masked_pins)
    );
    check!(
        pending == 0,
        "{} causes or messages still pending after draining",
        crate::display::dec(pending)
    );
    for m in env.message_devices().filter(|m| m.md.id().is_some()) {
        for k in 0..m.count() {
            let address = m.md.address(k);
            check!(
                address == 0,
                "{} {} message {} still programmed (address {}) with nothing connected",
                m.name(),
                crate::display::dec(m.id()),
                crate::display::dec(k),
                crate::display::hex(address)
            );
        }
    }
    Ok(())
}

/// Waits up to [`TIMEOUT_US`] for `cond`; fails with `what` otherwise.
/// Every turn reads the doorbell's signature (a port access: the exit at
/// which an interrupt pending for this processor is taken).
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> TestResult {
    if time::wait_until(TIMEOUT_US, || {
        let _ = pv::doorbell_read();
        cond()
    }) {
        Ok(())
    } else {
        fail!("timeout waiting for {}", what)
    }
}

/// Lets stragglers arrive before a "nothing more" assertion.
pub fn settle() {
    time::delay_us(SETTLE_US);
}

/// The processor indices in `mask`, lowest first.
pub fn cpus(mask: KAFFINITY) -> impl Iterator<Item = usize> {
    (0..64usize).filter(move |&i| mask & (1u64 << i) != 0)
}

/// How an ISR claims a test device's causes.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Policy {
    /// One ACK per call (a level device interrupts again while causes remain).
    One = 0,
    /// Every pending cause (edges coalesce: an ISR must drain).
    All = 1,
}

/// What an ISR knows and counts. `CTX[i]` is handed to IoConnectInterrupt
/// as the ServiceContext.
pub struct Ctx {
    dev: AtomicU32,
    policy: AtomicU8,
    /// Processors the ISR may run on (of `allowed_group`).
    pub allowed: AtomicU64,
    /// The processor group of `allowed`.
    pub allowed_group: AtomicU16,
    /// The connection the ISR must be called for (`PKINTERRUPT::to_bits`),
    /// 0: not checked.
    pub expect_object: AtomicU64,
    /// Busy-loop iterations per call (to widen race windows).
    pub spin: AtomicU32,
    /// Microseconds the next call waits before it claims (once: a call in
    /// flight while the test acts).
    pub hold_next_us: AtomicU64,
    /// Calls.
    pub calls: AtomicU32,
    /// Calls that claimed (returned TRUE).
    pub claimed_calls: AtomicU32,
    /// Causes claimed (ACKs written), or soft causes taken.
    pub claims: AtomicU32,
    /// Calls on a processor outside `allowed`, or not the object's processor.
    pub outside: AtomicU32,
    /// Calls whose CR8 was not the object's SynchronizeIrql.
    pub wrong_irql: AtomicU32,
    /// Calls whose interrupt object was not `expect_object`'s.
    pub wrong_object: AtomicU32,
    /// Calls whose connection's spin lock was not held.
    pub unlocked: AtomicU32,
    /// The ServiceContext of the last call.
    pub last_context: AtomicUsize,
    /// The vector of the last claiming call.
    pub last_vector: AtomicU32,
    /// Calls running now.
    pub in_isr: AtomicU32,
    /// Causes of a device with no registers (a bare pc-testdev line).
    pub soft_pending: AtomicU32,
    /// Claiming calls per processor.
    pub per_cpu: [AtomicU32; MAX_CPUS],
    /// A lock the ISR must find held (the driver's), 0: not checked.
    pub lock: AtomicUsize,
}

impl Ctx {
    const fn new() -> Self {
        Self {
            dev: AtomicU32::new(u32::MAX),
            policy: AtomicU8::new(Policy::One as u8),
            allowed: AtomicU64::new(u64::MAX),
            allowed_group: AtomicU16::new(0),
            expect_object: AtomicU64::new(0),
            spin: AtomicU32::new(0),
            hold_next_us: AtomicU64::new(0),
            calls: AtomicU32::new(0),
            claimed_calls: AtomicU32::new(0),
            claims: AtomicU32::new(0),
            outside: AtomicU32::new(0),
            wrong_irql: AtomicU32::new(0),
            wrong_object: AtomicU32::new(0),
            unlocked: AtomicU32::new(0),
            last_context: AtomicUsize::new(0),
            last_vector: AtomicU32::new(0),
            in_isr: AtomicU32::new(0),
            soft_pending: AtomicU32::new(0),
            per_cpu: [const { AtomicU32::new(0) }; MAX_CPUS],
            lock: AtomicUsize::new(0),
        }
    }

    fn reset(&self) {
        self.dev.store(u32::MAX, Ordering::Relaxed);
        self.policy.store(Policy::One as u8, Ordering::Relaxed);
        self.allowed.store(u64::MAX, Ordering::Relaxed);
        self.allowed_group.store(0, Ordering::Relaxed);
        self.expect_object.store(0, Ordering::Relaxed);
        for a in [
            &self.spin,
            &self.calls,
            &self.claimed_calls,
            &self.claims,
            &self.outside,
            &self.wrong_irql,
            &self.wrong_object,
            &self.unlocked,
            &self.last_vector,
            &self.in_isr,
            &self.soft_pending,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        self.last_context.store(0, Ordering::Relaxed);
        self.lock.store(0, Ordering::Relaxed);
        self.hold_next_us.store(0, Ordering::Relaxed);
        for c in self.per_cpu.iter() {
            c.store(0, Ordering::Relaxed);
        }
        core::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Binds the context to `dev` (None: soft causes only), the claim
    /// policy and the processors the ISR may run on; every counter restarts
    /// at 0.
    pub fn bind(&self, dev: Option<&Dev>, policy: Policy, allowed: KAFFINITY) -> &Self {
        self.bind_in_group(dev, policy, 0, allowed)
    }

    /// [`Ctx::bind`] with the processors of `allowed` in processor `group`.
    pub fn bind_in_group(
        &self,
        dev: Option<&Dev>,
        policy: Policy,
        group: u16,
        allowed: KAFFINITY,
    ) -> &Self {
        self.reset();
        self.dev
            .store(dev.map_or(u32::MAX, Dev::id), Ordering::Relaxed);
        self.policy.store(policy as u8, Ordering::Relaxed);
        self.allowed.store(allowed, Ordering::Relaxed);
        self.allowed_group.store(group, Ordering::Relaxed);
        core::sync::atomic::fence(Ordering::SeqCst);
        self
    }

    /// Lets the ISR run on the processors of `allowed` in `group` from now
    /// on (a retarget's new set: the old one stays allowed while the move
    /// is in progress when the caller ORs it in).
    pub fn allow(&self, group: u16, allowed: KAFFINITY) {
        self.allowed.store(allowed, Ordering::Relaxed);
        self.allowed_group.store(group, Ordering::Relaxed);
        core::sync::atomic::fence(Ordering::SeqCst);
    }

    /// The ServiceContext naming this context.
    pub fn as_context(&'static self) -> PVOID {
        self as *const Self as PVOID
    }

    /// A counter's value.
    pub fn get(counter: &AtomicU32) -> u32 {
        counter.load(Ordering::Acquire)
    }

    /// Causes claimed so far.
    pub fn claimed(&self) -> u32 {
        self.claims.load(Ordering::Acquire)
    }

    /// Calls so far.
    pub fn called(&self) -> u32 {
        self.calls.load(Ordering::Acquire)
    }

    /// Fails when a call ran outside its processors, at the wrong IRQL, for
    /// the wrong object or without its lock.
    pub fn check_clean(&self, name: &str) -> TestResult {
        let (o, i, w, u) = (
            Self::get(&self.outside),
            Self::get(&self.wrong_irql),
            Self::get(&self.wrong_object),
            Self::get(&self.unlocked),
        );
        check!(
            o == 0 && i == 0 && w == 0 && u == 0,
            "ISR {}: {} calls outside its processors, {} at the wrong IRQL, {} for a wrong object, {} without its lock",
            name,
            crate::display::dec(o),
            crate::display::dec(i),
            crate::display::dec(w),
            crate::display::dec(u)
        );
        Ok(())
    }
}

/// The ISR contexts (one per connection a test makes).
pub static CTX: [Ctx; 10] = [const { Ctx::new() }; 10];

fn reset_contexts() {
    for c in CTX.iter() {
        c.reset();
    }
    FIRST_CLAIMED.store(false, Ordering::Relaxed);
    ORDER_VIOLATIONS.store(0, Ordering::Relaxed);
}

/// The context a ServiceContext names, when it is one of [`CTX`].
pub fn ctx_of(context: PVOID) -> Option<&'static Ctx> {
    let base = CTX.as_ptr() as usize;
    let size = core::mem::size_of::<Ctx>();
    let off = (context as usize).checked_sub(base)?;
    (off % size == 0).then(|| CTX.get(off / size)).flatten()
}

/// Set by the first ISR of a chain-order probe when it claims; see
/// [`chain_first_isr`].
pub static FIRST_CLAIMED: AtomicBool = AtomicBool::new(false);
/// Calls of the second ISR in a dispatch where the first had claimed.
pub static ORDER_VIOLATIONS: AtomicU32 = AtomicU32::new(0);

/// True when processor `cpu` is in the mask `mask` of group `group`.
pub fn in_group_mask(cpu: usize, group: &AtomicU16, mask: &AtomicU64) -> bool {
    let (g, b) = (cpu / 64, cpu % 64);
    g == usize::from(group.load(Ordering::Relaxed))
        && mask.load(Ordering::Relaxed) & (1u64 << b) != 0
}

/// The bookkeeping and the claim every test ISR does: checks processor,
/// IRQL, object and lock; claims by the device's STATUS/ACK (or soft
/// causes); returns TRUE when it claimed.
pub fn claim(interrupt: &KINTERRUPT, ctx: &Ctx, context: PVOID) -> bool {
    ctx.in_isr.fetch_add(1, Ordering::AcqRel);
    ctx.calls.fetch_add(1, Ordering::AcqRel);
    let me = percpu::current_index();
    if me != interrupt.processor() || !in_group_mask(me, &ctx.allowed_group, &ctx.allowed) {
        ctx.outside.fetch_add(1, Ordering::AcqRel);
    }
    if cpu::read_cr8() != u64::from(interrupt.synchronize_irql()) {
        ctx.wrong_irql.fetch_add(1, Ordering::AcqRel);
    }
    let expect = ctx.expect_object.load(Ordering::Relaxed);
    if expect != 0 && interrupt.interrupt_object().to_bits() != expect {
        ctx.wrong_object.fetch_add(1, Ordering::AcqRel);
    }
    let lock = ctx.lock.load(Ordering::Relaxed);
    if lock != 0 && !lock_held(lock) {
        ctx.unlocked.fetch_add(1, Ordering::AcqRel);
    }
    ctx.last_context.store(context as usize, Ordering::Relaxed);
    for _ in 0..ctx.spin.load(Ordering::Relaxed) {
        cpu::pause();
    }
    let hold = ctx.hold_next_us.swap(0, Ordering::AcqRel);
    if hold != 0 {
        time::delay_us(hold);
    }
    let dev = TestDev::new(ctx.dev.load(Ordering::Relaxed));
    let taken = match dev {
        Some(td) => {
            let pending = td.status();
            if pending == 0 || pending == u32::MAX {
                0
            } else if ctx.policy.load(Ordering::Relaxed) == Policy::One as u8 {
                td.ack();
                1
            } else {
                td.drain(pending)
            }
        }
        None => {
            let mut taken = 0;
            let _ = ctx
                .soft_pending
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                    taken = u32::from(p > 0);
                    p.checked_sub(1)
                });
            taken
        }
    };
    if taken > 0 {
        ctx.claims.fetch_add(taken, Ordering::AcqRel);
        ctx.claimed_calls.fetch_add(1, Ordering::AcqRel);
        ctx.last_vector
            .store(u32::from(interrupt.vector()), Ordering::Relaxed);
        if let Some(c) = ctx.per_cpu.get(me) {
            c.fetch_add(1, Ordering::AcqRel);
        }
    }
    ctx.in_isr.fetch_sub(1, Ordering::AcqRel);
    taken > 0
}

fn lock_held(addr: usize) -> bool {
    // The address was stored from a `&'static KSPIN_LOCK` by the test.
    LOCKS
        .iter()
        .find(|l| l.address() as usize == addr)
        .is_some_and(KSPIN_LOCK::is_held)
}

/// Driver spin locks the tests pass to IoConnectInterrupt.
pub static LOCKS: [KSPIN_LOCK; 2] = [KSPIN_LOCK::new(), KSPIN_LOCK::new()];

/// The plain test ISR: [`claim`].
pub fn device_isr(interrupt: &KINTERRUPT, context: PVOID) -> bool {
    match ctx_of(context) {
        Some(ctx) => claim(interrupt, ctx, context),
        None => false,
    }
}

/// The first ISR of a chain-order probe: clears [`FIRST_CLAIMED`] on entry,
/// sets it when it claims.
pub fn chain_first_isr(interrupt: &KINTERRUPT, context: PVOID) -> bool {
    FIRST_CLAIMED.store(false, Ordering::Release);
    let claimed = device_isr(interrupt, context);
    FIRST_CLAIMED.store(claimed, Ordering::Release);
    claimed
}

/// The second ISR of a chain-order probe: a call while [`FIRST_CLAIMED`] is
/// set means the level chain went on after a claim.
pub fn chain_second_isr(interrupt: &KINTERRUPT, context: PVOID) -> bool {
    if FIRST_CLAIMED.load(Ordering::Acquire) {
        ORDER_VIOLATIONS.fetch_add(1, Ordering::AcqRel);
    }
    device_isr(interrupt, context)
}

/// IoConnectInterrupt's arguments, defaulted from a translated resource.
#[derive(Clone, Copy)]
pub struct Args {
    /// ServiceRoutine.
    pub routine: Option<KSERVICE_ROUTINE>,
    /// ServiceContext.
    pub context: PVOID,
    /// SpinLock.
    pub lock: Option<&'static KSPIN_LOCK>,
    /// Vector.
    pub vector: u32,
    /// Irql.
    pub irql: KIRQL,
    /// SynchronizeIrql.
    pub sync: KIRQL,
    /// InterruptMode.
    pub mode: KINTERRUPT_MODE,
    /// ShareVector.
    pub share: bool,
    /// ProcessorEnableMask.
    pub mask: KAFFINITY,
    /// FloatingSave.
    pub floating: bool,
}

impl Args {
    /// The arguments resource `r` of `dev` calls for, with [`device_isr`]
    /// and `ctx` as ServiceContext.
    pub fn of(dev: &Dev, r: usize, ctx: &'static Ctx) -> Self {
        let res = dev.res(r);
        Self {
            routine: Some(device_isr),
            context: ctx.as_context(),
            lock: None,
            vector: res.vector,
            irql: res.level,
            sync: res.level,
            mode: res.interrupt_mode(),
            share: res.share_vector(),
            mask: res.affinity,
            floating: false,
        }
    }
}

/// IoConnectInterrupt with `a` for `dev`.
pub fn connect(dev: &Dev, a: &Args) -> (NTSTATUS, Option<PKINTERRUPT>) {
    let mut object = None;
    let status = IoConnectInterrupt(
        &dev.obj,
        &mut object,
        a.routine,
        a.context,
        a.lock,
        a.vector,
        a.irql,
        a.sync,
        a.mode,
        a.share,
        a.mask,
        a.floating,
    );
    (status, object)
}

/// IoConnectInterruptEx parameters of `version` (CONNECT_FULLY_SPECIFIED
/// or CONNECT_FULLY_SPECIFIED_GROUP) carrying `a` for `dev`.
pub fn fs_params<'a>(dev: &'a Dev, a: &Args, version: u32) -> IO_CONNECT_INTERRUPT_PARAMETERS<'a> {
    let mut p = IO_CONNECT_INTERRUPT_PARAMETERS::new(version);
    p.FullySpecified = IO_CONNECT_INTERRUPT_FULLY_SPECIFIED_PARAMETERS {
        PhysicalDeviceObject: Some(&dev.obj),
        InterruptObject: None,
        ServiceRoutine: a.routine,
        ServiceContext: a.context,
        SpinLock: a.lock,
        SynchronizeIrql: a.sync,
        FloatingSave: a.floating,
        ShareVector: a.share,
        Vector: a.vector,
        Irql: a.irql,
        InterruptMode: a.mode,
        ProcessorEnableMask: a.mask,
        Group: 0,
    };
    p
}

/// IoConnectInterruptEx CONNECT_FULLY_SPECIFIED with `a` for `dev`; the
/// ISR context (when it is one of [`CTX`]) learns its connection.
pub fn connect_fs(dev: &Dev, a: &Args) -> (NTSTATUS, Option<PKINTERRUPT>) {
    let mut p = fs_params(dev, a, wdm::CONNECT_FULLY_SPECIFIED);
    let status = IoConnectInterruptEx(&mut p);
    if let (Some(h), Some(ctx)) = (p.FullySpecified.InterruptObject, ctx_of(a.context)) {
        ctx.expect_object.store(h.to_bits(), Ordering::Release);
    }
    (status, p.FullySpecified.InterruptObject)
}

/// IoDisconnectInterruptEx of the connection `h` names, with `version`.
pub fn disconnect_ex(version: u32, h: PKINTERRUPT) -> NTSTATUS {
    IoDisconnectInterruptEx(&IO_DISCONNECT_INTERRUPT_PARAMETERS {
        Version: version,
        ConnectionContext: IO_INTERRUPT_CONNECTION_CONTEXT::InterruptObject(h),
    })
}

/// IoDisconnectInterruptEx with `version` and expects success.
pub fn disconnect_ex_ok(version: u32, h: PKINTERRUPT) -> TestResult {
    match disconnect_ex(version, h) {
        STATUS_SUCCESS => Ok(()),
        s => fail!(
            "IoDisconnectInterruptEx (Version {}): {} ({})",
            crate::display::dec(version),
            status_name(s),
            crate::display::hex(s)
        ),
    }
}

/// Connects and expects success; the ISR context (when it is one of
/// [`CTX`]) learns its connection.
pub fn connect_ok(dev: &Dev, a: &Args) -> Result<PKINTERRUPT, Failure> {
    match connect(dev, a) {
        (STATUS_SUCCESS, Some(h)) => {
            if let Some(ctx) = ctx_of(a.context) {
                ctx.expect_object.store(h.to_bits(), Ordering::Release);
            }
            Ok(h)
        }
        (STATUS_SUCCESS, None) => fail!("IoConnectInterrupt succeeded without an interrupt object"),
        (s, _) => fail!(
            "IoConnectInterrupt of device {} vector {} mask {}: {}",
            crate::display::dec(dev.id()),
            crate::display::hex(a.vector),
            crate::display::hex(a.mask),
            status_name(s)
        ),
    }
}

/// Connects and expects the failure `want` with `*InterruptObject` left
/// `None` and the host's object count unchanged.
pub fn connect_refused(dev: &Dev, a: &Args, want: NTSTATUS, what: &str) -> TestResult {
    let before = objects_in_use()?;
    let guest_before = wdm::usage();
    let (status, object) = connect(dev, a);
    if let Some(h) = object {
        let _ = IoDisconnectInterrupt(h);
    }
    check!(
        status == want,
        "{}: IoConnectInterrupt answered {} ({}), expected {}",
        what,
        status_name(status),
        crate::display::hex(status),
        status_name(want)
    );
    check!(
        object.is_none(),
        "{}: *InterruptObject set on failure",
        what
    );
    let after = objects_in_use()?;
    check!(
        after == before && wdm::usage() == guest_before,
        "{}: a refused connect changed the object count ({} -> {})",
        what,
        crate::display::dec(before),
        crate::display::dec(after)
    );
    Ok(())
}

/// Disconnects and expects success.
pub fn disconnect_ok(h: PKINTERRUPT) -> TestResult {
    match IoDisconnectInterrupt(h) {
        STATUS_SUCCESS => Ok(()),
        s => fail!("IoDisconnectInterrupt: {}", status_name(s)),
    }
}

/// Fails unless the test device's assert and ack counters moved by exactly
/// `n` since `(asserts, acks)` and the ISR claimed `n`.
pub fn check_counts(dev: &Dev, base: (u32, u32), claimed: u32, n: u32) -> TestResult {
    let asserts = dev.td.assert_count().wrapping_sub(base.0);
    let acks = dev.td.ack_count().wrapping_sub(base.1);
    check!(
        asserts == n && acks == n && claimed == n,
        "device {}: {} raised, {} acked by the device, {} claimed by the ISR, expected {}",
        crate::display::dec(dev.id()),
        crate::display::dec(asserts),
        crate::display::dec(acks),
        crate::display::dec(claimed),
        crate::display::dec(n)
    );
    Ok(())
}

/// Device objects started for the first `count` devices of the host's
/// table (those with a test device), by id.
pub fn started_devices(count: u32) -> [Option<Dev>; MAX_DEVICES] {
    let mut out = [None; MAX_DEVICES];
    for (id, slot) in out.iter_mut().enumerate().take(count as usize) {
        if let (Ok(obj), Some(td)) = (DEVICE_OBJECT::start(id as u32), TestDev::new(id as u32)) {
            *slot = Some(Dev { obj, td });
        }
    }
    out
}

/// Stops every cause of `devs` ([`quiet`]).
pub fn quiesce_all(devs: &[Option<Dev>; MAX_DEVICES]) {
    devs.iter().flatten().for_each(quiet);
}

/// The first (or, `last`, the last) device of `devs` with one exclusive
/// resource of `mode`.
pub fn exclusive(
    devs: &[Option<Dev>; MAX_DEVICES],
    mode: KINTERRUPT_MODE,
    last: bool,
) -> Option<Dev> {
    let mut it = devs.iter().flatten().filter(|d| {
        let r = d.res(0);
        d.res_count() == 1 && !r.share_vector() && r.interrupt_mode() == mode
    });
    if last { it.next_back() } else { it.next() }.copied()
}

/// After one storm and a full disconnect: the host masked exactly one
/// more pin than at `start` and holds as many objects and connections.
pub fn check_storm_aftermath(start: &QueryPlatform) -> TestResult {
    let end = platform()?;
    check!(
        end.storm_masked_pins == start.storm_masked_pins + 1,
        "storm_masked_pins went from {} to {}, expected one more",
        crate::display::dec(start.storm_masked_pins),
        crate::display::dec(end.storm_masked_pins)
    );
    check!(
        end.objects_in_use == start.objects_in_use && end.connections == start.connections,
        "host not back at its baseline: {} objects / {} connections, was {} / {}",
        crate::display::dec(end.objects_in_use),
        crate::display::dec(end.connections),
        crate::display::dec(start.objects_in_use),
        crate::display::dec(start.connections)
    );
    Ok(())
}

/// After a storm-masked pin's connection went: a new claiming connection
/// of `s` (context slot 2, processors `online`) re-arms the pin (unmasked,
/// on the device's vector), takes exactly 3 causes, and disconnects.
pub fn rearmed_by_new_connect(s: &Dev, online: u64) -> TestResult {
    let (pin, vector) = (s.line(), s.vector());
    let again = CTX[2].bind(Some(s), Policy::One, online);
    let h2 = connect_ok(s, &Args::of(s, 0, &CTX[2]))?;
    let r = route(pin)?;
    check!(
        r.masked == 0 && r.vector == vector,
        "pin {} not re-armed by a new CONNECT: masked {} vector {}",
        crate::display::dec(pin),
        crate::display::dec(r.masked),
        crate::display::hex(r.vector)
    );
    let base = counters(s);
    s.td.enable(true);
    s.td.raise(3);
    wait_for("the re-connected ISR to claim 3 causes", || {
        again.claimed() >= 3
    })?;
    settle();
    s.td.enable(false);
    check_counts(s, base, again.claimed(), 3)?;
    disconnect_ok(h2)
}

/// The device's (assert, ack) counters now.
pub fn counters(dev: &Dev) -> (u32, u32) {
    (dev.td.assert_count(), dev.td.ack_count())
}

/// Raises `n` causes on `dev` with CR8 at the vector's class, so they are
/// pending together when CR8 drops (one delivery for coalesced edges).
pub fn raise_held(devs: &[(&Dev, u32)]) {
    let class = devs.iter().map(|(d, _)| d.vector() >> 4).max().unwrap_or(0);
    let old = crate::irql::raise(class.max(crate::irql::current()));
    for (d, n) in devs {
        d.td.raise(*n);
    }
    crate::irql::lower(old);
}

/// Makes every processor take what is already pending in its IRR: a work
/// item on each AP (its idle loop enables interrupts before running it),
/// then a moment with interrupts enabled here. A level interrupt the host
/// re-sent at injection (kernel/split quirk) to a processor that was not
/// running yet would otherwise land after the route changed, inside the
/// next measurement.
pub fn flush_cpus() {
    flush_where(|_| true);
}

/// [`flush_cpus`] for the processors of `mask` in `group` only (those that
/// may take an interrupt routed there).
pub fn flush_in(group: u16, mask: KAFFINITY) {
    flush_where(|c| c / GROUP_SIZE == usize::from(group) && mask & (1u64 << (c % GROUP_SIZE)) != 0);
}

fn flush_where(which: impl Fn(usize) -> bool) {
    // The APs at once: post to all, then wait for each.
    let mut posted = [false; percpu::MAX_CPUS];
    for (c, p) in posted.iter_mut().enumerate().take(percpu::count()).skip(1) {
        *p = which(c) && crate::smp::post(c, |_| 0, 0).is_ok();
    }
    for (c, _) in posted.iter().enumerate().filter(|(_, p)| **p) {
        let _ = crate::smp::wait(c, 2_000_000);
    }
    cpu::sti();
    time::delay_us(50);
}

/// Deliveries of `vector` per processor now (after [`flush_cpus`] when the
/// count is a baseline).
pub fn deliveries(vector: u8) -> [u32; percpu::MAX_CPUS] {
    let mut out = [0; percpu::MAX_CPUS];
    for (c, slot) in out.iter_mut().enumerate().take(percpu::count()) {
        *slot = percpu::cpu(c).count(vector);
    }
    out
}

/// Fails when a processor outside `mask` took `vector` since `before`.
pub fn none_outside(vector: u8, before: &[u32; percpu::MAX_CPUS], mask: KAFFINITY) -> TestResult {
    let now = deliveries(vector);
    for c in 0..percpu::count() {
        let n = now[c].wrapping_sub(before[c]);
        check!(
            mask & (1 << c) != 0 || n == 0,
            "cpu {} outside mask {} took {} interrupts on vector {}",
            crate::display::dec(c),
            crate::display::hex(mask),
            crate::display::dec(n),
            crate::display::hex(vector)
        );
    }
    Ok(())
}
