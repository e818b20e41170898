#!/usr/bin/python3
"""runc, minus what this VM cannot grant a container (the node's own runtime shim).

The VM's capability bounding set lacks CAP_SYS_RESOURCE, so inside a node container
runc cannot lower oom_score_adj (the kubelet asks -998 for every pod sandbox and
-997 for Guaranteed pods) nor hand that capability to privileged pods. This
rewrites the OCI bundle (create/run) or process file (exec): oomScoreAdj no lower
than this process's own, CAP_SYS_RESOURCE dropped. Then it execs the real runc.
"""

import json
import os
import sys

CAP = "CAP_SYS_RESOURCE"


def own_oom_score_adj() -> int:
    with open("/proc/self/oom_score_adj") as fh:
        return int(fh.read().strip())


def fix_process(process: dict) -> None:
    for caps in process.get("capabilities", {}).values():
        if isinstance(caps, list) and CAP in caps:
            caps.remove(CAP)
    adj = process.get("oomScoreAdj")
    if adj is not None and adj < own_oom_score_adj():
        process["oomScoreAdj"] = own_oom_score_adj()


def rewrite(path: str, is_process_file: bool) -> None:
    with open(path) as fh:
        doc = json.load(fh)
    fix_process(doc if is_process_file else doc.setdefault("process", {}))
    with open(path, "w") as fh:
        json.dump(doc, fh)


def option(args: list[str], names: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            return args[i + 1]
        for name in names:
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def main() -> None:
    args = sys.argv[1:]
    cmd = next((a for a in args if a in ("create", "run", "exec")), None)
    if cmd in ("create", "run"):
        cfg = os.path.join(option(args, ("--bundle", "-b")) or ".", "config.json")
        if os.path.exists(cfg):
            rewrite(cfg, False)
    elif cmd == "exec":
        process_file = option(args, ("--process", "-p"))
        if process_file:
            rewrite(process_file, True)
    os.execv("/usr/sbin/runc", ["runc", *args])


main()
