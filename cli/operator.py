"""``kdistill operator``: run the Kopf operator (imports kopf and kubernetes, never torch)."""

from __future__ import annotations

import typer

from kdistill.operator.settings import default


def register(app: typer.Typer) -> None:
    @app.command()
    def operator(
        namespace: list[str] = typer.Option(
            [],
            "--namespace",
            "-n",
            envvar="KDISTILL_NAMESPACES",
            help="Namespace to watch (repeat for several); none: cluster-wide.",
        ),
        trainer_image: str = typer.Option(
            default("trainer_image"),
            envvar="KDISTILL_TRAINER_IMAGE",
            help="Worker image when a job's template sets none.",
        ),
        server_image: str = typer.Option(
            default("server_image"),
            envvar="KDISTILL_SERVER_IMAGE",
            help="Serving image when a job's serving sets none.",
        ),
        image_pull_policy: str = typer.Option(
            default("image_pull_policy"),
            envvar="KDISTILL_IMAGE_PULL_POLICY",
            help="imagePullPolicy of worker and serving pods: Always, IfNotPresent or Never (empty: the default).",
        ),
        notready_seconds: float = typer.Option(
            default("notready_seconds"),
            min=0.0,
            envvar="KDISTILL_NOTREADY_SECONDS",
            help="A node NotReady this long counts as lost.",
        ),
        resync_seconds: float = typer.Option(
            default("resync_seconds"),
            min=1.0,
            envvar="KDISTILL_RESYNC_SECONDS",
            help="Look at every job at least this often.",
        ),
        workers: int = typer.Option(
            default("workers"),
            min=1,
            max=256,
            envvar="KDISTILL_WORKERS",
            help="Reconcile passes in parallel (different jobs).",
        ),
        watch_server_timeout: int = typer.Option(
            default("watch_server_timeout"),
            min=1,
            envvar="KDISTILL_WATCH_SERVER_TIMEOUT",
            help="Seconds before the API server ends a watch.",
        ),
        watch_client_timeout: int = typer.Option(
            default("watch_client_timeout"),
            min=1,
            envvar="KDISTILL_WATCH_CLIENT_TIMEOUT",
            help="Seconds before a silent watch is dropped.",
        ),
        metrics_port: int = typer.Option(
            default("metrics_port"),
            min=0,
            max=65535,
            envvar="KDISTILL_METRICS_PORT",
            help="Prometheus metrics port (0: off).",
        ),
        health_port: int = typer.Option(
            default("health_port"),
            min=0,
            max=65535,
            envvar="KDISTILL_HEALTH_PORT",
            help="kopf liveness/probe port, /healthz (0: off).",
        ),
        leader_election: bool = typer.Option(
            default("leader_election"),
            envvar="KDISTILL_LEADER_ELECTION",
            help="Hold a Lease so that only one replica acts.",
        ),
        lease_namespace: str = typer.Option(
            default("lease_namespace"), envvar="POD_NAMESPACE", help="Namespace of the leader Lease."
        ),
        lease_name: str = typer.Option(default("lease_name"), envvar="KDISTILL_LEASE_NAME"),
        lease_duration: float = typer.Option(
            default("lease_duration_seconds"), min=1.0, envvar="KDISTILL_LEASE_DURATION"
        ),
        lease_renew: float = typer.Option(default("lease_renew_seconds"), min=0.2, envvar="KDISTILL_LEASE_RENEW"),
        kueue: bool = typer.Option(
            default("kueue"),
            envvar="KDISTILL_KUEUE",
            help="Admit jobs labelled kueue.x-k8s.io/queue-name through Kueue Workloads.",
        ),
        kubeconfig: str = typer.Option("", envvar="KUBECONFIG", help="Default: in-cluster config."),
        log_level: str = typer.Option("INFO", envvar="KDISTILL_LOG_LEVEL"),
    ) -> None:
        """Run the operator: DistillationJobs become worker gangs, restarts and rollouts."""
        from kdistill.operator.main import run
        from kdistill.operator.settings import Settings

        try:
            settings = Settings(
                namespaces=tuple(n for item in namespace for n in item.split(",") if n),
                trainer_image=trainer_image,
                server_image=server_image,
                image_pull_policy=image_pull_policy,
                notready_seconds=notready_seconds,
                resync_seconds=resync_seconds,
                workers=workers,
                watch_server_timeout=watch_server_timeout,
                watch_client_timeout=watch_client_timeout,
                metrics_port=metrics_port,
                health_port=health_port,
                leader_election=leader_election,
                lease_namespace=lease_namespace,
                lease_name=lease_name,
                lease_duration_seconds=lease_duration,
                lease_renew_seconds=lease_renew,
                kueue=kueue,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        raise typer.Exit(run(settings, kubeconfig or None, log_level))
