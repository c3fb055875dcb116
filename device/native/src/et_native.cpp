// toma_edge_native._et: run an ExecuTorch program from Python with no torch.
//
// Built against the runtime libraries that ship inside the executorch wheel
// (libexecutorch, the optimized kernels, the XNNPACK delegate and its thread
// pool), which link no libtorch. Inputs are numpy arrays read in place (no copy
// on our side for C-contiguous input of the program's dtype); outputs are copied
// out of the program's planned memory into fresh numpy arrays, because the next
// call reuses that memory. The GIL is released while the method runs.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <executorch/extension/data_loader/buffer_data_loader.h>
#include <executorch/extension/data_loader/mmap_data_loader.h>
#include <executorch/extension/memory_allocator/malloc_memory_allocator.h>
#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/executor/memory_manager.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/runtime.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

// The wheel ships the thread pool library but not its header: declare the
// three members we call (ABI of executorch 1.5, checked against the library's
// exported symbols).
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace nb = nanobind;
namespace et = executorch::runtime;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::aten::TensorImpl;
using executorch::extension::BufferDataLoader;
using executorch::extension::MallocMemoryAllocator;
using executorch::extension::MmapDataLoader;

namespace {

// An ExecuTorch error code with what we were doing; becomes
// toma_edge_native.ExecuTorchError(message, code, name) in Python.
struct EtError : std::runtime_error {
  EtError(const std::string& what, et::Error code)
      : std::runtime_error(what), code(code) {}
  et::Error code;
};

const char* error_name(et::Error e) {
  const char* s = et::to_string(e);  // "Error::OperatorMissing"
  const char* p = std::strstr(s, "::");
  return p ? p + 2 : s;
}

void check(et::Error e, const std::string& what) {
  if (e != et::Error::Ok) throw EtError(what, e);
}

struct DtypeName {
  ScalarType type;
  const char* name;
  size_t size;
};
constexpr DtypeName kDtypes[] = {
    {ScalarType::Float, "float32", 4}, {ScalarType::Double, "float64", 8},
    {ScalarType::Half, "float16", 2},  {ScalarType::Long, "int64", 8},
    {ScalarType::Int, "int32", 4},     {ScalarType::Short, "int16", 2},
    {ScalarType::Char, "int8", 1},     {ScalarType::Byte, "uint8", 1},
    {ScalarType::Bool, "bool", 1},
};

const DtypeName* find_dtype(ScalarType t) {
  for (const auto& d : kDtypes)
    if (d.type == t) return &d;
  return nullptr;
}

nb::dlpack::dtype to_dlpack(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return nb::dtype<float>();
    case ScalarType::Double: return nb::dtype<double>();
    case ScalarType::Long: return nb::dtype<int64_t>();
    case ScalarType::Int: return nb::dtype<int32_t>();
    case ScalarType::Short: return nb::dtype<int16_t>();
    case ScalarType::Char: return nb::dtype<int8_t>();
    case ScalarType::Byte: return nb::dtype<uint8_t>();
    case ScalarType::Bool: return nb::dtype<bool>();
    case ScalarType::Half: return {static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 16, 1};
    default: throw std::invalid_argument("unsupported output dtype");
  }
}

struct Spec {
  std::vector<int64_t> shape;  // as planned: at the program's maximum sizes
  std::string dtype;
  size_t nbytes;
};

using Array = nb::ndarray<nb::numpy, nb::c_contig, nb::device::cpu>;
using AnyIn = nb::ndarray<nb::c_contig, nb::device::cpu, nb::ro>;

class NativeProgram {
 public:
  NativeProgram(nb::object source, std::string method_name)
      : method_name_(std::move(method_name)) {
    if (nb::isinstance<nb::bytes>(source)) {
      // the program reads from this buffer for as long as it lives: keep a copy
      nb::bytes b = nb::cast<nb::bytes>(source);
      buffer_.assign(static_cast<const char*>(b.data()), b.size());
      loader_ = std::make_unique<BufferDataLoader>(buffer_.data(), buffer_.size());
    } else {
      std::string path = nb::cast<std::string>(nb::str(source));
      auto l = MmapDataLoader::from(path.c_str());
      if (!l.ok()) throw EtError("cannot open " + path, l.error());
      loader_ = std::make_unique<MmapDataLoader>(std::move(l.get()));
    }
    auto p = et::Program::load(loader_.get());
    if (!p.ok()) throw EtError("cannot load the program", p.error());
    program_ = std::make_unique<et::Program>(std::move(p.get()));

    auto m = program_->method_meta(method_name_.c_str());
    if (!m.ok()) throw EtError("the program has no method '" + method_name_ + "'", m.error());
    const et::MethodMeta& meta = m.get();
    for (size_t i = 0; i < meta.num_inputs(); ++i) inputs_.push_back(spec(meta.input_tensor_meta(i), "input", i));
    for (size_t i = 0; i < meta.num_outputs(); ++i) outputs_.push_back(spec(meta.output_tensor_meta(i), "output", i));

    // planned memory, left untouched until used (no zero-fill: RSS grows only
    // with the pages a run really writes)
    for (size_t i = 0; i < meta.num_memory_planned_buffers(); ++i) {
      auto size = meta.memory_planned_buffer_size(i);
      if (!size.ok()) throw EtError("cannot read the planned buffer sizes", size.error());
      planned_.emplace_back(new uint8_t[static_cast<size_t>(size.get())]);
      spans_.emplace_back(planned_.back().get(), static_cast<size_t>(size.get()));
    }
    hier_ = std::make_unique<et::HierarchicalAllocator>(
        et::Span<et::Span<uint8_t>>(spans_.data(), spans_.size()));
    mm_ = std::make_unique<et::MemoryManager>(&method_alloc_, hier_.get(), &temp_alloc_);
    auto method = program_->load_method(method_name_.c_str(), mm_.get());
    if (!method.ok()) throw EtError("cannot load method '" + method_name_ + "'", method.error());
    method_ = std::make_unique<et::Method>(std::move(method.get()));
  }

  const std::vector<Spec>& inputs() const { return inputs_; }
  const std::vector<Spec>& outputs() const { return outputs_; }
  size_t planned_bytes() const {
    size_t n = 0;
    for (const auto& s : spans_) n += s.size();
    return n;
  }

  // Run the method on numpy arrays; fresh numpy arrays out.
  std::vector<Array> run(std::vector<AnyIn> arrays) {
    if (arrays.size() != inputs_.size())
      throw std::invalid_argument("the method takes " + std::to_string(inputs_.size()) +
                                  " inputs, got " + std::to_string(arrays.size()));
    std::vector<Holder> holders(arrays.size());
    for (size_t i = 0; i < arrays.size(); ++i) holders[i].wrap(arrays[i], inputs_[i], i);
    std::vector<std::pair<std::unique_ptr<uint8_t[]>, std::vector<size_t>>> outs;
    std::vector<ScalarType> types;
    {
      nb::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < holders.size(); ++i)
        check(method_->set_input(et::EValue(holders[i].tensor()), i), "cannot set input " + std::to_string(i));
      check(method_->execute(), "the method failed");
      for (size_t i = 0; i < method_->outputs_size(); ++i) {
        const et::EValue& ev = method_->get_output(i);
        if (!ev.isTensor()) throw std::invalid_argument("output " + std::to_string(i) + " is not a tensor");
        const Tensor& t = ev.toTensor();
        std::vector<size_t> shape(t.sizes().begin(), t.sizes().end());
        std::unique_ptr<uint8_t[]> data(new uint8_t[t.nbytes() ? t.nbytes() : 1]);
        std::memcpy(data.get(), t.const_data_ptr(), t.nbytes());
        outs.emplace_back(std::move(data), std::move(shape));
        types.push_back(t.scalar_type());
      }
    }
    std::vector<Array> result;
    for (size_t i = 0; i < outs.size(); ++i) {
      uint8_t* raw = outs[i].first.release();
      nb::capsule owner(raw, [](void* p) noexcept { delete[] static_cast<uint8_t*>(p); });
      result.emplace_back(raw, outs[i].second.size(), outs[i].second.data(), owner,
                          nullptr, to_dlpack(types[i]));
    }
    return result;
  }

  // A one-input, one-output method over `x` in consecutive batches of `size`
  // rows, each result copied into the matching rows of `out` (GIL released,
  // lock taken once): the Predictor's hot loop.
  void run_batches_into(AnyIn x, nb::ndarray<nb::c_contig, nb::device::cpu> out, size_t size) {
    if (inputs_.size() != 1 || outputs_.size() != 1)
      throw std::invalid_argument("run_batches_into needs a one-input, one-output method");
    if (size == 0) throw std::invalid_argument("batch size must be positive");
    if (x.ndim() == 0 || out.ndim() == 0 || x.shape(0) != out.shape(0))
      throw std::invalid_argument("x and out must have the same number of rows");
    const size_t rows = x.shape(0);
    Holder h;
    h.wrap(x, inputs_[0], 0);
    const size_t in_row = rows ? x.nbytes() / rows : 0;
    const size_t out_row = rows ? out.nbytes() / rows : 0;
    const auto* src = static_cast<const uint8_t*>(x.data());
    auto* dst = static_cast<uint8_t*>(out.data());
    nb::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < rows; i += size) {
      const size_t n = std::min(size, rows - i);
      h.set_rows(src + i * in_row, n);
      check(method_->set_input(et::EValue(h.tensor()), 0), "cannot set input 0");
      check(method_->execute(), "the method failed");
      const Tensor& t = method_->get_output(0).toTensor();
      if (t.nbytes() != n * out_row)
        throw std::invalid_argument("out has the wrong shape or dtype for the method's output");
      std::memcpy(dst + i * out_row, t.const_data_ptr(), t.nbytes());
    }
  }

 private:
  // A TensorImpl over a numpy array's memory (no copy).
  struct Holder {
    std::vector<TensorImpl::SizesType> sizes;
    std::vector<TensorImpl::DimOrderType> dim_order;
    std::vector<TensorImpl::StridesType> strides;
    std::unique_ptr<TensorImpl> impl;
    ScalarType type{};
    void* data = nullptr;

    void wrap(const AnyIn& a, const Spec& spec, size_t index) {
      const DtypeName* want = nullptr;
      for (const auto& d : kDtypes)
        if (spec.dtype == d.name) want = &d;
      if (!want) throw std::invalid_argument("input " + std::to_string(index) + " has an unsupported dtype");
      if (a.itemsize() != want->size || !same_kind(a.dtype(), want->type))
        throw std::invalid_argument("input " + std::to_string(index) + " must be " + spec.dtype);
      if (a.ndim() != spec.shape.size())
        throw std::invalid_argument("input " + std::to_string(index) + " must have " +
                                    std::to_string(spec.shape.size()) + " dimensions, got " +
                                    std::to_string(a.ndim()));
      type = want->type;
      data = const_cast<void*>(a.data());
      sizes.assign(a.ndim(), 0);
      for (size_t d = 0; d < a.ndim(); ++d) sizes[d] = static_cast<TensorImpl::SizesType>(a.shape(d));
      dim_order.resize(a.ndim());
      for (size_t d = 0; d < a.ndim(); ++d) dim_order[d] = static_cast<TensorImpl::DimOrderType>(d);
      strides.assign(a.ndim(), 1);
      for (size_t d = a.ndim(); d-- > 1;) strides[d - 1] = strides[d] * sizes[d];
      rebuild();
    }
    void set_rows(const void* p, size_t n) {
      data = const_cast<void*>(p);
      sizes[0] = static_cast<TensorImpl::SizesType>(n);
      rebuild();
    }
    void rebuild() {
      impl = std::make_unique<TensorImpl>(type, static_cast<ssize_t>(sizes.size()), sizes.data(), data,
                                          dim_order.data(), strides.data());
    }
    Tensor tensor() { return Tensor(impl.get()); }

    static bool same_kind(nb::dlpack::dtype d, ScalarType t) {
      using C = nb::dlpack::dtype_code;
      switch (t) {
        case ScalarType::Float: case ScalarType::Double: case ScalarType::Half:
          return d.code == static_cast<uint8_t>(C::Float);
        case ScalarType::Long: case ScalarType::Int: case ScalarType::Short: case ScalarType::Char:
          return d.code == static_cast<uint8_t>(C::Int);
        case ScalarType::Byte: return d.code == static_cast<uint8_t>(C::UInt);
        case ScalarType::Bool: return d.code == static_cast<uint8_t>(C::Bool);
        default: return false;
      }
    }
  };

  static Spec spec(et::Result<et::TensorInfo> r, const char* what, size_t i) {
    if (!r.ok()) throw EtError(std::string("cannot read ") + what + " " + std::to_string(i) + " (not a tensor?)", r.error());
    const et::TensorInfo& info = r.get();
    const DtypeName* d = find_dtype(info.scalar_type());
    Spec s;
    for (auto v : info.sizes()) s.shape.push_back(v);
    s.dtype = d ? d->name : "unsupported";
    s.nbytes = info.nbytes();
    return s;
  }

  std::string method_name_;
  std::string buffer_;
  std::unique_ptr<et::DataLoader> loader_;
  std::unique_ptr<et::Program> program_;
  MallocMemoryAllocator method_alloc_;
  MallocMemoryAllocator temp_alloc_;
  std::vector<std::unique_ptr<uint8_t[]>> planned_;
  std::vector<et::Span<uint8_t>> spans_;
  std::unique_ptr<et::HierarchicalAllocator> hier_;
  std::unique_ptr<et::MemoryManager> mm_;
  std::unique_ptr<et::Method> method_;
  std::vector<Spec> inputs_, outputs_;
  std::mutex mu_;
};

}  // namespace

NB_MODULE(_et, m) {
  m.doc() = "ExecuTorch programs on numpy arrays, without torch";
  m.attr("EXECUTORCH_VERSION") = TOMA_EXECUTORCH_VERSION;
  et::runtime_init();

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const EtError& e) {
      nb::object cls = nb::module_::import_("toma_edge_native").attr("ExecuTorchError");
      const char* name = error_name(e.code);
      std::string msg = std::string(e.what()) + ": " + name;
      nb::object exc = cls(msg, static_cast<int>(e.code), name);
      PyErr_SetObject(cls.ptr(), exc.ptr());
    }
  });

  nb::class_<Spec>(m, "Spec")
      .def_ro("shape", &Spec::shape)
      .def_ro("dtype", &Spec::dtype)
      .def_ro("nbytes", &Spec::nbytes);

  nb::class_<NativeProgram>(m, "Program")
      .def(nb::init<nb::object, std::string>(), nb::arg("source"), nb::arg("method") = "forward",
           "Load a .pte from a path (memory-mapped) or from bytes (copied).")
      .def_prop_ro("inputs", &NativeProgram::inputs)
      .def_prop_ro("outputs", &NativeProgram::outputs)
      .def_prop_ro("planned_bytes", &NativeProgram::planned_bytes)
      .def("run", &NativeProgram::run, nb::arg("arrays"))
      .def("run_batches_into", &NativeProgram::run_batches_into, nb::arg("x"), nb::arg("out"),
           nb::arg("size"));

  m.def("set_threads", [](unsigned n) {
    auto* pool = executorch::extension::threadpool::get_threadpool();
    if (pool == nullptr || !pool->_unsafe_reset_threadpool(n))
      throw std::runtime_error("cannot resize the XNNPACK thread pool");
  }, nb::arg("threads"), "Size XNNPACK's thread pool (before loading a program).");
  m.def("threads", []() {
    auto* pool = executorch::extension::threadpool::get_threadpool();
    return pool ? pool->get_thread_count() : 0;
  });
}
