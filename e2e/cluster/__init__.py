"""A local multi-node cluster: the control plane on the host, nodes as containers.

Each node is a container (docker/node.Dockerfile) running containerd, a real
kubelet and kube-proxy. The control plane and CoreDNS run on the host, bound to
the gateway of a private docker network that the nodes share.
"""
