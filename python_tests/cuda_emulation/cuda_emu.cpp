// Control and inspection entry points of the emulation, compiled into every emulated library next
// to the check TU (build.py), for the Python tests to call through ctypes.
#include "cuda_emu.h"

extern "C" {

// One line per launch since the last clear: demangled kernel name, grid, block, dynamic smem.
// Lets a test assert which instantiation (e.g. vectorised or scalar) a host entry chose.
const char* convmixer_emu_launch_log() { return emu::launch_log.c_str(); }
void convmixer_emu_clear_launch_log() { emu::launch_log.clear(); }

// Runs CTAs last-to-first instead of first-to-last: a kernel whose result depends on CTA order
// (an ordering the GPU never promises) then gives different results under the two settings.
void convmixer_emu_set_reverse_cta_order(int reverse) { emu::reverse_cta_order = reverse != 0; }

// The shim's own float <-> half/bfloat16 conversions, so tests can check them against torch.
void convmixer_emu_float_to_half(const float* in, unsigned short* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __half_as_ushort(__float2half_rn(in[i]));
}
void convmixer_emu_float_to_bfloat16(const float* in, unsigned short* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
}
void convmixer_emu_half_to_float(const unsigned short* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __half2float(__ushort_as_half(in[i]));
}
void convmixer_emu_bfloat16_to_float(const unsigned short* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __bfloat162float(__ushort_as_bfloat16(in[i]));
}

}  // extern "C"
