from typing import Any

def send_lane(
    buf: bytearray, tun_fd: int, sock_fd: int, key: Any, header: bytes, counter: int,
    counter_end: int, mtu: int, mtu_hint: int, max_packet: int, max_bytes: int,
    prefixes: bytes, /,
) -> tuple[int, int, int, int, bytes | None, bytes | None, int, int]: ...
def recv_lane(
    messages: list[Any], buf: bytearray, tun_fd: int, key: Any, local_index: int,
    ring: bytearray, last: int, mtu_hint: int, partial_csum: bool, prefixes: bytes, /,
) -> tuple[int, int, int, int, int, int]: ...
