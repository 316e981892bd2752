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
// by `#pragma GCC target`; the ISA is chosen at run time (or forced by the caller). `threads` threads
// share the codebook's tiles through a counter (search_chunk), then split the rows to finish them.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
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

// 64-byte aligned float buffers carved out of one allocation.
struct Buffers {
    std::vector<float> storage;

    std::vector<float*> carve(std::initializer_list<int64_t> sizes) {
        int64_t total = 16;
        for (int64_t s : sizes) total += (s + 15) / 16 * 16;
        storage.assign(total, 0.f);
        float* base = storage.data();
        base += (16 - (reinterpret_cast<uintptr_t>(base) / 4) % 16) % 16;
        std::vector<float*> out;
        for (int64_t s : sizes) {
            out.push_back(base);
            base += (s + 15) / 16 * 16;
        }
        return out;
    }
};

// One worker's scratch: a packed tile, the per-lane state of the chunk's rows (best, second, tile of
// the best; rows x lanes each) and the buffers of the final re-scoring of one lane.
struct Workspace {
    Buffers buffers;
    std::vector<int32_t> tiles;
    float *a, *bias, *best, *second, *lane_a, *lane_bias, *lane_scores;
    int32_t* tile;

    void reserve(int m, int tk, int64_t rows, int lanes) {
        const int64_t lane_cap = tk / lanes + lanes;
        const auto b = buffers.carve({int64_t(m) * tk, tk, rows * lanes, rows * lanes, m * lane_cap, lane_cap,
                                      lane_cap});
        a = b[0], bias = b[1], best = b[2], second = b[3], lane_a = b[4], lane_bias = b[5], lane_scores = b[6];
        tiles.assign(rows * lanes, 0);
        tile = tiles.data();
        std::fill(best, best + rows * lanes, -INFINITY);
        std::fill(second, second + rows * lanes, -INFINITY);
    }
};

// Features of codes k0 + j * stride (j < count) into a (m x cap, feature-major) and bias (cap); codes
// from count to cap are padding (features 0, bias -inf). Built with -ffp-contract=off: plain products
// and sums in a fixed order, so every call gives the same bits for the same code.
static void pack_codes(const Problem& p, int64_t k0, int64_t stride, int count, int cap, float* a, float* bias) {
    const int d = p.d;
    const float* base = p.codes + k0 * d;
    const int64_t step = stride * d;
    // feature-major: each inner loop writes one contiguous row of the tile (the codes' i-th coordinate)
    for (int j = 0; j < count; ++j) bias[j] = 0.f;
    for (int i = 0; i < d; ++i) {
        float* sq = a + int64_t(i) * cap;
        float* lin = a + int64_t(p.posterior ? d + i : i) * cap;
        for (int j = 0; j < count; ++j) {
            const float c = base[j * step + i];
            lin[j] = c;
            if (p.posterior) {
                sq[j] = c * c;
            } else {
                bias[j] += c * c;  // ||c||^2 summed in coordinate order, the same for every call
            }
        }
    }
    if (!p.posterior) {
        for (int j = 0; j < count; ++j) bias[j] *= -0.5f;
    }
    for (int j = count; j < cap; ++j) {
        for (int e = 0; e < p.m; ++e) a[int64_t(e) * cap + j] = 0.f;
        bias[j] = -INFINITY;
    }
}

// Queries [c0, c1) into microkernel blocks of R rows, feature-major inside a block (q[e][r]), so the
// hot loop broadcasts from one pointer; the last block repeats the last row.
static void pack_queries(const Problem& p, int64_t c0, int64_t c1, int rows_per_block, float* out) {
    const int64_t padded = (c1 - c0 + rows_per_block - 1) / rows_per_block * rows_per_block;
    for (int64_t i = 0; i < padded; ++i) {
        const float* q = p.q + std::min(c0 + i, c1 - 1) * p.m;
        float* block = out + (i / rows_per_block) * p.m * rows_per_block + i % rows_per_block;
        for (int e = 0; e < p.m; ++e) block[e * rows_per_block] = q[e];
    }
}

// Fold worker `from`'s per-lane state of one row into `into`'s. Exact operations only (max, min), and
// equal bests keep the lower tile, so the result does not depend on which worker scored which tile.
static void merge_lanes(const Workspace& from, Workspace& into, int64_t o, int lanes) {
    for (int64_t l = o; l < o + lanes; ++l) {
        const float b = from.best[l];
        if (b > into.best[l]) {
            into.second[l] = std::max({into.second[l], into.best[l], from.second[l]});
            into.best[l] = b;
            into.tile[l] = from.tile[l];
        } else {
            into.second[l] = std::max(into.second[l], b);  // b >= s: the worker's best is a runner-up
            if (b == into.best[l]) into.tile[l] = std::min(into.tile[l], from.tile[l]);
        }
    }
}

using ScoreCodes = void (*)(const float* a, const float* bias, int cap, int m, const float* q, float* out);

// From a row's per-lane state (best, second, tile: `lanes` each) to its best, second best and index. The winning lane is
// re-scored in the tile where it won (same bits as the hot loop): that gives the index and the second
// best inside that lane and tile; every other code is bounded by another lane's best or the lane's
// second. A row whose best is not unique, or whose re-score disagrees, gets second = best, which the
// caller reads as "not certified".
static void finish_row(const Problem& p, int64_t row, const float* best, const float* second,
                       const int32_t* tiles, int lanes, int tk, Workspace& w, ScoreCodes score_codes) {
    float b1 = -INFINITY;
    int winner = 0, ties = 0;
    for (int l = 0; l < lanes; ++l) {
        if (best[l] > b1) {
            b1 = best[l];
            winner = l;
            ties = 1;
        } else if (best[l] == b1) {
            ++ties;
        }
    }
    float b2 = second[winner];
    for (int l = 0; l < lanes; ++l) {
        if (l != winner) b2 = std::max(b2, best[l]);
    }
    const int32_t tile = tiles[winner];
    const int64_t start = int64_t(tile) * tk + winner;
    const int64_t end = std::min<int64_t>(p.k, int64_t(tile + 1) * tk);
    const int count = start < end ? static_cast<int>((end - start + lanes - 1) / lanes) : 0;
    const int cap = std::max(lanes, (count + lanes - 1) / lanes * lanes);
    pack_codes(p, start, lanes, count, cap, w.lane_a, w.lane_bias);
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
    p.idx[row] = start + int64_t(at) * lanes;
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
    static inline float hmax(reg x) {
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
    }
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
    static inline float hmax(reg x) { return _mm512_reduce_max_ps(x); }
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
    void (*scan_tiles)(const Problem&, const float*, int64_t, int, std::atomic<int64_t>&, Workspace&);
    void (*scan_runs)(const Problem&, const float*, int64_t, int, int, std::atomic<int64_t>&, Workspace&, float*,
                      int64_t);
    ScoreCodes score_codes;
};

static std::vector<Isa> supported() {
    std::vector<Isa> out;
#ifdef GQ_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        out.push_back({"avx512", avx512::V::W, avx512::R, avx512::scan_tiles, avx512::scan_runs, avx512::score_codes});
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        out.push_back({"avx2", avx2::V::W, avx2::R, avx2::scan_tiles, avx2::scan_runs, avx2::score_codes});
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

// f(worker) for workers 0 .. workers-1 on torch's intra-op threads (at::parallel_for, so the threads are
// torch's own: a second pool would compete with torch's spinning OpenMP threads for the same cores).
template <class F>
static void parallel(int64_t workers, const F& f) {
    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) f(i);
    });
}

// Rows [c0, c1): the workers share the codebook's tiles (each packs the tiles it takes from a counter
// and scores every row against them, so no tile is packed twice and a busy core simply takes fewer);
// then the rows are split between them to merge the workers' lane states and finish.
static void search_chunk(const Problem& p, const Isa& isa, int64_t c0, int64_t c1, int tk, int64_t threads,
                         std::vector<Workspace>& ws, std::vector<float>& qpack) {
    const int64_t rows = c1 - c0;
    const int64_t padded = (rows + isa.rows - 1) / isa.rows * isa.rows;
    const int64_t tiles = (p.k + tk - 1) / tk;
    pack_queries(p, c0, c1, isa.rows, qpack.data());
    std::atomic<int64_t> next{0};
    const int64_t scanners = std::min<int64_t>(threads, tiles);
    parallel(scanners, [&](int64_t w) {
        ws[w].reserve(p.m, tk, padded, isa.lanes);
        isa.scan_tiles(p, qpack.data(), padded, tk, next, ws[w]);
    });
    const int64_t finishers = std::min<int64_t>(threads, rows);
    parallel(finishers, [&](int64_t f) {
        if (f >= scanners) ws[f].reserve(p.m, tk, 0, isa.lanes);  // its re-scoring buffers
        Workspace& merged = ws[0];  // each finisher writes only its own rows of it
        for (int64_t i = rows * f / finishers; i < rows * (f + 1) / finishers; ++i) {
            const int64_t o = i * isa.lanes;
            for (int64_t w = 1; w < scanners; ++w) merge_lanes(ws[w], merged, o, isa.lanes);
            finish_row(p, c0 + i, merged.best + o, merged.second + o, merged.tile + o, isa.lanes, tk, ws[f],
                       isa.score_codes);
        }
    });
}

static const Isa& find_isa(const std::string& name, const std::vector<Isa>& isas) {
    for (const Isa& s : isas) {
        if (name == s.name) return s;
    }
    TORCH_CHECK(false, "this CPU cannot run the ", name, " kernel");
}

static Problem problem(const torch::Tensor& q, const torch::Tensor& codes, bool posterior) {
    TORCH_CHECK(q.device().is_cpu() && codes.device().is_cpu(), "CPU tensors only");
    TORCH_CHECK(q.scalar_type() == torch::kFloat32 && codes.scalar_type() == torch::kFloat32, "float32 only");
    TORCH_CHECK(q.dim() == 2 && codes.dim() == 2 && q.is_contiguous() && codes.is_contiguous(),
                "q (n, m) and codes (k, d), contiguous");
    const int64_t k = codes.size(0), d = codes.size(1);
    TORCH_CHECK(q.size(1) == (posterior ? 2 * d : d), "q has ", q.size(1), " features for d = ", d);
    TORCH_CHECK(k > 0 && k < (int64_t(1) << 31) && d > 0, "need 0 < K < 2^31 codes and d > 0");
    return Problem{q.data_ptr<float>(), q.size(0), static_cast<int>(q.size(1)), codes.data_ptr<float>(), k,
                   static_cast<int>(d), posterior, nullptr, nullptr, nullptr};
}

std::vector<torch::Tensor> search(const torch::Tensor& q, const torch::Tensor& codes, bool posterior,
                                  int64_t threads, const std::string& isa_name, int64_t tile_bytes,
                                  int64_t chunk_rows) {
    Problem p = problem(q, codes, posterior);
    const std::vector<Isa> isas = supported();
    const Isa& isa = find_isa(isa_name, isas);
    const int64_t n = p.n;
    auto best = torch::empty({n}, q.options());
    auto second = torch::empty({n}, q.options());
    auto idx = torch::empty({n}, q.options().dtype(torch::kInt64));
    p.best = best.data_ptr<float>(), p.second = second.data_ptr<float>(), p.idx = idx.data_ptr<int64_t>();
    const int tk = tile_codes(tile_bytes, p.m, isa);
    threads = std::max<int64_t>(1, threads);
    const int64_t chunk = std::max<int64_t>(isa.rows, chunk_rows / isa.rows * isa.rows);
    {
        pybind11::gil_scoped_release no_gil;
        std::vector<Workspace> ws(threads);
        std::vector<float> qpack((std::min(chunk, n) + isa.rows) * p.m);
        for (int64_t c0 = 0; c0 < n; c0 += chunk) {
            search_chunk(p, isa, c0, std::min(n, c0 + chunk), tk, threads, ws, qpack);
        }
    }
    return {best, second, idx};
}

// Each row's maximum float32 score over every run of `block` codes, (n, ceil(K / block)): the candidate
// runs of kernels/tiled.py's float64 finish, scored by the same microkernel as search().
torch::Tensor run_maxima(const torch::Tensor& q, const torch::Tensor& codes, bool posterior, int64_t threads,
                         const std::string& isa_name, int64_t block, int64_t tile_bytes) {
    const Problem p = problem(q, codes, posterior);
    const std::vector<Isa> isas = supported();
    const Isa& isa = find_isa(isa_name, isas);
    TORCH_CHECK(block > 0 && block % (2 * isa.lanes) == 0, "block must be a multiple of ", 2 * isa.lanes);
    const int64_t runs = (p.k + block - 1) / block;
    auto out = torch::empty({p.n, runs}, q.options());
    const int tk = static_cast<int>(block * std::max<int64_t>(1, tile_bytes / (4 * p.m) / block));
    const int64_t padded = (p.n + isa.rows - 1) / isa.rows * isa.rows;
    std::vector<float> qpack((padded + isa.rows) * p.m);
    pack_queries(p, 0, p.n, isa.rows, qpack.data());
    std::atomic<int64_t> next{0};
    pybind11::gil_scoped_release no_gil;
    std::vector<Workspace> ws(std::max<int64_t>(1, std::min(threads, (p.k + tk - 1) / tk)));
    parallel(ws.size(), [&](int64_t w) {
        ws[w].reserve(p.m, tk, 0, isa.lanes);
        isa.scan_runs(p, qpack.data(), padded, tk, block, next, ws[w], out.data_ptr<float>(), runs);
    });
    return out;
}

}  // namespace gq_nearest

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("search", &gq_nearest::search, "best, second-best score and index per query (float32, certified by the caller)");
    m.def("run_maxima", &gq_nearest::run_maxima, "per-row float32 maxima over runs of `block` codes");
    m.def("supported_isas", &gq_nearest::supported_isas, "the kernel's ISAs this CPU runs, best first");
}
