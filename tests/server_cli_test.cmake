# mqa-server's command line as a process: the exit status and output of --version and --help-markdown, and of
# malformed settings (exit 2 and a message naming the flag or variable, never an uncaught exception).
#   cmake -DSERVER=<mqa-server> -DVERSION=<project version> -DSOURCE_DIR=<tree> -P server_cli_test.cmake
cmake_minimum_required(VERSION 3.22)

set(failures 0)

# Runs mqa-server with ARGS (and ENV NAME=VALUE...), expects exit status RC and output matching REGEX.
function(expect_run)
  cmake_parse_arguments(RUN "" "RC;STDOUT;STDERR" "ARGS;ENV" ${ARGN})
  execute_process(COMMAND ${CMAKE_COMMAND} -E env ${RUN_ENV} "${SERVER}" ${RUN_ARGS}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
  set(what "mqa-server ${RUN_ARGS} (env: ${RUN_ENV})")
  if(NOT rc STREQUAL RUN_RC)
    message(SEND_ERROR "${what}: exit status ${rc}, expected ${RUN_RC}\nstdout: ${out}\nstderr: ${err}")
  endif()
  if(DEFINED RUN_STDOUT AND NOT out MATCHES "${RUN_STDOUT}")
    message(SEND_ERROR "${what}: stdout does not match '${RUN_STDOUT}':\n${out}")
  endif()
  if(DEFINED RUN_STDERR AND NOT err MATCHES "${RUN_STDERR}")
    message(SEND_ERROR "${what}: stderr does not match '${RUN_STDERR}':\n${err}")
  endif()
  if(err MATCHES "terminate called|what\\(\\)")
    message(SEND_ERROR "${what}: an uncaught exception")
  endif()
endfunction()

string(REPLACE "." "\\." version_re "${VERSION}")
expect_run(ARGS --version RC 0 STDOUT "^mqa-server ${version_re}\n$")
expect_run(ARGS --help RC 0 STDOUT "Usage: mqa-server.*--version")
expect_run(ARGS --max-sessions 1e99 RC 2 STDERR "--max-sessions: expected an integer >= 1, got '1e99'")
expect_run(ARGS --port abc RC 2 STDERR "unknown flag '--port'")
expect_run(ARGS --listen 0.0.0.0:abc RC 2 STDERR "--listen: expected host:port")
expect_run(ARGS --kv-gpu-memory-fraction=1e999 RC 2
           STDERR "--kv-gpu-memory-fraction: expected a finite number, got '1e999'")
expect_run(ENV MQA_MAX_QUEUE=garbage RC 2 STDERR "MQA_MAX_QUEUE: expected an integer >= 1, got 'garbage'")
expect_run(ENV MQA_DRAIN_TIMEOUT_MS=99999999999999999999 RC 2 STDERR "MQA_DRAIN_TIMEOUT_MS: expected an integer")

# --help-markdown is the settings section of docs/operations.md.
execute_process(COMMAND "${SERVER}" --help-markdown RESULT_VARIABLE rc OUTPUT_VARIABLE markdown)
file(READ "${SOURCE_DIR}/docs/operations.md" doc)
string(FIND "${doc}" "<!-- settings:begin" begin)
string(FIND "${doc}" "<!-- settings:end -->" end)
if(NOT rc EQUAL 0 OR begin EQUAL -1 OR end EQUAL -1)
  message(SEND_ERROR "--help-markdown: exit status ${rc}, or docs/operations.md lacks the settings markers")
else()
  string(SUBSTRING "${doc}" ${begin} -1 rest)
  string(FIND "${rest}" "\n" newline)
  math(EXPR body "${begin} + ${newline} + 1")
  math(EXPR length "${end} - ${body}")
  string(SUBSTRING "${doc}" ${body} ${length} section)
  if(NOT section STREQUAL markdown)
    message(SEND_ERROR "docs/operations.md's settings section is not `mqa-server --help-markdown`")
  endif()
endif()
