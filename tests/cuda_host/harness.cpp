// Runs kernels/nearest.cu on the CPU through shim.h, for one configuration fixed at compile time
// (-DGQ_M -DGQ_QPT -DGQ_TK -DGQ_THREADS -DGQ_BIAS=0|1 -DGQ_UNROLL; -DGQ_KERNEL_SOURCE='"path"' for
// another source).
// Input file: int64 n, k, codes_per_split, splits; float32 q (n*M), a (k*M), bias (k, if GQ_BIAS).
// Output file: float32 best, second and int32 idx per split (splits*n each), then the merged three (n each).
#include <cstdint>
#include <cstdio>

#include "shim.h"
#ifndef GQ_KERNEL_SOURCE
#define GQ_KERNEL_SOURCE "../../kernels/nearest.cu"
#endif
#include GQ_KERNEL_SOURCE

template <class T>
static std::vector<T> read_array(std::FILE* f, size_t count) {
    std::vector<T> v(count);
    if (count && std::fread(v.data(), sizeof(T), count, f) != count) {
        std::fprintf(stderr, "short input\n");
        std::exit(2);
    }
    return v;
}

template <class T>
static void write_array(std::FILE* f, const std::vector<T>& v) {
    std::fwrite(v.data(), sizeof(T), v.size(), f);
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: harness INPUT OUTPUT\n");
        return 2;
    }
    std::FILE* in = std::fopen(argv[1], "rb");
    if (!in) return 2;
    const auto header = read_array<int64_t>(in, 4);
    const int n = int(header[0]), k = int(header[1]), per_split = int(header[2]), splits = int(header[3]);
    const auto q = read_array<float>(in, size_t(n) * GQ_M);
    const auto a = read_array<float>(in, size_t(k) * GQ_M);
    const auto bias = read_array<float>(in, GQ_BIAS ? size_t(k) : 0);
    std::fclose(in);

    const size_t parts = size_t(splits) * n;
    std::vector<float> best(parts), second(parts), mbest(n), msecond(n);
    std::vector<int> idx(parts), midx(n);
    const unsigned qblocks = unsigned((n + GQ_THREADS * GQ_QPT - 1) / (GQ_THREADS * GQ_QPT));
    gq_launch(dim3{qblocks, unsigned(splits), 1}, dim3{GQ_THREADS, 1, 1}, [&] {
        gq_nearest<GQ_M, GQ_QPT, GQ_TK, GQ_THREADS, bool(GQ_BIAS), GQ_UNROLL>(
            q.data(), a.data(), GQ_BIAS ? bias.data() : nullptr, n, k, per_split, best.data(),
            second.data(), idx.data());
    });
    const unsigned merge_threads = 64;
    gq_launch(dim3{unsigned((n + merge_threads - 1) / merge_threads), 1, 1}, dim3{merge_threads, 1, 1}, [&] {
        gq_merge(best.data(), second.data(), idx.data(), n, splits, mbest.data(), msecond.data(), midx.data());
    });

    std::FILE* out = std::fopen(argv[2], "wb");
    if (!out) return 2;
    write_array(out, best);
    write_array(out, second);
    write_array(out, idx);
    write_array(out, mbest);
    write_array(out, msecond);
    write_array(out, midx);
    std::fclose(out);
    return 0;
}
