// CPU rasterizer of 3D Gaussians (mouserecon.render_cpp): EWA projection forward and backward (see
// "projection" below), tile binning, compositing forward and backward.
//
// Same rules as mouserecon/render_torch.py (gsplat 1.5.3 classic mode): per pixel (centre at +0.5),
// front to back through its tile's depth-sorted list, alpha = min(alpha_max, exp(log_opacity - sigma))
// with sigma = 0.5 (a dx^2 + c dy^2) + b dx dy, dx = mean - pixel; skipped unless alpha > alpha_min; the
// pixel stops before a Gaussian that would bring T to <= t_min. The constants come from Python.
//
// Layout. params [M, 6] = (mean x, mean y, conic a, b, c, log opacity), colors [M, D], M = I * N
// image-Gaussians (row g = image * N + n). Tile t = image * tiles_per_image + row * tiles_x + column owns
// the slots offsets[t] .. offsets[t + 1] - 1, front to back; slot s holds Gaussian slot_gauss[s].
//
// Binning (bin_tiles). A Gaussian goes to the tiles of its bounding box (radii, exactly the tiles the
// torch backend gives it) whose pixel centres its alpha > alpha_min ellipse reaches (tile culling:
// a tile it misses could only ever skip it), and records the rows and columns of the tile its ellipse
// reaches (the slot's span). Each image's visible Gaussians are sorted by depth (stable radix sort, ties
// by index as the torch backend's stable sort), then counted and written per tile in that order, so every
// list comes out depth-sorted. Gaussian g's slots, in tile order, are listed as
// gauss_slots[gauss_offsets[g] .. gauss_offsets[g + 1] - 1]: the backward writes each slot's gradient at
// the slot (in tile order, so the writes are sequential) and sums a Gaussian's from there, in that order.
//
// Compositing. A tile is ts x ts pixels; each Gaussian of its list visits the rows its ellipse reaches
// and, in each, all ts pixels at once, or the half of them that holds its columns where they fit in half
// a tile (narrow_lanes; most do). The colour count is a compile-time constant for 3 (RGB) and 4 (RGB +
// depth), so the colour sums stay inside the lane loops. Those loops have no branches (selects instead),
// so the compiler vectorises them for the host's vector unit (render_cpp compiles with -march=native and
// -fno-trapping-math where the compiler takes them; see forward_row for the form GCC needs). exp() is our
// own (range reduction + Taylor polynomial, 1-2 ulp), because libm's does not vectorise without -ffast-math.
// A Gaussian's alphas over its rows are computed first, in a pass of their own (raw_rows), then composited.
// The forward saves the final transmittance and, per pixel, the position of its last composited Gaussian
// + 1; the backward walks each tile back to front from there, recovering T before each Gaussian by
// division (the 3DGS scheme). Per pixel it accumulates only G = dL/dlog(alpha), G dy and G dy^2 (and the
// colour terms): a lane's dx is the same in every row, so the six parameter gradients follow per Gaussian
// from these and dx (finish_lanes, finish_gaussian). Tiles and Gaussian records are gathered into
// per-thread scratch first.
//
// Threads: torch's OpenMP ones where render_cpp builds with -fopenmp, else std::thread (run_workers).
// Determinism: each tile (and each Gaussian's sum) is computed by one thread in a fixed order; work is
// handed out dynamically but no result depends on which thread or how many threads compute it.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(_MSC_VER)
#define RESTRICT __restrict
#else
#define RESTRICT __restrict__
#endif

namespace {

constexpr int kParams = 6;

struct Grid {
  int64_t num_images, height, width, tile_size, tiles_x, tiles_y;
  int64_t tiles_per_image() const { return tiles_x * tiles_y; }
  int64_t num_tiles() const { return num_images * tiles_per_image(); }
};

Grid make_grid(int64_t num_images, int64_t height, int64_t width, int64_t tile_size) {
  TORCH_CHECK(tile_size == 4 || tile_size == 8 || tile_size == 16 || tile_size == 32,
              "rasterize_cpu: tile_size must be 4, 8, 16 or 32, got ", tile_size);
  TORCH_CHECK(num_images >= 0 && height > 0 && width > 0, "rasterize_cpu: bad image grid ", num_images, " x ",
              height, " x ", width);
  return Grid{num_images, height, width, tile_size, (width + tile_size - 1) / tile_size,
              (height + tile_size - 1) / tile_size};
}

struct Rules {
  double alpha_min, alpha_max, t_min;
};

// ---- threads ------------------------------------------------------------------------------------

// Runs fn(worker) on at::get_num_threads() threads (at most max_workers). Built with OpenMP (render_cpp
// does where torch's threads are OpenMP ones, so the runtime is torch's), the threads are torch's own pool:
// threads of our own would share the cores with torch's, which spin-wait for a while after each torch op.
// Otherwise plain std::thread. Work is handed out by the callers, so the team's size changes no result.
template <typename F>
void run_workers(int64_t max_workers, const F& fn) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), max_workers));
  if (workers == 1) {
    fn(0);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(workers)
  fn(omp_get_thread_num());
#else
  std::vector<std::thread> threads;
  for (int64_t w = 1; w < workers; ++w) threads.emplace_back(fn, w);
  fn(0);
  for (auto& thread : threads) thread.join();
#endif
}

// Calls fn(item, state) for item in [0, n), items handed out one by one; state = make_state(), one per thread.
template <typename MakeState, typename F>
void for_each_item(int64_t n, const MakeState& make_state, const F& fn) {
  std::atomic<int64_t> next{0};
  run_workers(n, [&](int64_t) {
    auto state = make_state();
    for (int64_t i = next++; i < n; i = next++) fn(i, state);
  });
}

// ---- vectorisable exp ---------------------------------------------------------------------------

template <typename T>
struct ExpConstants;
template <>
struct ExpConstants<float> {
  using Int = int32_t;
  static constexpr float lo = -87.0f, hi = 88.0f, shift = 12582912.0f;  // 1.5 * 2^23: round to integer
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr int mantissa = 23, bias = 127, degree = 7;  // Taylor remainder 5e-9 on |r| <= ln2 / 2
};
template <>
struct ExpConstants<double> {
  using Int = int64_t;
  static constexpr double lo = -708.0, hi = 709.0, shift = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  static constexpr int mantissa = 52, bias = 1023, degree = 13;  // remainder 5e-18
};

// exp(x) for x clamped to [lo, hi] (NaN -> lo): x = n ln2 + r, exp(r) by its Taylor polynomial, times 2^n from
// the bits. float's degree-7 polynomial is evaluated by Estrin's scheme (pairs, then pairs of pairs: 3
// dependent multiply-adds instead of Horner's 7), since the compositing loops wait on this chain; double's
// by Horner.
template <typename T>
inline T exp_vec(T x) {
  using C = ExpConstants<T>;
  x = x > C::lo ? x : C::lo;
  x = x < C::hi ? x : C::hi;
  const T n = (x * T(1.4426950408889634) + C::shift) - C::shift;
  const T r = (x - n * C::ln2_hi) - n * C::ln2_lo;
  T p;
  if constexpr (C::degree == 7) {
    const T r2 = r * r, r4 = r2 * r2;
    const T p01 = T(1) + r, p23 = T(1.0 / 2) + T(1.0 / 6) * r, p45 = T(1.0 / 24) + T(1.0 / 120) * r;
    const T p67 = T(1.0 / 720) + T(1.0 / 5040) * r;
    p = (p01 + r2 * p23) + r4 * (p45 + r2 * p67);
  } else {
    T inv_factorial = 1;
    for (int k = 2; k <= C::degree; ++k) inv_factorial /= T(k);  // folded at compile time
    p = inv_factorial;
    for (int k = C::degree; k >= 1; --k) {
      inv_factorial *= T(k);  // 1 / (k - 1)!
      p = p * r + inv_factorial;
    }
  }
  const typename C::Int bits = (static_cast<typename C::Int>(n) + C::bias) << C::mantissa;
  T scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// ---- ellipse geometry (double) ------------------------------------------------------------------

// The pixels where a Gaussian can have alpha > alpha_min lie in the ellipse q(d) = 0.5 a dx^2 + b dx dy +
// 0.5 c dy^2 <= L, d = mean - pixel, L = log_opacity - log(alpha_min) (plus a 1e-3 margin, so rounding
// never drops a pixel; the exact test is still made per pixel).
struct Ellipse {
  double mx, my, a, b, c, L, det;  // det = a c - b^2
  bool empty, degenerate;  // no pixel can pass / not positive definite: every pixel of the box may pass
};

template <typename scalar_t>
inline Ellipse ellipse(const scalar_t* p, double log_alpha_min) {
  Ellipse el{p[0], p[1], p[2], p[3], p[4], double(p[5]) - log_alpha_min + 1e-3, 0.0, false, false};
  el.det = el.a * el.c - el.b * el.b;
  el.empty = !(el.L > 0);
  el.degenerate = !(el.a > 0 && el.det > 0);
  return el;
}

// Does the ellipse reach a pixel centre of [cx0, cx1] x [cy0, cy1] (centre coordinates)? The smallest q
// over the box is 0 if the mean is inside, else on an edge. Along the edge at dx, q is a parabola in dy,
// smallest at dy* = -b dx / c with value dx^2 det / (2 c), or at the end of [dy_lo, dy_hi] nearer dy*; the
// tests are multiplied through by c > 0 (or a, along y), so they take no division.
inline bool reaches_box(const Ellipse& el, double cx0, double cx1, double cy0, double cy1) {
  if (el.empty) return false;
  if (el.degenerate) return true;
  const double dx_lo = el.mx - cx1, dx_hi = el.mx - cx0, dy_lo = el.my - cy1, dy_hi = el.my - cy0;
  if (dx_lo <= 0 && dx_hi >= 0 && dy_lo <= 0 && dy_hi >= 0) return true;
  const auto q = [&](double dx, double dy) { return 0.5 * el.a * dx * dx + el.b * dx * dy + 0.5 * el.c * dy * dy; };
  // Edge at u (fixed), v in [lo, hi]; k = the coefficient of v^2 (times 2): min of q <= L?
  const auto edge = [&](double u, double k, double lo, double hi, auto q_at) {
    const double t = -el.b * u;  // k * v*
    if (t <= k * lo) return q_at(lo) <= el.L;
    if (t >= k * hi) return q_at(hi) <= el.L;
    return 0.5 * u * u * el.det <= el.L * k;
  };
  for (const double dx : {dx_lo, dx_hi}) {
    if (edge(dx, el.c, dy_lo, dy_hi, [&](double dy) { return q(dx, dy); })) return true;
  }
  for (const double dy : {dy_lo, dy_hi}) {
    if (edge(dy, el.a, dx_lo, dx_hi, [&](double dx) { return q(dx, dy); })) return true;
  }
  return false;
}

// A non-empty ellipse's reach: the pixels i along x (y) whose centre i + 0.5 it reaches are those in
// [lo, hi], within its half extent sqrt(2 L Sigma_xx) (sqrt(2 L Sigma_yy)) of its centre; degenerate:
// [-inf, inf] (every pixel of the box may pass).
struct Reach {
  double x_lo, x_hi, y_lo, y_hi;
  explicit Reach(const Ellipse& el) {
    constexpr double inf = std::numeric_limits<double>::infinity();
    if (el.degenerate) {
      x_lo = y_lo = -inf, x_hi = y_hi = inf;
    } else {
      const double s = 2.0 * el.L / el.det;
      const double hx = std::sqrt(s * el.c), hy = std::sqrt(s * el.a);
      x_lo = el.mx - hx - 0.5, x_hi = el.mx + hx - 0.5, y_lo = el.my - hy - 0.5, y_hi = el.my + hy - 0.5;
    }
  }
};

// Rows (or columns) [first, stop) of a tile's [0, count), from pixel `origin` on, in a reach [lo, hi].
inline void span(double lo, double hi, int64_t origin, int64_t count, int64_t& first, int64_t& stop) {
  const auto clip = [&](double v) {  // to [-1, count] (NaN -> -1): the conversions below are exact
    v -= double(origin);
    v = v > -1.0 ? v : -1.0;
    return v < double(count) ? v : double(count);
  };
  first = std::max<int64_t>(0, static_cast<int64_t>(std::ceil(clip(lo))));
  stop = std::min<int64_t>(count, static_cast<int64_t>(std::floor(clip(hi))) + 1);
}

// A slot's rows [span[0], span[1]) and columns [span[2], span[3]) of its tile, found by the binning (from
// the Gaussian's reach, so the compositing passes take no square root and read them in slot order).
constexpr int kSpan = 4;

// Starts loading what `address` points at (a later gather's miss overlaps this one's work).
inline void prefetch(const void* address) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(address);
#else
  (void)address;
#endif
}

// ---- binning ------------------------------------------------------------------------------------

// Tiles [tx0, tx1) x [ty0, ty1) of a Gaussian's bounding box, as render_torch._bin_tiles computes them.
template <typename scalar_t>
inline void box_tiles(const scalar_t* p, const int32_t* radius, const Grid& grid, int64_t& tx0, int64_t& tx1,
                      int64_t& ty0, int64_t& ty1) {
  const scalar_t ts = scalar_t(grid.tile_size);
  // Clamped in double before the cast: a far off-screen mean must not overflow int64.
  auto clamp = [](double v, int64_t hi) { return static_cast<int64_t>(std::min(std::max(v, 0.0), double(hi))); };
  tx0 = clamp(std::floor((p[0] - scalar_t(radius[0])) / ts), grid.tiles_x);
  tx1 = clamp(std::ceil((p[0] + scalar_t(radius[0])) / ts), grid.tiles_x);
  ty0 = clamp(std::floor((p[1] - scalar_t(radius[1])) / ts), grid.tiles_y);
  ty1 = clamp(std::ceil((p[1] + scalar_t(radius[1])) / ts), grid.tiles_y);
}

// Calls fn(local tile, span) for each tile of a Gaussian's box (params p [6], radius [2]) that its
// ellipse reaches, row-major; span [kSpan]: its rows and columns there.
template <typename scalar_t, typename F>
inline void for_each_tile_of(const scalar_t* p, const int32_t* radius, const Grid& grid, double log_alpha_min,
                             const F& fn) {
  int64_t tx0, tx1, ty0, ty1;
  box_tiles(p, radius, grid, tx0, tx1, ty0, ty1);
  const Ellipse el = ellipse(p, log_alpha_min);
  if (tx0 >= tx1 || ty0 >= ty1 || el.empty) return;
  const Reach r(el);
  const int64_t ts = grid.tile_size;
  for (int64_t ty = ty0; ty < ty1; ++ty) {
    const double cy0 = double(ty * ts) + 0.5, cy1 = double(std::min((ty + 1) * ts, grid.height)) - 0.5;
    for (int64_t tx = tx0; tx < tx1; ++tx) {
      const double cx0 = double(tx * ts) + 0.5, cx1 = double(std::min((tx + 1) * ts, grid.width)) - 0.5;
      if (!reaches_box(el, cx0, cx1, cy0, cy1)) continue;
      int64_t s[kSpan];
      span(r.y_lo, r.y_hi, ty * ts, std::min(ts, grid.height - ty * ts), s[0], s[1]);
      span(r.x_lo, r.x_hi, tx * ts, std::min(ts, grid.width - tx * ts), s[2], s[3]);
      fn(ty * grid.tiles_x + tx, s);
    }
  }
}

// Unsigned keys whose order is the floats' order (negatives flipped), for the radix sort.
inline uint32_t sort_key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits ^ ((bits >> 31) ? 0xFFFFFFFFu : 0x80000000u);
}
inline uint64_t sort_key(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits ^ ((bits >> 63) ? ~uint64_t(0) : (uint64_t(1) << 63));
}

// Stable LSD radix sort of items by keys (11-bit digits); items and keys are permuted together.
template <typename Key>
void radix_sort(std::vector<Key>& keys, std::vector<int32_t>& items) {
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  std::vector<Key> keys_tmp(keys.size());
  std::vector<int32_t> items_tmp(items.size());
  std::vector<int64_t> count(kBuckets);
  for (int shift = 0; shift < int(8 * sizeof(Key)); shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (const Key k : keys) ++count[(k >> shift) & (kBuckets - 1)];
    if (std::count(count.begin(), count.end(), int64_t(keys.size())) == 1) continue;  // one digit value: no-op
    int64_t total = 0;
    for (auto& c : count) total += std::exchange(c, total);
    for (size_t i = 0; i < keys.size(); ++i) {
      const int64_t dst = count[(keys[i] >> shift) & (kBuckets - 1)]++;
      keys_tmp[dst] = keys[i];
      items_tmp[dst] = items[i];
    }
    keys.swap(keys_tmp);
    items.swap(items_tmp);
  }
}

// Per image: the visible Gaussians (radii > 0), sorted by depth, ties by index.
template <typename scalar_t>
std::vector<std::vector<int32_t>> depth_order(const scalar_t* depths, const int32_t* radii, int64_t num_images,
                                              int64_t n) {
  std::vector<std::vector<int32_t>> order(num_images);
  for_each_item(num_images, [] { return 0; }, [&](int64_t image, int) {
    using Key = decltype(sort_key(scalar_t(0)));
    std::vector<Key> keys;
    auto& items = order[image];
    for (int64_t g = image * n; g < (image + 1) * n; ++g) {
      if (radii[2 * g] > 0 && radii[2 * g + 1] > 0) {
        items.push_back(static_cast<int32_t>(g));
        keys.push_back(sort_key(depths[g]));
      }
    }
    radix_sort(keys, items);
  });
  return order;
}

// A run of one image's depth-sorted Gaussians, binned by one thread: the local tiles each reaches, in
// order (tiles [pairs]), and the pairs per tile (counts [tiles_per_image], then the run's first slots).
struct BinChunk {
  int64_t image, begin, end;
  std::vector<int32_t> tiles;
  std::vector<uint32_t> spans;  // [pairs], each kSpan bytes
  std::vector<int64_t> counts;
};

template <typename scalar_t>
std::vector<at::Tensor> bin_impl(const at::Tensor& params_t, const at::Tensor& depths_t, const at::Tensor& radii_t,
                                 const Grid& grid, double alpha_min) {
  const scalar_t* params = params_t.data_ptr<scalar_t>();
  const int32_t* radii = radii_t.data_ptr<int32_t>();
  const int64_t m = params_t.size(0), n = grid.num_images ? m / grid.num_images : 0, tpi = grid.tiles_per_image();
  const double log_alpha_min = std::log(alpha_min);
  const auto order = depth_order(depths_t.data_ptr<scalar_t>(), radii, grid.num_images, n);

  // Runs of >= 4096 Gaussians, about 4 per thread. Each finds its Gaussians' tiles and counts them.
  int64_t visible = 0;
  for (const auto& o : order) visible += int64_t(o.size());
  const int64_t run = std::max<int64_t>(4096, visible / std::max<int64_t>(1, 4 * at::get_num_threads()) + 1);
  std::vector<BinChunk> chunks;
  for (int64_t image = 0; image < grid.num_images; ++image) {
    for (int64_t b = 0; b < int64_t(order[image].size()); b += run) {
      chunks.push_back({image, b, std::min<int64_t>(b + run, order[image].size()), {}, {}});
    }
  }
  auto gauss_offsets_t = at::zeros({m + 1}, params_t.options().dtype(at::kLong));
  int64_t* gauss_offsets = gauss_offsets_t.data_ptr<int64_t>();  // per-Gaussian counts first, at g + 1
  for_each_item(int64_t(chunks.size()), [] { return 0; }, [&](int64_t c, int) {
    BinChunk& ch = chunks[c];
    ch.counts.assign(tpi, 0);
    // The run's params and radii, gathered in depth order first: in a loop that does nothing else, many of
    // these scattered reads are in flight at once (in the tile loop below, about one at a time).
    const int32_t* run = order[ch.image].data() + ch.begin;
    const int64_t count = ch.end - ch.begin;
    const scalar_t* params_at = params;  // locals (and p_at, radius_at): the memcpy might alias the others
    const int32_t* radii_at = radii;
    std::vector<scalar_t> p(count * kParams);
    std::vector<int32_t> radius(count * 2);
    scalar_t* p_at = p.data();
    int32_t* radius_at = radius.data();
    for (int64_t i = 0; i < count; ++i) {  // fixed-size memcpy: inlined (std::copy_n called memmove per row)
      if (i + 16 < count) {
        prefetch(params_at + int64_t(run[i + 16]) * kParams);
        prefetch(radii_at + 2 * int64_t(run[i + 16]));
      }
      std::memcpy(p_at + i * kParams, params_at + int64_t(run[i]) * kParams, kParams * sizeof(scalar_t));
      std::memcpy(radius_at + 2 * i, radii_at + 2 * int64_t(run[i]), 2 * sizeof(int32_t));
    }
    ch.tiles.reserve(2 * count);  // most Gaussians reach 1 or 2 tiles
    ch.spans.reserve(2 * count);
    for (int64_t i = ch.begin; i < ch.end; ++i) {
      const int32_t g = order[ch.image][i];
      const size_t before = ch.tiles.size();
      const int64_t k = i - ch.begin;
      for_each_tile_of(p.data() + k * kParams, radius.data() + 2 * k, grid, log_alpha_min,
                       [&](int64_t local, const int64_t* span) {
        ch.tiles.push_back(int32_t(local));
        const uint8_t bytes[kSpan] = {uint8_t(span[0]), uint8_t(span[1]), uint8_t(span[2]), uint8_t(span[3])};
        uint32_t packed;  // one 4-byte store (byte stores may alias anything: each would reload ch's pointers)
        std::memcpy(&packed, bytes, kSpan);
        ch.spans.push_back(packed);
        ++ch.counts[local];
      });
      gauss_offsets[g + 1] = int64_t(ch.tiles.size() - before);
    }
  });

  // Tile offsets (image-major), each run's first slot per tile, Gaussian offsets.
  auto offsets_t = at::empty({grid.num_tiles() + 1}, gauss_offsets_t.options());
  int64_t* offsets = offsets_t.data_ptr<int64_t>();
  int64_t total = 0;
  size_t first_chunk = 0;
  for (int64_t image = 0; image < grid.num_images; ++image) {
    size_t last_chunk = first_chunk;
    while (last_chunk < chunks.size() && chunks[last_chunk].image == image) ++last_chunk;
    for (int64_t local = 0; local < tpi; ++local) {
      offsets[image * tpi + local] = total;
      for (size_t c = first_chunk; c < last_chunk; ++c) total += std::exchange(chunks[c].counts[local], total);
    }
    first_chunk = last_chunk;
  }
  offsets[grid.num_tiles()] = total;
  TORCH_CHECK(total < std::numeric_limits<int32_t>::max(), "rasterize_cpu: ", total, " tile slots, more than 2^31");
  for (int64_t g = 0; g < m; ++g) gauss_offsets[g + 1] += gauss_offsets[g];

  // Every run writes its pairs in order: per tile, slots follow depth order.
  auto slot_gauss_t = at::empty({total}, params_t.options().dtype(at::kInt));
  auto gauss_slots_t = at::empty({total}, slot_gauss_t.options());
  auto slot_span_t = at::empty({total, kSpan}, slot_gauss_t.options().dtype(at::kByte));
  int32_t* slot_gauss = slot_gauss_t.data_ptr<int32_t>();
  int32_t* gauss_slots = gauss_slots_t.data_ptr<int32_t>();
  uint8_t* slot_span = slot_span_t.data_ptr<uint8_t>();
  for_each_item(int64_t(chunks.size()), [] { return 0; }, [&](int64_t c, int) {
    BinChunk& ch = chunks[c];
    // Locals, not ch's members: the int32 stores below may alias those, which would reload them each time.
    const int32_t* tile = ch.tiles.data();
    const uint32_t* span = ch.spans.data();
    const int32_t* run = order[ch.image].data();
    int64_t* next = ch.counts.data();
    for (int64_t i = ch.begin; i < ch.end; ++i) {
      if (i + 16 < ch.end) prefetch(gauss_offsets + run[i + 16]);  // scattered, as in the gather above
      const int32_t g = run[i];
      for (int64_t dest = gauss_offsets[g]; dest < gauss_offsets[g + 1]; ++dest) {
        const int64_t s = next[*tile++]++;
        slot_gauss[s] = g;
        gauss_slots[dest] = static_cast<int32_t>(s);
        std::memcpy(slot_span + s * kSpan, span++, kSpan);
      }
    }
  });
  return {offsets_t, slot_gauss_t, gauss_slots_t, gauss_offsets_t, slot_span_t};
}

// ---- compositing --------------------------------------------------------------------------------

// A tile's pixels and Gaussians, gathered front to back: [count, 6 + D] (params then colour), and their
// spans [count, kSpan].
template <typename scalar_t>
struct TileView {
  int64_t image, x0, y0, cols, rows, begin, count;
  const scalar_t* gauss;
  const uint8_t* span;
};

// Large scratch arrays kept by the calling thread from one call to the next (grown as needed, given back
// when a call needs under a quarter of one): fresh pages cost a fault each on first touch, and at refine
// sizes (a few MB per call) those faults were a fifth of the compositing backward's time.
enum class Kept { kPacked, kSlotGrads };
template <typename scalar_t>
scalar_t* kept_buffer(Kept which, int64_t n) {
  thread_local std::vector<scalar_t> buffers[2];
  std::vector<scalar_t>& b = buffers[int(which)];
  if (b.size() < size_t(n) || b.size() / 4 > size_t(n)) std::vector<scalar_t>(n).swap(b);
  return b.data();
}

// params [M, 6] and colors [M, D] as one [M, 6 + D] table: a tile's gather then reads one record
// (about one cache line) per Gaussian instead of two; the reads are random, so misses are what costs.
template <typename scalar_t>
const scalar_t* pack_gaussians(const scalar_t* params, const scalar_t* colors, int64_t m, int64_t dim) {
  const int64_t stride = kParams + dim, block = 16384;
  scalar_t* packed = kept_buffer<scalar_t>(Kept::kPacked, m * stride);  // every entry is written below
  for_each_item((m + block - 1) / block, [] { return 0; }, [&](int64_t b, int) {
    for (int64_t g = b * block; g < std::min(m, (b + 1) * block); ++g) {
      for (int j = 0; j < kParams; ++j) packed[g * stride + j] = params[g * kParams + j];
      for (int64_t d = 0; d < dim; ++d) packed[g * stride + kParams + d] = colors[g * dim + d];
    }
  });
  return packed;
}

// D > 0: the colour count, fixed at compile time (a record's copy is then a few vector moves, not a call).
template <typename scalar_t, int D>
TileView<scalar_t> view_tile(int64_t t, const Grid& grid, const int64_t* offsets, const int32_t* slot_gauss,
                             const uint8_t* slot_span, const scalar_t* packed, int64_t dim,
                             std::vector<scalar_t>& scratch) {
  if constexpr (D > 0) dim = D;
  constexpr int64_t kAhead = 16;  // records prefetched ahead of the copy
  const int64_t tpi = grid.tiles_per_image(), local = t % tpi, ts = grid.tile_size;
  TileView<scalar_t> v{t / tpi, (local % grid.tiles_x) * ts, (local / grid.tiles_x) * ts, 0, 0, offsets[t],
                       offsets[t + 1] - offsets[t], nullptr, slot_span + offsets[t] * kSpan};
  v.cols = std::min(ts, grid.width - v.x0);
  v.rows = std::min(ts, grid.height - v.y0);
  const int64_t stride = kParams + dim;
  const int32_t* slots = slot_gauss + v.begin;
  scratch.resize(v.count * stride);
  for (int64_t k = 0; k < v.count; ++k) {
    if (k + kAhead < v.count) prefetch(packed + int64_t(slots[k + kAhead]) * stride);
    const scalar_t* src = packed + int64_t(slots[k]) * stride;
    scalar_t* dst = scratch.data() + k * stride;
    for (int64_t j = 0; j < stride; ++j) dst[j] = src[j];
  }
  v.gauss = scratch.data();
  return v;
}

// Tiles in order of decreasing list length (long tiles first balance the threads; results do not change).
std::vector<int64_t> busiest_first(const int64_t* offsets, int64_t num_tiles) {
  std::vector<int64_t> tiles;
  for (int64_t t = 0; t < num_tiles; ++t) {
    if (offsets[t + 1] > offsets[t]) tiles.push_back(t);
  }
  std::stable_sort(tiles.begin(), tiles.end(),
                   [&](int64_t a, int64_t b) { return offsets[a + 1] - offsets[a] > offsets[b + 1] - offsets[b]; });
  return tiles;
}

// Per-pixel list positions in the lane loops: integers as wide as scalar_t, so the loops vectorise.
template <typename scalar_t>
using Index = std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>;

// One Gaussian's alpha at the TS pixel centres px of a row at vertical offset dy = mean y - centre y.
template <typename scalar_t>
struct RowGaussian {
  scalar_t mx, a, b, c, log_opac, dy, bdy, qy;  // bdy = b dy, qy = 0.5 c dy^2
  RowGaussian(const scalar_t* p, scalar_t centre_y)
      : mx(p[0]), a(p[2]), b(p[3]), c(p[4]), log_opac(p[5]), dy(p[1] - centre_y), bdy(p[3] * dy),
        qy(scalar_t(0.5) * p[4] * dy * dy) {}
  scalar_t raw_alpha(scalar_t dx) const { return exp_vec(log_opac - (scalar_t(0.5) * a * dx * dx + bdy * dx + qy)); }
};

// exp(log opacity - sigma) (before the alpha_max clamp) at W lanes of a row, from pixel centres px.
template <typename scalar_t, int W>
inline void raw_row(const RowGaussian<scalar_t>& gr, const scalar_t* RESTRICT px, scalar_t* RESTRICT raw) {
  for (int l = 0; l < W; ++l) raw[l] = gr.raw_alpha(gr.mx - px[l]);
}

// A fixed number D (<= 4) of colour channels, as scalars (an array indexed in a lane loop stops GCC
// from vectorising it), applied to lane l of [D][P] arrays: y[d * P + l] += a c[d], and <x[. * P + l], c>.
template <typename scalar_t, int D, int P>
struct Colors {
  static_assert(D <= 4, "Colors holds at most 4 channels");
  scalar_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;
  explicit Colors(const scalar_t* c) {
    if constexpr (D > 0) c0 = c[0];
    if constexpr (D > 1) c1 = c[1];
    if constexpr (D > 2) c2 = c[2];
    if constexpr (D > 3) c3 = c[3];
  }
  void add_scaled(scalar_t* RESTRICT y, int l, scalar_t a) const {
    if constexpr (D > 0) y[l] += a * c0;
    if constexpr (D > 1) y[P + l] += a * c1;
    if constexpr (D > 2) y[2 * P + l] += a * c2;
    if constexpr (D > 3) y[3 * P + l] += a * c3;
  }
  // <x[d * P + l], c> over d.
  scalar_t dot(const scalar_t* RESTRICT x, int l) const {
    scalar_t sum = 0;
    if constexpr (D > 0) sum += x[l] * c0;
    if constexpr (D > 1) sum += x[P + l] * c1;
    if constexpr (D > 2) sum += x[2 * P + l] * c2;
    if constexpr (D > 3) sum += x[3 * P + l] * c3;
    return sum;
  }
};

// y += a x and y += x1 x2 over TS lanes (own functions so that the restrict pointers let them vectorise).
template <typename scalar_t, int TS>
inline void add_scaled(scalar_t* RESTRICT y, const scalar_t* RESTRICT x, scalar_t a) {
  for (int l = 0; l < TS; ++l) y[l] += a * x[l];
}
template <typename scalar_t, int TS>
inline void add_product(scalar_t* RESTRICT y, const scalar_t* RESTRICT x1, const scalar_t* RESTRICT x2) {
  for (int l = 0; l < TS; ++l) y[l] += x1[l] * x2[l];
}

// Forward over W lanes of one row of a TS x TS tile for Gaussian k, its raw alphas there raws (raw_rows):
// composites it into the pixels still open (colour sums acc [dim][TS * TS] at the row's first lane), stops
// those it would bring to T <= t_min. Returns the number stopped. With a fixed colour count D the colours
// are added in the lane loop itself; with D = 0 (dim at run time) the weights alpha T (0 where not
// composited) go through w, and are added after it.
template <typename scalar_t, int W, int TS, int D>
inline int forward_row(const scalar_t* RESTRICT raws, Index<scalar_t> k, const Rules& rules,
                       const scalar_t* RESTRICT color, int64_t dim, scalar_t* RESTRICT T, scalar_t* RESTRICT done,
                       Index<scalar_t>* RESTRICT last, scalar_t* RESTRICT acc, scalar_t* RESTRICT w) {
  constexpr int P = TS * TS;
  const scalar_t alpha_min = rules.alpha_min, alpha_max = rules.alpha_max, t_min = rules.t_min;
  const Colors<scalar_t, D, P> col(color);
  // Masks are scalar_t 0/1 and sums integer: with bools, or a float sum (added lane by lane, in order),
  // GCC leaves the loop scalar for AVX2; this form vectorises for AVX2, AVX-512 and NEON alike.
  Index<scalar_t> stops = 0;
  for (int l = 0; l < W; ++l) {
    const scalar_t raw = raws[l];
    const scalar_t alpha = raw < alpha_max ? raw : alpha_max;
    const scalar_t t_before = T[l], t_after = t_before * (scalar_t(1) - alpha);
    const scalar_t open = done[l] == scalar_t(0) ? scalar_t(1) : scalar_t(0);
    const scalar_t live = raw > alpha_min ? open : scalar_t(0);
    const scalar_t stop = t_after <= t_min ? live : scalar_t(0);
    const scalar_t use = live - stop;
    const scalar_t weight = use * (alpha * t_before);  // use is 0 or 1 (a select here stops GCC vectorising)
    if constexpr (D > 0) {
      col.add_scaled(acc, l, weight);
    } else {
      w[l] = weight;
    }
    T[l] = use != scalar_t(0) ? t_after : t_before;
    last[l] = use != scalar_t(0) ? k + 1 : last[l];
    done[l] += stop;
    stops += stop != scalar_t(0) ? 1 : 0;
  }
  if constexpr (D == 0) {
    for (int64_t d = 0; d < dim; ++d) add_scaled<scalar_t, W>(acc + d * P, w, color[d]);
  }
  return int(stops);
}

// Lanes a Gaussian needs in a row: its columns [ca, cb) of the tile. The pixels it does not reach are left
// as they are by the lane loops (alpha <= alpha_min), so a Gaussian whose columns fit in half a tile
// (most are a few pixels wide) runs them on the half-width window of lanes [o, o + TS / 2) that holds
// them, o = narrow_lanes(ca, cb); -1: the whole row (tiles of 4 always take it).
template <int TS>
constexpr int Half = TS >= 8 ? TS / 2 : TS;
template <int TS>
inline int64_t narrow_lanes(int64_t ca, int64_t cb) {
  if (TS < 8 || cb - ca > TS / 2) return -1;
  return std::min<int64_t>(ca, TS - TS / 2);
}

// A Gaussian's raw alphas over its rows [ra, rb) of a tile, on the lanes the rows run (narrow_lanes: its
// window at o, or the whole row): raws [TS][TS], row r at raws + r * TS. Forward and backward take them in a
// pass of their own before the rows' compositing: they do not depend on the other Gaussians, so there
// they overlap freely, while inside the compositing loop their exp's latency held up the chain through T
// from one Gaussian to the next (15 % of the forward's time, 10 % of the backward's).
template <typename scalar_t, int TS>
inline void raw_rows(const scalar_t* p, int64_t y0, int64_t ra, int64_t rb, int64_t o, const scalar_t* px,
                     scalar_t* raws) {
  for (int64_t r = ra; r < rb; ++r) {
    const RowGaussian<scalar_t> gr(p, scalar_t(y0 + r) + scalar_t(0.5));
    if (o < 0) {
      raw_row<scalar_t, TS>(gr, px, raws + r * TS);
    } else {
      raw_row<scalar_t, Half<TS>>(gr, px + o, raws + r * TS);
    }
  }
}

// Per-thread state of the forward: per pixel (row-major, ts x ts) transmittance, colour sums [D][ts^2],
// last composited + 1, stopped (as scalar_t 0/1: same lane width as the data, so it vectorises).
template <typename scalar_t>
struct ForwardState {
  std::vector<scalar_t> scratch, T, acc, done;
  std::vector<Index<scalar_t>> last;
};

template <typename scalar_t, int TS, int D>
void forward_tile(const TileView<scalar_t>& v, int64_t dim, const Rules& rules, ForwardState<scalar_t>& s) {
  constexpr int P = TS * TS;
  if constexpr (D > 0) dim = D;
  const int64_t stride = kParams + dim;
  s.T.assign(P, scalar_t(1));
  s.acc.assign(P * dim, scalar_t(0));
  s.last.assign(P, 0);
  s.done.assign(P, scalar_t(1));  // pixels outside the image stay done
  int row_open[TS] = {};
  for (int64_t r = 0; r < v.rows; ++r) {
    std::fill_n(s.done.begin() + r * TS, v.cols, scalar_t(0));
    row_open[r] = int(v.cols);
  }
  int64_t open = v.rows * v.cols;
  scalar_t px[TS], w[TS];
  for (int l = 0; l < TS; ++l) px[l] = scalar_t(v.x0 + l) + scalar_t(0.5);
  alignas(64) scalar_t raws[TS * TS];

  for (int64_t k = 0; k < v.count && open > 0; ++k) {
    const scalar_t* p = v.gauss + k * stride;
    const uint8_t* sp = v.span + k * kSpan;
    const int64_t ra = sp[0], rb = sp[1], ca = sp[2], cb = sp[3];
    const int64_t o = narrow_lanes<TS>(ca, cb);
    raw_rows<scalar_t, TS>(p, v.y0, ra, rb, o, px, raws);
    for (int64_t r = ra; r < rb; ++r) {
      if (row_open[r] == 0) continue;
      const int64_t at = r * TS + std::max<int64_t>(o, 0);
      const Index<scalar_t> kk(k);
      const scalar_t* raw = raws + r * TS;
      const int stops = o < 0 ? forward_row<scalar_t, TS, TS, D>(raw, kk, rules, p + kParams, dim, s.T.data() + at,
                                                                 s.done.data() + at, s.last.data() + at,
                                                                 s.acc.data() + at, w)
                              : forward_row<scalar_t, Half<TS>, TS, D>(raw, kk, rules, p + kParams, dim,
                                                                       s.T.data() + at, s.done.data() + at,
                                                                       s.last.data() + at, s.acc.data() + at, w);
      row_open[r] -= stops;
      open -= stops;
    }
  }
}

template <typename scalar_t, int TS, int D>
void forward_impl(const at::Tensor& params_t, const at::Tensor& colors_t, const at::Tensor& offsets_t,
                  const at::Tensor& slot_t, const at::Tensor& span_t, const Grid& grid, const Rules& rules,
                  at::Tensor& fg_t, at::Tensor& trans_t, at::Tensor& last_t) {
  const scalar_t* params = params_t.data_ptr<scalar_t>();
  const scalar_t* colors = colors_t.data_ptr<scalar_t>();
  const int64_t* offsets = offsets_t.data_ptr<int64_t>();
  const int32_t* slot_gauss = slot_t.data_ptr<int32_t>();
  const uint8_t* slot_span = span_t.data_ptr<uint8_t>();
  scalar_t* fg = fg_t.data_ptr<scalar_t>();
  scalar_t* trans = trans_t.data_ptr<scalar_t>();
  int32_t* last = last_t.data_ptr<int32_t>();
  const int64_t dim = colors_t.size(1), hw = grid.height * grid.width;
  const auto tiles = busiest_first(offsets, grid.num_tiles());  // empty tiles keep fg 0, T 1, last 0
  const auto packed = pack_gaussians(params, colors, params_t.size(0), dim);

  for_each_item(int64_t(tiles.size()), [] { return ForwardState<scalar_t>(); }, [&](int64_t i, ForwardState<scalar_t>& s) {
    const auto v = view_tile<scalar_t, D>(tiles[i], grid, offsets, slot_gauss, slot_span, packed, dim,
                                          s.scratch);
    forward_tile<scalar_t, TS, D>(v, dim, rules, s);
    for (int64_t r = 0; r < v.rows; ++r) {
      const int64_t pix = v.image * hw + (v.y0 + r) * grid.width + v.x0;
      std::copy_n(s.T.data() + r * TS, v.cols, trans + pix);
      std::copy_n(s.last.data() + r * TS, v.cols, last + pix);
      for (int64_t d = 0; d < dim; ++d) {
        std::copy_n(s.acc.data() + d * TS * TS + r * TS, v.cols, fg + (v.image * dim + d) * hw + pix - v.image * hw);
      }
    }
  });
}

// Backward over W lanes of one row of a TS x TS tile for Gaussian k (its raw alphas there raws, the row's
// dy = mean y - pixel y), back to front: undoes its compositing in T and behind and adds to its per-lane
// sums sum [6 + D][TS] at the first lane: rows 0-2 the sums over rows of G, G dy and G dy^2, G =
// dL/dlog(alpha) at the pixel (a lane's dx is the same in every row, so these three give all six parameter
// gradients: see finish_gaussian); rows 6.. the colour gradients. q = <dL/dfg, colour> per lane, g = dL/dfg
// [dim][TS * TS] at the row. As in forward_row, a fixed colour count D keeps the colour terms in the lane
// loop; D = 0 computes q and adds them around it.
template <typename scalar_t, int W, int TS, int D>
inline void backward_row(const scalar_t* RESTRICT raws, scalar_t dy, Index<scalar_t> k, const Rules& rules, int64_t dim,
                         const scalar_t* RESTRICT color, const Index<scalar_t>* RESTRICT stop,
                         const scalar_t* RESTRICT g, scalar_t* RESTRICT T, scalar_t* RESTRICT behind,
                         scalar_t* RESTRICT q, scalar_t* RESTRICT w, scalar_t* RESTRICT sum) {
  constexpr int P = TS * TS;
  const scalar_t alpha_min = rules.alpha_min, alpha_max = rules.alpha_max;
  const Colors<scalar_t, D, P> col(color);
  if constexpr (D == 0) {
    std::fill_n(q, W, scalar_t(0));
    for (int64_t d = 0; d < dim; ++d) add_scaled<scalar_t, W>(q, g + d * P, color[d]);
  }
  for (int l = 0; l < W; ++l) {  // masks as scalar_t 0/1, as in forward_row
    scalar_t ql;
    if constexpr (D > 0) {
      ql = col.dot(g, l);
    } else {
      ql = q[l];
    }
    const scalar_t raw = raws[l];
    const scalar_t alpha = raw < alpha_max ? raw : alpha_max;
    const scalar_t use = k < stop[l] ? (raw > alpha_min ? scalar_t(1) : scalar_t(0)) : scalar_t(0);
    // Where this Gaussian was not composited its alpha counts as 0, so that T and behind come out unchanged
    // (x / (1 - 0) = x, x + q 0 = x) from the same arithmetic: selects of the old values would be compiled to
    // masked stores, which are microcoded on AMD's Zen and cost more than the rest of the loop.
    const scalar_t alpha_used = use != scalar_t(0) ? alpha : scalar_t(0);
    const scalar_t inv_one_minus = scalar_t(1) / (scalar_t(1) - alpha_used);  // one division, used twice
    const scalar_t t_behind = T[l], t_front = t_behind * inv_one_minus;       // T in front of this Gaussian
    const scalar_t weight = alpha_used * t_front, tail = behind[l];
    const scalar_t grad_alpha = ql * t_front - tail * inv_one_minus;
    if constexpr (D > 0) {
      for (int d = 0; d < D; ++d) sum[(kParams + d) * TS + l] += g[d * P + l] * weight;
    } else {
      w[l] = weight;
    }
    behind[l] = tail + ql * weight;
    T[l] = t_front;
    // d alpha / d log(alpha) = alpha, except where clamped (alpha does not depend on the parameters).
    const scalar_t free = raw < alpha_max ? use : scalar_t(0);
    const scalar_t grad_log = free != scalar_t(0) ? grad_alpha * alpha : scalar_t(0);
    const scalar_t grad_dy = grad_log * dy;
    sum[0 * TS + l] += grad_log;
    sum[1 * TS + l] += grad_dy;
    sum[2 * TS + l] += grad_dy * dy;
  }
  if constexpr (D == 0) {
    for (int64_t d = 0; d < dim; ++d) add_product<scalar_t, W>(sum + (kParams + d) * TS, g + d * P, w);
  }
}

// x [rows][stride]: x[j][0] = sum of x[j][0 .. 2H) (overwritten), by halves: vector adds in a fixed order
// (the compiler may not reorder a plain float loop, which would be 2H dependent scalar adds).
template <typename scalar_t, int H>
inline void fold_lanes(scalar_t* RESTRICT x, int64_t rows, int64_t stride) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int l = 0; l < H; ++l) x[j * stride + l] += x[j * stride + l + H];
  }
  if constexpr (H > 1) fold_lanes<scalar_t, H / 2>(x, rows, stride);
}

// x[j * stride + l] = 0 for j < rows, l < W.
template <typename scalar_t, int W>
inline void zero_lanes(scalar_t* RESTRICT x, int64_t rows, int64_t stride) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int l = 0; l < W; ++l) x[j * stride + l] = scalar_t(0);
  }
}

// x[0] + ... + x[N - 1] as a pairwise tree in a fixed order: no branches, and independent adds.
template <typename scalar_t, int N>
inline scalar_t sum_lanes(const scalar_t* x) {
  if constexpr (N == 1) {
    return x[0];
  } else {
    return sum_lanes<scalar_t, N / 2>(x) + sum_lanes<scalar_t, N / 2>(x + N / 2);
  }
}

// out[j] = sum_lanes<scalar_t, N>(x + j * stride) for j < n.
template <typename scalar_t, int N>
inline void sum_rows(const scalar_t* RESTRICT x, int64_t stride, int64_t n, scalar_t* RESTRICT out) {
  for (int64_t j = 0; j < n; ++j) out[j] = sum_lanes<scalar_t, N>(x + j * stride);
}

#if defined(__AVX__)
// The same for float rows of 8 lanes, eight rows at a time by horizontal adds: they add the same pairs in
// the same order as sum_lanes (the same bits) in 7 vector operations instead of 56 scalar ones. The last
// block overlaps the one before where n is not a multiple of 8.
template <>
inline void sum_rows<float, 8>(const float* RESTRICT x, int64_t stride, int64_t n, float* RESTRICT out) {
  if (n < 8) {
    for (int64_t j = 0; j < n; ++j) out[j] = sum_lanes<float, 8>(x + j * stride);
    return;
  }
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const float* r = x + std::min(j0, n - 8) * stride;
    const __m256 h01 = _mm256_hadd_ps(_mm256_loadu_ps(r), _mm256_loadu_ps(r + stride));
    const __m256 h23 = _mm256_hadd_ps(_mm256_loadu_ps(r + 2 * stride), _mm256_loadu_ps(r + 3 * stride));
    const __m256 h45 = _mm256_hadd_ps(_mm256_loadu_ps(r + 4 * stride), _mm256_loadu_ps(r + 5 * stride));
    const __m256 h67 = _mm256_hadd_ps(_mm256_loadu_ps(r + 6 * stride), _mm256_loadu_ps(r + 7 * stride));
    const __m256 q0 = _mm256_hadd_ps(h01, h23), q1 = _mm256_hadd_ps(h45, h67);  // 128-bit halves: 4 rows each
    _mm256_storeu_ps(out + std::min(j0, n - 8), _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20),
                                                              _mm256_permute2f128_ps(q0, q1, 0x31)));
  }
}
#endif

// Per-thread state of the backward: per pixel dL/dfg [D][ts^2], T behind the current Gaussian, last
// composited + 1, and behind = sum over the composited Gaussians j behind the current one of q_j w_j plus
// T_final dL/dT_final (q = <dL/dfg, colour>); per lane gradient sums [6 + D][ts] of the current Gaussian.
template <typename scalar_t>
struct BackwardState {
  std::vector<scalar_t> scratch, g, T, behind, sums;
  std::vector<Index<scalar_t>> stop;
};

// Lane rows 3-5 of a Gaussian's sums (backward_row's layout) from rows 0-1 and each lane's dx = mean x -
// pixel x: sum_r G dx, sum_r G dx^2, sum_r G dy dx.
template <typename scalar_t, int W, int TS>
inline void finish_lanes(scalar_t mean_x, const scalar_t* RESTRICT px, scalar_t* RESTRICT sum) {
  for (int l = 0; l < W; ++l) {
    const scalar_t dx = mean_x - px[l];
    sum[3 * TS + l] = sum[0 * TS + l] * dx;
    sum[4 * TS + l] = sum[3 * TS + l] * dx;
    sum[5 * TS + l] = sum[1 * TS + l] * dx;
  }
}

// The parameter gradients from the summed rows (out[0..5] = sums of G, G dy, G dy^2, G dx, G dx^2, G dx dy
// over the pixels, G = dL/dlog(alpha)): log(alpha) = log opacity - (a dx^2 / 2 + b dx dy + c dy^2 / 2).
template <typename scalar_t>
inline void finish_gaussian(const scalar_t* p, scalar_t* out) {
  const scalar_t g = out[0], g_dy = out[1], g_dy2 = out[2], g_dx = out[3], g_dx2 = out[4], g_dxdy = out[5];
  out[0] = -(p[2] * g_dx + p[3] * g_dy);  // mean x
  out[1] = -(p[3] * g_dx + p[4] * g_dy);  // mean y
  out[2] = scalar_t(-0.5) * g_dx2;        // conic a
  out[3] = -g_dxdy;                       // conic b
  out[4] = scalar_t(-0.5) * g_dy2;        // conic c
  out[5] = g;                             // log opacity
}

// Gradient [6 + D] of the tile's k-th Gaussian (rows it reaches where some pixel composited it) into out.
// A narrow one (narrow_lanes) runs on its half-width window and sums that window's lanes (sum_lanes); a
// wide one runs on whole rows and folds all lanes by halves.
template <typename scalar_t, int TS, int D>
void backward_gaussian(const TileView<scalar_t>& v, int64_t k, int64_t dim, const Rules& rules,
                       const int32_t* row_stop, const scalar_t* px, BackwardState<scalar_t>& s, scalar_t* out) {
  constexpr int P = TS * TS;
  const scalar_t* p = v.gauss + k * (kParams + dim);
  const uint8_t* sp = v.span + k * kSpan;
  const int64_t ra = sp[0], rb = sp[1], ca = sp[2], cb = sp[3];
  scalar_t q[TS], w[TS];
  const int64_t o = narrow_lanes<TS>(ca, cb), first = std::max<int64_t>(o, 0);
  // Only the lanes and sums the rows below add to are zeroed (a fill of all of them is a memset call per
  // slot): rows 3-5 are written by finish_lanes.
  if (o < 0) {
    zero_lanes<scalar_t, TS>(s.sums.data(), 3, TS);
    zero_lanes<scalar_t, TS>(s.sums.data() + kParams * TS, dim, TS);
  } else {
    zero_lanes<scalar_t, Half<TS>>(s.sums.data() + o, 3, TS);
    zero_lanes<scalar_t, Half<TS>>(s.sums.data() + kParams * TS + o, dim, TS);
  }
  alignas(64) scalar_t raws[TS * TS];
  raw_rows<scalar_t, TS>(p, v.y0, ra, rb, o, px, raws);
  for (int64_t r = ra; r < rb; ++r) {
    if (row_stop[r] <= k) continue;
    const scalar_t dy = p[1] - (scalar_t(v.y0 + r) + scalar_t(0.5)), *raw = raws + r * TS;
    const int64_t at = r * TS + first;
    const Index<scalar_t> kk(k);
    if (o < 0) {
      backward_row<scalar_t, TS, TS, D>(raw, dy, kk, rules, dim, p + kParams, s.stop.data() + at, s.g.data() + at,
                                        s.T.data() + at, s.behind.data() + at, q, w, s.sums.data());
    } else {
      backward_row<scalar_t, Half<TS>, TS, D>(raw, dy, kk, rules, dim, p + kParams, s.stop.data() + at,
                                              s.g.data() + at, s.T.data() + at, s.behind.data() + at, q, w,
                                              s.sums.data() + o);
    }
  }
  if (o >= 0) {
    finish_lanes<scalar_t, Half<TS>, TS>(p[0], px + o, s.sums.data() + o);
    sum_rows<scalar_t, Half<TS>>(s.sums.data() + o, TS, kParams + dim, out);
  } else {
    finish_lanes<scalar_t, TS, TS>(p[0], px, s.sums.data());
    fold_lanes<scalar_t, TS / 2>(s.sums.data(), kParams + dim, TS);
    for (int64_t j = 0; j < kParams + dim; ++j) out[j] = s.sums[j * TS];
  }
  finish_gaussian(p, out);
}

template <typename scalar_t, int TS, int D>
void backward_tile(const TileView<scalar_t>& v, int64_t dim, const Rules& rules, BackwardState<scalar_t>& s,
                   scalar_t* slot_grads) {
  const int64_t stride = kParams + dim;
  int32_t row_stop[TS] = {};
  for (int64_t r = 0; r < v.rows; ++r) row_stop[r] = *std::max_element(s.stop.begin() + r * TS, s.stop.begin() + (r + 1) * TS);
  const int64_t max_stop = *std::max_element(row_stop, row_stop + TS);
  scalar_t px[TS];  // the pixel centres' x along a row
  for (int l = 0; l < TS; ++l) px[l] = scalar_t(v.x0 + l) + scalar_t(0.5);
  for (int64_t k = v.count - 1; k >= 0; --k) {
    scalar_t* out = slot_grads + (v.begin + k) * stride;
    if (k >= max_stop) {
      std::fill(out, out + stride, scalar_t(0));
      continue;
    }
    backward_gaussian<scalar_t, TS, D>(v, k, dim, rules, row_stop, px, s, out);
  }
}

template <typename scalar_t, int TS, int D>
void backward_impl(const at::Tensor& params_t, const at::Tensor& colors_t, const at::Tensor& offsets_t,
                   const at::Tensor& slot_t, const at::Tensor& gauss_slots_t, const at::Tensor& gauss_offsets_t,
                   const at::Tensor& span_t, const Grid& grid, const Rules& rules, const at::Tensor& trans_t,
                   const at::Tensor& last_t, const at::Tensor& grad_fg_t, const at::Tensor& grad_trans_t,
                   at::Tensor& grad_params_t, at::Tensor& grad_colors_t) {
  const scalar_t* params = params_t.data_ptr<scalar_t>();
  const scalar_t* colors = colors_t.data_ptr<scalar_t>();
  const int64_t* offsets = offsets_t.data_ptr<int64_t>();
  const int32_t* slot_gauss = slot_t.data_ptr<int32_t>();
  const uint8_t* slot_span = span_t.data_ptr<uint8_t>();
  const int32_t* gauss_slots = gauss_slots_t.data_ptr<int32_t>();
  const scalar_t* trans = trans_t.data_ptr<scalar_t>();
  const int32_t* last = last_t.data_ptr<int32_t>();
  const scalar_t* grad_fg = grad_fg_t.data_ptr<scalar_t>();
  const scalar_t* grad_trans = grad_trans_t.data_ptr<scalar_t>();
  const int64_t dim = colors_t.size(1), stride = kParams + dim, hw = grid.height * grid.width;
  constexpr int P = TS * TS;
  // Per-slot gradients [S, 6 + D], in slot order: every slot is written once, so the buffer is not cleared
  // (zeroing it cost more than some tiles).
  scalar_t* slot_grads = kept_buffer<scalar_t>(Kept::kSlotGrads, slot_t.size(0) * stride);
  const auto tiles = busiest_first(offsets, grid.num_tiles());
  const auto packed = pack_gaussians(params, colors, params_t.size(0), dim);
  auto make_state = [&] {
    BackwardState<scalar_t> s;
    s.sums.resize(stride * TS);
    return s;
  };
  for_each_item(int64_t(tiles.size()), make_state, [&](int64_t i, BackwardState<scalar_t>& s) {
    const auto v = view_tile<scalar_t, D>(tiles[i], grid, offsets, slot_gauss, slot_span, packed, dim,
                                          s.scratch);
    s.g.assign(P * dim, scalar_t(0));
    s.T.assign(P, scalar_t(1));
    s.behind.assign(P, scalar_t(0));
    s.stop.assign(P, 0);
    for (int64_t r = 0; r < v.rows; ++r) {
      const int64_t pix = v.image * hw + (v.y0 + r) * grid.width + v.x0;
      for (int64_t l = 0; l < v.cols; ++l) {
        s.T[r * TS + l] = trans[pix + l];
        s.behind[r * TS + l] = grad_trans[pix + l] * trans[pix + l];
        s.stop[r * TS + l] = last[pix + l];
      }
      for (int64_t d = 0; d < dim; ++d) {
        std::copy_n(grad_fg + (v.image * dim + d) * hw + pix - v.image * hw, v.cols, s.g.data() + d * P + r * TS);
      }
    }
    backward_tile<scalar_t, TS, D>(v, dim, rules, s, slot_grads);
  });

  // Each Gaussian's slot gradients, summed in tile order (0 + the first + ...; written once, so the outputs
  // need no zeroing first). The slots are scattered: each is prefetched eight reads ahead.
  scalar_t* grad_params = grad_params_t.data_ptr<scalar_t>();
  scalar_t* grad_colors = grad_colors_t.data_ptr<scalar_t>();
  const int64_t* gauss_offsets = gauss_offsets_t.data_ptr<int64_t>();
  const int64_t m = params_t.size(0), block = 4096, ahead = 8;
  auto make_total = [&] { return std::vector<scalar_t>(stride); };
  for_each_item((m + block - 1) / block, make_total, [&](int64_t blk, std::vector<scalar_t>& total) {
    const int64_t end = std::min(m, (blk + 1) * block), last_entry = gauss_offsets[end];
    for (int64_t g = blk * block; g < end; ++g) {
      std::fill(total.begin(), total.end(), scalar_t(0));
      for (int64_t e = gauss_offsets[g]; e < gauss_offsets[g + 1]; ++e) {
        if (e + ahead < last_entry) prefetch(slot_grads + int64_t(gauss_slots[e + ahead]) * stride);
        const scalar_t* rec = slot_grads + int64_t(gauss_slots[e]) * stride;
        for (int64_t j = 0; j < stride; ++j) total[j] += rec[j];
      }
      std::copy_n(total.data(), kParams, grad_params + g * kParams);
      std::copy_n(total.data() + kParams, dim, grad_colors + g * dim);
    }
  });
}

// ---- projection ---------------------------------------------------------------------------------

// EWA projection of 3D Gaussians (render_torch.project_gaussians, the same operations in the same order,
// in scalar_t) and its hand-derived backward. Per view: camera point p = R mean + t; 1/z (1 where the
// depth is outside (near, far), so culled entries stay finite); the perspective Jacobian's rows
// J W = (fx/z (w0 - ux w2), fy/z (w1 - uy w2)) with ux, uy = x/z, y/z clamped to 1.3x the field of view;
// half-covariance rows h = (J W) (R_q diag(s)); covariance (a, b, c) = (|hx|^2 + eps, hx.hy, |hy|^2 + eps);
// conic = (c, -b, a) / det (1/det -> 1 where det <= 0); means2d = (fx x/z + cx, fy y/z + cy); depth z.
// The backward recomputes these from the inputs. Work is split by blocks of kProjectBlock Gaussians: a
// block's outputs, and its Gaussians' gradient sums over the views (in view order), are one thread's. A
// block's view-independent parts are laid out one array per quantity (ProjBlock) and each view is one
// loop over the block without branches, which the compiler vectorises (project_block, its backward).

struct ProjectRules {
  double near_plane, far_plane, eps2d, extend, alpha_min;
};

constexpr double kNormEps = 1e-12;  // F.normalize's default eps (quaternion normalisation)
constexpr int64_t kProjectBlock = 256;  // Gaussians per work item

// One view: w2c rotation (row-major) and translation, intrinsics, the clamp range of x/z and y/z.
template <typename scalar_t>
struct ProjCamera {
  scalar_t R[9], t[3], fx, fy, cx, cy, lo_x, hi_x, lo_y, hi_y;
  ProjCamera(const scalar_t* w2c, const scalar_t* intr, int64_t width, int64_t height) {
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) R[3 * i + j] = w2c[4 * i + j];
      t[i] = w2c[4 * i + 3];
    }
    fx = intr[0], fy = intr[1], cx = intr[2], cy = intr[3];
    // lim = (0.15 W + cx) / fx, (1.15 W - cx) / fx: the Python scalar is rounded to scalar_t first, as torch does.
    lo_x = -((scalar_t(0.15 * double(width)) + cx) / fx), hi_x = (scalar_t(1.15 * double(width)) - cx) / fx;
    lo_y = -((scalar_t(0.15 * double(height)) + cy) / fy), hi_y = (scalar_t(1.15 * double(height)) - cy) / fy;
  }
};

// torch.minimum(torch.maximum(v, lo), hi) (NaN propagates) and its derivative (torch's: 1/2 at a tie).
template <typename scalar_t>
inline scalar_t clamp_fov(scalar_t v, scalar_t lo, scalar_t hi) {
  const scalar_t m = v < lo ? lo : v;
  return m > hi ? hi : m;
}
template <typename scalar_t>
inline scalar_t clamp_fov_grad(scalar_t v, scalar_t lo, scalar_t hi) {
  const scalar_t m = v < lo ? lo : v;
  const scalar_t dm = v > lo ? scalar_t(1) : (v == lo ? scalar_t(0.5) : scalar_t(0));
  return dm * (m < hi ? scalar_t(1) : (m == hi ? scalar_t(0.5) : scalar_t(0)));
}

// One Gaussian's view-independent part: normalised quaternion q / max(|q|, eps), its rotation and
// M = rotation diag(scale) (row-major), as gaussians.quat_to_rotmat and render_torch compute them.
template <typename scalar_t>
struct ProjShape {
  scalar_t norm, denom, q[4], rot[9], M[9];
  ProjShape(const scalar_t* quat, const scalar_t* scale) {
    norm = std::sqrt(quat[0] * quat[0] + quat[1] * quat[1] + quat[2] * quat[2] + quat[3] * quat[3]);
    denom = norm < scalar_t(kNormEps) ? scalar_t(kNormEps) : norm;
    for (int i = 0; i < 4; ++i) q[i] = quat[i] / denom;
    const scalar_t w = q[0], x = q[1], y = q[2], z = q[3];
    const scalar_t r[9] = {1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                           2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                           2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)};
    for (int i = 0; i < 9; ++i) rot[i] = r[i], M[i] = r[i] * scale[i % 3];
  }
};

// One Gaussian in one view: the forward's intermediates.
template <typename scalar_t>
struct ProjView {
  scalar_t x, y, z, iz, ux, uy, rx[3], ry[3], hx[3], hy[3], a, b, c, det, inv_det;
  bool in_depth;
  // mean (x, y, z); M [9] = rotation diag(scale), row-major, entry e at M[e * stride].
  ProjView(const ProjCamera<scalar_t>& cam, scalar_t mx, scalar_t my, scalar_t mz, const scalar_t* M, int64_t stride,
           const ProjectRules& pr) {
    const scalar_t* R = cam.R;
    x = R[0] * mx + R[1] * my + R[2] * mz + cam.t[0];
    y = R[3] * mx + R[4] * my + R[5] * mz + cam.t[1];
    z = R[6] * mx + R[7] * my + R[8] * mz + cam.t[2];
    in_depth = (z > scalar_t(pr.near_plane)) & (z < scalar_t(pr.far_plane));  // & (not &&): no branch
    iz = scalar_t(1) / (in_depth ? z : scalar_t(1));
    ux = clamp_fov(x * iz, cam.lo_x, cam.hi_x);
    uy = clamp_fov(y * iz, cam.lo_y, cam.hi_y);
    const scalar_t kx = cam.fx * iz, ky = cam.fy * iz;
    for (int i = 0; i < 3; ++i) {
      rx[i] = kx * (R[i] - ux * R[6 + i]);
      ry[i] = ky * (R[3 + i] - uy * R[6 + i]);
    }
    for (int j = 0; j < 3; ++j) {
      hx[j] = rx[0] * M[j * stride] + rx[1] * M[(3 + j) * stride] + rx[2] * M[(6 + j) * stride];
      hy[j] = ry[0] * M[j * stride] + ry[1] * M[(3 + j) * stride] + ry[2] * M[(6 + j) * stride];
    }
    const scalar_t eps = scalar_t(pr.eps2d);
    a = (hx[0] * hx[0] + hx[1] * hx[1] + hx[2] * hx[2]) + eps;
    b = hx[0] * hy[0] + hx[1] * hy[1] + hx[2] * hy[2];
    c = (hy[0] * hy[0] + hy[1] * hy[1] + hy[2] * hy[2]) + eps;
    det = a * c - b * b;
    inv_det = scalar_t(1) / (det > 0 ? det : scalar_t(1));
  }
};

// float -> int32 as torch's .int() gives it on x86-64: values it cannot represent (and NaN) become INT32_MIN.
template <typename scalar_t>
inline int32_t to_int32(scalar_t v) {
  return (v < scalar_t(2147483648.0)) & (v >= scalar_t(-2147483648.0)) ? static_cast<int32_t>(v)
                                                                          : std::numeric_limits<int32_t>::min();
}

// A block's Gaussians, view-independent parts, one array per quantity (so that the per-view loops over the
// block vectorise): means, M = R_q diag(s) ([9][kProjectBlock]); for the forward, the extent and whether
// the opacity is drawn (1 or 0); for the backward, the sums over the views of the gradients of M and means.
template <typename scalar_t>
struct ProjBlock {
  std::vector<scalar_t> data = std::vector<scalar_t>(26 * kProjectBlock);
  scalar_t* mean(int j) { return data.data() + j * kProjectBlock; }
  scalar_t* M() { return data.data() + 3 * kProjectBlock; }
  scalar_t* extend() { return data.data() + 12 * kProjectBlock; }
  scalar_t* opaque() { return data.data() + 13 * kProjectBlock; }
  scalar_t* grad_M() { return data.data() + 14 * kProjectBlock; }  // backward: sums over the views, [9][...]
  scalar_t* grad_mean() { return data.data() + 23 * kProjectBlock; }  // [3][...]
  void load(const scalar_t* means, const scalar_t* quats, const scalar_t* scales, int64_t begin, int64_t count) {
    for (int64_t k = 0; k < count; ++k) {
      const int64_t g = begin + k;
      const ProjShape<scalar_t> sh(quats + 4 * g, scales + 3 * g);
      for (int j = 0; j < 3; ++j) mean(j)[k] = means[3 * g + j];
      for (int e = 0; e < 9; ++e) M()[e * kProjectBlock + k] = sh.M[e];
    }
  }
};

// Calls fn(bi, begin, count, blk) for each block of kProjectBlock Gaussians (from `begin`, `count` of them)
// of each batch entry bi of nb with n Gaussians, its view-independent parts loaded into blk (one per thread).
template <typename scalar_t, typename F>
void for_each_block(int64_t nb, int64_t n, const scalar_t* means, const scalar_t* quats, const scalar_t* scales,
                    const F& fn) {
  const int64_t blocks = (n + kProjectBlock - 1) / kProjectBlock;
  for_each_item(nb * blocks, [] { return ProjBlock<scalar_t>(); }, [&](int64_t item, ProjBlock<scalar_t>& blk) {
    const int64_t bi = item / blocks, begin = (item % blocks) * kProjectBlock;
    const int64_t count = std::min(n, begin + kProjectBlock) - begin;
    blk.load(means, quats, scales, bi * n + begin, count);
    fn(bi, begin, count, blk);
  });
}

// One view of a block (count <= kProjectBlock Gaussians, ProjBlock's arrays) -> the block's outputs. A
// function of its own so that its pointers' restrict holds (GCC does not honour it on local pointers), the
// camera and rules by value (no alias checks against them): the loop vectorises across the block.
template <typename scalar_t>
inline void project_block(const ProjCamera<scalar_t> cam, const ProjectRules pr, int64_t count,
                          const scalar_t* RESTRICT mx, const scalar_t* RESTRICT my, const scalar_t* RESTRICT mz,
                          const scalar_t* RESTRICT M, const scalar_t* RESTRICT extend, const scalar_t* RESTRICT opaque,
                          scalar_t w_px, scalar_t h_px, scalar_t* RESTRICT m2, scalar_t* RESTRICT cov,
                          scalar_t* RESTRICT con, scalar_t* RESTRICT dep, int32_t* RESTRICT rad) {
  for (int64_t k = 0; k < count; ++k) {
    const ProjView<scalar_t> pv(cam, mx[k], my[k], mz[k], M + k, kProjectBlock, pr);
    const scalar_t px = cam.fx * pv.x * pv.iz + cam.cx, py = cam.fy * pv.y * pv.iz + cam.cy;
    m2[2 * k] = px, m2[2 * k + 1] = py;
    cov[4 * k] = pv.a, cov[4 * k + 1] = pv.b, cov[4 * k + 2] = pv.b, cov[4 * k + 3] = pv.c;
    con[3 * k] = pv.c * pv.inv_det, con[3 * k + 1] = -pv.b * pv.inv_det, con[3 * k + 2] = pv.a * pv.inv_det;
    dep[k] = pv.z;
    const scalar_t rad_x = std::ceil(extend[k] * std::sqrt(pv.a)), rad_y = std::ceil(extend[k] * std::sqrt(pv.c));
    const bool inside = (px + rad_x > 0) & (py + rad_y > 0) & (px - rad_x < w_px) & (py - rad_y < h_px);
    const bool keep = pv.in_depth & (pv.det > 0) & (opaque[k] > 0) & inside;  // & (not &&): no branches
    rad[2 * k] = keep ? to_int32(rad_x) : 0;
    rad[2 * k + 1] = keep ? to_int32(rad_y) : 0;
  }
}

template <typename scalar_t>
void project_forward_impl(const at::Tensor& means_t, const at::Tensor& quats_t, const at::Tensor& scales_t,
                          const at::Tensor& w2c_t, const at::Tensor& intr_t, const scalar_t* opacities, int64_t width,
                          int64_t height, const ProjectRules& pr, at::Tensor& means2d_t, at::Tensor& covars_t,
                          at::Tensor& conics_t, at::Tensor& depths_t, at::Tensor& radii_t) {
  const int64_t nb = means_t.size(0), n = means_t.size(1), nv = w2c_t.size(1);
  const scalar_t* means = means_t.data_ptr<scalar_t>();
  const scalar_t* quats = quats_t.data_ptr<scalar_t>();
  const scalar_t* scales = scales_t.data_ptr<scalar_t>();
  const scalar_t* w2c = w2c_t.data_ptr<scalar_t>();
  const scalar_t* intr = intr_t.data_ptr<scalar_t>();
  scalar_t* means2d = means2d_t.data_ptr<scalar_t>();
  scalar_t* covars = covars_t.data_ptr<scalar_t>();
  scalar_t* conics = conics_t.data_ptr<scalar_t>();
  scalar_t* depths = depths_t.data_ptr<scalar_t>();
  int32_t* radii = radii_t.data_ptr<int32_t>();
  std::vector<ProjCamera<scalar_t>> cams;
  for (int64_t bv = 0; bv < nb * nv; ++bv) cams.emplace_back(w2c + 16 * bv, intr + 4 * bv, width, height);
  const scalar_t alpha_min = scalar_t(pr.alpha_min), extend0 = scalar_t(pr.extend);
  const scalar_t w_px = scalar_t(width), h_px = scalar_t(height);
  for_each_block(nb, n, means, quats, scales, [&](int64_t bi, int64_t begin, int64_t count, ProjBlock<scalar_t>& blk) {
    scalar_t* extend = blk.extend();
    scalar_t* opaque = blk.opaque();
    for (int64_t k = 0; k < count; ++k) {
      // Opacity-aware extent: min(3.33, sqrt(2 ln(max(opacity, 1/255) * 255))), culled below 1/255.
      extend[k] = extend0, opaque[k] = 1;
      if (opacities != nullptr) {
        const scalar_t op = opacities[bi * n + begin + k];
        opaque[k] = op >= alpha_min ? 1 : 0;
        const scalar_t e = std::sqrt(scalar_t(2) * std::log((op < alpha_min ? alpha_min : op) / alpha_min));
        extend[k] = e < extend0 ? e : extend0;
      }
    }
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t o = (bi * nv + v) * n + begin;  // the block's first [B, V, N] entry
      project_block(cams[bi * nv + v], pr, count, blk.mean(0), blk.mean(1), blk.mean(2), blk.M(), blk.extend(),
                    blk.opaque(), w_px, h_px, means2d + 2 * o, covars + 4 * o, conics + 3 * o, depths + o,
                    radii + 2 * o);
    }
  });
}

// Strides of a gradient's rows over a block of one view: entry (k, j, l) at k * sn + j * s0 + l * s1 (all 0
// for an absent gradient, which reads one zero).
struct Strides {
  int64_t sn, s0, s1;
};

// One view of a block, backward (the chain rule through project_block, in reverse): adds its terms to the
// block's sums over the views, gM [9][kProjectBlock] (of M = R_q diag(s)) and gmean [3][kProjectBlock]. The
// upstream gradients g_m2 [count, 2], g_cov [count, 2, 2], g_con [count, 3], g_dep [count] are read through
// their strides. A function of its own for restrict, like project_block.
template <typename scalar_t>
inline void project_block_backward(const ProjCamera<scalar_t> cam, const ProjectRules pr, int64_t count,
                                   const scalar_t* RESTRICT mx, const scalar_t* RESTRICT my,
                                   const scalar_t* RESTRICT mz, const scalar_t* RESTRICT M_block,
                                   const scalar_t* RESTRICT g_m2, Strides m2s, const scalar_t* RESTRICT g_cov,
                                   Strides covs, const scalar_t* RESTRICT g_con, Strides cons,
                                   const scalar_t* RESTRICT g_dep, Strides deps,
                                   scalar_t* RESTRICT gM_block, scalar_t* RESTRICT gmean_block) {
  const scalar_t* R = cam.R;
  const auto g_means2d = [&](int64_t k, int64_t j) { return g_m2[k * m2s.sn + j * m2s.s0]; };
  const auto g_covars = [&](int64_t k, int64_t j, int64_t l) { return g_cov[k * covs.sn + j * covs.s0 + l * covs.s1]; };
  const auto g_conics = [&](int64_t k, int64_t j) { return g_con[k * cons.sn + j * cons.s0]; };
  const auto g_depths = [&](int64_t k) { return g_dep[k * deps.sn]; };
  for (int64_t k = 0; k < count; ++k) {
    const scalar_t* M = M_block + k;
    const auto Me = [&](int e) { return M[e * kProjectBlock]; };
    scalar_t* gM = gM_block + k;
    scalar_t* gmean = gmean_block + k;
    const ProjView<scalar_t> pv(cam, mx[k], my[k], mz[k], M, kProjectBlock, pr);
    // Covariance entries: directly (covars2d) and through the conic.
    scalar_t ga = g_covars(k, 0, 0), gb = g_covars(k, 0, 1) + g_covars(k, 1, 0);
    scalar_t gc = g_covars(k, 1, 1);
    const scalar_t g0 = g_conics(k, 0), g1 = g_conics(k, 1), g2 = g_conics(k, 2);
    ga += g2 * pv.inv_det, gb -= g1 * pv.inv_det, gc += g0 * pv.inv_det;
    {  // inv_det = 1 / det where det > 0; elsewhere it is the constant 1 (selects: no branch)
      const bool has = pv.det > 0;
      const scalar_t g_det = -(g0 * pv.c - g1 * pv.b + g2 * pv.a) * pv.inv_det * pv.inv_det;
      ga = has ? ga + g_det * pv.c : ga, gc = has ? gc + g_det * pv.a : gc;
      gb = has ? gb - scalar_t(2) * pv.b * g_det : gb;
    }
    // h rows, then J W rows and M = R_q diag(s).
    scalar_t ghx[3], ghy[3], grx[3], gry[3];
    for (int j = 0; j < 3; ++j) {
      ghx[j] = scalar_t(2) * ga * pv.hx[j] + gb * pv.hy[j];
      ghy[j] = scalar_t(2) * gc * pv.hy[j] + gb * pv.hx[j];
    }
    for (int r = 0; r < 3; ++r) {
      grx[r] = ghx[0] * Me(3 * r) + ghx[1] * Me(3 * r + 1) + ghx[2] * Me(3 * r + 2);
      gry[r] = ghy[0] * Me(3 * r) + ghy[1] * Me(3 * r + 1) + ghy[2] * Me(3 * r + 2);
      for (int j = 0; j < 3; ++j) gM[(3 * r + j) * kProjectBlock] += pv.rx[r] * ghx[j] + pv.ry[r] * ghy[j];
    }
    // rx = kx (w0 - ux w2), kx = fx / z (and y alike).
    scalar_t gkx = 0, gky = 0, gux = 0, guy = 0;
    for (int r = 0; r < 3; ++r) {
      gkx += grx[r] * (R[r] - pv.ux * R[6 + r]);
      gky += gry[r] * (R[3 + r] - pv.uy * R[6 + r]);
      gux += grx[r] * R[6 + r];
      guy += gry[r] * R[6 + r];
    }
    gux *= -cam.fx * pv.iz, guy *= -cam.fy * pv.iz;
    scalar_t giz = cam.fx * gkx + cam.fy * gky;
    // Clamped x/z, y/z (no gradient through a clamped coordinate), then means2d = f x/z + c.
    const scalar_t grx_z = gux * clamp_fov_grad(pv.x * pv.iz, cam.lo_x, cam.hi_x);
    const scalar_t gry_z = guy * clamp_fov_grad(pv.y * pv.iz, cam.lo_y, cam.hi_y);
    const scalar_t gmx = g_means2d(k, 0), gmy = g_means2d(k, 1);
    const scalar_t gx = grx_z * pv.iz + gmx * cam.fx * pv.iz;
    const scalar_t gy = gry_z * pv.iz + gmy * cam.fy * pv.iz;
    giz += grx_z * pv.x + gry_z * pv.y + gmx * cam.fx * pv.x + gmy * cam.fy * pv.y;
    const scalar_t gz = g_depths(k) + (pv.in_depth ? -giz * pv.iz * pv.iz : scalar_t(0));
    // p = R mean + t.
    for (int j = 0; j < 3; ++j) gmean[j * kProjectBlock] += R[j] * gx + R[3 + j] * gy + R[6 + j] * gz;
  }
}

// A gradient of a projection output [B, V, N, inner...] read through its strides (autograd hands over slices
// of the compositing's [I*N, 6] gradient: no copy is made), or absent (no elements: the output was unused,
// so its gradient is zero).
template <typename scalar_t>
struct GradView {
  const scalar_t* data = nullptr;
  int64_t sb = 0, sv = 0, sn = 0, s0 = 0, s1 = 0;
  explicit GradView(const at::Tensor& t) {
    if (t.numel() == 0) return;
    data = t.data_ptr<scalar_t>();
    sb = t.stride(0), sv = t.stride(1), sn = t.stride(2);
    s0 = t.dim() > 3 ? t.stride(3) : 0;
    s1 = t.dim() > 4 ? t.stride(4) : 0;
  }
  // View v of batch entry b, from Gaussian `begin` on, and the strides there.
  const scalar_t* rows(int64_t b, int64_t v, int64_t begin) const {
    static constexpr scalar_t zero = 0;
    return data ? data + b * sb + v * sv + begin * sn : &zero;
  }
  Strides strides() const { return {sn, s0, s1}; }
};

// Gradients of the means, quats, scales from those of means2d [B,V,N,2], covars2d [B,V,N,2,2] (the four
// entries), conics [B,V,N,3], depths [B,V,N]: per block, the views' terms summed (in view order), then the
// chain rule through M = R_q diag(s) and the quaternion's normalisation per Gaussian.
template <typename scalar_t>
void project_backward_impl(const at::Tensor& means_t, const at::Tensor& quats_t, const at::Tensor& scales_t,
                           const at::Tensor& w2c_t, const at::Tensor& intr_t, int64_t width, int64_t height,
                           const ProjectRules& pr, const at::Tensor& g_means2d_t, const at::Tensor& g_covars_t,
                           const at::Tensor& g_conics_t, const at::Tensor& g_depths_t, at::Tensor& g_means_t,
                           at::Tensor& g_quats_t, at::Tensor& g_scales_t) {
  const int64_t nb = means_t.size(0), n = means_t.size(1), nv = w2c_t.size(1);
  const scalar_t* means = means_t.data_ptr<scalar_t>();
  const scalar_t* quats = quats_t.data_ptr<scalar_t>();
  const scalar_t* scales = scales_t.data_ptr<scalar_t>();
  const scalar_t* w2c = w2c_t.data_ptr<scalar_t>();
  const scalar_t* intr = intr_t.data_ptr<scalar_t>();
  const GradView<scalar_t> g_means2d(g_means2d_t), g_covars(g_covars_t), g_conics(g_conics_t), g_depths(g_depths_t);
  scalar_t* g_means = g_means_t.data_ptr<scalar_t>();
  scalar_t* g_quats = g_quats_t.data_ptr<scalar_t>();
  scalar_t* g_scales = g_scales_t.data_ptr<scalar_t>();
  std::vector<ProjCamera<scalar_t>> cams;
  for (int64_t bv = 0; bv < nb * nv; ++bv) cams.emplace_back(w2c + 16 * bv, intr + 4 * bv, width, height);
  for_each_block(nb, n, means, quats, scales, [&](int64_t bi, int64_t begin, int64_t count, ProjBlock<scalar_t>& blk) {
    scalar_t* gM_block = blk.grad_M();
    scalar_t* gmean_block = blk.grad_mean();
    std::fill_n(gM_block, 9 * kProjectBlock, scalar_t(0));
    std::fill_n(gmean_block, 3 * kProjectBlock, scalar_t(0));
    for (int64_t v = 0; v < nv; ++v) {  // sums over the views, in view order
      project_block_backward(cams[bi * nv + v], pr, count, blk.mean(0), blk.mean(1), blk.mean(2), blk.M(),
                             g_means2d.rows(bi, v, begin), g_means2d.strides(), g_covars.rows(bi, v, begin),
                             g_covars.strides(), g_conics.rows(bi, v, begin), g_conics.strides(),
                             g_depths.rows(bi, v, begin), g_depths.strides(), gM_block, gmean_block);
    }
    for (int64_t k = 0; k < count; ++k) {
      const int64_t g = bi * n + begin + k;
      const ProjShape<scalar_t> sh(quats + 4 * g, scales + 3 * g);
      scalar_t gM[9], gmean[3];
      for (int e = 0; e < 9; ++e) gM[e] = gM_block[e * kProjectBlock + k];
      for (int j = 0; j < 3; ++j) gmean[j] = gmean_block[j * kProjectBlock + k];
    for (int j = 0; j < 3; ++j) g_means[3 * g + j] = gmean[j];
    // M = rot diag(s): scales, then the rotation's entries, then the unit quaternion (wxyz).
    scalar_t G[9];
    for (int j = 0; j < 3; ++j) {
      g_scales[3 * g + j] = gM[j] * sh.rot[j] + gM[3 + j] * sh.rot[3 + j] + gM[6 + j] * sh.rot[6 + j];
    }
    for (int e = 0; e < 9; ++e) G[e] = gM[e] * scales[3 * g + e % 3];
    const scalar_t w = sh.q[0], x = sh.q[1], y = sh.q[2], z = sh.q[3];
    const scalar_t gq[4] = {
        2 * (-z * G[1] + y * G[2] + z * G[3] - x * G[5] - y * G[6] + x * G[7]),
        2 * (y * G[1] + z * G[2] + y * G[3] - 2 * x * G[4] - w * G[5] + z * G[6] + w * G[7] - 2 * x * G[8]),
        2 * (-2 * y * G[0] + x * G[1] + w * G[2] + x * G[3] + z * G[5] - w * G[6] + z * G[7] - 2 * y * G[8]),
        2 * (-2 * z * G[0] - w * G[1] + x * G[2] + w * G[3] - 2 * z * G[4] + y * G[5] + x * G[6] + y * G[7])};
    // q / max(|q|, eps): the norm carries gradient where it is not clamped (and is not 0).
    const scalar_t* q = quats + 4 * g;
    const scalar_t dot = q[0] * gq[0] + q[1] * gq[1] + q[2] * gq[2] + q[3] * gq[3];
    const scalar_t radial = sh.norm >= scalar_t(kNormEps) ? dot / (sh.denom * sh.denom * sh.norm) : scalar_t(0);
    for (int k = 0; k < 4; ++k) g_quats[4 * g + k] = gq[k] / sh.denom - radial * q[k];
    }
  });
}

// ---- entry points -------------------------------------------------------------------------------

template <typename T>
struct Type {
  using type = T;
};
template <int N>
using Int = std::integral_constant<int, N>;

// Calls body(Type<scalar_t>, Int<TS>, Int<D>) for params' dtype, the grid's tile size and the colour count
// (D = 3: RGB, 4: RGB + depth, fixed at compile time; 0: any other, read at run time) (C++17 generic lambdas).
template <typename Body>
void dispatch(const at::Tensor& params, const Grid& grid, int64_t dim, const Body& body) {
  auto with_dim = [&](auto type, auto ts) {
    switch (dim) {
      case 3: body(type, ts, Int<3>()); break;
      case 4: body(type, ts, Int<4>()); break;
      default: body(type, ts, Int<0>()); break;
    }
  };
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "rasterize_cpu", [&] {
    switch (grid.tile_size) {
      case 4: with_dim(Type<scalar_t>(), Int<4>()); break;
      case 8: with_dim(Type<scalar_t>(), Int<8>()); break;
      case 16: with_dim(Type<scalar_t>(), Int<16>()); break;
      default: with_dim(Type<scalar_t>(), Int<32>()); break;
    }
  });
}

void check_gaussians(const at::Tensor& params, const at::Tensor& colors, const Grid& grid) {
  TORCH_CHECK(params.device().is_cpu() && colors.device().is_cpu(), "rasterize_cpu: CPU tensors only");
  TORCH_CHECK(params.dim() == 2 && params.size(1) == kParams && params.is_contiguous(), "params must be [M, 6] contiguous");
  TORCH_CHECK(colors.dim() == 2 && colors.size(0) == params.size(0) && colors.is_contiguous(), "colors must be [M, D] contiguous");
  TORCH_CHECK(colors.scalar_type() == params.scalar_type(), "params and colors must share a dtype");
  TORCH_CHECK(params.size(0) < std::numeric_limits<int32_t>::max(), "rasterize_cpu: more than 2^31 Gaussians");
  TORCH_CHECK(grid.num_images > 0 ? params.size(0) % grid.num_images == 0 : params.size(0) == 0,
              "params rows must be a multiple of num_images");
}

void check_bins(const at::Tensor& offsets, const at::Tensor& slot_gauss, const at::Tensor& slot_span,
                const Grid& grid) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.dim() == 1 &&
                  offsets.size(0) == grid.num_tiles() + 1, "offsets must be int64 [num_tiles + 1] contiguous");
  TORCH_CHECK(slot_gauss.scalar_type() == at::kInt && slot_gauss.is_contiguous(), "slot_gauss must be int32 contiguous");
  TORCH_CHECK(slot_span.sizes() == at::IntArrayRef({slot_gauss.size(0), kSpan}) && slot_span.is_contiguous() &&
                  slot_span.scalar_type() == at::kByte, "slot_span must be uint8 [S, 4] contiguous");
}

std::vector<at::Tensor> bin_tiles(const at::Tensor& params, const at::Tensor& depths, const at::Tensor& radii,
                                  int64_t num_images, int64_t height, int64_t width, int64_t tile_size,
                                  double alpha_min) {
  const Grid grid = make_grid(num_images, height, width, tile_size);
  check_gaussians(params, params.new_empty({params.size(0), 0}), grid);
  TORCH_CHECK(depths.sizes() == at::IntArrayRef({params.size(0)}) && depths.is_contiguous() &&
                  depths.scalar_type() == params.scalar_type(), "depths must be [M] contiguous, the params' dtype");
  TORCH_CHECK(radii.sizes() == at::IntArrayRef({params.size(0), 2}) && radii.is_contiguous() &&
                  radii.scalar_type() == at::kInt, "radii must be int32 [M, 2] contiguous");
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "bin_tiles", [&] { out = bin_impl<scalar_t>(params, depths, radii, grid, alpha_min); });
  return out;
}

std::vector<at::Tensor> composite_forward(const at::Tensor& params, const at::Tensor& colors, const at::Tensor& offsets,
                                          const at::Tensor& slot_gauss, const at::Tensor& slot_span, int64_t num_images,
                                          int64_t height, int64_t width, int64_t tile_size, double alpha_min,
                                          double alpha_max, double t_min) {
  const Grid grid = make_grid(num_images, height, width, tile_size);
  check_gaussians(params, colors, grid);
  check_bins(offsets, slot_gauss, slot_span, grid);
  auto fg = at::zeros({num_images, colors.size(1), height, width}, colors.options());
  auto trans = at::ones({num_images, 1, height, width}, colors.options());
  auto last = at::zeros({num_images, height, width}, colors.options().dtype(at::kInt));
  const Rules rules{alpha_min, alpha_max, t_min};
  dispatch(params, grid, colors.size(1), [&](auto type, auto ts, auto dim) {
    using T = typename decltype(type)::type;
    forward_impl<T, decltype(ts)::value, decltype(dim)::value>(params, colors, offsets, slot_gauss, slot_span, grid,
                                                               rules, fg, trans, last);
  });
  return {fg, trans, last};
}

std::vector<at::Tensor> composite_backward(const at::Tensor& params, const at::Tensor& colors,
                                           const at::Tensor& offsets, const at::Tensor& slot_gauss,
                                           const at::Tensor& gauss_slots, const at::Tensor& gauss_offsets,
                                           const at::Tensor& slot_span, const at::Tensor& trans, const at::Tensor& last,
                                           const at::Tensor& grad_fg, const at::Tensor& grad_trans, int64_t num_images,
                                           int64_t height, int64_t width, int64_t tile_size, double alpha_min,
                                           double alpha_max, double t_min) {
  const Grid grid = make_grid(num_images, height, width, tile_size);
  check_gaussians(params, colors, grid);
  check_bins(offsets, slot_gauss, slot_span, grid);
  TORCH_CHECK(gauss_slots.sizes() == slot_gauss.sizes() && gauss_slots.scalar_type() == at::kInt &&
                  gauss_slots.is_contiguous(), "gauss_slots must be int32 like slot_gauss");
  TORCH_CHECK(gauss_offsets.sizes() == at::IntArrayRef({params.size(0) + 1}) && gauss_offsets.scalar_type() == at::kLong &&
                  gauss_offsets.is_contiguous(), "gauss_offsets must be int64 [M + 1]");
  TORCH_CHECK(grad_fg.sizes() == at::IntArrayRef({num_images, colors.size(1), height, width}) && grad_fg.is_contiguous(),
              "grad_fg must be [I, D, H, W] contiguous");
  TORCH_CHECK(trans.sizes() == at::IntArrayRef({num_images, 1, height, width}) && trans.is_contiguous() &&
                  grad_trans.sizes() == trans.sizes() && grad_trans.is_contiguous(),
              "trans and grad_trans must be [I, 1, H, W] contiguous");
  TORCH_CHECK(grad_fg.scalar_type() == params.scalar_type() && grad_trans.scalar_type() == params.scalar_type() &&
                  trans.scalar_type() == params.scalar_type(), "trans and the gradients must share the params' dtype");
  TORCH_CHECK(last.sizes() == at::IntArrayRef({num_images, height, width}) && last.scalar_type() == at::kInt &&
                  last.is_contiguous(), "last must be int32 [I, H, W] contiguous");
  auto grad_params = at::empty_like(params);  // every entry is written (backward_impl)
  auto grad_colors = at::empty_like(colors);
  const Rules rules{alpha_min, alpha_max, t_min};
  dispatch(params, grid, colors.size(1), [&](auto type, auto ts, auto dim) {
    using T = typename decltype(type)::type;
    backward_impl<T, decltype(ts)::value, decltype(dim)::value>(params, colors, offsets, slot_gauss, gauss_slots,
                                                                gauss_offsets, slot_span, grid, rules, trans, last,
                                                                grad_fg, grad_trans, grad_params, grad_colors);
  });
  return {grad_params, grad_colors};
}

// Shapes of the projection's inputs: means [B, N, 3], quats [B, N, 4], scales [B, N, 3], w2c [B, V, 4, 4],
// intrinsics [B, V, 4], all contiguous CPU tensors of one floating dtype.
void check_projection_inputs(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                             const at::Tensor& w2c, const at::Tensor& intrinsics) {
  for (const at::Tensor* t : {&means, &quats, &scales, &w2c, &intrinsics}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == means.scalar_type(),
                "project: inputs must be contiguous CPU tensors of one dtype");
  }
  TORCH_CHECK(means.dim() == 3 && means.size(2) == 3, "project: means must be [B, N, 3]");
  const int64_t nb = means.size(0), n = means.size(1);
  TORCH_CHECK(quats.sizes() == at::IntArrayRef({nb, n, 4}) && scales.sizes() == means.sizes(),
              "project: quats must be [B, N, 4] and scales [B, N, 3]");
  TORCH_CHECK(w2c.dim() == 4 && w2c.size(0) == nb && w2c.size(2) == 4 && w2c.size(3) == 4,
              "project: w2c must be [B, V, 4, 4]");
  TORCH_CHECK(intrinsics.sizes() == at::IntArrayRef({nb, w2c.size(1), 4}), "project: intrinsics must be [B, V, 4]");
}

std::vector<at::Tensor> project_forward(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                        const at::Tensor& w2c, const at::Tensor& intrinsics,
                                        const c10::optional<at::Tensor>& opacities, int64_t width, int64_t height,
                                        double near_plane, double far_plane, double eps2d, double extend,
                                        double alpha_min) {
  check_projection_inputs(means, quats, scales, w2c, intrinsics);
  const int64_t nb = means.size(0), n = means.size(1), nv = w2c.size(1);
  if (opacities.has_value()) {
    TORCH_CHECK(opacities->sizes() == at::IntArrayRef({nb, n}) && opacities->is_contiguous() &&
                    opacities->device().is_cpu() && opacities->scalar_type() == means.scalar_type(),
                "project: opacities must be [B, N] contiguous, the means' dtype");
  }
  auto means2d = at::empty({nb, nv, n, 2}, means.options());
  auto covars = at::empty({nb, nv, n, 2, 2}, means.options());
  auto conics = at::empty({nb, nv, n, 3}, means.options());
  auto depths = at::empty({nb, nv, n}, means.options());
  auto radii = at::empty({nb, nv, n, 2}, means.options().dtype(at::kInt));
  const ProjectRules pr{near_plane, far_plane, eps2d, extend, alpha_min};
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "project_forward", [&] {
    const scalar_t* opac = opacities.has_value() ? opacities->data_ptr<scalar_t>() : nullptr;
    project_forward_impl<scalar_t>(means, quats, scales, w2c, intrinsics, opac, width, height, pr, means2d, covars,
                                   conics, depths, radii);
  });
  return {means2d, covars, conics, depths, radii};
}

std::vector<at::Tensor> project_backward(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                         const at::Tensor& w2c, const at::Tensor& intrinsics,
                                         const at::Tensor& grad_means2d, const at::Tensor& grad_covars2d,
                                         const at::Tensor& grad_conics, const at::Tensor& grad_depths, int64_t width,
                                         int64_t height, double near_plane, double far_plane, double eps2d) {
  check_projection_inputs(means, quats, scales, w2c, intrinsics);
  const int64_t nb = means.size(0), n = means.size(1), nv = w2c.size(1);
  const std::vector<std::pair<const at::Tensor*, std::vector<int64_t>>> grads = {
      {&grad_means2d, {nb, nv, n, 2}}, {&grad_covars2d, {nb, nv, n, 2, 2}}, {&grad_conics, {nb, nv, n, 3}},
      {&grad_depths, {nb, nv, n}}};
  for (const auto& [t, shape] : grads) {  // any strides; no elements: absent (zero)
    TORCH_CHECK((t->numel() == 0 || t->sizes() == at::IntArrayRef(shape)) && t->device().is_cpu() &&
                    t->scalar_type() == means.scalar_type(),
                "project_backward: gradients must be [B, V, N, ...] of the means' dtype, or empty, got ", t->sizes());
  }
  auto grad_means = at::empty_like(means);
  auto grad_quats = at::empty_like(quats);
  auto grad_scales = at::empty_like(scales);
  const ProjectRules pr{near_plane, far_plane, eps2d, 0.0, 0.0};
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "project_backward", [&] {
    project_backward_impl<scalar_t>(means, quats, scales, w2c, intrinsics, width, height, pr, grad_means2d,
                                    grad_covars2d, grad_conics, grad_depths, grad_means, grad_quats, grad_scales);
  });
  return {grad_means, grad_quats, grad_scales};
}

// Tables [M, k_i] side by side as one [M, sum k_i], and back (columns of widths k_i, each contiguous).
// torch.cat / a copy along the last dimension moves one element at a time for rows this short (the
// compositing's 2 + 3 + 1 params), about 10x slower than these loops.
void check_tables(const std::vector<at::Tensor>& tables, int64_t rows, at::ScalarType dtype) {
  for (const auto& t : tables) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.size(0) == rows && t.is_contiguous() &&
                    t.scalar_type() == dtype, "rasterize_cpu: tables must be CPU [", rows, ", k] contiguous, of one dtype");
  }
}

// Columns [at, at + k) of rows [r0, r1) of a table [M, width] <-> part [M, k]; K > 0: k fixed at compile time.
template <typename scalar_t, int K, bool kJoin>
void move_part(scalar_t* RESTRICT table, int64_t width, int64_t at, scalar_t* RESTRICT part, int64_t k, int64_t r0,
               int64_t r1) {
  if constexpr (K > 0) k = K;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < k; ++c) {
      if constexpr (kJoin) {
        table[r * width + at + c] = part[r * k + c];
      } else {
        part[r * k + c] = table[r * width + at + c];
      }
    }
  }
}

// table[:, at_j .. at_j + k_j) <-> parts[j], rows split in blocks between threads.
template <typename scalar_t, bool kJoin>
void move_columns(scalar_t* table, int64_t width, const std::vector<at::Tensor>& parts) {
  const int64_t rows = parts.empty() ? 0 : parts[0].size(0), block = 16384;
  for_each_item((rows + block - 1) / block, [] { return 0; }, [&](int64_t b, int) {
    const int64_t r0 = b * block, r1 = std::min(rows, r0 + block);
    int64_t at = 0;
    for (const auto& t : parts) {
      scalar_t* part = t.data_ptr<scalar_t>();
      const int64_t k = t.size(1);
      switch (k) {
        case 1: move_part<scalar_t, 1, kJoin>(table, width, at, part, k, r0, r1); break;
        case 2: move_part<scalar_t, 2, kJoin>(table, width, at, part, k, r0, r1); break;
        case 3: move_part<scalar_t, 3, kJoin>(table, width, at, part, k, r0, r1); break;
        default: move_part<scalar_t, 0, kJoin>(table, width, at, part, k, r0, r1);
      }
      at += k;
    }
  });
}

at::Tensor join_columns(const std::vector<at::Tensor>& parts) {
  TORCH_CHECK(!parts.empty(), "join_columns: no tables");
  check_tables(parts, parts[0].size(0), parts[0].scalar_type());
  int64_t width = 0;
  for (const auto& t : parts) width += t.size(1);
  auto out = at::empty({parts[0].size(0), width}, parts[0].options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "join_columns", [&] { move_columns<scalar_t, true>(out.data_ptr<scalar_t>(), width, parts); });
  return out;
}

std::vector<at::Tensor> split_columns(const at::Tensor& table, const std::vector<int64_t>& widths) {
  check_tables({table}, table.size(0), table.scalar_type());
  int64_t width = 0;
  std::vector<at::Tensor> parts;
  for (int64_t k : widths) {
    TORCH_CHECK(k >= 0, "split_columns: negative width ", k);
    parts.push_back(at::empty({table.size(0), k}, table.options()));
    width += k;
  }
  TORCH_CHECK(width == table.size(1), "split_columns: widths add up to ", width, ", the table has ", table.size(1));
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "split_columns", [&] { move_columns<scalar_t, false>(table.data_ptr<scalar_t>(), width, parts); });
  return parts;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("join_columns", &join_columns, "[M, k_i] tables side by side -> [M, sum k_i]");
  m.def("split_columns", &split_columns, "[M, K] -> its column blocks of the given widths, each contiguous");
  m.def("bin_tiles", &bin_tiles, "depth-sorted tile lists -> (offsets, slot_gauss, gauss_slots, gauss_offsets, slot_span)");
  m.def("composite_forward", &composite_forward, "tile compositing forward -> (fg, trans, last)");
  m.def("composite_backward", &composite_backward, "tile compositing backward -> (grad_params, grad_colors)");
  m.def("project_forward", &project_forward, "EWA projection -> (means2d, covars2d, conics, depths, radii)");
  m.def("project_backward", &project_backward, "EWA projection backward -> (grad_means, grad_quats, grad_scales)");
}
