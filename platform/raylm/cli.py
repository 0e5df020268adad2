"""The `raylm` command: one subcommand per stage, plus `demo` (every stage in order), `submit` and `cluster`.

    raylm prepare --config configs/demo.yaml --prepare.min_chars=200
    raylm demo
    raylm submit train --config configs/demo.yaml --address http://127.0.0.1:8265
    raylm cluster up --workers 2 --cpus-per-node 2
    raylm serve-config --output serve_config.yaml      # then: serve deploy serve_config.yaml

Errors a user can fix print as one line on stderr with a non-zero exit; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from raylm.errors import ConfigError, RaylmError
from raylm.stages import STAGES, run_stage

DEFAULT_CONFIG = "configs/demo.yaml"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help=f"run config YAML (default: {DEFAULT_CONFIG})")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS, else a local Ray started for this command)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylm",
        description="raylm: raw, sharded text to a served language model, every stage a Ray job.",
        epilog="Any subcommand takes dotted config overrides, e.g. --train.optimizer.lr=3e-4.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage in STAGES.values():
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help.capitalize() + ".")
        _add_common(p)
        p.epilog = f"Config section: `{stage.name}:` in the run YAML; override keys as --{stage.name}.KEY=VALUE."
    p = sub.add_parser("demo", help="run every stage on the bundled corpus, then query the served model over HTTP")
    _add_common(p)
    p.add_argument("--keep-serving", action="store_true", help="leave the endpoint up after the demo")
    p = sub.add_parser(
        "submit",
        help="send a stage to a running Ray cluster as a Ray job and follow its logs",
        description="Submit `python jobs/<stage>.py` to a Ray cluster through the Ray Jobs API.",
    )
    p.add_argument("stage", choices=list(STAGES), help="stage to run on the cluster")
    p.add_argument("--config", default=None, help=f"run config YAML (default: {DEFAULT_CONFIG})")
    p.add_argument(
        "--address",
        default=None,
        help="the cluster's Jobs API address, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)",
    )
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following logs")
    p.add_argument("--pip", action="store_true",
                   help="install raylm's requirements (pinned to the versions here) on the cluster through the job's "
                        "runtime_env, for a cluster whose image lacks them")  # fmt: skip
    p.add_argument("--forward-storage-credentials", action="store_true",
                   help="send this shell's AWS_*/GOOGLE_*/AZURE_* settings with the job (default: the cluster's own)")
    p = sub.add_parser(
        "cluster",
        help="start, list or stop a multi-host Ray cluster on this machine (one network namespace per host)",
        description="A head plus worker hosts, each in its own network namespace with its own IP (needs root).",
    )
    csub = p.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    up = csub.add_parser("up", help="start a cluster that keeps running after this command")
    up.add_argument("--workers", type=int, default=1, help="worker hosts besides the head (default 1)")
    up.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs of each node (default 2)")
    up.add_argument("--head-cpus", type=int, default=None, help="logical CPUs of the head (default: --cpus-per-node)")
    up.add_argument("--subnet", default=None, help="private IPv4 /24 to use (default: a free one in 10.213.0.0/16)")
    up.add_argument("--shared-disk", action="store_true",
                    help="worker hosts see this machine's disk, as NFS would share it (default: each has its own "
                         "/tmp, /dev/shm and copy of the checkout, as separate machines do)")
    down = csub.add_parser("down", help="stop a cluster and delete its namespaces, links and temp dir")
    down.add_argument("name", nargs="?", default=None, help="cluster name (default: the only one running)")
    csub.add_parser("status", help="list the clusters on this machine")
    p = sub.add_parser(
        "serve-config",
        help="write the Ray Serve config file of the serve section, for Ray's own `serve deploy`",
        description="Write a Ray Serve config (YAML) that deploys the same app as `raylm serve` with `serve deploy`.",
    )
    p.add_argument("--config", default=None, help=f"run config YAML (default: {DEFAULT_CONFIG})")
    p.add_argument("--output", default="serve_config.yaml", help="file to write (default serve_config.yaml)")
    p = sub.add_parser(
        "export",
        help="write a raylm model directory from a train checkpoint (any ZeRO stage), on this CPU, without Ray",
        description="Consolidate a DeepSpeed checkpoint of the train stage into a raylm-gpt model directory.",
    )
    p.add_argument("--checkpoint", required=True, help="a Ray Train checkpoint dir of the run (state.json, deepspeed/)")
    p.add_argument("--output", required=True, help="model directory to write (model.safetensors, config.json, tokenizer)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype (default float32)")
    return parser


def _config_path(arg: str | None) -> str:
    if arg is not None:
        return arg
    if Path(DEFAULT_CONFIG).exists():
        return DEFAULT_CONFIG
    raise ConfigError(f"{DEFAULT_CONFIG}: not found here; pass --config PATH")


def _load(args: argparse.Namespace, overrides: list[str]):
    from raylm.config import load_config  # pydantic and every section's config: not for `raylm --help`

    return load_config(_config_path(args.config), overrides)


def _run_stage(stage: str, args: argparse.Namespace, overrides: list[str]) -> int:
    import ray  # seconds of imports: not for `raylm --help`

    cfg = _load(args, overrides)
    connected_here = not ray.is_initialized()
    try:
        summary = run_stage(stage, cfg, cfg.context(args.address))
    finally:
        if connected_here and ray.is_initialized():
            ray.shutdown()  # disconnect cleanly: no cleanup-actor tracebacks after the summary
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _run_submit(args: argparse.Namespace, overrides: list[str]) -> int:
    from raylm.cluster.submit import submit_stage  # the Ray Jobs SDK: not for `raylm --help`

    config = _config_path(args.config)
    _load(args, overrides)  # fail here, not on the cluster, when the config is invalid
    return submit_stage(args.stage, config, overrides, address=args.address, wait=not args.no_wait, pip=args.pip,
                        forward_storage_credentials=args.forward_storage_credentials)  # fmt: skip


def _run_cluster(args: argparse.Namespace) -> int:
    from raylm.cluster import multihost  # (as above, for every subcommand's own imports)

    if args.cluster_command == "up":
        c = multihost.up(args.workers, args.cpus_per_node, head_cpus=args.head_cpus, subnet=args.subnet,
                         private_disks=not args.shared_disk)
        disks = "sharing this machine's disk" if args.shared_disk else "each with a disk of its own"
        print(f"cluster {c.name}: head {c.head_ip}, worker hosts {', '.join(c.worker_ips)} ({disks})")
        # Where the run's files go: a bucket every host reaches, or this disk when the hosts share it.
        workdir = "--run.shared_filesystem=true" if args.shared_disk else "--run.workdir=s3://BUCKET/RUN"
        print(f"  Jobs API: raylm submit train --config configs/demo.yaml --address {c.jobs_address} {workdir}")
        print(f"  clients:  {' '.join(f'export {k}={v};' for k, v in c.env.items())}")
        print(f"  stop:     raylm cluster down {c.name}")
        return 0
    clusters = multihost.list_clusters()
    if args.cluster_command == "status":
        for c in clusters:
            state = "up" if multihost.cluster_alive(c) else "not answering"
            print(f"{c.name}  {state}  address {c.address}  jobs {c.jobs_address}  worker hosts {', '.join(c.worker_ips)}")
        if not clusters:
            print("no multihost clusters on this machine")
        return 0
    name = args.name
    if name is None:
        if len(clusters) != 1:
            raise RaylmError(f"{len(clusters)} multihost clusters here; name one: raylm cluster down NAME")
        name = clusters[0].name
    if not multihost.down(name):
        raise RaylmError(f"no multihost cluster named {name} on this machine (see: raylm cluster status)")
    print(f"cluster {name}: stopped and removed")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from raylm.train.export import export_checkpoint  # torch and DeepSpeed: not for `raylm --help`

    out = export_checkpoint(args.checkpoint, args.output, dtype=args.dtype)
    print(json.dumps({"model": str(out), "dtype": args.dtype}))
    return 0


def _run_serve_config(args: argparse.Namespace, overrides: list[str]) -> int:
    from raylm.serve.deploy import write_serve_config  # Ray Serve: not for `raylm --help`

    cfg = _load(args, overrides)
    path = write_serve_config(cfg.serve, cfg.run.name, args.output)
    print(f"wrote {path}; deploy it onto a running cluster with: serve deploy {path} -a http://<head>:8265")
    return 0


def _run_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    from raylm.demo import run_demo  # every stage's imports: not for `raylm --help`

    cfg = _load(args, overrides)
    return run_demo(cfg, address=args.address, keep_serving=args.keep_serving)


def _log_to_stderr() -> None:
    """Show raylm's own progress lines (INFO) on stderr; Ray's loggers keep their own settings."""
    log = logging.getLogger("raylm")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    _log_to_stderr()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --section.key=value)")
    try:
        if args.command == "submit":
            return _run_submit(args, rest)
        if args.command == "cluster":
            return _run_cluster(args)
        if args.command == "demo":
            return _run_demo(args, rest)
        if args.command == "export":
            return _run_export(args)
        if args.command == "serve-config":
            return _run_serve_config(args, rest)
        return _run_stage(args.command, args, rest)
    except RaylmError as e:
        print(f"raylm {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"raylm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
