// TRESOR_HD marks code compiled both as CUDA device code (by nvcc) and as host code (the CPU
// references run exactly the same functions).
#pragma once

#ifndef TRESOR_HD
#if defined(__CUDACC__)
#define TRESOR_HD __host__ __device__
#else
#define TRESOR_HD
#endif
#endif
