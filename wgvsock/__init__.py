"""wgvsock: WireGuard over vsock for AWS Nitro Enclaves."""

__version__ = "0.1.0"
