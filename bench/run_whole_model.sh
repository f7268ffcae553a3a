#!/usr/bin/env bash
# bench/run_whole_model.sh: regenerates bench/results/whole_model.md and .png: examples/char_transformer at
# C = 256 (H = 8, F = 688, N = 4096 tokens per step) trained uncompressed and with the whole model
# compressed, from the same initial weights on the same batches for the same steps, against the targets
# (validation loss within 3%, tracked peak memory at most 60%, tokens per second at least 0.95x).
#
#   bash bench/run_whole_model.sh [--steps S] [--threads T] [--out DIR] [--build DIR]
#
# Installs what it needs (fortunes, gnuplot-nox), builds examples/char_transformer in Release with
# -march=native into build/char-transformer (or --build DIR), first prints the memory of each strategy
# added in turn (--memory-only: seconds), then trains the three runs, each in its own process, and writes
#   <out>/whole_model.md    machine, configuration, what each strategy contributes, losses, memory by
#                           category, tokens/s, the targets
#   <out>/whole_model.png   validation-loss curves
# (<out> is bench/results unless --out DIR). With the committed settings (1000 steps, 2 threads) it takes
# about 35 minutes on an idle 2-core machine. Every figure in the results is measured by the run that
# writes them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source bench/char_transformer_setup.sh
steps=1000
ct_setup run_whole_model.sh 18 "$@"

model=(--channels 256 --heads 8 --hidden 688)
# The whole model: every linear input compressed (by the seeded projection at r = n/4, or by 8-bit
# stores), attention's Q K V, the SwiGLU pre-activations and the norm inputs in 8-bit stores, the head's
# input recomputed. The attention output projection is compressed by neither (as in the CompAct paper).
whole_n4="linear=n/4,attn=int8,mlp=int8,norm=int8,head=recompute"
whole_int8="linear=int8,attn=int8,mlp=int8,norm=int8,head=recompute"
tags=(full linear-n4_attn-int8_mlp-int8_norm-int8_head-recompute linear-int8_attn-int8_mlp-int8_norm-int8_head-recompute)
titles=("uncompressed" "whole model, linear n/4" "whole model, linear int8")
# One strategy added at a time, for the memory table.
steps_of_strategy=(linear=n/4 linear=n/4,attn=int8 linear=n/4,attn=int8,mlp=int8
                   linear=n/4,attn=int8,mlp=int8,norm=int8 "$whole_n4")

flags=(--steps "$steps" --threads "$threads" "${model[@]}" --lr 3e-3 --alpha 1 --gap 50 --moments keep
       --warmup 100 --eval-every 100 --sample 300 --compress "$whole_n4" --compress "$whole_int8")

run_dir="$build/whole-model-run"
mkdir -p "$run_dir"
md="$out_dir/whole_model.md"
png="$out_dir/whole_model.png"

memory_flags=(--memory-only "${model[@]}")
for plan in "${steps_of_strategy[@]}"; do memory_flags+=(--compress "$plan"); done
"$build/examples/char_transformer" "${memory_flags[@]}" --markdown "$run_dir/memory.md" >/dev/null

ct_train --markdown "$run_dir/report.md" --csv "$run_dir/runs.csv" --curves "$run_dir/curve"

gnuplot -e "set terminal pngcairo size 900,520 font 'sans,10'; set output '$png'; set datafile separator ','; \
  set datafile missing 'NaN'; set grid; set key top right; set yrange [*:3.0]; \
  set title 'C = 256 transformer on fortunes: validation loss, equal steps'; set xlabel 'step'; \
  set ylabel 'cross-entropy (nats per character)'; \
  plot for [i=1:3] '$run_dir/curve.'.word('${tags[*]}', i).'.csv' using 1:3 skip 1 with linespoints \
       pointsize 0.4 title word('uncompressed linear-n/4 linear-int8', i).(i > 1 ? ' (whole model)' : '')"

# The targets, from the runs' own figures (row 1 uncompressed). The first two CSV fields are quoted and
# hold commas, so the figures are read from the end of each line.
targets=$(awk -F, -v names="linear=n/4 linear=int8" 'BEGIN { split(names, name, " ") }
  NR == 2 { v0 = $(NF - 7); t0 = $(NF - 1); p0 = $NF }
  NR > 2 { g = 100 * ($(NF - 7) / v0 - 1); p = 100 * $NF / p0; s = $(NF - 1) / t0;
    printf "| whole model, %s | %+.2f%% %s | %.1f%% %s | %.3fx %s |\n", name[NR - 2], g, (g <= 3 ? "(met)" : "(missed)"),
      p, (p <= 60 ? "(met)" : "(missed)"), s, (s >= 0.95 ? "(met)" : "(missed)") }' "$run_dir/runs.csv")

{
  echo "# The whole model compressed: C = 256 character transformer, $(date -u +%F)"
  echo
  echo "examples/char_transformer.cpp trains a decoder-only transformer on characters, uncompressed and with"
  echo "every tensor it keeps for backward compressed, from the same initial weights on the same batches for"
  echo "the same steps; only the \`--compress\` plan differs between the rows."
  echo
  ct_machine_lines "the three runs"
  echo
  echo "## Targets"
  echo
  echo "Against the uncompressed run: validation loss (whole validation split) within 3%, tracked peak"
  echo "training memory at most 60%, tokens per second at least 0.95 times."
  echo
  echo "| run | validation loss | tracked peak | tokens/s |"
  echo "|---|---|---|---|"
  echo "$targets"
  echo
  echo "## What each strategy contributes (memory only)"
  echo
  echo "One strategy added at a time (\`--memory-only\`: each configuration built, not trained)."
  echo
  sed -n '/^Peak training memory, tracked/,$p' "$run_dir/memory.md"
  echo
  echo "## Training"
  echo
  sed -n '/^### Model and training/,$p' "$run_dir/report.md"
  echo
  echo "![validation loss curves](whole_model.png)"
} > "$md"
# What the committed run showed is written by hand below the measured part of the file (## Reading).
echo "wrote $md and $png" >&2
