# Compiler flags for project targets. Applied through the tresor_flags interface target so that
# third-party code (GoogleTest, Boost headers) is not built with -Werror.
add_library(tresor_flags INTERFACE)

target_compile_options(tresor_flags INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wshadow -Wconversion -Wsign-conversion
    -Wnon-virtual-dtor -Wold-style-cast -Wcast-align -Woverloaded-virtual
    -Wimplicit-fallthrough -Wformat=2>
  $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<BOOL:${TRESOR_WERROR}>>:-Werror>)

# Floating point as written: the compiler forms no fused multiply-add (GCC's C++ default is
# -ffp-contract=fast, which contracts wherever -march offers FMA). The CPU references, the
# kernels' CPU emulation and the GPU kernels (tresor/rn.h) round every operation alike, and the
# tests compare them bit for bit.
target_compile_options(tresor_flags INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-ffp-contract=off>)

# Unity builds (the sanitizer presets, CMakePresets.json) compile several sources as one: GCC then
# takes the anonymous-namespace types of a source that is no longer the main file for ones with
# internal linkage used in classes with external linkage (-Wsubobject-linkage) — true only of
# the combined file, where every one of those classes is still private to its source.
if(CMAKE_UNITY_BUILD AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  target_compile_options(tresor_flags INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-Wno-subobject-linkage>)
endif()

# Hardening for everything: the tools hold keys and the runner/agent run privileged.
target_compile_options(tresor_flags INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-fstack-protector-strong -fstack-clash-protection -fcf-protection>)
if(NOT TRESOR_SANITIZE AND NOT TRESOR_TSAN)
  target_compile_definitions(tresor_flags INTERFACE
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<NOT:$<CONFIG:Debug>>>:_FORTIFY_SOURCE=2>)
endif()
target_compile_definitions(tresor_flags INTERFACE $<$<CONFIG:Debug>:_GLIBCXX_ASSERTIONS>)
target_link_options(tresor_flags INTERFACE -Wl,-z,relro -Wl,-z,now -Wl,-z,noexecstack)

if(TRESOR_SANITIZE)
  target_compile_options(tresor_flags INTERFACE
    $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer>)
  target_link_options(tresor_flags INTERFACE -fsanitize=address,undefined)
endif()

if(TRESOR_TSAN)
  # -Wno-tsan: Boost.Asio (the broker's server and client) uses std::atomic_thread_fence, which
  # GCC 12 warns TSan does not model. The fences are Asio's own, around its handler memory
  # recycling; Tresor's code has none, and any race they hid would still show in our data.
  target_compile_options(tresor_flags INTERFACE
    $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=thread -fno-omit-frame-pointer -Wno-tsan>)
  target_link_options(tresor_flags INTERFACE -fsanitize=thread)
endif()

# Clang 16 implements conditionally trivial special members (P0848) but still reports
# __cpp_concepts 201907, so libstdc++ 12 hides <expected>. Announce the level it supports.
if(CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
  target_compile_options(tresor_flags INTERFACE
    $<$<COMPILE_LANGUAGE:CXX>:-Wno-builtin-macro-redefined -U__cpp_concepts -D__cpp_concepts=202002L>)
endif()

# TRESOR_FUZZ: the libFuzzer targets (core/fuzz) in the sanitizer build (the debug preset), so
# one build serves the ASan+UBSan tests and the fuzzers. Only the code the targets parse with is
# instrumented for coverage (core/CMakeLists.txt); test programs and the numeric kernels are not.
if(TRESOR_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "TRESOR_FUZZ needs clang (the 'debug' preset uses clang-16)")
  endif()
  if(NOT TRESOR_SANITIZE)
    message(FATAL_ERROR "TRESOR_FUZZ runs its targets under ASan+UBSan: set TRESOR_SANITIZE=ON as well (the 'debug' preset does)")
  endif()
endif()
