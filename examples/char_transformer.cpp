// char_transformer: a small decoder-only transformer trained on characters, uncompressed and with
// compressed activations, forward and backward written out by hand.
//
// The model (LLaMA-style), top to bottom, for B sequences of T tokens (N = B T rows):
//
//   X0 = E[tokens] + Pos                          E (V, C) token embedding, Pos (T, C) learned positions
//   for each of the L blocks:
//     H = RMSNorm(X) g1                           [Q | K | V] = H [W_q | W_k | W_v]^T       (group "qkv")
//     A = softmax(Q K^T / sqrt(hs) + causal mask) V, per head (H heads of hs = C / H)
//     X = X + A W_o^T                                                                       ("attn-out")
//     H = RMSNorm(X) g2                           [G | U] = H [W_gate | W_up]^T             ("gate-up")
//     X = X + (silu(G) * U) W_down^T                                                        ("down")
//   logits = (RMSNorm(X) gf) E^T                  the output head is tied to the embedding
//   loss = mean softmax cross-entropy against the next character
//
// The linear layers go through compact (SPEC section 2), each kind of group with the compressor the
// run's plan names (--compress): the seeded projection (CompAct) at r = n/2, n/4 or n/8, a quantized
// store (GACT-style B-bit, or ALAM's average quantization), VeLoRA or WTA-CRS; switching is one template
// argument of the group (any_linear_group maps the plan's names to them). q, k and v read one input, so
// they form one compact::input_group: one compressor and one saved activation for all three, each member
// with its own W and its own optimizer (subspace AdamW built from the group's projection, or plain AdamW
// for the compressors whose gradient is full-shape); gate and up form another group; down is compressed
// on its own. The attention output projection is not compressed (the paper's setup) unless the plan or
// --compress-attn-out says so. The uncompressed baseline is compact::rank::full through the same code:
// P = I, r = n, Z a copy of the layer input, exact gradients and plain AdamW. Embeddings and norm gains use
// compact::adamw.
//
// The rest of the model's saved tensors can be compressed too (the plan's attn, mlp, norm and head keys):
// attention's Q, K, V, the SwiGLU pre-activations and the RMSNorm inputs through compact::activation_store
// (encoded as soon as forward has used them, decoded just before backward needs them; their memory is
// then scratch shared by every layer), and the tied head's input recomputed in backward from the final
// norm's input instead of kept.
//
// Memory is planned once (plan_activations): every tensor the forward pass keeps for backward, and
// every scratch tensor, is carved from two allocations (kept, scratch), and the byte counts reported are
// those of the plan (the linear groups' saved activations from the compressors' saved_bytes queries).
// Scratch that only forward uses and scratch that only backward uses share memory, and SwiGLU's backward
// writes its gradient over its input, so the scratch is what the busier pass needs.
// Every buffer of the model is allocated through compact::tracking_allocator under its category
// (weights, gradients, optimizer state, saved for backward, compressor state, scratch), so the report
// also gives the exact peak of training memory and what it was made of. Attention keeps only Q, K, V and
// each score row's log-sum-exp; backward recomputes the probabilities from them (as FlashAttention
// does), so no (B, H, T, T) tensor is kept.
//
// Each configuration runs in a forked child, so that its peak resident memory (VmHWM) is its own.
//
// Usage: char_transformer [options]
//   --text PATH         train on this file (default: the text of Debian's fortunes package, from
//                       /usr/share/games/fortunes; without it, a short built-in text, with a warning)
//   --steps S           optimizer steps per configuration (default 300)
//   --compress PLAN     a compressed configuration; repeat for several (default n/4). PLAN is one
//                       compressor for q/k/v, gate/up and down (full, n/2, n/4, n/8: the projection;
//                       int8, int4, int2, int1: GACT-style group quantization; alam: ALAM's average
//                       quantization; velora[/S]: VeLoRA, sub-tokens of S values, default 4; wta[/R]:
//                       WTA-CRS keeping R N rows, default 0.25), or a list of KEY=VALUE: qkv, out,
//                       gate_up, down (a compressor for that group), linear (one for qkv, gate_up and
//                       down), attn, mlp, norm (a store for Q K V, the SwiGLU pre-activations, the norm
//                       inputs: full, int8, int4, int2, int1 or alam), head=recompute, bits=B (GACT's
//                       allocator picks the stored kinds' schemes under B bits per value on average,
//                       from probed sensitivities, at the first step and at 10% of the steps); what a
//                       list does not name stays uncompressed. Example: linear=n/4,attn=int8,mlp=int4,
//                       norm=int8,head=recompute. --rank R is --compress R.
//   --runs both|full|compressed   the uncompressed run, the compressed ones, or both (default both)
//   --compress-attn-out a one-compressor PLAN also compresses the attention output projection
//   --lr X              peak learning rate of every uncompressed parameter, the baseline's linear
//                       layers included (default 3e-3)
//   --lr-compressed X   peak learning rate of the compressed groups (default: --lr)
//   --alpha X           subspace scale of the compressed groups: W -= lr alpha N P^T (default 1)
//   --gap T             a new P every T updates (default 50; 0 keeps one P)
//   --moments keep|reset|transfer  what subspace AdamW does with its moments at a new P (default keep)
//   --wd X              decoupled weight decay of the linear layers (default 0)
//   --warmup S          linear warm-up steps, then cosine decay to lr / 10 (default 100)
//   --channels C --layers L --heads H --hidden F --context T --batch B   model and batch shape
//   --eval-every S      steps between validation evaluations (default 100)
//   --eval-windows W    validation windows per periodic evaluation (default 256)
//   --final-windows W   windows of the final evaluation, from each split (default: the whole validation
//                       split without overlap, and as many training windows)
//   --threads N         CPU threads (default 0: all OpenMP threads)
//   --seed S            initialisation, batch order, projections and sampling (default 1234)
//   --sample N          characters to sample at the end (default 400); --temperature X (default 0.8)
//   --markdown PATH     write the configuration, the results table and the samples as markdown
//   --csv PATH          write one line per run: name, losses, saved bytes, optimizer state, peak RSS, tokens/s
//   --memory-only       build each configuration and report its memory plan and tracked peak, without
//                       training (a second each: the plan allocates everything up front)
//   --curves PREFIX     write each run's loss curve to PREFIX.<plan>.csv, the plan's name without '/'
//                       (PREFIX.full.csv, PREFIX.n4.csv, ...; columns step, train_loss: the mean batch
//                       loss since the previous row, val_loss)
//   --gradcheck         only check the hand-written backward against finite differences (float64)
//   --smoke             the gradient check on a tinier model, then 200 steps of a small model on the
//                       built-in text (needs no package), uncompressed and with every compressor and the
//                       stores (unless --compress says which), checking that each training loss falls
//                       below the text's unigram entropy, i.e. that the model learns from context, and
//                       that full-precision stores and the recomputed head change no bit of training;
//                       single-threaded unless --threads says otherwise
#include <compact/compact.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#if COMPACT_HAS_OPENMP
#include <omp.h>
#endif

namespace {

using compact::index_t;
using compact::op;
using cpu = compact::cpu;
using context = compact::cpu::context;
using clock_type = std::chrono::steady_clock;
using compact::memory_category;

// Every buffer of the model counts into this process's tracker, under what it is for (each configuration
// trains in its own process, so the tracker's peak is that configuration's).
compact::memory_tracker& tracker()
{
    static compact::memory_tracker t;
    return t;
}
template <class T>
using buffer = std::vector<T, compact::tracking_allocator<T>>;
template <class T>
buffer<T> make_buffer(memory_category category, std::size_t count = 0, T value = T(0))
{
    return buffer<T>(count, value, compact::tracking_allocator<T>(tracker(), category));
}
template <class T>
using mat = compact::matrix_view<T>;
template <class T>
using cmat = compact::const_matrix_view<T>;

constexpr double norm_eps = 1e-5;

// ------------------------------------------------------------------------------------------- text

// Written for this example, so that --smoke needs no package. Fortunes-like: '%' lines separate entries.
constexpr const char* builtin_text =
    "The lighthouse keeper wrote in his log every evening. The wind came from the west and the sea was\n"
    "grey. A small boat passed the point at noon, and the gulls followed it into the harbour.\n"
    "%\n"
    "A good program reads like a letter from a careful friend: it says what it means, it keeps its\n"
    "promises, and it tells you plainly when something has gone wrong.\n"
    "%\n"
    "The baker opened her shop before dawn. Bread, rolls and a few sweet buns sat in the window, and\n"
    "the street smelled of warm flour. By eight o'clock the shelves were half empty.\n"
    "%\n"
    "Measure twice, cut once; and when the wood is cut, measure again to see what you have learned.\n"
    "%\n"
    "Every river remembers the rain that made it, and every road the feet that wore it smooth.\n"
    "%\n"
    "If a thing is worth doing, it is worth doing slowly enough to see it done well.\n"
    "%\n"
    "The cat sat on the warm stone wall and watched the garden, where the bees went from flower to\n"
    "flower and the old dog slept in the shade of the apple tree.\n"
    "%\n";

struct corpus {
    std::string source;                 // where the text came from
    std::vector<unsigned char> chars;   // (V): id -> byte
    std::vector<std::uint8_t> ids;      // the whole text as ids
    std::size_t train_end = 0;          // ids [0, train_end) train, [train_end, size) validate
    index_t vocab() const { return static_cast<index_t>(chars.size()); }

    // Entropy of the training split's character frequencies (nats): the loss of the best model that
    // ignores context, which a model that learns anything from context must beat.
    double unigram_entropy() const
    {
        std::vector<double> count(chars.size(), 0.0);
        for (std::size_t i = 0; i < train_end; ++i) count[ids[i]] += 1;
        double h = 0;
        for (double c : count)
            if (c > 0) h -= c / static_cast<double>(train_end) * std::log(c / static_cast<double>(train_end));
        return h;
    }
};

// Drops "x\b" overstrikes (old terminals' bold and underline) and carriage returns.
std::string clean_text(const std::string& raw)
{
    std::string out;
    out.reserve(raw.size());
    for (char c : raw) {
        if (c == '\b') {
            if (!out.empty()) out.pop_back();
        } else if (c != '\r') {
            out.push_back(c);
        }
    }
    return out;
}

std::string read_file(const std::string& path)
{
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("--text: cannot open '" + path + "'");
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
}

// Every fortune file of `dir` in name order, skipping strfile's .dat and .u8 index files.
std::string read_fortunes(const std::string& dir)
{
    std::vector<std::string> files;
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
        const std::string ext = entry.path().extension().string();
        if (entry.is_regular_file() && ext != ".dat" && ext != ".u8") files.push_back(entry.path().string());
    }
    std::sort(files.begin(), files.end());
    std::string text;
    for (const auto& f : files) text += read_file(f);
    return text;
}

// Character vocabulary of the whole text; the first 90% trains, the last 10% validates.
corpus make_corpus(const std::string& raw, std::string source)
{
    corpus c;
    c.source = std::move(source);
    const std::string text = clean_text(raw);
    bool present[256] = {};
    for (char ch : text) present[static_cast<unsigned char>(ch)] = true;
    int id_of[256];
    for (int b = 0; b < 256; ++b) {
        id_of[b] = present[b] ? static_cast<int>(c.chars.size()) : -1;
        if (present[b]) c.chars.push_back(static_cast<unsigned char>(b));
    }
    c.ids.reserve(text.size());
    for (char ch : text) c.ids.push_back(static_cast<std::uint8_t>(id_of[static_cast<unsigned char>(ch)]));
    c.train_end = c.ids.size() * 9 / 10;
    return c;
}

// Bytes that would garble a terminal or a markdown code block are shown as '?'.
std::string printable(const std::string& s)
{
    std::string out;
    for (char ch : s) {
        const auto b = static_cast<unsigned char>(ch);
        out.push_back(b == '\n' || b == '\t' || (b >= 32 && b < 127) ? ch : '?');
    }
    return out;
}

// ------------------------------------------------------------------------------ elementwise kernels

// Runs f(begin, end) over consecutive row ranges, spread over the context's threads. The ranges depend
// on `rows` only, so results do not depend on the thread count.
template <class F>
void for_rows(const context& ctx, index_t rows, F&& f)
{
    constexpr index_t grain = 32;
    cpu::parallel_for(ctx, (rows + grain - 1) / grain,
                      [&](index_t p) { f(p * grain, std::min(rows, (p + 1) * grain)); });
}

int thread_index()
{
#if COMPACT_HAS_OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// Y = X rstd g, rstd = 1 / sqrt(mean_j X^2 + eps) per row. X, Y: (N, C); g: (C); rstd: (N).
template <class T>
void rmsnorm_forward(const context& ctx, cmat<T> x, const T* gain, mat<T> y, T* rstd)
{
    for_rows(ctx, x.rows, [&](index_t i0, index_t i1) {
        for (index_t i = i0; i < i1; ++i) {
            const T* xi = x.row(i);
            T sum = 0;
            for (index_t j = 0; j < x.cols; ++j) sum += xi[j] * xi[j];
            const T r = T(1) / std::sqrt(sum / static_cast<T>(x.cols) + static_cast<T>(norm_eps));
            rstd[i] = r;
            T* yi = y.row(i);
            for (index_t j = 0; j < x.cols; ++j) yi[j] = xi[j] * r * gain[j];
        }
    });
}

// RMSNorm backward. With xhat = X rstd (so Y = xhat g):
//   dX = rstd (dY g - xhat mean_j(dY g xhat)),   dg = sum over rows of dY xhat.
// X, dY: (N, C); rstd: (N); dX: (N, C), overwritten or added to; dg: (C), overwritten.
template <class T>
void rmsnorm_backward(const context& ctx, cmat<T> x, const T* rstd, const T* gain, cmat<T> dy, mat<T> dx,
                      bool accumulate, T* dgain)
{
    for_rows(ctx, x.rows, [&](index_t i0, index_t i1) {
        for (index_t i = i0; i < i1; ++i) {
            const T *xi = x.row(i), *dyi = dy.row(i);
            const T r = rstd[i];
            T dot = 0;
            for (index_t j = 0; j < x.cols; ++j) dot += dyi[j] * gain[j] * xi[j];
            const T mean = dot * r / static_cast<T>(x.cols);
            T* dxi = dx.row(i);
            for (index_t j = 0; j < x.cols; ++j) {
                const T v = r * (dyi[j] * gain[j] - xi[j] * r * mean);
                dxi[j] = accumulate ? dxi[j] + v : v;
            }
        }
    });
    // Rows in order, so dg does not depend on the thread count; N C multiply-adds, serial is fine.
    std::fill(dgain, dgain + x.cols, T(0));
    for (index_t i = 0; i < x.rows; ++i)
        for (index_t j = 0; j < x.cols; ++j) dgain[j] += dy(i, j) * x(i, j) * rstd[i];
}

// act = silu(gate) * up, silu(g) = g sigmoid(g). gate_up: (N, 2F) = [gate | up]; act: (N, F).
template <class T>
void swiglu_forward(const context& ctx, cmat<T> gate_up, mat<T> act)
{
    const index_t f = act.cols;
    for_rows(ctx, act.rows, [&](index_t i0, index_t i1) {
        for (index_t i = i0; i < i1; ++i) {
            const T* g = gate_up.row(i);
            const T* u = g + f;
            T* a = act.row(i);
            for (index_t j = 0; j < f; ++j) a[j] = g[j] / (T(1) + std::exp(-g[j])) * u[j];
        }
    });
}

// d gate = d act * up * s (1 + g (1 - s)), d up = d act * g s, with s = sigmoid(gate).
// gate_up, d_gate_up: (N, 2F); d_act: (N, F). d_gate_up may be gate_up itself (in place: each gate and up
// value is read before its gradient is written over it).
template <class T>
void swiglu_backward(const context& ctx, cmat<T> gate_up, cmat<T> d_act, mat<T> d_gate_up)
{
    const index_t f = d_act.cols;
    for_rows(ctx, d_act.rows, [&](index_t i0, index_t i1) {
        for (index_t i = i0; i < i1; ++i) {
            const T* g = gate_up.row(i);
            const T* u = g + f;
            const T* da = d_act.row(i);
            T* dg = d_gate_up.row(i);
            T* du = dg + f;
            for (index_t j = 0; j < f; ++j) {
                const T gj = g[j], uj = u[j];
                const T s = T(1) / (T(1) + std::exp(-gj));
                dg[j] = da[j] * uj * s * (T(1) + gj * (T(1) - s));
                du[j] = da[j] * gj * s;
            }
        }
    });
}

// out = a + b, all (N, C).
template <class T>
void add(const context& ctx, cmat<T> a, cmat<T> b, mat<T> out)
{
    for_rows(ctx, out.rows, [&](index_t i0, index_t i1) {
        for (index_t i = i0; i < i1; ++i)
            for (index_t j = 0; j < out.cols; ++j) out(i, j) = a(i, j) + b(i, j);
    });
}

// Mean softmax cross-entropy of logits (N, V) against targets (N). Overwrites the logits with the
// gradient of that mean, (softmax - onehot) / N, and returns the mean. row_loss: (N) scratch.
template <class T>
double cross_entropy(const context& ctx, mat<T> logits, const int* targets, double* row_loss)
{
    const double inv_n = 1.0 / static_cast<double>(logits.rows);
    for_rows(ctx, logits.rows, [&](index_t i0, index_t i1) {
        for (index_t i = i0; i < i1; ++i) {
            T* z = logits.row(i);
            const double top = static_cast<double>(*std::max_element(z, z + logits.cols));
            double sum = 0;
            for (index_t j = 0; j < logits.cols; ++j) sum += std::exp(static_cast<double>(z[j]) - top);
            const double lse = top + std::log(sum);
            row_loss[i] = lse - static_cast<double>(z[targets[i]]);
            for (index_t j = 0; j < logits.cols; ++j) {
                const double p = std::exp(static_cast<double>(z[j]) - lse);
                z[j] = static_cast<T>((p - (j == targets[i] ? 1.0 : 0.0)) * inv_n);
            }
        }
    });
    double total = 0;
    for (index_t i = 0; i < logits.rows; ++i) total += row_loss[i];
    return total * inv_n;
}

// ------------------------------------------------------------------------------------------- attention

// Causal multi-head attention, forward, for `batch` sequences of `length` rows.
// qkv: (N, 3C) = [Q | K | V], head h in columns [h hs, (h + 1) hs) of each; out: (N, C), heads side by
// side; lse: (N, H), the log-sum-exp of each score row, which is all backward needs to recompute the
// probabilities; scores: (threads T, T) scratch, one (T, T) block per thread.
template <class T>
void attention_forward(const context& ctx, cmat<T> qkv, index_t batch, index_t length, index_t heads, mat<T> out,
                       mat<T> lse, mat<T> scores)
{
    const index_t c = out.cols, hs = c / heads, block_rows = scores.cols;
    const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
    const context one{1}; // each (sequence, head) runs on one thread; the pairs are spread over threads
    cpu::parallel_for(ctx, batch * heads, [&](index_t p) {
        const index_t b = p / heads, h = p % heads, r0 = b * length;
        const auto q = qkv.block(r0, h * hs, length, hs), k = qkv.block(r0, c + h * hs, length, hs),
                   v = qkv.block(r0, 2 * c + h * hs, length, hs);
        const mat<T> s = scores.block(thread_index() * block_rows, 0, length, length); // (T, T)
        cpu::gemm<T>(one, op::none, op::transpose, scale, q, k, 0.0, s);             // S = Q K^T / sqrt(hs)
        for (index_t i = 0; i < length; ++i) {
            T* si = s.row(i);
            const T top = *std::max_element(si, si + i + 1);
            T sum = 0;
            for (index_t j = 0; j <= i; ++j) sum += (si[j] = std::exp(si[j] - top));
            for (index_t j = 0; j <= i; ++j) si[j] /= sum;
            std::fill(si + i + 1, si + length, T(0)); // the causal mask
            lse(r0 + i, h) = top + std::log(sum);
        }
        cpu::gemm<T>(one, op::none, op::none, 1.0, cmat<T>(s), v, 0.0, out.block(r0, h * hs, length, hs)); // P V
    });
}

// Attention backward, recomputing P = exp(S - lse) from Q and K:
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(P * dP)),  dQ = dS K / sqrt(hs),  dK = dS^T Q / sqrt(hs).
// qkv: (N, 3C); lse: (N, H); d_out: (N, C); d_qkv: (N, 3C), overwritten; scores, d_scores: (threads T, T).
template <class T>
void attention_backward(const context& ctx, cmat<T> qkv, cmat<T> lse, cmat<T> d_out, index_t batch, index_t length,
                        index_t heads, mat<T> d_qkv, mat<T> scores, mat<T> d_scores)
{
    const index_t c = d_out.cols, hs = c / heads, block_rows = scores.cols;
    const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
    const context one{1};
    cpu::parallel_for(ctx, batch * heads, [&](index_t p) {
        const index_t b = p / heads, h = p % heads, r0 = b * length;
        const auto q = qkv.block(r0, h * hs, length, hs), k = qkv.block(r0, c + h * hs, length, hs),
                   v = qkv.block(r0, 2 * c + h * hs, length, hs);
        const auto d_o = d_out.block(r0, h * hs, length, hs);
        const mat<T> s = scores.block(thread_index() * block_rows, 0, length, length);    // (T, T): P
        const mat<T> ds = d_scores.block(thread_index() * block_rows, 0, length, length); // (T, T): dP, dS
        cpu::gemm<T>(one, op::none, op::transpose, scale, q, k, 0.0, s);
        for (index_t i = 0; i < length; ++i) {
            T* si = s.row(i);
            const T l = lse(r0 + i, h);
            for (index_t j = 0; j <= i; ++j) si[j] = std::exp(si[j] - l);
            std::fill(si + i + 1, si + length, T(0));
        }
        cpu::gemm<T>(one, op::transpose, op::none, 1.0, cmat<T>(s), d_o, 0.0,
                     d_qkv.block(r0, 2 * c + h * hs, length, hs)); // dV
        cpu::gemm<T>(one, op::none, op::transpose, 1.0, d_o, v, 0.0, ds); // dP
        for (index_t i = 0; i < length; ++i) {
            const T* si = s.row(i);
            T* di = ds.row(i);
            T dot = 0;
            for (index_t j = 0; j <= i; ++j) dot += si[j] * di[j];
            for (index_t j = 0; j <= i; ++j) di[j] = si[j] * (di[j] - dot);
            std::fill(di + i + 1, di + length, T(0));
        }
        cpu::gemm<T>(one, op::none, op::none, scale, cmat<T>(ds), k, 0.0, d_qkv.block(r0, h * hs, length, hs)); // dQ
        cpu::gemm<T>(one, op::transpose, op::none, scale, cmat<T>(ds), q, 0.0,
                     d_qkv.block(r0, c + h * hs, length, hs)); // dK
    });
}

// ------------------------------------------------------------------------------------------ parameters

// A parameter trained by plain AdamW (compact::adamw): value, gradient and moments of one shape.
template <class T>
struct dense_parameter {
    index_t rows, cols;
    buffer<T> value, grad;  // (rows, cols)
    buffer<float> m, v;     // (rows, cols): AdamW moments
    compact::adam_counters counters{};

    dense_parameter(index_t r, index_t c)
        : rows(r), cols(c), value(make_buffer<T>(memory_category::weights, count(r, c))),
          grad(make_buffer<T>(memory_category::gradients, count(r, c))),
          m(make_buffer<float>(memory_category::optimizer_state, count(r, c))),
          v(make_buffer<float>(memory_category::optimizer_state, count(r, c)))
    {
    }
    static std::size_t count(index_t r, index_t c) { return static_cast<std::size_t>(r * c); }
    mat<T> w() { return {value.data(), rows, cols}; }
    mat<T> g() { return {grad.data(), rows, cols}; }
    cmat<T> w() const { return {value.data(), rows, cols}; }

    void step(const context& ctx, const compact::adamw_params& h)
    {
        compact::adamw<cpu>::step<T, float>(ctx, h, w(), cmat<T>(grad.data(), rows, cols),
                                            mat<float>(m.data(), rows, cols), mat<float>(v.data(), rows, cols),
                                            counters);
    }
    std::size_t state_bytes() const { return compact::adamw<cpu>::state_bytes<float>(rows, cols); }
};

// Linear layers without bias that read one input X (N, n): q, k and v; gate and up; or one layer alone.
// A compact::input_group runs X once through its compressor, whose saved activation is the only thing
// the group keeps for backward; each member k has its own W_k (m_k, n), weight gradient G_k and AdamW
// moments. Outputs are side by side: Y = [X W_0^T | X W_1^T | ...] (N, sum m_k). With a rank policy the
// compressor is the random projection: Z = X P (N, r), G_k = dY_k^T Z (m_k, r) and subspace AdamW built
// from the group's projection (rank::full: P = I and r = n, Z a copy of X, exact gradients, plain
// AdamW). With any other compressor (a quantized store, VeLoRA, WTA-CRS) G_k is the full (m_k, n)
// gradient the compressor estimates and the optimizer plain AdamW: compact::compressed_adamw picks. The
// projection is redrawn every `resample.gap` updates: forward takes the completed updates (step), and
// each gradient records the epoch of the P that compressed it, which the optimizer then applies.
template <class T, class Policy>
class linear_group {
public:
    using group_type = compact::input_group<T, Policy, cpu>;
    using compressor_type = typename group_type::compressor_type;
    using saved_type = typename group_type::saved_type; // the caller's bytes, and what forward wrote there
    using optimizer_type = compact::compressed_adamw<compressor_type, float>;

    linear_group(index_t in, const std::vector<index_t>& outs, std::uint64_t seed, std::uint64_t id,
                 const Policy& policy, compact::moment_policy moments, compact::resampling resample)
        : group_(compact::in_features{in}, outs, seed, id, policy, compact::distribution::gaussian, resample)
    {
        index_t offset = 0;
        for (index_t m : outs) {
            members_.emplace_back(m, offset, in, group_.rank(), group_.compressor(), moments);
            offset += m;
        }
    }

    index_t in() const { return group_.in(); }
    index_t out() const { return members_.back().offset + members_.back().out; }
    /// Columns of each weight gradient: r for the projection, n for every other compressor.
    index_t rank() const { return group_.rank(); }
    std::size_t size() const { return members_.size(); }
    mat<T> weight(std::size_t k) { return members_[k].w(); }
    cmat<T> gradient(std::size_t k) const { return members_[k].grads.weight; }

    /// Bytes kept for backward for N rows: one saved activation for the whole group (the library's query).
    std::size_t saved_bytes(index_t rows) const { return group_.saved_bytes(rows); }
    /// Bytes the compressor keeps between steps for batches of up to N rows (VeLoRA's direction, WTA-CRS's
    /// row norms; 0 for the others).
    std::size_t compressor_state_bytes(index_t rows) const { return group_.state_bytes(rows); }
    std::size_t workspace_bytes(index_t rows) const
    {
        std::size_t bytes = group_.workspace_bytes(rows);
        for (const auto& m : members_) bytes = std::max(bytes, m.optimizer.workspace_bytes());
        return bytes;
    }
    std::size_t state_bytes() const
    {
        std::size_t bytes = 0;
        for (const auto& m : members_) bytes += m.optimizer.state_bytes();
        return bytes;
    }
    index_t parameter_count() const { return out() * in(); }

    /// Gives the group the planned memory for what forward keeps (saved_bytes(N) bytes), and allocates
    /// and binds the compressor's own state for batches of up to N rows.
    void bind(const context& ctx, std::byte* saved, std::size_t saved_bytes, index_t rows)
    {
        saved_ = compact::bind_saved<saved_type>(saved, saved_bytes);
        state_.assign(group_.state_bytes(rows), std::byte{0});
        group_.bind_state(ctx, state_.data(), state_.size());
    }

    /// Y (N, sum m_k) from X (N, n); in training, also the compressor's record of X for backward, keyed
    /// by `step` (the completed updates).
    void forward(const context& ctx, cmat<T> x, mat<T> y, bool training, std::uint64_t step, compact::workspace ws)
    {
        if (training) group_.compress(ctx, x, step, saved_, ws);
        for (std::size_t k = 0; k < members_.size(); ++k)
            group_.layer(k).forward(ctx, x, members_[k].w(), {}, columns(y, k)); // no bias
    }

    /// From dY (N, sum m_k) and what forward kept: every member's G_k, and dX = sum_k dY_k W_k (N, n),
    /// overwritten.
    void backward(const context& ctx, cmat<T> dy, mat<T> dx, compact::workspace ws)
    {
        for (std::size_t k = 0; k < members_.size(); ++k) {
            member& layer = members_[k];
            group_.layer(k).backward(ctx, columns(dy, k), layer.w(), saved_, dx, layer.grads, ws,
                                     compact::write_mode::overwrite,
                                     k == 0 ? compact::write_mode::overwrite : compact::write_mode::accumulate);
        }
    }

    /// One AdamW update of every member: subspace AdamW under the projection its gradient was computed
    /// with, or plain AdamW on the compressor's full-shape estimate.
    void step(const context& ctx, const compact::adamw_params& h, compact::workspace ws)
    {
        for (member& layer : members_)
            layer.optimizer.step(ctx, h, group_.compressor(), layer.w(), layer.grads, layer.first_moment(),
                                 layer.second_moment(), layer.counters, ws);
    }

private:
    struct member {
        member(index_t out_features, index_t column, index_t in, index_t cols, const compressor_type& compressor,
               compact::moment_policy moments)
            : out(out_features), offset(column), in_features(in), gradient_cols(cols),
              optimizer(compact::out_features{out_features}, compressor, moments),
              weight(make_buffer<T>(memory_category::weights, size(out_features, in))),
              gradient(make_buffer<T>(memory_category::gradients, size(out_features, cols))),
              m(make_buffer<float>(memory_category::optimizer_state, size(out_features, cols))),
              v(make_buffer<float>(memory_category::optimizer_state, size(out_features, cols)))
        {
            grads.weight = {gradient.data(), out, gradient_cols};
        }
        static std::size_t size(index_t rows, index_t cols) { return static_cast<std::size_t>(rows * cols); }
        mat<T> w() { return {weight.data(), out, in_features}; }
        mat<float> first_moment() { return {m.data(), out, gradient_cols}; }
        mat<float> second_moment() { return {v.data(), out, gradient_cols}; }

        index_t out, offset, in_features, gradient_cols; // m_k, first column in Y, n, r or n
        optimizer_type optimizer;
        buffer<T> weight;   // W_k (m_k, n)
        buffer<T> gradient; // G_k (m_k, r or n)
        buffer<float> m, v; // (m_k, r or n): AdamW moments
        compact::layer_gradient<T> grads; // G_k's view and the epoch backward computed it under
        compact::adam_counters counters{};
    };

    template <class V>
    auto columns(V y, std::size_t k) const
    {
        return y.block(0, members_[k].offset, y.rows, members_[k].out);
    }

    group_type group_;
    std::vector<member> members_;
    saved_type saved_{};          // over the activation plan's bytes (bind)
    buffer<std::byte> state_ = make_buffer<std::byte>(memory_category::compressor_state); // (bind)
};

// ------------------------------------------------------------------------------ compressor choices

// What one linear group compresses with, chosen at run time: the kind, and its one parameter.
struct compressor_choice {
    enum class kind { full, projection, store, velora, wta_crs };
    kind what = kind::full;
    int denominator = 1;                                        // projection: r = n / denominator
    compact::store_scheme scheme = compact::store_scheme::full_precision(); // store
    index_t subtoken = 4;                                       // velora: sub-token length s (G = n / s)
    double ratio = 0.25;                                        // wta_crs: kept rows k = ratio N
    std::string name = "full";

    bool compressed() const { return what != kind::full; }
};

// Parses one choice: full | n/2 | n/4 | n/8 | int8 | int4 | int2 | int1 | alam | velora[/S] | wta[/R]
// (intB: GACT-style B-bit group quantization, groups of 256; alam: ALAM's average quantization; velora/S:
// sub-tokens of S values, default 4; wta/R: WTA-CRS keeping R N rows, default 0.25).
compressor_choice parse_choice(const std::string& text)
{
    compressor_choice c;
    c.name = text;
    auto parameter = [&](const std::string& prefix) -> std::string {
        if (text.size() == prefix.size()) return "";
        if (text[prefix.size()] != '/') throw std::invalid_argument("unknown compressor '" + text + "'");
        return text.substr(prefix.size() + 1);
    };
    auto number = [&](const std::string& v) {
        char* end = nullptr;
        const double x = std::strtod(v.c_str(), &end);
        if (v.empty() || *end != '\0' || !std::isfinite(x) || x <= 0)
            throw std::invalid_argument("compressor '" + text + "': '" + v + "' is not a positive number");
        return x;
    };
    if (text == "full") {
        c.what = compressor_choice::kind::full;
    } else if (text == "n/2" || text == "n/4" || text == "n/8") {
        c.what = compressor_choice::kind::projection;
        c.denominator = text[2] - '0';
    } else if (text == "int8" || text == "int4" || text == "int2" || text == "int1") {
        c.what = compressor_choice::kind::store;
        c.scheme = compact::store_scheme::quantized(text[3] - '0', 256);
    } else if (text == "alam") {
        c.what = compressor_choice::kind::store;
        c.scheme = compact::store_scheme::average(128);
    } else if (text.rfind("velora", 0) == 0) {
        c.what = compressor_choice::kind::velora;
        const std::string v = parameter("velora");
        if (!v.empty()) {
            const double s = number(v);
            if (s != std::floor(s)) throw std::invalid_argument("compressor '" + text + "': S must be an integer");
            c.subtoken = static_cast<index_t>(s);
        }
        c.name = "velora/" + std::to_string(c.subtoken);
    } else if (text.rfind("wta", 0) == 0) {
        c.what = compressor_choice::kind::wta_crs;
        const std::string v = parameter("wta");
        if (!v.empty()) c.ratio = number(v);
        if (c.ratio > 1) throw std::invalid_argument("compressor '" + text + "': R must be in (0, 1]");
        char name[32];
        std::snprintf(name, sizeof name, "wta/%g", c.ratio);
        c.name = name;
    } else {
        throw std::invalid_argument("unknown compressor '" + text +
                                    "' (full, n/2, n/4, n/8, int8, int4, int2, int1, alam, velora[/S], wta[/R])");
    }
    return c;
}

// A scheme for one of the tensors the program itself keeps for backward: full (the values), int8, int4,
// int2, int1 (group quantization with stochastic rounding, groups of 256) or alam (average quantization).
compact::store_scheme parse_scheme(const std::string& text, const std::string& what)
{
    if (text == "full") return compact::store_scheme::full_precision();
    if (text == "int8" || text == "int4" || text == "int2" || text == "int1")
        return compact::store_scheme::quantized(text[3] - '0', 256);
    if (text == "alam") return compact::store_scheme::average(128);
    throw std::invalid_argument(what + "=" + text + ": expected full, int8, int4, int2, int1 or alam");
}

// What one configuration compresses: each kind of linear group's compressor, and how the program keeps
// the tensors that are not linear inputs. `stores`: Q, K, V for attention's backward (attn), the SwiGLU
// pre-activations (mlp), the RMSNorm inputs (norm: the residual stream at each norm) through
// compact::activation_store, or kept whole (nullopt). `recompute_head`: the tied head's input is
// recomputed in backward from the final norm's input instead of kept.
struct compression_plan {
    compressor_choice qkv, attn_out, gate_up, down;
    std::optional<compact::store_scheme> attn, mlp, norm;
    bool recompute_head = false;
    double bits = 0; // > 0: GACT's allocator picks the stores' schemes, per kind, under this average
    std::string name = "full";

    const compressor_choice& operator[](int k) const
    {
        const compressor_choice* all[4] = {&qkv, &attn_out, &gate_up, &down};
        return *all[k];
    }
    compressor_choice& operator[](int k) { return const_cast<compressor_choice&>(std::as_const(*this)[k]); }
};

constexpr const char* group_names[4] = {"qkv", "out", "gate_up", "down"};

// A plan from `C` (qkv, gate_up and down use compressor C; the attention output stays uncompressed as in
// the paper, unless `attn_out`) or from a list of KEY=VALUE items: qkv, out, gate_up, down = a compressor
// for that group; linear = one for qkv, gate_up and down; attn, mlp, norm = a store scheme for those
// tensors; head = recompute or keep; bits = B: GACT's allocator re-picks the schemes of the stored kinds
// (attn, mlp, norm: one scheme per kind) under an average of B bits per value, at the first step and at
// 10% of the steps, from sensitivities probed on the batch of that step (three reruns per kind; their
// time counts). Groups and tensors not named stay uncompressed. Example:
// linear=n/4,attn=int8,mlp=int4,norm=int8,head=recompute.
compression_plan parse_plan(const std::string& text, bool attn_out)
{
    compression_plan plan;
    plan.name = text;
    if (text.find('=') == std::string::npos) {
        const compressor_choice c = parse_choice(text);
        plan.qkv = plan.gate_up = plan.down = c;
        if (attn_out) plan.attn_out = c;
        return plan;
    }
    std::stringstream list(text);
    std::string item;
    while (std::getline(list, item, ',')) {
        const auto eq = item.find('=');
        if (eq == std::string::npos) throw std::invalid_argument("'" + item + "' in '" + text + "' is not KEY=VALUE");
        const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
        int k = 0;
        while (k < 4 && key != group_names[k]) ++k;
        if (k < 4) {
            plan[k] = parse_choice(value);
        } else if (key == "linear") {
            plan.qkv = plan.gate_up = plan.down = parse_choice(value);
            if (attn_out) plan.attn_out = plan.qkv;
        } else if (key == "attn") {
            plan.attn = parse_scheme(value, key);
        } else if (key == "mlp") {
            plan.mlp = parse_scheme(value, key);
        } else if (key == "norm") {
            plan.norm = parse_scheme(value, key);
        } else if (key == "bits") {
            char* end = nullptr;
            plan.bits = std::strtod(value.c_str(), &end);
            if (value.empty() || *end != '\0' || !(plan.bits >= 0.5 && plan.bits <= 32))
                throw std::invalid_argument("bits=" + value + ": expected an average width in [0.5, 32]");
        } else if (key == "head") {
            if (value != "recompute" && value != "keep")
                throw std::invalid_argument("head=" + value + ": expected recompute or keep");
            plan.recompute_head = value == "recompute";
        } else {
            throw std::invalid_argument("unknown key '" + key + "' in '" + text +
                                        "' (qkv, out, gate_up, down, linear, attn, mlp, norm, head, bits)");
        }
    }
    if (plan.bits > 0 && !plan.attn && !plan.mlp && !plan.norm)
        throw std::invalid_argument("'" + text + "': bits= allocates the stores' bits, but attn, mlp and norm keep "
                                    "their tensors whole (name at least one)");
    return plan;
}

// One linear group of any of the compressors above: each alternative is a linear_group of one compressor
// type; the model calls through the same interface whichever it holds.
template <class T>
class any_linear_group {
public:
    any_linear_group(index_t in, const std::vector<index_t>& outs, std::uint64_t seed, std::uint64_t id,
                     const compressor_choice& c, compact::moment_policy moments, compact::resampling resample)
        : group_(make(in, outs, seed, id, c, moments, resample)), choice_(c)
    {
    }

    const compressor_choice& choice() const { return choice_; }
    index_t in() const { return visit([](const auto& g) { return g.in(); }); }
    index_t rank() const { return visit([](const auto& g) { return g.rank(); }); }
    bool compressed() const { return choice_.compressed(); }
    std::size_t size() const { return visit([](const auto& g) { return g.size(); }); }
    mat<T> weight(std::size_t k) { return visit([k](auto& g) { return g.weight(k); }); }
    cmat<T> gradient(std::size_t k) const { return visit([k](const auto& g) { return g.gradient(k); }); }
    std::size_t saved_bytes(index_t rows) const { return visit([rows](const auto& g) { return g.saved_bytes(rows); }); }
    std::size_t compressor_state_bytes(index_t rows) const
    {
        return visit([rows](const auto& g) { return g.compressor_state_bytes(rows); });
    }
    std::size_t workspace_bytes(index_t rows) const
    {
        return visit([rows](const auto& g) { return g.workspace_bytes(rows); });
    }
    std::size_t state_bytes() const { return visit([](const auto& g) { return g.state_bytes(); }); }
    index_t parameter_count() const { return visit([](const auto& g) { return g.parameter_count(); }); }

    void bind(const context& ctx, std::byte* saved, std::size_t bytes, index_t rows)
    {
        visit([&](auto& g) { g.bind(ctx, saved, bytes, rows); });
    }
    void forward(const context& ctx, cmat<T> x, mat<T> y, bool training, std::uint64_t step, compact::workspace ws)
    {
        visit([&](auto& g) { g.forward(ctx, x, y, training, step, ws); });
    }
    void backward(const context& ctx, cmat<T> dy, mat<T> dx, compact::workspace ws)
    {
        visit([&](auto& g) { g.backward(ctx, dy, dx, ws); });
    }
    void step(const context& ctx, const compact::adamw_params& h, compact::workspace ws)
    {
        visit([&](auto& g) { g.step(ctx, h, ws); });
    }

private:
    using variant = std::variant<linear_group<T, compact::rank::full>, linear_group<T, compact::rank::ratio<1, 2>>,
                                 linear_group<T, compact::rank::ratio<1, 4>>, linear_group<T, compact::rank::ratio<1, 8>>,
                                 linear_group<T, compact::quantized>, linear_group<T, compact::velora>,
                                 linear_group<T, compact::wta_crs>>;

    template <class F>
    decltype(auto) visit(F&& f) { return std::visit(std::forward<F>(f), group_); }
    template <class F>
    decltype(auto) visit(F&& f) const { return std::visit(std::forward<F>(f), group_); }

    static variant make(index_t in, const std::vector<index_t>& outs, std::uint64_t seed, std::uint64_t id,
                        const compressor_choice& c, compact::moment_policy moments, compact::resampling resample)
    {
        using kind = compressor_choice::kind;
        auto group = [&](auto policy) {
            return variant(std::in_place_type<linear_group<T, decltype(policy)>>, in, outs, seed, id, policy, moments,
                           resample);
        };
        switch (c.what) {
        case kind::full: return group(compact::rank::full{});
        case kind::projection:
            if (c.denominator == 2) return group(compact::rank::ratio<1, 2>{});
            if (c.denominator == 4) return group(compact::rank::ratio<1, 4>{});
            return group(compact::rank::ratio<1, 8>{});
        case kind::store: return group(compact::quantized{c.scheme});
        case kind::velora:
            if (in % c.subtoken != 0)
                throw std::invalid_argument("velora/" + std::to_string(c.subtoken) + ": the sub-token length must divide "
                                            "the group's input width n=" + std::to_string(in));
            return group(compact::velora{in / c.subtoken});
        case kind::wta_crs: return group(compact::wta_crs{c.ratio});
        }
        throw std::logic_error("compressor_choice: unknown kind");
    }

    variant group_;
    compressor_choice choice_;
};

// -------------------------------------------------------------------------------------------- model

struct model_config {
    index_t vocab = 0;       // V: distinct characters
    index_t context = 128;   // T: tokens per sequence
    index_t channels = 128;  // C
    index_t layers = 4;      // L
    index_t heads = 4;       // H; head size C / H
    index_t hidden = 344;    // F: SwiGLU width, about 8 C / 3
    index_t batch = 32;      // B: sequences per step
    index_t rows() const { return batch * context; } // N: rows of every activation
};

// What the activation plan and the optimizer keep, in bytes, for one training step of N = B T rows.
struct memory_report {
    std::size_t saved_program = 0;        // kept for backward by this program's own code, whole
    std::size_t saved_stores = 0;         // kept for backward by this program's own code, through stores
    std::size_t saved_stores_x = 0;       // what those tensors would take whole
    std::size_t saved_compressed = 0;     // Z of the compressed groups (saved_bytes queries)
    std::size_t saved_compressed_x = 0;   // what those groups would keep uncompressed: N n per group
    std::size_t saved_uncompressed = 0;   // Z = X of the groups with P = I (saved_bytes queries)
    std::size_t scratch = 0;              // reused within a step, not kept between forward and backward
    std::size_t parameters = 0;           // weights
    std::size_t optimizer = 0;            // AdamW moments, full-shape and subspace
    std::size_t compressor_state = 0;     // kept by compressors between steps (VeLoRA's v, WTA-CRS's norms)
    std::size_t saved() const { return saved_program + saved_stores + saved_compressed + saved_uncompressed; }
};

// A scalar parameter tensor seen as flat values with its gradient (the gradient check walks these).
template <class T>
struct parameter_ref {
    std::string name;
    T* value;
    const T* grad;
    index_t count;
};

template <class T>
class transformer {
public:
    struct block {
        dense_parameter<T> norm1, norm2;      // (1, C) RMSNorm gains
        any_linear_group<T> qkv;              // W_q, W_k, W_v (C, C): one input, one saved activation
        any_linear_group<T> attn_out;         // W_o (C, C)
        any_linear_group<T> gate_up;          // W_gate, W_up (F, C): one input, one saved activation
        any_linear_group<T> down;             // W_down (C, F)
    };

    /// `plan`: each kind of group's compressor. `resample`: projections are redrawn every resample.gap
    /// updates (0: one P for the run).
    transformer(const model_config& cfg, const compression_plan& plan, std::uint64_t seed,
                compact::moment_policy moments, compact::resampling resample, int threads)
        : cfg_(cfg), plan_(plan), token_embedding_(cfg.vocab, cfg.channels),
          position_embedding_(cfg.context, cfg.channels), final_norm_(1, cfg.channels)
    {
        const index_t c = cfg.channels, f = cfg.hidden;
        if (cfg.vocab < 2 || c < 1 || cfg.layers < 1 || cfg.heads < 1 || c % cfg.heads != 0 || f < 1 ||
            cfg.context < 1 || cfg.batch < 1)
            throw std::invalid_argument("model shape: need V >= 2 and C divisible by H, everything positive (C=" +
                                        std::to_string(c) + ", H=" + std::to_string(cfg.heads) + ")");
        for (index_t l = 0; l < cfg.layers; ++l) {
            // Projection ids: one per group, unique in the run (SPEC section 1).
            const auto id = static_cast<std::uint64_t>(4 * l);
            blocks_.push_back(block{dense_parameter<T>(1, c), dense_parameter<T>(1, c),
                                    any_linear_group<T>(c, {c, c, c}, seed, id + 1, plan.qkv, moments, resample),
                                    any_linear_group<T>(c, {c}, seed, id + 2, plan.attn_out, moments, resample),
                                    any_linear_group<T>(c, {f, f}, seed, id + 3, plan.gate_up, moments, resample),
                                    any_linear_group<T>(f, {c}, seed, id + 4, plan.down, moments, resample)});
        }
        seed_ = seed;
        initialise(seed);
        threads_ = cpu::thread_count(context{threads});
        plan_activations(context{threads});
        std::size_t ws = 0;
        const index_t n = cfg.rows();
        for (auto& b : blocks_)
            ws = std::max({ws, b.qkv.workspace_bytes(n), b.attn_out.workspace_bytes(n), b.gate_up.workspace_bytes(n),
                           b.down.workspace_bytes(n)});
        workspace_.assign(ws, std::byte{0});
    }

    const model_config& config() const { return cfg_; }
    const memory_report& memory() const { return memory_; }

    /// Registers each stored kind's settings (one scheme for all its tensors) with a bit allocator, with
    /// the values the kind holds per step.
    void register_stores(compact::bit_allocator& allocator)
    {
        index_t values[stored_kinds] = {};
        for_each_stored([&](const stored_tensor& t) { values[t.kind] += cfg_.rows() * t.cols; });
        for (int k = 0; k < stored_kinds; ++k)
            if (values[k] > 0) allocator.add(kinds_[k], values[k]);
    }

    /// Lays the stores' encodings out one after another in the codes buffer, each with room for its
    /// kind's current scheme, or for `at_least` if that needs more (a bit allocator's 8-bit probes).
    /// Called after planning and around every bit allocation.
    void carve_codes(const std::optional<compact::store_scheme>& at_least = std::nullopt)
    {
        const index_t n = cfg_.rows();
        auto bytes_of = [&](const stored_tensor& t) {
            const std::size_t b = compact::stored_bytes<T>(kinds_[t.kind].scheme, n * t.cols);
            return at_least ? std::max(b, compact::stored_bytes<T>(*at_least, n * t.cols)) : b;
        };
        auto floats = [](std::size_t bytes) { return (bytes + sizeof(T) - 1) / sizeof(T) / 16 * 16 + 16; };
        std::size_t total = 0;
        for_each_stored([&](const stored_tensor& t) { total += floats(bytes_of(t)); });
        acts_.codes.clear(), acts_.codes.shrink_to_fit(); // released before the new size is taken
        acts_.codes.assign(total, T(0));
        memory_.saved_stores = memory_.saved_stores_x = 0;
        std::size_t used = 0;
        for_each_stored([&](stored_tensor& t) {
            const std::size_t bytes = bytes_of(t);
            t.saved = compact::saved_tensor(reinterpret_cast<std::byte*>(acts_.codes.data() + used), bytes);
            used += floats(bytes);
            t.store->settings() = kinds_[t.kind];
            memory_.saved_stores += t.store->saved_bytes(n, t.cols);
            memory_.saved_stores_x += static_cast<std::size_t>(n * t.cols) * sizeof(T);
        });
    }

    /// Every gradient of the last backward, in a fixed order (a bit allocator's probe).
    void add_gradients(compact::gradient_probe& probe) const
    {
        auto dense = [&](const dense_parameter<T>& p) { probe.add(p.grad.data(), p.grad.size()); };
        auto linear = [&](const auto& g) {
            for (std::size_t k = 0; k < g.size(); ++k) probe.add(g.gradient(k));
        };
        dense(token_embedding_), dense(position_embedding_), dense(final_norm_);
        for (const auto& b : blocks_) {
            dense(b.norm1), dense(b.norm2);
            linear(b.qkv), linear(b.attn_out), linear(b.gate_up), linear(b.down);
        }
    }

    /// The stored kinds' schemes now, and the head: "attn int8/g256, mlp int4/g256, ..." or "whole".
    std::string stores_now() const
    {
        std::string s;
        const std::optional<compact::store_scheme>* planned[stored_kinds] = {&plan_.norm, &plan_.attn, &plan_.mlp};
        for (int k : {attn_kind, mlp_kind, norm_kind})
            if (*planned[k])
                s += (s.empty() ? "" : ", ") + std::string(kind_names[k]) + " " + compact::to_string(kinds_[k].scheme);
        if (plan_.bits > 0) {
            char budget[32];
            std::snprintf(budget, sizeof budget, " (GACT, %g bits)", plan_.bits);
            s += budget;
        }
        if (plan_.recompute_head) s += (s.empty() ? "" : ", ") + std::string("head recomputed");
        return s.empty() ? "whole" : s;
    }
    const block& layer(index_t l) const { return blocks_[static_cast<std::size_t>(l)]; }

    index_t parameter_count() const
    {
        index_t count = (cfg_.vocab + cfg_.context + 1) * cfg_.channels;
        for (const auto& b : blocks_)
            count += 2 * cfg_.channels + b.qkv.parameter_count() + b.attn_out.parameter_count() +
                     b.gate_up.parameter_count() + b.down.parameter_count();
        return count;
    }

    /// Forward over `batch` sequences of `length` tokens (N = batch length rows, at most B T). With
    /// targets, returns the mean cross-entropy and leaves its gradient for backward(); without, leaves
    /// the logits (logits()). `training` keeps each linear group's Z, with the projections of the epoch
    /// that `step` completed updates fall in.
    double forward(const context& ctx, const int* tokens, const int* targets, index_t batch, index_t length,
                   bool training, std::uint64_t step)
    {
        const index_t n = batch * length;
        if (length < 1 || length > cfg_.context || n > cfg_.rows())
            throw std::invalid_argument("forward: " + std::to_string(batch) + " sequences of " +
                                        std::to_string(length) + " tokens do not fit the planned B=" +
                                        std::to_string(cfg_.batch) + ", T=" + std::to_string(cfg_.context));
        batch_ = batch, length_ = length;
        const auto rows = [n](mat<T> m) { return m.row_block(0, n); };
        activations& a = acts_;

        // In training, a tensor kept through a store is encoded as soon as it is complete: its memory is
        // scratch that the next block overwrites (the residual stream's two buffers, Q K V, gate/up).
        const auto keep = [&](stored_tensor& t, mat<T> x) {
            if (!training || !t.store) return;
            t.store->settings() = kinds_[t.kind]; // the kind's scheme (a bit allocator may change it)
            t.store->compress(ctx, x, step, t.saved);
        };
        embed(tokens, rows(a.residual[0]));
        for (std::size_t l = 0; l < blocks_.size(); ++l) {
            block& b = blocks_[l];
            keep(a.stored_residual[l], rows(a.residual[l]));
            rmsnorm_forward<T>(ctx, rows(a.residual[l]), b.norm1.value.data(), rows(a.normed), a.rstd1[l].data);
            b.qkv.forward(ctx, rows(a.normed), rows(a.qkv[l]), training, step, ws());
            attention_forward<T>(ctx, rows(a.qkv[l]), batch, length, cfg_.heads, rows(a.attn), rows(a.lse[l]),
                                 a.scores);
            keep(a.stored_qkv[l], rows(a.qkv[l]));
            b.attn_out.forward(ctx, rows(a.attn), rows(a.proj), training, step, ws());
            add<T>(ctx, rows(a.residual[l]), rows(a.proj), rows(a.mid[l]));
            keep(a.stored_mid[l], rows(a.mid[l]));
            rmsnorm_forward<T>(ctx, rows(a.mid[l]), b.norm2.value.data(), rows(a.normed), a.rstd2[l].data);
            b.gate_up.forward(ctx, rows(a.normed), rows(a.gate_up[l]), training, step, ws());
            swiglu_forward<T>(ctx, rows(a.gate_up[l]), rows(a.act));
            keep(a.stored_gate_up[l], rows(a.gate_up[l]));
            b.down.forward(ctx, rows(a.act), rows(a.proj), training, step, ws());
            add<T>(ctx, rows(a.mid[l]), rows(a.proj), rows(a.residual[l + 1]));
        }
        keep(a.stored_residual.back(), rows(a.residual.back()));
        // Hf: kept, or (head=recompute) written into `normed`, forward's scratch, free after the last block.
        const mat<T> head_in = rows(plan_.recompute_head ? a.normed : a.final_normed);
        rmsnorm_forward<T>(ctx, rows(a.residual.back()), final_norm_.value.data(), head_in, a.final_rstd.data);
        cpu::gemm<T>(ctx, op::none, op::transpose, 1.0, head_in, token_embedding_.w(), 0.0,
                     rows(a.logits)); // logits = Hf E^T (N, V)
        if (!targets) return 0.0;
        return cross_entropy<T>(ctx, rows(a.logits), targets, row_loss_.data());
    }

    /// The logits (N, V) of the last forward without targets.
    cmat<T> logits() const { return acts_.logits.row_block(0, batch_ * length_); }

    /// Gradients of the last forward's loss: full-shape for embeddings and norms, G_k for linear layers.
    void backward(const context& ctx, const int* tokens)
    {
        const index_t n = batch_ * length_;
        const auto rows = [n](mat<T> m) { return m.row_block(0, n); };
        activations& a = acts_;
        // The tensor forward kept: `kept` itself, or, kept through a store, its approximation decoded into
        // the restore buffer just before backward reads it (the buffer serves one tensor at a time).
        const auto bring_back = [&](const stored_tensor& t, mat<T> kept) {
            if (!t.store) return rows(kept);
            const mat<T> x(a.restored.data, n, kept.cols);
            t.store->restore(ctx, t.saved, x);
            return x;
        };

        const mat<T> x_final = bring_back(a.stored_residual.back(), a.residual.back());
        // head=recompute: Hf = RMSNorm(X_L) gf, as forward computed it, into d_attn (backward's scratch,
        // not written before the last block's backward).
        const mat<T> head_in = rows(plan_.recompute_head ? a.d_attn : a.final_normed);
        if (plan_.recompute_head)
            rmsnorm_forward<T>(ctx, x_final, final_norm_.value.data(), head_in, a.final_rstd.data);
        // Head (tied): dHf = dlogits E (N, C); dE = dlogits^T Hf (V, C), overwritten here, and the
        // embedding's own gradient is added at the end.
        cpu::gemm<T>(ctx, op::none, op::none, 1.0, rows(a.logits), token_embedding_.w(), 0.0, rows(a.d_normed));
        cpu::gemm<T>(ctx, op::transpose, op::none, 1.0, rows(a.logits), head_in, 0.0,
                     token_embedding_.g());
        rmsnorm_backward<T>(ctx, x_final, a.final_rstd.data, final_norm_.value.data(), rows(a.d_normed),
                            rows(a.d_stream), false, final_norm_.grad.data());
        for (std::size_t l = blocks_.size(); l-- > 0;) {
            block& b = blocks_[l];
            // d_stream holds dL/d(residual[l + 1]).
            b.down.backward(ctx, rows(a.d_stream), rows(a.d_act), ws());
            // SwiGLU's backward writes d(gate_up) over gate_up, its last reader.
            const mat<T> gate_up = bring_back(a.stored_gate_up[l], a.gate_up[l]);
            swiglu_backward<T>(ctx, gate_up, rows(a.d_act), gate_up);
            b.gate_up.backward(ctx, gate_up, rows(a.d_normed), ws());
            const mat<T> mid = bring_back(a.stored_mid[l], a.mid[l]);
            rmsnorm_backward<T>(ctx, mid, a.rstd2[l].data, b.norm2.value.data(), rows(a.d_normed), rows(a.d_stream),
                                true, b.norm2.grad.data());
            // d_stream now holds dL/d(mid[l]).
            b.attn_out.backward(ctx, rows(a.d_stream), rows(a.d_attn), ws());
            const mat<T> qkv = bring_back(a.stored_qkv[l], a.qkv[l]);
            attention_backward<T>(ctx, qkv, rows(a.lse[l]), rows(a.d_attn), batch_, length_, cfg_.heads,
                                  rows(a.d_qkv), a.scores, a.d_scores);
            b.qkv.backward(ctx, rows(a.d_qkv), rows(a.d_normed), ws());
            const mat<T> x = bring_back(a.stored_residual[l], a.residual[l]);
            rmsnorm_backward<T>(ctx, x, a.rstd1[l].data, b.norm1.value.data(), rows(a.d_normed), rows(a.d_stream),
                                true, b.norm1.grad.data());
        }
        embed_backward(tokens, rows(a.d_stream));
    }

    /// One optimizer update: plain AdamW with `dense` for embeddings and gains; for each linear group,
    /// subspace AdamW with `compressed` if it is compressed, else with `uncompressed`.
    void step(const context& ctx, const compact::adamw_params& dense, const compact::adamw_params& uncompressed,
              const compact::adamw_params& compressed)
    {
        token_embedding_.step(ctx, dense);
        position_embedding_.step(ctx, dense);
        final_norm_.step(ctx, dense);
        auto linear = [&](auto& group) {
            group.step(ctx, group.compressed() ? compressed : uncompressed, ws());
        };
        for (auto& b : blocks_) {
            b.norm1.step(ctx, dense);
            b.norm2.step(ctx, dense);
            linear(b.qkv);
            linear(b.attn_out);
            linear(b.gate_up);
            linear(b.down);
        }
    }

    /// Every parameter with its gradient, for the gradient check (linear gradients are full-shape only
    /// when P = I).
    std::vector<parameter_ref<T>> parameters()
    {
        std::vector<parameter_ref<T>> out;
        auto dense = [&](std::string name, dense_parameter<T>& p) {
            out.push_back({std::move(name), p.value.data(), p.grad.data(), p.rows * p.cols});
        };
        auto linear = [&](const std::string& name, auto& group) {
            if (group.compressed()) throw std::logic_error("parameters(): " + name + " is compressed");
            for (std::size_t k = 0; k < group.size(); ++k)
                out.push_back({name + "." + std::to_string(k), group.weight(k).data, group.gradient(k).data,
                               group.weight(k).size()});
        };
        dense("token_embedding", token_embedding_);
        dense("position_embedding", position_embedding_);
        for (std::size_t l = 0; l < blocks_.size(); ++l) {
            const std::string p = "block" + std::to_string(l) + ".";
            dense(p + "norm1", blocks_[l].norm1);
            linear(p + "qkv", blocks_[l].qkv);
            linear(p + "attn_out", blocks_[l].attn_out);
            dense(p + "norm2", blocks_[l].norm2);
            linear(p + "gate_up", blocks_[l].gate_up);
            linear(p + "down", blocks_[l].down);
        }
        dense("final_norm", final_norm_);
        return out;
    }

private:
    // A tensor the program keeps for backward through an activation store (when `store` is set): forward
    // encodes it into `saved`, backward decodes it into the tensor's scratch.
    struct stored_tensor {
        std::optional<compact::activation_store<T, cpu>> store;
        compact::saved_tensor saved;
        index_t cols = 0;
        int kind = 0; // the index into kinds_ of its settings
    };
    // The stored kinds, each with one scheme for all its tensors: norm inputs, Q K V, SwiGLU's gate/up.
    enum stored_kind { norm_kind, attn_kind, mlp_kind, stored_kinds };
    static constexpr const char* kind_names[stored_kinds] = {"norm", "attn", "mlp"};

    template <class F>
    void for_each_stored(F&& f)
    {
        for (auto* list : {&acts_.stored_residual, &acts_.stored_mid, &acts_.stored_qkv, &acts_.stored_gate_up})
            for (stored_tensor& t : *list)
                if (t.store) f(t);
    }

    // Everything the forward pass keeps for backward, and the scratch reused within a step; N = B T.
    // With the plan's stores, residual, mid, qkv and gate_up hold one scratch buffer each, aliased by every
    // layer, the stored_* records keep their encodings, and backward decodes each into `restored`;
    // head=recompute keeps no final_normed (forward writes Hf into normed, backward recomputes it into
    // d_attn). Scratch that only forward uses and scratch that only backward uses share memory (see
    // plan_activations).
    struct activations {
        // Kept for backward by this program (vectors hold one per layer l < L unless noted).
        std::vector<mat<T>> residual;   // L + 1 of (N, C): the stream entering block l; [L] the final norm's input
        std::vector<mat<T>> rstd1;      // (N, 1): 1 / rms of residual[l]
        std::vector<mat<T>> qkv;        // (N, 3C): [Q | K | V]
        std::vector<mat<T>> lse;        // (N, H): log-sum-exp of each attention score row
        std::vector<mat<T>> mid;        // (N, C): the stream after attention
        std::vector<mat<T>> rstd2;      // (N, 1): 1 / rms of mid[l]
        std::vector<mat<T>> gate_up;    // (N, 2F): [gate | up], SwiGLU's pre-activations
        mat<T> final_rstd;              // (N, 1)
        mat<T> final_normed;            // (N, C): the tied head's input (empty with head=recompute)
        mat<T> logits;                  // (N, V): logits, then their gradient after the loss
        std::vector<stored_tensor> stored_residual, stored_mid, stored_qkv, stored_gate_up; // as above, L + 1 or L
        // Kept for backward by the library: each linear group's saved activation (Z = X P (N, r) for the
        // projection, Z = X with P = I; codes and metadata for a store; ...), bound to its group.
        // Scratch, reused by every block.
        mat<T> normed;                  // (N, C): a norm's output, the input of qkv or gate-up
        mat<T> attn;                    // (N, C): attention output, the input of attn-out
        mat<T> act;                     // (N, F): SwiGLU output, the input of down
        mat<T> proj;                    // (N, C): attn-out or down output, before the residual add
        mat<T> d_stream;                // (N, C): gradient of the residual stream
        mat<T> d_normed;                // (N, C)
        mat<T> d_attn;                  // (N, C)
        mat<T> d_qkv;                   // (N, 3C)
        mat<T> d_act;                   // (N, F); d(gate_up) is written over gate_up
        mat<T> restored;                // (N, the widest stored tensor): a stored tensor decoded for backward
        mat<T> scores;                  // (threads T, T): a (T, T) score block per thread
        mat<T> d_scores;                // (threads T, T)
        buffer<T> kept = make_buffer<T>(memory_category::saved);       // all that is kept for backward...
        buffer<T> codes = make_buffer<T>(memory_category::saved);      // ...but the stores' encodings
        buffer<T> scratch = make_buffer<T>(memory_category::scratch);  // all the scratch
    };

    // The activation plan: two allocations (kept, scratch), carved in two passes (count, then assign),
    // with the bytes of every kept tensor counted on the way. The Z sizes are the library's saved_bytes
    // answers. Scratch has three regions: one for tensors both passes use, and one each for the tensors
    // only forward uses and only backward uses, which start at the same address (forward's scratch is
    // dead once backward begins, and backward's is written before it is read), so the scratch is the
    // shared region plus the larger of the other two.
    void plan_activations(const context& ctx)
    {
        const index_t n = cfg_.rows(), c = cfg_.channels, f = cfg_.hidden, layers = cfg_.layers;
        activations& a = acts_;
        enum region { kept_region, both_region, forward_region, backward_region, regions };
        std::size_t both_size = 0; // the shared scratch region, from the first pass
        const std::optional<compact::store_scheme> planned[stored_kinds] = {plan_.norm, plan_.attn, plan_.mlp};
        for (int k = 0; k < stored_kinds; ++k)
            if (planned[k]) kinds_[k] = compact::store_settings{*planned[k], 0};
        for (int pass = 0; pass < 2; ++pass) {
            std::size_t used[regions] = {};
            memory_ = memory_report{};
            auto take = [&](index_t rows, index_t cols, region r) {
                T* base = nullptr;
                if (pass == 1)
                    base = r == kept_region ? a.kept.data()
                         : r == both_region ? a.scratch.data()
                                            : a.scratch.data() + both_size;
                const auto count = static_cast<std::size_t>(rows * cols);
                const mat<T> v(base ? base + used[r] : nullptr, rows, cols);
                used[r] += (count + 15) / 16 * 16; // keeps every tensor 64-byte aligned in float
                return v;
            };
            // Kept whole by this program's own code.
            auto keep_whole = [&](index_t rows, index_t cols) {
                memory_.saved_program += static_cast<std::size_t>(rows * cols) * sizeof(T);
                return take(rows, cols, kept_region);
            };
            // `bytes` of kept memory, rounded up to whole T for the carving.
            auto take_bytes = [&](std::size_t bytes) {
                return reinterpret_cast<std::byte*>(
                    take(static_cast<index_t>((bytes + sizeof(T) - 1) / sizeof(T)), 1, kept_region).data);
            };
            // A group's saved activation: saved_bytes(N) bytes.
            auto take_saved = [&](auto& group) {
                const std::size_t bytes = group.saved_bytes(n);
                std::byte* data = take_bytes(bytes);
                if (group.compressed()) {
                    memory_.saved_compressed += bytes;
                    memory_.saved_compressed_x += static_cast<std::size_t>(n * group.in()) * sizeof(T);
                } else {
                    memory_.saved_uncompressed += bytes;
                }
                memory_.compressor_state += group.compressor_state_bytes(n);
                if (pass == 1) group.bind(ctx, data, bytes, n);
            };
            // `count` tensors of (N, cols), kept whole, or through stores of their kind's scheme over one
            // shared forward buffer (backward decodes into `restored`; carve_codes places the encodings);
            // each store's noise has its own tensor id.
            std::uint64_t tensor_id = 1000;
            index_t widest_stored = 0;
            auto take_kept = [&](std::vector<mat<T>>& views, std::vector<stored_tensor>& records, index_t count,
                                 index_t cols, int kind) {
                views.clear(), records.clear();
                if (!planned[kind]) {
                    for (index_t l = 0; l < count; ++l) views.push_back(keep_whole(n, cols)), records.emplace_back();
                    return;
                }
                widest_stored = std::max(widest_stored, cols);
                const mat<T> shared = take(n, cols, forward_region);
                for (index_t l = 0; l < count; ++l) {
                    stored_tensor t;
                    t.store.emplace(*planned[kind], seed_, tensor_id++);
                    t.cols = cols, t.kind = kind;
                    views.push_back(shared), records.push_back(t);
                }
            };
            take_kept(a.residual, a.stored_residual, layers + 1, c, norm_kind);
            take_kept(a.mid, a.stored_mid, layers, c, norm_kind);
            take_kept(a.qkv, a.stored_qkv, layers, 3 * c, attn_kind);
            take_kept(a.gate_up, a.stored_gate_up, layers, 2 * f, mlp_kind);
            a.rstd1.clear(), a.lse.clear(), a.rstd2.clear();
            for (index_t l = 0; l < layers; ++l) {
                a.rstd1.push_back(keep_whole(n, 1));
                a.lse.push_back(keep_whole(n, cfg_.heads));
                a.rstd2.push_back(keep_whole(n, 1));
                block& b = blocks_[static_cast<std::size_t>(l)];
                take_saved(b.qkv), take_saved(b.attn_out), take_saved(b.gate_up), take_saved(b.down);
            }
            a.final_rstd = keep_whole(n, 1);
            a.final_normed = plan_.recompute_head ? mat<T>() : keep_whole(n, c);
            a.logits = keep_whole(n, cfg_.vocab);
            memory_.saved_program += static_cast<std::size_t>(n) * sizeof(int); // the token ids, for the embedding's backward
            a.scores = take(threads_ * cfg_.context, cfg_.context, both_region);
            a.normed = take(n, c, forward_region);
            a.attn = take(n, c, forward_region);
            a.act = take(n, f, forward_region);
            a.proj = take(n, c, forward_region);
            a.d_stream = take(n, c, backward_region);
            a.d_normed = take(n, c, backward_region);
            a.d_attn = take(n, c, backward_region);
            a.d_qkv = take(n, 3 * c, backward_region);
            a.d_act = take(n, f, backward_region);
            a.d_scores = take(threads_ * cfg_.context, cfg_.context, backward_region);
            a.restored = widest_stored > 0 ? take(n, widest_stored, backward_region) : mat<T>();
            const std::size_t scratch = used[both_region] + std::max(used[forward_region], used[backward_region]);
            memory_.scratch = scratch * sizeof(T);
            if (pass == 0) {
                both_size = used[both_region];
                a.kept.assign(used[kept_region], T(0)), a.scratch.assign(scratch, T(0));
            }
        }
        carve_codes();
        row_loss_.assign(static_cast<std::size_t>(n), 0.0);
        memory_.scratch += row_loss_.size() * sizeof(double);

        auto dense = [&](const dense_parameter<T>& p) {
            memory_.parameters += p.value.size() * sizeof(T);
            memory_.optimizer += p.state_bytes();
        };
        auto linear = [&](const auto& g) {
            memory_.parameters += static_cast<std::size_t>(g.parameter_count()) * sizeof(T);
            memory_.optimizer += g.state_bytes();
        };
        dense(token_embedding_), dense(position_embedding_), dense(final_norm_);
        for (const auto& b : blocks_) {
            dense(b.norm1), dense(b.norm2);
            linear(b.qkv), linear(b.attn_out), linear(b.gate_up), linear(b.down);
        }
    }

    // Uniform initial values from compact::fill_uniform, one stream per tensor. Embeddings: standard
    // deviation 0.02; linear layers: PyTorch's U(-1/sqrt(n), 1/sqrt(n)), the two that write into the
    // residual stream (attn-out, down) scaled by 1/sqrt(2L) as in GPT-2; gains 1.
    void initialise(std::uint64_t seed)
    {
        std::uint64_t stream = 1;
        const double embedding_bound = 0.02 * std::sqrt(3.0);
        compact::fill_uniform(token_embedding_.w(), -embedding_bound, embedding_bound, seed, stream++);
        compact::fill_uniform(position_embedding_.w(), -embedding_bound, embedding_bound, seed, stream++);
        auto ones = [](dense_parameter<T>& p) { std::fill(p.value.begin(), p.value.end(), T(1)); };
        ones(final_norm_);
        const double residual_scale = 1.0 / std::sqrt(2.0 * static_cast<double>(cfg_.layers));
        auto linear = [&](auto& group, double scale) {
            const double bound = scale / std::sqrt(static_cast<double>(group.in()));
            for (std::size_t k = 0; k < group.size(); ++k)
                compact::fill_uniform(group.weight(k), -bound, bound, seed, stream++);
        };
        for (auto& b : blocks_) {
            ones(b.norm1), ones(b.norm2);
            linear(b.qkv, 1.0);
            linear(b.attn_out, residual_scale);
            linear(b.gate_up, 1.0);
            linear(b.down, residual_scale);
        }
    }

    // X0 (N, C): row b T + t = E[token] + Pos[t].
    void embed(const int* tokens, mat<T> x0) const
    {
        for (index_t i = 0; i < x0.rows; ++i) {
            const T* e = token_embedding_.value.data() + tokens[i] * cfg_.channels;
            const T* p = position_embedding_.value.data() + (i % length_) * cfg_.channels;
            for (index_t j = 0; j < x0.cols; ++j) x0(i, j) = e[j] + p[j];
        }
    }

    // dE[token] += dX0 row (on top of the head's part); dPos[t] = sum over sequences. dX0: (N, C).
    void embed_backward(const int* tokens, cmat<T> dx0)
    {
        std::fill(position_embedding_.grad.begin(), position_embedding_.grad.end(), T(0));
        for (index_t i = 0; i < dx0.rows; ++i) {
            T* de = token_embedding_.grad.data() + tokens[i] * cfg_.channels;
            T* dp = position_embedding_.grad.data() + (i % length_) * cfg_.channels;
            for (index_t j = 0; j < dx0.cols; ++j) de[j] += dx0(i, j), dp[j] += dx0(i, j);
        }
    }

    compact::workspace ws() { return {workspace_.data(), workspace_.size()}; }

    model_config cfg_;
    compression_plan plan_;
    std::uint64_t seed_ = 0;                // keys the stores' rounding noise
    dense_parameter<T> token_embedding_;    // E (V, C), also the output head
    dense_parameter<T> position_embedding_; // Pos (T, C)
    dense_parameter<T> final_norm_;         // (1, C)
    std::vector<block> blocks_;
    activations acts_;
    buffer<double> row_loss_ = make_buffer<double>(memory_category::scratch); // (N): per-row losses, summed in order
    buffer<std::byte> workspace_ = make_buffer<std::byte>(memory_category::scratch); // the library's workspace
    memory_report memory_;
    compact::store_settings kinds_[stored_kinds]; // each stored kind's scheme (and a probe's noise variant)
    index_t threads_ = 1;
    index_t batch_ = 0, length_ = 0;        // of the last forward
};

// ------------------------------------------------------------------------------------------- training

struct train_settings {
    int steps = 300;
    double lr = 3e-3;
    double lr_compressed = 0; // 0: the same as lr
    double alpha = 1.0;
    double weight_decay = 0.0;
    int warmup = 100;
    std::uint64_t gap = 50;
    compact::moment_policy moments = compact::moment_policy::keep;
    int eval_every = 100;
    index_t eval_windows = 256;
    int threads = 0;
    std::uint64_t seed = 1234;
    int sample_chars = 400;
    double temperature = 0.8;
    std::string curves;
    bool memory_only = false; // build each configuration and report its memory, without training
    index_t final_windows = 0; // windows of the final evaluation (0: the whole validation split)
};

// Learning-rate multiplier: linear warm-up, then cosine decay to 0.1.
double lr_factor(int step, const train_settings& s)
{
    if (step < s.warmup) return static_cast<double>(step + 1) / static_cast<double>(s.warmup);
    const double progress = static_cast<double>(step - s.warmup) / static_cast<double>(std::max(1, s.steps - s.warmup));
    return 0.1 + 0.45 * (1.0 + std::cos(3.14159265358979323846 * std::min(1.0, progress)));
}

// Summary of one configuration's run, passed from the child process to the parent as plain bytes.
struct run_summary {
    char name[80];
    std::int64_t in[4], rank[4];    // qkv, attn-out, gate-up, down
    char compressor[4][24];         // their compressors' names
    char stores[96];                // how the program keeps its own tensors
    std::int64_t parameters;
    double initial_val_loss, train_loss, val_loss, last_batch_loss;
    double train_seconds, tokens_per_second;
    std::uint64_t saved_program, saved_stores, saved_stores_x, saved_compressed, saved_compressed_x, saved_uncompressed;
    std::uint64_t scratch;
    std::uint64_t parameter_bytes, optimizer_bytes, compressor_state_bytes;
    long peak_rss_kib;
    std::uint64_t tracked_peak;                                   // compact::memory_tracker: the total's peak
    std::uint64_t tracked_at_peak[compact::memory_category_count]; // and its make-up
    char sample[1536];
};

long peak_rss_kib()
{
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line))
        if (line.rfind("VmHWM:", 0) == 0) return std::atol(line.c_str() + 6);
    return -1;
}

// `count` window starts spread evenly over [begin, end - length - 1] (each window has length + 1 ids).
std::vector<std::size_t> spread_windows(std::size_t begin, std::size_t end, index_t length, std::size_t count)
{
    const std::size_t span = static_cast<std::size_t>(length) + 1;
    if (end < begin + span) throw std::invalid_argument("text split too short for one window of T + 1 characters");
    const std::size_t last = end - span;
    std::vector<std::size_t> starts;
    for (std::size_t k = 0; k < count; ++k)
        starts.push_back(begin + (count == 1 ? 0 : (last - begin) * k / (count - 1)));
    return starts;
}

// Inputs ids[p + t] and targets ids[p + t + 1] for each window start p. tokens, targets: (rows, length).
void fill_windows(const corpus& c, const std::size_t* starts, index_t rows, index_t length, std::vector<int>& tokens,
                  std::vector<int>& targets)
{
    for (index_t b = 0; b < rows; ++b)
        for (index_t t = 0; t < length; ++t) {
            const std::size_t p = starts[b] + static_cast<std::size_t>(t);
            tokens[static_cast<std::size_t>(b * length + t)] = c.ids[p];
            targets[static_cast<std::size_t>(b * length + t)] = c.ids[p + 1];
        }
}

// Mean loss over the windows at `starts`, in batches of at most B, without keeping Z.
template <class Model>
double evaluate(Model& model, const context& ctx, const corpus& c, const std::vector<std::size_t>& starts,
                std::vector<int>& tokens, std::vector<int>& targets)
{
    const index_t b = model.config().batch, t = model.config().context;
    double total = 0;
    for (std::size_t s = 0; s < starts.size(); s += static_cast<std::size_t>(b)) {
        const index_t rows = std::min<index_t>(b, static_cast<index_t>(starts.size() - s));
        fill_windows(c, starts.data() + s, rows, t, tokens, targets);
        total += model.forward(ctx, tokens.data(), targets.data(), rows, t, false, 0) * static_cast<double>(rows);
    }
    return total / static_cast<double>(starts.size());
}

// Temperature sampling of `count` characters after `prompt`, with a fixed seed.
template <class Model>
std::string sample_text(Model& model, const context& ctx, const corpus& c, const std::string& prompt, int count,
                        double temperature, std::uint64_t seed)
{
    std::vector<int> sequence;
    for (char ch : prompt) {
        const auto it = std::find(c.chars.begin(), c.chars.end(), static_cast<unsigned char>(ch));
        if (it != c.chars.end()) sequence.push_back(static_cast<int>(it - c.chars.begin()));
    }
    if (sequence.empty()) sequence.push_back(0);
    std::mt19937_64 rng(seed);
    std::string out = prompt;
    std::vector<double> p(static_cast<std::size_t>(c.vocab()));
    for (int i = 0; i < count; ++i) {
        const index_t length = std::min<index_t>(model.config().context, static_cast<index_t>(sequence.size()));
        model.forward(ctx, sequence.data() + sequence.size() - static_cast<std::size_t>(length), nullptr, 1, length,
                      false, 0);
        const auto* z = model.logits().row(length - 1);
        const double top = static_cast<double>(*std::max_element(z, z + c.vocab()));
        double sum = 0;
        for (index_t j = 0; j < c.vocab(); ++j)
            sum += (p[static_cast<std::size_t>(j)] = std::exp((static_cast<double>(z[j]) - top) / temperature));
        double u = static_cast<double>(rng() >> 11) * 0x1p-53 * sum;
        int next = static_cast<int>(c.vocab()) - 1;
        for (index_t j = 0; j < c.vocab(); ++j)
            if ((u -= p[static_cast<std::size_t>(j)]) < 0) {
                next = static_cast<int>(j);
                break;
            }
        sequence.push_back(next);
        out.push_back(static_cast<char>(c.chars[static_cast<std::size_t>(next)]));
    }
    return out;
}

// A progress bar on stderr while a run trains, when stderr is a terminal: the steps done, the mean batch
// loss since the last evaluation, and the time left.
class progress {
public:
    progress(const char* name, int steps) : name_(name), steps_(steps), tty_(isatty(STDERR_FILENO) == 1) {}

    void step(int done, double loss, double seconds)
    {
        if (!tty_) return;
        const int width = 30, filled = done * width / steps_;
        if (filled == last_filled_ && done % 10 != 0 && done != steps_) return;
        last_filled_ = filled;
        const double left = seconds * static_cast<double>(steps_ - done) / static_cast<double>(done);
        std::fprintf(stderr, "\r  %.24s [%s%s] %3d%%  step %d/%d  loss %.4f  %.0f s left ", name_,
                     std::string(static_cast<std::size_t>(filled), '#').c_str(),
                     std::string(static_cast<std::size_t>(width - filled), '.').c_str(), 100 * done / steps_, done,
                     steps_, loss, left);
        std::fflush(stderr);
    }
    /// Erases the bar before a line of output.
    void clear()
    {
        if (tty_) std::fprintf(stderr, "\r\033[K"), std::fflush(stderr);
        last_filled_ = -1;
    }

private:
    const char* name_;
    int steps_;
    bool tty_;
    int last_filled_ = -1;
};

// A plan's name as a file name part: n/4 -> n4, qkv=n/4,down=int4 -> qkv-n4_down-int4.
std::string file_tag(const std::string& name)
{
    std::string tag;
    for (char ch : name) {
        if (ch == '/') continue;
        tag += ch == '=' ? '-' : ch == ',' ? '_' : ch;
    }
    return tag;
}

// Trains one configuration and returns its summary; prints progress as it goes.
run_summary train(const compression_plan& plan, const model_config& cfg, const train_settings& s, const corpus& text)
{
    const context ctx{s.threads};
    transformer<float> model(cfg, plan, s.seed, s.moments, compact::resampling{s.gap}, s.threads);
    const char* name = plan.name.c_str();

    run_summary out{};
    std::snprintf(out.name, sizeof out.name, "%s", name);
    const auto& b0 = model.layer(0);
    const any_linear_group<float>* groups[4] = {&b0.qkv, &b0.attn_out, &b0.gate_up, &b0.down};
    for (int k = 0; k < 4; ++k) {
        out.in[k] = groups[k]->in();
        out.rank[k] = groups[k]->rank();
        std::snprintf(out.compressor[k], sizeof out.compressor[k], "%s", groups[k]->choice().name.c_str());
    }
    std::snprintf(out.stores, sizeof out.stores, "%s", model.stores_now().c_str());
    out.parameters = model.parameter_count();
    // bits=B: GACT's allocator re-picks the stored kinds' schemes at the first step and at 10% of the steps.
    std::optional<compact::bit_allocator> allocator;
    if (plan.bits > 0) {
        compact::allocation_options o;
        o.average_bits = plan.bits;
        o.full_bits = 8 * sizeof(float);
        allocator.emplace(o, compact::sensitivity_method::gact,
                          compact::allocation_schedule::start_and_fraction(static_cast<std::uint64_t>(s.steps), 0.1));
        model.register_stores(*allocator);
    }
    const auto record_memory = [&] {
        const memory_report& m = model.memory();
        out.saved_program = m.saved_program, out.saved_compressed = m.saved_compressed;
        out.saved_stores = m.saved_stores, out.saved_stores_x = m.saved_stores_x;
        out.saved_compressed_x = m.saved_compressed_x, out.saved_uncompressed = m.saved_uncompressed;
        out.scratch = m.scratch, out.parameter_bytes = m.parameters, out.optimizer_bytes = m.optimizer;
        out.compressor_state_bytes = m.compressor_state;
        out.peak_rss_kib = peak_rss_kib();
        out.tracked_peak = tracker().peak_total();
        const auto at_peak = tracker().at_peak();
        std::copy(at_peak.begin(), at_peak.end(), out.tracked_at_peak);
    };
    if (s.memory_only) { // the plan allocates everything up front: the model's memory is known now
        record_memory();
        return out;
    }

    const index_t b = cfg.batch, t = cfg.context;
    std::vector<int> tokens(static_cast<std::size_t>(b * t)), targets(static_cast<std::size_t>(b * t));
    const std::size_t n_val = text.ids.size() - text.train_end;
    const auto val_periodic =
        spread_windows(text.train_end, text.ids.size(), t, static_cast<std::size_t>(s.eval_windows));
    // Final evaluation: as many windows as fit the validation split without overlap, and as many from train.
    std::size_t final_count = std::max<std::size_t>(1, n_val / static_cast<std::size_t>(t + 1));
    if (s.final_windows > 0) final_count = std::min(final_count, static_cast<std::size_t>(s.final_windows));
    const auto val_final = spread_windows(text.train_end, text.ids.size(), t, final_count);
    const auto train_final = spread_windows(0, text.train_end, t, final_count);

    std::FILE* curve = nullptr;
    if (!s.curves.empty()) {
        const std::string path = s.curves + "." + file_tag(plan.name) + ".csv";
        curve = std::fopen(path.c_str(), "w");
        if (!curve) throw std::runtime_error("--curves: cannot write '" + path + "'");
        std::fprintf(curve, "step,train_loss,val_loss\n");
    }
    out.initial_val_loss = evaluate(model, ctx, text, val_periodic, tokens, targets);
    if (curve) std::fprintf(curve, "0,NaN,%.6f\n", out.initial_val_loss);
    std::printf("  %-10s step %5d  val %.4f\n", name, 0, out.initial_val_loss);
    std::fflush(stdout);

    progress bar(name, s.steps);
    std::mt19937_64 order(s.seed); // the same batches for every configuration
    std::vector<std::size_t> starts(static_cast<std::size_t>(b));
    const std::size_t positions = text.train_end - static_cast<std::size_t>(t) - 1;
    double since_eval = 0, seconds = 0;
    int count = 0;
    for (int step = 0; step < s.steps; ++step) {
        const auto start = clock_type::now();
        for (auto& p : starts) p = static_cast<std::size_t>(order() % positions);
        fill_windows(text, starts.data(), b, t, tokens, targets);
        if (allocator && allocator->schedule().due(static_cast<std::uint64_t>(step))) {
            // Probes encode a kind in 1 and 8 bits on this batch (forward and backward again, no update):
            // the codes buffer holds 8-bit encodings meanwhile, then the chosen schemes' sizes.
            model.carve_codes(compact::store_scheme::quantized(8));
            allocator->update(static_cast<std::uint64_t>(step), [&](compact::gradient_probe& probe) {
                model.forward(ctx, tokens.data(), targets.data(), b, t, true, static_cast<std::uint64_t>(step));
                model.backward(ctx, tokens.data());
                model.add_gradients(probe);
            });
            model.carve_codes();
        }
        // The step (completed updates) selects each group's P: a new one every s.gap updates.
        const double loss = model.forward(ctx, tokens.data(), targets.data(), b, t, true,
                                          static_cast<std::uint64_t>(step));
        model.backward(ctx, tokens.data());
        const double f = lr_factor(step, s);
        compact::adamw_params dense, full, compressed;
        dense.lr = full.lr = s.lr * f;
        full.weight_decay = s.weight_decay;
        compressed.lr = (s.lr_compressed > 0 ? s.lr_compressed : s.lr) * f;
        compressed.weight_decay = s.weight_decay;
        compressed.alpha = s.alpha;
        model.step(ctx, dense, full, compressed);
        seconds += std::chrono::duration<double>(clock_type::now() - start).count();
        if (!std::isfinite(loss))
            throw std::runtime_error(std::string(name) + ": the loss is not finite at step " + std::to_string(step));
        since_eval += loss;
        ++count;
        bar.step(step + 1, since_eval / count, seconds);
        if ((step + 1) % s.eval_every == 0 || step + 1 == s.steps) {
            bar.clear();
            const double val = evaluate(model, ctx, text, val_periodic, tokens, targets);
            out.last_batch_loss = since_eval / count;
            std::printf("  %-10s step %5d  train %.4f  val %.4f (ppl %.2f)  %.0f tokens/s\n", name, step + 1,
                        out.last_batch_loss, val, std::exp(val),
                        static_cast<double>(b * t) * (step + 1) / seconds);
            std::fflush(stdout);
            if (curve) std::fprintf(curve, "%d,%.6f,%.6f\n", step + 1, out.last_batch_loss, val);
            since_eval = 0, count = 0;
        }
    }
    if (curve) std::fclose(curve);
    out.train_seconds = seconds;
    out.tokens_per_second = static_cast<double>(b * t) * s.steps / seconds;
    out.val_loss = evaluate(model, ctx, text, val_final, tokens, targets);
    out.train_loss = evaluate(model, ctx, text, train_final, tokens, targets);
    std::snprintf(out.stores, sizeof out.stores, "%s", model.stores_now().c_str());
    const std::string sample = printable(sample_text(model, ctx, text, "%\n", s.sample_chars, s.temperature, s.seed));
    std::snprintf(out.sample, sizeof out.sample, "%s", sample.c_str());
    record_memory();
    return out;
}

// Runs `body` in a forked child, so that the child's VmHWM is this configuration's alone; the summary
// comes back through a pipe. The parent never starts OpenMP threads, so the child may.
run_summary run_isolated(const std::function<run_summary()>& body)
{
    std::fflush(stdout), std::fflush(stderr);
    int fds[2];
    if (pipe(fds) != 0) throw std::runtime_error("pipe failed");
    const pid_t pid = fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
        close(fds[0]);
        int rc = 0;
        run_summary s{};
        try {
            s = body();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "error: %s\n", e.what());
            rc = 1;
        }
        const char* p = reinterpret_cast<const char*>(&s);
        for (std::size_t done = 0; rc == 0 && done < sizeof s;) {
            const ssize_t w = write(fds[1], p + done, sizeof s - done);
            if (w <= 0) rc = 1;
            else done += static_cast<std::size_t>(w);
        }
        std::fflush(stdout), std::fflush(stderr);
        _exit(rc);
    }
    close(fds[1]);
    run_summary s{};
    std::size_t got = 0;
    char* p = reinterpret_cast<char*>(&s);
    while (got < sizeof s) {
        const ssize_t r = read(fds[0], p + got, sizeof s - got);
        if (r <= 0) break;
        got += static_cast<std::size_t>(r);
    }
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    if (got != sizeof s || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        throw std::runtime_error("the training run failed (see its message above)");
    return s;
}

// --------------------------------------------------------------------------------------- gradient check

// Compares the hand-written backward with central differences of the loss, in float64, for every
// parameter of a tiny model with rank::full (P = I, so each linear gradient is the exact full-shape one).
// Relative error per tensor: |fd - backward|_2 / |fd|_2. The five-point stencil with h = 1e-4 has a
// truncation error of order h^4 and a rounding error of order 1e-16 |loss| / h, about 1e-12 here, so
// errors near 1e-8 are expected (the largest in tensors whose gradient is small, like W_q at
// initialisation). 1e-6 leaves that margin, while a term that is off by as little as 0.1% gives errors
// above 1e-4.
bool gradient_check(const corpus& text, model_config cfg)
{
    cfg.vocab = text.vocab();
    const context ctx{1};
    transformer<double> model(cfg, compression_plan{}, 7, compact::moment_policy::keep, compact::resampling{}, 1);
    const index_t b = cfg.batch, t = cfg.context;
    std::vector<int> tokens(static_cast<std::size_t>(b * t)), targets(static_cast<std::size_t>(b * t));
    const auto starts = spread_windows(0, text.ids.size(), t, static_cast<std::size_t>(b));
    fill_windows(text, starts.data(), b, t, tokens, targets);
    model.forward(ctx, tokens.data(), targets.data(), b, t, true, 0);
    model.backward(ctx, tokens.data());

    constexpr double h = 1e-4, tolerance = 1e-6;
    double worst = 0;
    std::string worst_name;
    index_t checked = 0;
    for (const auto& p : model.parameters()) {
        double diff2 = 0, fd2 = 0;
        for (index_t i = 0; i < p.count; ++i) {
            const double saved = p.value[i];
            auto loss_at = [&](double offset) {
                p.value[i] = saved + offset;
                return model.forward(ctx, tokens.data(), targets.data(), b, t, false, 0);
            };
            // The five-point stencil: truncation error O(h^4) instead of the central difference's O(h^2).
            const double fd = (8 * (loss_at(h / 2) - loss_at(-h / 2)) - (loss_at(h) - loss_at(-h))) / (6 * h);
            p.value[i] = saved;
            diff2 += (fd - p.grad[i]) * (fd - p.grad[i]);
            fd2 += fd * fd;
        }
        const double rel = std::sqrt(diff2 / std::max(fd2, 1e-300));
        if (rel >= worst) worst = rel, worst_name = p.name;
        checked += p.count;
    }
    const bool pass = worst < tolerance;
    std::printf("gradient check (float64, rank::full, C=%lld L=%lld H=%lld F=%lld T=%lld B=%lld): %lld parameters, "
                "worst relative error %.2e in %s (tolerance %.0e): %s\n",
                static_cast<long long>(cfg.channels), static_cast<long long>(cfg.layers),
                static_cast<long long>(cfg.heads), static_cast<long long>(cfg.hidden),
                static_cast<long long>(cfg.context), static_cast<long long>(cfg.batch),
                static_cast<long long>(checked), worst, worst_name.c_str(), tolerance, pass ? "pass" : "FAIL");
    return pass;
}

// ------------------------------------------------------------------------------------------- reporting

std::string mib(std::uint64_t bytes)
{
    char text[32];
    std::snprintf(text, sizeof text, "%.2f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
    return text;
}

// Each group's compressor, with r/n for a projection: "n/4 (32/128), full, int4, velora/4".
std::string compressors_string(const run_summary& r)
{
    std::string s;
    for (int k = 0; k < 4; ++k) {
        s += (k ? ", " : "") + std::string(r.compressor[k]);
        if (r.rank[k] != r.in[k]) s += " (" + std::to_string(r.rank[k]) + "/" + std::to_string(r.in[k]) + ")";
    }
    return s;
}

std::uint64_t saved_total(const run_summary& r)
{
    return r.saved_program + r.saved_stores + r.saved_compressed + r.saved_uncompressed;
}

// "mib (whole: ratio)" for a part kept compressed, "-" when there is none.
std::string compressed_part(std::uint64_t bytes, std::uint64_t whole)
{
    if (bytes == 0) return "-";
    char ratio[64];
    std::snprintf(ratio, sizeof ratio, " (%s: %.1fx)", mib(whole).c_str(),
                  static_cast<double>(whole) / static_cast<double>(bytes));
    return mib(bytes) + ratio;
}

void write_report(std::FILE* out, const model_config& cfg, const train_settings& s, const corpus& text,
                  const std::vector<run_summary>& runs)
{
    const run_summary& r0 = runs.front();
    std::fprintf(out, "### Model and training\n\n");
    std::fprintf(out, "- text: %s, %zu characters after removing overstrikes; vocabulary V = %lld; train %zu / "
                      "validation %zu characters (90/10 by position)\n",
                 text.source.c_str(), text.ids.size(), static_cast<long long>(text.vocab()), text.train_end,
                 text.ids.size() - text.train_end);
    std::fprintf(out, "- model: C = %lld, L = %lld, H = %lld (head size %lld), SwiGLU F = %lld, context T = %lld, "
                      "tied head, learned positions; %lld parameters\n",
                 static_cast<long long>(cfg.channels), static_cast<long long>(cfg.layers),
                 static_cast<long long>(cfg.heads), static_cast<long long>(cfg.channels / cfg.heads),
                 static_cast<long long>(cfg.hidden), static_cast<long long>(cfg.context),
                 static_cast<long long>(r0.parameters));
    std::fprintf(out, "- batch: B = %lld sequences, N = %lld tokens per step; %d steps; evaluation every %d steps on "
                      "%lld validation windows\n",
                 static_cast<long long>(cfg.batch), static_cast<long long>(cfg.rows()), s.steps, s.eval_every,
                 static_cast<long long>(s.eval_windows));
    std::fprintf(out, "- optimizer: AdamW (beta 0.9, 0.999, eps 1e-6), lr %g with %d warm-up steps and cosine decay "
                      "to lr/10, weight decay %g on linear layers; compressed groups: lr %g; projections: alpha %g, "
                      "a new P every %llu steps, moments %s\n",
                 s.lr, s.warmup, s.weight_decay, s.lr_compressed > 0 ? s.lr_compressed : s.lr, s.alpha,
                 static_cast<unsigned long long>(s.gap), compact::to_string(s.moments));
    std::fprintf(out, "- groups: q/k/v (one input group), the attention output, gate/up (one input group), down; "
                      "compressors: n/R the seeded projection at r = n/R, intB B-bit group quantization (GACT's "
                      "store, groups of 256), alam ALAM's average quantization, velora/S VeLoRA with sub-tokens of "
                      "S values, wta/R WTA-CRS keeping R N rows\n\n");

    std::fprintf(out, "### Results\n\n");
    if (s.memory_only) {
        std::fprintf(out, "Memory only (--memory-only): each configuration was built, not trained.\n\n| run | "
                          "compressors: qkv, attn-out, gate-up, down | other tensors |\n|---|---|---|\n");
        for (const auto& r : runs) std::fprintf(out, "| %s | %s | %s |\n", r.name, compressors_string(r).c_str(), r.stores);
    } else {
        const std::size_t whole = std::max<std::size_t>(1, (text.ids.size() - text.train_end) /
                                                               static_cast<std::size_t>(cfg.context + 1));
        const std::size_t windows = s.final_windows > 0 ? std::min(whole, static_cast<std::size_t>(s.final_windows)) : whole;
        std::fprintf(out, "Losses are mean cross-entropy (nats per character) at the end, on %zu validation windows "
                          "(%s) and as many training windows; perplexity = exp(loss); the gap is the validation "
                          "loss relative to the first row's.\n\n",
                     windows, windows == whole ? "the whole validation split, without overlap" : "spread over the validation split");
        std::fprintf(out, "| run | compressors: qkv, attn-out, gate-up, down | other tensors | train loss | val loss | "
                          "val ppl | gap | tokens/s | time |\n|---|---|---|---|---|---|---|---|---|\n");
        for (const auto& r : runs)
            std::fprintf(out, "| %s | %s | %s | %.4f | %.4f | %.3f | %+.2f%% | %.0f | %.0f s |\n", r.name,
                         compressors_string(r).c_str(), r.stores, r.train_loss, r.val_loss, std::exp(r.val_loss),
                         100.0 * (r.val_loss - r0.val_loss) / r0.val_loss, r.tokens_per_second, r.train_seconds);
    }
    std::fprintf(out, "\nMemory per training step (N = %lld tokens; from the activation plan, the linear groups' "
                      "saved activations from the compressors' saved_bytes):\n\n",
                 static_cast<long long>(cfg.rows()));
    std::fprintf(out, "| run | saved for backward, total | compressed groups' saved (their X: ratio) | uncompressed "
                      "groups' X | the program's own, whole | the program's own, stored (whole: ratio) | compressor "
                      "state | scratch | weights | optimizer state | peak RSS (VmHWM) |\n"
                      "|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (const auto& r : runs)
        std::fprintf(out, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %.1f MiB |\n", r.name,
                     mib(saved_total(r)).c_str(), compressed_part(r.saved_compressed, r.saved_compressed_x).c_str(),
                     mib(r.saved_uncompressed).c_str(), mib(r.saved_program).c_str(),
                     compressed_part(r.saved_stores, r.saved_stores_x).c_str(), mib(r.compressor_state_bytes).c_str(),
                     mib(r.scratch).c_str(), mib(r.parameter_bytes).c_str(), mib(r.optimizer_bytes).c_str(),
                     static_cast<double>(r.peak_rss_kib) / 1024.0);
    std::fprintf(out, "\nPeak training memory, tracked: every buffer of the model is allocated through "
                      "compact::tracking_allocator under its category; the bytes live at the peak (the token batches "
                      "and the text are not counted):\n\n| run | peak |");
    for (std::size_t k = 0; k < compact::memory_category_count - 1; ++k)
        std::fprintf(out, " %s |", compact::to_string(static_cast<memory_category>(k)));
    std::fprintf(out, " against the first row |\n|---|---|");
    for (std::size_t k = 0; k + 1 < compact::memory_category_count; ++k) std::fprintf(out, "---|");
    std::fprintf(out, "---|\n");
    for (const auto& r : runs) {
        std::fprintf(out, "| %s | %s |", r.name, mib(r.tracked_peak).c_str());
        for (std::size_t k = 0; k + 1 < compact::memory_category_count; ++k)
            std::fprintf(out, " %s |", mib(r.tracked_at_peak[k]).c_str());
        std::fprintf(out, " %.1f%% |\n", 100.0 * static_cast<double>(r.tracked_peak) / static_cast<double>(r0.tracked_peak));
    }
    if (s.memory_only) return;
    if (runs.size() >= 2) {
        std::fprintf(out, "\n");
        for (std::size_t k = 1; k < runs.size(); ++k) {
            const double gap = 100.0 * (runs[k].val_loss - r0.val_loss) / r0.val_loss;
            std::fprintf(out, "- %s against %s at equal steps: validation loss %+.2f%% (target: within 3%%: %s); saved "
                              "for backward %.1f%% of %s's; peak training memory %.1f%%; step time %.2fx\n",
                         runs[k].name, r0.name, gap, gap <= 3.0 ? "met" : "missed",
                         100.0 * static_cast<double>(saved_total(runs[k])) / static_cast<double>(saved_total(r0)),
                         r0.name, 100.0 * static_cast<double>(runs[k].tracked_peak) / static_cast<double>(r0.tracked_peak),
                         r0.tokens_per_second / runs[k].tokens_per_second);
        }
    }
    std::fprintf(out, "\n### Samples\n\nTemperature %.2f, seed %llu, %d characters after the prompt \"%%\\n\".\n",
                 s.temperature, static_cast<unsigned long long>(s.seed), s.sample_chars);
    for (const auto& r : runs) std::fprintf(out, "\n%s:\n\n```text\n%s\n```\n", r.name, r.sample);
}

// One line per run, for plots: the plan, its compressors, the final losses, bytes and speed.
void write_csv(const std::string& path, const std::vector<run_summary>& runs)
{
    std::FILE* f = std::fopen(path.c_str(), "w");
    if (!f) throw std::runtime_error("--csv: cannot write '" + path + "'");
    std::fprintf(f, "run,compressors,train_loss,val_loss,saved_bytes,linear_saved_bytes,optimizer_bytes,"
                    "compressor_state_bytes,peak_rss_bytes,tokens_per_second,tracked_peak_bytes\n");
    for (const auto& r : runs)
        std::fprintf(f, "\"%s\",\"%s\",%.6f,%.6f,%llu,%llu,%llu,%llu,%lld,%.1f,%llu\n", r.name, compressors_string(r).c_str(),
                     r.train_loss, r.val_loss, static_cast<unsigned long long>(saved_total(r)),
                     static_cast<unsigned long long>(r.saved_compressed + r.saved_uncompressed),
                     static_cast<unsigned long long>(r.optimizer_bytes),
                     static_cast<unsigned long long>(r.compressor_state_bytes), static_cast<long long>(r.peak_rss_kib) * 1024,
                     r.tokens_per_second, static_cast<unsigned long long>(r.tracked_peak));
    std::fclose(f);
}

// ---------------------------------------------------------------------------------------------- main

int usage(const char* program, const std::string& problem)
{
    if (!problem.empty()) std::fprintf(stderr, "%s: %s\n", program, problem.c_str());
    std::fprintf(stderr,
                 "usage: %s [--text PATH] [--steps S] [--compress PLAN]... [--runs both|full|compressed]\n"
                 "  [--compress-attn-out] [--lr X] [--lr-compressed X] [--alpha X] [--gap T]\n"
                 "  [--moments keep|reset|transfer] [--wd X] [--warmup S] [--channels C] [--layers L] [--heads H]\n"
                 "  [--hidden F] [--context T] [--batch B] [--eval-every S] [--eval-windows W] [--final-windows W]\n"
                 "  [--threads N]"
                 " [--seed S] [--sample N] [--temperature X] [--markdown PATH] [--csv PATH] [--memory-only]\n"
                 "  [--curves PREFIX]"
                 " [--gradcheck] [--smoke]\n",
                 program);
    return 2;
}

} // namespace

int main(int argc, char** argv)
{
    model_config cfg;
    train_settings s;
    std::string text_path, markdown, csv, runs_wanted = "both";
    std::vector<std::string> compress_specs;
    bool plans_given = false;
    // --smoke trains every compressor, and the stores: at full precision (which must change no bit of
    // training) and quantized.
    const std::vector<std::string> smoke_plans = {
        "n/4", "velora", "wta", "int4", "alam", "attn=full,mlp=full,norm=full,head=recompute",
        "linear=n/4,attn=int8,mlp=int4,norm=int8,head=recompute",
        "linear=int8,attn=int8,mlp=int8,norm=int8,head=recompute,bits=4"};
    bool smoke = false, gradcheck_only = false, compress_attn_out = false, threads_given = false;
    try {
        for (int i = 1; i < argc; ++i) {
            const std::string arg = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
                return argv[++i];
            };
            auto number = [&]() {
                const std::string v = value();
                char* end = nullptr;
                const double x = std::strtod(v.c_str(), &end);
                if (end == v.c_str() || *end != '\0' || !std::isfinite(x))
                    throw std::invalid_argument(arg + " expects a number, got '" + v + "'");
                return x;
            };
            auto integer = [&](double low) {
                const double x = number();
                if (x != std::floor(x) || x < low)
                    throw std::invalid_argument(arg + " expects an integer >= " +
                                                std::to_string(static_cast<long long>(low)));
                return static_cast<long long>(x);
            };
            if (arg == "--smoke") smoke = true;
            else if (arg == "--gradcheck") gradcheck_only = true;
            else if (arg == "--compress-attn-out") compress_attn_out = true;
            else if (arg == "--text") text_path = value();
            else if (arg == "--steps") s.steps = static_cast<int>(integer(1));
            else if (arg == "--rank" || arg == "--compress") compress_specs.push_back(value());
            else if (arg == "--runs") runs_wanted = value();
            else if (arg == "--lr") s.lr = number();
            else if (arg == "--lr-compressed") s.lr_compressed = number();
            else if (arg == "--alpha") s.alpha = number();
            else if (arg == "--gap") s.gap = static_cast<std::uint64_t>(integer(0));
            else if (arg == "--wd") s.weight_decay = number();
            else if (arg == "--warmup") s.warmup = static_cast<int>(integer(0));
            else if (arg == "--channels") cfg.channels = integer(1);
            else if (arg == "--layers") cfg.layers = integer(1);
            else if (arg == "--heads") cfg.heads = integer(1);
            else if (arg == "--hidden") cfg.hidden = integer(1);
            else if (arg == "--context") cfg.context = integer(1);
            else if (arg == "--batch") cfg.batch = integer(1);
            else if (arg == "--eval-every") s.eval_every = static_cast<int>(integer(1));
            else if (arg == "--eval-windows") s.eval_windows = integer(1);
            else if (arg == "--threads") s.threads = static_cast<int>(integer(0)), threads_given = true;
            else if (arg == "--seed") s.seed = static_cast<std::uint64_t>(integer(0));
            else if (arg == "--sample") s.sample_chars = static_cast<int>(integer(0));
            else if (arg == "--temperature") s.temperature = number();
            else if (arg == "--markdown") markdown = value();
            else if (arg == "--csv") csv = value();
            else if (arg == "--memory-only") s.memory_only = true;
            else if (arg == "--final-windows") s.final_windows = integer(1);
            else if (arg == "--curves") s.curves = value();
            else if (arg == "--moments") {
                const std::string m = value();
                if (m == "keep") s.moments = compact::moment_policy::keep;
                else if (m == "reset") s.moments = compact::moment_policy::reset;
                else if (m == "transfer") s.moments = compact::moment_policy::transfer;
                else throw std::invalid_argument("--moments expects keep, reset or transfer, got '" + m + "'");
            } else {
                throw std::invalid_argument("unknown argument '" + arg + "'");
            }
        }
        plans_given = !compress_specs.empty();
        if (!plans_given) compress_specs.push_back("n/4");
        for (const auto& spec : compress_specs) parse_plan(spec, compress_attn_out); // rejects bad ones now
        if (runs_wanted != "both" && runs_wanted != "full" && runs_wanted != "compressed")
            throw std::invalid_argument("--runs expects both, full or compressed, got '" + runs_wanted + "'");
        if (s.lr <= 0 || s.lr_compressed < 0 || s.alpha <= 0 || s.temperature <= 0 || s.weight_decay < 0)
            throw std::invalid_argument("--lr, --alpha and --temperature must be positive, --lr-compressed and --wd "
                                        "non-negative");
    } catch (const std::exception& e) {
        return usage(argv[0], e.what());
    }

    try {
        const corpus builtin = make_corpus(builtin_text, "the built-in text");
        model_config tiny{0, 6, 8, 2, 2, 12, 2}; // V from the text, T, C, L, H, F, B
        if (gradcheck_only) {
            const model_config small{0, 8, 16, 2, 4, 40, 3};
            run_isolated([&] {
                if (!gradient_check(builtin, small)) throw std::runtime_error("gradient check failed");
                return run_summary{};
            });
            return 0;
        }
        if (smoke) {
            // A tiny gradient check, then both configurations for a few steps on the built-in text.
            run_isolated([&] {
                if (!gradient_check(builtin, tiny)) throw std::runtime_error("gradient check failed");
                return run_summary{};
            });
            cfg = model_config{0, 32, 32, 2, 2, 88, 8};
            s.steps = 200, s.warmup = 10, s.lr = 1e-2, s.eval_every = 20, s.eval_windows = 16, s.sample_chars = 80;
            if (!threads_given) s.threads = 1;
            if (!plans_given) compress_specs = smoke_plans;
        }

        corpus text;
        if (smoke) {
            text = builtin;
        } else if (!text_path.empty()) {
            text = make_corpus(read_file(text_path), text_path);
        } else if (std::filesystem::is_directory("/usr/share/games/fortunes")) {
            text = make_corpus(read_fortunes("/usr/share/games/fortunes"), "Debian's fortunes package "
                                                                          "(/usr/share/games/fortunes)");
        } else {
            std::fprintf(stderr, "warning: /usr/share/games/fortunes not found (Debian package 'fortunes'); "
                                 "training on the short built-in text instead, which the model will memorise\n");
            text = builtin;
        }
        cfg.vocab = text.vocab();
        if (text.ids.size() - text.train_end < static_cast<std::size_t>(cfg.context) + 2 ||
            text.train_end < static_cast<std::size_t>(cfg.context) + 2)
            throw std::invalid_argument("the text is too short for context T=" + std::to_string(cfg.context));

        std::printf("char_transformer: %s, %zu characters, V=%lld; C=%lld L=%lld H=%lld F=%lld T=%lld B=%lld, "
                    "%d steps\n",
                    text.source.c_str(), text.ids.size(), static_cast<long long>(cfg.vocab),
                    static_cast<long long>(cfg.channels), static_cast<long long>(cfg.layers),
                    static_cast<long long>(cfg.heads), static_cast<long long>(cfg.hidden),
                    static_cast<long long>(cfg.context), static_cast<long long>(cfg.batch), s.steps);

        std::vector<run_summary> runs;
        if (runs_wanted != "compressed")
            runs.push_back(run_isolated([&] { return train(compression_plan{}, cfg, s, text); }));
        if (runs_wanted != "full")
            for (const auto& spec : compress_specs) {
                const compression_plan plan = parse_plan(spec, compress_attn_out);
                runs.push_back(run_isolated([&] { return train(plan, cfg, s, text); }));
            }

        std::printf("\n");
        write_report(stdout, cfg, s, text, runs);
        if (!markdown.empty()) {
            std::FILE* f = std::fopen(markdown.c_str(), "w");
            if (!f) throw std::runtime_error("--markdown: cannot write '" + markdown + "'");
            write_report(f, cfg, s, text, runs);
            std::fclose(f);
        }
        if (!csv.empty()) write_csv(csv, runs);

        if (smoke) {
            // Training must have taken the loss below the unigram entropy: it learned from context.
            const double floor = text.unigram_entropy();
            for (const auto& r : runs)
                if (!(r.last_batch_loss < floor && r.last_batch_loss < r.initial_val_loss)) {
                    std::fprintf(stderr, "smoke: %s's training loss %.4f is not below the unigram entropy %.4f and "
                                         "its initial loss %.4f\n",
                                 r.name, r.last_batch_loss, floor, r.initial_val_loss);
                    return 1;
                }
            std::printf("smoke: every configuration's training loss fell from about ln V to below the text's unigram "
                        "entropy %.4f\n", floor);
            // Stores at full precision and a recomputed head keep or recompute the same values: training
            // must be bit-identical to the uncompressed run's.
            for (const auto& r : runs)
                if (std::string(r.name) == smoke_plans[5] && !runs.empty() && std::string(runs[0].name) == "full") {
                    if (r.train_loss != runs[0].train_loss || r.val_loss != runs[0].val_loss) {
                        std::fprintf(stderr, "smoke: %s ends at losses %.17g / %.17g, not the uncompressed run's "
                                             "%.17g / %.17g\n",
                                     r.name, r.train_loss, r.val_loss, runs[0].train_loss, runs[0].val_loss);
                        return 1;
                    }
                    std::printf("smoke: full-precision stores and the recomputed head train bit-identically to the "
                                "uncompressed run\n");
                }
        }
        return 0;
    } catch (const compact::error& e) {
        std::fprintf(stderr, "compact error: %s\n", e.what());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
