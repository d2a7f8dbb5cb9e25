#!/usr/bin/env bash
# A fuzzing campaign: builds the targets once (cargo fuzz build, AddressSanitizer),
# snapshots the binaries, then runs each target in turn, one libFuzzer process at
# a time, for SECONDS seconds, starting from the checked-in seeds.
#
#   fuzz/campaign.sh [SECONDS] [TARGET...]      (default: 600, every target)
#
# Each run is what `cargo fuzz run TARGET fuzz/corpus/TARGET
# resources/fuzz-corpus/TARGET -- -max_total_time=SECONDS -jobs=1 -workers=1`
# does, with the binary built up front so that edits to the crates during a long
# campaign cannot change or break a later target's build. New corpus entries go
# to fuzz/corpus/TARGET (git-ignored), crashes to fuzz/artifacts/TARGET, the
# libFuzzer log to $LOGS/TARGET.log (default /tmp/fuzz-campaign).
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(RUSTC_BOOTSTRAP=1 cargo fuzz list)
fi
logs="${LOGS:-/tmp/fuzz-campaign}"
mkdir -p "$logs/bin"
RUSTC_BOOTSTRAP=1 cargo fuzz build
for t in "${targets[@]}"; do
    cp "target/x86_64-unknown-linux-gnu/release/$t" "$logs/bin/$t"
done
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t" "../resources/fuzz-corpus/$t"
    echo "== $t: $seconds s, started $(date -u +%FT%TZ)" | tee -a "$logs/summary.txt"
    rm -f fuzz-0.log
    "$logs/bin/$t" -artifact_prefix="$PWD/artifacts/$t/" -max_total_time="$seconds" \
        -jobs=1 -workers=1 -print_final_stats=1 \
        "corpus/$t" "../resources/fuzz-corpus/$t" >/dev/null 2>&1 || true
    mv fuzz-0.log "$logs/$t.log"
    grep -E "DONE|Done|SUMMARY|panicked|invariant broken|stat::" "$logs/$t.log" | tee -a "$logs/summary.txt" || true
    echo "corpus: $(ls "corpus/$t" | wc -l) files, $(du -sb "corpus/$t" | cut -f1) bytes" | tee -a "$logs/summary.txt"
done
