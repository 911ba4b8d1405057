// act(x) as a tensor of its own: the CPU's x_act (docs/OPS.md "Act on load"). The CUDA kernels
// apply act as they load x; here it is one vectorised pass before the stage, with the maths of
// every other CPU kernel (activation.h through cpu_common.h's lanes), rounded to x's dtype as a
// stage's stored output is. The CPU gains no pass from the link, so the model does not ask for it
// here (ops/block.py); this makes the op contract hold on every backend.
#include "cpu_common.h"

#include <algorithm>

namespace convmixer_kernels {
namespace cpu {

at::Tensor act_of(const at::Tensor& x, Act act) {
  // What the stage refuses (its checks name the problem) is passed through to them untouched.
  const at::ScalarType t = x.scalar_type();
  if (x.dim() != 4 ||
      (t != at::kFloat && t != at::kDouble && t != at::kHalf && t != at::kBFloat16))
    return x;
  const auto src = x.contiguous(at::MemoryFormat::ChannelsLast);
  auto out = at::empty_like(src, at::MemoryFormat::ChannelsLast);
  const int64_t n = src.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "act_of", [&] {
    dispatch_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      using L = Lanes<scalar_t>;
      using V = typename L::V;
      const scalar_t* in = src.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      // Grains of whole pairs, so that only the tensor's last pair is partial.
      constexpr int64_t kGrain = 1024 * L::kPair;
      at::parallel_for(0, (n + kGrain - 1) / kGrain, 1, [&](int64_t g0, int64_t g1) {
        const int64_t end = std::min(n, g1 * kGrain);
        for (int64_t i = g0 * kGrain; i < end; i += L::kPair) {
          const int64_t k = std::min(L::kPair, end - i);
          V a, b;
          L::load(in + i, k, a, b);
          a = act_forward<A>(a), b = act_forward<A>(b);
          L::store(o + i, k, a, b);
        }
      });
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace convmixer_kernels
