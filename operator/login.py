"""kopf's credentials, taken from the kubernetes client configuration the operator already uses.

kopf's own login handlers read `$KUBECONFIG` (or the in-cluster token) on their own, and
understand only a subset of kubeconfig: no `tokenFile`, no exec plugins, paths not resolved
relative to the file. Handing kopf the very configuration our REST client was built from
means `--kubeconfig PATH` reaches both clients, whatever the environment holds, and both
always talk to the same server as the same user.
"""

from __future__ import annotations

from typing import Any

import kopf


def connection_info(cfg: Any) -> kopf.ConnectionInfo:
    """A `kubernetes.client.Configuration` as a kopf ConnectionInfo.

    Called at every kopf (re-)login, so a refreshable token (in-cluster projected tokens, exec
    plugins, tokenFile) is read again through the configuration's own refresh hook.
    """
    token = None
    scheme = None
    # The kubernetes package keeps the token under "BearerToken" (older releases: "authorization").
    auth = cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
    if auth:
        scheme, _, token = auth.partition(" ") if " " in auth else ("Bearer", "", auth)
        token = token.strip()  # a tokenFile's trailing newline is no part of the token
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert or None,
        insecure=not cfg.verify_ssl,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file or None,
        private_key_path=cfg.key_file or None,
        username=cfg.username or None,
        password=cfg.password or None,
        proxy_url=cfg.proxy or None,
    )
