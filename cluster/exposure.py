"""Is an API reachable beyond this machine? Asked of the config (names resolved) and of the
running sockets (the real bind), because keys are required exactly when it is.

A config check alone trusts what a host string says: ``localhost`` may resolve elsewhere, a
host name may be this machine's LAN address, and the Ray dashboard (the Jobs API: code
execution) has its own bind address. So ``ragtune up`` checks both before it serves: every
address a host resolves to must be loopback, and after binding, nothing may answer on the
machine's non-loopback interface addresses.
"""

from __future__ import annotations

import ipaddress
import socket

import psutil

__all__ = ["reachable_beyond_loopback", "resolves_to_loopback"]


def resolves_to_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address (unresolvable → False)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0].split("%")[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def reachable_beyond_loopback(port: int, timeout_s: float = 0.3) -> list[str]:
    """This machine's non-loopback interface addresses on which something accepts ``port``."""
    reachable = []
    for addresses in psutil.net_if_addrs().values():
        for addr in addresses:
            if addr.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = addr.address.split("%")[0]
            parsed = ipaddress.ip_address(ip)
            if parsed.is_loopback or parsed.is_link_local:
                continue
            with socket.socket(addr.family, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout_s)
                if sock.connect_ex((ip, port)) == 0:
                    reachable.append(ip)
    return reachable
