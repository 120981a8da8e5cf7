// edge_sparse.hpp: run an edge-sparse artifact directory from C++ (header only, C++17).
//
// Copy this header into your app; link the TVM runtime (libtvm_runtime.so, libtvm_ffi.so from the bundle's lib/)
// and put the tvm_ffi headers (the bundle's include/) on the include path.
//
//   edge_sparse::Model model("mlp-rpi5");                // reads manifest.json, checks sha256 + runtime versions
//   model.set_input("x", x.data(), x.size() * sizeof(float));
//   model.run();
//   std::vector<float> y = model.output<float>("y");
//
// Every failure throws edge_sparse::Error with a one-line message that says what is wrong and how to fix it.
// Before loading, the model library's sha256 is compared with the manifest, and (for bundles) the TVM runtime
// libraries the process actually loaded are identified by sha256 and compared with the TVM version that compiled
// the model: a mismatched runtime is refused instead of crashing later inside a kernel.
#pragma once

#include <dlfcn.h>
#include <link.h>

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace edge_sparse {

/*! \brief The one exception type of this API; what() is a single line for users. */
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// ------------------------------------------------------------------------------------------------ JSON (manifest)
namespace json {

/*! \brief A parsed JSON value: just enough for manifest.json (objects keep insertion order). */
struct Value {
  enum Kind { kNull, kBool, kNumber, kString, kArray, kObject } kind = kNull;
  bool boolean = false;
  double number = 0;
  std::string str;
  std::vector<Value> items;
  std::vector<std::pair<std::string, Value>> fields;

  const Value* find(const std::string& key) const {
    for (const auto& kv : fields)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
  const Value& at(const std::string& key, const std::string& where) const {
    const Value* v = find(key);
    if (v == nullptr) throw Error(where + " lacks '" + key + "'; recompile the artifact");
    return *v;
  }
  const std::string& as_string(const std::string& where) const {
    if (kind != kString) throw Error(where + " is not a string; recompile the artifact");
    return str;
  }
  std::string get_string(const std::string& key, const std::string& dflt = "") const {
    const Value* v = find(key);
    return (v != nullptr && v->kind == kString) ? v->str : dflt;
  }
};

class Parser {
 public:
  Parser(const std::string& text, const std::string& origin) : s_(text), origin_(origin) {}

  Value parse() {
    Value v = value();
    ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  std::string origin_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& what) {
    throw Error(origin_ + " is not valid JSON (" + what + " at byte " + std::to_string(i_) +
                "); recompile the artifact");
  }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  char peek() {
    ws();
    if (i_ >= s_.size()) fail("unexpected end");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  bool literal(const char* word) {
    size_t n = std::strlen(word);
    if (s_.compare(i_, n, word) == 0) {
      i_ += n;
      return true;
    }
    return false;
  }
  static void utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  uint32_t hex4() {
    if (i_ + 4 > s_.size()) fail("short \\u escape");
    uint32_t v = static_cast<uint32_t>(std::stoul(s_.substr(i_, 4), nullptr, 16));
    i_ += 4;
    return v;
  }
  std::string string() {
    expect('"');
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("bad escape");
      char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && i_ + 6 <= s_.size() && s_[i_] == '\\' && s_[i_ + 1] == 'u') {
            i_ += 2;
            uint32_t lo = hex4();
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }
  Value value() {
    Value v;
    char c = peek();
    if (c == '{') {
      ++i_;
      v.kind = Value::kObject;
      if (peek() == '}') {
        ++i_;
        return v;
      }
      while (true) {
        std::string key = string();
        expect(':');
        v.fields.emplace_back(std::move(key), value());
        char d = peek();
        ++i_;
        if (d == '}') return v;
        if (d != ',') fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      ++i_;
      v.kind = Value::kArray;
      if (peek() == ']') {
        ++i_;
        return v;
      }
      while (true) {
        v.items.push_back(value());
        char d = peek();
        ++i_;
        if (d == ']') return v;
        if (d != ',') fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.kind = Value::kString;
      v.str = string();
      return v;
    }
    if (literal("true")) {
      v.kind = Value::kBool;
      v.boolean = true;
      return v;
    }
    if (literal("false")) {
      v.kind = Value::kBool;
      return v;
    }
    if (literal("null")) return v;
    size_t start = i_;
    while (i_ < s_.size() && std::strchr("+-0123456789.eE", s_[i_]) != nullptr) ++i_;
    if (start == i_) fail("unexpected character");
    v.kind = Value::kNumber;
    v.number = std::strtod(s_.substr(start, i_ - start).c_str(), nullptr);
    return v;
  }
};

inline Value parse(const std::string& text, const std::string& origin) { return Parser(text, origin).parse(); }

}  // namespace json

// ------------------------------------------------------------------------------------------------ SHA-256
namespace detail {

/*! \brief FIPS 180-4 SHA-256, streaming; no dependencies (the manifest records hex digests). */
class Sha256 {
 public:
  Sha256() {
    static const uint32_t init[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    std::memcpy(h_, init, sizeof(h_));
  }
  void update(const uint8_t* p, size_t n) {
    total_ += n;
    while (n > 0) {
      size_t take = std::min(n, size_t(64) - fill_);
      std::memcpy(buf_ + fill_, p, take);
      fill_ += take;
      p += take;
      n -= take;
      if (fill_ == 64) {
        block(buf_);
        fill_ = 0;
      }
    }
  }
  std::string hexdigest() {
    uint64_t bits = total_ * 8;
    uint8_t pad = 0x80;
    update(&pad, 1);
    uint8_t zero = 0;
    while (fill_ != 56) update(&zero, 1);
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
    update(len, 8);
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (uint32_t w : h_)
      for (int s = 28; s >= 0; s -= 4) out += hex[(w >> s) & 0xF];
    return out;
  }

 private:
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t fill_ = 0;
  uint64_t total_ = 0;

  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void block(const uint8_t* p) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = (uint32_t(p[4 * i]) << 24) | (uint32_t(p[4 * i + 1]) << 16) | (uint32_t(p[4 * i + 2]) << 8) |
             uint32_t(p[4 * i + 3]);
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    h_[0] += a;
    h_[1] += b;
    h_[2] += c;
    h_[3] += d;
    h_[4] += e;
    h_[5] += f;
    h_[6] += g;
    h_[7] += h;
  }
};

inline std::string sha256_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read " + path);
  Sha256 h;
  std::vector<char> buf(1 << 16);
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    h.update(reinterpret_cast<const uint8_t*>(buf.data()), static_cast<size_t>(f.gcount()));
  }
  return h.hexdigest();
}

inline std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return std::string();
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline std::string basename(const std::string& path) {
  size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

inline std::string join(const std::string& dir, const std::string& rel) {
  if (dir.empty()) return rel;
  return dir.back() == '/' ? dir + rel : dir + "/" + rel;
}

/*! \brief Paths of the shared objects loaded into this process (resolved by the dynamic loader). */
inline std::vector<std::string> loaded_libraries() {
  std::vector<std::string> out;
  dl_iterate_phdr(
      [](struct dl_phdr_info* info, size_t, void* data) {
        if (info->dlpi_name != nullptr && info->dlpi_name[0] != '\0')
          static_cast<std::vector<std::string>*>(data)->push_back(info->dlpi_name);
        return 0;
      },
      &out);
  return out;
}

inline DLDataType parse_dtype(const std::string& s, const std::string& where) {
  static const std::map<std::string, DLDataType> table = {
      {"float32", {kDLFloat, 32, 1}}, {"float16", {kDLFloat, 16, 1}}, {"float64", {kDLFloat, 64, 1}},
      {"int8", {kDLInt, 8, 1}},       {"int16", {kDLInt, 16, 1}},     {"int32", {kDLInt, 32, 1}},
      {"int64", {kDLInt, 64, 1}},     {"uint8", {kDLUInt, 8, 1}},     {"uint16", {kDLUInt, 16, 1}},
      {"uint32", {kDLUInt, 32, 1}},   {"uint64", {kDLUInt, 64, 1}},   {"bool", {kDLBool, 8, 1}}};
  auto it = table.find(s);
  if (it == table.end()) throw Error(where + " has dtype '" + s + "', which edge_sparse.hpp does not support");
  return it->second;
}

struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = tvm::ffi::GetDataSize(*t);
    n = (n + 63) / 64 * 64;  // aligned_alloc needs a multiple of the alignment; TVM kernels assume 64
    t->data = std::aligned_alloc(64, n == 0 ? 64 : n);
    if (t->data == nullptr) throw Error("out of memory allocating a " + std::to_string(n) + "-byte tensor");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

template <class T>
struct DType;
template <> struct DType<float> { static constexpr const char* name = "float32"; };
template <> struct DType<double> { static constexpr const char* name = "float64"; };
template <> struct DType<int8_t> { static constexpr const char* name = "int8"; };
template <> struct DType<int16_t> { static constexpr const char* name = "int16"; };
template <> struct DType<int32_t> { static constexpr const char* name = "int32"; };
template <> struct DType<int64_t> { static constexpr const char* name = "int64"; };
template <> struct DType<uint8_t> { static constexpr const char* name = "uint8"; };
template <> struct DType<uint16_t> { static constexpr const char* name = "uint16"; };
template <> struct DType<uint32_t> { static constexpr const char* name = "uint32"; };
template <> struct DType<uint64_t> { static constexpr const char* name = "uint64"; };
template <> struct DType<bool> { static constexpr const char* name = "bool"; };

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/*! \brief One line from a TVM error (TVM's what() carries a multi-line traceback). */
inline std::string tvm_message(const tvm::ffi::Error& e) {
  std::string msg = e.kind() + ": " + e.message();
  std::replace(msg.begin(), msg.end(), '\n', ' ');
  return msg;
}

}  // namespace detail

// ------------------------------------------------------------------------------------------------ Model

/*! \brief Name, shape and dtype of a model input or output (from manifest.json). */
struct TensorInfo {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;
  DLDataType dl_dtype{};

  size_t elements() const {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    return n;
  }
  size_t bytes() const { return elements() * ((dl_dtype.bits * dl_dtype.lanes + 7) / 8); }
};

struct Options {
  /*! \brief Check the model library's sha256 against manifest.json before loading it. */
  bool verify = true;
  /*! \brief Refuse TVM runtime libraries other than the ones recorded in the manifest's "bundle" section. */
  bool check_runtime = true;
  /*! \brief TVM worker threads (0: TVM_NUM_THREADS or TVM's default). Read once per process, at first load. */
  int threads = 0;
};

/*! \brief What the runtime check found: library path -> "package version (sha256 ok)". */
struct RuntimeInfo {
  std::string compiler_tvm, compiler_ffi;
  std::vector<std::pair<std::string, std::string>> libraries;
  std::string ffi_abi;  // TVMFFIGetVersion() of the loaded libtvm_ffi.so
};

class Model {
 public:
  explicit Model(const std::string& dir, const Options& options = Options()) : dir_(dir) {
    std::string manifest_path = detail::join(dir, "manifest.json");
    std::string text = detail::read_text(manifest_path);
    if (text.empty())
      throw Error(manifest_path + " not found; pass an artifact directory made by 'edge-sparse compile'");
    manifest_ = json::parse(text, manifest_path);
    read_specs();
    check_runtime(options.check_runtime);
    library_ = manifest_.at("library", manifest_path).as_string("manifest 'library'");
    check_inside(library_);
    std::string lib_path = detail::join(dir, library_);
    if (library_.size() > 4 && library_.compare(library_.size() - 4, 4, ".tar") == 0) {
      // Android without the NDK at compile time: objects to link (RUN.md prints the command).
      std::string linked = detail::join(dir, "model.so");
      if (!std::ifstream(linked))
        throw Error("artifact holds unlinked objects (" + library_ +
                    "); link them into model.so with the command in RUN.md first");
      lib_path = linked;
      if (options.verify) verify_file(library_);  // the archive the .so was linked from
    } else if (options.verify) {
      verify_file(library_);
    }
    if (options.threads > 0) setenv("TVM_NUM_THREADS", std::to_string(options.threads).c_str(), 1);
    try {
      lib_ = tvm::ffi::Module::LoadFromFile(lib_path);
      auto load_exec = lib_->GetFunction("vm_load_executable");
      if (!load_exec.has_value())
        throw Error(lib_path + " is not a Relax executable (no vm_load_executable); recompile the artifact");
      vm_ = (*load_exec)().cast<tvm::ffi::Module>();
      auto init = vm_->GetFunction("vm_initialization");
      if (!init.has_value()) throw Error("the TVM runtime lacks vm_initialization; use the bundle's lib/");
      // device type, device id, allocator (2: pooled) -- as tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())
      (*init)(static_cast<int>(kDLCPU), 0, 2);
      auto main = vm_->GetFunction("main");
      if (!main.has_value()) throw Error(lib_path + " has no 'main' function; recompile the artifact");
      main_ = *main;
    } catch (const tvm::ffi::Error& e) {
      throw Error("TVM could not load " + lib_path + ": " + detail::tvm_message(e));
    }
    DLDevice cpu{kDLCPU, 0};
    for (const auto& spec : inputs_) {
      input_tensors_.push_back(
          tvm::ffi::Tensor::FromNDAlloc(detail::AlignedAlloc(), tvm::ffi::ShapeView(spec.shape.data(), spec.shape.size()), spec.dl_dtype, cpu));
      std::memset(input_tensors_.back().data_ptr(), 0, spec.bytes());
    }
    input_set_.assign(inputs_.size(), false);
  }

  Model(const Model&) = delete;  // one Model owns its VM and input buffers; use one per thread
  Model& operator=(const Model&) = delete;
  Model(Model&&) = default;
  Model& operator=(Model&&) = default;

  const std::vector<TensorInfo>& inputs() const { return inputs_; }
  const std::vector<TensorInfo>& outputs() const { return outputs_; }
  const json::Value& manifest() const { return manifest_; }
  const RuntimeInfo& runtime_info() const { return runtime_; }
  const std::string& directory() const { return dir_; }
  std::string library_path() const { return detail::join(dir_, library_); }

  /*! \brief Copy ``bytes`` bytes of C-contiguous data into input ``name`` (size must match exactly). */
  void set_input(const std::string& name, const void* data, size_t bytes) {
    size_t i = input_index(name);
    if (bytes != inputs_[i].bytes())
      throw Error("input '" + name + "' needs " + std::to_string(inputs_[i].bytes()) + " bytes (" +
                  inputs_[i].dtype + " " + detail::shape_str(inputs_[i].shape) + "), got " + std::to_string(bytes));
    std::memcpy(input_tensors_[i].data_ptr(), data, bytes);
    input_set_[i] = true;
  }

  template <class T>
  void set_input(const std::string& name, const std::vector<T>& values) {
    const TensorInfo& spec = inputs_[input_index(name)];
    if (spec.dtype != detail::DType<T>::name)
      throw Error("input '" + name + "' is " + spec.dtype + ", not " + detail::DType<T>::name);
    set_input(name, values.data(), values.size() * sizeof(T));
  }

  /*! \brief Run the model on the inputs set so far (every input must have been set once). */
  void run() {
    for (size_t i = 0; i < inputs_.size(); ++i)
      if (!input_set_[i]) throw Error("input '" + inputs_[i].name + "' was not set; call set_input first");
    std::vector<tvm::ffi::AnyView> args(input_tensors_.begin(), input_tensors_.end());
    tvm::ffi::Any result;
    try {
      main_.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    } catch (const tvm::ffi::Error& e) {
      throw Error("running the model failed: " + detail::tvm_message(e));
    }
    output_tensors_.clear();
    if (auto t = result.as<tvm::ffi::Tensor>()) {
      output_tensors_.push_back(*t);
    } else if (auto arr = result.as<tvm::ffi::Array<tvm::ffi::Any>>()) {
      for (const tvm::ffi::Any& item : *arr) {
        auto t2 = item.as<tvm::ffi::Tensor>();
        if (!t2) throw Error("the model returned a nested output, which edge_sparse.hpp does not unpack");
        output_tensors_.push_back(*t2);
      }
    } else {
      throw Error("the model returned " + result.GetTypeKey() + ", expected tensors");
    }
    if (output_tensors_.size() != outputs_.size())
      throw Error("the model returned " + std::to_string(output_tensors_.size()) + " outputs, manifest.json lists " +
                  std::to_string(outputs_.size()) + "; recompile the artifact");
    for (size_t i = 0; i < outputs_.size(); ++i) {
      const DLTensor* t = output_tensors_[i].GetDLTensorPtr();
      std::vector<int64_t> shape(t->shape, t->shape + t->ndim);
      if (shape != outputs_[i].shape || t->dtype.code != outputs_[i].dl_dtype.code ||
          t->dtype.bits != outputs_[i].dl_dtype.bits)
        throw Error("output '" + outputs_[i].name + "' came back as " + detail::shape_str(shape) +
                    ", manifest.json says " + outputs_[i].dtype + " " + detail::shape_str(outputs_[i].shape));
    }
  }

  /*! \brief Raw bytes of output ``name`` from the last run(). */
  const void* output_data(const std::string& name) const {
    size_t i = output_index(name);
    if (output_tensors_.empty()) throw Error("no outputs yet; call run() first");
    return output_tensors_[i].data_ptr();
  }

  template <class T>
  std::vector<T> output(const std::string& name) const {
    const TensorInfo& spec = outputs_[output_index(name)];
    if (spec.dtype != detail::DType<T>::name)
      throw Error("output '" + name + "' is " + spec.dtype + ", not " + detail::DType<T>::name);
    const T* p = static_cast<const T*>(output_data(name));
    return std::vector<T>(p, p + spec.elements());
  }

 private:
  std::string dir_, library_;
  json::Value manifest_;
  std::vector<TensorInfo> inputs_, outputs_;
  RuntimeInfo runtime_;
  tvm::ffi::Module lib_{tvm::ffi::UnsafeInit()};
  tvm::ffi::Module vm_{tvm::ffi::UnsafeInit()};
  tvm::ffi::Function main_;
  std::vector<tvm::ffi::Tensor> input_tensors_, output_tensors_;
  std::vector<bool> input_set_;

  size_t input_index(const std::string& name) const {
    for (size_t i = 0; i < inputs_.size(); ++i)
      if (inputs_[i].name == name) return i;
    throw Error("unknown input '" + name + "'; the model's inputs are: " + names(inputs_));
  }
  size_t output_index(const std::string& name) const {
    for (size_t i = 0; i < outputs_.size(); ++i)
      if (outputs_[i].name == name) return i;
    throw Error("unknown output '" + name + "'; the model's outputs are: " + names(outputs_));
  }
  static std::string names(const std::vector<TensorInfo>& specs) {
    std::string s;
    for (const auto& t : specs) s += (s.empty() ? "" : ", ") + t.name;
    return s;
  }

  void read_specs() {
    for (const char* key : {"inputs", "outputs"}) {
      const json::Value& list = manifest_.at(key, "manifest.json");
      for (const json::Value& item : list.items) {
        TensorInfo t;
        t.name = item.at("name", std::string("manifest ") + key).as_string("tensor name");
        for (const json::Value& d : item.at("shape", "manifest tensor '" + t.name + "'").items)
          t.shape.push_back(static_cast<int64_t>(d.number));
        t.dtype = item.at("dtype", "manifest tensor '" + t.name + "'").as_string("dtype");
        t.dl_dtype = detail::parse_dtype(t.dtype, std::string(key) + " '" + t.name + "'");
        (std::string(key) == "inputs" ? inputs_ : outputs_).push_back(t);
      }
    }
  }

  // Files the manifest names must be plain relative paths inside the artifact (no "/x", no "..", no "a\\b").
  static void check_inside(const std::string& rel) {
    bool bad = rel.empty() || rel[0] == '/' || rel.find('\\') != std::string::npos;
    for (size_t start = 0; !bad && start <= rel.size();) {
      size_t end = rel.find('/', start);
      if (end == std::string::npos) end = rel.size();
      std::string part = rel.substr(start, end - start);
      bad = part.empty() || part == "..";
      start = end + 1;
    }
    if (bad) throw Error("manifest.json names a file outside the artifact: '" + rel + "'; recompile the artifact");
  }

  void verify_file(const std::string& rel) {
    check_inside(rel);
    const json::Value* files = manifest_.find("files");
    const json::Value* entry = files ? files->find(rel) : nullptr;
    if (entry == nullptr) throw Error("manifest.json has no sha256 for " + rel + "; recompile the artifact");
    std::string want = entry->get_string("sha256");
    std::string have = detail::sha256_file(detail::join(dir_, rel));
    if (have != want)
      throw Error(rel + " does not match its sha256 in manifest.json (modified or corrupt); recompile or re-copy it");
  }

  // The compiler's TVM versions are in manifest["tvm"]; a bundle records, per runtime library, the package version
  // it came from and its sha256. The libraries the loader actually mapped (LD_LIBRARY_PATH may pick others) are
  // hashed and must be those, from the same versions that compiled the model.
  void check_runtime(bool enforce) {
    const json::Value* tvm = manifest_.find("tvm");
    runtime_.compiler_tvm = tvm ? tvm->get_string("version") : "";
    runtime_.compiler_ffi = tvm ? tvm->get_string("ffi_version") : "";
    TVMFFIVersion v;
    TVMFFIGetVersion(&v);
    runtime_.ffi_abi = std::to_string(v.major) + "." + std::to_string(v.minor) + "." + std::to_string(v.patch);
    if (enforce && (v.major != TVM_FFI_VERSION_MAJOR || v.minor != TVM_FFI_VERSION_MINOR))
      throw Error("loaded libtvm_ffi.so has ABI " + runtime_.ffi_abi + " but this program was built against tvm_ffi " +
                  std::to_string(TVM_FFI_VERSION_MAJOR) + "." + std::to_string(TVM_FFI_VERSION_MINOR) +
                  " headers; rebuild it against the bundle's include/");
    const json::Value* bundle = manifest_.find("bundle");
    const json::Value* rt = bundle ? bundle->find("runtime") : nullptr;
    const json::Value* libs = rt ? rt->find("libraries") : nullptr;
    if (libs == nullptr) return;  // not a bundle: the app brings its own runtime
    for (const auto& kv : libs->fields) {
      const std::string package = kv.second.get_string("package");
      const std::string version = kv.second.get_string("version");
      const std::string want = package == "apache-tvm-ffi" ? runtime_.compiler_ffi : runtime_.compiler_tvm;
      if (enforce && !want.empty() && version != want)
        throw Error("runtime library " + kv.first + " is from " + package + " " + version +
                    " but the model was compiled with " + package + " " + want +
                    "; rebuild the bundle with the compiler's versions (edge-sparse compile --bundle)");
    }
    for (const std::string& path : detail::loaded_libraries()) {
      std::string base = detail::basename(path);
      for (const auto& kv : libs->fields) {
        if (detail::basename(kv.first) != base) continue;
        std::string have = detail::sha256_file(path);
        std::string package = kv.second.get_string("package"), version = kv.second.get_string("version");
        if (enforce && have != kv.second.get_string("sha256"))
          throw Error("the loaded " + path + " is not " + package + " " + version +
                      "'s " + base + " that the model was compiled against (sha256 differs); "
                      "unset LD_LIBRARY_PATH or copy the bundle's lib/ unchanged");
        runtime_.libraries.emplace_back(path, package + " " + version + (have == kv.second.get_string("sha256")
                                                                              ? " (sha256 ok)"
                                                                              : " (sha256 MISMATCH, not enforced)"));
      }
    }
    if (enforce && runtime_.libraries.size() < libs->fields.size())
      throw Error("the process did not load every runtime library the bundle lists; link with -ltvm_runtime -ltvm_ffi");
  }
};

}  // namespace edge_sparse
