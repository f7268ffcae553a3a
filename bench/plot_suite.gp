# bench/plot_suite.gp: the suite's step-time ratio against the rank, one panel per layer (n -> m), one line
# per N, the multiply-add model of SPEC section 2 dashed in the same colour.
#
#   gnuplot -e "csv='suite.csv'; png='out.png'; layers='256x256 1024x2736'; rows='1024 4096'" bench/plot_suite.gp
#
# csv: the file `suite --csv` writes (columns are read by name); layers: the n x m of each panel; rows: the
# values of N. bench/run_suite.sh passes all four.

if (!exists("csv") || !exists("png") || !exists("layers") || !exists("rows")) {
    print "plot_suite.gp: set csv, png, layers and rows with -e (see the comment at the top)"
    exit status 2
}

set datafile separator ","
set datafile columnheaders
set terminal pngcairo size 1600,950 font ",11" linewidth 1.5
set output png

panels = words(layers)
columns = panels < 3 ? panels : 3
panel_rows = (panels + columns - 1) / columns
set multiplot layout panel_rows, columns \
    title "compressed / uncompressed training-step time against rank (solid: measured, dashed: multiply-add model)"

set logscale x 2
set format x "1/%.0f"
set grid
set xlabel "r / n"
set ylabel "step time ratio"
set key top left
set yrange [0:*]

# r / n is plotted as n / r on a reversed log axis whose labels read 1/2, 1/4, ...: rank grows to the right.
set xrange [*:*] reverse

do for [i = 1:panels] {
    layer = word(layers, i)
    x_at = strstrt(layer, "x")
    n_in = int(layer[1:x_at - 1])
    m_out = int(layer[x_at + 1:])
    set title sprintf("layer %d -> %d", n_in, m_out)
    plot for [j = 1:words(rows)] csv \
             using ((column("n") == n_in && column("m") == m_out && column("N") == int(word(rows, j))) ? \
                    1.0 / column("r_over_n") : NaN):(column("step_ratio")) \
             with linespoints pt 7 ps 0.8 lc j title sprintf("N = %s", word(rows, j)), \
         for [j = 1:words(rows)] csv \
             using ((column("n") == n_in && column("m") == m_out && column("N") == int(word(rows, j))) ? \
                    1.0 / column("r_over_n") : NaN):(column("step_model")) \
             with lines dt 2 lc j notitle, \
         1 with lines lc rgb "gray" dt 3 title "break-even"
}
unset multiplot
