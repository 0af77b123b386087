// CPU tile compositing of projected 3D Gaussians, forward and backward (mouserecon.render_cpp).
//
// Same rules as mouserecon/render_torch.py (gsplat 1.5.3 classic mode): per pixel (centre at +0.5),
// front to back through its tile's depth-sorted list, alpha = min(alpha_max, exp(log_opacity - sigma))
// with sigma = 0.5 (a dx^2 + c dy^2) + b dx dy, dx = mean - pixel; skipped if alpha <= alpha_min; the
// pixel stops before a Gaussian that would bring T to <= t_min. The constants come from Python.
//
// Layout. params [M, 6] = (mean x, mean y, conic a, b, c, log opacity), colors [M, D], M = I * N
// image-Gaussians. Tile t (t = local_tile * I + image, local_tile = row * tiles_x + column) owns the
// list slot_gauss[offsets[t] .. offsets[t + 1]), front to back.
//
// Determinism: each tile is computed by one thread in a fixed order (tiles are handed out
// dynamically, but a tile's result does not depend on which thread runs it). The backward writes
// per-slot gradients and sums them per Gaussian in slot order, so results do not depend on the
// number of threads either.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace {

constexpr int kParams = 6;

struct Grid {
  int64_t num_images, height, width, tile_size, tiles_x;
};

struct Rules {
  double alpha_min, alpha_max, t_min;
};

// Runs fn(tile, scratch) for every tile in [0, num_tiles) on all threads, tiles handed out one by one.
template <typename scalar_t, typename F>
void for_each_tile(int64_t num_tiles, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tiles));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<scalar_t> scratch;
    for (int64_t t = next++; t < num_tiles; t = next++) fn(t, scratch);
  });
}

// Copies a tile's Gaussians into scratch, front to back: [count, 6 + D] (params then colour).
template <typename scalar_t>
int64_t gather_tile(const scalar_t* params, const scalar_t* colors, const int64_t* slot_gauss, int64_t begin,
                    int64_t end, int64_t dim, std::vector<scalar_t>& scratch) {
  const int64_t stride = kParams + dim;
  scratch.resize((end - begin) * stride);
  for (int64_t k = begin; k < end; ++k) {
    const int64_t g = slot_gauss[k];
    scalar_t* dst = scratch.data() + (k - begin) * stride;
    std::copy(params + g * kParams, params + (g + 1) * kParams, dst);
    std::copy(colors + g * dim, colors + (g + 1) * dim, dst + kParams);
  }
  return end - begin;
}

// log(alpha) before clamping of Gaussian p at pixel centre (px, py); also returns dx, dy.
template <typename scalar_t>
inline scalar_t log_alpha(const scalar_t* p, scalar_t px, scalar_t py, scalar_t& dx, scalar_t& dy) {
  dx = p[0] - px;
  dy = p[1] - py;
  return p[5] - (scalar_t(0.5) * (p[2] * dx * dx + p[4] * dy * dy) + p[3] * dx * dy);
}

template <typename scalar_t>
void forward_impl(const at::Tensor& params_t, const at::Tensor& colors_t, const at::Tensor& offsets_t,
                  const at::Tensor& slot_t, const Grid& grid, const Rules& rules, at::Tensor& fg_t,
                  at::Tensor& trans_t, at::Tensor& last_t) {
  const scalar_t* params = params_t.data_ptr<scalar_t>();
  const scalar_t* colors = colors_t.data_ptr<scalar_t>();
  const int64_t* offsets = offsets_t.data_ptr<int64_t>();
  const int64_t* slot_gauss = slot_t.data_ptr<int64_t>();
  scalar_t* fg = fg_t.data_ptr<scalar_t>();
  scalar_t* trans = trans_t.data_ptr<scalar_t>();
  int32_t* last = last_t.data_ptr<int32_t>();
  const int64_t dim = colors_t.size(1), stride = kParams + dim;
  const int64_t hw = grid.height * grid.width, num_tiles = offsets_t.size(0) - 1;
  const scalar_t alpha_min = rules.alpha_min, alpha_max = rules.alpha_max, t_min = rules.t_min;
  // Below this exponent alpha is surely <= alpha_min: skip exp() (the margin keeps the exact test).
  const scalar_t cutoff = std::log(rules.alpha_min) - 1e-3;

  for_each_tile<scalar_t>(num_tiles, [&](int64_t t, std::vector<scalar_t>& scratch) {
    const int64_t image = t % grid.num_images, local = t / grid.num_images;
    const int64_t x0 = (local % grid.tiles_x) * grid.tile_size, y0 = (local / grid.tiles_x) * grid.tile_size;
    const int64_t count = gather_tile(params, colors, slot_gauss, offsets[t], offsets[t + 1], dim, scratch);
    std::vector<scalar_t> acc(dim);
    for (int64_t y = y0; y < std::min(y0 + grid.tile_size, grid.height); ++y) {
      for (int64_t x = x0; x < std::min(x0 + grid.tile_size, grid.width); ++x) {
        const scalar_t px = scalar_t(x) + scalar_t(0.5), py = scalar_t(y) + scalar_t(0.5);
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        scalar_t T = 1;
        int32_t used = 0;
        for (int64_t k = 0; k < count; ++k) {
          const scalar_t* p = scratch.data() + k * stride;
          scalar_t dx, dy;
          const scalar_t e = log_alpha(p, px, py, dx, dy);
          if (e < cutoff) continue;
          const scalar_t raw = std::exp(e);
          if (raw <= alpha_min) continue;
          const scalar_t alpha = std::min(raw, alpha_max);
          const scalar_t t_after = T * (scalar_t(1) - alpha);
          if (t_after <= t_min) break;
          const scalar_t w = alpha * T;
          for (int64_t d = 0; d < dim; ++d) acc[d] += w * p[kParams + d];
          T = t_after;
          used = static_cast<int32_t>(k + 1);
        }
        const int64_t pix = image * hw + y * grid.width + x;
        for (int64_t d = 0; d < dim; ++d) fg[(image * dim + d) * hw + y * grid.width + x] = acc[d];
        trans[pix] = T;
        last[pix] = used;
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& params_t, const at::Tensor& colors_t, const at::Tensor& offsets_t,
                   const at::Tensor& slot_t, const Grid& grid, const Rules& rules, const at::Tensor& trans_t,
                   const at::Tensor& last_t, const at::Tensor& grad_fg_t, const at::Tensor& grad_trans_t,
                   at::Tensor& grad_params_t, at::Tensor& grad_colors_t) {
  const scalar_t* params = params_t.data_ptr<scalar_t>();
  const scalar_t* colors = colors_t.data_ptr<scalar_t>();
  const int64_t* offsets = offsets_t.data_ptr<int64_t>();
  const int64_t* slot_gauss = slot_t.data_ptr<int64_t>();
  const scalar_t* trans = trans_t.data_ptr<scalar_t>();
  const int32_t* last = last_t.data_ptr<int32_t>();
  const scalar_t* grad_fg = grad_fg_t.data_ptr<scalar_t>();
  const scalar_t* grad_trans = grad_trans_t.data_ptr<scalar_t>();
  const int64_t dim = colors_t.size(1), stride = kParams + dim;
  const int64_t hw = grid.height * grid.width, num_tiles = offsets_t.size(0) - 1;
  const int64_t num_slots = slot_t.size(0);
  const scalar_t alpha_min = rules.alpha_min, alpha_max = rules.alpha_max;
  const scalar_t cutoff = std::log(rules.alpha_min) - 1e-3;
  // Per-slot gradients [S, 6 + D]: each slot belongs to one tile, so one thread writes it.
  std::vector<scalar_t> slot_grads(num_slots * stride, scalar_t(0));

  for_each_tile<scalar_t>(num_tiles, [&](int64_t t, std::vector<scalar_t>& scratch) {
    const int64_t image = t % grid.num_images, local = t / grid.num_images;
    const int64_t x0 = (local % grid.tiles_x) * grid.tile_size, y0 = (local / grid.tiles_x) * grid.tile_size;
    gather_tile(params, colors, slot_gauss, offsets[t], offsets[t + 1], dim, scratch);
    scalar_t* tile_grads = slot_grads.data() + offsets[t] * stride;
    std::vector<scalar_t> g(dim);
    for (int64_t y = y0; y < std::min(y0 + grid.tile_size, grid.height); ++y) {
      for (int64_t x = x0; x < std::min(x0 + grid.tile_size, grid.width); ++x) {
        const scalar_t px = scalar_t(x) + scalar_t(0.5), py = scalar_t(y) + scalar_t(0.5);
        const int64_t pix = image * hw + y * grid.width + x;
        for (int64_t d = 0; d < dim; ++d) g[d] = grad_fg[(image * dim + d) * hw + y * grid.width + x];
        scalar_t T = trans[pix];
        // behind: sum over composited Gaussians j behind the current one of q_j w_j, plus T_final dL/dT_final.
        scalar_t behind = grad_trans[pix] * T;
        for (int64_t k = last[pix] - 1; k >= 0; --k) {
          const scalar_t* p = scratch.data() + k * stride;
          scalar_t dx, dy;
          const scalar_t e = log_alpha(p, px, py, dx, dy);
          if (e < cutoff) continue;
          const scalar_t raw = std::exp(e);
          if (raw <= alpha_min) continue;
          const scalar_t alpha = std::min(raw, alpha_max);
          const scalar_t one_minus = scalar_t(1) - alpha;
          T /= one_minus;  // transmittance in front of this Gaussian
          const scalar_t w = alpha * T;
          scalar_t q = 0;
          scalar_t* out = tile_grads + k * stride;
          for (int64_t d = 0; d < dim; ++d) {
            q += g[d] * p[kParams + d];
            out[kParams + d] += g[d] * w;
          }
          const scalar_t grad_alpha = q * T - behind / one_minus;
          behind += q * w;
          if (raw >= alpha_max) continue;  // clamped: alpha does not depend on the parameters
          const scalar_t grad_log = grad_alpha * alpha;  // d alpha / d log(alpha) = alpha
          out[0] -= grad_log * (p[2] * dx + p[3] * dy);
          out[1] -= grad_log * (p[3] * dx + p[4] * dy);
          out[2] -= grad_log * scalar_t(0.5) * dx * dx;
          out[3] -= grad_log * dx * dy;
          out[4] -= grad_log * scalar_t(0.5) * dy * dy;
          out[5] += grad_log;
        }
      }
    }
  });

  // Sum the slots of each Gaussian in slot order; columns are independent, so split them over threads.
  scalar_t* grad_params = grad_params_t.data_ptr<scalar_t>();
  scalar_t* grad_colors = grad_colors_t.data_ptr<scalar_t>();
  at::parallel_for(0, stride, 1, [&](int64_t begin, int64_t end) {
    for (int64_t col = begin; col < end; ++col) {
      scalar_t* dst = col < kParams ? grad_params + col : grad_colors + (col - kParams);
      const int64_t dst_stride = col < kParams ? kParams : dim;
      for (int64_t s = 0; s < num_slots; ++s) dst[slot_gauss[s] * dst_stride] += slot_grads[s * stride + col];
    }
  });
}

void check_inputs(const at::Tensor& params, const at::Tensor& colors, const at::Tensor& offsets,
                  const at::Tensor& slot_gauss, const Grid& grid) {
  TORCH_CHECK(params.device().is_cpu() && colors.device().is_cpu(), "rasterize_cpu: CPU tensors only");
  TORCH_CHECK(params.dim() == 2 && params.size(1) == kParams && params.is_contiguous(), "params must be [M, 6] contiguous");
  TORCH_CHECK(colors.dim() == 2 && colors.size(0) == params.size(0) && colors.is_contiguous(), "colors must be [M, D] contiguous");
  TORCH_CHECK(colors.scalar_type() == params.scalar_type(), "params and colors must share a dtype");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && slot_gauss.scalar_type() == at::kLong, "offsets, slot_gauss: int64");
  TORCH_CHECK(offsets.is_contiguous() && slot_gauss.is_contiguous(), "offsets, slot_gauss must be contiguous");
  const int64_t tiles_y = (grid.height + grid.tile_size - 1) / grid.tile_size;
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == grid.num_images * grid.tiles_x * tiles_y + 1,
              "offsets must be [num_tiles + 1]");
  TORCH_CHECK(params.size(0) % grid.num_images == 0, "params rows must be a multiple of num_images");
}

std::vector<at::Tensor> composite_forward(const at::Tensor& params, const at::Tensor& colors, const at::Tensor& offsets,
                                          const at::Tensor& slot_gauss, int64_t num_images, int64_t height,
                                          int64_t width, int64_t tile_size, int64_t tiles_x, double alpha_min,
                                          double alpha_max, double t_min) {
  const Grid grid{num_images, height, width, tile_size, tiles_x};
  check_inputs(params, colors, offsets, slot_gauss, grid);
  auto fg = at::zeros({num_images, colors.size(1), height, width}, colors.options());
  auto trans = at::ones({num_images, 1, height, width}, colors.options());
  auto last = at::zeros({num_images, height, width}, colors.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "composite_forward", [&] {
    forward_impl<scalar_t>(params, colors, offsets, slot_gauss, grid, Rules{alpha_min, alpha_max, t_min}, fg, trans, last);
  });
  return {fg, trans, last};
}

std::vector<at::Tensor> composite_backward(const at::Tensor& params, const at::Tensor& colors,
                                           const at::Tensor& offsets, const at::Tensor& slot_gauss,
                                           const at::Tensor& trans, const at::Tensor& last, const at::Tensor& grad_fg,
                                           const at::Tensor& grad_trans, int64_t num_images, int64_t height,
                                           int64_t width, int64_t tile_size, int64_t tiles_x, double alpha_min,
                                           double alpha_max, double t_min) {
  const Grid grid{num_images, height, width, tile_size, tiles_x};
  check_inputs(params, colors, offsets, slot_gauss, grid);
  TORCH_CHECK(grad_fg.sizes() == at::IntArrayRef({num_images, colors.size(1), height, width}) && grad_fg.is_contiguous(),
              "grad_fg must be [I, D, H, W] contiguous");
  TORCH_CHECK(grad_trans.sizes() == trans.sizes() && grad_trans.is_contiguous() && trans.is_contiguous(),
              "grad_trans must be [I, 1, H, W] contiguous");
  TORCH_CHECK(grad_fg.scalar_type() == params.scalar_type() && grad_trans.scalar_type() == params.scalar_type(),
              "gradients must share the params' dtype");
  TORCH_CHECK(last.scalar_type() == at::kInt && last.is_contiguous(), "last must be int32 contiguous");
  auto grad_params = at::zeros_like(params);
  auto grad_colors = at::zeros_like(colors);
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "composite_backward", [&] {
    backward_impl<scalar_t>(params, colors, offsets, slot_gauss, grid, Rules{alpha_min, alpha_max, t_min}, trans, last,
                            grad_fg, grad_trans, grad_params, grad_colors);
  });
  return {grad_params, grad_colors};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("composite_forward", &composite_forward, "tile compositing forward -> (fg, trans, last)");
  m.def("composite_backward", &composite_backward, "tile compositing backward -> (grad_params, grad_colors)");
}
