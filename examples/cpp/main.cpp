// Minimal app using edge_sparse.hpp: load a compiled model directory, set inputs by name, run, read outputs.
//
//   edge_sparse_example MODEL_DIR                       # deterministic inputs, prints a summary of each output
//   edge_sparse_example MODEL_DIR in.npz out.npz        # inputs from np.savez(...), outputs to an .npz
#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "edge_sparse.hpp"
#include "npy.hpp"  // only for the optional .npz files; the API itself needs just edge_sparse.hpp

int main(int argc, char** argv) {
  if (argc != 2 && argc != 4) {
    std::cerr << "usage: " << argv[0] << " MODEL_DIR [INPUTS.npz OUTPUTS.npz]\n";
    return 2;
  }
  try {
    edge_sparse::Model model(argv[1]);  // checks the model's sha256 and the TVM runtime versions

    if (argc == 4) {
      for (const auto& kv : edge_sparse::npy::load_npz(argv[2]))
        model.set_input(kv.first, kv.second.data.data(), kv.second.data.size());
    } else {
      for (const auto& in : model.inputs()) {
        if (in.dtype == "float32") {
          std::vector<float> x(in.elements());
          for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.1f * static_cast<float>(i));
          model.set_input(in.name, x);
        } else if (in.dtype == "int64") {
          model.set_input(in.name, std::vector<int64_t>(in.elements(), 1));
        } else {
          std::vector<uint8_t> zeros(in.bytes());
          model.set_input(in.name, zeros.data(), zeros.size());
        }
      }
    }

    model.run();

    std::vector<std::pair<std::string, edge_sparse::npy::Array>> results;
    for (const auto& out : model.outputs()) {
      std::printf("%s %s %s", out.name.c_str(), out.dtype.c_str(), edge_sparse::detail::shape_str(out.shape).c_str());
      if (out.dtype == "float32") {
        std::vector<float> y = model.output<float>(out.name);
        double sum = 0;
        for (float v : y) sum += v;
        std::printf(" sum=%.6g first=%.6g", sum, y.empty() ? 0.0 : y[0]);
      }
      std::printf("\n");
      edge_sparse::npy::Array a{out.dtype, out.shape, {}};
      const auto* p = static_cast<const uint8_t*>(model.output_data(out.name));
      a.data.assign(p, p + out.bytes());
      results.emplace_back(out.name, std::move(a));
    }
    if (argc == 4) edge_sparse::npy::save_npz(argv[3], results);

    // Errors are exceptions with one-line messages, e.g. a misspelt input name:
    try {
      model.set_input("no_such_input", nullptr, 0);
    } catch (const edge_sparse::Error& e) {
      std::printf("expected error: %s\n", e.what());
    }
    return 0;
  } catch (const edge_sparse::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
