#!/usr/bin/env bash
# Minimises a campaign's corpus into the checked-in replay corpus: a greedy
# set cover (libFuzzer -set_cover_merge=1) of the edges (-use_counters=0: hit
# counts are not features, which keeps the set small) of fuzz/corpus/TARGET
# and the current resources/fuzz-corpus/TARGET, written back as
# resources/fuzz-corpus/TARGET/min-<sha1>; hand-made seed-* and regression-*
# files are kept as they are.
#
#   fuzz/minimize.sh TARGET...
#
# Uses the binaries campaign.sh snapshotted in $LOGS/bin (default
# /tmp/fuzz-campaign/bin), or builds them.
set -euo pipefail
cd "$(dirname "$0")"
logs="${LOGS:-/tmp/fuzz-campaign}"
for t in "$@"; do
    bin="$logs/bin/$t"
    if [ ! -x "$bin" ]; then
        ./build.sh target/minimize-bin "$t"
        bin="target/minimize-bin/$t"
    fi
    out="$(mktemp -d)"
    "$bin" -set_cover_merge=1 -use_counters=0 "$out" "corpus/$t" "../resources/fuzz-corpus/$t" >"$logs/$t.merge.log" 2>&1
    rm -f "../resources/fuzz-corpus/$t"/min-*
    for f in "$out"/*; do
        name="$(basename "$f")"
        # Keep the named files; everything else enters as min-<sha1>.
        found=0
        for named in "../resources/fuzz-corpus/$t"/seed-* "../resources/fuzz-corpus/$t"/regression-*; do
            if [ -f "$named" ] && cmp -s "$f" "$named"; then found=1; break; fi
        done
        [ "$found" = 1 ] || cp "$f" "../resources/fuzz-corpus/$t/min-$name"
    done
    rm -rf "$out"
    echo "$t: $(ls "../resources/fuzz-corpus/$t" | wc -l) files, $(du -sb "../resources/fuzz-corpus/$t" | cut -f1) bytes"
done
