#!/usr/bin/env bash
# Runs .clusterfuzzlite/build.sh the way ClusterFuzzLite's build step does, but
# without Docker, and checks what it leaves in $OUT:
#
#   - every fuzz target (`cargo fuzz list`) not marked as needing /dev/kvm has
#     an AddressSanitizer-instrumented libFuzzer binary $OUT/TARGET that starts
#     and runs its seeds (-runs=0), $OUT/TARGET_seed_corpus.zip holding
#     exactly the files of resources/fuzz-corpus/TARGET/, and, when the
#     target has fuzz/options/TARGET.options, $OUT/TARGET.options equal to it;
#   - every target marked in fuzz/Cargo.toml ([package.metadata.needs-kvm]) is
#     reported as skipped by build.sh, has nothing in $OUT and was not compiled;
#   - $OUT holds nothing else;
#   - no unmarked target's source names /dev/kvm, kvm_ioctls or irqchip_kvm
#     (a target that forgot its marker would fail on the service, not here).
#
# To check the skip path whether or not a real KVM target exists yet, the copy
# gets one extra stub target marked as needing KVM (cflite_check_kvm_stub).
#
#   fuzz/check_cflite_build.sh          (KEEP=1 keeps the temporary folders)
#
# The environment is the base image's, emulated: $SRC, $OUT and $WORK are new
# temporary folders, $SRC/irqconnect a copy of this working tree (tracked and
# untracked, not ignored, files: what the Dockerfile's COPY sees in a fresh
# checkout plus local edits), build.sh copied to $SRC/build.sh and run from
# $SRC/irqconnect as `bash -eux $SRC/build.sh`, SANITIZER=address,
# FUZZING_ENGINE=libfuzzer, FUZZING_LANGUAGE=rust, ARCHITECTURE=x86_64, and
# RUSTFLAGS as the base image's `compile` exports them for address. Not
# emulated: the image's clang and prebuilt libFuzzer (libfuzzer-sys builds its
# own here) and its nightly toolchain (RUSTC_BOOTSTRAP=1 on stable instead).
# CARGO_BUILD_TARGET is passed through if set. Nothing is cached: every run is
# a cold build of the fuzz crate, as on the service.
#
# Not part of .ci/run: it takes minutes (fuzz/README.md, "ClusterFuzzLite").
set -euo pipefail
start=$SECONDS
repo="$(cd "$(dirname "$0")/.." && pwd)"
stub=cflite_check_kvm_stub

fail() {
    echo "check_cflite_build: FAIL: $*" >&2
    exit 1
}
say() { echo "check_cflite_build: $*"; }

for tool in git jq zip unzip; do
    command -v "$tool" >/dev/null || fail "$tool is needed (apt-get install $tool)"
done
command -v objdump >/dev/null || fail "objdump is needed (apt-get install binutils)"
if ! cargo fuzz --version >/dev/null 2>&1; then
    say "cargo-fuzz is missing: cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked
fi

tmp="$(mktemp -d /tmp/cflite-check.XXXXXX)"
cleanup() {
    if [ "${KEEP:-0}" = 1 ]; then
        say "kept $tmp"
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT

export SRC="$tmp/src" OUT="$tmp/out" WORK="$tmp/work"
mkdir -p "$SRC/irqconnect" "$OUT" "$WORK"
copy="$SRC/irqconnect"

# The working tree as a fresh checkout would have it (deleted files left out).
(
    cd "$repo"
    git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
            [ -e "$f" ] && printf '%s\0' "$f"
        done |
        tar --null -T - -cf -
) | tar -xf - -C "$copy"
cp "$copy/.clusterfuzzlite/build.sh" "$SRC/build.sh"

# The stub KVM target: a [[bin]] and its name added to the needs-kvm list.
cat >"$copy/fuzz/fuzz_targets/$stub.rs" <<'STUB'
//! Stub added by fuzz/check_cflite_build.sh: a target marked as needing /dev/kvm.
#![no_main]
libfuzzer_sys::fuzz_target!(|_data: &[u8]| {});
STUB
cat >>"$copy/fuzz/Cargo.toml" <<STUB

[[bin]]
name = "$stub"
path = "fuzz_targets/$stub.rs"
test = false
doc = false
bench = false
STUB
sed -i "/^\[package\.metadata\.needs-kvm\]/,/^\[/ s/^targets = \[/targets = [\"$stub\", /" "$copy/fuzz/Cargo.toml"

metadata="$(cd "$copy/fuzz" && cargo metadata --no-deps --format-version 1)"
mapfile -t needs_kvm < <(jq -r '.packages[0].metadata["needs-kvm"].targets // [] | .[]' <<<"$metadata")
mapfile -t targets < <(cd "$copy/fuzz" && RUSTC_BOOTSTRAP=1 cargo fuzz list)
listed() {
    local name="$1" item
    shift
    for item in "$@"; do [ "$item" = "$name" ] && return 0; done
    return 1
}
listed "$stub" "${needs_kvm[@]}" || fail "could not add $stub to [package.metadata.needs-kvm] in the copy of fuzz/Cargo.toml"
listed "$stub" "${targets[@]}" || fail "cargo fuzz list does not list the stub target $stub"

expected=()
skipped=()
for t in "${targets[@]}"; do
    if listed "$t" "${needs_kvm[@]}"; then skipped+=("$t"); else expected+=("$t"); fi
done
say "targets: ${targets[*]}"
say "expected in \$OUT: ${expected[*]}"
say "expected to be skipped (needs /dev/kvm): ${skipped[*]}"

# A target whose source reaches for KVM but is not marked would build here and
# fail on the service.
for t in "${expected[@]}"; do
    src="$(jq -r --arg t "$t" '.packages[0].targets[] | select(.name == $t) | .src_path' <<<"$metadata")"
    if grep -n -E '/dev/kvm|kvm_ioctls|irqchip_kvm' "$src"; then
        fail "$t ($src) uses KVM but is not in [package.metadata.needs-kvm] targets of fuzz/Cargo.toml"
    fi
done

say "running build.sh (SRC=$SRC OUT=$OUT WORK=$WORK)"
log="$tmp/build.log"
build_start=$SECONDS
if ! (
    cd "$copy"
    unset CARGO_TARGET_DIR
    env SANITIZER=address FUZZING_ENGINE=libfuzzer FUZZING_LANGUAGE=rust ARCHITECTURE=x86_64 \
        RUSTFLAGS="--cfg fuzzing -Zsanitizer=address -Cdebuginfo=1 -Cforce-frame-pointers" \
        RUSTC_BOOTSTRAP=1 \
        bash -eux "$SRC/build.sh"
) >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    fail "build.sh failed (log above; KEEP=1 keeps $log)"
fi
build_time=$((SECONDS - build_start))
grep '^cflite build.sh:' "$log"

target_dir="$(jq -r '.target_directory' <<<"$metadata")"
triple="${CARGO_BUILD_TARGET:-x86_64-unknown-linux-gnu}"
for t in "${expected[@]}"; do
    bin="$OUT/$t"
    if [ ! -f "$bin" ] || [ ! -x "$bin" ]; then fail "$bin is missing or not executable"; fi
    head -c 4 "$bin" | cmp -s - <(printf '\177ELF') || fail "$bin is not an ELF file"
    grep -q -a '__asan_init' "$bin" || fail "$bin is not built with AddressSanitizer"
    grep -q -a 'LLVMFuzzerTestOneInput' "$bin" || fail "$bin is not a libFuzzer target"

    zip="$OUT/${t}_seed_corpus.zip"
    [ -f "$zip" ] || fail "$zip is missing"
    seeds="$copy/resources/fuzz-corpus/$t"
    want="$(find "$seeds" -maxdepth 1 -type f -printf '%f\n' | LC_ALL=C sort)"
    have="$(unzip -Z1 "$zip" | LC_ALL=C sort)"
    [ -n "$want" ] || fail "resources/fuzz-corpus/$t is empty"
    [ "$want" = "$have" ] || fail "$zip does not hold exactly resources/fuzz-corpus/$t/*: $(diff <(echo "$want") <(echo "$have") | head -5)"

    # The binary starts, and every seed runs without a crash.
    unpacked="$WORK/seeds-$t"
    mkdir -p "$unpacked"
    unzip -q "$zip" -d "$unpacked"
    if ! "$bin" -runs=0 "$unpacked" >"$WORK/$t.run.log" 2>&1; then
        tail -n 20 "$WORK/$t.run.log" >&2
        fail "$bin -runs=0 on its seed corpus failed"
    fi
    grep -q 'INITED' "$WORK/$t.run.log" || fail "$bin did not run its seed corpus (no INITED line)"
    options="$copy/fuzz/options/$t.options"
    if [ -f "$options" ]; then
        cmp -s "$options" "$OUT/$t.options" || fail "\$OUT/$t.options is not fuzz/options/$t.options"
    elif [ -e "$OUT/$t.options" ]; then
        fail "\$OUT/$t.options exists, fuzz/options/$t.options does not"
    fi
    say "ok $t: $(stat -c %s "$bin") byte binary, $(echo "$have" | wc -l) seeds, all run"
done

# Calls into libFuzzer's comparison hooks in a binary's code.
cmp_hook_calls() {
    objdump -d --no-show-raw-insn "$1" | grep -c 'call.*<__sanitizer_cov_trace_[a-z_]*cmp' || true
}
mapfile -t untraced < <(cd "$copy/fuzz" && ./untraced_targets.sh)
for t in "${expected[@]}"; do
    calls="$(cmp_hook_calls "$OUT/$t")"
    if listed "$t" "${untraced[@]}"; then
        grep -q "^cflite build.sh: $t: built without comparison tracing" "$log" ||
            fail "$t is in [package.metadata.no-trace-compares] but build.sh did not say it built it so"
        [ "$calls" -eq 0 ] || fail "$t is in [package.metadata.no-trace-compares] but its binary makes $calls calls to comparison hooks"
        say "ok $t: built without comparison tracing (no comparison hook called)"
    else
        [ "$calls" -gt 0 ] || fail "$t is not in [package.metadata.no-trace-compares] but its binary calls no comparison hook"
        say "ok $t: comparison tracing ($calls hook calls)"
    fi
done

for t in "${skipped[@]}"; do
    grep -q "^cflite build.sh: skipping $t: needs /dev/kvm" "$log" || fail "build.sh did not report $t as skipped"
    if [ -e "$OUT/$t" ] || [ -e "$OUT/${t}_seed_corpus.zip" ]; then
        fail "$t needs /dev/kvm but build.sh put it in \$OUT"
    fi
    [ ! -e "$target_dir/$triple/release/$t" ] || fail "$t needs /dev/kvm but build.sh compiled it"
    say "ok $t: skipped and reported (needs /dev/kvm)"
done

extra="$(cd "$OUT" && for f in *; do
    ok=0
    for t in "${expected[@]}"; do
        [ "$f" = "$t" ] || [ "$f" = "${t}_seed_corpus.zip" ] || [ "$f" = "$t.options" ] && ok=1
    done
    [ $ok = 1 ] || echo "$f"
done)"
[ -z "$extra" ] || fail "unexpected files in \$OUT: $extra"

say "ok: ${#expected[@]} targets built with seed corpora, ${#skipped[@]} skipped as needing /dev/kvm;" \
    "build.sh took ${build_time} s, the whole check $((SECONDS - start)) s"
