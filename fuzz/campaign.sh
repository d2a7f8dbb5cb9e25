#!/usr/bin/env bash
# A fuzzing campaign: builds the targets once (fuzz/build.sh: cargo fuzz
# build, AddressSanitizer), snapshots the binaries, then runs each target in
# turn, starting from the previous campaigns' corpus and the checked-in seeds.
#
#   fuzz/campaign.sh [SECONDS] [TARGET...]      (default: 600, every target)
#
# Each target runs until SECONDS have passed (0: no time limit) or, with
# RUNS=N, until it has made N executions, whichever comes first. With
# CORES=1 (the default) that is one libFuzzer process, what `cargo fuzz run
# TARGET fuzz/corpus/TARGET resources/fuzz-corpus/TARGET --
# -max_total_time=SECONDS -jobs=1 -workers=1` does (built as fuzz/build.sh
# builds it: untraced for the targets fuzz/untraced_targets.sh lists). With
# CORES=N > 1 it is libFuzzer's fork mode (-fork=N): N child processes fuzz
# at once from one corpus, the parent merges what they find and counts their
# executions together, so RUNS counts the whole target's executions. With
# PARALLEL=jobs (and CORES=N > 1) it is libFuzzer's -jobs=N -workers=N
# instead: N whole fuzzers sharing the corpus folder, each stopping after
# RUNS/N executions;
# fork mode starts every job from a few dozen seeds, and a target with tens
# of thousands of features (connect_sequences) then spends its jobs
# re-finding what the corpus already covers. A target's options
# in fuzz/options/TARGET.options (fuzz/target_options.sh) are passed too.
#
# The binaries are built up front so that edits to the crates during a long
# campaign cannot change or break a later target's build. New corpus entries
# go to fuzz/corpus/TARGET (git-ignored), crashes to fuzz/artifacts/TARGET (a
# crash ends that target's run and the campaign goes on with the next), the
# libFuzzer log to $LOGS/TARGET.log (default /tmp/fuzz-campaign). Every run
# appends one row of the fuzz/README.md campaign table to $LOGS/table.md and
# its details to $LOGS/summary.txt.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-600}"
mapfile -t targets < <(./targets.sh "${@:2}")
cores="${CORES:-1}"
parallel="${PARALLEL:-fork}"
if ! [[ "$cores" =~ ^[1-9][0-9]*$ ]] || ! [[ "${RUNS:-1}" =~ ^[1-9][0-9]*$ ]]; then
    echo "campaign.sh: CORES and RUNS must be whole numbers, 1 or more" >&2
    exit 2
fi
case "$parallel" in
fork | jobs) ;;
*)
    echo "campaign.sh: PARALLEL must be fork or jobs, not '$parallel'" >&2
    exit 2
    ;;
esac
here="$PWD"
runs="${RUNS:-}"
logs="${LOGS:-/tmp/fuzz-campaign}"
mkdir -p "$logs/bin"
# Inputs libFuzzer wrote for a failure (crash-, leak-, oom-, timeout-):
# a slow-unit- file only reports an input slower than -report_slow_units
# in wall-clock time, which a paused or starved process also produces.
failures() {
    find "artifacts/$1" -type f ! -name 'slow-unit-*' | wc -l
}
./build.sh "$logs/bin" "${targets[@]}"
built_from="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- .. || echo +dirty)"
[ -f "$logs/table.md" ] || {
    echo "| target | built from | cores | executions | wall time | exec/s | exec/s per core (CPU time) | cov | ft | corpus at end | crashes | command |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
} >"$logs/table.md"
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t" "../resources/fuzz-corpus/$t"
    args=(-artifact_prefix="$PWD/artifacts/$t/" -max_total_time="$seconds" -print_final_stats=1)
    mapfile -t options < <(./target_options.sh "$t")
    args+=("${options[@]}")
    jobs=""
    if [ "$cores" -gt 1 ] && [ "$parallel" = jobs ]; then
        # Each worker stops after its share of RUNS.
        [ -n "$runs" ] && args+=(-runs="$(((runs + cores - 1) / cores))")
        args+=(-jobs="$cores" -workers="$cores")
        jobs="$logs/$t.jobs"
        rm -rf "$jobs"
        mkdir -p "$jobs"
    else
        [ -n "$runs" ] && args+=(-runs="$runs")
        [ "$cores" -gt 1 ] && args+=(-fork="$cores")
    fi
    shown="CORES=$cores${jobs:+ PARALLEL=jobs}${runs:+ RUNS=$runs} fuzz/campaign.sh $seconds $t"
    echo "== $t: $shown, started $(date -u +%FT%TZ)" | tee -a "$logs/summary.txt"
    artifacts_before="$(failures "$t")"
    start="$(date +%s)"
    # Jobs mode: libFuzzer writes each worker's log to fuzz-N.log in the
    # current folder, so the workers run in $jobs, on absolute paths.
    (cd "${jobs:-.}" && /usr/bin/time -o "$logs/$t.time" -f '%e %U %S' "$logs/bin/$t" "${args[@]}" \
        "$here/corpus/$t" "$here/../resources/fuzz-corpus/$t") >"$logs/$t.log" 2>&1 || true
    wall="$(($(date +%s) - start))"
    if [ -n "$jobs" ]; then
        # Every worker's executions; cov, ft and corpus of worker 0's last
        # progress line ("#RUNS ... cov: C ft: F corp: N/SIZE ...").
        execs="$(cat "$jobs"/fuzz-*.log | sed -n 's/^stat::number_of_executed_units: *//p' |
            awk '{ n += $1 } END { print n + 0 }')"
        last="$(grep -E '^#[0-9]+' "$jobs/fuzz-0.log" | tail -n 1 || true)"
        corpus="$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")"
        cat "$jobs"/fuzz-*.log >>"$logs/$t.log"
    elif [ "$cores" -gt 1 ]; then
        # The parent's last progress line: "#RUNS: cov: C ft: F corp: N ...".
        last="$(grep -E '^#[0-9]+: cov:' "$logs/$t.log" | tail -n 1 || true)"
        execs="$(sed -n 's/^#\([0-9]*\): .*/\1/p' <<<"$last")"
        corpus="$(sed -n 's/.* corp: \([0-9]*\) .*/\1/p' <<<"$last")"
    else
        last="$(grep -E '^#[0-9]+' "$logs/$t.log" | tail -n 1 || true)"
        execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log")"
        corpus="$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")"
    fi
    cov="$(sed -n 's/.* cov: \([0-9]*\) .*/\1/p' <<<"$last")"
    ft="$(sed -n 's/.* ft: \([0-9]*\) .*/\1/p' <<<"$last")"
    cpu="$(awk 'NF == 3 { print $2 + $3 }' "$logs/$t.time")"
    crashes="$(($(failures "$t") - artifacts_before))"
    rate="$(awk -v e="${execs:-0}" -v w="$wall" 'BEGIN { printf "%d", (w > 0 ? e / w : 0) }')"
    per_core="$(awk -v e="${execs:-0}" -v c="${cpu:-0}" 'BEGIN { printf "%d", (c > 0 ? e / c : 0) }')"
    printf '| `%s` | %s | %s | %s | %s s | %s | %s | %s | %s | %s files, %s bytes | %s | `%s` |\n' \
        "$t" "$built_from" "$cores" "${execs:-?}" "$wall" "$rate" "$per_core" "${cov:-?}" "${ft:-?}" \
        "$(find "corpus/$t" -type f | wc -l)" "$(du -sb "corpus/$t" | cut -f1)" "$crashes" "$shown" |
        tee -a "$logs/table.md"
    {
        echo "corpus entries (libFuzzer): ${corpus:-?}; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
        grep -E "DONE|INFO: exiting|INFO: fuzzed for|SUMMARY|panicked|invariant broken|stat::" "$logs/$t.log" || true
    } >>"$logs/summary.txt"
done
