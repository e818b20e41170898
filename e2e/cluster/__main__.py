"""`python -m e2e.cluster` (make e2e-cluster): a real multi-node cluster for a person."""

from __future__ import annotations

import argparse
import sys

from tests.cluster.binaries import MissingBinariesError
from tests.cluster.foreground import hold, stop_on_sigterm

from .cluster import start_cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    stop_on_sigterm()
    print(f"starting the control plane, CoreDNS and {args.nodes} node containers ...", flush=True)
    try:
        cluster = start_cluster(args.nodes)
    except MissingBinariesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kubectl_dir = cluster.kubectl_binary.rsplit("/", 1)[0]
    hold(cluster, [
        f"cluster up in {cluster.startup_seconds:.1f}s; logs in {cluster.workdir / 'logs'}",
        f"nodes: {', '.join(n.name for n in cluster.nodes)}",
        f"\n  export PATH={kubectl_dir}:$PATH",
        f"  export KUBECONFIG={cluster.kubeconfig}; kubectl get nodes -o wide\n",
        # One line to copy (or grep) as it is.
        f"KUBECONFIG={cluster.kubeconfig}",
    ])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
