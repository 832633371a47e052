// CUDA graphs in a build without CUDA: there are none.
#include "paged/decode_graphs.h"

namespace mqa::core {

std::unique_ptr<DecodeGraphs> NewDecodeGraphs() { return nullptr; }

}  // namespace mqa::core
