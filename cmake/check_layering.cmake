# Checks that compact's headers include one another only downwards in the folder order that
# include/compact/core.hpp documents: a header under include/compact/<folder>/ may include headers of
# its own folder and of the folders before it, never of a later one; backend/cpu and backend/cuda never
# include each other; nothing outside backend/cuda includes CUDA headers and nothing outside
# backend/cpu includes Eigen; a file under a detail/ folder is included only from its own component.
# The umbrellas (compact.hpp, core.hpp, cuda.cuh) are exempt.
#
#   cmake -DCOMPACT_INCLUDE_DIR=<repo>/include -P cmake/check_layering.cmake
cmake_minimum_required(VERSION 3.21)

if(NOT COMPACT_INCLUDE_DIR)
  message(FATAL_ERROR "check_layering: set COMPACT_INCLUDE_DIR")
endif()

set(order core random backend compress optim nn io)

function(compact_component path out_folder out_component)
  string(REGEX MATCH "^compact/([a-z_]+)/" _ "${path}")
  set(folder "${CMAKE_MATCH_1}")
  set(component "${folder}")
  if(path MATCHES "^compact/backend/(cpu|cuda)/")
    set(component "backend/${CMAKE_MATCH_1}")
  endif()
  set(${out_folder} "${folder}" PARENT_SCOPE)
  set(${out_component} "${component}" PARENT_SCOPE)
endfunction()

file(GLOB_RECURSE headers RELATIVE "${COMPACT_INCLUDE_DIR}" "${COMPACT_INCLUDE_DIR}/compact/*.hpp"
     "${COMPACT_INCLUDE_DIR}/compact/*.cuh")
list(SORT headers)
set(violations "")
set(checked 0)
foreach(header IN LISTS headers)
  if(header MATCHES "^compact/[a-z_]+\\.(hpp|cuh)$")
    continue() # umbrellas
  endif()
  compact_component("${header}" folder component)
  list(FIND order "${folder}" rank)
  if(rank EQUAL -1)
    list(APPEND violations "${header}: folder '${folder}' is not in the documented order (${order})")
    continue()
  endif()
  math(EXPR checked "${checked} + 1")
  file(STRINGS "${COMPACT_INCLUDE_DIR}/${header}" lines REGEX "^#include")
  foreach(line IN LISTS lines)
    if(line MATCHES "^#include [<\"](compact/[^>\"]+)[>\"]")
      set(target "${CMAKE_MATCH_1}")
      if(target MATCHES "^compact/[a-z_]+\\.(hpp|cuh)$")
        list(APPEND violations "${header}: includes the umbrella ${target}")
        continue()
      endif()
      compact_component("${target}" target_folder target_component)
      list(FIND order "${target_folder}" target_rank)
      if(target_rank GREATER rank)
        list(APPEND violations "${header} (${folder}) includes ${target} (${target_folder}), a later folder")
      endif()
      if(component MATCHES "^backend/" AND target_component MATCHES "^backend/(cpu|cuda)$"
         AND NOT component STREQUAL target_component)
        list(APPEND violations "${header} includes ${target} of another backend")
      endif()
      if(target MATCHES "/detail/" AND NOT component STREQUAL target_component)
        list(APPEND violations "${header} includes ${target}, internal to ${target_component}")
      endif()
    elseif(line MATCHES "^#include <(Eigen/|unsupported/Eigen)")
      if(NOT component STREQUAL "backend/cpu")
        list(APPEND violations "${header} includes Eigen outside backend/cpu")
      endif()
    elseif(line MATCHES "^#include <(cuda|cublas|cub/|thrust/|nccl)")
      if(NOT component STREQUAL "backend/cuda")
        list(APPEND violations "${header} includes a CUDA header outside backend/cuda")
      endif()
    endif()
  endforeach()
endforeach()

if(violations)
  list(JOIN violations "\n  " text)
  message(FATAL_ERROR "check_layering: include order violated:\n  ${text}")
endif()
message(STATUS "check_layering: ${checked} headers include only downwards (${order})")
