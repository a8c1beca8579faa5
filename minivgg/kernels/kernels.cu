// minivgg's CUDA kernels: im2col / col2im, max-pool forward / backward, and a counter-based
// uniform random generator. Plain CUDA C++, loaded by minivgg/kernels/gpu.py with cupy.RawModule.
//
// Every kernel gives one thread per output element and walks the outputs with a grid-stride
// loop, so any grid size is correct. col2im and the pool backward *gather* (each input pixel
// sums what came from it) instead of scattering, so there are no atomics and the results are
// deterministic. Indices are 64-bit (`long long`) wherever a product can pass 2^31.
//
// Notation as in kernels/cpu.py: N batch, C channels, H W input size, KH KW window,
// sh sw stride, ph pw padding, OH OW output size. T is the element type (__half, float,
// double); arithmetic that accumulates runs in acc_t<T> (float for __half).
//
// The same text is compiled for real GPUs by NVRTC (through CuPy) and nvcc (tests), and for
// the CPU by the test suite's CuPy stand-in (minivgg/testing/fakecupy), which runs the grid
// as a loop. So: no shared memory, no atomics, no warp intrinsics here.
#include <cuda_fp16.h>

// Accumulate half-precision values in float; float and double in themselves.
template <typename T> struct Acc { typedef T type; };
template <> struct Acc<__half> { typedef float type; };

#define GRID_STRIDE_LOOP(i, total)                                                   \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (total); \
         i += (long long)blockDim.x * gridDim.x)

// The output row whose window puts kernel row k on input row y (y = o*stride - pad + k), or -1
// when there is none: o = (y + pad - k) / stride must divide exactly and lie in [0, out).
// The same for columns. col2im and the pool backward use it to gather instead of scatter.
__device__ __forceinline__ int window_at(int y, int k, int pad, int stride, int out) {
    int o = y + pad - k;
    if (o < 0 || o % stride != 0) return -1;
    o /= stride;
    return o < out ? o : -1;
}

// Layout: every feature map here is CHWN, channel-major with the batch innermost, as
// kernels/cpu.py explains (gpu.py hands the kernels CHWN arrays and returns NCHW views).
// Element (b, c, y, x) of a C x H x W map of N images sits at ((c * H + y) * W + x) * N + b.

// cols (C, KH, KW, OH, OW, N) <- x (C, H, W, N): element (c, kh, kw, oh, ow, b) is the pixel
// x[c, oh*sh - ph + kh, ow*sw - pw + kw, b], or 0 where that falls in the padding.
template <typename T>
__global__ void im2col(const T* x, T* cols, int N, int C, int H, int W, int KH, int KW,
                       int OH, int OW, int sh, int sw, int ph, int pw) {
    const long long total = (long long)C * KH * KW * OH * OW * N;
    GRID_STRIDE_LOOP(i, total) {
        long long t = i;
        const int b  = t % N;   t /= N;
        const int ow = t % OW;  t /= OW;
        const int oh = t % OH;  t /= OH;
        const int kw = t % KW;  t /= KW;
        const int kh = t % KH;  const int c = t / KH;
        const int y = oh * sh - ph + kh, xx = ow * sw - pw + kw;
        const bool inside = y >= 0 && y < H && xx >= 0 && xx < W;
        cols[i] = inside ? x[(((long long)c * H + y) * W + xx) * N + b] : static_cast<T>(0.0f);
    }
}

// dx (C, H, W, N) <- cols, the adjoint of im2col: pixel (y, xx) sums every column entry that
// was copied from it, at kernel offset (kh, kw) of the output (oy, ox) = window_at(...).
template <typename T>
__global__ void col2im(const T* cols, T* dx, int N, int C, int H, int W, int KH, int KW,
                       int OH, int OW, int sh, int sw, int ph, int pw) {
    typedef typename Acc<T>::type acc_t;
    const long long total = (long long)C * H * W * N;
    GRID_STRIDE_LOOP(i, total) {
        long long t = i;
        const int b  = t % N;  t /= N;
        const int xx = t % W;  t /= W;
        const int y  = t % H;  const int c = t / H;
        acc_t acc = 0;
        for (int kh = 0; kh < KH; ++kh) {
            const int oy = window_at(y, kh, ph, sh, OH);
            if (oy < 0) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int ox = window_at(xx, kw, pw, sw, OW);
                if (ox < 0) continue;
                const long long row = ((long long)c * KH + kh) * KW + kw;
                acc += static_cast<acc_t>(cols[((row * OH + oy) * OW + ox) * N + b]);
            }
        }
        dx[i] = static_cast<T>(acc);
    }
}

// out, argmax (C, OH, OW, N) <- x (C, H, W, N): the window maximum and its offset kh*KW + kw.
// As PyTorch: padding never wins (only in-bounds pixels are read), the first maximum wins a
// tie (only a strictly larger value replaces it), and NaN propagates (a NaN always replaces,
// so a window holding NaN yields NaN, at its last NaN).
template <typename T>
__global__ void maxpool_forward(const T* x, T* out, int* argmax, int N, int C, int H, int W,
                                int KH, int KW, int OH, int OW, int sh, int sw, int ph, int pw) {
    typedef typename Acc<T>::type acc_t;
    const long long total = (long long)C * OH * OW * N;
    GRID_STRIDE_LOOP(i, total) {
        long long t = i;
        const int b  = t % N;   t /= N;
        const int ow = t % OW;  t /= OW;
        const int oh = t % OH;  const int c = t / OH;
        const T* plane = x + (long long)c * H * W * N + b;   // x[c, :, :, b], N apart
        int best_at = -1;
        acc_t best = 0;
        for (int kh = 0; kh < KH; ++kh) {
            const int y = oh * sh - ph + kh;
            if (y < 0 || y >= H) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int xx = ow * sw - pw + kw;
                if (xx < 0 || xx >= W) continue;
                const acc_t v = static_cast<acc_t>(plane[((long long)y * W + xx) * N]);
                if (best_at < 0 || v > best || v != v) { best = v; best_at = kh * KW + kw; }
            }
        }
        out[i] = static_cast<T>(best);   // every window holds an in-bounds pixel (padding <= KH/2)
        argmax[i] = best_at;
    }
}

// dx (C, H, W, N) <- dout (C, OH, OW, N): pixel (y, xx) sums dout over the windows whose
// argmax is this pixel; a pixel that lies in no window gets 0.
template <typename T>
__global__ void maxpool_backward(const T* dout, const int* argmax, T* dx, int N, int C, int H, int W,
                                 int KH, int KW, int OH, int OW, int sh, int sw, int ph, int pw) {
    typedef typename Acc<T>::type acc_t;
    const long long total = (long long)C * H * W * N;
    GRID_STRIDE_LOOP(i, total) {
        long long t = i;
        const int b  = t % N;  t /= N;
        const int xx = t % W;  t /= W;
        const int y  = t % H;  const int c = t / H;
        acc_t acc = 0;
        for (int kh = 0; kh < KH; ++kh) {
            const int oy = window_at(y, kh, ph, sh, OH);
            if (oy < 0) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int ox = window_at(xx, kw, pw, sw, OW);
                if (ox < 0) continue;
                const long long o = (((long long)c * OH + oy) * OW + ox) * N + b;
                if (argmax[o] == kh * KW + kw) acc += static_cast<acc_t>(dout[o]);
            }
        }
        dx[i] = static_cast<T>(acc);
    }
}

// Winograd's tile transforms (minivgg/layers/conv_winograd.py, kernels/cpu.py's winograd_*_cpu).
// The tile domain is (k*k, C, P), P = TH*TW*N: entry (u, v) of tile (th, tw) of image b in row
// u*k + v, column c*P + (th*TW + tw)*N + b, so each of the k*k rows is one GEMM operand (C, P).
// Tiles are at most WINOGRAD_MAX on a side (6: F(4x4, 3x3)); gpu.py checks it.
#define WINOGRAD_MAX 6

// dst (k*k, C, P) <- src (C, H, W, N): tile (th, tw) is the q x q window at (th*step - ph,
// tw*step - pw) of src (0 outside it), sent out as L d L^T, L a row-major (k, q) matrix.
// One thread per tile and channel: it reads the window once and writes its k*k entries.
template <typename T>
__global__ void winograd_tiles(const T* src, T* dst, const double* L, int k, int q, int step,
                               int N, int C, int H, int W, int TH, int TW, int ph, int pw) {
    typedef typename Acc<T>::type acc_t;
    const long long P = (long long)TH * TW * N;
    const long long total = (long long)C * P;
    GRID_STRIDE_LOOP(i, total) {
        long long t = i;
        const int b  = t % N;   t /= N;
        const int tw = t % TW;  t /= TW;
        const int th = t % TH;  const int c = t / TH;
        acc_t d[WINOGRAD_MAX][WINOGRAD_MAX];
        for (int a = 0; a < q; ++a) {
            const int y = th * step - ph + a;
            for (int e = 0; e < q; ++e) {
                const int xx = tw * step - pw + e;
                const bool inside = y >= 0 && y < H && xx >= 0 && xx < W;
                d[a][e] = inside ? static_cast<acc_t>(src[(((long long)c * H + y) * W + xx) * N + b])
                                 : static_cast<acc_t>(0.0f);
            }
        }
        acc_t r[WINOGRAD_MAX][WINOGRAD_MAX];   // r = L d, (k, q)
        for (int u = 0; u < k; ++u)
            for (int e = 0; e < q; ++e) {
                acc_t s = 0;
                for (int a = 0; a < q; ++a) s += static_cast<acc_t>(L[u * q + a]) * d[a][e];
                r[u][e] = s;
            }
        for (int u = 0; u < k; ++u)            // (L d) L^T
            for (int v = 0; v < k; ++v) {
                acc_t s = 0;
                for (int e = 0; e < q; ++e) s += r[u][e] * static_cast<acc_t>(L[v * q + e]);
                dst[(long long)(u * k + v) * total + i] = static_cast<T>(s);
            }
    }
}

// dst (C, H, W, N) <- src (q*q, C, P), the way back: pixel (y, xx) sums entry (a, e) of every
// tile (th, tw) that covers it in the padded map, th*step + a == y + ph and tw*step + e ==
// xx + pw (tiles overlap when q > step), plus bias[c] when has_bias. It gathers, so no atomics.
template <typename T>
__global__ void winograd_untile(const T* src, const T* bias, T* dst, int has_bias, int q, int step,
                                int N, int C, int H, int W, int TH, int TW, int ph, int pw) {
    typedef typename Acc<T>::type acc_t;
    const long long P = (long long)TH * TW * N;
    const long long plane = (long long)C * P;
    const long long total = (long long)C * H * W * N;
    GRID_STRIDE_LOOP(i, total) {
        long long t = i;
        const int b  = t % N;  t /= N;
        const int xx = t % W;  t /= W;
        const int y  = t % H;  const int c = t / H;
        const int yp = y + ph, xp = xx + pw;
        acc_t acc = has_bias ? static_cast<acc_t>(bias[c]) : static_cast<acc_t>(0.0f);
        for (int th = yp / step; th >= 0 && yp - th * step < q; --th) {
            if (th >= TH) continue;
            for (int tw = xp / step; tw >= 0 && xp - tw * step < q; --tw) {
                if (tw >= TW) continue;
                const int a = yp - th * step, e = xp - tw * step;
                acc += static_cast<acc_t>(src[(long long)(a * q + e) * plane + (long long)c * P +
                                              ((long long)th * TW + tw) * N + b]);
            }
        }
        dst[i] = static_cast<T>(acc);
    }
}

// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
// counter-based generator behind cuRAND's Philox, JAX and PyTorch's CUDA dropout. Ten rounds
// of multiply-and-xor mix a 128-bit counter under a 64-bit key; the same (key, counter) always
// gives the same four words, on any device, in any order. That makes the generator's whole
// state two integers (seed, offset): checkpoints store them and a resumed run draws the same.
__device__ __forceinline__ void philox4x32_10(unsigned int ctr[4], unsigned int key0, unsigned int key1) {
    for (int round = 0; round < 10; ++round) {
        const unsigned long long p0 = 0xD2511F53ull * ctr[0];
        const unsigned long long p1 = 0xCD9E8D57ull * ctr[2];
        const unsigned int hi0 = (unsigned int)(p0 >> 32), lo0 = (unsigned int)p0;
        const unsigned int hi1 = (unsigned int)(p1 >> 32), lo1 = (unsigned int)p1;
        ctr[0] = hi1 ^ ctr[1] ^ key0;
        ctr[1] = lo1;
        ctr[2] = hi0 ^ ctr[3] ^ key1;
        ctr[3] = lo0;
        key0 += 0x9E3779B9u;   // the Weyl sequence that changes the key every round
        key1 += 0xBB67AE85u;
    }
}

// out[i] ~ U[0, 1) for i < n: element i is the first Philox word of counter (offset + i) under
// key `seed`, its top 24 bits scaled by 2^-24 (exact in float32, never 1.0).
extern "C" __global__ void uniform(float* out, long long n, unsigned long long seed,
                                   unsigned long long offset) {
    GRID_STRIDE_LOOP(i, n) {
        const unsigned long long c = offset + (unsigned long long)i;
        unsigned int ctr[4] = {(unsigned int)c, (unsigned int)(c >> 32), 0u, 0u};
        philox4x32_10(ctr, (unsigned int)seed, (unsigned int)(seed >> 32));
        out[i] = (float)(ctr[0] >> 8) * (1.0f / 16777216.0f);
    }
}
