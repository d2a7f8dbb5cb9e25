//! NTSTATUS values the PV interface answers with (`docs/semantics.md`, "NTSTATUS values").

/// An NTSTATUS code as the guest sees it.
pub type NtStatus = u32;

/// The operation completed successfully.
pub const STATUS_SUCCESS: NtStatus = 0x0000_0000;
/// The handle is unknown, stale or forged.
pub const STATUS_INVALID_HANDLE: NtStatus = 0xc000_0008;
/// A parameter or the block itself is invalid.
pub const STATUS_INVALID_PARAMETER: NtStatus = 0xc000_000d;
/// The opcode is not one this ABI version defines.
pub const STATUS_INVALID_DEVICE_REQUEST: NtStatus = 0xc000_0010;
/// The VM's interrupt-object quota would be exceeded.
pub const STATUS_INSUFFICIENT_RESOURCES: NtStatus = 0xc000_009a;
/// The first parameter (the ABI version) is not supported.
pub const STATUS_INVALID_PARAMETER_1: NtStatus = 0xc000_00ef;
/// The device does not exist or does not own the vector.
pub const STATUS_NOT_FOUND: NtStatus = 0xc000_0225;
/// An output buffer is too small; the answer says how large it must be
/// (CONNECT_EX's message table).
pub const STATUS_BUFFER_TOO_SMALL: NtStatus = 0xc000_0023;
/// The tenth member of IoConnectInterruptEx's parameters is invalid: a
/// FULLY_SPECIFIED `ProcessorEnableMask` that names no online processor, as
/// `IoConnectInterruptEx` answers it.
pub const STATUS_INVALID_PARAMETER_10: NtStatus = 0xc000_00f8;
/// The request does not fit the current state: SET_APIC_MODEL while
/// connections are live (their routes were made for the old model).
pub const STATUS_INVALID_DEVICE_STATE: NtStatus = 0xc000_0184;
/// The caller's IRQL is too high for the routine (the guest API refuses
/// IoConnectInterrupt(Ex) and IoDisconnectInterrupt(Ex) above PASSIVE_LEVEL
/// with it; the host never sees such a call).
pub const STATUS_INVALID_LEVEL: NtStatus = 0xc000_0148;

/// True for success and informational codes (severity bits 00 or 01), as `NT_SUCCESS`.
pub const fn nt_success(status: NtStatus) -> bool {
    (status as i32) >= 0
}

/// A short name for a status, for logs and test failure messages.
pub const fn status_name(status: NtStatus) -> &'static str {
    match status {
        STATUS_SUCCESS => "STATUS_SUCCESS",
        STATUS_INVALID_HANDLE => "STATUS_INVALID_HANDLE",
        STATUS_INVALID_PARAMETER => "STATUS_INVALID_PARAMETER",
        STATUS_INVALID_DEVICE_REQUEST => "STATUS_INVALID_DEVICE_REQUEST",
        STATUS_INSUFFICIENT_RESOURCES => "STATUS_INSUFFICIENT_RESOURCES",
        STATUS_INVALID_PARAMETER_1 => "STATUS_INVALID_PARAMETER_1",
        STATUS_NOT_FOUND => "STATUS_NOT_FOUND",
        STATUS_BUFFER_TOO_SMALL => "STATUS_BUFFER_TOO_SMALL",
        STATUS_INVALID_PARAMETER_10 => "STATUS_INVALID_PARAMETER_10",
        STATUS_INVALID_LEVEL => "STATUS_INVALID_LEVEL",
        STATUS_INVALID_DEVICE_STATE => "STATUS_INVALID_DEVICE_STATE",
        _ => "STATUS_<unknown>",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nt_success_errors_are_failures() {
        assert!(nt_success(STATUS_SUCCESS));
        for s in [
            STATUS_INVALID_HANDLE,
            STATUS_INVALID_PARAMETER,
            STATUS_INVALID_DEVICE_REQUEST,
            STATUS_INSUFFICIENT_RESOURCES,
            STATUS_INVALID_PARAMETER_1,
            STATUS_NOT_FOUND,
            STATUS_BUFFER_TOO_SMALL,
            STATUS_INVALID_PARAMETER_10,
            STATUS_INVALID_LEVEL,
            STATUS_INVALID_DEVICE_STATE,
        ] {
            assert!(!nt_success(s), "{}", status_name(s));
        }
    }
}
