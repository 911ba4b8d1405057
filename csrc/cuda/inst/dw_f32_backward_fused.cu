// The dw stage's one-kernel backward (a kept) for storage type float (every k path, every
// activation): one of the instantiation units of kernels/dw_instances.cuh.
#include "../kernels/dw_instances.cuh"

#define CONVMIXER_DW_T float
CONVMIXER_DW_INSTANTIATE_BACKWARD_FUSED
#undef CONVMIXER_DW_T
