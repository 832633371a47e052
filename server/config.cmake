# mqa_server_config: configuration loading (config.h, settings.h) and structured logging (logging.h) for the server.
# Included from server/CMakeLists.txt. Torch-free: mqa_core links torch PRIVATE, so only core's std-only public
# headers and its parse/validate functions reach this target (spdlog/fmt and torch never meet in one TU).
find_package(yaml-cpp REQUIRED)
find_package(spdlog REQUIRED)
find_package(fmt REQUIRED)

# The settings table (settings*.cc) drives the flags, the environment, the file's top-level keys and the help;
# config_parse.cc reads the sources, config_file.cc the file, config_devices.cc resolves the devices.
add_library(mqa_server_config STATIC
  ${CMAKE_CURRENT_LIST_DIR}/settings.cc
  ${CMAKE_CURRENT_LIST_DIR}/settings_help.cc
  ${CMAKE_CURRENT_LIST_DIR}/settings_values.cc
  ${CMAKE_CURRENT_LIST_DIR}/config.cc
  ${CMAKE_CURRENT_LIST_DIR}/config_parse.cc
  ${CMAKE_CURRENT_LIST_DIR}/config_file.cc
  ${CMAKE_CURRENT_LIST_DIR}/config_devices.cc
  ${CMAKE_CURRENT_LIST_DIR}/logging.cc)
target_include_directories(mqa_server_config PUBLIC $<BUILD_INTERFACE:${CMAKE_CURRENT_LIST_DIR}>)
# spdlog is PUBLIC: logging.h names spdlog's level and sink types.
target_link_libraries(mqa_server_config
  PUBLIC mqa_core spdlog::spdlog fmt::fmt
  PRIVATE yaml-cpp mqa_version mqa_warnings)
