// The vectorised half of the CPU search kernel (kernels/nearest_cpu.cpp includes it once per ISA, inside
// that ISA's namespace and `#pragma GCC target`, after defining the vector traits `V`, the microkernel's
// query rows R and code vectors C). No headers here: everything below is compiled for that ISA only.
//
// Lanes run over codes: a packed tile holds feature e of W consecutive codes in one vector, so a score
// vector is W codes against one query, built by M fused multiply-adds from the query's features
// (broadcast from memory) and the tile. R queries x C code vectors are in flight per step (R*C
// independent FMA chains). Each query keeps, per lane, only the running maximum over the tile (one max
// per score vector); at the tile's end that joins the query's per-lane best, second best and the tile of
// the best. Scores are never written to memory. The lane that wins, in the tile where it won, is
// re-scored at the end (TK / W codes) in the same arithmetic, which gives the winning index and the
// second best inside that lane and tile; every other code is bounded by a lane or tile maximum.

// Score the packed tile (m x cap features, cap biases) against a block of R query rows (m x R features).
// Each row keeps, per lane, only the running maximum (one max per score vector); every `run` codes (a
// multiple of W * C) it goes to emit(r, run index, maximum) and starts again.
template <int R, int C, class Emit>
static inline void score_runs(const float* a, const float* bias, int cap, int m, const float* qblock, int run,
                              const Emit& emit) {
    for (int v0 = 0; v0 < cap; v0 += run) {
        typename V::reg top[R];
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) top[r] = V::set1(-INFINITY);
        for (int v = v0; v < std::min(cap, v0 + run); v += V::W * C) {
            typename V::reg acc[R][C];
#pragma GCC unroll 16
            for (int c = 0; c < C; ++c) {
                const typename V::reg b = V::load(bias + v + c * V::W);
#pragma GCC unroll 16
                for (int r = 0; r < R; ++r) acc[r][c] = b;
            }
            const float* av = a + v;
            const float* qe = qblock;
            for (int e = 0; e < m; ++e, av += cap, qe += R) {
                typename V::reg x[C];
#pragma GCC unroll 16
                for (int c = 0; c < C; ++c) x[c] = V::load(av + c * V::W);
#pragma GCC unroll 16
                for (int r = 0; r < R; ++r) {
                    const typename V::reg qb = V::set1(qe[r]);
#pragma GCC unroll 16
                    for (int c = 0; c < C; ++c) acc[r][c] = V::fma(qb, x[c], acc[r][c]);
                }
            }
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
                for (int c = 0; c < C; ++c) top[r] = V::max(top[r], acc[r][c]);
            }
        }
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) emit(r, v0 / run, top[r]);
    }
}

// Scores of one query against `cap` packed codes (cap a multiple of W), in the arithmetic of
// score_tile_rows lane for lane: the same bias start and the same FMA order, so the same bits.
static inline void score_codes(const float* a, const float* bias, int cap, int m, const float* q, float* out) {
    for (int j = 0; j < cap; j += V::W) {
        typename V::reg acc = V::load(bias + j);
        for (int e = 0; e < m; ++e) acc = V::fma(V::set1(q[e]), V::load(a + e * cap + j), acc);
        V::store(out + j, acc);
    }
}

// Take tiles from `next` until none is left: pack each, score every block of rows against it, and fold
// each row's per-lane tile maximum into its running state (best, second, tile of the best).
static void scan_tiles(const Problem& p, const float* qpack, int64_t padded, int tk, std::atomic<int64_t>& next,
                       Workspace& w) {
    const int m = p.m;
    for (int64_t t = next++; t * tk < p.k; t = next++) {
        const int64_t k0 = t * tk;
        const int count = static_cast<int>(std::min<int64_t>(tk, p.k - k0));
        const int cap = (count + V::W * C - 1) / (V::W * C) * (V::W * C);
        pack_codes(p, k0, 1, count, cap, w.a, w.bias);
        for (int64_t rb = 0; rb < padded; rb += R) {
            const int64_t o = rb * V::W;
            score_runs<R, C>(w.a, w.bias, cap, m, qpack + rb * m, cap, [&](int r, int, typename V::reg top) {
                const int64_t at = o + r * V::W;
                V::merge(w.best + at, w.second + at, w.tile + at, top, static_cast<int>(t));
            });
        }
    }
}

// Each row's maximum over every run of `block` codes (a multiple of W * C) of the tiles taken from `next`,
// into maxima (rows x runs): kernels/tiled.py's candidate runs, in the arithmetic of scan_tiles.
static void scan_runs(const Problem& p, const float* qpack, int64_t padded, int tk, int block,
                      std::atomic<int64_t>& next, Workspace& w, float* maxima, int64_t runs) {
    for (int64_t t = next++; t * tk < p.k; t = next++) {
        const int64_t k0 = t * tk;
        const int count = static_cast<int>(std::min<int64_t>(tk, p.k - k0));
        const int cap = (count + block - 1) / block * block;
        pack_codes(p, k0, 1, count, cap, w.a, w.bias);
        for (int64_t rb = 0; rb < padded; rb += R) {
            score_runs<R, C>(w.a, w.bias, cap, p.m, qpack + rb * p.m, block, [&](int r, int j, typename V::reg top) {
                if (rb + r < p.n) maxima[(rb + r) * runs + k0 / block + j] = V::hmax(top);
            });
        }
    }
}
