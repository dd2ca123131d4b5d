// ptfast's cache hit check: whether a cached virtual-token table is still current, in one call from Python; the
// encoders' index memo key (tensor_key, same_tensor_key); and what a prepared train step checks besides
// (places_hold, layout_key, same_layout).
//
// ptfast/_cache.py decides in Python whether a cached table still holds (Snapshot.reading): it reads, from their
// places (module dict and key), every parameter's and buffer's version counter and address, the training flags,
// the hook dicts and the process-wide settings: dozens of attribute reads per cached forward, more than the rest of
// the call costs. `table_current` reads the same things from C++ for the common case (plain
// tensors, no hooks), at a fraction of the cost; the Python reading stays the definition and the fallback.
//
// The contract: `table_current` returns True only where the Python reading would equal the recorded one (and the
// table was not written to, and, in grad mode, no parameter requires grad), and the new version counters only where
// the Python reading would differ from it in those counters and the optimizer-step count alone (_cache.py's
// _only_values_changed: the table is refreshed). It may return False ("ask Python") anywhere, where Python would
// decide otherwise too (an unusual tensor type, a training flag set to 1 instead of True).
//
// `record` is a tuple built by ptfast/_cache.py (_native_record) when the table is cached. What a snapshot's lists
// fix, shared by the records of one snapshot's refreshes:
//   0 holders      tuple of dicts (a module's _parameters / _buffers), parameters first
//   1 names        tuple of str, the keys into holders
//   2 n_params     int: holders[:n_params] hold parameters
//   3 empty        tuple of (dict, name) places that held None
//   4 moded        tuple of modules whose `training` flag counts
//   5 hook_dicts   tuple of dicts that must stay empty
//   6 types        tuple of the tensor types read here (torch.Tensor, nn.Parameter): any other type at a place is
//                  left to Python, whose attribute reads may go through __torch_function__
// and what this table's snapshot recorded:
//   7 versions     tuple of int, the version counters
//   8 addresses    tuple of int, the data pointers
//   9 flags        tuple of the moded modules' training flags (bool objects)
//   10 table       the cached table
//   11 table_version  int
//   12 generation  int, ptfast._cache's structure generation
//   13 steps       int, its optimizer-step count
//   14 backend     the raw PTFAST_BACKEND value (str or None)
//   15 settings    int, `settings_word()`
//   16 layouts     bytes: each tensor's dim, sizes and strides, as int64 in native byte order (_cache._layouts)

#include <Python.h>

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <tuple>
#include <utility>
#include <vector>

#define PTFAST_CHECK_STR_(x) #x
#define PTFAST_CHECK_STR(x) PTFAST_CHECK_STR_(x)
#define PTFAST_CHECK_CAT_(a, b) a##b
#define PTFAST_CHECK_CAT(a, b) PTFAST_CHECK_CAT_(a, b)

namespace {

enum Field : Py_ssize_t {
  kHolders,
  kNames,
  kNumParams,
  kEmpty,
  kModed,
  kHookDicts,
  kTypes,
  kVersions,
  kAddresses,
  kFlags,
  kTable,
  kTableVersion,
  kGeneration,
  kSteps,
  kBackend,
  kSettings,
  kLayouts,
  kNumFields,
};

// The process-wide settings a table depends on that live in C++: the fp32 precisions ptfast/_cache.py's
// global_state() reads, the autocast state (enabled per device, dtype for CPU and CUDA) and the CPU thread count.
// Packed in the 64 bits (28 + 10 + 16 + 10), compared whole; only equality matters, not the layout.
constexpr int kMaxThreadsKey = 1023;  // thread counts from this one on share one value (10 bits)
static_assert(7 * 4 + std::tuple_size_v<decltype(at::autocast::_AUTOCAST_SUPPORTED_DEVICES)> + 2 * 8 + 10 <= 64,
              "settings_word: the precisions, autocast devices and thread count no longer fit in 64 bits");

uint64_t settings_word() {
  using B = at::Float32Backend;
  using Op = at::Float32Op;
  auto& ctx = at::globalContext();
  uint64_t word = 0;
  int shift = 0;
  for (const auto [backend, op] : {std::pair{B::CUDA, Op::MATMUL}, std::pair{B::GENERIC, Op::ALL},
                                   std::pair{B::CUDA, Op::ALL}, std::pair{B::CUDA, Op::RNN},
                                   std::pair{B::MKLDNN, Op::ALL}, std::pair{B::MKLDNN, Op::MATMUL},
                                   std::pair{B::MKLDNN, Op::RNN}}) {
    word |= static_cast<uint64_t>(ctx.float32Precision(backend, op)) << shift;  // 5 values: 4 bits each
    shift += 4;
  }
  for (const auto device : at::autocast::_AUTOCAST_SUPPORTED_DEVICES) {
    const bool enabled = at::autocast::is_autocast_enabled(device);
    word |= static_cast<uint64_t>(enabled) << shift++;
    if (device == at::kCPU || device == at::kCUDA) {
      const auto dtype = enabled ? static_cast<uint64_t>(at::autocast::get_autocast_dtype(device)) + 1 : 0;
      word |= dtype << shift;
      shift += 8;
    }
  }
  // A CPU matmul may split its sums by thread (the last bits move); _cache.global_state reads the same count
  word |= static_cast<uint64_t>(std::min(at::get_num_threads(), kMaxThreadsKey)) << shift;
  return word;
}

bool is_type_in(PyObject* obj, PyObject* types) {
  const auto type = reinterpret_cast<PyObject*>(Py_TYPE(obj));
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(types); ++i) {
    if (PyTuple_GET_ITEM(types, i) == type) {
      return true;
    }
  }
  return false;
}

bool same_int(PyObject* recorded, int64_t now) {
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(recorded, &overflow);
  if (value == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return overflow == 0 && value == now;
}

PyObject* training_name = nullptr;  // "training", interned at import

enum class Answer { kAskPython, kCurrent, kValuesChanged, kTraining };

// The body of table_current. kValuesChanged: everything equal but version counters (filled into `versions_now`)
// and the optimizer-step count, Python's _only_values_changed. kTraining: grad mode and a parameter requires grad
// (Python's lookup returns no table then, whatever else changed). kAskPython on anything else, unexpected included.
Answer check(PyObject* record, PyObject* generation, PyObject* steps, PyObject* backend, bool grad_enabled,
             std::vector<int64_t>& versions_now) {
  if (!PyTuple_Check(record) || PyTuple_GET_SIZE(record) != kNumFields) {
    return Answer::kAskPython;
  }
  auto field = [record](Field f) { return PyTuple_GET_ITEM(record, f); };
  for (const Field f : {kHolders, kNames, kEmpty, kModed, kHookDicts, kTypes, kVersions, kAddresses, kFlags}) {
    if (!PyTuple_Check(field(f))) {
      return Answer::kAskPython;
    }
  }

  PyObject* holders = field(kHolders);
  PyObject* names = field(kNames);
  PyObject* types = field(kTypes);
  const Py_ssize_t n = PyTuple_GET_SIZE(holders);
  const Py_ssize_t n_params = PyLong_AsSsize_t(field(kNumParams));
  if (n_params < 0 || n_params > n || PyTuple_GET_SIZE(names) != n) {
    return Answer::kAskPython;
  }
  if (grad_enabled) {  // training, whatever else changed: the caller computes with autograd
    for (Py_ssize_t i = 0; i < n_params; ++i) {
      PyObject* holder = PyTuple_GET_ITEM(holders, i);
      PyObject* tensor = PyDict_Check(holder) ? PyDict_GetItemWithError(holder, PyTuple_GET_ITEM(names, i)) : nullptr;
      if (tensor == nullptr || !is_type_in(tensor, types)) {
        return Answer::kAskPython;
      }
      if (THPVariable_Unpack(tensor).requires_grad()) {
        return Answer::kTraining;
      }
    }
  }

  // The table itself: a caller's in-place write moves its version counter.
  PyObject* table = field(kTable);
  if (!THPVariable_Check(table)) {
    return Answer::kAskPython;
  }
  const at::Tensor& table_tensor = THPVariable_Unpack(table);
  if (table_tensor.is_inference() || !same_int(field(kTableVersion), table_tensor._version())) {
    return Answer::kAskPython;
  }
  // Counters kept by ptfast/_cache.py, passed in by the caller.
  if (PyObject_RichCompareBool(field(kGeneration), generation, Py_EQ) != 1 ||
      PyObject_RichCompareBool(field(kBackend), backend, Py_EQ) != 1 ||
      !same_int(field(kSettings), static_cast<int64_t>(settings_word()))) {
    return Answer::kAskPython;
  }
  const int same_steps = PyObject_RichCompareBool(field(kSteps), steps, Py_EQ);
  if (same_steps < 0) {
    return Answer::kAskPython;
  }
  bool values_changed = same_steps == 0;

  PyObject* versions = field(kVersions);
  PyObject* addresses = field(kAddresses);
  PyObject* layouts = field(kLayouts);
  if (PyTuple_GET_SIZE(versions) != n || PyTuple_GET_SIZE(addresses) != n || !PyBytes_Check(layouts)) {
    return Answer::kAskPython;
  }
  // Walked alongside the tensors: each one's dim, sizes and strides, compared in place.
  const char* layout = PyBytes_AS_STRING(layouts);
  const char* const layouts_end = layout + PyBytes_GET_SIZE(layouts);
  versions_now.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* holder = PyTuple_GET_ITEM(holders, i);
    if (!PyDict_Check(holder)) {
      return Answer::kAskPython;
    }
    PyObject* tensor = PyDict_GetItemWithError(holder, PyTuple_GET_ITEM(names, i));  // borrowed
    if (tensor == nullptr || !is_type_in(tensor, types)) {
      return Answer::kAskPython;
    }
    const at::Tensor& t = THPVariable_Unpack(tensor);
    if (t.is_inference() || !t.has_storage()) {
      return Answer::kAskPython;
    }
    if (!same_int(PyTuple_GET_ITEM(addresses, i), reinterpret_cast<intptr_t>(t.data_ptr()))) {
      return Answer::kAskPython;
    }
    // The same memory in another layout (p.data = p.data.t()) is another tensor.
    const int64_t dim = t.dim();
    const size_t bytes = static_cast<size_t>(dim) * sizeof(int64_t);
    int64_t recorded_dim = -1;
    if (layouts_end - layout < static_cast<std::ptrdiff_t>(sizeof(int64_t) + 2 * bytes)) {
      return Answer::kAskPython;
    }
    std::memcpy(&recorded_dim, layout, sizeof(int64_t));
    layout += sizeof(int64_t);
    if (recorded_dim != dim || std::memcmp(layout, t.sizes().data(), bytes) != 0 ||
        std::memcmp(layout + bytes, t.strides().data(), bytes) != 0) {
      return Answer::kAskPython;
    }
    layout += 2 * bytes;
    versions_now[i] = t._version();
    values_changed = values_changed || !same_int(PyTuple_GET_ITEM(versions, i), versions_now[i]);
  }

  if (layout != layouts_end) {
    return Answer::kAskPython;
  }

  PyObject* empty = field(kEmpty);
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(empty); ++i) {
    PyObject* place = PyTuple_GET_ITEM(empty, i);
    if (!PyTuple_Check(place) || PyTuple_GET_SIZE(place) != 2 || !PyDict_Check(PyTuple_GET_ITEM(place, 0))) {
      return Answer::kAskPython;
    }
    PyObject* value = PyDict_GetItemWithError(PyTuple_GET_ITEM(place, 0), PyTuple_GET_ITEM(place, 1));
    if ((value != nullptr && value != Py_None) || PyErr_Occurred()) {
      return Answer::kAskPython;
    }
  }

  PyObject* moded = field(kModed);
  PyObject* flags = field(kFlags);
  if (PyTuple_GET_SIZE(flags) != PyTuple_GET_SIZE(moded)) {
    return Answer::kAskPython;
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(moded); ++i) {
    PyObject* flag = PyObject_GetAttr(PyTuple_GET_ITEM(moded, i), training_name);  // new reference
    const bool same = flag == PyTuple_GET_ITEM(flags, i);  // True and False are singletons
    Py_XDECREF(flag);
    if (!same) {
      return Answer::kAskPython;
    }
  }

  PyObject* hook_dicts = field(kHookDicts);
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(hook_dicts); ++i) {
    PyObject* hooks = PyTuple_GET_ITEM(hook_dicts, i);
    if (!PyDict_Check(hooks) || PyDict_GET_SIZE(hooks) != 0) {
      return Answer::kAskPython;
    }
  }
  return values_changed ? Answer::kValuesChanged : Answer::kCurrent;
}

// table_current(record, generation, steps, backend, grad_enabled) -> True | tuple of versions | None | False
//   True: the table is current. A tuple: only values changed (the tensors' version counters now, in the record's
//   order). None: training (grad mode, a parameter requires grad). False: anything else; ask Python. Never raises
//   for a record built by ptfast/_cache.py.
PyObject* table_current(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "table_current(record, generation, steps, backend, grad_enabled)");
    return nullptr;
  }
  std::vector<int64_t> versions;
  Answer answer = Answer::kAskPython;
  try {
    answer = check(args[0], args[1], args[2], args[3], args[4] == Py_True, versions);
  } catch (...) {  // a c10::Error from an unusual tensor: Python decides
    answer = Answer::kAskPython;
  }
  if (PyErr_Occurred()) {
    PyErr_Clear();
    answer = Answer::kAskPython;
  }
  if (answer == Answer::kCurrent) {
    Py_RETURN_TRUE;
  }
  if (answer == Answer::kAskPython) {
    Py_RETURN_FALSE;
  }
  if (answer == Answer::kTraining) {
    Py_RETURN_NONE;
  }
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(versions.size()));
  if (out == nullptr) {
    return nullptr;
  }
  for (size_t i = 0; i < versions.size(); ++i) {
    PyObject* v = PyLong_FromLongLong(versions[i]);
    if (v == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), v);
  }
  return out;
}

// A tensor's identity for ptfast/_table_encoder.py's index memo: address, version counter, sizes, strides, dtype
// and device, appended to `key`. Two equal keys of a tensor the memo holds mean the same values in the same layout;
// without the version counter, the same memory in the same layout (values may differ).
bool pack_key(PyObject* obj, std::vector<int64_t>& key, bool with_version = true) {
  if (!THPVariable_Check(obj)) {
    return false;
  }
  if (with_version && !THPVariable_CheckExact(obj)) {
    return false;  // a subclass may answer these reads through __torch_function__: the Python key
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.is_inference() || !t.has_storage()) {
    return false;
  }
  key.push_back(reinterpret_cast<intptr_t>(t.data_ptr()));
  if (with_version) {
    key.push_back(t._version());
  }
  key.push_back(static_cast<int64_t>(t.scalar_type()));
  key.push_back(static_cast<int64_t>(t.device().type()));
  key.push_back(t.device().index());
  key.push_back(t.dim());
  for (const auto size : t.sizes()) {
    key.push_back(size);
  }
  for (const auto stride : t.strides()) {
    key.push_back(stride);
  }
  return true;
}

// The layout key of a tuple of tensors: each one's address, dtype, device, sizes and strides (not its version
// counter), packed one after another.
bool pack_layouts(PyObject* tensors, std::vector<int64_t>& key) {
  if (!PyTuple_Check(tensors)) {
    return false;
  }
  key.clear();
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tensors); ++i) {
    if (!pack_key(PyTuple_GET_ITEM(tensors, i), key, false)) {
      return false;
    }
  }
  return true;
}

// Whether `bytes` (a Python object) holds exactly `key`, as bytes_of would pack it.
bool same_bytes(PyObject* bytes, const std::vector<int64_t>& key) {
  const size_t n = key.size() * sizeof(int64_t);
  return PyBytes_Check(bytes) && static_cast<size_t>(PyBytes_GET_SIZE(bytes)) == n &&
         std::memcmp(PyBytes_AS_STRING(bytes), key.data(), n) == 0;
}

PyObject* bytes_of(const std::vector<int64_t>& key) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(key.data()),
                                   static_cast<Py_ssize_t>(key.size() * sizeof(int64_t)));
}

// tensor_key(t) -> bytes, or None for a tensor without a key here (a subclass, an inference tensor)
PyObject* tensor_key(PyObject*, PyObject* obj) {
  std::vector<int64_t> key;
  bool packed = false;
  try {
    packed = pack_key(obj, key);
  } catch (...) {
    packed = false;
  }
  return packed ? bytes_of(key) : Py_NewRef(Py_None);
}

// same_tensor_key(t, key) -> bool: tensor_key(t) == key, without making the bytes
PyObject* same_tensor_key(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "same_tensor_key(tensor, key)");
    return nullptr;
  }
  thread_local std::vector<int64_t> key;
  bool same = false;
  try {
    key.clear();
    same = pack_key(args[0], key) && same_bytes(args[1], key);
  } catch (...) {
    same = false;
  }
  return PyBool_FromLong(same);
}

// layout_key(tensors) -> bytes, or None where a tensor has no key here (an inference tensor, no storage)
PyObject* layout_key(PyObject*, PyObject* tensors) {
  std::vector<int64_t> key;
  bool packed = false;
  try {
    packed = pack_layouts(tensors, key);
  } catch (...) {
    packed = false;
  }
  return packed ? bytes_of(key) : Py_NewRef(Py_None);
}

// same_layout(tensors, key) -> bool: layout_key(tensors) == key, without making the bytes
PyObject* same_layout(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "same_layout(tensors, key)");
    return nullptr;
  }
  thread_local std::vector<int64_t> key;
  bool same = false;
  try {
    same = pack_layouts(args[0], key) && same_bytes(args[1], key);
  } catch (...) {
    same = false;
  }
  return PyBool_FromLong(same);
}

// places_hold(dicts, keys, objects, sized, sizes) -> bool: whether dicts[i][keys[i]] is objects[i] for every i, and
// len(sized[j]) == sizes[j] for every j (a prepared train step's check that the modules and tensors it was bound to
// are the ones at their places, by identity, and that no key was added to their dicts)
PyObject* places_hold(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "places_hold(dicts, keys, objects, sized, sizes)");
    return nullptr;
  }
  PyObject* dicts = args[0];
  PyObject* keys = args[1];
  PyObject* objects = args[2];
  PyObject* sized = args[3];
  PyObject* sizes = args[4];
  if (!PyTuple_Check(dicts) || !PyTuple_Check(keys) || !PyTuple_Check(objects) || !PyTuple_Check(sized) ||
      !PyTuple_Check(sizes) || PyTuple_GET_SIZE(keys) != PyTuple_GET_SIZE(dicts) ||
      PyTuple_GET_SIZE(objects) != PyTuple_GET_SIZE(dicts) || PyTuple_GET_SIZE(sizes) != PyTuple_GET_SIZE(sized)) {
    Py_RETURN_FALSE;
  }
  for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(sized); ++j) {
    PyObject* dict = PyTuple_GET_ITEM(sized, j);
    if (!PyDict_Check(dict) || !same_int(PyTuple_GET_ITEM(sizes, j), PyDict_GET_SIZE(dict))) {
      Py_RETURN_FALSE;
    }
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(dicts); ++i) {
    PyObject* dict = PyTuple_GET_ITEM(dicts, i);
    if (!PyDict_Check(dict)) {
      Py_RETURN_FALSE;
    }
    PyObject* value = PyDict_GetItemWithError(dict, PyTuple_GET_ITEM(keys, i));  // borrowed
    if (value != PyTuple_GET_ITEM(objects, i)) {
      PyErr_Clear();
      Py_RETURN_FALSE;
    }
  }
  Py_RETURN_TRUE;
}

PyObject* settings(PyObject*, PyObject*) {
  try {
    return PyLong_FromLongLong(static_cast<long long>(settings_word()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"table_current", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(table_current)), METH_FASTCALL,
     "table_current(record, generation, steps, backend, grad_enabled): whether a cached table is still current "
     "(see ptfast/_cache.py)."},
    {"settings_word", settings, METH_NOARGS,
     "The fp32 precision and autocast settings a table depends on, packed in one int (compare for equality)."},
    {"tensor_key", tensor_key, METH_O,
     "tensor_key(t): t's address, version counter, sizes, strides, dtype and device packed in bytes, or None."},
    {"same_tensor_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(same_tensor_key)), METH_FASTCALL,
     "same_tensor_key(t, key): whether tensor_key(t) == key."},
    {"layout_key", layout_key, METH_O,
     "layout_key(tensors): each tensor's address, dtype, device, sizes and strides packed in bytes, or None."},
    {"same_layout", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(same_layout)), METH_FASTCALL,
     "same_layout(tensors, key): whether layout_key(tensors) == key."},
    {"places_hold", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(places_hold)), METH_FASTCALL,
     "places_hold(dicts, keys, objects, sized, sizes): whether dicts[i][keys[i]] is objects[i] for every i and "
     "len(sized[j]) == sizes[j] for every j."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, PTFAST_CHECK_STR(TORCH_EXTENSION_NAME),
    "ptfast's C++ extension: the cache hit check (the ops are registered with torch.library).", -1, methods,
};

}  // namespace

// The library is also a Python module, so ptfast/native.py can import it (after torch.ops.load_library registered
// its ops) for the functions above. TORCH_EXTENSION_NAME is set by torch.utils.cpp_extension: the JIT name or _C.
PyMODINIT_FUNC PTFAST_CHECK_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  if (training_name == nullptr) {
    training_name = PyUnicode_InternFromString("training");
    if (training_name == nullptr) {
      return nullptr;
    }
  }
  return PyModule_Create(&module_def);
}
