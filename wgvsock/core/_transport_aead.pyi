class TransportKey:
    def __init__(self, key: bytes) -> None: ...
    def seal(
        self,
        header: bytes,
        counter: int,
        packet: bytes | bytearray | memoryview,
        pad: int,
        tail: bytes | bytearray | memoryview = ...,
        /,
    ) -> bytes: ...
    def open(self, message: bytes | bytearray | memoryview, /) -> bytes | None: ...
