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
        ] {
            assert!(!nt_success(s), "{}", status_name(s));
        }
    }
}
