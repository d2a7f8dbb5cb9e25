#!/usr/bin/env bash
# Builds the fuzz targets as campaigns and throughput runs use them (cargo
# fuzz build: release, AddressSanitizer) and copies each named target's
# binary into DIR.
#
#   fuzz/build.sh DIR [TARGET...]     (default: every target)
#
# A target listed under [package.metadata.no-trace-compares] in
# fuzz/Cargo.toml is built without comparison tracing (`cargo fuzz build
# --no-trace-compares`), in its own target folder, so that the two sets of
# compiler flags do not rebuild each other's dependencies. fuzz/README.md
# ("Comparison tracing") gives the measurements behind each entry.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "build.sh: usage: fuzz/build.sh DIR [TARGET...]" >&2
    exit 2
fi
mkdir -p "$1"
dir="$(realpath "$1")"
cd "$(dirname "$0")"
mapfile -t targets < <(./targets.sh "${@:2}")
mapfile -t untraced < <(./untraced_targets.sh)
untraced_dir=target/no-trace-compares
RUSTC_BOOTSTRAP=1 cargo fuzz build
for t in "${targets[@]}"; do
    if printf '%s\n' "${untraced[@]}" | grep -qx -- "$t"; then
        RUSTC_BOOTSTRAP=1 cargo fuzz build --no-trace-compares --target-dir "$untraced_dir" "$t"
        cp "$untraced_dir/x86_64-unknown-linux-gnu/release/$t" "$dir/$t"
    else
        cp "target/x86_64-unknown-linux-gnu/release/$t" "$dir/$t"
    fi
done
