#!/bin/bash
# PID 1 of an e2e node container: network, containerd, kubelet, kube-proxy.
#
# The harness (e2e/cluster/nodes.py) mounts /etc/kdistill-node with node.env
# (NODE_NAME, NODE_IP, POD_CIDR, CLUSTER_CIDR, ROUTES), the kubelet and
# kube-proxy configs and kubeconfigs, and /var/log/kdistill for the logs.
set -euo pipefail
cfg=/etc/kdistill-node
logs=/var/log/kdistill
# shellcheck source=/dev/null
source "${cfg}/node.env"
mkdir -p "${logs}"
log() { printf '[node %s %(%H:%M:%S)T] %s\n' "${NODE_NAME}" -1 "$*" | tee -a "${logs}/node.log"; }

# Each node its own identity (the kubelet reports it as the system UUID).
[[ -s /etc/machine-id ]] || tr -d - < /proc/sys/kernel/random/uuid > /etc/machine-id

# Kubelet volume mounts must propagate into pod containers.
mount --make-rshared /

# The kubelet "fixes" these kernel settings when they differ. In a container
# they are the host's (the VM is shared), so it sees the values it wants in
# files bound over /proc/sys inside this container only.
mkdir -p /run/kdistill-sysctl
for kv in vm/overcommit_memory=1 kernel/panic=10 kernel/panic_on_oops=1 \
          kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do
  key="${kv%=*}" value="${kv#*=}"
  fake="/run/kdistill-sysctl/${key//\//_}"
  echo "${value}" > "${fake}"
  mount --bind "${fake}" "/proc/sys/${key}"
done

# Pod network: one bridge per node, host-gw routes to the other nodes' pod
# ranges, and masquerade only for traffic that leaves the pod network.
sysctl -qw net.ipv4.ip_forward=1
mkdir -p /etc/cni/net.d
cat > /etc/cni/net.d/10-kdistill.conflist <<CNI
{
  "cniVersion": "0.4.0",
  "name": "kdistill",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "${POD_CIDR}"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
CNI
iptables -t nat -C POSTROUTING -s "${POD_CIDR}" ! -d "${CLUSTER_CIDR}" -j MASQUERADE 2>/dev/null \
  || iptables -t nat -A POSTROUTING -s "${POD_CIDR}" ! -d "${CLUSTER_CIDR}" -j MASQUERADE
for route in ${ROUTES}; do
  ip route replace "${route%=*}" via "${route#*=}"
done

children=()
stop() {
  log "stopping"
  kill -TERM "${children[@]}" 2>/dev/null || true
  wait || true
  exit 0
}
trap stop TERM INT

containerd --config /etc/containerd/config.toml >>"${logs}/containerd.log" 2>&1 &
children+=($!)
for _ in $(seq 1 100); do
  ctr version >/dev/null 2>&1 && break
  sleep 0.2
done
ctr -n k8s.io images import --all-platforms /opt/kdistill/images/pause.tar >>"${logs}/node.log" 2>&1
log "containerd up; pause image imported"

kubelet --config="${cfg}/kubelet.yaml" --kubeconfig="${cfg}/kubelet.kubeconfig" \
  --hostname-override="${NODE_NAME}" --node-ip="${NODE_IP}" --v=1 >>"${logs}/kubelet.log" 2>&1 &
children+=($!)
kube-proxy --config="${cfg}/kube-proxy.yaml" --hostname-override="${NODE_NAME}" --v=1 \
  >>"${logs}/kube-proxy.log" 2>&1 &
children+=($!)
log "kubelet and kube-proxy started"

# Any component exiting takes the node down, as a failed node would be.
set +e
wait -n
code=$?
log "a node component exited with ${code}; stopping the node"
kill -TERM "${children[@]}" 2>/dev/null
wait
exit "${code}"
