"""`python -m tests.cluster` (make cluster): a control plane with kwok GPU nodes for a person."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from .binaries import MissingBinariesError
from .cluster import start_cluster


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    parser.add_argument("--gpu-nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=int, default=4)
    parser.add_argument("--cpu-nodes", type=int, default=1)
    args = parser.parse_args(argv)
    # SIGTERM (e.g. from `timeout` or a CI runner) tears down like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    print("starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok ...", flush=True)
    try:
        cluster = start_cluster(args.gpu_nodes, args.gpus_per_node, args.cpu_nodes)
    except MissingBinariesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with cluster:
        print(f"cluster up in {cluster.startup_seconds:.1f}s; logs in {cluster.workdir / 'logs'}")
        print(f"GPU nodes: {', '.join(cluster.gpu_nodes)}; CPU nodes: {', '.join(cluster.cpu_nodes)}")
        kubectl_dir = str(cluster.kubectl_binary).rsplit("/", 1)[0]
        print("\nUse it from another shell:\n")
        print(f"  export PATH={kubectl_dir}:$PATH")
        print(f"  export KUBECONFIG={cluster.kubeconfig}; kubectl get nodes\n")
        print("Ctrl-C stops it and removes its data.", flush=True)
        try:
            while True:
                cluster.check_alive()
                time.sleep(2)
        except KeyboardInterrupt:
            print("\nstopping ...", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
