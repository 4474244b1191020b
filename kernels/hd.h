// TRESOR_HD marks code compiled both as CUDA device code (by nvcc) and as host code (the CPU
// references run exactly the same functions); defined with the exactly rounded operations in
// tresor/rn.h.
#pragma once

#include "tresor/rn.h"
