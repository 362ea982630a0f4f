# CUDA detection for eplb.
#
# EPLB_ENABLE_CUDA (default ON) builds the CUDA backend when check_language(CUDA) finds a working
# nvcc; EPLB_REQUIRE_CUDA turns "not found" into a configuration error. The host compiler comes
# from the CUDAHOSTCXX environment variable (CMake 3.25's check_language ignores
# -DCMAKE_CUDA_HOST_COMPILER), which build.sh sets to g++-11 for nvcc 11.x.
#
# Results: EPLB_WITH_CUDA (ON/OFF) and EPLB_CUDA_ARCHS_EFFECTIVE (the list handed to nvcc).

macro(eplb_configure_cuda)
  set(EPLB_WITH_CUDA OFF)
  set(EPLB_CUDA_ARCHS_EFFECTIVE "")
  if(EPLB_ENABLE_CUDA OR EPLB_REQUIRE_CUDA)
    include(CheckLanguage)
    # check_language caches a miss as CMAKE_CUDA_COMPILER-NOTFOUND and never looks again: forget a
    # miss so a toolkit installed after the first configure (or EPLB_REQUIRE_CUDA turned on) is found.
    if(DEFINED CMAKE_CUDA_COMPILER AND NOT CMAKE_CUDA_COMPILER)
      unset(CMAKE_CUDA_COMPILER CACHE)
    endif()
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      enable_language(CUDA)
      find_package(CUDAToolkit REQUIRED)
      set(EPLB_WITH_CUDA ON)
      set(EPLB_CUDA_ARCHS_EFFECTIVE ${EPLB_CUDA_ARCHS})
      # No code uses wgmma/TMA (sm_90a), so it is not compiled unless asked for: each extra arch is
      # one more full compile of every kernel. nvcc < 12 does not know it at all.
      if("90a" IN_LIST EPLB_CUDA_ARCHS_EFFECTIVE AND CMAKE_CUDA_COMPILER_VERSION VERSION_LESS 12.0)
        list(REMOVE_ITEM EPLB_CUDA_ARCHS_EFFECTIVE "90a")
        message(WARNING "eplb: nvcc ${CMAKE_CUDA_COMPILER_VERSION} cannot target sm_90a; dropped it")
      endif()
      set(CMAKE_CUDA_ARCHITECTURES ${EPLB_CUDA_ARCHS_EFFECTIVE})
      set(CMAKE_CUDA_STANDARD 17)
      set(CMAKE_CUDA_STANDARD_REQUIRED ON)
      # Static cudart: the library loads on a machine without a driver and reports "no device".
      set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
      message(STATUS "eplb: CUDA ${CMAKE_CUDA_COMPILER_VERSION} at ${CMAKE_CUDA_COMPILER}, host compiler ${CMAKE_CUDA_HOST_COMPILER}")
    elseif(EPLB_REQUIRE_CUDA)
      message(FATAL_ERROR "eplb: EPLB_REQUIRE_CUDA=ON but no usable nvcc was found. Install the CUDA toolkit "
                          "(Debian: nvidia-cuda-toolkit from contrib non-free) and set CUDAHOSTCXX=g++-11 for nvcc 11.x.")
    else()
      message(STATUS "eplb: no usable nvcc; building the CPU backend only")
    endif()
  endif()
endmacro()
