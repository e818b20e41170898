# A Kubernetes node as a container, for the e2e cluster (scripts/e2e-cluster.sh).
# kind's node image would need images from registries that cannot be reached
# here, so this one is assembled from local parts: the Debian base that
# scripts/build-base-image.sh debootstraps, Debian's containerd/runc/CNI plugins,
# and the kubelet/kube-proxy that scripts/cluster-bins.sh builds from Go modules.
# No systemd: the entrypoint starts containerd, kubelet and kube-proxy and exits
# when any of them does, so a stopped or crashed node is plainly NotReady.
#
# Build context (assembled by scripts/e2e-images.sh): this file, e2e/node/*,
# kubelet, kube-proxy, and pause.tar (docker/pause, saved with `docker save`).
ARG BASE_IMAGE=kdistill/python:3.11-bookworm
FROM ${BASE_IMAGE}

RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      containerd runc containernetworking-plugins iptables conntrack iproute2 \
      ethtool socat ebtables kmod procps util-linux mount ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/*

COPY kubelet kube-proxy /usr/local/bin/
COPY containerd.toml /etc/containerd/config.toml
COPY entrypoint.sh /usr/local/bin/kdistill-node
COPY runc-shim.py /usr/local/sbin/runc-kdistill
COPY pause.tar /opt/kdistill/images/pause.tar

# containerd's overlayfs snapshotter cannot sit on the container's own overlay
# root: the harness mounts a volume here.
VOLUME /var/lib/containerd
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/kdistill-node"]
