// The Python extension: hands the FFI handlers to JAX as capsules, plus what the Python side needs
// to check that this build matches the running jaxlib. Kept free of CUDA so that nvcc never sees
// nanobind.
#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

extern "C" XLA_FFI_Error* JaxFlashMlaMetadataV1(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* JaxFlashMlaDecodeV1(XLA_FFI_CallFrame* call_frame);

namespace jax_flashmla {
bool hopper_kernel_available();
const char* hopper_schedule_name(int batch, int rows_per_kv, int max_pages_per_seq, int num_pages,
                                 int num_sm_parts);
}

namespace {

template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_jax_flashmla_cuda, m) {
  m.doc() = "CUDA kernels of jax_flashmla, exposed as XLA FFI handlers.";
  m.def("registrations", []() {
    nb::dict targets;
    targets["jax_flashmla_mla_metadata_v1"] = handler_capsule(JaxFlashMlaMetadataV1);
    targets["jax_flashmla_mla_decode_v1"] = handler_capsule(JaxFlashMlaDecodeV1);
    return targets;
  });
  m.def("ffi_api_version", []() { return nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR); });
  m.def("hopper_kernel_available", &jax_flashmla::hopper_kernel_available);
  m.def("hopper_schedule", &jax_flashmla::hopper_schedule_name, nb::arg("batch"),
        nb::arg("rows_per_kv"), nb::arg("max_pages_per_seq"), nb::arg("num_pages"),
        nb::arg("num_sm_parts"));
  m.attr("built_with_jaxlib") = JAX_FLASHMLA_BUILT_WITH_JAXLIB;
}
