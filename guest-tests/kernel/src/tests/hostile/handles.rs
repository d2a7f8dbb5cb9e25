//! Forged, stale and doubly used handles: DISCONNECT answers
//! STATUS_INVALID_HANDLE and changes nothing; the live connection they
//! imitate is untouched.

use irqconnect_abi::ntstatus::{STATUS_INVALID_HANDLE, STATUS_SUCCESS};
use irqconnect_abi::pv::Connect;

use super::blocks::{self, Block};
use super::pvfix::{self, Env};
use super::raw::{self, refuse};
use super::{Cases, Want};
use crate::pv;
use crate::runner::TestResult;
use crate::wdm::KINTERRUPT_MODE;

const IH: Want = Want::Status(STATUS_INVALID_HANDLE);
const OK: Want = Want::Status(STATUS_SUCCESS);
const GEN: u64 = 1 << 32;

/// A raw CONNECT of `c`; its handle, or 0 (recorded as a failed case).
fn connect(cases: &mut Cases, name: &str, c: &Connect) -> u64 {
    let sent = raw::send(&Block::of(c), 0);
    cases.status(name, sent.status, OK);
    if sent.status == STATUS_SUCCESS {
        sent.read::<Connect>().handle
    } else {
        0
    }
}

/// Records whether the pin still carries exactly `n` connections and the
/// host `objects` objects.
fn still(cases: &mut Cases, name: &str, pin: u32, n: u32, objects: u32) -> TestResult {
    let r = pvfix::route(pin)?;
    let now = pvfix::objects_in_use()?;
    cases.check(
        name,
        r.connections == n && now == objects,
        format_args!(
            "pin {}: {} connections, {} objects; expected {} and {}",
            crate::display::dec(pin),
            crate::display::dec(r.connections),
            crate::display::dec(now),
            crate::display::dec(n),
            crate::display::dec(objects)
        ),
    );
    Ok(())
}

/// Handles 0, random, all ones, and a live handle with its generation,
/// slot or top bit changed; a double disconnect; the slot's next
/// generation; the old handle once its slot is reused.
pub fn forged_and_stale(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_forged_and_stale_handles_invalid_handle");
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let pin = dev.line();
    let base = pvfix::objects_in_use()?;
    let per = env.effective(env.online())?.count_ones();
    let c = blocks::connect_typed(env)?;
    let h = connect(&mut cases, "CONNECT to forge from", &c);
    if h == 0 {
        return cases.finish();
    }
    let forged: [(&str, u64); 9] = [
        ("handle 0", 0),
        ("random handle", 0xdead_beef_cafe_babe),
        ("handle all ones", u64::MAX),
        ("live handle, next generation", h.wrapping_add(GEN)),
        ("live handle, previous generation", h.wrapping_sub(GEN)),
        ("live handle, generation 0", h & 0xffff_ffff),
        ("live handle, top bit set", h ^ 1 << 63),
        ("live handle, next slot", h.wrapping_add(1)),
        ("live handle, slot 0 (no slot)", h & !0xffff_ffff),
    ];
    for (name, handle) in forged {
        refuse(&mut cases, name, &blocks::disconnect(handle), 0, IH);
    }
    still(
        &mut cases,
        "forged handles left the connection",
        pin,
        1,
        base + per,
    )?;
    cases.status("DISCONNECT of the live handle", pv::disconnect(h), OK);
    refuse(
        &mut cases,
        "double disconnect",
        &blocks::disconnect(h),
        0,
        IH,
    );
    refuse(
        &mut cases,
        "freed slot's next generation",
        &blocks::disconnect(h.wrapping_add(GEN)),
        0,
        IH,
    );
    still(
        &mut cases,
        "nothing left after the disconnect",
        pin,
        0,
        base,
    )?;
    let h2 = connect(&mut cases, "CONNECT again", &c);
    if h2 != 0 {
        cases.check(
            "a new connection never gets the old handle",
            h2 != h,
            format_args!("handle {} handed out twice", crate::display::hex(h)),
        );
        refuse(
            &mut cases,
            "stale handle while its slot is live again",
            &blocks::disconnect(h),
            0,
            IH,
        );
        still(
            &mut cases,
            "the stale handle left the new connection",
            pin,
            1,
            base + per,
        )?;
        cases.status("DISCONNECT of the new handle", pv::disconnect(h2), OK);
        refuse(
            &mut cases,
            "double disconnect of the new handle",
            &blocks::disconnect(h2),
            0,
            IH,
        );
    }
    still(&mut cases, "back at the start", pin, 0, base)?;
    super::ex::handles(&mut cases, env)?;
    still(
        &mut cases,
        "back at the start after DISCONNECT_EX",
        pin,
        0,
        base,
    )?;
    cases.finish()
}
