// Fused nearest-code search: score[q, k] = bias[k] + Q[q] . A[k], best and second-best per query,
// without ever writing the n x K scores. kernels/fused.py compiles it with NVRTC through CuPy.
//
// The CPU tests compile this same file with g++ against a host emulation of the CUDA built-ins
// (tests/cuda_host/), so it stays free of headers, warp intrinsics and dynamic shared memory.
//
// Layout: each block owns THREADS * QPT query rows (QPT rows per thread, kept in registers) and one
// split of the codebook, which it streams through shared memory TK codes at a time. Every thread
// scores each staged code against its rows with M sequential fmaf (a fixed order, so the same
// inputs give the same bits on every run) and keeps its best, its index and the second-best score.
// Codes are visited in increasing index and only a strictly higher score replaces the best, so the
// lowest index wins a tie; an equal score becomes the second-best, which the caller reads as "not
// certified". Splits of K are merged by gq_merge in split order, with the same rules. UNROLL codes
// per loop trip give the scheduler UNROLL x QPT independent FMA chains (the updates stay in order).

#ifndef GQ_NEG_INF
#define GQ_NEG_INF (-__int_as_float(0x7f800000))
#endif

template <int M, int QPT, int TK, int THREADS, bool BIAS, int UNROLL>
__global__ void __launch_bounds__(THREADS, 2) gq_nearest(
    const float* __restrict__ q,      // (n, M) query features, zero-padded to M
    const float* __restrict__ a,      // (k, M) code features, zero-padded to M
    const float* __restrict__ bias,   // (k,) per-code offset; read only when BIAS
    int n, int k, int codes_per_split,
    float* __restrict__ best_out,     // (splits, n)
    float* __restrict__ second_out,   // (splits, n)
    int* __restrict__ idx_out)        // (splits, n)
{
    static_assert(M % 4 == 0, "M must be a multiple of 4 (float4 loads)");
    __shared__ __align__(16) float tile[TK * M];
    __shared__ float tile_bias[BIAS ? TK : 1];

    const int tid = threadIdx.x;
    const int split = blockIdx.y;
    const int k_begin = split * codes_per_split;
    const int k_end = min(k, k_begin + codes_per_split);
    const long long row0 = (long long)blockIdx.x * (THREADS * QPT) + tid;

    float qr[QPT][M];
    float best[QPT];
    float second[QPT];
    int idx[QPT];
#pragma unroll
    for (int j = 0; j < QPT; ++j) {
        const long long row = row0 + (long long)j * THREADS;
        const float4* src = reinterpret_cast<const float4*>(q + row * M);
#pragma unroll
        for (int e = 0; e < M / 4; ++e) {
            float4 v;
            if (row < n) {
                v = src[e];
            } else {
                v.x = 0.f; v.y = 0.f; v.z = 0.f; v.w = 0.f;
            }
            qr[j][4 * e + 0] = v.x;
            qr[j][4 * e + 1] = v.y;
            qr[j][4 * e + 2] = v.z;
            qr[j][4 * e + 3] = v.w;
        }
        best[j] = GQ_NEG_INF;
        second[j] = GQ_NEG_INF;
        idx[j] = -1;
    }

    for (int t0 = k_begin; t0 < k_end; t0 += TK) {
        const int count = min(TK, k_end - t0);
        const float4* src = reinterpret_cast<const float4*>(a + (long long)t0 * M);
        float4* dst = reinterpret_cast<float4*>(tile);
        for (int i = tid; i < count * (M / 4); i += THREADS) dst[i] = src[i];
        if (BIAS) {
            for (int i = tid; i < count; i += THREADS) tile_bias[i] = bias[t0 + i];
        }
        __syncthreads();

#pragma unroll UNROLL
        for (int c = 0; c < count; ++c) {
            float acc[QPT];
#pragma unroll
            for (int j = 0; j < QPT; ++j) acc[j] = BIAS ? tile_bias[c] : 0.f;
#pragma unroll
            for (int e = 0; e < M; e += 4) {
                const float4 v = *reinterpret_cast<const float4*>(&tile[c * M + e]);
#pragma unroll
                for (int j = 0; j < QPT; ++j) {
                    acc[j] = fmaf(qr[j][e + 0], v.x, acc[j]);
                    acc[j] = fmaf(qr[j][e + 1], v.y, acc[j]);
                    acc[j] = fmaf(qr[j][e + 2], v.z, acc[j]);
                    acc[j] = fmaf(qr[j][e + 3], v.w, acc[j]);
                }
            }
            const int code = t0 + c;
#pragma unroll
            for (int j = 0; j < QPT; ++j) {
                if (acc[j] > best[j]) {
                    second[j] = best[j];
                    best[j] = acc[j];
                    idx[j] = code;
                } else if (acc[j] > second[j]) {
                    second[j] = acc[j];
                }
            }
        }
        __syncthreads();  // the next tile overwrites shared memory
    }

#pragma unroll
    for (int j = 0; j < QPT; ++j) {
        const long long row = row0 + (long long)j * THREADS;
        if (row < n) {
            const long long o = (long long)split * n + row;
            best_out[o] = best[j];
            second_out[o] = second[j];
            idx_out[o] = idx[j];
        }
    }
}

// Merge the per-split results in split order (= increasing code index): a strictly higher best
// wins, so ties keep the lower split's (lower) index, and every other split's best counts as a
// second-best candidate.
extern "C" __global__ void gq_merge(
    const float* __restrict__ best_in, const float* __restrict__ second_in,
    const int* __restrict__ idx_in, int n, int splits,
    float* __restrict__ best_out, float* __restrict__ second_out, int* __restrict__ idx_out)
{
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n) return;
    float b = best_in[row];
    float s = second_in[row];
    int i = idx_in[row];
    for (int p = 1; p < splits; ++p) {
        const long long o = (long long)p * n + row;
        const float pb = best_in[o];
        const float ps = second_in[o];
        if (pb > b) {
            s = fmaxf(b, fmaxf(s, ps));
            b = pb;
            i = idx_in[o];
        } else {
            s = fmaxf(s, fmaxf(pb, ps));
        }
    }
    best_out[row] = b;
    second_out[row] = s;
    idx_out[row] = i;
}
