"""Egress by host name (issue 14, part 1): name rules and the parent's DNS forwarder.

:mod:`.names` is pure (the profile and the enclave use it); :mod:`.forwarder` is the parent's
DNS forwarder, which needs dnspython and nft.
"""
