// FASTROBUST_HD: the qualifiers of the formulas in csrc/<family>/math.h (__host__ __device__
// under nvcc, plain inline in the host compiler's build, the one setup.py makes). Macros only, so the math
// headers can include it inside whatever namespace includes them.
#ifndef FASTROBUST_HD
#if defined(__CUDACC__)
#define FASTROBUST_HD __host__ __device__ __forceinline__
#else
#define FASTROBUST_HD inline
#endif
#endif
