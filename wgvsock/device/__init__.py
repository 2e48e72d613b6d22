"""The device layer, as wireguard-go's device/tun/ipc: the engine joining the protocol core, a
TUN and a transport (device.py), the TUN, the UAPI socket, interface configuration (netconf)."""
