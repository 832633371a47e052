// Test-only entry points of core's safetensors reader (the weights tests and tests/fuzz/safetensors_fuzz), not
// part of core's public API: programs read files (mqa/core/safetensors.h), tests also feed images from memory.
// Include root core/testing (CMake target mqa_core_testing).
#ifndef MQA_CORE_TESTING_SAFETENSORS_H_
#define MQA_CORE_TESTING_SAFETENSORS_H_

#include <string>

#include "mqa/core/safetensors.h"
#include "mqa/core/status.h"

namespace mqa::core {

// Parses an in-memory image of a file with the checks of ReadSafetensors; messages start with "<what>: ".
StatusOr<SafetensorsFile> ParseSafetensors(const std::string& bytes, const std::string& what = "<memory>");

}  // namespace mqa::core

#endif  // MQA_CORE_TESTING_SAFETENSORS_H_
