// Host emulation of the CUDA built-ins that kernels/nearest.cu uses, so the CPU tests can compile
// and run the real kernel source with g++: each block runs as THREADS std::threads, shared memory
// is a static array (blocks run one after another), __syncthreads is a std::barrier.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
inline std::barrier<>* gq_block_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct alignas(16) float4 {
    float x, y, z, w;
};

inline void __syncthreads() { gq_block_barrier->arrive_and_wait(); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
using std::fmaf;
using std::fmaxf;
using std::min;

// Runs `kernel()` for every thread of every block; blocks in grid order, one at a time.
template <class Kernel>
void gq_launch(dim3 grid, dim3 block, Kernel kernel) {
    gridDim = grid;
    blockDim = block;
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::barrier<> bar(block.x);
            gq_block_barrier = &bar;
            std::vector<std::thread> threads;
            threads.reserve(block.x);
            for (unsigned t = 0; t < block.x; ++t) {
                threads.emplace_back([=] {
                    threadIdx = dim3{t, 0, 0};
                    blockIdx = dim3{bx, by, 0};
                    kernel();
                });
            }
            for (auto& th : threads) th.join();
        }
    }
}
