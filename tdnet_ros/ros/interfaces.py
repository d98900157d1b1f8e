"""Access to the package's generated ROS 2 messages (``tdnet_ros.msg``).

On a ROS 2 install, ``colcon build`` installs the generated ``tdnet_ros/msg`` module next
to the Python package, and ``import tdnet_ros.msg`` just works. Without a ROS install,
``scripts/build_msgs.sh`` generates the messages into ``<venv>/lib/tdnet_ros_interfaces``
(outside site-packages, where a second ``tdnet_ros`` directory would shadow the editable
package); :func:`load_messages` adds that directory to the ``tdnet_ros`` package path.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

#: Where scripts/build_msgs.sh installs the generated Python module, relative to the venv.
GENERATED_SUBDIR = Path("lib") / "tdnet_ros_interfaces" / "tdnet_ros"


class MessagesNotBuiltError(ImportError):
    """The generated ``tdnet_ros.msg`` module is missing (messages not built)."""


def _candidate_dirs() -> list[Path]:
    dirs = []
    override = os.environ.get("TDNET_ROS_INTERFACES")
    if override:
        dirs.append(Path(override) / "tdnet_ros")
    dirs.append(Path(sys.prefix) / GENERATED_SUBDIR)
    return dirs


def load_messages() -> ModuleType:
    """Import and return ``tdnet_ros.msg``, extending the package path if needed.

    Raises:
        MessagesNotBuiltError: the messages were never generated; the message says how.
    """
    try:
        return importlib.import_module("tdnet_ros.msg")
    except ImportError:
        pass
    import tdnet_ros

    for directory in _candidate_dirs():
        if (directory / "msg" / "__init__.py").is_file():
            if str(directory) not in tdnet_ros.__path__:
                tdnet_ros.__path__.append(str(directory))
            return importlib.import_module("tdnet_ros.msg")
    searched = ", ".join(str(d) for d in _candidate_dirs())
    raise MessagesNotBuiltError(
        "tdnet_ros messages (tdnet_ros.msg) are not built: run `bash scripts/build_msgs.sh` "
        f"(or `colcon build` on a ROS 2 install). Searched: {searched}"
    )
