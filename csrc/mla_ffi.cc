// XLA FFI handlers: the only code XLA calls. They check what the buffers say against each other,
// fill MlaDecodeParams, pick a kernel family and launch on XLA's stream. Python's shape rules
// already rejected bad input at trace time; these checks guard against a custom call built by
// hand (an exported program, another frontend) reaching the kernels with inconsistent buffers.
//
// Both handlers are command-buffer compatible: kernel launches on the given stream only, no
// allocation (the split-KV workspace is two extra results that XLA allocates), no host sync.
#include <climits>
#include <cmath>
#include <string>

#include "mla_params.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_flashmla {
namespace {

// Kernel selection, the "kernel" attribute of the decode target.
enum class KernelChoice : int64_t { kAuto = 0, kPortable = 1, kHopper = 2 };

constexpr float kLog2e = 1.4426950408889634f;

std::string describe(ffi::Span<const int64_t> dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

ffi::Error shape_error(const char* name, const std::string& expected,
                       ffi::Span<const int64_t> dims) {
  return ffi::Error::InvalidArgument(std::string("jax_flashmla: ") + name + " must have shape " +
                                     expected + ", got " + describe(dims));
}

bool has_shape(ffi::Span<const int64_t> dims, std::initializer_list<int64_t> expected) {
  if (dims.size() != expected.size()) return false;
  size_t i = 0;
  for (int64_t value : expected) {
    if (dims[i++] != value) return false;
  }
  return true;
}

ffi::Error launch_error(const char* what, cudaError_t status) {
  return ffi::Error::Internal(std::string("jax_flashmla: ") + what + " failed: " +
                              cudaGetErrorString(status));
}

bool device_is_hopper() {
  int device = 0;
  int major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return major == 9 && minor == 0;
}

ffi::Error mla_metadata(cudaStream_t stream, ffi::Buffer<ffi::S32, 1> seqlens,
                        ffi::ResultBuffer<ffi::S32, 2> sched_metadata,
                        ffi::ResultBuffer<ffi::S32, 1> num_splits) {
  const int64_t batch = seqlens.dimensions()[0];
  const int64_t num_sm_parts = sched_metadata->dimensions()[0];
  if (batch < 1 || batch > kMaxBatch) {
    return ffi::Error::InvalidArgument("jax_flashmla: batch must be in [1, " +
                                       std::to_string(kMaxBatch) + "], got " +
                                       std::to_string(batch));
  }
  if (num_sm_parts < 1 || sched_metadata->dimensions()[1] != kSchedulerMetadataSize) {
    return shape_error("tile_scheduler_metadata", "[num_sm_parts >= 1, 8]",
                       sched_metadata->dimensions());
  }
  if (!has_shape(num_splits->dimensions(), {batch + 1})) {
    return shape_error("num_splits", "[batch + 1]", num_splits->dimensions());
  }
  const cudaError_t status = launch_tile_scheduler(
      seqlens.typed_data(), static_cast<int>(batch), static_cast<int>(num_sm_parts),
      sched_metadata->typed_data(), num_splits->typed_data(), stream);
  if (status != cudaSuccess) return launch_error("tile scheduler launch", status);
  return ffi::Error::Success();
}

ffi::Error mla_decode(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                      ffi::Buffer<ffi::S32, 2> block_table, ffi::Buffer<ffi::S32, 1> seqlens,
                      ffi::Buffer<ffi::S32, 2> sched_metadata, ffi::Buffer<ffi::S32, 1> num_splits,
                      ffi::Result<ffi::AnyBuffer> out, ffi::ResultBuffer<ffi::F32, 3> lse,
                      ffi::ResultBuffer<ffi::F32, 4> o_accum,
                      ffi::ResultBuffer<ffi::F32, 3> lse_accum, float softmax_scale, bool causal,
                      int64_t kernel) {
  const auto q_dims = q.dimensions();
  const auto k_dims = k_cache.dimensions();
  if (q_dims.size() != 4 || q_dims[3] != kHeadDimQK) {
    return shape_error("q", "[b, s_q, h_q, 576]", q_dims);
  }
  const int64_t batch = q_dims[0], seqlen_q = q_dims[1], heads_q = q_dims[2];
  if (k_dims.size() != 4 || k_dims[1] != kPageSize || k_dims[3] != kHeadDimQK) {
    return shape_error("k_cache", "[num_blocks, 64, h_kv, 576]", k_dims);
  }
  const int64_t num_pages = k_dims[0], heads_kv = k_dims[2];
  if (num_pages < 1 || num_pages > INT32_MAX) {
    return shape_error("k_cache", "[1 <= num_blocks < 2^31, 64, h_kv, 576]", k_dims);
  }
  if (q.element_type() != k_cache.element_type() ||
      (q.element_type() != ffi::BF16 && q.element_type() != ffi::F16) ||
      out->element_type() != q.element_type()) {
    return ffi::Error::InvalidArgument(
        "jax_flashmla: q, k_cache and out must all be bfloat16 or all float16");
  }
  if (batch < 1 || batch > kMaxBatch || seqlen_q < 1 || heads_kv < 1 ||
      heads_q % heads_kv != 0) {
    return shape_error("q", "b in [1, 8192], s_q >= 1, h_q a multiple of h_kv", q_dims);
  }
  const int64_t max_pages = block_table.dimensions()[1];
  if (block_table.dimensions()[0] != batch ||
      max_pages * static_cast<int64_t>(kPageSize) > kMaxSeqlenK) {
    return shape_error("block_table", "[b, max_blocks_per_seq <= 2^18]", block_table.dimensions());
  }
  if (!has_shape(seqlens.dimensions(), {batch})) {
    return shape_error("cache_seqlens", "[b]", seqlens.dimensions());
  }
  const int64_t num_sm_parts = sched_metadata.dimensions()[0];
  if (num_sm_parts < 1 || sched_metadata.dimensions()[1] != kSchedulerMetadataSize) {
    return shape_error("tile_scheduler_metadata", "[num_sm_parts, 8]",
                       sched_metadata.dimensions());
  }
  if (!has_shape(num_splits.dimensions(), {batch + 1})) {
    return shape_error("num_splits", "[b + 1]", num_splits.dimensions());
  }
  const int64_t rows_per_kv = seqlen_q * (heads_q / heads_kv);
  const int64_t num_slots = batch + num_sm_parts;
  if (!has_shape(out->dimensions(), {batch, seqlen_q, heads_q, kHeadDimV})) {
    return shape_error("out", "[b, s_q, h_q, 512]", out->dimensions());
  }
  if (!has_shape(lse->dimensions(), {batch, heads_q, seqlen_q})) {
    return shape_error("lse", "[b, h_q, s_q]", lse->dimensions());
  }
  if (!has_shape(o_accum->dimensions(), {num_slots, heads_kv, rows_per_kv, kHeadDimV})) {
    return shape_error("o_accum", "[b + num_sm_parts, h_kv, s_q * h_q / h_kv, 512]",
                       o_accum->dimensions());
  }
  if (!has_shape(lse_accum->dimensions(), {num_slots, heads_kv, rows_per_kv})) {
    return shape_error("lse_accum", "[b + num_sm_parts, h_kv, s_q * h_q / h_kv]",
                       lse_accum->dimensions());
  }
  if (!(softmax_scale > 0.0f) || !std::isfinite(softmax_scale)) {
    return ffi::Error::InvalidArgument("jax_flashmla: softmax_scale must be finite and > 0");
  }

  MlaDecodeParams params{};
  params.dtype = q.element_type() == ffi::BF16 ? ElementType::kBFloat16 : ElementType::kFloat16;
  params.batch = static_cast<int>(batch);
  params.seqlen_q = static_cast<int>(seqlen_q);
  params.num_heads_q = static_cast<int>(heads_q);
  params.num_heads_kv = static_cast<int>(heads_kv);
  params.heads_per_kv = static_cast<int>(heads_q / heads_kv);
  params.rows_per_kv = static_cast<int>(rows_per_kv);
  params.num_pages = static_cast<int>(num_pages);
  params.max_pages_per_seq = static_cast<int>(max_pages);
  params.num_sm_parts = static_cast<int>(num_sm_parts);
  params.num_slots = static_cast<int>(num_slots);
  params.softmax_scale = softmax_scale;
  params.scale_log2 = softmax_scale * kLog2e;
  params.causal = causal;
  params.q = q.untyped_data();
  params.k_cache = k_cache.untyped_data();
  params.block_table = block_table.typed_data();
  params.seqlens = seqlens.typed_data();
  params.sched_metadata = sched_metadata.typed_data();
  params.num_splits = num_splits.typed_data();
  params.out = out->untyped_data();
  params.lse = lse->typed_data();
  params.o_accum = o_accum->typed_data();
  params.lse_accum = lse_accum->typed_data();

  const auto choice = static_cast<KernelChoice>(kernel);
  bool use_hopper = false;
  switch (choice) {
    case KernelChoice::kAuto:
      use_hopper = hopper_kernel_available() && device_is_hopper();
      break;
    case KernelChoice::kPortable:
      break;
    case KernelChoice::kHopper:
      if (!hopper_kernel_available() || !device_is_hopper()) {
        return ffi::Error::InvalidArgument(
            "jax_flashmla: the Hopper kernel was requested but this build or this GPU "
            "(compute capability 9.0 required) does not have it");
      }
      use_hopper = true;
      break;
    default:
      return ffi::Error::InvalidArgument("jax_flashmla: unknown kernel choice " +
                                         std::to_string(kernel));
  }

  cudaError_t status =
      use_hopper ? launch_decode_hopper(params, stream) : launch_decode_portable(params, stream);
  if (status != cudaSuccess) return launch_error("decode kernel launch", status);
  status = launch_combine(params, stream);
  if (status != cudaSuccess) return launch_error("combine kernel launch", status);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_flashmla

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashMlaMetadataV1, jax_flashmla::mla_metadata,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::BufferR1<ffi::S32>>()   // cache_seqlens
                                  .Ret<ffi::BufferR2<ffi::S32>>()   // tile_scheduler_metadata
                                  .Ret<ffi::BufferR1<ffi::S32>>(),  // num_splits
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashMlaDecodeV1, jax_flashmla::mla_decode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()             // q
                                  .Arg<ffi::AnyBuffer>()             // k_cache
                                  .Arg<ffi::BufferR2<ffi::S32>>()   // block_table
                                  .Arg<ffi::BufferR1<ffi::S32>>()   // cache_seqlens
                                  .Arg<ffi::BufferR2<ffi::S32>>()   // tile_scheduler_metadata
                                  .Arg<ffi::BufferR1<ffi::S32>>()   // num_splits
                                  .Ret<ffi::AnyBuffer>()             // out
                                  .Ret<ffi::BufferR3<ffi::F32>>()   // lse
                                  .Ret<ffi::BufferR4<ffi::F32>>()   // o_accum (workspace)
                                  .Ret<ffi::BufferR3<ffi::F32>>()   // lse_accum (workspace)
                                  .Attr<float>("softmax_scale")
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("kernel"),
                              {ffi::Traits::kCmdBufferCompatible});
