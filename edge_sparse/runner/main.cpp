// edge-sparse-run: run an edge-sparse artifact on the device (no Python needed).
//
//   edge-sparse-run [MODEL_DIR] [-i NAME=FILE.npy | -i FILE.npz]... [-o OUT.npz | OUT.npy] [--bench N]
//
// MODEL_DIR defaults to the directory above this binary (the bundle root). Inputs come from .npy files (by name)
// or an uncompressed .npz (keys = input names); without -i, inputs are random (floats ~ N(0,1), integers = 1).
// --bench N prints latency statistics over N runs after --warmup W runs.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "edge_sparse.hpp"
#include "npy.hpp"

#ifndef EDGE_SPARSE_RUNNER_VERSION
#define EDGE_SPARSE_RUNNER_VERSION "dev"
#endif

namespace {

using edge_sparse::Error;

const char* kUsage =
    "usage: edge-sparse-run [MODEL_DIR] [options]\n"
    "  MODEL_DIR            artifact directory with manifest.json (default: the directory above this binary)\n"
    "  -i, --input NAME=F   input NAME from F.npy; or -i F.npz with one member per input name (np.savez)\n"
    "  -o, --output F       write outputs to F.npz (all) or F.npy (single output)\n"
    "  --bench N            run N timed iterations and print latency statistics\n"
    "  --warmup W           untimed runs before --bench (default 5)\n"
    "  --json F             also write the --bench statistics to F as JSON\n"
    "  --threads T          TVM worker threads (default: TVM_NUM_THREADS or TVM's choice)\n"
    "  --seed S             seed of the random inputs used when no -i is given (default 0)\n"
    "  --no-verify          skip the model's sha256 check\n"
    "  --no-runtime-check   load even if the TVM runtime libraries are not the ones recorded in the manifest\n"
    "  --info               print the model's inputs/outputs and runtime versions, then exit\n"
    "  --version            print the runner version\n";

struct Args {
  std::string dir;
  std::vector<std::string> inputs;
  std::string output, json;
  int bench = 0, warmup = 5, threads = 0;
  unsigned seed = 0;
  bool verify = true, runtime_check = true, info = false;
};

int to_int(const std::string& flag, const std::string& v, int min) {
  try {
    size_t used = 0;
    int n = std::stoi(v, &used);
    if (used == v.size() && n >= min) return n;
  } catch (const std::exception&) {
  }
  throw Error(flag + " needs an integer >= " + std::to_string(min) + ", got '" + v + "'");
}

std::string default_dir() {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  std::string exe(buf, static_cast<size_t>(n));
  std::string bin = exe.substr(0, exe.find_last_of('/'));
  // the self-contained launcher (./run) sits in the bundle root itself; the runner in bin/
  if (access((bin + "/manifest.json").c_str(), R_OK) == 0) return bin;
  return bin.substr(0, bin.find_last_of('/'));
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw Error(s + " needs a value (see --help)");
      return argv[++i];
    };
    if (s == "-h" || s == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (s == "--version") {
      std::cout << "edge-sparse-run " << EDGE_SPARSE_RUNNER_VERSION << " (tvm_ffi headers " << TVM_FFI_VERSION_MAJOR
                << "." << TVM_FFI_VERSION_MINOR << "." << TVM_FFI_VERSION_PATCH << ")\n";
      std::exit(0);
    } else if (s == "-i" || s == "--input") {
      a.inputs.push_back(value());
    } else if (s == "-o" || s == "--output") {
      a.output = value();
    } else if (s == "--bench") {
      a.bench = to_int(s, value(), 1);
    } else if (s == "--json") {
      a.json = value();
    } else if (s == "--warmup") {
      a.warmup = to_int(s, value(), 0);
    } else if (s == "--threads") {
      a.threads = to_int(s, value(), 1);
    } else if (s == "--seed") {
      a.seed = static_cast<unsigned>(to_int(s, value(), 0));
    } else if (s == "--no-verify") {
      a.verify = false;
    } else if (s == "--no-runtime-check") {
      a.runtime_check = false;
    } else if (s == "--info") {
      a.info = true;
    } else if (!s.empty() && s[0] == '-') {
      throw Error("unknown option " + s + " (see --help)");
    } else if (a.dir.empty()) {
      a.dir = s;
    } else {
      throw Error("unexpected argument '" + s + "'; give one MODEL_DIR (see --help)");
    }
  }
  if (a.dir.empty()) a.dir = default_dir();
  return a;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void set_array(edge_sparse::Model& model, const std::string& name, const edge_sparse::npy::Array& a,
               const std::string& origin) {
  for (const auto& spec : model.inputs()) {
    if (spec.name != name) continue;
    if (a.dtype != spec.dtype || a.shape != spec.shape)
      throw Error(origin + " holds " + a.dtype + " " + edge_sparse::detail::shape_str(a.shape) + "; input '" + name +
                  "' needs " + spec.dtype + " " + edge_sparse::detail::shape_str(spec.shape));
  }
  model.set_input(name, a.data.data(), a.data.size());
}

void load_inputs(edge_sparse::Model& model, const Args& args) {
  if (args.inputs.empty()) {
    std::mt19937 rng(args.seed);
    std::normal_distribution<float> normal(0.f, 1.f);
    for (const auto& spec : model.inputs()) {
      std::vector<uint8_t> bytes(spec.bytes());
      if (spec.dtype == "float32") {
        float* p = reinterpret_cast<float*>(bytes.data());
        for (size_t k = 0; k < spec.elements(); ++k) p[k] = normal(rng);
      } else if (spec.dtype == "int64") {
        std::fill_n(reinterpret_cast<int64_t*>(bytes.data()), spec.elements(), 1);
      } else if (spec.dtype == "int32") {
        std::fill_n(reinterpret_cast<int32_t*>(bytes.data()), spec.elements(), 1);
      } else if (spec.dtype == "bool" || spec.dtype == "uint8" || spec.dtype == "int8") {
        std::fill(bytes.begin(), bytes.end(), 1);
      }  // other dtypes: zeros
      model.set_input(spec.name, bytes.data(), bytes.size());
    }
    return;
  }
  for (const std::string& item : args.inputs) {
    size_t eq = item.find('=');
    if (eq != std::string::npos) {
      std::string name = item.substr(0, eq), file = item.substr(eq + 1);
      set_array(model, name, edge_sparse::npy::load(file), file);
    } else if (ends_with(item, ".npz")) {
      for (const auto& kv : edge_sparse::npy::load_npz(item)) set_array(model, kv.first, kv.second, item + ":" + kv.first);
    } else if (ends_with(item, ".npy") && model.inputs().size() == 1) {
      set_array(model, model.inputs()[0].name, edge_sparse::npy::load(item), item);
    } else {
      throw Error("-i " + item + ": use NAME=FILE.npy, FILE.npz, or FILE.npy for a single-input model");
    }
  }
}

void write_outputs(const edge_sparse::Model& model, const std::string& path) {
  std::vector<std::pair<std::string, edge_sparse::npy::Array>> arrays;
  for (const auto& spec : model.outputs()) {
    edge_sparse::npy::Array a;
    a.dtype = spec.dtype;
    a.shape = spec.shape;
    const uint8_t* p = static_cast<const uint8_t*>(model.output_data(spec.name));
    a.data.assign(p, p + spec.bytes());
    arrays.emplace_back(spec.name, std::move(a));
  }
  if (ends_with(path, ".npy")) {
    if (arrays.size() != 1)
      throw Error("-o " + path + ": the model has " + std::to_string(arrays.size()) + " outputs; use an .npz path");
    edge_sparse::npy::save(path, arrays[0].second);
  } else if (ends_with(path, ".npz")) {
    edge_sparse::npy::save_npz(path, arrays);
  } else {
    throw Error("-o " + path + ": the output file must end in .npz or .npy");
  }
}

double percentile(const std::vector<double>& sorted, double q) {
  double pos = q * (sorted.size() - 1);
  size_t lo = static_cast<size_t>(pos);
  size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

std::string json_escape(const std::string& in) {
  std::string out;
  for (char c : in) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out;
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void print_info(const edge_sparse::Model& model) {
  const auto& rt = model.runtime_info();
  std::cout << "model: " << model.library_path() << "\n";
  for (const auto& t : model.inputs())
    std::cout << "  input  " << t.name << " " << t.dtype << " " << edge_sparse::detail::shape_str(t.shape) << "\n";
  for (const auto& t : model.outputs())
    std::cout << "  output " << t.name << " " << t.dtype << " " << edge_sparse::detail::shape_str(t.shape) << "\n";
  std::cout << "compiled with: apache-tvm " << rt.compiler_tvm << ", apache-tvm-ffi " << rt.compiler_ffi << "\n";
  std::cout << "runtime: tvm_ffi ABI " << rt.ffi_abi << "\n";
  for (const auto& kv : rt.libraries) std::cout << "  " << kv.first << ": " << kv.second << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Args args = parse_args(argc, argv);
    edge_sparse::Options options;
    options.verify = args.verify;
    options.check_runtime = args.runtime_check;
    options.threads = args.threads;
    double t0 = now_ms();
    edge_sparse::Model model(args.dir, options);
    double init_ms = now_ms() - t0;
    if (args.info) {
      print_info(model);
      return 0;
    }
    load_inputs(model, args);
    t0 = now_ms();
    model.run();
    double first_ms = now_ms() - t0;
    if (!args.output.empty()) write_outputs(model, args.output);
    if (args.bench > 0) {
      for (int k = 0; k < args.warmup; ++k) model.run();
      std::vector<double> ms;
      double start = now_ms();
      for (int k = 0; k < args.bench; ++k) {
        double s = now_ms();
        model.run();
        ms.push_back(now_ms() - s);
      }
      double total = now_ms() - start;
      std::vector<double> sorted = ms;
      std::sort(sorted.begin(), sorted.end());
      double mean = 0, var = 0;
      for (double v : ms) mean += v;
      mean /= ms.size();
      for (double v : ms) var += (v - mean) * (v - mean);
      double stdev = std::sqrt(var / ms.size());
      struct rusage ru;
      getrusage(RUSAGE_SELF, &ru);
      const char* env_threads = std::getenv("TVM_NUM_THREADS");
      std::printf("model           %s\n", model.library_path().c_str());
      std::printf("threads         %s\n", env_threads ? env_threads : "default (TVM_NUM_THREADS unset)");
      std::printf("init            %.3f ms\n", init_ms);
      std::printf("first inference %.3f ms\n", first_ms);
      std::printf("warm-up runs    %d\n", args.warmup);
      std::printf("count           %d\n", args.bench);
      std::printf("mean            %.3f ms\n", mean);
      std::printf("median          %.3f ms\n", percentile(sorted, 0.5));
      std::printf("min             %.3f ms\n", sorted.front());
      std::printf("max             %.3f ms\n", sorted.back());
      std::printf("std             %.3f ms\n", stdev);
      std::printf("p90             %.3f ms\n", percentile(sorted, 0.9));
      std::printf("p99             %.3f ms\n", percentile(sorted, 0.99));
      std::printf("throughput      %.2f inferences/s\n", 1000.0 * args.bench / total);
      std::printf("peak memory     %.1f MiB (max RSS)\n", ru.ru_maxrss / 1024.0);
      if (!args.json.empty()) {
        char buf[1024];
        std::snprintf(buf, sizeof(buf),
                      "{\"model\": \"%s\", \"threads\": %s, \"init_ms\": %.4f, \"first_ms\": %.4f, \"warmup\": %d, "
                      "\"count\": %d, \"mean_ms\": %.4f, \"median_ms\": %.4f, \"min_ms\": %.4f, \"max_ms\": %.4f, "
                      "\"std_ms\": %.4f, \"p90_ms\": %.4f, \"p99_ms\": %.4f, \"throughput_per_s\": %.3f, "
                      "\"peak_rss_mib\": %.2f}\n",
                      json_escape(model.directory()).c_str(), env_threads ? env_threads : "null", init_ms, first_ms, args.warmup,
                      args.bench, mean, percentile(sorted, 0.5), sorted.front(), sorted.back(), stdev,
                      percentile(sorted, 0.9), percentile(sorted, 0.99), 1000.0 * args.bench / total,
                      ru.ru_maxrss / 1024.0);
        std::vector<uint8_t> bytes(buf, buf + std::strlen(buf));
        edge_sparse::npy::write_file(args.json, bytes);
      }
    } else if (args.output.empty()) {
      std::printf("ran %s in %.3f ms (init %.3f ms); pass -o OUT.npz to keep the outputs\n",
                  model.library_path().c_str(), first_ms, init_ms);
    }
    return 0;
  } catch (const edge_sparse::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const tvm::ffi::Error& e) {
    std::cerr << "error: " << edge_sparse::detail::tvm_message(e) << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
