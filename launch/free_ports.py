"""Prints N free TCP ports, for local multi-worker jobs on 127.0.0.1 (launch/local.sh).

  python3 launch/free_ports.py N

The ports lie below the kernel's ephemeral range where the system has one (Linux): a port
the kernel hands out (bind to port 0) could go, before a worker binds it, to another
process or to a worker's own outgoing connection. Elsewhere the kernel chooses them.
Standard library only: the launcher runs it with any python3.
"""

import random
import re
import socket
import sys

LOWEST = 10_000
# The OS's randomness, not the random module's state: a program that seeds it (Keras's
# set_random_seed does) would otherwise draw the same ports in each of its processes,
# which then collide (two test workers did).
_RANDOM = random.SystemRandom()


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that bind on every interface now; RuntimeError if not
    found."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as file:
            ephemeral_start = int(file.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_start = 0
    if ephemeral_start - LOWEST >= 2 * count:
        span = range(LOWEST, ephemeral_start)
        candidates = _RANDOM.sample(span, min(len(span), 20 * count + 100))
    else:
        candidates = [0] * (20 * count + 100)  # the kernel chooses
    ports: list[int] = []
    for candidate in candidates:
        with socket.socket() as s:
            try:
                # All interfaces, as TensorFlow's gRPC server binds (0.0.0.0:PORT), so a
                # port another process holds on any address is skipped.
                s.bind(("", candidate))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"found {len(ports)} free ports of the {count} needed")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not re.fullmatch("[0-9]+", argv[0]) or int(argv[0]) < 1:
        print(f"free_ports.py: error: {' '.join(argv) or '(nothing)'}: pass the number of "
              "ports, an integer >= 1.", file=sys.stderr)
        return 2
    try:
        print(" ".join(map(str, free_ports(int(argv[0])))))
    except RuntimeError as error:
        print(f"free_ports.py: error: {error}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
