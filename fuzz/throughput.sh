#!/usr/bin/env bash
# Executions per second of each target: one libFuzzer process per target, in
# turn, for SECONDS seconds, starting from the checked-in corpus only (new
# inputs go to a temporary folder that is deleted afterwards), so that two
# builds measured with the same command fuzz from the same starting corpus.
# The target's options (fuzz/options/TARGET.options) apply, as in campaigns;
# NO_OPTIONS=1 leaves them out.
#
#   fuzz/throughput.sh [SECONDS] [TARGET...]    (default: 60, every target)
#
# BIN=DIR takes the binaries from DIR (e.g. the ones campaign.sh snapshots in
# $LOGS/bin, or an older build kept for a before/after comparison); without
# it the targets are built (cargo fuzz build, AddressSanitizer).
#
# Prints one line per target: executions, libFuzzer's exec/s (wall clock),
# executions per second of CPU time the process used (user + system; on a
# machine shared with other work this is the figure that compares two
# builds), cov and ft at the end, and the load average when it ended.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
mapfile -t targets < <(./targets.sh "${@:2}")
bin="${BIN:-}"
if [ -z "$bin" ]; then
    RUSTC_BOOTSTRAP=1 cargo fuzz build
    bin="target/x86_64-unknown-linux-gnu/release"
fi
printf '%-18s %11s %8s %10s %6s %7s  %s\n' target executions exec/s exec/cpu-s cov ft load
for t in "${targets[@]}"; do
    scratch="$(mktemp -d)"
    log="$scratch/log"
    mkdir "$scratch/corpus"
    options=()
    [ -n "${NO_OPTIONS:-}" ] || mapfile -t options < <(./target_options.sh "$t")
    /usr/bin/time -o "$scratch/cpu" -f '%U %S' "$bin/$t" -max_total_time="$seconds" \
        -print_final_stats=1 "${options[@]}" "$scratch/corpus" "../resources/fuzz-corpus/$t" \
        >"$log" 2>&1 || true
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")"
    cpu="$(awk '/^[0-9.]+ [0-9.]+$/ { print $1 + $2 }' "$scratch/cpu")"
    per_cpu="$(awk -v e="${execs:-0}" -v c="${cpu:-0}" 'BEGIN { if (c > 0) printf "%d", e / c; else print "?" }')"
    last="$(grep -E '^#[0-9]+' "$log" | tail -n 1)"
    cov="$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")"
    ft="$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")"
    if grep -qE 'ERROR: libFuzzer|panicked|SUMMARY: AddressSanitizer' "$log"; then
        echo "$t: the run failed; log kept in $log" >&2
        rate="FAILED"
    else
        rm -rf "$scratch"
    fi
    printf '%-18s %11s %8s %10s %6s %7s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "$per_cpu" \
        "${cov:-?}" "${ft:-?}" "$(cut -d' ' -f1-3 /proc/loadavg)"
done
