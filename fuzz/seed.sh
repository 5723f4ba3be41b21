#!/usr/bin/env bash
# Seed fuzz/corpus/<target>/ from real files: the published perturbations and data listings in
# ../shared (SFR_SHARED), the Python-made variants the importer and weight tests use, and sfr's
# own perturbation and defence files made from them. corpus/ is gitignored: shared data is
# copied at run time, never committed. Idempotent; run by run.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
shared=${SFR_SHARED:-$root/../shared}
corpus=$here/corpus
py=${SFR_PYTHON:-/usr/bin/python3}
sfr=${SFR_BIN:-$root/target/release/sfr}
targets="pth safetensors npy mat h5 perturbation defence labels_csv image_folder"
for t in $targets; do mkdir -p "$corpus/$t"; done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

put() { # put TARGET FILE...: copy under content-hash names (so reruns add nothing)
    local t=$1; shift
    for f in "$@"; do
        [ -f "$f" ] && cp "$f" "$corpus/$t/seed-$(sha1sum "$f" | cut -c1-16)"
    done
    return 0
}

# Published perturbations.
if [ -d "$shared/attacks" ]; then
    # The three smallest of each kind: big inputs make slow executions.
    for ext in npy mat h5; do
        find "$shared/attacks" -name "*.$ext" -printf '%s\t%p\n' | sort -n | head -3 | cut -f2- |
            while IFS= read -r f; do put "$ext" "$f"; done
    done
else
    echo "seed.sh: no $shared/attacks (set SFR_SHARED)" >&2
fi
put h5 "$root"/tests/fixtures/*.h5

# The importer tests' synthetic variants and the weight tests' torch.save files.
if "$py" -c 'import numpy, h5py, scipy.io' 2>/dev/null; then
    "$py" "$root/tools/dump_arrays.py" --out "$tmp/arrays" --fixtures >/dev/null
    find "$tmp/arrays" -name '*.npy' ! -name '[0-9]*' -print0 | while IFS= read -r -d '' f; do put npy "$f"; done
    find "$tmp/arrays" -name '*.mat' -print0 | while IFS= read -r -d '' f; do put mat "$f"; done
    find "$tmp/arrays" \( -name '*.h5' -o -name '*.hdf5' \) -print0 | while IFS= read -r -d '' f; do put h5 "$f"; done
fi
if "$py" -c 'import torch' 2>/dev/null; then
    "$py" "$root/tools/make_weight_fixtures.py" "$tmp/weights" >/dev/null
    find "$tmp/weights" -name '*.pth' -print0 | while IFS= read -r -d '' f; do put pth "$f"; done
    find "$tmp/weights" -name '*.safetensors' -print0 | while IFS= read -r -d '' f; do put safetensors "$f"; done
fi

# sfr's own files: a perturbation imported from a published one, and a one-epoch defence.
if [ -x "$sfr" ]; then
    npy=$(find "$shared/attacks" -name '*.npy' 2>/dev/null | sort | head -1)
    if [ -n "$npy" ] && "$sfr" perturbation import --quiet "$npy" --size 224 --out "$tmp/p.safetensors" >/dev/null 2>&1; then
        put perturbation "$tmp/p.safetensors"
        put safetensors "$tmp/p.safetensors"
        # A 16×16 one too: small inputs make fast executions.
        if "$sfr" perturbation import --quiet "$npy" --size 16 --fit resize --out "$tmp/p16.safetensors" >/dev/null 2>&1; then
            put perturbation "$tmp/p16.safetensors"
            put safetensors "$tmp/p16.safetensors"
        fi
        data=$("$sfr" fetch foolbox-imagenet --json 2>/dev/null | sed -n 's/.*"path": *"\([^"]*\)".*/\1/p' | head -1)
        data=${data:-${SFR_CACHE:-$HOME/.cache/sfr}/data/foolbox-imagenet}
        if "$sfr" defend --quiet --epochs 1 --batch-size 4 --val 2 --data "$data" \
            --uap "$tmp/p.safetensors" --out "$tmp/d.safetensors" >/dev/null 2>&1; then
            put defence "$tmp/d.safetensors"
            put safetensors "$tmp/d.safetensors"
        fi
    fi
else
    echo "seed.sh: no $sfr (cargo build --release first): no perturbation/defence seeds" >&2
fi

# Data listings: labels.csv files and folder trees (one relative path a line).
for d in "$shared"/data/* "${SFR_CACHE:-$HOME/.cache/sfr}"/data/*; do
    [ -d "$d" ] || continue
    put labels_csv "$d/labels.csv"
    if [ -f "$d/labels.csv" ]; then
        { echo labels.csv; head -c 4000 "$d/labels.csv"; } > "$tmp/listing"
        put image_folder "$tmp/listing"
    fi
    (cd "$d" && find . -mindepth 1 -maxdepth 2 -type f | sed 's|^\./||' | sort | head -16) > "$tmp/listing"
    put image_folder "$tmp/listing"
done
printf 'n01440764/a.jpg\nn01443537/b.png\nn01443537/.hidden\n' > "$tmp/listing"
put image_folder "$tmp/listing"
printf '0/x.jpg\n1/y.JPEG\n999/z.jpg\n' > "$tmp/listing"
put image_folder "$tmp/listing"

for t in $targets; do
    echo "seed.sh: $t: $(ls "$corpus/$t" | wc -l) inputs"
done
