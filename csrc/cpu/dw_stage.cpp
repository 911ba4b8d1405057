// CPU implementation of dw_stage and dw_stage_backward (docs/OPS.md).
//
// Work is split by blocks of kCB channels: a block owns its channels for the whole batch, so
// every per-channel reduction (statistics, weight and bias gradients, norm gradients) is a
// private, serial, run-to-run deterministic sum, and no merge between threads is needed.
// For each image, the block's channels are staged in a zero-bordered fp32 (fp64 for double)
// buffer with the input norm already applied; the k×k taps then run branch-free on Vectorized
// lanes across channels, as the NHWC layout intends.
#include "cpu_common.h"
#include "../stage_checks.h"

namespace convmixer_kernels {
namespace cpu {
namespace {

// One channel block's buffers and inner loops.
template <typename scalar_t>
struct DwBlock {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vec<opmath_t>;
  static constexpr int kVecs = 4;
  static constexpr int64_t kCB = kVecs * V::size();

  const DwGeometry& g;
  int64_t c0, cb;                 // first channel and width of the block (cb <= kCB)
  std::vector<opmath_t> w, wflip;  // [k*k][kCB] taps, and the same taps rotated 180°
  std::vector<opmath_t> bias;      // [kCB]
  std::vector<opmath_t> pad_buf;   // [Hp][Wp][kCB], borders stay zero

  DwBlock(const DwGeometry& geo, int64_t block, const scalar_t* weight, const scalar_t* b)
      : g(geo),
        c0(block * kCB),
        cb(std::min(kCB, geo.C - block * kCB)),
        w(geo.k * geo.k * kCB, opmath_t(0)),
        wflip(geo.k * geo.k * kCB, opmath_t(0)),
        bias(kCB, opmath_t(0)),
        pad_buf(geo.Hp() * geo.Wp() * kCB, opmath_t(0)) {
    const int64_t kk = g.k * g.k;
    for (int64_t l = 0; l < cb; ++l) {
      for (int64_t t = 0; t < kk; ++t) {
        const opmath_t v = static_cast<opmath_t>(weight[(c0 + l) * kk + t]);
        w[t * kCB + l] = v;
        wflip[(kk - 1 - t) * kCB + l] = v;
      }
      if (b != nullptr) bias[l] = static_cast<opmath_t>(b[c0 + l]);
    }
  }

  // Copies image n's channels of the NHWC tensor `src` into the interior of pad_buf, applying
  // the norm (v - mean) * scale + shift when one is given.
  void stage(const scalar_t* src, int64_t n, const Norm& norm) {
    const opmath_t* m = norm.defined() ? norm.mean.data_ptr<opmath_t>() + c0 : nullptr;
    const opmath_t* s = norm.defined() ? norm.scale.data_ptr<opmath_t>() + c0 : nullptr;
    const opmath_t* t = norm.defined() ? norm.shift.data_ptr<opmath_t>() + c0 : nullptr;
    for (int64_t y = 0; y < g.H; ++y) {
      for (int64_t x = 0; x < g.W; ++x) {
        const scalar_t* in = src + ((n * g.H + y) * g.W + x) * g.C + c0;
        opmath_t* dst = pad_buf.data() + ((y + g.pad) * g.Wp() + x + g.pad) * kCB;
        if (m != nullptr) {
          for (int64_t l = 0; l < cb; ++l) dst[l] = (static_cast<opmath_t>(in[l]) - m[l]) * s[l] + t[l];
        } else {
          for (int64_t l = 0; l < cb; ++l) dst[l] = static_cast<opmath_t>(in[l]);
        }
      }
    }
  }

  // acc = init + Σ_ij buf[y+i][x+j] * taps[i][j], over the block's lanes.
  void correlate(const opmath_t* buf, const std::vector<opmath_t>& taps, int64_t y, int64_t x,
                 const V* init, V* acc) const {
    for (int v = 0; v < kVecs; ++v) acc[v] = init[v];
    const int64_t row_stride = g.Wp() * kCB;
    const opmath_t* base = buf + (y * g.Wp() + x) * kCB;
    const opmath_t* tap = taps.data();
    for (int64_t i = 0; i < g.k; ++i) {
      const opmath_t* px = base + i * row_stride;
      for (int64_t j = 0; j < g.k; ++j, px += kCB, tap += kCB) {
        for (int v = 0; v < kVecs; ++v) {
          acc[v] = at::vec::fmadd(V::loadu(px + v * V::size()), V::loadu(tap + v * V::size()),
                                  acc[v]);
        }
      }
    }
  }

  void load_bias(V* b) const {
    for (int v = 0; v < kVecs; ++v) b[v] = V::loadu(bias.data() + v * V::size());
  }
};

template <typename scalar_t, Act A>
void dw_forward(const DwGeometry& g, const at::Tensor& x, const Norm& norm,
                const at::Tensor& weight, const at::Tensor* bias, bool stats,
                at::Tensor& out, at::Tensor& mean, at::Tensor& var) {
  using Block = DwBlock<scalar_t>;
  using opmath_t = typename Block::opmath_t;
  using V = typename Block::V;
  constexpr int kVecs = Block::kVecs;
  constexpr int64_t kCB = Block::kCB;

  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const scalar_t* bp = bias != nullptr ? bias->data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t blocks = (g.C + kCB - 1) / kCB;
  std::vector<double> shift(g.C, 0.0), s1(g.C, 0.0), s2(g.C, 0.0);

  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      Block block(g, blk, wp, bp);
      V init[kVecs], acc[kVecs];
      block.load_bias(init);
      alignas(64) opmath_t vals[kCB];
      opmath_t shift_k[kCB] = {}, img_s1[kCB], img_s2[kCB];
      for (int64_t n = 0; n < g.N; ++n) {
        block.stage(xp, n, norm);
        std::fill(img_s1, img_s1 + kCB, opmath_t(0));
        std::fill(img_s2, img_s2 + kCB, opmath_t(0));
        for (int64_t y = 0; y < g.H; ++y) {
          for (int64_t xx = 0; xx < g.W; ++xx) {
            block.correlate(block.pad_buf.data(), block.w, y, xx, init, acc);
            for (int v = 0; v < kVecs; ++v) act_forward<A>(acc[v]).store(vals + v * V::size());
            round_to_storage<scalar_t>(vals, block.cb);
            scalar_t* dst = op + ((n * g.H + y) * g.W + xx) * g.C + block.c0;
            for (int64_t l = 0; l < block.cb; ++l) dst[l] = static_cast<scalar_t>(vals[l]);
            if (!stats) continue;
            if (n == 0 && y == 0 && xx == 0) std::copy(vals, vals + kCB, shift_k);
            for (int64_t l = 0; l < kCB; ++l) {
              const opmath_t d = vals[l] - shift_k[l];
              img_s1[l] += d;
              img_s2[l] += d * d;
            }
          }
        }
        if (!stats) continue;
        for (int64_t l = 0; l < block.cb; ++l) {
          s1[block.c0 + l] += img_s1[l];
          s2[block.c0 + l] += img_s2[l];
        }
      }
      for (int64_t l = 0; l < block.cb; ++l) shift[block.c0 + l] = shift_k[l];
    }
  });
  if (stats) {
    std::tie(mean, var) = stats_from_shifted_sums(shift, s1.data(), s2.data(), g.C, g.count(),
                                                  out.options());
  }
}

template <typename scalar_t, Act A>
void dw_backward(const DwGeometry& g, const at::Tensor& grad_out, const at::Tensor* grad_mean,
                 const at::Tensor* grad_var, const at::Tensor& x, const Norm& norm,
                 const at::Tensor& weight, const at::Tensor* bias, const at::Tensor* mean,
                 at::Tensor& grad_x, std::vector<double>& norm_sums,
                 std::vector<double>& grad_w, std::vector<double>& grad_b) {
  using Block = DwBlock<scalar_t>;
  using opmath_t = typename Block::opmath_t;
  using V = typename Block::V;
  constexpr int kVecs = Block::kVecs;
  constexpr int64_t kCB = Block::kCB;
  const int64_t kk = g.k * g.k;

  const scalar_t* gop = grad_out.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const scalar_t* bp = bias != nullptr ? bias->data_ptr<scalar_t>() : nullptr;
  scalar_t* gxp = grad_x.data_ptr<scalar_t>();
  const opmath_t* gm = grad_mean != nullptr ? grad_mean->data_ptr<opmath_t>() : nullptr;
  const opmath_t* gv = grad_var != nullptr ? grad_var->data_ptr<opmath_t>() : nullptr;
  const opmath_t* mp = mean != nullptr ? mean->data_ptr<opmath_t>() : nullptr;
  const int64_t blocks = (g.C + kCB - 1) / kCB;
  const opmath_t inv_count = opmath_t(1) / static_cast<opmath_t>(std::max<int64_t>(g.count(), 1));

  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      Block block(g, blk, wp, bp);
      const int64_t c0 = block.c0, cb = block.cb;
      // The statistics' gradient enters as dO = grad_out + const_term + lin_term * o.
      alignas(64) opmath_t const_term[kCB] = {}, lin_term[kCB] = {};
      for (int64_t l = 0; l < cb; ++l) {
        if (gm != nullptr) const_term[l] += gm[c0 + l] * inv_count;
        if (gv != nullptr) {
          lin_term[l] = 2 * gv[c0 + l] * inv_count;
          const_term[l] -= lin_term[l] * mp[c0 + l];
        }
      }
      const bool need_o = gv != nullptr;
      std::vector<opmath_t> dA(block.pad_buf.size(), opmath_t(0));  // padded like pad_buf
      std::vector<opmath_t> img_gw(kk * kCB);
      alignas(64) opmath_t a_vals[kCB], o_vals[kCB], d_vals[kCB];
      opmath_t img_gb[kCB], img_dx[kCB], img_dxc[kCB];
      V init[kVecs], acc[kVecs], zero[kVecs];
      block.load_bias(init);
      for (int v = 0; v < kVecs; ++v) zero[v] = V(opmath_t(0));
      const opmath_t* m = norm.defined() ? norm.mean.data_ptr<opmath_t>() + c0 : nullptr;
      const opmath_t* s = norm.defined() ? norm.scale.data_ptr<opmath_t>() + c0 : nullptr;

      for (int64_t n = 0; n < g.N; ++n) {
        block.stage(xp, n, norm);
        std::fill(img_gw.begin(), img_gw.end(), opmath_t(0));
        std::fill(img_gb, img_gb + kCB, opmath_t(0));
        // Pass 1: recompute a, form dA into its padded buffer, accumulate dW and db.
        for (int64_t y = 0; y < g.H; ++y) {
          for (int64_t xx = 0; xx < g.W; ++xx) {
            block.correlate(block.pad_buf.data(), block.w, y, xx, init, acc);
            const int64_t pix = (n * g.H + y) * g.W + xx;
            const scalar_t* go = gop + pix * g.C + c0;
            for (int64_t l = 0; l < cb; ++l) d_vals[l] = static_cast<opmath_t>(go[l]);
            for (int64_t l = cb; l < kCB; ++l) d_vals[l] = opmath_t(0);
            opmath_t* da = dA.data() + ((y + g.pad) * g.Wp() + xx + g.pad) * kCB;
            for (int v = 0; v < kVecs; ++v) {
              const int64_t off = v * V::size();
              const ActAt<A, opmath_t> at_a(acc[v]);
              V dO = V::loadu(d_vals + off) + V::loadu(const_term + off);
              if (need_o) {
                // The statistics were of the output as stored: round act(a) before using it.
                at_a.value().store(o_vals + off);
                round_to_storage<scalar_t>(o_vals + off, V::size());
                dO = at::vec::fmadd(V::loadu(lin_term + off), V::loadu(o_vals + off), dO);
              }
              at_a.backward(dO).store(da + off);
            }
            // Lanes past cb hold act'(0)-weighted zeros; keep them exactly zero.
            for (int64_t l = cb; l < kCB; ++l) da[l] = opmath_t(0);
            const opmath_t* xwin = block.pad_buf.data() + (y * g.Wp() + xx) * kCB;
            for (int64_t i = 0; i < g.k; ++i) {
              const opmath_t* px = xwin + i * g.Wp() * kCB;
              for (int64_t j = 0; j < g.k; ++j, px += kCB) {
                opmath_t* gw = img_gw.data() + (i * g.k + j) * kCB;
                for (int v = 0; v < kVecs; ++v) {
                  const int64_t off = v * V::size();
                  at::vec::fmadd(V::loadu(da + off), V::loadu(px + off), V::loadu(gw + off))
                      .store(gw + off);
                }
              }
            }
            for (int64_t l = 0; l < kCB; ++l) img_gb[l] += da[l];
          }
        }
        for (int64_t l = 0; l < cb; ++l) grad_b[c0 + l] += img_gb[l];
        for (int64_t t = 0; t < kk; ++t) {
          for (int64_t l = 0; l < cb; ++l) grad_w[(c0 + l) * kk + t] += img_gw[t * kCB + l];
        }
        // Pass 2: dX = dA correlated with the rotated taps; then through the input norm.
        std::fill(img_dx, img_dx + kCB, opmath_t(0));
        std::fill(img_dxc, img_dxc + kCB, opmath_t(0));
        for (int64_t y = 0; y < g.H; ++y) {
          for (int64_t xx = 0; xx < g.W; ++xx) {
            block.correlate(dA.data(), block.wflip, y, xx, zero, acc);
            for (int v = 0; v < kVecs; ++v) acc[v].store(a_vals + v * V::size());
            const int64_t pix = (n * g.H + y) * g.W + xx;
            scalar_t* gx = gxp + pix * g.C + c0;
            if (m == nullptr) {
              for (int64_t l = 0; l < cb; ++l) gx[l] = static_cast<scalar_t>(a_vals[l]);
              continue;
            }
            const scalar_t* xin = xp + pix * g.C + c0;
            for (int64_t l = 0; l < cb; ++l) {
              gx[l] = static_cast<scalar_t>(a_vals[l] * s[l]);
              img_dx[l] += a_vals[l];
              img_dxc[l] += a_vals[l] * (static_cast<opmath_t>(xin[l]) - m[l]);
            }
          }
        }
        if (m != nullptr) {
          for (int64_t l = 0; l < cb; ++l) {
            norm_sums[c0 + l] += img_dx[l];
            norm_sums[g.C + c0 + l] += img_dxc[l];
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_stage(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x_mean,
    const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& x_shift,
    const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in, c10::string_view act_name,
    bool stats) {
  const DwArgs a = check_dw_stage("dw_stage", x_in, x_mean, x_scale, x_shift, weight_in, bias_in,
                                  act_name, stats);
  const DwGeometry& g = a.g;
  const auto acc = a.acc;
  const Norm& norm = a.norm;

  const auto x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto weight = weight_in.contiguous();
  const auto bias = bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor mean = empty_output(x, acc), var = empty_output(x, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_stage_cpu", [&] {
    dispatch_act(a.act, [&](auto act) {
      dw_forward<scalar_t, decltype(act)::value>(g, x, norm, weight, bias ? &*bias : nullptr,
                                                 stats, out, mean, var);
    });
  });
  if (stats) {
    mean = mean.to(acc);
    var = var.to(acc);
  }
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dw_stage_backward(const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_mean_in,
                  const std::optional<at::Tensor>& grad_var_in, const at::Tensor& x_in,
                  const std::optional<at::Tensor>& x_mean,
                  const std::optional<at::Tensor>& x_scale,
                  const std::optional<at::Tensor>& x_shift, const at::Tensor& weight_in,
                  const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& mean_in,
                  c10::string_view act_name) {
  const DwArgs a = check_dw_stage_backward("dw_stage_backward", grad_out_in, grad_mean_in,
                                           grad_var_in, x_in, x_mean, x_scale, x_shift, weight_in,
                                           bias_in, mean_in, act_name);
  const DwGeometry& g = a.g;
  const auto acc = a.acc;
  const Norm& norm = a.norm;
  const auto& grad_mean = a.sg.grad_mean;
  const auto& grad_var = a.sg.grad_var;
  const auto& mean = a.sg.mean;

  const auto x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto grad_out = grad_out_in.contiguous(at::MemoryFormat::ChannelsLast);
  const auto weight = weight_in.contiguous();
  const auto bias = bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  auto grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  std::vector<double> norm_sums(2 * g.C, 0.0), grad_w(g.C * g.k * g.k, 0.0), grad_b(g.C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_stage_backward_cpu", [&] {
    dispatch_act(a.act, [&](auto act) {
      dw_backward<scalar_t, decltype(act)::value>(
          g, grad_out, grad_mean ? &*grad_mean : nullptr, grad_var ? &*grad_var : nullptr, x,
          norm, weight, bias ? &*bias : nullptr, mean ? &*mean : nullptr, grad_x, norm_sums,
          grad_w, grad_b);
    });
  });
  auto as_tensor = [&](const std::vector<double>& v, int64_t offset, at::IntArrayRef sizes,
                       at::ScalarType dtype) {
    int64_t numel = 1;
    for (auto s : sizes) numel *= s;
    auto t = at::empty(sizes, x.options().dtype(at::kDouble));
    std::copy(v.begin() + offset, v.begin() + offset + numel, t.data_ptr<double>());
    return t.to(dtype);
  };
  const auto wdtype = weight_in.scalar_type();
  auto grad_weight = as_tensor(grad_w, 0, weight_in.sizes(), wdtype);
  auto grad_bias = as_tensor(grad_b, 0, {g.C}, wdtype);
  at::Tensor g_mean = empty_output(x, acc), g_scale = empty_output(x, acc), g_shift = empty_output(x, acc);
  if (norm.defined()) {
    auto sum_dx = as_tensor(norm_sums, 0, {g.C}, acc);
    g_mean = -sum_dx * norm.scale;
    g_scale = as_tensor(norm_sums, g.C, {g.C}, acc);
    g_shift = sum_dx;
  }
  return {grad_x, g_mean, g_scale, g_shift, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace convmixer_kernels
