#!/usr/bin/env bash
# bench/run_char_transformer.sh: regenerates bench/results/char_transformer.md and .png.
#
#   bash bench/run_char_transformer.sh [--steps S] [--threads T] [--out DIR] [--build DIR]
#
# Installs what it needs (Debian's fortunes package for the text, gnuplot-nox for the plot), builds
# examples/char_transformer in Release with -march=native into build/char-transformer (or --build DIR),
# trains the uncompressed model and the r = n/4 one for the same steps on the same batches, each in its own
# process, and writes
#   <out>/char_transformer.md    machine, configuration, losses, memory, throughput, samples, the target
#   <out>/char_transformer.png   loss curves and the relative validation-loss gap against the step
# (<out> is bench/results unless --out DIR). With the committed settings (2000 steps, 2 threads) it takes
# about 20 minutes on an idle 2-core machine. Every figure in the results is measured by the run that
# writes them; the tuning history at the end is fixed text.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command_line="bash bench/run_char_transformer.sh${*:+ $*}"
steps=2000
threads=2
out_dir=bench/results
build=build/char-transformer
while [[ $# -gt 0 ]]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --out) out_dir="$2"; shift 2 ;;
    --build) build="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "run_char_transformer.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

bash .ci/deps fortunes gnuplot-nox

cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS=-march=native -DCOMPACT_BUILD_CUDA=OFF \
  -DCOMPACT_BUILD_TESTS=OFF -DCOMPACT_BUILD_BENCH=OFF >/dev/null
cmake --build "$build" --target char_transformer -j2

# libgomp spins waiting threads by default, which starves other jobs on a shared machine.
export OMP_WAIT_POLICY=passive

# The committed configuration: the program's defaults for the model, with these training settings.
flags=(--steps "$steps" --threads "$threads" --rank n/4 --lr 3e-3 --alpha 1 --gap 50 --moments keep
       --warmup 100 --eval-every 100 --sample 600)

run_dir="$build/char-transformer-run"
mkdir -p "$run_dir" "$out_dir"
md="$out_dir/char_transformer.md"
png="$out_dir/char_transformer.png"

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date +%s)
"$build/examples/char_transformer" "${flags[@]}" --markdown "$run_dir/report.md" --curves "$run_dir/curve" \
  | tee "$run_dir/log.txt"
finished=$(date +%s)
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

gnuplot -e "full='$run_dir/curve.full.csv'; compressed='$run_dir/curve.compressed.csv'; out='$png'; \
            label='r = n/4'" bench/plot_char_transformer.gp

cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
flags_used=$(sed -n 's/^CXX_FLAGS = //p' "$build/examples/CMakeFiles/char_transformer.dir/flags.make")
compiler=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$build/CMakeCache.txt")
{
  echo "# Character-level transformer, uncompressed and compressed, $(date -u +%F)"
  echo
  echo "examples/char_transformer.cpp trains a small decoder-only transformer (token and learned position"
  echo "embeddings, RMSNorm, causal multi-head attention, SwiGLU MLP, tied output head; forward and backward"
  echo "written by hand) on characters, twice from the same initial weights on the same batches: uncompressed"
  echo "(rank::full: P = I through the same code) and with the linear layers' activations compressed to r = n/4"
  echo "(q, k, v one input group, gate and up another, down alone; the attention output projection"
  echo "uncompressed, as in the paper)."
  echo
  echo "- command: \`$command_line\`, which runs \`char_transformer ${flags[*]}\`"
  echo "- machine: $cpu_model, $(nproc) logical CPUs; $threads OpenMP threads; load average $load_before before,"
  echo "  $load_after after; $((finished - started)) s for both runs, evaluations and sampling included"
  echo "- build: $("$compiler" --version | head -1); flags \`$flags_used\`"
  echo "- date: $(date -u '+%F %T') UTC"
  echo
  cat "$run_dir/report.md"
  echo
  echo "### Loss curves"
  echo
  echo "![loss curves](char_transformer.png)"
  echo
  echo "Left: validation loss (solid, on 256 windows spread over the validation split) and training loss (dashed,"
  echo "the mean batch loss over the previous 100 steps). Right: the compressed run's validation loss relative to"
  echo "the uncompressed run's at the same step."
  echo
  cat bench/char_transformer_target.md
} > "$md"
echo "wrote $md and $png" >&2
