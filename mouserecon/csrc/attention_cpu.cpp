// Fused bf16 attention forward for CPUs with AVX512-BF16 (mouserecon.model.attention, inference).
//
// out = softmax(q k^T / sqrt(dh)) v per batch item and head, q, k, v bf16 [b, nh, n, dh] (dh contiguous),
// in one pass over the keys per block of queries (the flash-attention scheme): for each block of 64 keys,
// the scores of ROWS queries are accumulated in vector registers (vdpbf16ps: bf16 pairs, fp32 sums),
// the running row maxima and sums are updated (online softmax, exp2 in fp32), the probabilities are
// rounded to bf16 and multiplied into the fp32 output rows, again with vdpbf16ps. No score matrix is
// written to memory. Rounding: the probabilities to bf16 before p v (as torch's flash kernels do) and the
// output to bf16; everything else is fp32. exp2 is a degree-5 Taylor polynomial on [-1/2, 1/2] scaled
// by 2^n (vscalefps): relative error below 5e-6, far under bf16's 2^-9.
//
// Layouts. k is repacked per head into 64-key blocks of [dh/2][64] bf16 pairs (key j's elements 2p, 2p+1
// as one 32-bit word), so that one pair of a query, broadcast, multiplies 64 keys in 4 registers; v into
// [n/2][dh] pairs (keys 2t, 2t+1 of one column), so that one broadcast probability pair multiplies a row
// of v. Keys past n are zero in the packed blocks and masked to -inf before the softmax. Query blocks
// of GROUPS x ROWS rows share each 64-key block while it is in the core's cache.
//
// Threads: work items (batch item, head, query block) through at::parallel_for (torch's pool). Results do
// not depend on the number of threads (each output row is computed by one thread, in a fixed order).
// `supported()` says whether this build has the kernel (the compiler targeted AVX512-BF16); without it
// `attention` raises and the caller uses another path.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define MOUSERECON_HAS_BF16_KERNEL 1
#endif

namespace {

bool supported() {
#ifdef MOUSERECON_HAS_BF16_KERNEL
    return true;
#else
    return false;
#endif
}

#ifdef MOUSERECON_HAS_BF16_KERNEL

constexpr int KEYS = 64;    // keys per block: 4 registers of 16 scores per query row
constexpr int ROWS = 6;     // queries per register block: 6 x 4 score accumulators + 4 key loads + 1 broadcast
constexpr int GROUPS = 16;  // register blocks per work item (96 queries share each key block)

// Every small loop over rows and registers is unrolled, so that the accumulators stay in registers: rolled,
// GCC kept a copy of the scores on the stack, stored at every step (2.2x slower).
#define UNROLL _Pragma("GCC unroll 16")

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

inline __m512bh broadcast_pair(const uint16_t* p) {
    uint32_t word;
    std::memcpy(&word, p, sizeof word);
    return as_bh(_mm512_set1_epi32(static_cast<int>(word)));
}

// 2^x for x <= 0 (x = -inf and anything below -150 give 0).
inline __m512 exp2_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);  // [-1/2, 1/2]
    __m512 p = _mm512_set1_ps(1.3333558146428443e-3f);  // ln2^k / k!, k = 5 .. 0
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// k rows [n, dh] (row stride `stride`) -> [blocks][dh/2][KEYS] pairs; v rows -> [ceil(n/2)][dh] pairs.
template <int DH>
void pack_head(const uint16_t* k, const uint16_t* v, int64_t stride, int64_t n, uint16_t* kp, uint16_t* vp) {
    const int64_t blocks = (n + KEYS - 1) / KEYS;
    std::memset(kp, 0, sizeof(uint16_t) * blocks * KEYS * DH);
    for (int64_t j = 0; j < n; ++j) {
        uint16_t* block = kp + (j / KEYS) * KEYS * DH;
        for (int p = 0; p < DH / 2; ++p) {
            block[(p * KEYS + j % KEYS) * 2] = k[j * stride + 2 * p];
            block[(p * KEYS + j % KEYS) * 2 + 1] = k[j * stride + 2 * p + 1];
        }
    }
    const int64_t pairs = blocks * KEYS / 2;
    std::memset(vp, 0, sizeof(uint16_t) * pairs * 2 * DH);
    for (int64_t j = 0; j < n; ++j)
        for (int c = 0; c < DH; ++c) vp[((j / 2) * DH + c) * 2 + j % 2] = v[j * stride + c];
}

// Running state of one register block of ROWS queries: output sums, row maxima of the raw scores and
// per-lane sums of the probabilities.
template <int DH>
struct RowState {
    alignas(64) float out[ROWS][DH];
    alignas(64) float sums[ROWS][16];
    float max[ROWS];
};

// One block of KEYS keys (`valid` of them real; kblock, vpairs: its packed k and v) into one register block
// of ROWS queries (q: their rows).
template <int DH>
inline void key_block(const uint16_t* const* q, const uint16_t* kblock, const uint16_t* vpairs, int valid,
                      float scale, RowState<DH>& st) {
    __m512 s[ROWS][4];
    UNROLL for (int r = 0; r < ROWS; ++r)
        UNROLL for (int z = 0; z < 4; ++z) s[r][z] = _mm512_setzero_ps();
    for (int p = 0; p < DH / 2; ++p) {
        __m512bh kz[4];
        UNROLL for (int z = 0; z < 4; ++z) kz[z] = as_bh(_mm512_loadu_si512(kblock + (p * KEYS + 16 * z) * 2));
        UNROLL for (int r = 0; r < ROWS; ++r) {
            const __m512bh qa = broadcast_pair(q[r] + 2 * p);
            UNROLL for (int z = 0; z < 4; ++z) s[r][z] = _mm512_dpbf16_ps(s[r][z], qa, kz[z]);
        }
    }
    if (valid < KEYS) {
        const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        UNROLL for (int z = 0; z < 4; ++z) {
            const int live = valid - 16 * z;
            const __mmask16 keep = live >= 16 ? __mmask16(0xFFFF) : live <= 0 ? __mmask16(0) : __mmask16((1u << live) - 1);
            UNROLL for (int r = 0; r < ROWS; ++r) s[r][z] = _mm512_mask_mov_ps(neg_inf, keep, s[r][z]);
        }
    }
    alignas(64) uint16_t probs[ROWS][KEYS];
    float rescale[ROWS];
    UNROLL for (int r = 0; r < ROWS; ++r) {
        const __m512 top = _mm512_max_ps(_mm512_max_ps(s[r][0], s[r][1]), _mm512_max_ps(s[r][2], s[r][3]));
        const float m_new = std::max(st.max[r], _mm512_reduce_max_ps(top));
        rescale[r] = m_new == st.max[r] ? 1.0f : std::exp2((st.max[r] - m_new) * scale);  // exp2(-inf) = 0
        st.max[r] = m_new;
        const __m512 shift = _mm512_set1_ps(m_new * scale), mul = _mm512_set1_ps(scale);
        __m512 sum = _mm512_mul_ps(_mm512_load_ps(st.sums[r]), _mm512_set1_ps(rescale[r]));
        __m512 e[4];
        UNROLL for (int z = 0; z < 4; ++z) {
            e[z] = exp2_nonpositive(_mm512_fmsub_ps(s[r][z], mul, shift));
            sum = _mm512_add_ps(sum, e[z]);
        }
        _mm512_store_ps(st.sums[r], sum);
        _mm512_store_si512(probs[r], (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
        _mm512_store_si512(probs[r] + 32, (__m512i)_mm512_cvtne2ps_pbh(e[3], e[2]));
    }
    constexpr int CZ = DH / 16 < 4 ? DH / 16 : 4;  // output registers per row per pass
    for (int c0 = 0; c0 < DH; c0 += 16 * CZ) {
        __m512 acc[ROWS][CZ];
        UNROLL for (int r = 0; r < ROWS; ++r) {
            const __m512 a = _mm512_set1_ps(rescale[r]);
            UNROLL for (int z = 0; z < CZ; ++z) acc[r][z] = _mm512_mul_ps(_mm512_load_ps(st.out[r] + c0 + 16 * z), a);
        }
        for (int t = 0; t < KEYS / 2; ++t) {
            __m512bh vz[CZ];
            UNROLL for (int z = 0; z < CZ; ++z) vz[z] = as_bh(_mm512_loadu_si512(vpairs + (t * DH + c0 + 16 * z) * 2));
            UNROLL for (int r = 0; r < ROWS; ++r) {
                const __m512bh pa = broadcast_pair(probs[r] + 2 * t);
                UNROLL for (int z = 0; z < CZ; ++z) acc[r][z] = _mm512_dpbf16_ps(acc[r][z], pa, vz[z]);
            }
        }
        UNROLL for (int r = 0; r < ROWS; ++r)
            UNROLL for (int z = 0; z < CZ; ++z) _mm512_store_ps(st.out[r] + c0 + 16 * z, acc[r][z]);
    }
}

template <int DH>
void attention_dh(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& out) {
    const int64_t b = q.size(0), nh = q.size(1), nq = q.size(2), nk = k.size(2);
    const int64_t kblocks = (nk + KEYS - 1) / KEYS, heads = b * nh;
    const int64_t head_pack = kblocks * KEYS * DH;  // uint16 per head, for each of k and v
    std::vector<uint16_t> kpack(heads * head_pack), vpack(heads * head_pack);
    auto ptr = [](const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
    const uint16_t *qd = ptr(q), *kd = ptr(k), *vd = ptr(v);
    uint16_t* od = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
        for (int64_t hh = begin; hh < end; ++hh) {
            const int64_t i = hh / nh, h = hh % nh;
            pack_head<DH>(kd + i * k.stride(0) + h * k.stride(1), vd + i * v.stride(0) + h * v.stride(1), k.stride(2),
                          nk, kpack.data() + hh * head_pack, vpack.data() + hh * head_pack);
        }
    });
    const float scale = static_cast<float>(1.0 / std::sqrt(double(DH)) / std::log(2.0));  // log2 e / sqrt(dh)
    constexpr int64_t BLOCK = int64_t(GROUPS) * ROWS;
    const int64_t qblocks = (nq + BLOCK - 1) / BLOCK;
    at::parallel_for(0, heads * qblocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<RowState<DH>> states(GROUPS);
        for (int64_t item = begin; item < end; ++item) {
            const int64_t hh = item / qblocks, row0 = (item % qblocks) * BLOCK;
            const int64_t i = hh / nh, h = hh % nh;
            const int64_t rows = std::min(BLOCK, nq - row0), groups = (rows + ROWS - 1) / ROWS;
            const uint16_t* qhead = qd + i * q.stride(0) + h * q.stride(1);
            const uint16_t* qrows[GROUPS][ROWS];
            for (int64_t g = 0; g < groups; ++g) {
                for (int r = 0; r < ROWS; ++r)  // a short last block repeats its last row (not written out)
                    qrows[g][r] = qhead + (row0 + std::min<int64_t>(g * ROWS + r, rows - 1)) * q.stride(2);
                std::memset(states[g].out, 0, sizeof states[g].out);
                std::memset(states[g].sums, 0, sizeof states[g].sums);
                std::fill(states[g].max, states[g].max + ROWS, -std::numeric_limits<float>::infinity());
            }
            const uint16_t* kh = kpack.data() + hh * head_pack;
            const uint16_t* vh = vpack.data() + hh * head_pack;
            for (int64_t kb = 0; kb < kblocks; ++kb) {
                const int valid = static_cast<int>(std::min<int64_t>(KEYS, nk - kb * KEYS));
                for (int64_t g = 0; g < groups; ++g)
                    key_block<DH>(qrows[g], kh + kb * KEYS * DH, vh + kb * KEYS * DH, valid, scale, states[g]);
            }
            for (int64_t g = 0; g < groups; ++g)
                for (int r = 0; r < ROWS && g * ROWS + r < rows; ++r) {
                    RowState<DH>& st = states[g];
                    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(_mm512_load_ps(st.sums[r])));
                    uint16_t* orow = od + i * out.stride(0) + h * out.stride(1) + (row0 + g * ROWS + r) * out.stride(2);
                    for (int c = 0; c < DH; c += 16)
                        _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow + c),
                                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(st.out[r] + c), inv)));
                }
        }
    });
}

#endif  // MOUSERECON_HAS_BF16_KERNEL

// q [b, nh, n_q, dh], k, v [b, nh, n_k, dh] bf16 with dh contiguous (dh in 16, 32, 64, 128); out
// [b, nh, n_q, dh] bf16 with dh contiguous, any other strides (written in place).
void attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, torch::Tensor out) {
    TORCH_CHECK(supported(), "this build of the attention kernel has no AVX512-BF16 code (the host CPU lacks it)");
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && out.dim() == 4, "q, k, v, out must be [b, nh, n, dh]");
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 &&
                out.scalar_type() == at::kBFloat16, "q, k, v, out must be bfloat16");
    TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
                "k and v must be [b, nh, n_k, dh] with q's b, nh, dh");
    TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape");
    TORCH_CHECK(k.stride(2) == v.stride(2), "k and v must have the same row stride");
    TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && out.stride(3) == 1, "dh must be contiguous");
    TORCH_CHECK(k.size(2) > 0, "no keys");
#ifdef MOUSERECON_HAS_BF16_KERNEL
    switch (q.size(3)) {
        case 16: attention_dh<16>(q, k, v, out); break;
        case 32: attention_dh<32>(q, k, v, out); break;
        case 64: attention_dh<64>(q, k, v, out); break;
        case 128: attention_dh<128>(q, k, v, out); break;
        default: TORCH_CHECK(false, "head width ", q.size(3), " is not one of 16, 32, 64, 128");
    }
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("supported", &supported, "whether this build has the AVX512-BF16 kernel");
    m.def("attention", &attention, "fused bf16 attention forward, written into out");
}
