// pybind11 binding of the CPU kernel: NumPy arrays in (buffer protocol, any strides), GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "block_sparse_attention.h"

namespace py = pybind11;
using rainfusion::AttentionArgs;
using rainfusion::Strides4;

namespace {

template <typename T>
Strides4 element_strides(const py::array_t<T, 0>& x, const char* name) {
  if (x.ndim() != 4) throw std::invalid_argument(std::string(name) + " must be 4-D [B, H, S, D]");
  int64_t s[4];
  for (int i = 0; i < 4; ++i) {
    if (x.strides(i) % static_cast<py::ssize_t>(sizeof(T)) != 0 || x.strides(i) < 0)
      throw std::invalid_argument(std::string(name) + " has a stride that is negative or not a whole element");
    s[i] = x.strides(i) / static_cast<py::ssize_t>(sizeof(T));
  }
  return {s[0], s[1], s[2], s[3]};
}

// The bytes an array's elements can touch, [low, high), whatever its (non-negative) strides.
std::pair<const char*, const char*> byte_span(const py::array& x) {
  const char* low = static_cast<const char*>(x.data());
  if (x.size() == 0) return {low, low};
  py::ssize_t last = 0;
  for (py::ssize_t i = 0; i < x.ndim(); ++i) last += (x.shape(i) - 1) * x.strides(i);
  return {low, low + last + x.itemsize()};
}

std::string position(int64_t row, int64_t heads, int64_t nq) {
  return "[" + std::to_string(row / (heads * nq)) + ", " + std::to_string(row / nq % heads) + ", " +
         std::to_string(row % nq);
}

// Every count in [0, nk] and every kept index in [0, nk): the kernel then reads only inside its inputs.
// O(B * Hq * NQ * NK), run before any thread starts.
void check_mask(const int32_t* counts, const int32_t* indices, int64_t batch, int64_t heads, int64_t nq,
                int64_t nk) {
  for (int64_t row = 0; row < batch * heads * nq; ++row) {
    const int32_t count = counts[row];
    if (count < 0 || count > nk)
      throw std::invalid_argument("kv_counts" + position(row, heads, nq) + "] = " + std::to_string(count) +
                                  " is outside [0, NK=" + std::to_string(nk) + "]");
    for (int32_t c = 0; c < count; ++c) {
      const int32_t index = indices[row * nk + c];
      if (index < 0 || index >= nk)
        throw std::invalid_argument("kv_indices" + position(row, heads, nq) + ", " + std::to_string(c) + "] = " +
                                    std::to_string(index) + " is outside [0, NK=" + std::to_string(nk) + ")");
    }
  }
}

// T: the array's element type; S: the storage type the kernel reads (T, or Half / BFloat16 for int16 bits).
template <typename T, typename S = T>
void forward(py::array_t<T, 0> q, py::array_t<T, 0> k, py::array_t<T, 0> v, py::array_t<T, 0> out,
             py::array_t<int32_t, py::array::c_style> kv_counts,
             py::array_t<int32_t, py::array::c_style> kv_indices, int64_t block_size, double scale,
             int num_threads, const std::string& isa, const py::object& lse) {
  static_assert(sizeof(T) == sizeof(S), "the storage type reinterprets the array's elements");
  using L = typename rainfusion::ComputeType<S>::type;
  const rainfusion::Isa path = rainfusion::parse_isa(isa.c_str());  // throws for an unknown or unavailable one
  AttentionArgs<S> a{};
  a.q_strides = element_strides(q, "q");
  a.k_strides = element_strides(k, "k");
  a.v_strides = element_strides(v, "v");
  a.out_strides = element_strides(out, "out");
  a.batch = q.shape(0), a.q_heads = q.shape(1), a.q_len = q.shape(2), a.head_dim = q.shape(3);
  a.kv_heads = k.shape(1), a.kv_len = k.shape(2);
  if (block_size < 1) throw std::invalid_argument("block_size must be positive");
  const int64_t nq = (a.q_len + block_size - 1) / block_size, nk = (a.kv_len + block_size - 1) / block_size;
  if (k.shape(0) != a.batch || k.shape(3) != a.head_dim || v.shape(0) != a.batch || v.shape(1) != a.kv_heads ||
      v.shape(2) != a.kv_len || v.shape(3) != a.head_dim || a.kv_heads < 1 || a.q_heads % a.kv_heads != 0)
    throw std::invalid_argument("k and v must be [B, Hkv, Sk, D] with Hq a multiple of Hkv");
  for (int i = 0; i < 4; ++i)
    if (out.shape(i) != q.shape(i)) throw std::invalid_argument("out must have q's shape");
  if (kv_counts.size() != a.batch * a.q_heads * nq || kv_indices.size() != a.batch * a.q_heads * nq * nk)
    throw std::invalid_argument("kv_counts/kv_indices do not match [B, Hq, NQ(, NK)] for this block_size");
  if (!out.writeable()) throw std::invalid_argument("out must be writeable");
  // The kernel reads private copies of the mask, the copies that were checked: the caller's tensors may
  // change while the threads run (another thread editing the mask) without ever steering a read out of bounds.
  const std::vector<int32_t> counts(kv_counts.data(), kv_counts.data() + kv_counts.size());
  const std::vector<int32_t> indices(kv_indices.data(), kv_indices.data() + kv_indices.size());
  check_mask(counts.data(), indices.data(), a.batch, a.q_heads, nq, nk);
  a.q = reinterpret_cast<const S*>(q.data()), a.k = reinterpret_cast<const S*>(k.data());
  a.v = reinterpret_cast<const S*>(v.data()), a.out = reinterpret_cast<S*>(out.mutable_data());
  a.kv_counts = counts.data(), a.kv_indices = indices.data();
  a.block_size = block_size, a.scale = scale, a.num_threads = num_threads;
  if (!lse.is_none()) {  // the exact dtype and layout, never a converted copy the kernel would write instead
    if (!py::isinstance<py::array_t<L, py::array::c_style>>(lse))
      throw std::invalid_argument(std::string("lse must be a C-contiguous ") + (sizeof(L) == 8 ? "float64" : "float32") +
                                  " array [B, Hq, Sq]");
    auto lse_array = py::reinterpret_borrow<py::array_t<L, py::array::c_style>>(lse);
    if (lse_array.ndim() != 3 || lse_array.shape(0) != a.batch || lse_array.shape(1) != a.q_heads ||
        lse_array.shape(2) != a.q_len || !lse_array.writeable())
      throw std::invalid_argument("lse must be a writeable array of shape [B, Hq, Sq]");
    if (reinterpret_cast<std::uintptr_t>(lse_array.data()) % alignof(L) != 0)
      throw std::invalid_argument("lse must be aligned to its element size");
    // The kernel reads q, k, v and writes out while it writes lse: none may share its memory.
    const char* begin = reinterpret_cast<const char*>(lse_array.data());
    const char* end = begin + lse_array.nbytes();
    for (const py::array* other : {static_cast<const py::array*>(&q), static_cast<const py::array*>(&k),
                                   static_cast<const py::array*>(&v), static_cast<const py::array*>(&out)}) {
      const auto [low, high] = byte_span(*other);
      if (low < end && begin < high) throw std::invalid_argument("lse must not overlap q, k, v or out");
    }
    a.lse = lse_array.mutable_data();
  }
  py::gil_scoped_release release;
  rainfusion::block_sparse_attention_forward(a, path);
}

}  // namespace

PYBIND11_MODULE(_cpu_kernel, m) {
  m.doc() = "RainFusion2.0 block-sparse flash attention forward, C++17 CPU kernel (instruction set chosen at run time)";
  const char* doc =
      "forward(q, k, v, out, kv_counts, kv_indices, block_size, scale, num_threads, isa='', lse=None)\n"
      "isa: 'avx512', 'avx2', 'generic', or '' for the fastest this CPU runs; lse: a float32 (float64 for float64 "
      "inputs) C-contiguous [B, Hq, Sq] array that receives each row's log-sum-exp";
  m.def("forward", &forward<float>, doc, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("kv_counts"), py::arg("kv_indices"), py::arg("block_size"), py::arg("scale"), py::arg("num_threads"),
        py::arg("isa") = "", py::arg("lse") = py::none());
  m.def("forward", &forward<double>, doc, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("kv_counts"), py::arg("kv_indices"), py::arg("block_size"), py::arg("scale"), py::arg("num_threads"),
        py::arg("isa") = "", py::arg("lse") = py::none());
  const char* doc16 =
      "forward_16bit(q, k, v, out, kv_counts, kv_indices, block_size, scale, num_threads, isa, dtype)\n"
      "q, k, v, out: int16 arrays holding float16 or bfloat16 bits (dtype 'float16' or 'bfloat16'); computed in "
      "float, converted tile by tile; lse: as in forward (float32)";
  m.def("forward_16bit", [](py::array_t<int16_t, 0> q, py::array_t<int16_t, 0> k, py::array_t<int16_t, 0> v,
                            py::array_t<int16_t, 0> out, py::array_t<int32_t, py::array::c_style> kv_counts,
                            py::array_t<int32_t, py::array::c_style> kv_indices, int64_t block_size, double scale,
                            int num_threads, const std::string& isa, const std::string& dtype,
                            const py::object& lse) {
    if (dtype == "float16")
      return forward<int16_t, rainfusion::Half>(q, k, v, out, kv_counts, kv_indices, block_size, scale, num_threads, isa,
                                                lse);
    if (dtype == "bfloat16")
      return forward<int16_t, rainfusion::BFloat16>(q, k, v, out, kv_counts, kv_indices, block_size, scale, num_threads,
                                                    isa, lse);
    throw std::invalid_argument("dtype must be 'float16' or 'bfloat16', got '" + dtype + "'");
  }, doc16, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("kv_counts"), py::arg("kv_indices"),
        py::arg("block_size"), py::arg("scale"), py::arg("num_threads"), py::arg("isa"), py::arg("dtype"),
        py::arg("lse") = py::none());
  m.def("has_openmp", &rainfusion::has_openmp);
  m.def("isa", [](const std::string& name) { return std::string(rainfusion::isa_key(rainfusion::parse_isa(name.c_str()))); },
        "the path that runs for a request ('' = the fastest); raises ValueError when unavailable", py::arg("name") = "");
  m.def("isa_description", [](const std::string& name) {
    return std::string(rainfusion::isa_description(rainfusion::parse_isa(name.c_str())));
  }, py::arg("name") = "");
  m.def("available_isas", [] { return rainfusion::available_isas(); });
}
