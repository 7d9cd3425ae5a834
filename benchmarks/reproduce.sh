#!/usr/bin/env bash
# Run the commands of docs/reproduction.md, one at a time, each with its wall time and the load.
#
#   benchmarks/reproduce.sh [SECTION ...]     (default: digits toy appb fashion fig5)
#
# Sections: digits (Table 1 rows and Figs. 1-3, 8-12 on scikit-learn's digits), toy (Section 3),
# appb (Appendix B on digits: Fig. 4, random labels, even/odd), fig5 (Fig. 5 on digits), fashion (Fashion-MNIST: Fig. 1
# setting and Table 1 rows, on a 5,000-image subset), mnist (needs the MNIST
# IDX files under $TINYSUBSPACE_DATA or /usr/share/datasets/), gpu (CIFAR rows: needs the CIFAR
# files, and a GPU to finish in hours rather than days), table (Table 1 of everything run so far).
# Runs go to $RUNS (default runs/repro); a finished run folder is skipped, so the script resumes.
# Timings are appended to $RUNS/timings.tsv (name, seconds, load average before, after).
set -euo pipefail
RUNS=${RUNS:-runs/repro}
HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$RUNS"

load() { cut -d' ' -f1 /proc/loadavg; }

timed() {  # timed NAME COMMAND...: run, log wall time and load
    local name=$1; shift
    local before start
    before=$(load); start=$(date +%s.%N)
    echo "== $name: $*"
    "$@"
    printf '%s\t%.0f\t%s\t%s\n' "$name" "$(echo "$(date +%s.%N) - $start" | bc)" "$before" \
        "$(load)" | tee -a "$RUNS/timings.tsv"
}

run() {  # run NAME EXPERIMENT [--set ...]: one experiment into $RUNS/NAME (skipped when finished)
    local name=$1; shift
    if grep -qs '"state": "finished"' "$RUNS/$name/status.json"; then
        echo "== $name: finished already, skipped"; return
    fi
    rm -rf "${RUNS:?}/$name"
    timed "$name" nice tinysubspace run "$@" --threads 1 --quiet --out "$RUNS/$name"
    nice tinysubspace plot "$RUNS/$name" > /dev/null
}

digits() {
    run fig1-fc-digits fig1-fc-digits
    run table1-softmax-digits table1-softmax-digits
    run table1-fc-softplus-digits table1-fc-softplus-digits
    run table1-fc-lr0.01-digits table1-fc-lr0.01-digits
    run table1-fc-batch256-digits table1-fc-batch256-digits
    run table1-fc-random-labels-digits table1-fc-random-labels-digits
    run table1-fc-sine-regression table1-fc-sine-regression
    # deviation: lr 0.01 needs ~10x the steps to leave the early phase on digits (see the doc)
    run table1-fc-lr0.01-digits-6000steps table1-fc-lr0.01-digits --set train.steps=6000
}

toy() {
    timed toy nice tinysubspace toy --out "$RUNS/toy"
    timed toy-biases nice tinysubspace toy --biases --out "$RUNS/toy-biases"
    timed toy-noise nice tinysubspace toy --sigma 0.02 --random-means --sweep-sigma 0.01,0.02,0.05 \
        --out "$RUNS/toy-noise"
    timed toy-k10-biases nice tinysubspace toy --k 10 --biases --random-means --sigma 0.02 \
        --out "$RUNS/toy-k10-biases"
    run toy-gaussian-mixture toy-gaussian-mixture
}

appb() {
    run appB-fig4-spectrum-fc32-digits appB-fig4-spectrum-fc32-digits
    run appB-random-labels-digits appB-random-labels-digits
    run appB-even-odd-digits appB-even-odd-digits
}

fig5() {  # Fig. 5 on digits, shortened: top-10 (not top-100) tracking, sparse only, and the top
    # 300 eigenvalues by Lanczos at tol 1e-3 (the top 1,000 at 1e-4 did not finish in 9 min here)
    run appB-fig5-density-fc256-digits appB-fig5-density-fc256-digits --set tracker.k=10 \
        --set tracker.dense_until=0 --set tracker.spectrum_top=300 --set tracker.tol=1e-3
}

# Fashion-MNIST shortened to fit 2 shared cores: a seeded subset of 5,000 training and 2,000
# test images (the "entire training set" of the full-data column is then these 5,000), and for
# the Table 1 rows the top-10 eigenpairs only every 500 steps and the full-data overlap(g, Hg) at
# every 5th of the last 1,000 steps (200 values). Unshortened: drop SUBSET and TABLE_TRACKING.
SUBSET=(--set data.n_train=5000 --set data.n_test=2000)
TABLE_TRACKING=(--set tracker.dense_until=0 --set tracker.sparse_every=500 --set tracker.overlap_every=5)

fashion() {
    run fig1-fc-fashion fig1-fc-fashion "${SUBSET[@]}"
    for name in table1-softmax table1-fc-softplus table1-fc-batch256 table1-fc-random-labels \
                table1-fc-lr0.01; do
        run "$name-fashion" "$name-fashion" "${SUBSET[@]}" "${TABLE_TRACKING[@]}"
    done
}

mnist() {
    for name in fig1-fc-mnist table1-softmax-mnist table1-fc-softplus-mnist table1-fc-lr0.01-mnist \
                table1-fc-batch256-mnist table1-fc-random-labels-mnist appB-random-labels-mnist \
                appB-even-odd-mnist appB-fig4-spectrum-fc32-mnist; do
        run "$name" "$name"
    done
}

gpu() {  # CIFAR files under $TINYSUBSPACE_DATA; a GPU makes these hours, not days
    for name in fig1-convnet-cifar10 fig1-resnet18-cifar10 table1-convnet-random-labels-cifar10 \
                table1-convnet-dropout-bn-dense-cifar10 table1-convnet-adam-cifar10 \
                appB-fig5-density-fc256-cifar100; do
        run "$name" "$name"
    done
}

table() {  # one data set at a time: a row's runs are averaged together
    local digits=() fashion=()
    for name in table1-softmax table1-fc-softplus table1-fc-lr0.01 table1-fc-batch256 \
                table1-fc-random-labels; do
        [ -d "$RUNS/$name-digits" ] && digits+=("$RUNS/$name-digits")
        [ -d "$RUNS/$name-fashion" ] && fashion+=("$RUNS/$name-fashion")
    done
    [ -d "$RUNS/table1-fc-sine-regression" ] && digits+=("$RUNS/table1-fc-sine-regression")
    if [ ${#digits[@]} -gt 0 ]; then tinysubspace table1 "${digits[@]}"; fi
    if [ ${#fashion[@]} -gt 0 ]; then tinysubspace table1 "${fashion[@]}"; fi
    python "$HERE/reproduction_numbers.py" "$RUNS" > "$RUNS/key_numbers.txt"
    echo "key numbers of every run: $RUNS/key_numbers.txt"
}

for section in "${@:-digits toy appb fashion fig5}"; do
    for s in $section; do "$s"; done
done
table
