//! The PV doorbell port (`PV_DOORBELL_PORT`, 4 bytes).
//!
//! | access | effect |
//! |---|---|
//! | 32-bit `in` at offset 0 | `PV_DOORBELL_SIGNATURE` (`"IRQC"`) |
//! | 32-bit `out` at offset 0 | the value is a request block's guest-physical address: answered, routes applied, before the vCPU resumes |
//! | any other width or offset | reads all ones, writes ignored; counted, warned at a rate limit |

use std::sync::{Arc, Mutex};

use irqconnect_abi::layout::PV_DOORBELL_SIGNATURE;

use irqconnect::Outcome;

use super::PvConnect;
use crate::bus::{Access, BusDevice};
use crate::trace::{Event, Recorder};

/// The doorbell on the port bus.
pub(crate) struct Doorbell {
    pv: Arc<PvConnect>,
    trace: Option<Arc<Recorder>>,
}

impl Doorbell {
    /// The doorbell of `pv`, ready for the bus; each request is recorded in
    /// `trace` when given.
    pub(crate) fn shared(
        pv: &Arc<PvConnect>,
        trace: Option<Arc<Recorder>>,
    ) -> Arc<Mutex<dyn BusDevice>> {
        Arc::new(Mutex::new(Self {
            pv: Arc::clone(pv),
            trace,
        }))
    }
}

impl BusDevice for Doorbell {
    fn read(&mut self, _access: Access, offset: u64, data: &mut [u8]) {
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset == 0 => *word = PV_DOORBELL_SIGNATURE.to_le_bytes(),
            _ => {
                data.fill(0xff);
                self.pv.bad_access("read", offset, data.len());
            }
        }
    }

    fn write(&mut self, access: Access, offset: u64, data: &[u8]) {
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset == 0 => {
                let start_ns = self.trace.as_ref().map(|t| t.now());
                // The outcome is counted and logged inside.
                let outcome = self.pv.doorbell(u32::from_le_bytes(word));
                if let (Some(trace), Some(start_ns)) = (&self.trace, start_ns) {
                    let (opcode, status) = match &outcome {
                        Outcome::Answered(a) => (Some(a.opcode), Some(a.status)),
                        Outcome::Unreadable { .. } | Outcome::Unwritable { .. } => (None, None),
                    };
                    trace.push(Event::Pv {
                        vcpu: access.vcpu,
                        opcode,
                        status,
                        start_ns,
                    });
                }
            }
            _ => self.pv.bad_access("write", offset, data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pv::test_support::{RecordingChip, pv_with};
    use irqconnect_abi::ntstatus::STATUS_SUCCESS;
    use irqconnect_abi::pv::{QueryPlatform, RequestHeader, STATUS_NO_ANSWER, opcode};
    use vm_memory::{Bytes, GuestAddress};
    use zerocopy::{FromZeros, IntoBytes};

    const A: Access = Access { vcpu: 0 };

    #[test]
    fn doorbell_32bit_read_returns_signature() {
        let (pv, _chip, _mem) = pv_with(RecordingChip::working());
        let dev = Doorbell::shared(&pv, None);
        let mut word = [0u8; 4];
        dev.lock().unwrap().read(A, 0, &mut word);
        assert_eq!(word, *b"IRQC");
        assert_eq!(pv.stats().bad_accesses, 0);
    }

    #[test]
    fn doorbell_other_widths_and_offsets_ignored_and_counted() {
        let (pv, chip, mem) = pv_with(RecordingChip::working());
        let dev = Doorbell::shared(&pv, None);
        let mut d = dev.lock().unwrap();
        let mut b1 = [0u8; 1];
        d.read(A, 0, &mut b1);
        assert_eq!(b1, [0xff]);
        let mut b2 = [0u8; 2];
        d.read(A, 2, &mut b2);
        assert_eq!(b2, [0xff; 2]);
        let mut b4 = [0u8; 4];
        d.read(A, 1, &mut b4);
        assert_eq!(b4, [0xff; 4]);
        // A valid QUERY_PLATFORM block at 0x1000, rung with the wrong widths.
        let mut q = QueryPlatform::new_zeroed();
        q.header = RequestHeader::new::<QueryPlatform>(opcode::QUERY_PLATFORM);
        mem.write_slice(q.as_bytes(), GuestAddress(0x1000)).unwrap();
        d.write(A, 0, &[0x00]);
        d.write(A, 0, &[0x00, 0x10]);
        d.write(A, 1, &0x1000u32.to_le_bytes());
        d.write(A, 0, &0x1000u64.to_le_bytes());
        let status: u32 = mem.read_obj(GuestAddress(0x100c)).unwrap();
        assert_eq!(status, STATUS_NO_ANSWER, "a bad-width write was answered");
        let s = pv.stats();
        assert_eq!((s.bad_accesses, s.answered()), (7, 0));
        assert!(chip.programs().is_empty());
        // The right width answers.
        d.write(A, 0, &0x1000u32.to_le_bytes());
        let status: u32 = mem.read_obj(GuestAddress(0x100c)).unwrap();
        assert_eq!(status, STATUS_SUCCESS);
        assert_eq!(pv.stats().answered(), 1);
    }
}
