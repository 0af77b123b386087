// SSIM map forward and backward on the CPU (mouserecon.metrics.ssim_map: the training and refinement loss).
//
// Per plane (one channel of one image) x, y [H, W]: the five "valid" Gaussian blurs mu_x = B x, mu_y = B y,
// B x^2, B y^2, B xy (B: the separable k-tap window, first along rows, then along columns; output
// [H - k + 1, W - k + 1]), then per position
//   S = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1) * (2 cov + c2) / (var_x + var_y + c2) = l cs,
//   var_x = B x^2 - mu_x^2, var_y = B y^2 - mu_y^2, cov = B xy - mu_x mu_y.
// The forward returns S and saves (mu_x, mu_y, var_x, var_y, cov) for the backward, which takes dL/dS = G
// and returns dL/dx only (y is the target):
//   dL/dx = B^T g_mu + 2 x B^T g_xx + y B^T g_xy, with
//   g_mu = G (dl/dmu_x cs + l dcs/dmu_x), g_xx = -G l cs / B2, g_xy = 2 G l / B2, B2 = var_x + var_y + c2,
//   dl/dmu_x = 2 (mu_y - mu_x l) / B1, dcs/dmu_x = 2 (mu_x cs - mu_y) / B2, B1 = mu_x^2 + mu_y^2 + c1
// (var and cov depend on mu_x: d var_x / d mu_x = -2 mu_x, d cov / d mu_x = -mu_y). B^T is the adjoint
// ("full") filter. The lane loops run over a row's positions, so the compiler vectorises them (-O3
// -march=native, as render_cpp builds). The torch implementation in metrics.py is the reference.
//
// Built by render_cpp.build (GCC or Clang flags). Threads: planes through at::parallel_for (torch's pool);
// each plane is computed by one thread in a fixed order, so results do not depend on the number of threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int kStats = 5;  // saved per position: mu_x, mu_y, var_x, var_y, cov

// out[j] = sum_t w[t] in[j + t], t < k, j < n, summed in t order. A compile-time K (the SSIM window is 11
// taps) keeps each sum in a vector register across the taps, with the lane loop over j vectorised; K = 0
// takes k at run time (each tap then passes over out in memory).
template <int K, typename scalar_t>
inline void filter(const scalar_t* __restrict__ in, int64_t step, const scalar_t* __restrict__ w, int64_t k, int64_t n,
                   scalar_t* __restrict__ out) {
  if constexpr (K > 0) {
    for (int64_t j = 0; j < n; ++j) {
      scalar_t sum = w[0] * in[j];
      for (int t = 1; t < K; ++t) sum += w[t] * in[j + t * step];
      out[j] = sum;
    }
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = w[0] * in[j];
    for (int64_t t = 1; t < k; ++t) {
      for (int64_t j = 0; j < n; ++j) out[j] += w[t] * in[j + t * step];
    }
  }
}

struct Plane {
  int64_t H, W, k, h, w;  // input size, taps, output size
};

template <int K, typename scalar_t>
void forward_plane(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, const scalar_t* __restrict__ win,
                   const Plane& s, scalar_t c1, scalar_t c2, scalar_t* __restrict__ smap,
                   scalar_t* __restrict__ stats) {
  // rows [5][H][w]: x, y, x^2, y^2, xy filtered along each row; then the columns of each, one output row
  // at a time (blur [5][w]).
  std::vector<scalar_t> rows(kStats * s.H * s.w), prod(3 * s.W), blur(kStats * s.w);
  scalar_t* xx = prod.data();
  scalar_t* yy = xx + s.W;
  scalar_t* xy = yy + s.W;
  for (int64_t r = 0; r < s.H; ++r) {
    const scalar_t* xr = x + r * s.W;
    const scalar_t* yr = y + r * s.W;
    for (int64_t j = 0; j < s.W; ++j) {
      xx[j] = xr[j] * xr[j];
      yy[j] = yr[j] * yr[j];
      xy[j] = xr[j] * yr[j];
    }
    const scalar_t* src[kStats] = {xr, yr, xx, yy, xy};
    for (int m = 0; m < kStats; ++m) filter<K>(src[m], 1, win, s.k, s.w, rows.data() + (m * s.H + r) * s.w);
  }
  const int64_t area = s.h * s.w;
  const scalar_t* mx = blur.data();
  const scalar_t* my = mx + s.w;
  const scalar_t* ex = my + s.w;
  const scalar_t* ey = ex + s.w;
  const scalar_t* exy = ey + s.w;
  for (int64_t i = 0; i < s.h; ++i) {
    for (int m = 0; m < kStats; ++m) {
      filter<K>(rows.data() + (m * s.H + i) * s.w, s.w, win, s.k, s.w, blur.data() + m * s.w);
    }
    scalar_t* st = stats + i * s.w;
    scalar_t* out = smap + i * s.w;
    for (int64_t j = 0; j < s.w; ++j) {
      const scalar_t vx = ex[j] - mx[j] * mx[j], vy = ey[j] - my[j] * my[j], cov = exy[j] - mx[j] * my[j];
      const scalar_t l = (scalar_t(2) * mx[j] * my[j] + c1) / (mx[j] * mx[j] + my[j] * my[j] + c1);
      out[j] = l * ((scalar_t(2) * cov + c2) / (vx + vy + c2));
      st[j] = mx[j];
      st[area + j] = my[j];
      st[2 * area + j] = vx;
      st[3 * area + j] = vy;
      st[4 * area + j] = cov;
    }
  }
}

// The adjoint filters are filters of the reversed window over inputs padded with k - 1 zeros at both ends.
template <int K, typename scalar_t>
void backward_plane(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, const scalar_t* __restrict__ win,
                    const Plane& s, scalar_t c1, scalar_t c2, const scalar_t* __restrict__ stats,
                    const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_x) {
  const int64_t area = s.h * s.w, pad = s.k - 1, tall = s.h + 2 * pad, wide = s.w + 2 * pad;
  std::vector<scalar_t> reversed(win, win + s.k);
  std::reverse(reversed.begin(), reversed.end());
  // g [3][tall][w]: (g_mu, g_xx, g_xy) at rows pad .. pad + h - 1, zero around.
  std::vector<scalar_t> g(3 * tall * s.w, scalar_t(0));
  for (int64_t i = 0; i < s.h; ++i) {
    const scalar_t* st = stats + i * s.w;
    const scalar_t* G = grad + i * s.w;
    scalar_t* g_mu = g.data() + (pad + i) * s.w;
    scalar_t* g_xx = g_mu + tall * s.w;
    scalar_t* g_xy = g_xx + tall * s.w;
    for (int64_t j = 0; j < s.w; ++j) {
      const scalar_t mx = st[j], my = st[area + j], b1 = mx * mx + my * my + c1;
      const scalar_t b2 = st[2 * area + j] + st[3 * area + j] + c2;
      const scalar_t l = (scalar_t(2) * mx * my + c1) / b1, cs = (scalar_t(2) * st[4 * area + j] + c2) / b2;
      const scalar_t dl = scalar_t(2) * (my - mx * l) / b1, dcs = scalar_t(2) * (mx * cs - my) / b2;
      const scalar_t gl = G[j] * l / b2;
      g_mu[j] = G[j] * (dl * cs + l * dcs);
      g_xx[j] = -gl * cs;
      g_xy[j] = scalar_t(2) * gl;
    }
  }
  // Per input row: the column adjoint of each map (into the middle of a padded row), then the row adjoint.
  std::vector<scalar_t> cols(3 * wide, scalar_t(0)), full(3 * s.W);
  for (int64_t r = 0; r < s.H; ++r) {
    for (int m = 0; m < 3; ++m) {
      filter<K>(g.data() + (m * tall + r) * s.w, s.w, reversed.data(), s.k, s.w, cols.data() + m * wide + pad);
      filter<K>(cols.data() + m * wide, 1, reversed.data(), s.k, s.W, full.data() + m * s.W);
    }
    const scalar_t* xr = x + r * s.W;
    const scalar_t* yr = y + r * s.W;
    scalar_t* out = grad_x + r * s.W;
    for (int64_t j = 0; j < s.W; ++j) {
      out[j] = full[j] + scalar_t(2) * xr[j] * full[s.W + j] + yr[j] * full[2 * s.W + j];
    }
  }
}

// Calls fn(std::integral_constant<int, K>) with K = 11 (the SSIM window) for 11 taps, else K = 0 (run time).
template <typename F>
void with_taps(int64_t k, const F& fn) {
  if (k == 11) {
    fn(std::integral_constant<int, 11>());
  } else {
    fn(std::integral_constant<int, 0>());
  }
}

Plane plane_of(const at::Tensor& x, const at::Tensor& window) {
  const int64_t H = x.size(1), W = x.size(2), k = window.size(0);
  return {H, W, k, H - k + 1, W - k + 1};
}

void check(const at::Tensor& x, const at::Tensor& y, const at::Tensor& window) {
  TORCH_CHECK(x.dim() == 3 && x.sizes() == y.sizes(), "ssim_cpu: x and y must be [planes, H, W] of one shape");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && window.is_contiguous(), "ssim_cpu: contiguous tensors only");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && x.scalar_type() == window.scalar_type(), "ssim_cpu: one dtype");
  TORCH_CHECK(window.dim() == 1 && window.size(0) <= x.size(1) && window.size(0) <= x.size(2),
              "ssim_cpu: the window must fit in the image");
}

// x, y [P, H, W], window [k] -> (S [P, h, w], stats [P, 5, h, w]).
std::vector<at::Tensor> ssim_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& window, double c1,
                                     double c2) {
  check(x, y, window);
  const Plane s = plane_of(x, window);
  const int64_t planes = x.size(0);
  auto smap = at::empty({planes, s.h, s.w}, x.options());
  auto stats = at::empty({planes, kStats, s.h, s.w}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssim_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* win = window.data_ptr<scalar_t>();
    scalar_t* sp = smap.data_ptr<scalar_t>();
    scalar_t* tp = stats.data_ptr<scalar_t>();
    with_taps(s.k, [&](auto taps) {
      at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          forward_plane<decltype(taps)::value>(xp + p * s.H * s.W, yp + p * s.H * s.W, win, s, scalar_t(c1),
                                               scalar_t(c2), sp + p * s.h * s.w, tp + p * kStats * s.h * s.w);
        }
      });
    });
  });
  return {smap, stats};
}

// dL/dx [P, H, W] from x, y, window, the forward's stats and dL/dS [P, h, w].
at::Tensor ssim_backward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& window, const at::Tensor& stats,
                         const at::Tensor& grad, double c1, double c2) {
  check(x, y, window);
  const Plane s = plane_of(x, window);
  const int64_t planes = x.size(0);
  TORCH_CHECK(stats.is_contiguous() && stats.sizes() == at::IntArrayRef({planes, kStats, s.h, s.w}),
              "ssim_cpu: stats do not match x");
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == at::IntArrayRef({planes, s.h, s.w}) &&
              grad.scalar_type() == x.scalar_type(), "ssim_cpu: the gradient does not match S");
  auto grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssim_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* win = window.data_ptr<scalar_t>();
    const scalar_t* tp = stats.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* out = grad_x.data_ptr<scalar_t>();
    with_taps(s.k, [&](auto taps) {
      at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          backward_plane<decltype(taps)::value>(xp + p * s.H * s.W, yp + p * s.H * s.W, win, s, scalar_t(c1),
                                                scalar_t(c2), tp + p * kStats * s.h * s.w, gp + p * s.h * s.w,
                                                out + p * s.H * s.W);
        }
      });
    });
  });
  return grad_x;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ssim_forward", &ssim_forward, "SSIM map per plane -> (S [P, h, w], stats [P, 5, h, w])");
  m.def("ssim_backward", &ssim_backward, "dL/dx of the SSIM map per plane");
}
