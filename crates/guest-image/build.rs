//! Builds the guest kernel (`guest-tests/`, its own cargo workspace) and
//! leaves the image at `$OUT_DIR/guest-kernel.bin` for `include_bytes!`.
//!
//! The guest workspace has its own `.cargo/config.toml` (bare-metal rustflags,
//! linker script), which cargo reads from the current directory, so the inner
//! build runs with `current_dir = guest-tests` and without anything the outer
//! build set that would override it (`RUSTFLAGS`, `CARGO_ENCODED_RUSTFLAGS`,
//! `CARGO_TARGET_DIR`, `CARGO_BUILD_*`, wrappers, ...).
//!
//! If the guest build fails, this script fails with the guest's output.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Environment variables the inner cargo keeps; every other `CARGO_*`,
/// `RUSTC_*` wrapper and rustflags variable is removed.
const KEEP_CARGO_VARS: &[&str] = &["CARGO_HOME"];

/// Variables that would change how the inner build compiles or where it writes.
const REMOVE_VARS: &[&str] = &[
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_LINKER",
    "TARGET",
    "HOST",
    "OUT_DIR",
    "OPT_LEVEL",
    "PROFILE",
    "DEBUG",
    "NUM_JOBS",
    "MAKEFLAGS",
    "MFLAGS",
];

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let workspace = manifest_dir
        .ancestors()
        .nth(2)
        .ok_or("crates/guest-image/ is not two levels below the workspace")?
        .to_path_buf();
    let guest_dir = workspace.join("guest-tests");
    let image_out = out_dir.join("guest-kernel.bin");

    println!("cargo:rerun-if-changed=build.rs");
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("crates/irqconnect-abi").display()
    );
    println!("cargo:rerun-if-env-changed=VMM_GUEST_CARGO");

    if !guest_dir.join("Cargo.toml").is_file() {
        return Err(format!(
            "{} is missing: the guest kernel workspace (guest-tests/) is needed to build the guest image",
            guest_dir.join("Cargo.toml").display()
        ));
    }
    watch_guest_sources(&guest_dir)?;

    let cargo = env::var("VMM_GUEST_CARGO")
        .or_else(|_| env::var("CARGO"))
        .unwrap_or_else(|_| "cargo".to_string());
    let target_dir = out_dir.join("guest-target");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guest_dir)
        .arg("build")
        .arg("--release")
        .arg("--target-dir")
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let cargo_var = key.starts_with("CARGO_") || key.starts_with("__CARGO");
        if (cargo_var && !KEEP_CARGO_VARS.contains(&key)) || REMOVE_VARS.contains(&key) {
            cmd.env_remove(key);
        }
    }
    cmd.env_remove("CARGO");

    let output = cmd
        .output()
        .map_err(|e| format!("cannot run `{cargo} build` for the guest kernel: {e}"))?;
    if !output.status.success() {
        // Cargo shows a failing build script's output; put the guest's errors there.
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        return Err(format!(
            "building the guest kernel in {} failed ({}); its output is above",
            guest_dir.display(),
            output.status
        ));
    }

    let image = target_dir.join("x86_64-unknown-linux-gnu/release/guest-kernel");
    let bytes = fs::read(&image).map_err(|e| {
        format!(
            "the guest build succeeded but {} is unreadable: {e}",
            image.display()
        )
    })?;
    fs::write(&image_out, bytes).map_err(|e| format!("write {}: {e}", image_out.display()))?;
    Ok(())
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("cargo did not set {name}"))
}

/// Emits `rerun-if-changed` for every entry of the guest workspace except
/// build output: sources, manifests, the lock file, `.cargo/`, linker scripts
/// and member crates.
fn watch_guest_sources(guest_dir: &Path) -> Result<(), String> {
    let entries =
        fs::read_dir(guest_dir).map_err(|e| format!("read {}: {e}", guest_dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "target" || (name.starts_with('.') && name != ".cargo") {
            continue;
        }
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
    Ok(())
}
