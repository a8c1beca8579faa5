// Host stand-in for CUDA's cuda_fp16.h: __half is the compiler's IEEE binary16 (_Float16),
// converted with round-to-nearest-even as on the GPU and in NumPy's float16.
#pragma once
typedef _Float16 __half;
inline __half __float2half(float f) { return (__half)f; }
inline float __half2float(__half h) { return (float)h; }
