include_guard(GLOBAL)

# Warnings for compact's own tests, examples and benchmarks; never put these on the compact
# interface target, they would leak into users' builds. Eigen and doctest come in through imported
# targets, whose include directories are SYSTEM, so their own warnings do not trip -Werror.
function(compact_set_warnings target)
  if(MSVC)
    target_compile_options(${target} PRIVATE /W4 /permissive- $<$<BOOL:${COMPACT_WERROR}>:/WX>)
  else()
    target_compile_options(${target} PRIVATE
      -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion
      $<$<BOOL:${COMPACT_WERROR}>:-Werror>)
  endif()
endfunction()
