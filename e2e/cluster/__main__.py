"""`python -m e2e.cluster` (make e2e-cluster): a real multi-node cluster for a person."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from .cluster import start_cluster


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    print(f"starting the control plane, CoreDNS and {args.nodes} node containers ...", flush=True)
    cluster = start_cluster(args.nodes)
    with cluster:
        kubectl_dir = cluster.kubectl_binary.rsplit("/", 1)[0]
        print(f"cluster up in {cluster.startup_seconds:.1f}s; logs in {cluster.workdir / 'logs'}")
        print(f"nodes: {', '.join(n.name for n in cluster.nodes)}")
        print(f"\n  export PATH={kubectl_dir}:$PATH")
        print(f"  export KUBECONFIG={cluster.kubeconfig}; kubectl get nodes -o wide\n")
        print(f"KUBECONFIG={cluster.kubeconfig}")
        print("Ctrl-C stops it and removes the nodes and its data.", flush=True)
        try:
            while True:
                cluster.check_alive()
                time.sleep(2)
        except KeyboardInterrupt:
            print("\nstopping ...", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
