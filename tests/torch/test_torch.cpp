// compact::torch (include/compact/torch/): Linear against torch::nn::Linear, SubspaceAdamW against
// torch::optim::AdamW, masks, the graph walk, checkpoints and errors. One translation unit: torch's headers
// are slow to compile.
#include <compact/torch.hpp>

#include <doctest/doctest.h>

#include <torch/torch.h>

#include <cstdio>
#include <string>

namespace ct = compact::torch;

namespace {

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

// The message f throws, or "no error".
template <class F>
std::string message(F&& f)
{
    try {
        f();
    } catch (const std::exception& e) {
        return e.what();
    }
    return "no error";
}
double rel_diff(const at::Tensor& a, const at::Tensor& b)
{
    return max_diff(a, b) / std::max(1e-300, b.abs().max().item<double>());
}

template <class Policy>
ct::Linear<Policy> make_double(int64_t n, int64_t m, bool bias = true, uint64_t seed = 7)
{
    ct::Linear<Policy> fc(ct::LinearOptions(n, m).bias(bias).seed(seed));
    fc->to(torch::kDouble);
    return fc;
}

// nn::Linear with the same weights.
torch::nn::Linear reference_of(const at::Tensor& w, const at::Tensor& b)
{
    torch::nn::Linear ref(torch::nn::LinearOptions(w.size(1), w.size(0)).bias(b.defined()));
    ref->to(torch::kDouble);
    torch::NoGradGuard guard;
    ref->weight.copy_(w);
    if (b.defined()) ref->bias.copy_(b);
    return ref;
}

template <class Policy>
void check_against_linear(const at::Tensor& x_in)
{
    const int64_t n = x_in.size(-1), m = 24;
    auto fc = make_double<Policy>(n, m);
    auto ref = reference_of(fc->weight.detach(), fc->bias.detach());
    at::Tensor x1 = x_in.detach().clone().requires_grad_(true);
    // The same strides for both: x_in's layout is what is being tested.
    at::Tensor xa = x_in.detach().requires_grad_(true);
    at::Tensor xb = x_in.detach().clone().requires_grad_(true);
    const at::Tensor dy = torch::randn(x_in.sizes().vec().size() ? [&] {
        auto s = x_in.sizes().vec();
        s.back() = m;
        return s;
    }() : std::vector<int64_t>{m}, torch::kDouble);
    auto ya = fc(xa);
    auto yb = ref(xb);
    CHECK(ya.sizes() == yb.sizes());
    CHECK(rel_diff(ya, yb) < 1e-12);
    ya.backward(dy);
    yb.backward(dy);
    CHECK(rel_diff(xa.grad(), xb.grad()) < 1e-12);
    CHECK(rel_diff(fc->bias.grad(), ref->bias.grad()) < 1e-12);
    // G_sub = G P: the subspace gradient is nn::Linear's weight gradient times P.
    const at::Tensor p = fc->projection();
    CHECK(fc->weight.grad().sizes() == at::IntArrayRef({m, fc->rank()}));
    CHECK(rel_diff(fc->weight.grad(), ref->weight.grad().mm(p)) < 1e-12);
    (void)x1;
}

} // namespace

TEST_CASE("Linear: Y, dX and db equal nn::Linear in double, G_sub = W.grad P, for 2-D, 3-D and strided inputs")
{
    torch::manual_seed(1);
    SUBCASE("2-D") { check_against_linear<compact::rank::ratio<1, 4>>(torch::randn({33, 64}, torch::kDouble)); }
    SUBCASE("3-D") { check_against_linear<compact::rank::ratio<1, 4>>(torch::randn({3, 5, 64}, torch::kDouble)); }
    SUBCASE("row slice (strided rows, read in place)")
    {
        check_against_linear<compact::rank::ratio<1, 2>>(torch::randn({40, 100}, torch::kDouble).narrow(1, 10, 64));
    }
    SUBCASE("transposed (copied)")
    {
        check_against_linear<compact::rank::ratio<1, 4>>(torch::randn({64, 17}, torch::kDouble).t());
    }
    SUBCASE("permuted 3-D batch")
    {
        check_against_linear<compact::rank::ratio<3, 8>>(torch::randn({5, 3, 64}, torch::kDouble).transpose(0, 1));
    }
}

TEST_CASE("Linear: two backwards before one step add up, as one backward of both batches")
{
    torch::manual_seed(2);
    auto fc = make_double<compact::rank::ratio<1, 4>>(32, 16);
    const auto x1 = torch::randn({10, 32}, torch::kDouble), x2 = torch::randn({7, 32}, torch::kDouble);
    const auto d1 = torch::randn({10, 16}, torch::kDouble), d2 = torch::randn({7, 16}, torch::kDouble);
    fc(x1).backward(d1);
    fc(x2).backward(d2);
    const auto g_two = fc->weight.grad().clone();
    const auto b_two = fc->bias.grad().clone();
    fc->zero_grad();
    fc(torch::cat({x1, x2})).backward(torch::cat({d1, d2}));
    CHECK(rel_diff(g_two, fc->weight.grad()) < 1e-12);
    CHECK(rel_diff(b_two, fc->bias.grad()) < 1e-12);
}

TEST_CASE("graph walk: a compressed MLP keeps only Z and masks; no-grad and eval keep nothing")
{
    torch::manual_seed(3);
    const int64_t N = 32, n = 64, h = 48;
    auto fc1 = make_double<compact::rank::ratio<1, 4>>(n, h);
    auto fc2 = make_double<compact::rank::ratio<1, 4>>(h, 10);
    ct::ReLU relu;
    const auto x = torch::randn({N, n}, torch::kDouble);
    auto loss = fc2(relu(fc1(x))).pow(2).sum();
    const auto r = ct::saved_for_backward(loss);
    // pow keeps its input (fc2's output, N x 10 doubles): not ours, but counted.
    const std::size_t expected = N * 16 * 8 + compact::mask_bytes(N, h) + N * 12 * 8 + N * 10 * 8;
    CHECK(r.unknown.empty() == false); // PowBackward0 is not in the table
    // Without the loss's pow: sum keeps nothing.
    auto loss2 = fc2(relu(fc1(x))).sum();
    const auto r2 = ct::saved_for_backward(loss2);
    CHECK(r2.unknown.empty());
    CHECK(r2.activation_bytes == N * 16 * 8 + compact::mask_bytes(N, h) + N * 12 * 8);
    (void)expected;
    // nn::Linear + torch::relu keep X, H (twice referenced, counted once).
    auto ref1 = reference_of(fc1->weight.detach(), fc1->bias.detach());
    auto ref2 = reference_of(fc2->weight.detach(), fc2->bias.detach());
    auto xr = x.clone().requires_grad_(false);
    const auto r3 = ct::saved_for_backward(ref2(torch::relu(ref1(xr))).sum());
    CHECK(r3.unknown.empty());
    CHECK(r3.activation_bytes == std::size_t(N * n * 8 + N * h * 8));
    {
        torch::NoGradGuard guard;
        CHECK_FALSE(fc1(x).grad_fn());
    }
    fc1->eval();
    const auto xe = x.clone().requires_grad_(true);
    CHECK(ct::saved_for_backward(fc1(xe).sum()).activation_bytes == 0);
    fc1->train();
}

TEST_CASE("SubspaceAdamW torch-compatible with P = I: 50 steps equal torch::optim::AdamW")
{
    torch::manual_seed(4);
    const int64_t n = 20, h = 16, c = 5;
    ct::Linear<compact::rank::full> fc1(ct::LinearOptions(n, h));
    torch::nn::Linear fc2(torch::nn::LinearOptions(h, c)); // an ordinary parameter in the same optimizer
    fc1->to(torch::kDouble);
    fc2->to(torch::kDouble);
    auto ref1 = reference_of(fc1->weight.detach(), fc1->bias.detach());
    auto ref2 = reference_of(fc2->weight.detach(), fc2->bias.detach());

    std::vector<at::Tensor> params = fc1->parameters();
    for (auto& p : fc2->parameters()) params.push_back(p);
    std::vector<at::Tensor> ref_params = ref1->parameters();
    for (auto& p : ref2->parameters()) ref_params.push_back(p);
    ct::SubspaceAdamW opt(params, ct::SubspaceAdamWOptions(1e-2).eps(1e-8).weight_decay(1e-2).torch_compatible(true));
    torch::optim::AdamW ref_opt(ref_params, torch::optim::AdamWOptions(1e-2).eps(1e-8).weight_decay(1e-2));
    // same_gradients: the optimizers see bit-identical gradients (torch's, copied), so they must agree bit
    // for bit; otherwise compact's GEMMs round differently from torch's and 1e-12 is the bar.
    bool same_gradients = false;
    SUBCASE("identical gradients: bit for bit") { same_gradients = true; }
    SUBCASE("each its own gradients: to 1e-12") { same_gradients = false; }
    for (int step = 0; step < 50; ++step) {
        const auto x = torch::randn({12, n}, torch::kDouble);
        opt.zero_grad();
        ref_opt.zero_grad();
        fc2(torch::relu(fc1(x))).pow(2).mean().backward();
        ref2(torch::relu(ref1(x))).pow(2).mean().backward();
        if (same_gradients)
            for (std::size_t i = 0; i < params.size(); ++i) params[i].mutable_grad().copy_(ref_params[i].grad());
        opt.step();
        ref_opt.step();
    }
    if (same_gradients) {
        CHECK(max_diff(fc1->weight, ref1->weight) == 0.0);
        CHECK(max_diff(fc1->bias, ref1->bias) == 0.0);
        CHECK(max_diff(fc2->weight, ref2->weight) == 0.0);
    } else {
        CHECK(rel_diff(fc1->weight, ref1->weight) < 1e-12);
        CHECK(rel_diff(fc1->bias, ref1->bias) < 1e-12);
        CHECK(rel_diff(fc2->weight, ref2->weight) < 1e-12);
    }
    CHECK(fc1->updates() == 50);
}

TEST_CASE("SubspaceAdamW: groups with their own lr, LR scheduler, state_dict round trip bit-exact")
{
    torch::manual_seed(5);
    const int64_t n = 24, h = 32, c = 6;
    auto make = [&] {
        auto fc1 = std::make_shared<ct::LinearImpl<compact::rank::ratio<1, 4>>>(
            ct::LinearOptions(n, h).seed(11).resample_gap(3));
        auto fc2 = std::make_shared<ct::LinearImpl<compact::rank::ratio<1, 2>>>(ct::LinearOptions(h, c).seed(11));
        return std::make_pair(fc1, fc2);
    };
    auto [a1, a2] = make();
    auto run = [&](auto& f1, auto& f2, ct::SubspaceAdamW& opt, int from, int to) {
        for (int step = from; step < to; ++step) {
            torch::manual_seed(100 + step);
            const auto x = torch::randn({16, n});
            opt.zero_grad();
            // two micro-batches per step
            f2->forward(torch::relu(f1->forward(x.narrow(0, 0, 8)))).pow(2).mean().backward();
            f2->forward(torch::relu(f1->forward(x.narrow(0, 8, 8)))).pow(2).mean().backward();
            opt.step();
        }
    };
    auto make_opt = [](auto& f1, auto& f2) {
        std::vector<torch::optim::OptimizerParamGroup> groups;
        groups.emplace_back(std::vector<at::Tensor>{f1->weight, f2->weight},
                            std::make_unique<ct::SubspaceAdamWOptions>(
                                ct::SubspaceAdamWOptions(1e-2).alpha(0.25).weight_decay(0.1).moments(
                                    compact::moment_policy::transfer)));
        groups.emplace_back(std::vector<at::Tensor>{f1->bias, f2->bias},
                            std::make_unique<ct::SubspaceAdamWOptions>(ct::SubspaceAdamWOptions(3e-3)));
        return std::make_unique<ct::SubspaceAdamW>(std::move(groups));
    };
    auto opt = make_opt(a1, a2);
    torch::optim::StepLR sched(*opt, /*step_size*/ 1, /*gamma*/ 0.5); // the 2nd call halves lr
    const auto w0 = a1->weight.clone();
    run(a1, a2, *opt, 0, 4);
    sched.step(), sched.step();
    CHECK(opt->param_groups()[0].options().get_lr() == doctest::Approx(5e-3));
    CHECK(opt->param_groups()[1].options().get_lr() == doctest::Approx(1.5e-3));
    CHECK(max_diff(a1->weight, w0) > 0);

    const std::string dir = std::string(std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp");
    const std::string model_path = dir + "/compact_torch_model.pt", opt_path = dir + "/compact_torch_opt.pt";
    {
        torch::serialize::OutputArchive archive;
        a1->save(archive);
        torch::serialize::OutputArchive archive2;
        a2->save(archive2);
        archive.write("fc2", archive2);
        archive.save_to(model_path);
    }
    torch::save(*opt, opt_path);
    run(a1, a2, *opt, 4, 9);

    auto [b1, b2] = make(); // fresh layer ids: the checkpoint restores the saved ones
    CHECK(b1->layer_id() != a1->layer_id());
    {
        torch::serialize::InputArchive archive;
        archive.load_from(model_path);
        b1->load(archive);
        torch::serialize::InputArchive archive2;
        archive.read("fc2", archive2);
        b2->load(archive2);
    }
    CHECK(b1->layer_id() == a1->layer_id());
    auto opt_b = make_opt(b1, b2);
    torch::load(*opt_b, opt_path);
    CHECK(opt_b->param_groups()[0].options().get_lr() == doctest::Approx(5e-3));
    run(b1, b2, *opt_b, 4, 9);
    CHECK(max_diff(a1->weight, b1->weight) == 0.0);
    CHECK(max_diff(a2->weight, b2->weight) == 0.0);
    CHECK(max_diff(a1->bias, b1->bias) == 0.0);
    CHECK(a1->updates() == 9);
    CHECK(b1->updates() == 9);
    std::remove(model_path.c_str());
    std::remove(opt_path.c_str());
}

TEST_CASE("Linear: unique layer ids; the quantized store as the compressor")
{
    ct::Linear<compact::rank::ratio<1, 4>> a(ct::LinearOptions(8, 8)), b(ct::LinearOptions(8, 8));
    CHECK(a->layer_id() != b->layer_id());
    ct::Linear<compact::quantized> q(ct::LinearOptions(64, 8), compact::quantized{compact::store_scheme::quantized(8)});
    const auto x = torch::randn({16, 64});
    auto loss = q(x).sum();
    CHECK(ct::saved_for_backward(loss).activation_bytes == q->saved_bytes(16));
    loss.backward();
    CHECK(q->weight.grad().sizes() == q->weight.sizes());
    CHECK(q->saved_bytes(16) < 16 * 64 * 4 / 3);
}

TEST_CASE("Linear with a store: the full weight gradient, exact at full precision and close at 8 bits; "
          "SubspaceAdamW steps it as torch::optim::AdamW")
{
    torch::manual_seed(5);
    const int64_t n = 64, m = 12, rows = 80;
    const auto store_layer = [&](compact::store_scheme scheme) {
        ct::Linear<compact::quantized> fc(ct::LinearOptions(n, m).seed(3), compact::quantized{scheme});
        fc->to(torch::kDouble);
        return fc;
    };
    auto whole = store_layer(compact::store_scheme::full_precision());
    auto int8 = store_layer(compact::store_scheme::quantized(8));
    {
        torch::NoGradGuard guard;
        int8->weight.copy_(whole->weight), int8->bias.copy_(whole->bias);
    }
    auto ref = reference_of(whole->weight.detach(), whole->bias.detach());
    const auto x = torch::randn({rows, n}, torch::kDouble), dy = torch::randn({rows, m}, torch::kDouble);
    const auto xa = x.clone().requires_grad_(true), xb = x.clone().requires_grad_(true);
    const auto ya = whole(xa), yb = ref(xb);
    CHECK(rel_diff(ya, yb) < 1e-12);
    ya.backward(dy);
    yb.backward(dy);
    int8(x).backward(dy);
    CHECK(rel_diff(xa.grad(), xb.grad()) < 1e-12);
    CHECK(rel_diff(whole->bias.grad(), ref->bias.grad()) < 1e-12);
    CHECK(rel_diff(whole->weight.grad(), ref->weight.grad()) < 1e-12);
    // 8 bits a value, unbiased rounding: dY^T X^ within about 1% of dY^T X (measured 0.011; bound 3e-2).
    const double err8 = rel_diff(int8->weight.grad(), ref->weight.grad());
    CHECK(err8 > 0.0);
    CHECK(err8 < 3e-2);
    // A store layer's weight is an ordinary parameter to SubspaceAdamW (P = I): with torch's gradients,
    // its torch-compatible steps are torch::optim::AdamW's, bit for bit.
    ct::SubspaceAdamW opt(whole->parameters(),
                          ct::SubspaceAdamWOptions(1e-2).eps(1e-8).weight_decay(1e-2).torch_compatible(true));
    torch::optim::AdamW ref_opt(ref->parameters(), torch::optim::AdamWOptions(1e-2).eps(1e-8).weight_decay(1e-2));
    for (int step = 0; step < 10; ++step) {
        opt.zero_grad(), ref_opt.zero_grad();
        const auto xs = torch::randn({rows, n}, torch::kDouble);
        ref(xs).pow(2).mean().backward();
        whole(xs).pow(2).mean().backward();
        CHECK(rel_diff(whole->weight.grad(), ref->weight.grad()) < 1e-12);
        whole->weight.mutable_grad().copy_(ref->weight.grad());
        whole->bias.mutable_grad().copy_(ref->bias.grad());
        opt.step(), ref_opt.step();
    }
    CHECK(max_diff(whole->weight, ref->weight) == 0.0);
    CHECK(max_diff(whole->bias, ref->bias) == 0.0);
}

TEST_CASE("Dropout keeps a mask and matches its own backward")
{
    ct::Dropout drop(ct::DropoutOptions(0.25).seed(3));
    const auto x = torch::randn({10, 20}, torch::kDouble).requires_grad_(true);
    auto y = drop(x);
    CHECK(ct::saved_for_backward(y.sum()).activation_bytes == compact::mask_bytes(10, 20));
    y.sum().backward();
    const auto kept = (y != 0).to(torch::kDouble);
    CHECK(max_diff(x.grad(), kept / 0.75) < 1e-15);
    drop->eval();
    CHECK(drop(x).data_ptr() == x.data_ptr());
}

TEST_CASE("errors name the function and the argument")
{
    auto fc = make_double<compact::rank::ratio<1, 4>>(16, 8);
    const auto wrong_dtype = message([&] { fc(torch::randn({4, 16})); });
    CHECK(wrong_dtype.find("compact::torch::Linear::forward") != std::string::npos);
    CHECK(wrong_dtype.find("input has dtype Float") != std::string::npos);
    const auto wrong_shape = message([&] { fc(torch::randn({4, 15}, torch::kDouble)); });
    CHECK(wrong_shape.find("input is (4, 15)") != std::string::npos);
    const auto wrong_device = message([&] { fc(torch::empty({4, 16}, torch::TensorOptions().dtype(torch::kDouble).device(torch::kMeta))); });
    CHECK(wrong_device.find("input is on meta") != std::string::npos);
    // The optimizer names a gradient of the wrong shape.
    ct::SubspaceAdamW opt(fc->parameters());
    fc(torch::randn({4, 16}, torch::kDouble)).sum().backward();
    fc->weight.mutable_grad() = torch::zeros({8, 16}, torch::kDouble);
    const auto wrong_grad = message([&] { opt.step(); });
    CHECK(wrong_grad.find("compact::torch::SubspaceAdamW::step") != std::string::npos);
    CHECK(wrong_grad.find("is (8, 16) but (8, 4) was expected") != std::string::npos);
}

TEST_CASE("GELU and SiLU: torch's forward; backward equal to torch's with the input kept whole, close with 8-bit codes")
{
    torch::manual_seed(11);
    for (const bool gelu : {true, false}) {
        CAPTURE(gelu);
        const auto reference = [&](const at::Tensor& x) { return gelu ? torch::gelu(x) : torch::silu(x); };
        auto apply = [&](const compact::store_scheme& s, const at::Tensor& x) {
            if (gelu) return ct::GELU(ct::StoredActivationOptions(s).seed(5))(x);
            return ct::SiLU(ct::StoredActivationOptions(s).seed(5))(x);
        };
        const auto x0 = torch::randn({3, 40, 64}, torch::kDouble) * 3;
        const auto dy = torch::randn({3, 40, 64}, torch::kDouble);
        auto xr = x0.clone().requires_grad_(true);
        reference(xr).backward(dy);

        // Whole input: forward bit-equal, backward to 1e-12 (torch's formula, another order of operations).
        auto xf = x0.clone().requires_grad_(true);
        auto yf = apply(compact::store_scheme::full_precision(), xf);
        CHECK(max_diff(yf, reference(x0)) == 0);
        CHECK(ct::saved_for_backward(yf.sum()).activation_bytes == std::size_t(3 * 40 * 64 * 8));
        yf.backward(dy);
        CHECK(rel_diff(xf.grad(), xr.grad()) < 1e-12);

        // 8-bit codes (groups of 256): the graph keeps 8 bits and the group metadata per value. dX moves by
        // dY f''(x) times the rounding error: x ~ N(0, 9) gives a group range near 20, a step near 0.08, an
        // rms rounding error below 0.04, and |f''| <= 0.8: about 1% of dX in norm, and not zero.
        auto x8 = x0.clone().requires_grad_(true);
        auto y8 = apply(compact::store_scheme::quantized(8), x8);
        CHECK(max_diff(y8, reference(x0)) == 0);
        const std::size_t kept = ct::saved_for_backward(y8.sum()).activation_bytes;
        CHECK(kept == (compact::stored_bytes<double>(compact::store_scheme::quantized(8), 3 * 40 * 64) + 3) / 4 * 4);
        CHECK(kept < std::size_t(3 * 40 * 64 * 8) / 7);
        y8.backward(dy);
        const double err = (x8.grad() - xr.grad()).norm().item<double>() / xr.grad().norm().item<double>();
        CHECK(err > 0);
        CHECK(err < 3e-2);
    }
    // float, the default 8-bit codes; without grad nothing is recorded (nor counted as a call).
    ct::GELU g;
    auto xf = torch::randn({8, 300}).requires_grad_(true);
    g(xf).sum().backward();
    auto xr = xf.detach().clone().requires_grad_(true);
    torch::gelu(xr).sum().backward();
    CHECK((xf.grad() - xr.grad()).norm().item<double>() / xr.grad().norm().item<double>() < 1e-2);
    {
        torch::NoGradGuard guard;
        CHECK_FALSE(g(xf).grad_fn());
    }
    CHECK(g->calls.item<int64_t>() == 1);
}

namespace {

// x (leaf input) -> mm W -> SiLU -> h * h -> mm W2 -> sum: torch's own nodes keep h0 (SiLU's input), h1
// (both operands of the product: one tensor) and h2 (the second mm's input); x and W2 are leaves.
struct small_model {
    at::Tensor w = (torch::randn({32, 48}, torch::kDouble) / 6).requires_grad_(true);
    at::Tensor w2 = (torch::randn({48, 10}, torch::kDouble) / 7).requires_grad_(true);
    at::Tensor forward(const at::Tensor& x) const
    {
        const auto h1 = torch::silu(torch::mm(x, w));
        return torch::mm(h1 * h1, w2).sum();
    }
    void zero_grad()
    {
        for (auto* p : {&w, &w2})
            if (p->grad().defined()) p->mutable_grad().zero_();
    }
};

} // namespace

TEST_CASE("SavedTensors: torch's saved tensors go through the stores; whole values are bit-identical")
{
    torch::manual_seed(12);
    small_model m;
    const auto x = torch::randn({64, 32}, torch::kDouble);
    m.forward(x).backward();
    const at::Tensor gw = m.w.grad().clone(), gw2 = m.w2.grad().clone();
    const std::size_t tensor_bytes = 64 * 48 * 8;

    // Full precision: three tensors (h0, h1 once although saved twice, h2), bit-identical gradients.
    ct::SavedTensors whole(ct::SavedTensorsOptions(compact::store_scheme::full_precision()).min_numel(16));
    m.zero_grad();
    at::Tensor loss;
    {
        auto scope = whole.scope(0);
        loss = m.forward(x);
    }
    CHECK(whole.slots() == 3);
    CHECK(whole.live_bytes() == 3 * tensor_bytes);
    CHECK(whole.live_original_bytes() == 3 * tensor_bytes);
    loss.backward();
    CHECK(whole.live_bytes() == 0);
    CHECK(max_diff(m.w.grad(), gw) == 0);
    CHECK(max_diff(m.w2.grad(), gw2) == 0);

    // 8-bit codes: the graph walk sees the codes; gradients within 1%; outside a scope nothing changes.
    ct::SavedTensors int8(ct::SavedTensorsOptions(compact::store_scheme::quantized(8)).min_numel(16).seed(3));
    m.zero_grad();
    {
        auto scope = int8.scope(0);
        loss = m.forward(x);
    }
    const auto plain = ct::saved_for_backward(m.forward(x));
    const auto coded = ct::saved_for_backward(loss);
    const std::size_t codes = 3 * ((compact::stored_bytes<double>(compact::store_scheme::quantized(8), 64 * 48) + 3) / 4 * 4);
    CHECK(int8.live_bytes() == codes);
    CHECK(plain.activation_bytes == 64 * 32 * 8 + 3 * tensor_bytes); // x, h0, h1, h2
    CHECK(coded.activation_bytes == 64 * 32 * 8 + codes);
    loss.backward();
    CHECK(int8.live_bytes() == 0);
    const double err = (m.w.grad() - gw).norm().item<double>() / gw.norm().item<double>();
    CHECK(err > 0);
    CHECK(err < 1e-2);
    // Small tensors are kept as they are: nothing encoded, nothing changed.
    ct::SavedTensors none(ct::SavedTensorsOptions(compact::store_scheme::quantized(1)).min_numel(1 << 20));
    m.zero_grad();
    {
        auto scope = none.scope(0);
        loss = m.forward(x);
    }
    loss.backward();
    CHECK(none.slots() == 0);
    CHECK(max_diff(m.w.grad(), gw) == 0);
}

TEST_CASE("SavedTensors with GACT's allocator: bits per tensor from probed sensitivities, within the budget")
{
    torch::manual_seed(13);
    small_model m;
    const auto x = torch::randn({64, 32}, torch::kDouble);
    ct::SavedTensors saves(ct::SavedTensorsOptions(compact::store_scheme::quantized(8)).min_numel(16));
    {
        auto scope = saves.scope(0);
        m.forward(x).backward();
    }
    REQUIRE(saves.slots() == 3);
    compact::allocation_options o;
    o.average_bits = 2;
    o.full_bits = 64;
    compact::bit_allocator alloc(o, compact::sensitivity_method::gact, compact::allocation_schedule::every(100));
    saves.register_with(alloc);
    int reruns = 0;
    CHECK(alloc.update(0, [&](compact::gradient_probe& probe) {
        ++reruns;
        m.zero_grad();
        at::Tensor loss;
        {
            auto scope = saves.scope(0);
            loss = m.forward(x);
        }
        loss.backward();
        ct::add_gradients(probe, {m.w, m.w2});
    }));
    CHECK(reruns == 9); // three probes per tensor
    double bits = 0, values = 0;
    for (std::size_t i = 0; i < saves.slots(); ++i) {
        CAPTURE(i);
        CHECK(alloc.sensitivities()[i] > 0);
        CHECK(saves.settings(i).scheme == alloc.schemes()[i]);
        bits += compact::nominal_bits<double>(saves.settings(i).scheme) * static_cast<double>(saves.numel(i));
        values += static_cast<double>(saves.numel(i));
    }
    CHECK(bits <= 2 * values);
    CHECK_FALSE(alloc.update(1, [](compact::gradient_probe&) {}));
}

TEST_CASE("SavedTensors, GELU and SiLU: errors name the function and the argument")
{
    const auto min = message([] { ct::SavedTensors s(ct::SavedTensorsOptions().min_numel(0)); });
    CHECK(min.find("compact::torch::SavedTensors") != std::string::npos);
    CHECK(min.find("min_numel=0") != std::string::npos);
    ct::SavedTensors s;
    const auto step = message([&] { auto scope = s.scope(std::uint64_t{1} << 33); });
    CHECK(step.find("compact::torch::SavedTensors::scope") != std::string::npos);
    const auto slot = message([&] { s.settings(0); });
    CHECK(slot.find("slot 0 of 0") != std::string::npos);
    compact::bit_allocator alloc({}, compact::sensitivity_method::gact, compact::allocation_schedule::every(1));
    CHECK(message([&] { s.register_with(alloc); }).find("run one forward under a scope first") != std::string::npos);
    ct::GELU g;
    const auto dtype = message([&] { g(torch::ones({4}, torch::kInt32)); });
    CHECK(dtype.find("compact::torch::GELU::forward") != std::string::npos);
    CHECK(dtype.find("input has dtype Int") != std::string::npos);
    const auto scheme = message([] { ct::SiLU bad(compact::store_scheme::quantized(3)); });
    CHECK(scheme.find("compact::torch::SiLU: ") != std::string::npos);
}
