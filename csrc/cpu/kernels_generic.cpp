// Portable CPU kernels (at::vec's default lanes): the path for CPUs without AVX2.
#define VAE_FAST_ISA generic
#include "kernels_impl.h"
