// Fused nearest-code search on the CPU: score[q, k] = bias[k] + Q[q] . A[k], and per query the float32
// best score, its index and the second-best score, never the n x K scores. kernels/fused_cpu.py builds
// this file with torch.utils.cpp_extension on first use and certifies the results (kernels/certificate.py).
//
// Features of a code c (computed here from the raw codebook, tile by tile, so nothing of size K x m is
// ever stored): posterior rule A = [c^2, c] (m = 2d) with bias 0; mean rule A = c (m = d) with bias
// -||c||^2 / 2 (the query's constant -1/2 feature folded into the code). Scores start from the bias and
// add q_e * A_e by fused multiply-adds in increasing e, the same order everywhere, so the re-scoring
// of the winning lane reproduces the hot loop's bits. Padding codes get bias -inf and never win.
//
// The vectorised part (kernels/nearest_cpu_simd.h) is compiled twice, for AVX2+FMA and for AVX-512F,
// by `#pragma GCC target`; the ISA is chosen at run time (or forced by the caller). Work is split into
// tasks of consecutive query rows, taken by `threads` threads from a shared counter.

#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GQ_X86 1
#endif

namespace gq_nearest {

struct Problem {
    const float* q;  // (n, m) query features
    int64_t n;
    int m;
    const float* codes;  // (k, d) codebook
    int64_t k;
    int d;
    bool posterior;
    float* best;  // (n,) outputs
    float* second;
    int64_t* idx;
};

// Per-thread scratch: one packed tile, the running per-lane state of a task's rows, and the buffers of
// the final re-scoring.
struct Workspace {
    std::vector<float> storage;
    std::vector<int32_t> tiles;
    float* a = nullptr;
    float* bias = nullptr;
    float* best = nullptr;
    float* second = nullptr;
    int32_t* tile = nullptr;
    float* lane_a = nullptr;
    float* lane_bias = nullptr;
    float* lane_scores = nullptr;

    void reserve(int m, int tk, int64_t rows, int lanes) {
        const int64_t lane_cap = tk / lanes + lanes;
        const int64_t sizes[] = {int64_t(m) * tk, tk, rows * lanes, rows * lanes, m * lane_cap, lane_cap,
                                 lane_cap};
        float** slots[] = {&a, &bias, &best, &second, &lane_a, &lane_bias, &lane_scores};
        int64_t total = 16;
        for (int64_t s : sizes) total += (s + 15) / 16 * 16;  // every buffer 64-byte aligned
        storage.assign(total, 0.f);
        tiles.assign(rows * lanes, 0);
        float* base = storage.data();
        base += (16 - (reinterpret_cast<uintptr_t>(base) / 4) % 16) % 16;
        for (int i = 0; i < 7; ++i) {
            *slots[i] = base;
            base += (sizes[i] + 15) / 16 * 16;
        }
        tile = tiles.data();
    }
};

// One query's per-lane state: lane l's best score over the codes it saw, its second best, the tile of its best.
struct Lanes {
    const float* best;
    const float* second;
    const int32_t* tile;
    int count;
};

// Features of codes k0 + j * stride (j < count) into a (m x cap, feature-major) and bias (cap); codes
// from count to cap are padding (features 0, bias -inf). Built with -ffp-contract=off: plain products
// and sums in a fixed order, so every call gives the same bits for the same code.
static void pack_codes(const Problem& p, int64_t k0, int64_t stride, int count, int cap, float* a, float* bias) {
    const int d = p.d;
    for (int j = 0; j < count; ++j) {
        const float* c = p.codes + (k0 + j * stride) * d;
        if (p.posterior) {
            for (int i = 0; i < d; ++i) {
                a[int64_t(i) * cap + j] = c[i] * c[i];
                a[int64_t(d + i) * cap + j] = c[i];
            }
            bias[j] = 0.f;
        } else {
            float sq = 0.f;
            for (int i = 0; i < d; ++i) {
                a[int64_t(i) * cap + j] = c[i];
                sq += c[i] * c[i];
            }
            bias[j] = -0.5f * sq;
        }
    }
    for (int j = count; j < cap; ++j) {
        for (int e = 0; e < p.m; ++e) a[int64_t(e) * cap + j] = 0.f;
        bias[j] = -INFINITY;
    }
}

using ScoreCodes = void (*)(const float* a, const float* bias, int cap, int m, const float* q, float* out);

// From a query's per-lane state to its best, second best and index. The winning lane is re-scored in
// the tile where it won (same bits as the hot loop): that gives the index and the second best inside
// that lane and tile. A row whose best is not unique, or whose re-score disagrees, gets second = best,
// which the caller reads as "not certified".
static void finish_row(const Problem& p, int64_t row, const Lanes& lanes, int tk, Workspace& w,
                       ScoreCodes score_codes) {
    float b1 = -INFINITY;
    int winner = 0, ties = 0;
    for (int l = 0; l < lanes.count; ++l) {
        if (lanes.best[l] > b1) {
            b1 = lanes.best[l];
            winner = l;
            ties = 1;
        } else if (lanes.best[l] == b1) {
            ++ties;
        }
    }
    float b2 = lanes.second[winner];
    for (int l = 0; l < lanes.count; ++l) {
        if (l != winner) b2 = std::max(b2, lanes.best[l]);
    }
    const int64_t start = int64_t(lanes.tile[winner]) * tk + winner;
    const int64_t end = std::min<int64_t>(p.k, int64_t(lanes.tile[winner] + 1) * tk);
    const int count = start < end ? static_cast<int>((end - start + lanes.count - 1) / lanes.count) : 0;
    const int cap = std::max(lanes.count, (count + lanes.count - 1) / lanes.count * lanes.count);
    pack_codes(p, start, lanes.count, count, cap, w.lane_a, w.lane_bias);
    score_codes(w.lane_a, w.lane_bias, cap, p.m, p.q + row * p.m, w.lane_scores);
    float top = -INFINITY, inside = -INFINITY;
    int at = 0;
    for (int j = 0; j < count; ++j) {
        const float s = w.lane_scores[j];
        if (s > top) {
            inside = top;
            top = s;
            at = j;
        } else {
            inside = std::max(inside, s);
        }
    }
    p.best[row] = b1;
    p.idx[row] = start + int64_t(at) * lanes.count;
    p.second[row] = (ties > 1 || count == 0 || top != b1) ? b1 : std::max(b2, inside);
}

#ifdef GQ_X86

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct V {
    using reg = __m256;
    static constexpr int W = 8;
    static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
    static inline void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
    static inline reg set1(float x) { return _mm256_set1_ps(x); }
    static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
    static inline reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
    // Fold a tile's per-lane maxima into the running best / second / tile: a strictly higher maximum
    // takes over the best (so equal maxima keep the earlier tile and make best == second).
    static inline void merge(float* best, float* second, int32_t* tile, reg top, int t) {
        const reg b = load(best);
        const reg higher = _mm256_cmp_ps(top, b, _CMP_GT_OQ);
        store(second, _mm256_max_ps(load(second), _mm256_min_ps(b, top)));
        store(best, _mm256_max_ps(b, top));
        const reg tiles = _mm256_loadu_ps(reinterpret_cast<const float*>(tile));
        const reg now = _mm256_castsi256_ps(_mm256_set1_epi32(t));
        _mm256_storeu_ps(reinterpret_cast<float*>(tile), _mm256_blendv_ps(tiles, now, higher));
    }
};
constexpr int R = 4, C = 2;  // 8 accumulators + 4 maxima + 2 code vectors + 1 broadcast of 16 registers
#include "nearest_cpu_simd.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace avx512 {
struct V {
    using reg = __m512;
    static constexpr int W = 16;
    static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
    static inline void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
    static inline reg set1(float x) { return _mm512_set1_ps(x); }
    static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
    static inline reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
    static inline void merge(float* best, float* second, int32_t* tile, reg top, int t) {
        const reg b = load(best);
        const __mmask16 higher = _mm512_cmp_ps_mask(top, b, _CMP_GT_OQ);
        store(second, _mm512_max_ps(load(second), _mm512_min_ps(b, top)));
        store(best, _mm512_max_ps(b, top));
        const __m512i tiles = _mm512_loadu_si512(tile);
        _mm512_storeu_si512(tile, _mm512_mask_set1_epi32(tiles, higher, t));
    }
};
constexpr int R = 8, C = 2;  // 16 accumulators + 8 maxima + 2 code vectors + 1 broadcast of 32 registers
#include "nearest_cpu_simd.h"
}  // namespace avx512
#pragma GCC pop_options

#endif  // GQ_X86

struct Isa {
    const char* name;
    int lanes, rows;
    void (*run_rows)(const Problem&, int64_t, int64_t, int, Workspace&);
};

static std::vector<Isa> supported() {
    std::vector<Isa> out;
#ifdef GQ_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) out.push_back({"avx512", avx512::V::W, avx512::R, avx512::run_rows});
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        out.push_back({"avx2", avx2::V::W, avx2::R, avx2::run_rows});
    }
#endif
    return out;
}

std::vector<std::string> supported_isas() {
    std::vector<std::string> names;
    for (const Isa& isa : supported()) names.emplace_back(isa.name);
    return names;
}

// Codes per packed tile: about `tile_bytes` of features, a whole number of microkernel steps.
static int tile_codes(int64_t tile_bytes, int m, const Isa& isa) {
    const int step = isa.lanes * 2;
    const int64_t codes = std::max<int64_t>(step, tile_bytes / (4 * int64_t(m)) / step * step);
    return static_cast<int>(std::min<int64_t>(codes, 1 << 20));
}

std::vector<torch::Tensor> search(const torch::Tensor& q, const torch::Tensor& codes, bool posterior,
                                  int64_t threads, const std::string& isa_name, int64_t tile_bytes,
                                  int64_t task_rows) {
    TORCH_CHECK(q.device().is_cpu() && codes.device().is_cpu(), "CPU tensors only");
    TORCH_CHECK(q.scalar_type() == torch::kFloat32 && codes.scalar_type() == torch::kFloat32, "float32 only");
    TORCH_CHECK(q.dim() == 2 && codes.dim() == 2 && q.is_contiguous() && codes.is_contiguous(),
                "q (n, m) and codes (k, d), contiguous");
    const int64_t n = q.size(0), k = codes.size(0), d = codes.size(1);
    TORCH_CHECK(q.size(1) == (posterior ? 2 * d : d), "q has ", q.size(1), " features for d = ", d);
    TORCH_CHECK(k > 0 && k < (int64_t(1) << 31) && d > 0, "need 0 < K < 2^31 codes and d > 0");
    const Isa* isa = nullptr;
    const std::vector<Isa> isas = supported();
    for (const Isa& s : isas) {
        if (isa_name == s.name) isa = &s;
    }
    TORCH_CHECK(isa != nullptr, "this CPU cannot run the ", isa_name, " kernel");
    auto best = torch::empty({n}, q.options());
    auto second = torch::empty({n}, q.options());
    auto idx = torch::empty({n}, q.options().dtype(torch::kInt64));
    const Problem p{q.data_ptr<float>(), n, static_cast<int>(q.size(1)), codes.data_ptr<float>(), k,
                    static_cast<int>(d), posterior, best.data_ptr<float>(), second.data_ptr<float>(),
                    idx.data_ptr<int64_t>()};
    const int tk = tile_codes(tile_bytes, p.m, *isa);
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, (n + isa->rows - 1) / isa->rows));
    // rows per task: an even share per thread, capped so that a task's state stays in cache
    int64_t rows = std::min<int64_t>(task_rows, (n + workers - 1) / workers);
    rows = std::max<int64_t>(isa->rows, (rows + isa->rows - 1) / isa->rows * isa->rows);
    const int64_t tasks = (n + rows - 1) / rows;
    std::atomic<int64_t> next{0};
    std::exception_ptr error;
    std::mutex error_lock;
    auto work = [&]() {
        try {
            Workspace w;
            w.reserve(p.m, tk, rows, isa->lanes);
            for (int64_t t = next++; t < tasks; t = next++) {
                isa->run_rows(p, t * rows, std::min(n, (t + 1) * rows), tk, w);
            }
        } catch (...) {
            std::lock_guard<std::mutex> guard(error_lock);
            error = std::current_exception();
        }
    };
    {
        pybind11::gil_scoped_release no_gil;
        std::vector<std::thread> pool;
        for (int64_t i = 1; i < std::min(workers, tasks); ++i) pool.emplace_back(work);
        work();
        for (std::thread& t : pool) t.join();
    }
    if (error) std::rethrow_exception(error);
    return {best, second, idx};
}

}  // namespace gq_nearest

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("search", &gq_nearest::search, "best, second-best score and index per query (float32, certified by the caller)");
    m.def("supported_isas", &gq_nearest::supported_isas, "the kernel's ISAs this CPU runs, best first");
}
