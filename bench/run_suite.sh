#!/usr/bin/env bash
# bench/run_suite.sh: the CPU benchmark suite in one command.
#
#   bash bench/run_suite.sh [--quick] [--shapes LIST] [--threads T] [--seconds S] [--out DIR] [--build DIR]
#                           [--wait-quiet S] [--append]
#
# Installs what it needs (the build dependencies, PyTorch for the peer, gnuplot for the plot, and OpenBLAS so
# that PyTorch's GEMMs run on an optimised BLAS rather than the reference one), builds bench/suite in
# Release into build/release (the project's release preset), runs PyTorch's peer and then our suite with the
# same thread count (PyTorch on each shape right before ours), and writes
#   bench/results/cpu-suite-<date>.md    the machine, the checks, the targets and one table per layer
#   bench/results/cpu-suite-<date>.png   step-time ratio against rank, the model dashed
# (or into --out DIR). The raw CSV files stay in <build>/suite-run/. --build DIR configures a Release build
# there instead of the preset's build/release. Before each shape both programs wait up to --wait-quiet
# seconds (default 30) for the shared machine to go quiet (other jobs below half a CPU), and the suite
# measures a shape again at the end when other jobs were busy while it ran. To repeat shapes later, when
# the machine is quieter, run with --shapes LIST --append: their report is added at the end of the day's
# results file under its own heading (the plot is left as it was). The full suite takes about
# 10 to 15 minutes on 2 cores; --quick (N = 4096 only) about 2. Every figure in the results is measured in
# the run that writes them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command_line="bash bench/run_suite.sh${*:+ $*}"
threads=2
out_dir=bench/results
build=
suite_args=()
peer_seconds=5
wait_quiet=30
append=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) suite_args+=(--quick); peer_seconds=2; shift ;;
    --shapes) suite_args+=(--shapes "$2"); shift 2 ;;
    --seconds) suite_args+=(--seconds "$2"); shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --out) out_dir="$2"; shift 2 ;;
    --build) build="$2"; shift 2 ;;
    --wait-quiet) wait_quiet="$2"; shift 2 ;;
    --append) append=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "run_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

bash .ci/deps python3-torch gnuplot-nox libopenblas0-openmp

if [[ -z $build ]]; then
  build=build/release
  cmake --preset release >/dev/null
else
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCOMPACT_BUILD_CUDA=OFF >/dev/null
fi
cmake --build "$build" --target bench_suite -j2

# libgomp spins waiting threads by default, which starves other jobs on a shared machine; both sides run
# with the same policy and thread count.
export OMP_WAIT_POLICY=passive
export OMP_NUM_THREADS="$threads"

run_dir="$build/suite-run"
mkdir -p "$run_dir" "$out_dir"
date_tag=$(date +%F)
md="$out_dir/cpu-suite-$date_tag.md"
png="$out_dir/cpu-suite-$date_tag.png"

# PyTorch's version and libraries, from a smoke run that also checks it works before the long run.
/usr/bin/python3 bench/pytorch_peer.py --smoke --threads "$threads" --meta "$run_dir/peer.json" >/dev/null

# The suite runs PyTorch's peer on each shape right before measuring it itself, so that both sides of a
# comparison see the shared machine in the same state.
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date +%s)
"$build/bench/suite" "${suite_args[@]}" --threads "$threads" --wait-quiet "$wait_quiet" \
  --peer-command "/usr/bin/python3 bench/pytorch_peer.py --threads $threads --seconds $peer_seconds" \
  --csv "$run_dir/suite.csv" --markdown "$run_dir/suite.md" >/dev/null
finished=$(date +%s)
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

if [[ $append == 1 ]]; then
  if [[ ! -f $md ]]; then
    echo "run_suite.sh: --append: $md does not exist yet; run the full suite first" >&2
    exit 1
  fi
  {
    echo
    echo "# Repeated at $(date '+%H:%M %Z'): \`$command_line\`"
    echo
    echo "These shapes were measured again because other jobs were busy during the full run; the figures"
    echo "below replace theirs above. Load average (1, 5, 15 min) before: $load_before; after: $load_after;"
    echo "run time $((finished - started)) s."
    echo
    sed 's/^## /## (repeated) /' "$run_dir/suite.md"
  } >>"$md"
  echo "run_suite.sh: appended to $md"
  exit 0
fi

# One panel per layer, one line per N, in the order the suite ran them.
layers=$(awk -F, 'NR > 1 && !seen[$3 "x" $4]++ { printf "%s%s", sep, $3 "x" $4; sep = " " }' "$run_dir/suite.csv")
rows=$(awk -F, 'NR > 1 { print $2 }' "$run_dir/suite.csv" | sort -n | uniq | tr '\n' ' ' | sed 's/ $//')
gnuplot -e "csv='$run_dir/suite.csv'; png='$png'; layers='$layers'; rows='$rows'" bench/plot_suite.gp

meta() { /usr/bin/python3 -c "import json, sys; m = json.load(open(sys.argv[1])); print($1)" "$run_dir/peer.json"; }
flags=$(sed -n 's/^CXX_FLAGS = //p' "$build/bench/CMakeFiles/bench_suite.dir/flags.make")
compiler=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$build/CMakeCache.txt")
{
  echo "# CPU benchmark suite, $date_tag"
  echo
  echo "Command: \`$command_line\`."
  echo "Compressed linear training steps against uncompressed ones through the same backend, and against"
  echo "PyTorch's nn.Linear + AdamW, on the same shapes and threads. See bench/README.md (\"suite\") for how to"
  echo "read the tables."
  echo
  memory=$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
  echo "- machine: $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), $(nproc) logical CPUs"\
       "($(grep -c '^processor' /proc/cpuinfo) listed in /proc/cpuinfo), $memory memory"
  echo "- threads: $threads on both sides (cpu::context; torch.set_num_threads), OMP_WAIT_POLICY=passive"
  echo "- compiler: $("$compiler" --version | head -n1); flags: \`$flags\`"
  echo "- PyTorch: $(meta "m['torch']") (Debian python3-torch), $(meta "m['threads']") threads;"\
       "libraries mapped: $(meta "', '.join(m['libraries'])")"
  echo "- date: $(date '+%Y-%m-%d %H:%M %Z'); run time of the suite with PyTorch's peer: $((finished - started)) s"
  echo "- load average (1, 5, 15 min) before: $load_before; after: $load_after. The machine is shared:"\
       "each shape's line below gives the CPUs other jobs kept busy while it ran."
  echo
  echo "![step-time ratio against rank](cpu-suite-$date_tag.png)"
  echo
  cat "$run_dir/suite.md"
} >"$md"
echo "run_suite.sh: wrote $md and $png"
