// edgepack's ExecuTorch runner for the emulated arm64 smoke test (`edgepack smoke --on arm64-emulated`).
//
// Built by `make arm64-env` against the aarch64 executorch wheel's own libraries (runtime, XNNPACK
// delegate, optimized and quantized kernels: the C++ an Android app links), at the host venv's
// executorch version, and run under qemu. The host drives it over stdin/stdout and does
// everything else (golden cases, greedy decoding, judging) with the same code as the host smoke:
// this program only executes methods.
//
//   edgepack-et-runner MODEL.pte        then, on stdin, requests:
//     'C' method inputs   execute `method`; answers 0 + outputs, or 1 + message
//     'K'                 list the registered operators (one name a line); answers 0 + text
//     'Q' or end of input exit
//   string = u32 length + bytes; tensors = u32 count + for each: u8 ScalarType, u32 rank,
//   i64 sizes[rank], the contiguous data. Little-endian, as both ends are.
//
// The two LLM operators ExecuTorch ships only in a library that links libtorch
// (llama::update_cache.out, llama::custom_sdpa.out) are implemented below from their documented
// semantics; the smoke test reports that it ran these, not ExecuTorch's.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/runtime/platform/runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace torch::executor::native {

// llama::update_cache.out: write `value` [batch, seq, heads, dim] into `cache`
// [batch, max_seq, heads, dim] at sequence position `start_pos` (sequence on dim 1).
Tensor& update_cache_out(KernelRuntimeContext& ctx, const Tensor& value, Tensor& cache, const int64_t start_pos,
                         Tensor& output) {
  ET_KERNEL_CHECK_MSG(ctx, value.dim() == 4 && cache.dim() == 4, InvalidArgument, output,
                      "update_cache: value and cache must be 4-D");
  ET_KERNEL_CHECK_MSG(ctx, value.size(0) == cache.size(0) && value.size(2) == cache.size(2) &&
                               value.size(3) == cache.size(3) && value.scalar_type() == cache.scalar_type(),
                      InvalidArgument, output, "update_cache: value and cache disagree in batch, heads, dim or dtype");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos + value.size(1) <= cache.size(1), InvalidArgument, output,
                      "update_cache: start_pos %lld + %zd rows is past the cache's %zd",
                      static_cast<long long>(start_pos), static_cast<ssize_t>(value.size(1)),
                      static_cast<ssize_t>(cache.size(1)));
  const size_t row = value.nbytes() / (value.size(0) * value.size(1));  // one position, all heads
  for (ssize_t b = 0; b < value.size(0); ++b) {
    std::memcpy(static_cast<uint8_t*>(cache.mutable_data_ptr()) + (b * cache.size(1) + start_pos) * row,
                static_cast<const uint8_t*>(value.const_data_ptr()) + b * value.size(1) * row,
                value.size(1) * row);
  }
  return output;
}

// llama::custom_sdpa.out: softmax(q k^T * scale + mask) v with q [batch, seq, q_heads, dim] and
// k, v the caches [batch, max_seq, kv_heads, dim] (sequence on dim 1; q_heads a multiple of
// kv_heads, grouped). Causal: query row i sees keys 0..start_pos+i. With a mask ([seq, max_seq],
// additive float or boolean keep) every key is scored and the mask decides.
Tensor& custom_sdpa_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        const int64_t start_pos, const std::optional<Tensor>& attn_mask, const double dropout_p,
                        const bool is_causal, const std::optional<double> scale, Tensor& output) {
  (void)dropout_p;  // inference: no dropout
  ET_KERNEL_CHECK_MSG(ctx, !(attn_mask.has_value() && is_causal), InvalidArgument, output,
                      "custom_sdpa: attn_mask and is_causal cannot both be set");
  ET_KERNEL_CHECK_MSG(ctx, q.dim() == 4 && k.dim() == 4 && v.dim() == 4, InvalidArgument, output,
                      "custom_sdpa: q, k and v must be 4-D");
  ET_KERNEL_CHECK_MSG(ctx, q.scalar_type() == ScalarType::Float && k.scalar_type() == ScalarType::Float &&
                               v.scalar_type() == ScalarType::Float, InvalidArgument, output,
                      "custom_sdpa: edgepack's arm64 runner implements float32 only");
  const ssize_t batch = q.size(0), seq = q.size(1), heads = q.size(2), dim = q.size(3);
  const ssize_t keys = k.size(1), kv_heads = k.size(2);
  ET_KERNEL_CHECK_MSG(ctx, kv_heads > 0 && heads % kv_heads == 0 && k.size(3) == dim && v.size(3) == dim,
                      InvalidArgument, output, "custom_sdpa: head counts or head dims disagree");
  const bool masked = attn_mask.has_value();
  if (masked) {
    const Tensor& m = attn_mask.value();
    ET_KERNEL_CHECK_MSG(ctx, m.dim() == 2 && m.size(0) == seq && m.size(1) == keys &&
                                 (m.scalar_type() == ScalarType::Float || m.scalar_type() == ScalarType::Bool),
                        InvalidArgument, output, "custom_sdpa: the mask must be float or bool [seq, max_seq]");
  }
  ET_KERNEL_CHECK(ctx, resize_tensor(output, q.sizes()) == Error::Ok, InvalidArgument, output);
  const float factor = scale.has_value() ? static_cast<float>(scale.value()) : 1.0f / std::sqrt(float(dim));
  const float* qd = q.const_data_ptr<float>();
  const float* kd = k.const_data_ptr<float>();
  const float* vd = v.const_data_ptr<float>();
  float* out = output.mutable_data_ptr<float>();
  std::vector<float> scores(keys);
  for (ssize_t b = 0; b < batch; ++b) {
    for (ssize_t s = 0; s < seq; ++s) {
      // Keys this row sees: causal from start_pos; every key under a mask; else the filled prefix.
      const ssize_t seen = masked ? keys : std::min<ssize_t>(keys, start_pos + (is_causal ? s + 1 : seq));
      for (ssize_t h = 0; h < heads; ++h) {
        const ssize_t kvh = h / (heads / kv_heads);
        const float* qrow = qd + ((b * seq + s) * heads + h) * dim;
        float top = -INFINITY;
        for (ssize_t j = 0; j < seen; ++j) {
          const float* krow = kd + ((b * keys + j) * kv_heads + kvh) * dim;
          float dot = 0.0f;
          for (ssize_t d = 0; d < dim; ++d) dot += qrow[d] * krow[d];
          float score = dot * factor;
          if (masked) {
            const Tensor& m = attn_mask.value();
            score = m.scalar_type() == ScalarType::Bool ? (m.const_data_ptr<bool>()[s * keys + j] ? score : -INFINITY)
                                                         : score + m.const_data_ptr<float>()[s * keys + j];
          }
          scores[j] = score;
          top = std::max(top, score);
        }
        float total = 0.0f;
        for (ssize_t j = 0; j < seen; ++j) total += (scores[j] = std::exp(scores[j] - top));
        float* orow = out + ((b * seq + s) * heads + h) * dim;
        std::fill(orow, orow + dim, 0.0f);
        for (ssize_t j = 0; j < seen; ++j) {
          const float* vrow = vd + ((b * keys + j) * kv_heads + kvh) * dim;
          const float p = scores[j] / total;
          for (ssize_t d = 0; d < dim; ++d) orow[d] += p * vrow[d];
        }
      }
    }
  }
  return output;
}

}  // namespace torch::executor::native

EXECUTORCH_LIBRARY(llama, "update_cache.out", torch::executor::native::update_cache_out);
EXECUTORCH_LIBRARY(llama, "custom_sdpa.out", torch::executor::native::custom_sdpa_out);

namespace {

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::runtime::EValue;
using executorch::runtime::Error;

// The runtime's error lines since the last request (e.g. "Missing operator: [3] llama::foo.out"),
// returned with a failure so the host can say which operator or delegate was missing.
std::string runtime_log;

void capture_log(et_timestamp_t, et_pal_log_level_t level, const char* file, const char*, size_t line,
                 const char* message, size_t length) {
  std::fprintf(stderr, "[executorch %c %s:%zu] %.*s\n", static_cast<char>(level), file, line,
               static_cast<int>(length), message);
  if (level == kError || level == kFatal) runtime_log.append(message, length).append("\n");
}

bool read_exact(void* into, size_t n) { return n == 0 || std::fread(into, 1, n, stdin) == n; }

template <typename T>
T read_value() {
  T value{};
  if (!read_exact(&value, sizeof value)) std::exit(0);  // the host went away
  return value;
}

std::string read_string() {
  std::string s(read_value<uint32_t>(), '\0');
  if (!read_exact(s.data(), s.size())) std::exit(0);
  return s;
}

void write_bytes(const void* data, size_t n) { std::fwrite(data, 1, n, stdout); }

template <typename T>
void write_value(T value) { write_bytes(&value, sizeof value); }

void write_string(const std::string& s) {
  write_value(static_cast<uint32_t>(s.size()));
  write_bytes(s.data(), s.size());
}

void answer_error(const std::string& what) {
  write_value<uint8_t>(1);
  write_string(what + (runtime_log.empty() ? "" : "\n" + runtime_log));
  std::fflush(stdout);
}

struct Input {
  std::vector<uint8_t> data;
  executorch::extension::TensorPtr tensor;
};

Input read_tensor() {
  const auto type = static_cast<ScalarType>(read_value<uint8_t>());
  std::vector<executorch::aten::SizesType> sizes(read_value<uint32_t>());
  size_t numel = 1;
  for (auto& size : sizes) numel *= (size = static_cast<executorch::aten::SizesType>(read_value<int64_t>()));
  Input in;
  in.data.resize(numel * executorch::runtime::elementSize(type));
  if (!read_exact(in.data.data(), in.data.size())) std::exit(0);
  in.tensor = executorch::extension::make_tensor_ptr(std::move(sizes), in.data.data(), type);
  return in;
}

void call(Module& module) {
  const std::string method = read_string();
  std::vector<Input> inputs(read_value<uint32_t>());
  for (auto& in : inputs) in = read_tensor();
  runtime_log.clear();
  if (const Error loaded = module.load_method(method); loaded != Error::Ok) {
    return answer_error("loading method '" + method + "' failed: " + executorch::runtime::to_string(loaded));
  }
  std::vector<EValue> args;
  for (auto& in : inputs) args.emplace_back(*in.tensor);
  auto outputs = module.execute(method, args);
  if (!outputs.ok()) {
    return answer_error("executing method '" + method + "' failed: " + executorch::runtime::to_string(outputs.error()));
  }
  for (size_t i = 0; i < outputs->size(); ++i) {
    if (!(*outputs)[i].isTensor()) return answer_error("output " + std::to_string(i) + " is not a tensor");
  }
  write_value<uint8_t>(0);
  write_value(static_cast<uint32_t>(outputs->size()));
  for (const EValue& value : *outputs) {
    const auto& t = value.toTensor();
    write_value(static_cast<uint8_t>(t.scalar_type()));
    write_value(static_cast<uint32_t>(t.dim()));
    for (ssize_t d = 0; d < t.dim(); ++d) write_value(static_cast<int64_t>(t.size(d)));
    write_bytes(t.const_data_ptr(), t.nbytes());
  }
  std::fflush(stdout);
}

void list_operators() {
  std::string names;
  for (const auto& kernel : executorch::runtime::get_registered_kernels()) names.append(kernel.name_).append("\n");
  write_value<uint8_t>(0);
  write_string(names);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s MODEL.pte  (then requests on stdin; see the source's header)\n", argv[0]);
    return 2;
  }
  executorch::runtime::register_pal(executorch::runtime::PalImpl::create(capture_log, __FILE__));
  executorch::runtime::runtime_init();
  Module module(argv[1], Module::LoadMode::File);
  for (;;) {
    int op = std::fgetc(stdin);
    if (op == 'C') {
      call(module);
    } else if (op == 'K') {
      list_operators();
    } else {
      return op == 'Q' || op == EOF ? 0 : 2;
    }
  }
}
