//! The PnP device and resource table: the VMM plays PnP manager and gives
//! each device its interrupt resources (pin, vector, IRQL, affinity, trigger
//! mode, share disposition).
//!
//! A table comes from [`DeviceTable::default_for`] (the guest test platform)
//! or from a configuration ([`TableConfig`], e.g. JSON) that is validated
//! into a [`DeviceTable`]; a bad configuration is an [`Error`], never a panic.

use irqconnect_abi::layout::{
    DEVICE_VECTOR_MAX, DEVICE_VECTOR_MIN, IOAPIC_PINS, MSIDEV_MAX_DEVICES,
};
use irqconnect_abi::pv::{
    InterruptResource, MAX_RESOURCES, RESOURCE_FLAG_LATCHED, RESOURCE_TYPE_INTERRUPT,
    interrupt_mode, share,
};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::messages::{
    IrqPolicy, MessageConfig, MessageConfigError, MessageKind, MessageResource, assign_vectors,
};
use crate::platform::Platform;

/// Most devices a table holds. Devices 0..8 have an interrupt-source test
/// device each (`irqconnect_abi::layout::TESTDEV_MAX_DEVICES`); devices with
/// messages have a message-signaled test device each, at most
/// [`MSIDEV_MAX_DEVICES`] of them.
pub const MAX_DEVICES: usize = 16;

/// `KINTERRUPT_MODE`: how a device signals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterruptMode {
    /// The device holds its line until serviced (level-triggered pin); 0
    /// in the ABI, so the default.
    #[default]
    LevelSensitive,
    /// The device signals with an edge (edge-triggered pin).
    Latched,
}

impl InterruptMode {
    /// The trigger mode of an IOAPIC pin that serves this mode: level for
    /// LevelSensitive, edge for Latched.
    pub const fn trigger_mode(self) -> irqchip::apic_bus::TriggerMode {
        match self {
            Self::LevelSensitive => irqchip::apic_bus::TriggerMode::Level,
            Self::Latched => irqchip::apic_bus::TriggerMode::Edge,
        }
    }

    /// Decodes a `KINTERRUPT_MODE` value; `None` for anything else.
    pub const fn from_abi(value: u8) -> Option<Self> {
        match value {
            interrupt_mode::LEVEL_SENSITIVE => Some(Self::LevelSensitive),
            interrupt_mode::LATCHED => Some(Self::Latched),
            _ => None,
        }
    }

    /// The `KINTERRUPT_MODE` value.
    pub const fn to_abi(self) -> u8 {
        match self {
            Self::LevelSensitive => interrupt_mode::LEVEL_SENSITIVE,
            Self::Latched => interrupt_mode::LATCHED,
        }
    }
}

/// `CM_SHARE_DISPOSITION` of an interrupt resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareDisposition {
    /// `CmResourceShareDeviceExclusive`: no other device uses the vector.
    Exclusive,
    /// `CmResourceShareShared`: other devices may use the vector.
    Shared,
}

impl ShareDisposition {
    /// The ABI value ([`share`]).
    pub const fn to_abi(self) -> u8 {
        match self {
            Self::Exclusive => share::DEVICE_EXCLUSIVE,
            Self::Shared => share::SHARED,
        }
    }
}

/// One translated interrupt resource of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    /// The IOAPIC pin the device drives (the raw resource).
    pub pin: u8,
    /// The IDT vector.
    pub vector: u8,
    /// How the device signals.
    pub mode: InterruptMode,
    /// Whether other devices may use the vector.
    pub share: ShareDisposition,
    /// Processors the device may interrupt (KAFFINITY of `group`).
    pub affinity: u64,
    /// The processor group of `affinity` (`GROUP_AFFINITY`).
    pub group: u16,
}

impl Resource {
    /// The DIRQL: the vector's priority class.
    pub const fn irql(&self) -> u8 {
        self.vector >> 4
    }

    /// The `CM_PARTIAL_RESOURCE_DESCRIPTOR` analogue the guest reads.
    pub fn to_abi(&self) -> InterruptResource {
        InterruptResource {
            kind: RESOURCE_TYPE_INTERRUPT,
            share_disposition: self.share.to_abi(),
            flags: match self.mode {
                InterruptMode::Latched => RESOURCE_FLAG_LATCHED,
                InterruptMode::LevelSensitive => 0,
            },
            level: u32::from(self.irql()),
            vector: u32::from(self.vector),
            line: u32::from(self.pin),
            affinity: self.affinity,
        }
    }
}

/// A device with interrupt resources: line-based ones, message-signaled
/// ones, or both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    id: u32,
    resources: Vec<Resource>,
    messages: Option<MessageResource>,
}

impl Device {
    /// The device id (its index in the table and its test-device index).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Its line-based interrupt resources, 0..=[`MAX_RESOURCES`].
    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    /// Its message-signaled interrupts, if it has any.
    pub fn messages(&self) -> Option<&MessageResource> {
        self.messages.as_ref()
    }

    /// The highest Irql among its line-based resources (0 when it has none).
    pub fn highest_line_irql(&self) -> u8 {
        self.resources.iter().map(Resource::irql).max().unwrap_or(0)
    }

    /// The line its test device drives: the pin of its first resource.
    pub fn line(&self) -> u8 {
        self.resources.first().map_or(0, |r| r.pin)
    }

    /// Its resource with `vector`, if it owns one.
    pub fn resource_for_vector(&self, vector: u32) -> Option<&Resource> {
        self.resources
            .iter()
            .find(|r| u32::from(r.vector) == vector)
    }
}

/// One resource in a configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    /// IOAPIC pin, `< 24`.
    pub pin: u8,
    /// Vector, in the device range `0x30..=0xbf`.
    pub vector: u8,
    /// If given, must equal `vector >> 4`.
    #[serde(default)]
    pub irql: Option<u8>,
    /// Trigger mode.
    pub mode: InterruptMode,
    /// Share disposition.
    pub share: ShareDisposition,
    /// Affinity; all online processors of `group` when absent.
    #[serde(default)]
    pub affinity: Option<u64>,
    /// The processor group of `affinity`; 0 when absent.
    #[serde(default)]
    pub group: u16,
}

/// One device in a configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Must equal the device's index in the table.
    pub id: u32,
    /// 0..=4 line-based resources (at least one, or messages).
    #[serde(default)]
    pub resources: Vec<ResourceConfig>,
    /// Message-signaled interrupts; their vectors are assigned when the
    /// table is built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<MessageConfig>,
}

/// A device table as configured (e.g. from JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Devices in id order.
    pub devices: Vec<DeviceConfig>,
}

/// The validated device table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceTable {
    devices: Vec<Device>,
    /// Bit `p` of entry `v`: pin `p` carries vector `v`.
    pins_by_vector: Vec<u32>,
    /// Entry `p`: the (device index, resource index) of the first resource
    /// on pin `p`.
    resource_by_pin: Vec<Option<(usize, usize)>>,
}

impl DeviceTable {
    /// The guest test platform's table (see the crate README):
    ///
    /// | dev | pin | vector | mode | share |
    /// |---|---|---|---|---|
    /// | 0 | 16 | 0x60 | level | exclusive |
    /// | 1 | 17 | 0x61 | latched | exclusive |
    /// | 2, 3 | 18 (one pin) | 0x70 | level | shared |
    /// | 4, 5 | 19, 20 (two pins) | 0x80 | latched | shared |
    /// | 6 | 21 / 23 | 0x90 / 0xa0 | level / latched | exclusive |
    /// | 7 | 22 | 0xb0 | level | exclusive |
    ///
    /// and three devices with message-signaled interrupts only, each with a
    /// message-signaled test device:
    ///
    /// | dev | kind | messages | IRQL class | policy | affinity |
    /// |---|---|---|---|---|---|
    /// | 8 | MSI | 1 | 5 | OneCloseProcessor | all |
    /// | 9 | MSI | 4 | 5 | SpecifiedProcessors | all |
    /// | 10 | MSI-X | 8 | 4 | SpreadMessagesAcrossAllProcessors | all |
    ///
    /// Every other affinity is the platform's online mask.
    pub fn default_for(platform: &Platform) -> Self {
        let online = platform.online_mask();
        let message_configs = [
            (MessageKind::Msi, 1, 5, IrqPolicy::OneCloseProcessor, online),
            (
                MessageKind::Msi,
                4,
                5,
                IrqPolicy::SpecifiedProcessors,
                online,
            ),
            (
                MessageKind::Msix,
                8,
                4,
                IrqPolicy::SpreadMessagesAcrossAllProcessors,
                online,
            ),
        ];
        let mut devices = Self::default_line_devices(platform);
        let mut used = used_vectors(&devices);
        for (j, (kind, count, irql, policy, affinity)) in message_configs.into_iter().enumerate() {
            let config = MessageConfig {
                kind,
                count,
                irql,
                policy,
                affinity: Some(affinity),
                group: 0,
            };
            // The default classes have room for these blocks by construction.
            let Ok(first_vector) = assign_vectors(&config, &mut used) else {
                continue;
            };
            devices.push(Device {
                id: devices.len() as u32,
                resources: Vec::new(),
                messages: Some(MessageResource {
                    kind,
                    count,
                    first_vector,
                    policy,
                    affinity,
                    group: 0,
                    test_device: Some(j as u8),
                }),
            });
        }
        Self::index(devices)
    }

    /// Devices 0..7 of the default table (line-based only).
    fn default_line_devices(platform: &Platform) -> Vec<Device> {
        use InterruptMode::{Latched, LevelSensitive as Level};
        use ShareDisposition::{Exclusive, Shared};
        let affinity = platform.online_mask();
        let r = |pin, vector, mode, share| Resource {
            pin,
            vector,
            mode,
            share,
            affinity,
            group: 0,
        };
        let resources = [
            vec![r(16, 0x60, Level, Exclusive)],
            vec![r(17, 0x61, Latched, Exclusive)],
            vec![r(18, 0x70, Level, Shared)],
            vec![r(18, 0x70, Level, Shared)],
            vec![r(19, 0x80, Latched, Shared)],
            vec![r(20, 0x80, Latched, Shared)],
            vec![
                r(21, 0x90, Level, Exclusive),
                r(23, 0xa0, Latched, Exclusive),
            ],
            vec![r(22, 0xb0, Level, Exclusive)],
        ];
        resources
            .into_iter()
            .enumerate()
            .map(|(id, resources)| Device {
                id: id as u32,
                resources,
                messages: None,
            })
            .collect()
    }

    /// Validates `config` against `platform`.
    ///
    /// Rules: at most [`MAX_DEVICES`] devices with ids 0, 1, ...; 0..=4
    /// line resources each, and at least one line resource or messages;
    /// message vectors are assigned here (`crate::messages::assign_vectors`)
    /// after every line resource's; each device with at most
    /// `irqconnect_abi::msidev::MAX_MESSAGES` messages gets a
    /// message-signaled test device, at most [`MSIDEV_MAX_DEVICES`] of them;
    /// pins below 24; vectors in `0x30..=0xbf`; a stated IRQL equals
    /// `vector >> 4`; no vector twice in one device; an affinity names an
    /// online processor; resources on one pin have one vector and one
    /// trigger mode and are all shared; resources on one vector have one
    /// trigger mode and are all shared.
    pub fn from_config(config: &TableConfig, platform: &Platform) -> Result<Self, Error> {
        let max = MAX_DEVICES;
        if config.devices.len() > max {
            return Err(Error::TooManyDevices {
                count: config.devices.len(),
                max,
            });
        }
        let mut devices = Vec::with_capacity(config.devices.len());
        for (index, dev) in config.devices.iter().enumerate() {
            if dev.id as usize != index {
                return Err(Error::DeviceIdNotIndex { index, id: dev.id });
            }
            devices.push(device_from_config(dev, platform)?);
        }
        check_sharing(&devices)?;
        assign_messages(&mut devices, config, platform)?;
        Ok(Self::index(devices))
    }

    /// Parses a JSON [`TableConfig`] and validates it.
    pub fn from_json(text: &str, platform: &Platform) -> Result<Self, Error> {
        let config: TableConfig = serde_json::from_str(text).map_err(|e| Error::ConfigSyntax {
            message: e.to_string(),
        })?;
        Self::from_config(&config, platform)
    }

    /// The device whose messages use `vector`, and the message number.
    pub fn message_of_vector(&self, vector: u8) -> Option<(&Device, u8)> {
        self.devices.iter().find_map(|d| {
            let m = d.messages.as_ref()?;
            m.owns_vector(vector)
                .then(|| (d, vector.wrapping_sub(m.first_vector)))
        })
    }

    fn index(devices: Vec<Device>) -> Self {
        let mut pins_by_vector = vec![0u32; 256];
        let mut resource_by_pin = vec![None; usize::from(IOAPIC_PINS)];
        for (d, device) in devices.iter().enumerate() {
            for (i, r) in device.resources.iter().enumerate() {
                if let Some(bits) = pins_by_vector.get_mut(usize::from(r.vector)) {
                    *bits |= 1 << r.pin;
                }
                if let Some(at @ None) = resource_by_pin.get_mut(usize::from(r.pin)) {
                    *at = Some((d, i));
                }
            }
        }
        Self {
            devices,
            pins_by_vector,
            resource_by_pin,
        }
    }

    /// The devices in id order.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// The device with `id`.
    pub fn device(&self, id: u32) -> Option<&Device> {
        self.devices.get(usize::try_from(id).ok()?)
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// True when the table has no device.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Pins carrying `vector`, as a bit mask (bit `p` = pin `p`).
    pub fn pins_of_vector(&self, vector: u8) -> u32 {
        self.pins_by_vector
            .get(usize::from(vector))
            .copied()
            .unwrap_or(0)
    }

    /// The resource that assigns `pin`, if any device uses it.
    pub fn resource_on_pin(&self, pin: u8) -> Option<&Resource> {
        let (d, i) = (*self.resource_by_pin.get(usize::from(pin))?)?;
        self.devices.get(d)?.resources.get(i)
    }

    /// Back to a configuration (for logs or to save a generated table).
    pub fn to_config(&self) -> TableConfig {
        TableConfig {
            devices: self
                .devices
                .iter()
                .map(|d| DeviceConfig {
                    id: d.id,
                    messages: d.messages.map(|m| MessageConfig {
                        kind: m.kind,
                        count: m.count,
                        irql: m.irql(),
                        policy: m.policy,
                        affinity: Some(m.affinity),
                        group: m.group,
                    }),
                    resources: d
                        .resources
                        .iter()
                        .map(|r| ResourceConfig {
                            pin: r.pin,
                            vector: r.vector,
                            irql: Some(r.irql()),
                            mode: r.mode,
                            share: r.share,
                            affinity: Some(r.affinity),
                            group: r.group,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

fn device_from_config(dev: &DeviceConfig, platform: &Platform) -> Result<Device, Error> {
    let device = dev.id;
    let none = dev.resources.is_empty() && dev.messages.is_none();
    if none || dev.resources.len() > MAX_RESOURCES {
        return Err(Error::ResourceCount {
            device,
            count: dev.resources.len(),
            max: MAX_RESOURCES,
        });
    }
    let mut resources: Vec<Resource> = Vec::with_capacity(dev.resources.len());
    for rc in &dev.resources {
        if rc.pin >= IOAPIC_PINS {
            return Err(Error::PinOutOfRange {
                device,
                pin: rc.pin,
                pins: IOAPIC_PINS,
            });
        }
        if !(DEVICE_VECTOR_MIN..=DEVICE_VECTOR_MAX).contains(&rc.vector) {
            return Err(Error::VectorOutOfRange {
                device,
                vector: rc.vector,
                min: DEVICE_VECTOR_MIN,
                max: DEVICE_VECTOR_MAX,
            });
        }
        if let Some(irql) = rc.irql
            && irql != rc.vector >> 4
        {
            return Err(Error::IrqlMismatch {
                device,
                vector: rc.vector,
                irql,
            });
        }
        if resources.iter().any(|r| r.vector == rc.vector) {
            return Err(Error::DuplicateVector {
                device,
                vector: rc.vector,
            });
        }
        let online = platform.group_online(rc.group);
        let affinity = rc.affinity.unwrap_or(online);
        if affinity & online == 0 {
            return Err(Error::AffinityEmpty {
                device,
                vector: rc.vector,
                affinity,
            });
        }
        resources.push(Resource {
            pin: rc.pin,
            vector: rc.vector,
            mode: rc.mode,
            share: rc.share,
            affinity,
            group: rc.group,
        });
    }
    Ok(Device {
        id: device,
        resources,
        messages: None,
    })
}

/// Vectors the line resources of `devices` use.
fn used_vectors(devices: &[Device]) -> [bool; 256] {
    let mut used = [false; 256];
    for r in devices.iter().flat_map(|d| d.resources.iter()) {
        if let Some(u) = used.get_mut(usize::from(r.vector)) {
            *u = true;
        }
    }
    used
}

/// Assigns the configured message resources their vectors, in device
/// order, and their message-signaled test devices.
fn assign_messages(
    devices: &mut [Device],
    config: &TableConfig,
    platform: &Platform,
) -> Result<(), Error> {
    let mut used = used_vectors(devices);
    let mut test_device = 0u8;
    for (device, dev) in devices.iter_mut().zip(&config.devices) {
        let Some(mc) = &dev.messages else { continue };
        // The test device's mask and pending registers have one bit per
        // message: a device with more messages has none.
        let raised = mc.count <= irqconnect_abi::msidev::MAX_MESSAGES;
        if raised && u16::from(test_device) >= MSIDEV_MAX_DEVICES {
            return Err(Error::TooManyMessageDevices {
                max: MSIDEV_MAX_DEVICES,
            });
        }
        let first_vector = assign_vectors(mc, &mut used).map_err(|e| Error::MessagesInvalid {
            device: dev.id,
            what: match e {
                MessageConfigError::BadCount => {
                    "the count must be 1..=64, and a power of two up to 32 for MSI"
                }
                MessageConfigError::BadClass => {
                    "the IRQL class must be 3..=11 (the device vector range)"
                }
                MessageConfigError::ClassFull => {
                    "the IRQL class has no free block of vectors left for the messages"
                }
            },
        })?;
        let online = platform.group_online(mc.group);
        let affinity = mc.affinity.unwrap_or(online);
        if affinity & online == 0 {
            return Err(Error::MessagesInvalid {
                device: dev.id,
                what: "the affinity names no online processor of its group",
            });
        }
        device.messages = Some(MessageResource {
            kind: mc.kind,
            count: mc.count,
            first_vector,
            policy: mc.policy,
            affinity,
            group: mc.group,
            test_device: raised.then_some(test_device),
        });
        if raised {
            test_device += 1;
        }
    }
    Ok(())
}

/// Pins and vectors used by several resources must be shared alike.
fn check_sharing(devices: &[Device]) -> Result<(), Error> {
    let all: Vec<(u32, &Resource)> = devices
        .iter()
        .flat_map(|d| d.resources.iter().map(move |r| (d.id, r)))
        .collect();
    for (i, &(first, a)) in all.iter().enumerate() {
        for &(second, b) in all.iter().skip(i + 1) {
            let alike = a.mode == b.mode
                && a.share == ShareDisposition::Shared
                && b.share == ShareDisposition::Shared;
            if a.pin == b.pin && (a.vector != b.vector || !alike) {
                return Err(Error::PinConflict {
                    pin: a.pin,
                    first,
                    second,
                });
            }
            if a.vector == b.vector && !alike {
                return Err(Error::VectorConflict {
                    vector: a.vector,
                    first,
                    second,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(n: u32) -> Platform {
        match Platform::uniform(n) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    fn res(pin: u8, vector: u8, mode: InterruptMode, share: ShareDisposition) -> ResourceConfig {
        ResourceConfig {
            pin,
            vector,
            irql: None,
            mode,
            share,
            affinity: None,
            group: 0,
        }
    }

    fn one_device(r: ResourceConfig) -> TableConfig {
        TableConfig {
            devices: vec![DeviceConfig {
                messages: None,
                id: 0,
                resources: vec![r],
            }],
        }
    }

    use InterruptMode::{Latched, LevelSensitive};
    use ShareDisposition::{Exclusive, Shared};

    #[test]
    fn default_table_has_message_devices_after_the_line_devices() {
        let t = DeviceTable::default_for(&platform(4));
        let m: Vec<_> = t.devices()[8..]
            .iter()
            .map(|d| {
                let m = d.messages().unwrap();
                assert!(d.resources().is_empty());
                (
                    m.kind,
                    m.count,
                    m.first_vector,
                    m.policy,
                    m.affinity,
                    m.test_device,
                )
            })
            .collect();
        assert_eq!(
            m,
            [
                (
                    MessageKind::Msi,
                    1,
                    0x5f,
                    IrqPolicy::OneCloseProcessor,
                    0b1111,
                    Some(0)
                ),
                (
                    MessageKind::Msi,
                    4,
                    0x58,
                    IrqPolicy::SpecifiedProcessors,
                    0b1111,
                    Some(1)
                ),
                (
                    MessageKind::Msix,
                    8,
                    0x48,
                    IrqPolicy::SpreadMessagesAcrossAllProcessors,
                    0b1111,
                    Some(2)
                ),
            ]
        );
        assert_eq!(
            t.message_of_vector(0x5a).map(|(d, k)| (d.id(), k)),
            Some((9, 2))
        );
        assert!(t.message_of_vector(0x60).is_none());
    }

    #[test]
    fn config_messages_get_vectors_after_line_resources_and_errors_are_one_line() {
        let p = platform(4);
        let mut cfg = one_device(res(16, 0x5f, Latched, Exclusive));
        cfg.devices[0].messages = Some(MessageConfig {
            kind: MessageKind::Msix,
            count: 2,
            irql: 5,
            policy: IrqPolicy::MachineDefault,
            affinity: None,
            group: 0,
        });
        let t = DeviceTable::from_config(&cfg, &p).unwrap();
        let m = t.device(0).and_then(Device::messages).unwrap();
        assert_eq!(
            (m.first_vector, m.affinity, m.test_device),
            (0x5c, 0b1111, Some(0))
        );
        cfg.devices[0].messages.as_mut().unwrap().count = 0;
        let e = DeviceTable::from_config(&cfg, &p).unwrap_err();
        assert!(matches!(e, Error::MessagesInvalid { device: 0, .. }), "{e}");
        let five = TableConfig {
            devices: (0..5)
                .map(|id| DeviceConfig {
                    id,
                    resources: Vec::new(),
                    messages: Some(MessageConfig {
                        kind: MessageKind::Msi,
                        count: 1,
                        irql: 5,
                        policy: IrqPolicy::MachineDefault,
                        affinity: None,
                        group: 0,
                    }),
                })
                .collect(),
        };
        assert!(matches!(
            DeviceTable::from_config(&five, &p),
            Err(Error::TooManyMessageDevices { max: 4 })
        ));
        let nothing = TableConfig {
            devices: vec![DeviceConfig {
                id: 0,
                resources: Vec::new(),
                messages: None,
            }],
        };
        assert!(matches!(
            DeviceTable::from_config(&nothing, &p),
            Err(Error::ResourceCount { count: 0, .. })
        ));
    }

    #[test]
    fn default_table_has_eight_line_devices_with_sharing_situations() {
        let t = DeviceTable::default_for(&platform(4));
        assert_eq!(t.len(), 11);
        // Shared pin: devices 2 and 3 on pin 18, vector 0x70.
        assert_eq!(t.pins_of_vector(0x70), 1 << 18);
        // Two pins, one vector: devices 4 and 5.
        assert_eq!(t.pins_of_vector(0x80), (1 << 19) | (1 << 20));
        // Device 6 owns two vectors.
        assert_eq!(t.device(6).map(|d| d.resources().len()), Some(2));
        // Only pins 16..23 are used.
        for d in t.devices() {
            for r in d.resources() {
                assert!((16..24).contains(&r.pin));
                assert_eq!(r.affinity, 0b1111);
            }
        }
    }

    #[test]
    fn default_table_passes_its_own_validation() {
        let p = platform(2);
        let t = DeviceTable::default_for(&p);
        assert_eq!(DeviceTable::from_config(&t.to_config(), &p), Ok(t));
    }

    #[test]
    fn resource_to_abi_reports_irql_and_latched_flag() {
        let t = DeviceTable::default_for(&platform(1));
        let r = t
            .device(1)
            .and_then(|d| d.resources().first())
            .map(Resource::to_abi);
        assert_eq!(
            r.map(|r| (r.level, r.vector, r.line, r.flags)),
            Some((6, 0x61, 17, 1))
        );
    }

    #[test]
    fn config_json_parses_and_validates() {
        let json = r#"{"devices":[{"id":0,"resources":[
            {"pin":16,"vector":81,"mode":"latched","share":"exclusive","affinity":1}]}]}"#;
        let t = DeviceTable::from_json(json, &platform(2));
        assert_eq!(t.as_ref().map(DeviceTable::len), Ok(1));
        assert_eq!(
            t.map(|t| t.device(0).map(|d| d.resources()[0].affinity)),
            Ok(Some(1))
        );
    }

    #[test]
    fn config_json_syntax_error_is_config_error() {
        let err = DeviceTable::from_json("{\"devices\": [", &platform(1));
        assert!(matches!(err, Err(Error::ConfigSyntax { .. })));
        let unknown = DeviceTable::from_json(r#"{"devices":[],"extra":1}"#, &platform(1));
        assert!(matches!(unknown, Err(Error::ConfigSyntax { .. })));
    }

    #[test]
    fn config_pin_out_of_range_rejected() {
        let c = one_device(res(24, 0x60, LevelSensitive, Exclusive));
        assert!(matches!(
            DeviceTable::from_config(&c, &platform(1)),
            Err(Error::PinOutOfRange { pin: 24, .. })
        ));
    }

    #[test]
    fn config_vector_outside_device_range_rejected() {
        for vector in [0x2f, 0xc0] {
            let c = one_device(res(16, vector, LevelSensitive, Exclusive));
            assert!(matches!(
                DeviceTable::from_config(&c, &platform(1)),
                Err(Error::VectorOutOfRange { .. })
            ));
        }
    }

    #[test]
    fn config_irql_not_vector_class_rejected() {
        let mut r = res(16, 0x60, LevelSensitive, Exclusive);
        r.irql = Some(5);
        assert!(matches!(
            DeviceTable::from_config(&one_device(r), &platform(1)),
            Err(Error::IrqlMismatch { irql: 5, .. })
        ));
    }

    #[test]
    fn config_shared_pin_with_two_vectors_rejected() {
        let c = TableConfig {
            devices: vec![
                DeviceConfig {
                    messages: None,
                    id: 0,
                    resources: vec![res(18, 0x70, LevelSensitive, Shared)],
                },
                DeviceConfig {
                    messages: None,
                    id: 1,
                    resources: vec![res(18, 0x71, LevelSensitive, Shared)],
                },
            ],
        };
        assert_eq!(
            DeviceTable::from_config(&c, &platform(1)),
            Err(Error::PinConflict {
                pin: 18,
                first: 0,
                second: 1
            })
        );
    }

    #[test]
    fn config_shared_vector_with_two_trigger_modes_rejected() {
        let c = TableConfig {
            devices: vec![
                DeviceConfig {
                    messages: None,
                    id: 0,
                    resources: vec![res(19, 0x80, Latched, Shared)],
                },
                DeviceConfig {
                    messages: None,
                    id: 1,
                    resources: vec![res(20, 0x80, LevelSensitive, Shared)],
                },
            ],
        };
        assert!(matches!(
            DeviceTable::from_config(&c, &platform(1)),
            Err(Error::VectorConflict { vector: 0x80, .. })
        ));
    }

    #[test]
    fn config_exclusive_vector_used_twice_rejected() {
        let c = TableConfig {
            devices: vec![
                DeviceConfig {
                    messages: None,
                    id: 0,
                    resources: vec![res(19, 0x80, Latched, Exclusive)],
                },
                DeviceConfig {
                    messages: None,
                    id: 1,
                    resources: vec![res(20, 0x80, Latched, Shared)],
                },
            ],
        };
        assert!(matches!(
            DeviceTable::from_config(&c, &platform(1)),
            Err(Error::VectorConflict { .. })
        ));
    }

    #[test]
    fn config_structure_errors_rejected() {
        let p = platform(2);
        let empty = TableConfig {
            devices: vec![DeviceConfig {
                messages: None,
                id: 0,
                resources: vec![],
            }],
        };
        assert!(matches!(
            DeviceTable::from_config(&empty, &p),
            Err(Error::ResourceCount { count: 0, .. })
        ));
        let mut wrong_id = one_device(res(16, 0x60, Latched, Exclusive));
        wrong_id.devices[0].id = 3;
        assert_eq!(
            DeviceTable::from_config(&wrong_id, &p),
            Err(Error::DeviceIdNotIndex { index: 0, id: 3 })
        );
        let mut no_cpu = one_device(res(16, 0x60, Latched, Exclusive));
        no_cpu.devices[0].resources[0].affinity = Some(0b100);
        assert!(matches!(
            DeviceTable::from_config(&no_cpu, &p),
            Err(Error::AffinityEmpty { .. })
        ));
        let too_many = TableConfig {
            devices: (0..=MAX_DEVICES as u32)
                .map(|id| DeviceConfig {
                    id,
                    resources: vec![res(16, 0x60, Latched, Shared)],
                    messages: None,
                })
                .collect(),
        };
        assert!(matches!(
            DeviceTable::from_config(&too_many, &p),
            Err(Error::TooManyDevices { count: 17, .. })
        ));
        let twice = TableConfig {
            devices: vec![DeviceConfig {
                messages: None,
                id: 0,
                resources: vec![
                    res(16, 0x60, Latched, Shared),
                    res(17, 0x60, Latched, Shared),
                ],
            }],
        };
        assert!(matches!(
            DeviceTable::from_config(&twice, &p),
            Err(Error::DuplicateVector { vector: 0x60, .. })
        ));
    }
}
