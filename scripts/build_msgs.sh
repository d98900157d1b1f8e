#!/usr/bin/env bash
# Generates and installs the package's messages (msg/*.msg) into the virtual environment
# from the ROS 2 wheels on PyPI, for machines without a ROS 2 install. On a ROS 2 install,
# `colcon build` does this instead.
#
# Layout after it runs (prefix = the venv):
#   <venv>/lib/libtdnet_ros__*.so                    typesupport libraries (on the
#                                                    LD_LIBRARY_PATH the ROS wheels set)
#   <venv>/share/tdnet_ros/...                       interface files, CMake config
#   <venv>/lib/tdnet_ros_interfaces/tdnet_ros/msg    generated Python module; tdnet_ros.ros
#                                                    adds it to the tdnet_ros package path
#                                                    (kept out of site-packages so it cannot
#                                                    shadow the editable tdnet_ros package)
#
# Usage: scripts/build_msgs.sh [venv]   (default: .venv in the repository root)
# Skips the build when the installed messages are newer than msg/*.msg and CMakeLists.txt.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(cd "${1:-$repo/.venv}" && pwd)"
python="$venv/bin/python"
build="$repo/build/tdnet_ros_msgs"
stamp="$venv/lib/tdnet_ros_interfaces/.built"

"$python" -m pip install --quiet --disable-pip-version-check \
    -r "$repo/scripts/requirements-msgs.txt"

if [ -f "$stamp" ] && [ -z "$(find "$repo/msg" "$repo/CMakeLists.txt" "$repo/package.xml" -newer "$stamp" -print -quit)" ]; then
    echo "build_msgs: messages up to date ($stamp)"
    exit 0
fi

# The generators run Python scripts and find CMake packages in the venv's ROS prefix.
export AMENT_PREFIX_PATH="$venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$venv${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export PATH="$venv/bin:$PATH"

rm -rf "$build"
mkdir -p "$build"
cmake -S "$repo" -B "$build" \
    -DTDNET_MSGS_ONLY=ON \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$venv" \
    -DPYTHON_INSTALL_DIR="lib/tdnet_ros_interfaces" \
    -DPython3_EXECUTABLE="$python" \
    -DBUILD_TESTING=OFF \
    -Wno-dev > "$build.log" 2>&1 || { cat "$build.log"; exit 1; }
cmake --build "$build" -j "$(nproc)" >> "$build.log" 2>&1 || { tail -50 "$build.log"; exit 1; }
cmake --install "$build" >> "$build.log" 2>&1 || { tail -50 "$build.log"; exit 1; }
touch "$stamp"
echo "build_msgs: installed tdnet_ros messages into $venv"
