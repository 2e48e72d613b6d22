"""The parent and enclave roles: what `wgvsock parent up` and `wgvsock enclave up` do."""
