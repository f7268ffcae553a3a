# Plots bench/run_compressors.sh's runs of examples/char_transformer: left, every run's validation loss
# against the step (its --curves files); right, each run's final validation loss against the bytes its
# linear layers keep for backward (its --csv file), the uncompressed run at the right.
#   gnuplot -e "prefix='run/curve'; runs='full n4 n8'; titles='full n/4 n/8'; summary='run/runs.csv'; \
#               out='compressors.png'" bench/plot_compressors.gp
# runs: the curve files' tags (PREFIX.<tag>.csv), titles: the legend, one word each, in the same order.
if (!exists("out")) out = 'compressors.png'

set terminal pngcairo size 1400,520 font 'sans,10'
set output out
set datafile separator ','
set datafile missing 'NaN'
set grid
set multiplot layout 1,2 title 'Character-level transformer on fortunes: one model, seven compressors, equal steps'

set title 'validation loss (nats per character)'
set xlabel 'step'
set ylabel 'cross-entropy'
set yrange [*:3.0]
set key top right
plot for [i=1:words(runs)] prefix.'.'.word(runs, i).'.csv' using 1:3 skip 1 with linespoints pointsize 0.4 \
     title word(titles, i)

set title 'final validation loss against the linear layers'' saved activations'
set xlabel 'bytes kept for backward by the linear layers, MiB (log scale)'
set ylabel 'validation loss'
set yrange [*:*]
set logscale x 2
set key off
plot summary using ($6 / 1048576):4 skip 1 with points pointtype 7 pointsize 1.2 lc rgb '#d62728', \
     summary using ($6 / 1048576):4:(word(titles, int($0) + 1)) skip 1 with labels offset 0,1 font 'sans,9'

unset multiplot
