// A CPU kernel's thread count: n, or OpenMP's default when n <= 0 (1 without OpenMP). Include
// inside namespace posattn::cpu (clones.inc does, for every cloned kernel; vq_cpu.cpp and
// select_cpu.cpp too), after <omp.h> at file scope when _OPENMP is defined.
#pragma once

static inline int omp_threads(int n) {
#ifdef _OPENMP
  return n > 0 ? n : omp_get_max_threads();
#else
  (void)n;
  return 1;
#endif
}
