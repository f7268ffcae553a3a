# Configures, builds and runs one packaging consumer in a fresh build directory.
#
#   cmake -DCONSUMER_SOURCE_DIR=<tests/package/mode> -DCONSUMER_BINARY_DIR=<fresh dir>
#         -DCONSUMER_GENERATOR=<generator> [-DCONSUMER_GENERATOR_PLATFORM=...]
#         [-DCONSUMER_GENERATOR_TOOLSET=...] [-DCONSUMER_MAKE_PROGRAM=...]
#         [-DCONSUMER_CXX_COMPILER=...] [-DCONSUMER_CXX_FLAGS=...] [-DCONSUMER_EXE_LINKER_FLAGS=...]
#         [-DCONSUMER_BUILD_TYPE=...] [-DCONSUMER_PREFIX_PATH=<parent's CMAKE_PREFIX_PATH>]
#         [-DCONSUMER_EIGEN3_DIR=...]
#         (-DCOMPACT_PACKAGE_PREFIX=<install prefix> | -DCOMPACT_SOURCE_DIR=<source tree>)
#         -P run_consumer.cmake
#
# Any failing step stops with its output.
cmake_minimum_required(VERSION 3.21)

foreach(required IN ITEMS CONSUMER_SOURCE_DIR CONSUMER_BINARY_DIR CONSUMER_GENERATOR)
  if(NOT ${required})
    message(FATAL_ERROR "run_consumer.cmake: ${required} is not set")
  endif()
endforeach()

function(run_step what)
  execute_process(COMMAND ${ARGN}
    RESULT_VARIABLE result
    OUTPUT_VARIABLE output
    ERROR_VARIABLE output)
  if(NOT result EQUAL 0)
    string(REPLACE ";" " " command_line "${ARGN}")
    message(FATAL_ERROR "${what} failed (${result}):\n  ${command_line}\n${output}")
  endif()
  message(STATUS "${what}: ok")
  set(step_output "${output}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${CONSUMER_BINARY_DIR}")
file(MAKE_DIRECTORY "${CONSUMER_BINARY_DIR}")

set(configure_args -S "${CONSUMER_SOURCE_DIR}" -B "${CONSUMER_BINARY_DIR}" -G "${CONSUMER_GENERATOR}")
if(CONSUMER_GENERATOR_PLATFORM)
  list(APPEND configure_args -A "${CONSUMER_GENERATOR_PLATFORM}")
endif()
if(CONSUMER_GENERATOR_TOOLSET)
  list(APPEND configure_args -T "${CONSUMER_GENERATOR_TOOLSET}")
endif()
foreach(pair IN ITEMS
    CMAKE_MAKE_PROGRAM:CONSUMER_MAKE_PROGRAM
    CMAKE_CXX_COMPILER:CONSUMER_CXX_COMPILER
    CMAKE_BUILD_TYPE:CONSUMER_BUILD_TYPE
    Eigen3_DIR:CONSUMER_EIGEN3_DIR
    COMPACT_SOURCE_DIR:COMPACT_SOURCE_DIR)
  string(REPLACE ":" ";" pair "${pair}")
  list(GET pair 0 cache_var)
  list(GET pair 1 input_var)
  if(${input_var})
    list(APPEND configure_args "-D${cache_var}=${${input_var}}")
  endif()
endforeach()
set(prefix_path "${CONSUMER_PREFIX_PATH}")
if(COMPACT_PACKAGE_PREFIX)
  list(APPEND configure_args "-DCOMPACT_EXPECTED_PREFIX=${COMPACT_PACKAGE_PREFIX}")
  list(PREPEND prefix_path "${COMPACT_PACKAGE_PREFIX}")
endif()

# Flags and the prefix path may hold spaces or ';', so they go as separate quoted arguments.
run_step("configure ${CONSUMER_SOURCE_DIR}"
  "${CMAKE_COMMAND}" ${configure_args}
  "-DCMAKE_CXX_FLAGS=${CONSUMER_CXX_FLAGS}"
  "-DCMAKE_EXE_LINKER_FLAGS=${CONSUMER_EXE_LINKER_FLAGS}"
  "-DCMAKE_PREFIX_PATH=${prefix_path}"
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)

set(build_args --build "${CONSUMER_BINARY_DIR}")
if(CONSUMER_BUILD_TYPE)
  list(APPEND build_args --config "${CONSUMER_BUILD_TYPE}")
endif()
run_step("build" "${CMAKE_COMMAND}" ${build_args})

set(path_file "${CONSUMER_BINARY_DIR}/consumer-${CONSUMER_BUILD_TYPE}.path")
if(NOT EXISTS "${path_file}")
  message(FATAL_ERROR "The consumer project did not write ${path_file}")
endif()
file(READ "${path_file}" consumer_exe)
run_step("run ${consumer_exe}" "${consumer_exe}")
message(STATUS "consumer output: ${step_output}")
