// fp4._C: the thin nanobind door into libfp4.
//
// Takes any DLPack-capable array (torch, NumPy, CuPy, JAX), checks dtype, device, contiguity and
// size agreement *before* any memory is touched (TypeError for a wrong dtype, ValueError for the
// rest, each naming the argument), releases the GIL, and calls the C API on the stream it is given.
// It knows nothing of torch.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <optional>
#include <string>

#include "fp4/fp4.h"

namespace nb = nanobind;
using Array = nb::ndarray<nb::ro>;
using MutableArray = nb::ndarray<>;

namespace {

enum class Kind { Float, Uint8, Float32 };

std::string dtype_name(nb::dlpack::dtype d) {
  using code = nb::dlpack::dtype_code;
  std::string base = d.code == uint8_t(code::Float)    ? "float"
                     : d.code == uint8_t(code::Bfloat) ? "bfloat"
                     : d.code == uint8_t(code::UInt)   ? "uint"
                     : d.code == uint8_t(code::Int)    ? "int"
                     : d.code == uint8_t(code::Bool)   ? "bool"
                                                       : "dtype" + std::to_string(d.code) + "_";
  return base + std::to_string(d.bits);
}

fp4_dtype float_dtype(nb::dlpack::dtype d, const char* name) {
  if (d == nb::dtype<float>()) return FP4_FLOAT32;
  if (d.code == uint8_t(nb::dlpack::dtype_code::Float) && d.bits == 16 && d.lanes == 1) return FP4_FLOAT16;
  if (d.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && d.bits == 16 && d.lanes == 1) return FP4_BFLOAT16;
  throw nb::type_error((std::string(name) + ": expected float32, float16 or bfloat16, got " + dtype_name(d)).c_str());
}

template <typename A>
void expect_dtype(const A& a, nb::dlpack::dtype want, const char* name, const char* want_name) {
  if (a.dtype() != want)
    throw nb::type_error((std::string(name) + ": expected " + want_name + ", got " + dtype_name(a.dtype())).c_str());
}

template <typename A>
void expect_contiguous(const A& a, const char* name) {
  if (a.size() == 0) return;  // (no element to address: any strides will do, as torch and NumPy give them)
  int64_t expected = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expected)
      throw nb::value_error((std::string(name) + ": expected a C-contiguous array (use .contiguous())").c_str());
    expected *= int64_t(a.shape(i));
  }
}

template <typename A>
void expect_size(const A& a, int64_t size, const char* name, const char* what) {
  if (int64_t(a.size()) != size)
    throw nb::value_error((std::string(name) + ": expected " + std::to_string(size) + " elements (" + what +
                           "), got " + std::to_string(a.size()))
                              .c_str());
}

// The device every array of one call must share.
struct Place {
  fp4_exec exec{FP4_DEVICE_CPU, 0, nullptr};
  std::string name;

  Place(int device_type, int device_id, uintptr_t stream, const char* first_name) {
    if (device_type == nb::device::cpu::value) {
      exec = {FP4_DEVICE_CPU, 0, nullptr};
      name = "cpu";
    } else if (device_type == nb::device::cuda::value || device_type == nb::device::cuda_managed::value) {
      exec = {FP4_DEVICE_CUDA, device_id, reinterpret_cast<void*>(stream)};
      name = "cuda:" + std::to_string(device_id);
    } else {
      throw nb::value_error((std::string(first_name) + ": expected a CPU or CUDA array, got DLPack device type " +
                             std::to_string(device_type))
                                .c_str());
    }
  }

  template <typename A>
  void expect_same(const A& a, const char* arg) const {
    const bool cpu = a.device_type() == nb::device::cpu::value;
    const bool same = cpu ? exec.device == FP4_DEVICE_CPU
                          : exec.device == FP4_DEVICE_CUDA && a.device_id() == exec.device_index;
    if (!same) {
      const std::string got = cpu ? "cpu" : "cuda:" + std::to_string(a.device_id());
      throw nb::value_error((std::string(arg) + ": expected an array on " + name + " (like the other arguments), got " + got)
                                .c_str());
    }
  }
};

template <typename A>
Place place_of(const A& a, uintptr_t stream, const char* name) {
  return Place(a.device_type(), a.device_id(), stream, name);
}

fp4_quant_type quant_type_of(const std::string& s) {
  if (s == "fp4") return FP4_QUANT_FP4;
  if (s == "nf4") return FP4_QUANT_NF4;
  throw nb::value_error(("quant_type: expected 'fp4' or 'nf4', got '" + s + "'").c_str());
}

void raise_on_error(fp4_status status) {
  if (status == FP4_SUCCESS) return;
  const std::string message = fp4_last_error();
  switch (status) {
    case FP4_ERROR_INVALID_ARGUMENT: throw nb::value_error(message.c_str());
    case FP4_ERROR_NOT_SUPPORTED: throw nb::value_error(message.c_str());
    default: throw std::runtime_error(message);
  }
}

// Optional nested statistics, gathered and checked together.
struct Scales {
  fp4_scales value{};
};

Scales scales_of(const Place& place, const Array& absmax, int64_t num_blocks, const std::optional<Array>& nested_codes,
                 const std::optional<Array>& nested_code, const std::optional<Array>& nested_offset,
                 int64_t nested_blocksize) {
  Scales s;
  expect_dtype(absmax, nb::dtype<float>(), "absmax", "float32");
  expect_contiguous(absmax, "absmax");
  place.expect_same(absmax, "absmax");
  s.value.absmax = static_cast<const float*>(absmax.data());
  const bool nested = nested_codes.has_value();
  if (nested != nested_code.has_value() || nested != nested_offset.has_value())
    throw nb::value_error("nested_codes, nested_code, nested_offset: give all three (nested statistics) or none");
  if (!nested) {
    expect_size(absmax, num_blocks, "absmax", "one per block");
    return s;
  }
  if (nested_blocksize <= 0)
    throw nb::value_error(("nested_blocksize: expected > 0, got " + std::to_string(nested_blocksize)).c_str());
  expect_size(absmax, (num_blocks + nested_blocksize - 1) / nested_blocksize, "absmax",
              "one per nested block when statistics are nested");
  expect_dtype(*nested_codes, nb::dtype<uint8_t>(), "nested_codes", "uint8");
  expect_contiguous(*nested_codes, "nested_codes");
  place.expect_same(*nested_codes, "nested_codes");
  expect_size(*nested_codes, num_blocks, "nested_codes", "one per block");
  expect_dtype(*nested_code, nb::dtype<float>(), "nested_code", "float32");
  expect_contiguous(*nested_code, "nested_code");
  place.expect_same(*nested_code, "nested_code");
  expect_size(*nested_code, 256, "nested_code", "the 8-bit codebook");
  expect_dtype(*nested_offset, nb::dtype<float>(), "nested_offset", "float32");
  place.expect_same(*nested_offset, "nested_offset");
  expect_size(*nested_offset, 1, "nested_offset", "the mean subtracted from absmax");
  s.value.nested_codes = static_cast<const uint8_t*>(nested_codes->data());
  s.value.nested_code = static_cast<const float*>(nested_code->data());
  s.value.nested_offset = static_cast<const float*>(nested_offset->data());
  s.value.nested_blocksize = nested_blocksize;
  return s;
}

void check_blocksize(int64_t blocksize) {
  if (blocksize != 32 && blocksize != 64 && blocksize != 128 && blocksize != 256 && blocksize != 512 &&
      blocksize != 1024 && blocksize != 2048 && blocksize != 4096)
    throw nb::value_error(
        ("blocksize: expected one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got " + std::to_string(blocksize)).c_str());
}

void quantize_4bit(const Array& input, MutableArray packed, MutableArray absmax, const std::string& quant_type,
                   int64_t blocksize, uintptr_t stream) {
  const fp4_quant_type type = quant_type_of(quant_type);
  check_blocksize(blocksize);
  const fp4_dtype dtype = float_dtype(input.dtype(), "input");
  expect_contiguous(input, "input");
  const Place place = place_of(input, stream, "input");
  const int64_t n = int64_t(input.size());
  expect_dtype(packed, nb::dtype<uint8_t>(), "packed", "uint8");
  expect_contiguous(packed, "packed");
  place.expect_same(packed, "packed");
  expect_size(packed, fp4_packed_bytes(n), "packed", "two codes per byte");
  expect_dtype(absmax, nb::dtype<float>(), "absmax", "float32");
  expect_contiguous(absmax, "absmax");
  place.expect_same(absmax, "absmax");
  expect_size(absmax, fp4_num_blocks(n, blocksize), "absmax", "one per block");
  fp4_status status;
  {
    nb::gil_scoped_release release;
    status = fp4_quantize_4bit(&place.exec, type, input.data(), dtype, n, blocksize,
                               static_cast<uint8_t*>(packed.data()), static_cast<float*>(absmax.data()));
  }
  raise_on_error(status);
}

void dequantize_4bit(const Array& packed, const Array& absmax, MutableArray out, const std::string& quant_type,
                     int64_t blocksize, uintptr_t stream, std::optional<Array> nested_codes,
                     std::optional<Array> nested_code, std::optional<Array> nested_offset, int64_t nested_blocksize) {
  const fp4_quant_type type = quant_type_of(quant_type);
  check_blocksize(blocksize);
  const fp4_dtype dtype = float_dtype(out.dtype(), "out");
  expect_contiguous(out, "out");
  const Place place = place_of(out, stream, "out");
  const int64_t n = int64_t(out.size());
  expect_dtype(packed, nb::dtype<uint8_t>(), "packed", "uint8");
  expect_contiguous(packed, "packed");
  place.expect_same(packed, "packed");
  expect_size(packed, fp4_packed_bytes(n), "packed", "two codes per byte of out");
  const Scales scales = scales_of(place, absmax, fp4_num_blocks(n, blocksize), nested_codes, nested_code,
                                  nested_offset, nested_blocksize);
  fp4_status status;
  {
    nb::gil_scoped_release release;
    status = fp4_dequantize_4bit(&place.exec, type, static_cast<const uint8_t*>(packed.data()), &scales.value, n,
                                 blocksize, out.data(), dtype);
  }
  raise_on_error(status);
}

// A 4-bit weight whose arrays were checked once (what FP4Linear caches): each forward call then
// converts and checks only x, bias, y (and the workspace).
struct PreparedWeight {
  Array packed, absmax;
  std::optional<Array> nested_codes, nested_code, nested_offset;
  fp4_quant_type type;
  int64_t blocksize, n, k;
  Scales scales;
  int device_type, device_id;
};

PreparedWeight prepare_weight(const Array& packed, const Array& absmax, const std::string& quant_type, int64_t blocksize,
                              int64_t n, int64_t k, std::optional<Array> nested_codes, std::optional<Array> nested_code,
                              std::optional<Array> nested_offset, int64_t nested_blocksize) {
  const fp4_quant_type type = quant_type_of(quant_type);
  check_blocksize(blocksize);
  if (n < 0 || k <= 0) throw nb::value_error("out_features, in_features: expected >= 0 and >= 1");
  const Place place = place_of(packed, 0, "packed");
  expect_dtype(packed, nb::dtype<uint8_t>(), "packed", "uint8");
  expect_contiguous(packed, "packed");
  expect_size(packed, fp4_packed_bytes(n * k), "packed", "out_features * in_features / 2");
  const Scales scales = scales_of(place, absmax, fp4_num_blocks(n * k, blocksize), nested_codes, nested_code,
                                  nested_offset, nested_blocksize);
  return PreparedWeight{packed,    absmax,    nested_codes,          nested_code,      nested_offset, type,
                        blocksize, n,         k,                     scales,           packed.device_type(),
                        packed.device_id()};
}

enum class Kernel { linear, gemm };

void run_linear(const Array& x, const PreparedWeight& w, std::optional<Array> bias, MutableArray y,
                std::optional<MutableArray> workspace, uintptr_t stream, Kernel kernel) {
  const fp4_dtype dtype = float_dtype(x.dtype(), "x");
  expect_contiguous(x, "x");
  if (x.ndim() != 2) throw nb::value_error("x: expected a 2-D array [batch, in_features]");
  if (y.ndim() != 2) throw nb::value_error("y: expected a 2-D array [batch, out_features]");
  const Place place = place_of(x, stream, "x");
  place.expect_same(w.packed, "packed");
  const int64_t m = int64_t(x.shape(0));
  if (int64_t(x.shape(1)) != w.k)
    throw nb::value_error(("x: expected " + std::to_string(w.k) + " columns (in_features), got " +
                           std::to_string(x.shape(1))).c_str());
  if (y.dtype() != x.dtype()) throw nb::type_error("y: expected the dtype of x");
  expect_contiguous(y, "y");
  place.expect_same(y, "y");
  if (int64_t(y.shape(0)) != m || int64_t(y.shape(1)) != w.n)
    throw nb::value_error("y: expected shape [batch, out_features]");
  const void* bias_ptr = nullptr;
  if (bias) {
    if (bias->dtype() != x.dtype()) throw nb::type_error("bias: expected the dtype of x");
    place.expect_same(*bias, "bias");
    expect_size(*bias, w.n, "bias", "one per output feature");
    bias_ptr = bias->data();
  }
  void* workspace_ptr = nullptr;
  size_t workspace_bytes = 0;
  if (workspace) {
    expect_contiguous(*workspace, "workspace");
    place.expect_same(*workspace, "workspace");
    workspace_ptr = workspace->data();
    workspace_bytes = workspace->size() * (workspace->dtype().bits / 8);
  }
  const auto* packed = static_cast<const uint8_t*>(w.packed.data());
  fp4_status status;
  {
    nb::gil_scoped_release release;
    status = kernel == Kernel::gemm
                 ? fp4_gemm_4bit(&place.exec, w.type, x.data(), dtype, m, w.k, packed, &w.scales.value, w.n,
                                 w.blocksize, bias_ptr, y.data(), workspace_ptr, workspace_bytes)
                 : fp4_linear_4bit(&place.exec, w.type, x.data(), dtype, m, w.k, packed, &w.scales.value, w.n,
                                   w.blocksize, bias_ptr, y.data());
  }
  raise_on_error(status);
}

void linear_4bit(const Array& x, const Array& packed, const Array& absmax, std::optional<Array> bias, MutableArray y,
                 const std::string& quant_type, int64_t blocksize, uintptr_t stream, std::optional<Array> nested_codes,
                 std::optional<Array> nested_code, std::optional<Array> nested_offset, int64_t nested_blocksize) {
  if (x.ndim() != 2 || y.ndim() != 2) throw nb::value_error("x, y: expected 2-D arrays [batch, features]");
  const PreparedWeight w = prepare_weight(packed, absmax, quant_type, blocksize, int64_t(y.shape(1)),
                                          int64_t(x.shape(1)), nested_codes, nested_code, nested_offset,
                                          nested_blocksize);
  run_linear(x, w, bias, y, std::nullopt, stream, Kernel::linear);
}

void gemm_4bit(const Array& x, const Array& packed, const Array& absmax, std::optional<Array> bias, MutableArray y,
               MutableArray workspace, const std::string& quant_type, int64_t blocksize, uintptr_t stream,
               std::optional<Array> nested_codes, std::optional<Array> nested_code, std::optional<Array> nested_offset,
               int64_t nested_blocksize) {
  if (x.ndim() != 2 || y.ndim() != 2) throw nb::value_error("x, y: expected 2-D arrays [batch, features]");
  const PreparedWeight w = prepare_weight(packed, absmax, quant_type, blocksize, int64_t(y.shape(1)),
                                          int64_t(x.shape(1)), nested_codes, nested_code, nested_offset,
                                          nested_blocksize);
  run_linear(x, w, bias, y, workspace, stream, Kernel::gemm);
}

void compress_absmax(const Array& absmax, const Array& code, MutableArray offset, bool offset_is_input,
                     MutableArray codes_out, MutableArray absmax2_out, int64_t nested_blocksize, uintptr_t stream) {
  expect_dtype(absmax, nb::dtype<float>(), "absmax", "float32");
  expect_contiguous(absmax, "absmax");
  const Place place = place_of(absmax, stream, "absmax");
  const int64_t num_blocks = int64_t(absmax.size());
  if (nested_blocksize <= 0)
    throw nb::value_error(("nested_blocksize: expected > 0, got " + std::to_string(nested_blocksize)).c_str());
  expect_dtype(code, nb::dtype<float>(), "code", "float32");
  place.expect_same(code, "code");
  expect_size(code, 256, "code", "the 8-bit codebook");
  expect_dtype(offset, nb::dtype<float>(), "offset", "float32");
  place.expect_same(offset, "offset");
  expect_size(offset, 1, "offset", "the mean of absmax");
  expect_dtype(codes_out, nb::dtype<uint8_t>(), "codes_out", "uint8");
  expect_contiguous(codes_out, "codes_out");
  place.expect_same(codes_out, "codes_out");
  expect_size(codes_out, num_blocks, "codes_out", "one per absmax");
  expect_dtype(absmax2_out, nb::dtype<float>(), "absmax2_out", "float32");
  expect_contiguous(absmax2_out, "absmax2_out");
  place.expect_same(absmax2_out, "absmax2_out");
  expect_size(absmax2_out, (num_blocks + nested_blocksize - 1) / nested_blocksize, "absmax2_out",
              "one per nested block");
  fp4_status status;
  {
    nb::gil_scoped_release release;
    status = fp4_compress_absmax(&place.exec, static_cast<const float*>(absmax.data()), num_blocks,
                                 static_cast<const float*>(code.data()), nested_blocksize,
                                 static_cast<float*>(offset.data()), offset_is_input ? 1 : 0,
                                 static_cast<uint8_t*>(codes_out.data()), static_cast<float*>(absmax2_out.data()));
  }
  raise_on_error(status);
}

void expand_absmax(const Array& absmax, MutableArray out, uintptr_t stream, std::optional<Array> nested_codes,
                   std::optional<Array> nested_code, std::optional<Array> nested_offset, int64_t nested_blocksize) {
  expect_dtype(out, nb::dtype<float>(), "out", "float32");
  expect_contiguous(out, "out");
  const Place place = place_of(out, stream, "out");
  const int64_t num_blocks = int64_t(out.size());
  const Scales scales =
      scales_of(place, absmax, num_blocks, nested_codes, nested_code, nested_offset, nested_blocksize);
  fp4_status status;
  {
    nb::gil_scoped_release release;
    status = fp4_expand_absmax(&place.exec, &scales.value, num_blocks, static_cast<float*>(out.data()));
  }
  raise_on_error(status);
}

}  // namespace

NB_MODULE(_C, m) {
  // torch's operator registry (fp4.library, fp4.integrations) keeps Python callables that reach these
  // functions alive until after nanobind's shutdown check, which would report them as leaks.
  nb::set_leak_warnings(false);
  m.doc() = "libfp4 bindings: DLPack arrays in, C API calls out. Use fp4.functional, not this module.";
  m.def("version", &fp4_version, "libfp4's version string.");
  m.def("cuda_built", [] { return fp4_cuda_built() != 0; }, "True when libfp4 was built with CUDA kernels.");
  m.def("cpu_kernels", &fp4_cpu_kernels,
        "The CPU linear kernels this machine runs (\"avx512 amx-bf16\", \"avx512\", \"avx2\", \"generic\").");
  m.def("cuda_archs", &fp4_cuda_archs, "The CUDA architectures compiled into libfp4 (space-separated).");
  m.def("build_config", [] {
    nb::dict out;
    const std::string config = fp4_build_config();
    size_t start = 0;
    while (start < config.size()) {
      size_t end = config.find(';', start);
      if (end == std::string::npos) end = config.size();
      const std::string item = config.substr(start, end - start);
      const size_t eq = item.find('=');
      if (eq != std::string::npos) out[nb::str(item.substr(0, eq).c_str())] = nb::str(item.substr(eq + 1).c_str());
      start = end + 1;
    }
    return out;
  }, "How libfp4 was built (cuda, archs, nvcc, cccl, cxx), as a dict of strings.");
  m.def("cuda_device_count", &fp4_cuda_device_count, "CUDA devices visible to libfp4.");
  m.def(
      "set_num_threads", [](int n) { raise_on_error(fp4_set_num_threads(n)); }, nb::arg("num_threads"),
      "Threads libfp4's CPU kernels may use.");
  m.def("get_num_threads", &fp4_get_num_threads, "Threads libfp4's CPU kernels use.");
  m.def("dynamic_code", [] {
    float code[256];
    fp4_dynamic_code(code);
    nb::list out;
    for (float v : code) out.append(v);
    return out;
  }, "bitsandbytes' signed dynamic 8-bit code, as a list of 256 floats.");
  m.def("codebook", [](const std::string& quant_type) {
    float code[16];
    raise_on_error(fp4_codebook(quant_type_of(quant_type), code));
    nb::list out;
    for (float v : code) out.append(v);
    return out;
  }, nb::arg("quant_type"), "The 16 code values of 'fp4' or 'nf4', as a list.");

  m.def("quantize_4bit", &quantize_4bit, nb::arg("input"), nb::arg("packed"), nb::arg("absmax"),
        nb::arg("quant_type"), nb::arg("blocksize"), nb::arg("stream") = 0,
        "Quantize `input` into `packed` (uint8, ceil(n/2)) and `absmax` (float32, one per block).");
  m.def("dequantize_4bit", &dequantize_4bit, nb::arg("packed"), nb::arg("absmax"), nb::arg("out"),
        nb::arg("quant_type"), nb::arg("blocksize"), nb::arg("stream") = 0, nb::arg("nested_codes") = nb::none(),
        nb::arg("nested_code") = nb::none(), nb::arg("nested_offset") = nb::none(),
        nb::arg("nested_blocksize") = 256, "Dequantize `packed` into `out` (its dtype and size decide the result).");
  m.def("gemv_max_batch", &fp4_gemv_max_batch, "Largest batch the CUDA GEMV serves (0 without CUDA).");
  m.def("gemm_4bit_uses_wgmma", [](int device_index) { return fp4_gemm_4bit_uses_wgmma(device_index) != 0; },
        nb::arg("device_index"),
        "Whether the tensor-core GEMM runs Hopper warpgroup MMA for batches > 16 on this CUDA device.");
  m.def("linear_4bit", &linear_4bit, nb::arg("x"), nb::arg("packed"), nb::arg("absmax"), nb::arg("bias").none(),
        nb::arg("y"), nb::arg("quant_type"), nb::arg("blocksize"), nb::arg("stream") = 0,
        nb::arg("nested_codes") = nb::none(), nb::arg("nested_code") = nb::none(),
        nb::arg("nested_offset") = nb::none(), nb::arg("nested_blocksize") = 256,
        "y = x @ W.T + bias with W the 4-bit weight [out_features, in_features].");
  nb::class_<PreparedWeight>(m, "PreparedWeight",
                             "A 4-bit weight checked once; linear_prepared / gemm_prepared then check only x, bias, y.")
      .def_ro("out_features", &PreparedWeight::n)
      .def_ro("in_features", &PreparedWeight::k);
  m.def("prepare_weight", &prepare_weight, nb::arg("packed"), nb::arg("absmax"), nb::arg("quant_type"),
        nb::arg("blocksize"), nb::arg("out_features"), nb::arg("in_features"), nb::arg("nested_codes") = nb::none(),
        nb::arg("nested_code") = nb::none(), nb::arg("nested_offset") = nb::none(),
        nb::arg("nested_blocksize") = 256, "Check a 4-bit weight's arrays once; keeps references to them.");
  m.def(
      "linear_prepared",
      [](const Array& x, const PreparedWeight& w, std::optional<Array> bias, MutableArray y, uintptr_t stream) {
        run_linear(x, w, bias, y, std::nullopt, stream, Kernel::linear);
      },
      nb::arg("x"), nb::arg("weight"), nb::arg("bias").none(), nb::arg("y"), nb::arg("stream") = 0,
      "linear_4bit with a PreparedWeight.");
  m.def(
      "gemm_prepared",
      [](const Array& x, const PreparedWeight& w, std::optional<Array> bias, MutableArray y, MutableArray workspace,
         uintptr_t stream) { run_linear(x, w, bias, y, workspace, stream, Kernel::gemm); },
      nb::arg("x"), nb::arg("weight"), nb::arg("bias").none(), nb::arg("y"), nb::arg("workspace"),
      nb::arg("stream") = 0, "gemm_4bit with a PreparedWeight.");
  m.def("gemm_4bit_workspace_size", &fp4_gemm_4bit_workspace_size, nb::arg("m"), nb::arg("n"),
        "Bytes of workspace gemm_4bit needs for a batch of m rows and n output features.");
  m.def("gemm_4bit", &gemm_4bit, nb::arg("x"), nb::arg("packed"), nb::arg("absmax"), nb::arg("bias").none(),
        nb::arg("y"), nb::arg("workspace"), nb::arg("quant_type"), nb::arg("blocksize"), nb::arg("stream") = 0,
        nb::arg("nested_codes") = nb::none(), nb::arg("nested_code") = nb::none(),
        nb::arg("nested_offset") = nb::none(), nb::arg("nested_blocksize") = 256,
        "y = x @ W.T + bias on tensor cores (CUDA, float16/bfloat16, in_features % 128 == 0).");
  m.def("compress_absmax", &compress_absmax, nb::arg("absmax"), nb::arg("code"), nb::arg("offset"),
        nb::arg("offset_is_input"), nb::arg("codes_out"), nb::arg("absmax2_out"), nb::arg("nested_blocksize") = 256,
        nb::arg("stream") = 0, "Nested statistics: 8-bit codes of absmax - offset, blockwise.");
  m.def("expand_absmax", &expand_absmax, nb::arg("absmax"), nb::arg("out"), nb::arg("stream") = 0,
        nb::arg("nested_codes") = nb::none(), nb::arg("nested_code") = nb::none(),
        nb::arg("nested_offset") = nb::none(), nb::arg("nested_blocksize") = 256,
        "Expand plain or nested statistics to one float32 scale per block.");
}
