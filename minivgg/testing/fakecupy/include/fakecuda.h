// Host shim for compiling minivgg's CUDA source with g++ (see fakecupy/_host_cuda.py).
// A kernel becomes an ordinary function; the launcher in the generated wrapper runs the grid
// as a loop over blocks and threads, setting these globals before each call. Anything this
// file does not define (shared memory, __syncthreads, atomics, warp intrinsics) fails to
// compile, on purpose: the stand-in runs threads one after another, so it cannot honour them.
#pragma once
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };
static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
