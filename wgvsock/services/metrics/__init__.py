"""The parent's numbers: its own counters (firewall, DNS forwarder) and their way out.

- :mod:`.counters` reads the counters the device does not hold (nftables, the DNS forwarder)
  and turns them into the read-only ``wgvsock_*`` UAPI keys that `wgvsock status` shows;
  it needs nothing beyond the standard library.
- :mod:`.prometheus` serves all of it, with the device's per-peer numbers, as Prometheus text.
- :mod:`.cloudwatch` sends the same metrics to CloudWatch with boto3.

Only the parent imports the last two, so the enclave image needs neither prometheus_client nor
boto3.
"""
