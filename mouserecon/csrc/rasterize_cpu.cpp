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
#include <thread>
#include <vector>

namespace {

constexpr int kParams = 6;

struct Grid {
  int64_t num_images, height, width, tile_size, tiles_x;
};

struct Rules {
  double alpha_min, alpha_max, t_min;
};

// Runs fn(worker) on at::get_num_threads() threads (at most max_workers). Plain std::thread: ATen's
// parallel_for is OpenMP pragmas in headers and would run serially without -fopenmp here.
template <typename F>
void run_workers(int64_t max_workers, const F& fn) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), max_workers));
  std::vector<std::thread> threads;
  for (int64_t w = 1; w < workers; ++w) threads.emplace_back(fn, w);
  fn(0);
  for (auto& thread : threads) thread.join();
}

// Runs fn(tile, scratch) for every tile in [0, num_tiles), tiles handed out one by one.
template <typename scalar_t, typename F>
void for_each_tile(int64_t num_tiles, const F& fn) {
  std::atomic<int64_t> next{0};
  run_workers(num_tiles, [&](int64_t) {
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

// The pixels where a Gaussian can have alpha > alpha_min lie in the ellipse sigma <= L with
// L = log_opacity - log(alpha_min) (plus a 1e-3 margin, so rounding never drops a pixel; the exact
// test is still made per pixel). Visiting only those pixels gives, per pixel, the same sequence of
// operations as walking the whole tile list. Spans are computed in double.
struct Ellipse {
  double mx, my, a, b, c, L;
  bool empty, degenerate;
};

template <typename scalar_t>
inline Ellipse ellipse(const scalar_t* p, double log_alpha_min) {
  Ellipse el{p[0], p[1], p[2], p[3], p[4], double(p[5]) - log_alpha_min + 1e-3, false, false};
  el.empty = !(el.L > 0);
  el.degenerate = !(el.a > 0 && el.a * el.c - el.b * el.b > 0);
  return el;
}

// Clamps [floor(lo_centre - 0.5) ... ] to the pixel range [start, end): pixel x has centre x + 0.5.
inline void centres_in(double lo, double hi, int64_t start, int64_t end, int64_t& first, int64_t& stop) {
  first = static_cast<int64_t>(std::ceil(std::max(lo - 0.5, double(start) - 1.0)));
  stop = static_cast<int64_t>(std::floor(std::min(hi - 0.5, double(end) + 1.0))) + 1;
  first = std::max(first, start);
  stop = std::min(stop, end);
}

// Rows [first, stop) of [y0, y1) the ellipse reaches.
inline void ellipse_rows(const Ellipse& el, int64_t y0, int64_t y1, int64_t& first, int64_t& stop) {
  if (el.degenerate) {
    first = y0, stop = y1;
    return;
  }
  const double half = std::sqrt(2.0 * el.L * el.a / (el.a * el.c - el.b * el.b));
  centres_in(el.my - half, el.my + half, y0, y1, first, stop);
}

// Columns [first, stop) of [x0, x1) the ellipse reaches in row y (empty if it misses the row).
inline void ellipse_cols(const Ellipse& el, int64_t y, int64_t x0, int64_t x1, int64_t& first, int64_t& stop) {
  if (el.degenerate) {
    first = x0, stop = x1;
    return;
  }
  // 0.5 a dx^2 + b dy dx + 0.5 c dy^2 <= L in dx = mx - px.
  const double dy = el.my - (double(y) + 0.5);
  const double disc = (el.b * el.b - el.a * el.c) * dy * dy + 2.0 * el.a * el.L;
  if (disc < 0) {
    first = stop = x0;
    return;
  }
  const double root = std::sqrt(disc);
  centres_in(el.mx - (root - el.b * dy) / el.a, el.mx + (root + el.b * dy) / el.a, x0, x1, first, stop);
}

template <typename scalar_t>
void forward_impl(const at::Tensor& params_t, const at::Tensor& colors_t, const at::Tensor& offsets_t,
                  const at::Tensor& slot_t, const Grid& grid, const Rules& rules,
                  at::Tensor& fg_t, at::Tensor& trans_t, at::Tensor& last_t) {
  const scalar_t* params = params_t.data_ptr<scalar_t>();
  const scalar_t* colors = colors_t.data_ptr<scalar_t>();
  const int64_t* offsets = offsets_t.data_ptr<int64_t>();
  const int64_t* slot_gauss = slot_t.data_ptr<int64_t>();
  scalar_t* fg = fg_t.data_ptr<scalar_t>();
  scalar_t* trans = trans_t.data_ptr<scalar_t>();
  int32_t* last = last_t.data_ptr<int32_t>();
  const int64_t dim = colors_t.size(1), stride = kParams + dim;
  const int64_t hw = grid.height * grid.width, num_tiles = offsets_t.size(0) - 1, ts = grid.tile_size;
  const scalar_t alpha_min = rules.alpha_min, alpha_max = rules.alpha_max, t_min = rules.t_min;
  // Below this exponent alpha is surely <= alpha_min: skip exp() (the margin keeps the exact test).
  const double log_alpha_min = std::log(rules.alpha_min);
  const scalar_t cutoff = log_alpha_min - 1e-3;

  for_each_tile<scalar_t>(num_tiles, [&](int64_t t, std::vector<scalar_t>& scratch) {
    const int64_t image = t % grid.num_images, local = t / grid.num_images;
    const int64_t x0 = (local % grid.tiles_x) * ts, y0 = (local / grid.tiles_x) * ts;
    const int64_t x1 = std::min(x0 + ts, grid.width), y1 = std::min(y0 + ts, grid.height);
    const int64_t begin = offsets[t], count = gather_tile(params, colors, slot_gauss, begin, offsets[t + 1], dim, scratch);
    // Per pixel of the tile (row-major, ts x ts): transmittance, colour sum, last used + 1, stopped.
    std::vector<scalar_t> T(ts * ts, scalar_t(1)), acc(ts * ts * dim, scalar_t(0));
    std::vector<int32_t> used(ts * ts, 0);
    std::vector<char> done(ts * ts, 0);
    int64_t open = (x1 - x0) * (y1 - y0);
    // Gaussians front to back, each over the pixels of its ellipse.
    for (int64_t k = 0; k < count && open > 0; ++k) {
      const scalar_t* p = scratch.data() + k * stride;
      const Ellipse el = ellipse(p, log_alpha_min);
      if (el.empty) continue;
      int64_t ya, yb, xa, xb;
      ellipse_rows(el, y0, y1, ya, yb);
      for (int64_t y = ya; y < yb; ++y) {
        ellipse_cols(el, y, x0, x1, xa, xb);
        for (int64_t x = xa; x < xb; ++x) {
          const int64_t i = (y - y0) * ts + (x - x0);
          if (done[i]) continue;
          scalar_t dx, dy;
          const scalar_t e = log_alpha(p, scalar_t(x) + scalar_t(0.5), scalar_t(y) + scalar_t(0.5), dx, dy);
          if (e < cutoff) continue;
          const scalar_t raw = std::exp(e);
          if (raw <= alpha_min) continue;
          const scalar_t alpha = std::min(raw, alpha_max);
          const scalar_t t_after = T[i] * (scalar_t(1) - alpha);
          if (t_after <= t_min) {
            done[i] = 1;
            --open;
            continue;
          }
          const scalar_t w = alpha * T[i];
          for (int64_t d = 0; d < dim; ++d) acc[i * dim + d] += w * p[kParams + d];
          T[i] = t_after;
          used[i] = static_cast<int32_t>(k + 1);
        }
      }
    }
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x = x0; x < x1; ++x) {
        const int64_t i = (y - y0) * ts + (x - x0), pix = image * hw + y * grid.width + x;
        for (int64_t d = 0; d < dim; ++d) fg[(image * dim + d) * hw + y * grid.width + x] = acc[i * dim + d];
        trans[pix] = T[i];
        last[pix] = used[i];
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& params_t, const at::Tensor& colors_t, const at::Tensor& offsets_t,
                   const at::Tensor& slot_t, const Grid& grid, const Rules& rules,
                   const at::Tensor& trans_t, const at::Tensor& last_t, const at::Tensor& grad_fg_t,
                   const at::Tensor& grad_trans_t, at::Tensor& grad_params_t, at::Tensor& grad_colors_t) {
  const scalar_t* params = params_t.data_ptr<scalar_t>();
  const scalar_t* colors = colors_t.data_ptr<scalar_t>();
  const int64_t* offsets = offsets_t.data_ptr<int64_t>();
  const int64_t* slot_gauss = slot_t.data_ptr<int64_t>();
  const scalar_t* trans = trans_t.data_ptr<scalar_t>();
  const int32_t* last = last_t.data_ptr<int32_t>();
  const scalar_t* grad_fg = grad_fg_t.data_ptr<scalar_t>();
  const scalar_t* grad_trans = grad_trans_t.data_ptr<scalar_t>();
  const int64_t dim = colors_t.size(1), stride = kParams + dim;
  const int64_t hw = grid.height * grid.width, num_tiles = offsets_t.size(0) - 1, ts = grid.tile_size;
  const int64_t num_slots = slot_t.size(0);
  const scalar_t alpha_min = rules.alpha_min, alpha_max = rules.alpha_max;
  const double log_alpha_min = std::log(rules.alpha_min);
  const scalar_t cutoff = log_alpha_min - 1e-3;
  // Per-slot gradients [S, 6 + D]: each slot belongs to one tile, so one thread writes it.
  std::vector<scalar_t> slot_grads(num_slots * stride, scalar_t(0));

  for_each_tile<scalar_t>(num_tiles, [&](int64_t t, std::vector<scalar_t>& scratch) {
    const int64_t image = t % grid.num_images, local = t / grid.num_images;
    const int64_t x0 = (local % grid.tiles_x) * ts, y0 = (local / grid.tiles_x) * ts;
    const int64_t x1 = std::min(x0 + ts, grid.width), y1 = std::min(y0 + ts, grid.height);
    const int64_t begin = offsets[t];
    gather_tile(params, colors, slot_gauss, begin, offsets[t + 1], dim, scratch);
    scalar_t* tile_grads = slot_grads.data() + begin * stride;
    // Per pixel: dL/dfg, T behind the current Gaussian, last used + 1, and behind = sum over the
    // composited Gaussians j behind the current one of q_j w_j, plus T_final dL/dT_final.
    std::vector<scalar_t> g(ts * ts * dim, scalar_t(0)), T(ts * ts, scalar_t(1)), behind(ts * ts, scalar_t(0));
    std::vector<int32_t> stop(ts * ts, 0);
    int32_t max_stop = 0;
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x = x0; x < x1; ++x) {
        const int64_t i = (y - y0) * ts + (x - x0), pix = image * hw + y * grid.width + x;
        for (int64_t d = 0; d < dim; ++d) g[i * dim + d] = grad_fg[(image * dim + d) * hw + y * grid.width + x];
        T[i] = trans[pix];
        behind[i] = grad_trans[pix] * trans[pix];
        stop[i] = last[pix];
        max_stop = std::max(max_stop, stop[i]);
      }
    }
    for (int64_t k = max_stop - 1; k >= 0; --k) {
      const scalar_t* p = scratch.data() + k * stride;
      scalar_t* out = tile_grads + k * stride;
      const Ellipse el = ellipse(p, log_alpha_min);
      if (el.empty) continue;
      int64_t ya, yb, xa, xb;
      ellipse_rows(el, y0, y1, ya, yb);
      for (int64_t y = ya; y < yb; ++y) {
        ellipse_cols(el, y, x0, x1, xa, xb);
        for (int64_t x = xa; x < xb; ++x) {
          const int64_t i = (y - y0) * ts + (x - x0);
          if (k >= stop[i]) continue;
          scalar_t dx, dy;
          const scalar_t e = log_alpha(p, scalar_t(x) + scalar_t(0.5), scalar_t(y) + scalar_t(0.5), dx, dy);
          if (e < cutoff) continue;
          const scalar_t raw = std::exp(e);
          if (raw <= alpha_min) continue;
          const scalar_t alpha = std::min(raw, alpha_max);
          const scalar_t one_minus = scalar_t(1) - alpha;
          T[i] /= one_minus;  // transmittance in front of this Gaussian
          const scalar_t w = alpha * T[i];
          scalar_t q = 0;
          for (int64_t d = 0; d < dim; ++d) {
            q += g[i * dim + d] * p[kParams + d];
            out[kParams + d] += g[i * dim + d] * w;
          }
          const scalar_t grad_alpha = q * T[i] - behind[i] / one_minus;
          behind[i] += q * w;
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
  std::atomic<int64_t> next{0};
  run_workers(stride, [&](int64_t) {
    for (int64_t col = next++; col < stride; col = next++) {
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
