"""`python -m tests.cluster` (make cluster): a control plane with kwok GPU nodes for a person."""

from __future__ import annotations

import argparse
import sys

from .binaries import MissingBinariesError
from .cluster import start_cluster
from .foreground import hold, stop_on_sigterm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    parser.add_argument("--gpu-nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=int, default=4)
    parser.add_argument("--cpu-nodes", type=int, default=1)
    args = parser.parse_args(argv)
    stop_on_sigterm()
    print("starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok ...", flush=True)
    try:
        cluster = start_cluster(args.gpu_nodes, args.gpus_per_node, args.cpu_nodes)
    except MissingBinariesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kubectl_dir = str(cluster.kubectl_binary).rsplit("/", 1)[0]
    hold(cluster, [
        f"cluster up in {cluster.startup_seconds:.1f}s; logs in {cluster.workdir / 'logs'}",
        f"GPU nodes: {', '.join(cluster.gpu_nodes)}; CPU nodes: {', '.join(cluster.cpu_nodes)}",
        "\nUse it from another shell:\n",
        f"  export PATH={kubectl_dir}:$PATH",
        f"  export KUBECONFIG={cluster.kubeconfig}; kubectl get nodes\n",
    ])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
