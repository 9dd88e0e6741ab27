// FASTROBUST_HD: the qualifiers of the formulas csrc/*_math.h share between the CPU and CUDA
// builds (__host__ __device__ under nvcc, plain inline elsewhere). Macros only, so the math
// headers can include it inside whatever namespace includes them.
#ifndef FASTROBUST_HD
#if defined(__CUDACC__)
#define FASTROBUST_HD __host__ __device__ __forceinline__
#else
#define FASTROBUST_HD inline
#endif
#endif
