"""Every fuzz target by name, in the order `make fuzz` prints them."""

from __future__ import annotations

from .harness import Target


def all_targets() -> dict[str, type[Target]]:
    from .control import ControlEnclaveTarget, ControlParentTarget
    from .core import CoreTarget
    from .dns import DnsForwarderTarget
    from .framing import FramingTarget
    from .profile import ProfileTarget
    from .uapi import UAPIGetTarget, UAPIServerTarget, UAPISetTarget

    classes: list[type[Target]] = [
        CoreTarget, FramingTarget, UAPIServerTarget, UAPISetTarget, UAPIGetTarget,
        ControlParentTarget, ControlEnclaveTarget, ProfileTarget, DnsForwarderTarget,
    ]
    return {cls.name: cls for cls in classes}
