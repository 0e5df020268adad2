"""The `raylm` command: one subcommand per stage, plus `demo` (every stage in order) and `submit`.

    raylm prepare --config configs/demo.yaml --prepare.min_chars=200
    raylm demo
    raylm submit train --config configs/demo.yaml --address http://127.0.0.1:8265

Errors a user can fix print as one line on stderr with a non-zero exit; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from raylm.errors import ConfigError, RaylmError

DEFAULT_CONFIG = "configs/demo.yaml"

# stage -> (module, function, help). Imported lazily so `--help` stays fast.
STAGES: dict[str, tuple[str, str, str]] = {
    "prepare": ("raylm.data.prepare", "run_prepare", "clean, filter, deduplicate and split raw text shards (Ray Data)"),
    "tokenize": ("raylm.tokenize.pipeline", "run_tokenize", "train a BPE tokenizer, encode and pack token shards"),
    "train": ("raylm.train.trainer", "run_train", "train the GPT with Ray Train workers running DeepSpeed"),
    "tune": ("raylm.tune.sweep", "run_tune", "search hyperparameters with Ray Tune (TPE + ASHA)"),
    "distill": ("raylm.compress.distill", "run_distill", "distill the trained model into a smaller student"),
    "quantize": ("raylm.compress.quantize", "run_quantize", "quantize the trained model's Linear layers to int8"),
    "evaluate": ("raylm.evaluate.report", "run_evaluate", "perplexity, size and speed of every model, as a table"),
    "serve": ("raylm.serve.app", "run_serve", "serve the models behind an OpenAI-compatible API (Ray Serve)"),
}


def stage_function(stage: str) -> Callable:
    module, func, _ = STAGES[stage]
    return getattr(importlib.import_module(module), func)


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
    for stage, (_, _, help_text) in STAGES.items():
        p = sub.add_parser(stage, help=help_text, description=help_text.capitalize() + ".")
        _add_common(p)
        p.epilog = f"Config section: `{stage}:` in the run YAML; override keys as --{stage}.KEY=VALUE."
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
    return parser


def _config_path(arg: str | None) -> str:
    if arg is not None:
        return arg
    if Path(DEFAULT_CONFIG).exists():
        return DEFAULT_CONFIG
    raise ConfigError(f"{DEFAULT_CONFIG}: not found here; pass --config PATH")


def _load(args: argparse.Namespace, overrides: list[str]):
    from raylm.config import load_config

    return load_config(_config_path(args.config), overrides)


def _run_stage(stage: str, args: argparse.Namespace, overrides: list[str]) -> int:
    from raylm.runtime import init_ray

    import ray

    cfg = _load(args, overrides)
    connected_here = not ray.is_initialized()
    init_ray(args.address or cfg.ray.address, cfg.ray.num_cpus)
    try:
        summary = stage_function(stage)(cfg)
    finally:
        if connected_here:
            ray.shutdown()  # disconnect cleanly: no cleanup-actor tracebacks after the summary
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _run_submit(args: argparse.Namespace, overrides: list[str]) -> int:
    from raylm.cluster.submit import submit_stage

    config = _config_path(args.config)
    _load(args, overrides)  # fail here, not on the cluster, when the config is invalid
    return submit_stage(args.stage, config, overrides, address=args.address, wait=not args.no_wait)


def _run_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    from raylm.demo import run_demo

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
        if args.command == "demo":
            return _run_demo(args, rest)
        return _run_stage(args.command, args, rest)
    except RaylmError as e:
        print(f"raylm {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"raylm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
