//! The checked-in fuzz corpora (`resources/fuzz-corpus/TARGET/`), replayed
//! on the stable toolchain through the very harness functions the
//! cargo-fuzz targets call. Every crate with fuzz targets uses these two
//! functions from its `tests/corpus_replay.rs`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// A harness: `Ok` or the first broken invariant.
pub type Harness = fn(&[u8]) -> Result<(), String>;

/// The corpus directory of `target` under the workspace at `workspace`.
pub fn dir(workspace: &Path, target: &str) -> PathBuf {
    workspace.join("resources/fuzz-corpus").join(target)
}

/// Runs every file of `target`'s corpus through `run`. `Err` (with every
/// failing file named) for a missing or empty directory, an `Err` of the
/// harness or a panic.
pub fn replay(workspace: &Path, target: &str, run: Harness) -> Result<usize, String> {
    let dir = dir(workspace, target);
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| format!("corpus directory {} is missing: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(format!("corpus directory {} is empty", dir.display()));
    }
    let mut failures = Vec::new();
    for file in &files {
        let outcome = std::fs::read(file)
            .map_err(|e| e.to_string())
            .and_then(|data| {
                catch_unwind(AssertUnwindSafe(|| run(&data)))
                    .unwrap_or_else(|_| Err("panicked".to_string()))
            });
        if let Err(what) = outcome {
            failures.push(format!("{}: {what}", file.display()));
        }
    }
    if failures.is_empty() {
        Ok(files.len())
    } else {
        Err(format!(
            "{} of {} {target} corpus files fail:\n{}",
            failures.len(),
            files.len(),
            failures.join("\n")
        ))
    }
}

/// A hand-made input of a fuzz target, built by code in its crate's
/// `tests/corpus_replay.rs` and checked in as `seed-NAME`.
pub struct Seed {
    /// The fuzz target.
    pub target: &'static str,
    /// The seed's name (`seed-NAME` on disk).
    pub name: String,
    /// The input.
    pub data: Vec<u8>,
    /// The target's harness.
    pub run: Harness,
}

/// Every seed passes its harness. `Err` names the first that does not.
pub fn seeds_pass(seeds: &[Seed]) -> Result<(), String> {
    for seed in seeds {
        (seed.run)(&seed.data).map_err(|e| format!("{}/{}: {e}", seed.target, seed.name))?;
    }
    Ok(())
}

/// The checked-in `seed-NAME` files hold exactly what the seed builders
/// produce, so a builder change cannot leave a stale corpus behind; with
/// `WRITE_FUZZ_SEEDS=1` in the environment they are rewritten instead.
pub fn seed_files_match(workspace: &Path, seeds: &[Seed]) -> Result<(), String> {
    let write = std::env::var_os("WRITE_FUZZ_SEEDS").is_some_and(|v| v == "1");
    for seed in seeds {
        check_seed(workspace, seed.target, &seed.name, &seed.data, write)?;
    }
    Ok(())
}

/// Checks that the checked-in `seed-NAME` file of `target` holds `data`,
/// the output of its seed builder, so a builder change cannot leave a stale
/// corpus behind. With `write` (the tests set it from `WRITE_FUZZ_SEEDS=1`)
/// it writes the file instead.
fn check_seed(
    workspace: &Path,
    target: &str,
    name: &str,
    data: &[u8],
    write: bool,
) -> Result<(), String> {
    let dir = dir(workspace, target);
    let path = dir.join(format!("seed-{name}"));
    let fail = |e: std::io::Error| format!("{}: {e}", path.display());
    if write {
        std::fs::create_dir_all(&dir).map_err(fail)?;
        return std::fs::write(&path, data).map_err(fail);
    }
    let on_disk = std::fs::read(&path)
        .map_err(|e| format!("{} (WRITE_FUZZ_SEEDS=1 regenerates the seeds)", fail(e)))?;
    if on_disk == data {
        Ok(())
    } else {
        Err(format!(
            "{} differs from its builder (WRITE_FUZZ_SEEDS=1 regenerates the seeds)",
            path.display()
        ))
    }
}
