// Stand-in for CUDA's <cuda_runtime_api.h> in the CPU emulation (see ../cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
