//! The VMM's error paths: one clear line on stderr and a non-zero status,
//! never a panic. Also the JUnit report and `--timeout`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

const K: &[&str] = &["--irqchip", "kernel", "--cpus", "1", "--timeout", "60"];

fn error_line(r: &Run) -> &str {
    r.stderr
        .lines()
        .find(|l| l.starts_with("vmm: error: "))
        .unwrap_or_else(|| panic!("no error line in {:?}", r.stderr))
}

fn assert_no_panic(r: &Run) {
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn not_multiboot_image_rejected() {
    let r = run_vmm("garbage", &[0x90; 4096], K, None);
    assert_eq!(r.status, Some(3), "{r:?}");
    assert!(error_line(&r).contains("no Multiboot v1 header"), "{r:?}");
    assert_no_panic(&r);
}

#[test]
fn missing_kernel_file_named() {
    let r = run_vmm_args(&["--irqchip", "kernel", "--kernel", "/nonexistent/kernel.elf"]);
    assert_eq!(r.status, Some(3), "{r:?}");
    assert!(
        error_line(&r).contains("read /nonexistent/kernel.elf: No such file"),
        "{r:?}"
    );
}

#[test]
fn image_loading_outside_ram_rejected() {
    let mut img = kernel(&[], |_| {});
    // load_addr/header_addr/... at 1 GiB, above 16 MiB of RAM.
    for off in [12, 16, 20, 24, 28] {
        let v = u32::from_le_bytes(img[off..off + 4].try_into().unwrap());
        img[off..off + 4].copy_from_slice(&(v + 0x4000_0000).to_le_bytes());
    }
    let r = run_vmm("high", &img, &[K, &["--memory", "16"]].concat(), None);
    assert_eq!(r.status, Some(3), "{r:?}");
    assert!(error_line(&r).contains("outside guest RAM"), "{r:?}");
}

#[test]
fn truncated_image_rejected() {
    let img = kernel(&[], |_| {});
    let r = run_vmm("trunc", &img[..40], K, None);
    assert_eq!(r.status, Some(3), "{r:?}");
    assert!(error_line(&r).contains("truncated"), "{r:?}");
}

#[test]
fn bad_cli_values_are_usage_errors() {
    for a in [
        &["--cpus", "0"][..],
        &["--cpus", "256"],
        &["--memory", "4096"],
        &["--x2apic", "maybe"],
    ] {
        let r = run_vmm_args(a);
        assert_eq!(r.status, Some(2), "{a:?}: {r:?}");
    }
}

#[test]
fn triple_fault_reported_with_registers() {
    if !require_kvm() {
        return;
    }
    // An IDT with no present gates: ud2 -> #UD -> #NP -> #DF -> triple fault.
    let img = kernel(&[], |a| {
        a.bytes(&[0x0f, 0x0b]);
    });
    let r = run_vmm("triple", &img, K, None);
    assert_eq!(r.status, Some(3), "{r:?}");
    let line = error_line(&r);
    assert!(
        line.contains("vcpu 0: guest shutdown (triple fault)"),
        "{line}"
    );
    assert!(line.contains("rip=0x") && line.contains("cr0=0x"), "{line}");
    assert!(r.stderr.contains("vmm: stats:"), "{}", r.stderr);
    assert_no_panic(&r);
}

#[test]
fn timeout_names_the_running_test_and_junit_records_it() {
    if !require_kvm() {
        return;
    }
    let img = kernel(&[], |a| {
        print(a, "ok");
        for &b in b"spin_forever\n" {
            a.outb(0x2208, b);
        }
        a.label("spin");
        a.jmp("spin");
        a.label("ok");
        a.bytes(b"ok first_test\n\0");
    });
    let junit = scratch("timeout.xml");
    let r = run_vmm(
        "timeout",
        &img,
        &[
            "--irqchip",
            "kernel",
            "--cpus",
            "1",
            "--timeout",
            "1",
            "--junit",
            junit.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(r.status, Some(124), "{r:?}");
    assert_eq!(
        error_line(&r),
        "vmm: error: timeout after 1 s while running test spin_forever"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("<testcase name=\"first_test\""), "{xml}");
    assert!(xml.contains("<testcase name=\"spin_forever\""), "{xml}");
    assert!(
        xml.contains("<error message=\"timeout after 1 s while running test spin_forever\"/>"),
        "{xml}"
    );
}

#[test]
fn junit_report_from_serial_lines() {
    if !require_kvm() {
        return;
    }
    let img = kernel(&[], |a| {
        print(a, "out");
        exit(a, 1);
        a.label("out");
        a.bytes(b"boot chatter\nok alpha\nFAIL beta: expected 2, got 1\nskip gamma: needs 2 cpus\n1 passed, 1 failed\n\0");
    });
    let junit = scratch("report.xml");
    let r = run_vmm(
        "junit",
        &img,
        &[K, &["--junit", junit.to_str().unwrap()]].concat(),
        None,
    );
    assert_eq!(r.status, Some(1), "{r:?}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("tests=\"3\" failures=\"1\" errors=\"0\" skipped=\"1\""),
        "{xml}"
    );
    assert!(
        xml.contains("<failure message=\"expected 2, got 1\"/>"),
        "{xml}"
    );
    assert!(xml.contains("<skipped message=\"needs 2 cpus\"/>"), "{xml}");
    assert!(
        xml.contains("<property name=\"irqchip\" value=\"kernel\"/>"),
        "{xml}"
    );
}

#[test]
fn guest_exit_value_above_255_saturates() {
    if !require_kvm() {
        return;
    }
    let img = kernel(&[], |a| exit(a, 0x1_0000));
    let r = run_vmm("bigexit", &img, K, None);
    assert_eq!(r.status, Some(255), "{r:?}");
    assert!(
        r.stderr.contains("does not fit an exit status"),
        "{}",
        r.stderr
    );
}
