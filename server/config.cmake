# mqa_server_config: configuration loading (config.h) and structured logging (logging.h) for the server.
# Included from server/CMakeLists.txt. Torch-free: mqa_core links torch PRIVATE, so only core's std-only public
# headers and its parse/validate functions reach this target (spdlog/fmt and torch never meet in one TU).
find_package(yaml-cpp REQUIRED)
find_package(spdlog REQUIRED)
find_package(fmt REQUIRED)

add_library(mqa_server_config STATIC
  ${CMAKE_CURRENT_LIST_DIR}/config.cc
  ${CMAKE_CURRENT_LIST_DIR}/logging.cc)
target_include_directories(mqa_server_config PUBLIC $<BUILD_INTERFACE:${CMAKE_CURRENT_LIST_DIR}>)
# spdlog is PUBLIC: logging.h names spdlog's level and sink types.
target_link_libraries(mqa_server_config
  PUBLIC mqa_core spdlog::spdlog fmt::fmt
  PRIVATE yaml-cpp mqa_warnings)
