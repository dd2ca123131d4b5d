// ptfast::prepend_prompts: one-pass "prompt table rows, then word-embedding rows" gather.
//
//   out[b, t]     = tables[adapter_index[b], t]              for t <  T
//   out[b, T + l] = word_embeddings[input_ids[b, l]]          for l <  L
//
// input_ids (B, L) int64/int32, word_embeddings (V, D) any dtype, tables (A, T, D) same dtype,
// adapter_index (B,) int64/int32  ->  out (B, T + L, D), word_embeddings' dtype, contiguous.
//
// Kernels: CPU (parallel over output rows with at::parallel_for; each row is one memcpy of D elements, so every
// dtype is supported, bit for bit) and Meta (shape only, SymInt-aware, for FakeTensor / torch.compile tracing).
// There is no Autograd kernel: ptfast.prepend_prompts routes differentiable calls to its eager implementation.
//
// The Python wrapper (ptfast/ops/prepend.py) validates everything before calling this op; the checks below repeat
// the ones that protect memory (ranks, dtypes, devices, index ranges), so calling torch.ops.ptfast.prepend_prompts
// directly can raise but never read out of bounds.
//
// Registered with TORCH_LIBRARY_FRAGMENT: the "ptfast" namespace is shared with ops defined from Python
// (torch.library.custom_op("ptfast::mlp_head_fwd", ...)); a plain TORCH_LIBRARY would claim the whole namespace and
// make any later Python `Library("ptfast", "DEF")` fail.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/core/SymBool.h>
#include <torch/library.h>

#include <cstring>
#include <string>

// The build id arrives as a bare token (-DPTFAST_SOURCE_HASH=<id>_<source digest>_<torch version in hex>, see
// ptfast/_native_spec.py): quotes do not survive ninja/setuptools
// command lines consistently, so it is stringified here.
#define PTFAST_STR_(x) #x
#define PTFAST_STR(x) PTFAST_STR_(x)
#ifdef PTFAST_SOURCE_HASH
#define PTFAST_SOURCE_HASH_STR PTFAST_STR(PTFAST_SOURCE_HASH)
#else
#define PTFAST_SOURCE_HASH_STR "unknown"
#endif

// A marker that ptfast/native.py reads from the .so file (without loading it) to tell whether a prebuilt library
// matches the current sources and torch version.
extern "C" __attribute__((used, visibility("default"))) const char ptfast_native_build_id[] =
    "PTFAST_SRC_SHA256=" PTFAST_SOURCE_HASH_STR ";";

namespace ptfast {
namespace {

bool is_index_dtype(c10::ScalarType t) {
  return t == at::kLong || t == at::kInt;
}

void check_common(const at::Tensor& input_ids, const at::Tensor& word_embeddings, const at::Tensor& tables,
                  const at::Tensor& adapter_index) {
  TORCH_CHECK(input_ids.dim() == 2, "prepend_prompts: input_ids must be 2-D (B, L), got ", input_ids.dim(), "-D");
  TORCH_CHECK(word_embeddings.dim() == 2, "prepend_prompts: word_embeddings must be 2-D (V, D), got ",
              word_embeddings.dim(), "-D");
  TORCH_CHECK(tables.dim() == 3, "prepend_prompts: tables must be 3-D (A, T, D), got ", tables.dim(), "-D");
  TORCH_CHECK(adapter_index.dim() == 1, "prepend_prompts: adapter_index must be 1-D (B,), got ", adapter_index.dim(),
              "-D");
  TORCH_CHECK(is_index_dtype(input_ids.scalar_type()), "prepend_prompts: input_ids must be int64 or int32, got ",
              input_ids.scalar_type());
  TORCH_CHECK(is_index_dtype(adapter_index.scalar_type()),
              "prepend_prompts: adapter_index must be int64 or int32, got ", adapter_index.scalar_type());
  TORCH_CHECK(tables.scalar_type() == word_embeddings.scalar_type(), "prepend_prompts: tables dtype ",
              tables.scalar_type(), " != word_embeddings dtype ", word_embeddings.scalar_type());
  const auto dev = word_embeddings.device();
  TORCH_CHECK(input_ids.device() == dev && tables.device() == dev && adapter_index.device() == dev,
              "prepend_prompts: all inputs must be on one device");
  TORCH_SYM_CHECK(tables.sym_size(2).sym_eq(word_embeddings.sym_size(1)),
                  "prepend_prompts: tables' last dim must equal word_embeddings' D");
  TORCH_SYM_CHECK(adapter_index.sym_size(0).sym_eq(input_ids.sym_size(0)),
                  "prepend_prompts: adapter_index must have one entry per row of input_ids");
}

template <typename index_t>
void check_range(const at::Tensor& idx, int64_t n, const char* what, const char* limit) {
  // idx is 1-D or 2-D with any strides; a serial pass over B or B*L integers (microseconds next to the copy).
  const index_t* p = idx.const_data_ptr<index_t>();
  const int64_t rows = idx.dim() == 2 ? idx.size(0) : 1;
  const int64_t cols = idx.dim() == 2 ? idx.size(1) : idx.size(0);
  const int64_t s0 = idx.dim() == 2 ? idx.stride(0) : 0;
  const int64_t s1 = idx.dim() == 2 ? idx.stride(1) : idx.stride(0);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t v = static_cast<int64_t>(p[i * s0 + j * s1]);
      TORCH_CHECK(v >= 0 && v < n, "prepend_prompts: ", what, " ", v, " out of range [0, ", n, ") (", limit, ")");
    }
  }
}

template <typename id_t, typename aid_t>
void copy_rows(const at::Tensor& input_ids, const at::Tensor& we, const at::Tensor& tables,
               const at::Tensor& adapter_index, at::Tensor& out) {
  const int64_t B = input_ids.size(0), L = input_ids.size(1);
  const int64_t T = tables.size(1), D = we.size(1);
  const int64_t S = T + L;
  const int64_t elem = static_cast<int64_t>(we.element_size());
  const size_t row_bytes = static_cast<size_t>(D * elem);

  const char* we_p = static_cast<const char*>(we.const_data_ptr());
  const char* tb_p = static_cast<const char*>(tables.const_data_ptr());
  char* out_p = static_cast<char*>(out.mutable_data_ptr());
  const int64_t we_rs = we.stride(0) * elem;
  const int64_t tb_as = tables.stride(0) * elem;
  const int64_t tb_ts = tables.stride(1) * elem;
  const id_t* ids_p = input_ids.const_data_ptr<id_t>();
  const int64_t ids_s0 = input_ids.stride(0), ids_s1 = input_ids.stride(1);
  const aid_t* ai_p = adapter_index.const_data_ptr<aid_t>();
  const int64_t ai_s = adapter_index.stride(0);

  // At least ~64 KiB per task, so small problems stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, static_cast<int64_t>(row_bytes)));
  at::parallel_for(0, B * S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / S;
      const int64_t t = r - b * S;
      const char* src;
      if (t < T) {
        src = tb_p + static_cast<int64_t>(ai_p[b * ai_s]) * tb_as + t * tb_ts;
      } else {
        src = we_p + static_cast<int64_t>(ids_p[b * ids_s0 + (t - T) * ids_s1]) * we_rs;
      }
      std::memcpy(out_p + r * static_cast<int64_t>(row_bytes), src, row_bytes);
    }
  });
}

at::Tensor prepend_prompts_cpu(const at::Tensor& input_ids, const at::Tensor& word_embeddings,
                               const at::Tensor& tables, const at::Tensor& adapter_index) {
  check_common(input_ids, word_embeddings, tables, adapter_index);
  TORCH_CHECK(word_embeddings.device().is_cpu(), "prepend_prompts (CPU kernel): tensors must be on CPU");
  const int64_t B = input_ids.size(0), L = input_ids.size(1);
  const int64_t V = word_embeddings.size(0), D = word_embeddings.size(1);
  const int64_t A = tables.size(0), T = tables.size(1);

  // Rows are copied with memcpy, so only the innermost dimension must be dense; row strides are free.
  const at::Tensor we = (D <= 1 || word_embeddings.stride(1) == 1) ? word_embeddings : word_embeddings.contiguous();
  const at::Tensor tb = (D <= 1 || tables.stride(2) == 1) ? tables : tables.contiguous();

  AT_DISPATCH_INDEX_TYPES(input_ids.scalar_type(), "prepend_prompts_check_ids", [&] {
    check_range<index_t>(input_ids, V, "token id", "vocabulary size");
  });
  AT_DISPATCH_INDEX_TYPES(adapter_index.scalar_type(), "prepend_prompts_check_adapters", [&] {
    check_range<index_t>(adapter_index, A, "adapter index", "number of tables");
  });

  at::Tensor out = at::empty({B, T + L, D}, we.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_INDEX_TYPES(input_ids.scalar_type(), "prepend_prompts_cpu", [&] {
    using id_t = index_t;
    if (adapter_index.scalar_type() == at::kLong) {
      copy_rows<id_t, int64_t>(input_ids, we, tb, adapter_index, out);
    } else {
      copy_rows<id_t, int32_t>(input_ids, we, tb, adapter_index, out);
    }
  });
  return out;
}

at::Tensor prepend_prompts_meta(const at::Tensor& input_ids, const at::Tensor& word_embeddings,
                                const at::Tensor& tables, const at::Tensor& adapter_index) {
  check_common(input_ids, word_embeddings, tables, adapter_index);
  return at::empty_symint({input_ids.sym_size(0), tables.sym_size(1) + input_ids.sym_size(1),
                           word_embeddings.sym_size(1)},
                          word_embeddings.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ptfast, m) {
  m.def("prepend_prompts(Tensor input_ids, Tensor word_embeddings, Tensor tables, Tensor adapter_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(ptfast, CPU, m) {
  m.impl("prepend_prompts", &prepend_prompts_cpu);
}

TORCH_LIBRARY_IMPL(ptfast, Meta, m) {
  m.impl("prepend_prompts", &prepend_prompts_meta);
}

}  // namespace ptfast
