#!/bin/bash -eu
# ClusterFuzzLite / OSS-Fuzz build script: builds every cargo-fuzz target of
# fuzz/ and leaves in $OUT what the service runs:
#
#   $OUT/TARGET                 the libFuzzer binary
#   $OUT/TARGET_seed_corpus.zip resources/fuzz-corpus/TARGET/* (the checked-in
#                               replay corpus: seeds, regressions, minimised)
#   $OUT/TARGET.options         fuzz/options/TARGET.options, when the target
#                               has one (libFuzzer options the service applies,
#                               as fuzz/campaign.sh does)
#
# Targets are discovered with `cargo fuzz list`, never listed here. Targets
# that open /dev/kvm are skipped with a printed reason: the service runs
# fuzzers in containers without KVM. They are the ones named in fuzz/Cargo.toml
# under [package.metadata.needs-kvm] targets = [...]; a name there that is not
# a target is reported and ignored.
#
# Runs inside the image of .clusterfuzzlite/Dockerfile, started by the base
# image's `compile` as `bash -eux $SRC/build.sh`. The sanitizer and
# instrumentation flags come from the environment the base image sets up
# (RUSTFLAGS, CUSTOM_LIBFUZZER_PATH, and its `cargo` wrapper, which turns a
# `cargo fuzz build` into a coverage build when SANITIZER=coverage); this
# script does not touch them. It reads:
#
#   SRC                 the project is at $SRC/irqconnect (the Dockerfile's COPY)
#   OUT                 where binaries and seed corpora go
#   SANITIZER           address (default) or coverage; anything else fails
#   FUZZING_ENGINE      libfuzzer (default); anything else fails
#   CARGO_BUILD_TARGET  target triple (default x86_64-unknown-linux-gnu)
#
# fuzz/check_cflite_build.sh runs this script without Docker and checks $OUT.
set -euo pipefail

project="$SRC/irqconnect"
corpus_root="$project/resources/fuzz-corpus"
sanitizer="${SANITIZER:-address}"
engine="${FUZZING_ENGINE:-libfuzzer}"
triple="${CARGO_BUILD_TARGET:-x86_64-unknown-linux-gnu}"

say() { echo "cflite build.sh: $*"; }

if [ "$engine" != libfuzzer ]; then
    say "error: FUZZING_ENGINE=$engine is not supported: cargo-fuzz targets link libFuzzer only" >&2
    exit 1
fi

# -O --debug-assertions is what `cargo fuzz build` does by default and what the
# local campaigns (fuzz/campaign.sh) run: release optimisations with overflow
# checks and debug_assert!s kept, so an arithmetic overflow in a model is a
# crash here too.
build_args=(-O --debug-assertions --target "$triple")
case "$sanitizer" in
    address)
        build_args+=(--sanitizer address)
        ;;
    coverage)
        # The base image's cargo wrapper replaces `cargo fuzz build` with a
        # `cargo build --bins` under its coverage RUSTFLAGS (all targets, the
        # skipped ones too) and copies the result to
        # TARGET_DIR/x86_64-unknown-linux-gnu/release.
        triple=x86_64-unknown-linux-gnu
        ;;
    *)
        say "error: SANITIZER=$sanitizer is not supported (address, or coverage for coverage reports;" \
            "Rust has no UBSan, and MSan needs an instrumented std)" >&2
        exit 1
        ;;
esac

cd "$project/fuzz"
mapfile -t targets < <(cargo fuzz list)
if [ ${#targets[@]} -eq 0 ]; then
    say "error: cargo fuzz list found no fuzz targets in $PWD" >&2
    exit 1
fi
metadata="$(cargo metadata --no-deps --format-version 1)"
target_dir="$(jq -r '.target_directory' <<<"$metadata")"
mapfile -t needs_kvm < <(jq -r '.packages[] | select(.manifest_path | endswith("/fuzz/Cargo.toml"))
    | .metadata["needs-kvm"].targets // [] | .[]' <<<"$metadata")

is_listed() {
    local name="$1" item
    shift
    for item in "$@"; do
        [ "$item" = "$name" ] && return 0
    done
    return 1
}

for name in "${needs_kvm[@]}"; do
    if ! is_listed "$name" "${targets[@]}"; then
        say "note: $name is listed under [package.metadata.needs-kvm] in fuzz/Cargo.toml but is not a fuzz target; ignored"
    fi
done

build=()
skipped=()
for t in "${targets[@]}"; do
    if is_listed "$t" "${needs_kvm[@]}"; then
        say "skipping $t: needs /dev/kvm ([package.metadata.needs-kvm] in fuzz/Cargo.toml), which ClusterFuzzLite's runners do not have"
        skipped+=("$t")
    else
        build+=("$t")
    fi
done

# Targets built without comparison tracing (fuzz/untraced_targets.sh reads
# [package.metadata.no-trace-compares]), in their own target folder so that
# the two sets of flags do not rebuild each other's dependencies.
mapfile -t untraced < <(./untraced_targets.sh)
untraced_dir="$target_dir/no-trace-compares"
bin_of() {
    if [ "$sanitizer" != coverage ] && is_listed "$1" "${untraced[@]}"; then
        echo "$untraced_dir/$triple/release/$1"
    else
        echo "$target_dir/$triple/release/$1"
    fi
}

# One target at a time, so that a skipped target (and what only it depends
# on) is never compiled; the shared dependencies are built once.
if [ "$sanitizer" = coverage ]; then
    cargo fuzz build "${build_args[@]}"
else
    for t in "${build[@]}"; do
        if is_listed "$t" "${untraced[@]}"; then
            say "$t: built without comparison tracing ([package.metadata.no-trace-compares])"
            cargo fuzz build "${build_args[@]}" --no-trace-compares --target-dir "$untraced_dir" "$t"
        else
            cargo fuzz build "${build_args[@]}" "$t"
        fi
    done
fi

for t in "${build[@]}"; do
    bin="$(bin_of "$t")"
    if [ ! -x "$bin" ]; then
        say "error: cargo fuzz build left no binary at $bin" >&2
        exit 1
    fi
    cp "$bin" "$OUT/$t"

    zip="$OUT/${t}_seed_corpus.zip"
    rm -f "$zip"
    seeds="$corpus_root/$t"
    if [ -d "$seeds" ] && [ -n "$(find "$seeds" -maxdepth 1 -type f -print -quit)" ]; then
        # -j: entries by file name only; -X: no extra attributes (stable zips).
        find "$seeds" -maxdepth 1 -type f -print | LC_ALL=C sort | zip -q -j -X -@ "$zip"
        say "$t: binary and $(find "$seeds" -maxdepth 1 -type f | wc -l) seed inputs"
    else
        say "warning: $t has no seed corpus ($seeds is missing or empty); it starts from nothing"
    fi
    if [ -f "$project/fuzz/options/$t.options" ]; then
        cp "$project/fuzz/options/$t.options" "$OUT/$t.options"
        say "$t: libFuzzer options of fuzz/options/$t.options"
    fi
done

say "built ${#build[@]} target(s): ${build[*]}"
if [ ${#skipped[@]} -gt 0 ]; then
    say "skipped ${#skipped[@]} target(s) that need /dev/kvm: ${skipped[*]}"
fi
