"""Console script `segmenter_node`: answers SIGINT/SIGTERM from its first moment to its exit.

This module imports nothing heavy: the stop handlers are in place before rclpy, numpy or
torch are imported, so a signal during start-up (imports, model loading, warm-up) ends the
process with exit code 0 instead of a KeyboardInterrupt traceback or a lost signal.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

#: Seconds a stop request may take. A step that cannot be interrupted (a model load, a
#: torch.compile of one sub-network) does not hold the process longer: it exits with 0.
STOP_DEADLINE_S = 1.5


def install_stop_handlers() -> threading.Event:
    """SIGINT and SIGTERM set the returned event; the process exits 0 at the latest
    STOP_DEADLINE_S after the first one (a second signal changes nothing)."""
    stop = threading.Event()

    def deadline() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def request_stop(signum: int, frame: object) -> None:
        if not stop.is_set():
            stop.set()
            timer = threading.Timer(STOP_DEADLINE_S, deadline)
            timer.daemon = True
            timer.start()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop


def main(args: list[str] | None = None) -> int:
    stop = install_stop_handlers()
    from tdnet_ros.ros.node import run  # rclpy, numpy; torch when the model loads

    code = run(args, stop)
    # The node is shut down. Python's own finalization would now put back the default
    # SIGINT action (a second Ctrl-C while DDS and torch tear down would end the process
    # with -2) and can take seconds: leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
