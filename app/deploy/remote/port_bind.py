"""Can the vLLM port be bound on the host? For hosts without ``ss``.

argv: address, port. Prints ``port_bind_free=yes`` or ``port_bind_free=no``.
"""

from __future__ import annotations

import socket
import sys


def main(address: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            print("port_bind_free=no")
        else:
            print("port_bind_free=yes")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
