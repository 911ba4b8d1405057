// The pw stage's kernels for storage type double: the one unit that compiles them (pw_launch.cuh,
// "build split"). Torch-free, so the extension and the check build (CMakeLists.txt) share it.
#include "../kernels/pw_launch.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace pw {

CONVMIXER_PW_LAUNCHES(, double)

}  // namespace pw
}  // namespace cuda
}  // namespace convmixer_kernels
