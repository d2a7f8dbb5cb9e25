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
# it the targets are built (fuzz/build.sh: cargo fuzz build, AddressSanitizer).
#
# CORPUS=DIR starts from DIR (read-only; e.g. a campaign's fuzz/corpus/TARGET)
# instead of the checked-in corpus: the rate a long campaign settles at,
# once its inputs have grown, rather than the rate of its first minutes.
#
# PROCS=N runs N processes of each target at once (one per core: what the
# machine does on all its cores), each from the same starting corpus into
# its own scratch folder; the line then sums their executions, exec/s and
# CPU time.
#
# Prints one line per target: executions, libFuzzer's exec/s (wall clock),
# executions per second of CPU time the process used (user + system; on a
# machine shared with other work this is the figure that compares two
# builds), cov and ft at the end, and the load average when it ended.
set -euo pipefail
# The absolute path of folder $2, given in variable $1 (empty stays
# empty): both are read before the script moves into fuzz/.
folder() {
    [ -n "$2" ] || return 0
    if ! [ -d "$2" ]; then
        echo "throughput.sh: $1 must be a folder ($3), not '$2'" >&2
        exit 2
    fi
    realpath "$2"
}
seeds="$(folder CORPUS "${CORPUS:-}" "of inputs")"
bin="$(folder BIN "${BIN:-}" "of fuzz binaries")"
cd "$(dirname "$0")"
seconds="${1:-60}"
mapfile -t targets < <(./targets.sh "${@:2}")
procs="${PROCS:-1}"
if ! [[ "$procs" =~ ^[1-9][0-9]*$ ]]; then
    echo "throughput.sh: PROCS must be a whole number of processes, 1 or more, not '$procs'" >&2
    exit 2
fi
if [ -z "$bin" ]; then
    bin="target/throughput-bin"
    ./build.sh "$bin" "${targets[@]}"
fi
for t in "${targets[@]}"; do
    if ! [ -x "$bin/$t" ]; then
        echo "throughput.sh: no fuzz binary $bin/$t (BIN names the folder that holds one per target)" >&2
        exit 2
    fi
done
printf '%-18s %11s %8s %10s %6s %7s  %s\n' target executions exec/s exec/cpu-s cov ft load
for t in "${targets[@]}"; do
    options=()
    [ -n "${NO_OPTIONS:-}" ] || mapfile -t options < <(./target_options.sh "$t")
    scratches=()
    for _ in $(seq "$procs"); do
        scratch="$(mktemp -d)"
        scratches+=("$scratch")
        mkdir "$scratch/corpus"
        /usr/bin/time -o "$scratch/cpu" -f '%U %S' "$bin/$t" -max_total_time="$seconds" \
            -print_final_stats=1 "${options[@]}" "$scratch/corpus" "${seeds:-../resources/fuzz-corpus/$t}" \
            >"$scratch/log" 2>&1 &
    done
    wait
    # cov and ft of the first process (they all fuzz the same way).
    last="$(grep -E '^#[0-9]+' "${scratches[0]}/log" | tail -n 1 || true)"
    cov="$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")"
    ft="$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")"
    execs=0 cpu=0 failed="" libfuzzer_rate=0
    for scratch in "${scratches[@]}"; do
        log="$scratch/log"
        e="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
        r="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")"
        c="$(awk '/^[0-9.]+ [0-9.]+$/ { print $1 + $2 }' "$scratch/cpu")"
        execs=$((execs + ${e:-0}))
        libfuzzer_rate=$((libfuzzer_rate + ${r:-0}))
        cpu="$(awk -v a="$cpu" -v b="${c:-0}" 'BEGIN { print a + b }')"
        if grep -qE 'ERROR: libFuzzer|panicked|SUMMARY: AddressSanitizer' "$log"; then
            echo "$t: a run failed; log kept in $log" >&2
            failed=1
        else
            rm -rf "$scratch"
        fi
    done
    per_cpu="$(awk -v e="$execs" -v c="$cpu" 'BEGIN { if (c > 0) printf "%d", e / c; else print "?" }')"
    rate="$libfuzzer_rate"
    [ -z "$failed" ] || rate="FAILED"
    printf '%-18s %11s %8s %10s %6s %7s  %s\n' "$t" "$execs" "$rate" "$per_cpu" \
        "${cov:-?}" "${ft:-?}" "$(cut -d' ' -f1-3 /proc/loadavg)"
done
