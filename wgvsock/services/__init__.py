"""The parent's services, and what both roles read: profiles, the control channel, the
nftables firewall, AWS and nitro-cli, egress by host name, metrics."""
