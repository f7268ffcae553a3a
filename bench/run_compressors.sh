#!/usr/bin/env bash
# bench/run_compressors.sh: regenerates bench/results/compressors.md and .png, the comparison of every
# compressor compact has on one model: examples/char_transformer trained uncompressed and with each
# compressor, from the same initial weights on the same batches, for the same steps.
#
#   bash bench/run_compressors.sh [--steps S] [--threads T] [--out DIR] [--build DIR]
#
# Installs what it needs (Debian's fortunes package for the text, gnuplot-nox for the plot), builds
# examples/char_transformer in Release with -march=native into build/char-transformer (or --build DIR),
# runs every configuration in its own process (char_transformer forks one per run, so each peak RSS is
# its own), and writes
#   <out>/compressors.md    machine, configuration, the table (losses, gap, saved bytes, optimizer state,
#                           peak memory, tokens/s) and the samples
#   <out>/compressors.png   validation-loss curves, and the final loss against the saved bytes
# (<out> is bench/results unless --out DIR). With the committed settings (1000 steps, 2 threads, nine
# runs) it takes about 30 minutes on an idle 2-core machine. Every figure in the results is measured by
# the run that writes them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source bench/char_transformer_setup.sh
steps=1000
ct_setup run_compressors.sh 18 "$@"

# The compressed configurations: the projection at r = n/4 and n/8; VeLoRA with sub-tokens of 4 values
# (G = n/4 coefficients per row, the bytes of n/4); WTA-CRS keeping a quarter of the rows (about the bytes
# of n/4); GACT's 4-bit store (n/7.5 of the bytes); ALAM's average quantization (about 0.6 bits per value);
# one mix of compressors per group; and the whole model compressed (every linear input at n/4 and the
# program's own saved tensors in stores, the head's input recomputed). The attention output stays
# uncompressed in the one-compressor plans, as in the CompAct paper.
mix="qkv=n/4,out=int4,gate_up=int4,down=alam"
whole="linear=n/4,attn=int8,mlp=int4,norm=int8,head=recompute"
plans=(n/4 n/8 velora wta int4 alam "$mix" "$whole")
tags=(full n4 n8 velora wta int4 alam "qkv-n4_out-int4_gate_up-int4_down-alam"
      "linear-n4_attn-int8_mlp-int4_norm-int8_head-recompute")
titles=(full n/4 n/8 VeLoRA WTA-CRS GACT-int4 ALAM mix whole-model)

flags=(--steps "$steps" --threads "$threads" --lr 3e-3 --alpha 1 --gap 50 --moments keep --warmup 100
       --eval-every 100 --sample 300)
for plan in "${plans[@]}"; do flags+=(--compress "$plan"); done

run_dir="$build/compressors-run"
mkdir -p "$run_dir"
md="$out_dir/compressors.md"
png="$out_dir/compressors.png"

ct_train --markdown "$run_dir/report.md" --csv "$run_dir/runs.csv" --curves "$run_dir/curve"

gnuplot -e "prefix='$run_dir/curve'; runs='${tags[*]}'; titles='${titles[*]}'; summary='$run_dir/runs.csv'; \
            out='$png'" bench/plot_compressors.gp

{
  echo "# One model, every compressor: CompAct, VeLoRA, WTA-CRS, GACT and ALAM, $(date -u +%F)"
  echo
  echo "examples/char_transformer.cpp trains a small decoder-only transformer on characters, uncompressed and"
  echo "with each of compact's compressors in its linear layers, from the same initial weights on the same"
  echo "batches for the same steps; only the \`--compress\` plan differs between the rows. Switching compressors"
  echo "is one template argument of the layer (the program maps each plan to one)."
  echo
  ct_machine_lines "all runs"
  echo
  cat "$run_dir/report.md"
  echo
  echo "### Curves, and loss against bytes"
  echo
  echo "![validation loss curves and final loss against saved bytes](compressors.png)"
  echo
  echo "Left: validation loss on 256 windows spread over the validation split, every 100 steps. Right: the"
  echo "final validation loss (whole validation split) against the bytes the linear layers keep for backward"
  echo "per step (log scale); lower and further left is better."
} > "$md"
echo "wrote $md and $png" >&2
