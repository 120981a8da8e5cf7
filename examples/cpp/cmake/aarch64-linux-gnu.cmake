# Cross-compile for 64-bit ARM Linux (Raspberry Pi OS, Debian/Ubuntu arm64) with Debian's cross toolchain:
#   sudo apt-get install g++-aarch64-linux-gnu qemu-user
# Binaries run on the device, or here under qemu-aarch64 (ctest uses it as the emulator).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "cross toolchain prefix")
set(CMAKE_C_COMPILER "${CROSS_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${CROSS_PREFIX}g++")

set(CMAKE_SYSROOT_DIR "/usr/aarch64-linux-gnu" CACHE PATH "target libraries (Debian's cross sysroot)")
set(CMAKE_FIND_ROOT_PATH "${CMAKE_SYSROOT_DIR}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

set(CMAKE_CROSSCOMPILING_EMULATOR "qemu-aarch64;-L;${CMAKE_SYSROOT_DIR}")
