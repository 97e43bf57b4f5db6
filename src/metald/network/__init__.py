"""Host and per-VM networking (the topology is in vm.py); the entry point is
:class:`metald.network.manager.NetworkManager`.

names (device names, MACs) · ipam, portfwd, allocation (store claims) ·
netns (namespaces, pool threads) · host (bridge, sysctls, tables) · rules, nft
(nftables text and runs) · vm (per-VM devices) · steps (per-VM plan steps) · tc (rate limits) · reaper,
batch (batched kernel work) · guest (the ``ip=`` argument).
"""
