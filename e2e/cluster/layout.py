"""Addresses and ranges of the e2e cluster: one place names them all."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tests.cluster import controlplane

NETWORK = "kdistill-e2e"
SUBNET = "172.29.0.0/24"
GATEWAY = "172.29.0.1"  # the host's address on NETWORK: API server and CoreDNS listen here
SERVICE_CIDR = controlplane.SERVICE_CIDR  # the control plane's; 10.0.0.1 (kubernetes) is in its certificate
CLUSTER_CIDR = "10.244.0.0/16"  # pod addresses; node i gets 10.244.i.0/24
DNS_DOMAIN = "cluster.local"
LABEL = "io.kdistill.e2e"  # docker label on everything the harness creates
NODE_PREFIX = "kdistill-e2e-node"


@dataclass(frozen=True)
class NodeAddr:
    index: int

    @property
    def name(self) -> str:
        return f"{NODE_PREFIX}{self.index}"

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_network(SUBNET)[10 + self.index])

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"


def nodes(count: int) -> list[NodeAddr]:
    if not 1 <= count <= 20:
        raise ValueError(f"node count must be between 1 and 20, got {count}")
    return [NodeAddr(i) for i in range(1, count + 1)]
