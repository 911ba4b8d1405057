// The dw stage's kernels for storage type double (generic k path only, every activation; for
// gradient checks, small enough for one unit): one of the instantiation units of
// kernels/dw_instances.cuh.
#include "../kernels/dw_instances.cuh"

#define CONVMIXER_DW_T double
CONVMIXER_DW_INSTANTIATE_FORWARD
CONVMIXER_DW_INSTANTIATE_BACKWARD
CONVMIXER_DW_INSTANTIATE_BACKWARD_FUSED
#undef CONVMIXER_DW_T
