//! The PnP step: a driver's device gets its translated interrupt resources
//! (the `AllocatedResourcesTranslated` of IRP_MN_START_DEVICE) from the
//! host's QUERY_RESOURCES, as `CM_PARTIAL_RESOURCE_DESCRIPTOR`s.

use irqconnect_abi::pv::{
    InterruptResource, MAX_RESOURCES, RESOURCE_FLAG_LATCHED, RESOURCE_TYPE_INTERRUPT, share,
};

use super::{KAFFINITY, KINTERRUPT_MODE, KIRQL, NTSTATUS};
use crate::pv;

/// `CmResourceTypeInterrupt`.
pub const CmResourceTypeInterrupt: u8 = RESOURCE_TYPE_INTERRUPT;
/// `CmResourceShareDeviceExclusive`.
pub const CmResourceShareDeviceExclusive: u8 = share::DEVICE_EXCLUSIVE;
/// `CmResourceShareShared`.
pub const CmResourceShareShared: u8 = share::SHARED;
/// `CM_RESOURCE_INTERRUPT_LATCHED` (clear: `CM_RESOURCE_INTERRUPT_LEVEL_SENSITIVE`).
pub const CM_RESOURCE_INTERRUPT_LATCHED: u16 = RESOURCE_FLAG_LATCHED;

/// A translated interrupt resource (`CM_PARTIAL_RESOURCE_DESCRIPTOR` of type
/// `CmResourceTypeInterrupt`; `u.Interrupt.*` flattened).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CM_PARTIAL_RESOURCE_DESCRIPTOR {
    /// `Type`: [`CmResourceTypeInterrupt`].
    pub kind: u8,
    /// `ShareDisposition`: [`CmResourceShareShared`] or [`CmResourceShareDeviceExclusive`].
    pub share_disposition: u8,
    /// `Flags`: [`CM_RESOURCE_INTERRUPT_LATCHED`] or 0.
    pub flags: u16,
    /// `u.Interrupt.Level`: the DIRQL to pass as `Irql`.
    pub level: KIRQL,
    /// `u.Interrupt.Vector`: the vector to pass as `Vector`.
    pub vector: u32,
    /// `u.Interrupt.Affinity`: the processors to pass as `ProcessorEnableMask`.
    pub affinity: KAFFINITY,
    /// The raw resource: the IOAPIC pin the device drives.
    pub line: u32,
}

impl CM_PARTIAL_RESOURCE_DESCRIPTOR {
    fn from_abi(r: &InterruptResource) -> Self {
        Self {
            kind: r.kind,
            share_disposition: r.share_disposition,
            flags: r.flags,
            level: u8::try_from(r.level).unwrap_or(u8::MAX),
            vector: r.vector,
            affinity: r.affinity,
            line: r.line,
        }
    }

    /// The `InterruptMode` this resource asks for.
    pub fn interrupt_mode(&self) -> KINTERRUPT_MODE {
        if self.flags & CM_RESOURCE_INTERRUPT_LATCHED != 0 {
            KINTERRUPT_MODE::Latched
        } else {
            KINTERRUPT_MODE::LevelSensitive
        }
    }

    /// The `ShareVector` this resource asks for.
    pub fn share_vector(&self) -> bool {
        self.share_disposition == CmResourceShareShared
    }
}

/// A started device (the PDO a driver's FDO sits on): its id and its
/// translated interrupt resources.
#[derive(Clone, Copy, Debug)]
pub struct DEVICE_OBJECT {
    device_id: u32,
    count: usize,
    resources: [CM_PARTIAL_RESOURCE_DESCRIPTOR; MAX_RESOURCES],
}

impl DEVICE_OBJECT {
    /// IRP_MN_START_DEVICE, PnP manager side: asks the host for device
    /// `device_id`'s translated interrupt resources.
    pub fn start(device_id: u32) -> Result<Self, NTSTATUS> {
        let answer = pv::query_resources(device_id)?;
        let count = (answer.count as usize).min(MAX_RESOURCES);
        let mut resources = [CM_PARTIAL_RESOURCE_DESCRIPTOR::default(); MAX_RESOURCES];
        for (d, r) in resources
            .iter_mut()
            .zip(answer.resources.iter())
            .take(count)
        {
            *d = CM_PARTIAL_RESOURCE_DESCRIPTOR::from_abi(r);
        }
        Ok(Self {
            device_id,
            count,
            resources,
        })
    }

    /// The device id (what CONNECT names).
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// `AllocatedResourcesTranslated`: the interrupt descriptors.
    pub fn allocated_resources_translated(&self) -> &[CM_PARTIAL_RESOURCE_DESCRIPTOR] {
        &self.resources[..self.count]
    }

    /// A device object for an id the host need not know (tests of the
    /// host's checks), with no resources.
    pub fn unstarted(device_id: u32) -> Self {
        Self {
            device_id,
            count: 0,
            resources: [CM_PARTIAL_RESOURCE_DESCRIPTOR::default(); MAX_RESOURCES],
        }
    }
}
