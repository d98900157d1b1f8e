#!/usr/bin/env bash
# Creates (or updates) the virtual environment at .venv/ in the repository root and
# installs everything the package, its node and its tests need.
#
#   TDNET_TORCH   pip requirement for PyTorch (default: torch==2.13.0, the CPU wheel;
#                 on a CUDA machine use e.g. TDNET_TORCH="torch==2.13.0 --index-url <cuda index>")
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
torch_spec="${TDNET_TORCH:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

# shellcheck disable=SC2086  # torch_spec may carry pip options on purpose
"${pip[@]}" $torch_spec
"${pip[@]}" -r "$repo/requirements.txt"
"${pip[@]}" --no-deps --no-build-isolation -e "$repo"
# The package's ROS 2 messages (msg/*.msg), generated from the PyPI ROS wheels.
bash "$repo/scripts/build_msgs.sh" "$venv"
# The real launch and launch_ros (not on PyPI), for the launch-file tests: from the kit
# beside the repository where there is one (development machines and CI).
launch_kit="$repo/../shared/ros-launch"
if [ -f "$launch_kit/install.sh" ]; then
    bash "$launch_kit/install.sh" "$venv"
fi
