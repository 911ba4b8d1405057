// The Python module `convmixer_kernels._C`. Importing it runs the TORCH_LIBRARY registrations;
// the functions below tell Python what this build contains.
#include "activation.h"

#include <torch/extension.h>

#ifndef CONVMIXER_CPU_ISA
#define CONVMIXER_CPU_ISA "default"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "convmixer_kernels native ops (registered under torch.ops.convmixer_kernels)";
#ifdef CONVMIXER_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  // The ISA the CPU kernels were compiled for (setup.py), checked against the CPU at import.
  m.attr("cpu_isa") = CONVMIXER_CPU_ISA;
  // {name: code} of csrc/activation.h, which convmixer_kernels/activations.py must repeat: the
  // check TUs and the Triton kernels take Python's codes for C++'s.
  pybind11::dict activation_codes;
  for (const convmixer_kernels::Act a : convmixer_kernels::kActs) {
    activation_codes[convmixer_kernels::act_name(a)] = static_cast<int>(a);
  }
  m.attr("activation_codes") = activation_codes;
}
