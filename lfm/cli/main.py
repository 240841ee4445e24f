"""The `lfm` command: one sub-command per question a user has."""

from __future__ import annotations

import argparse
import sys

from lfm.errors import LFMError

COMMANDS = ("train", "dr", "search", "evaluate", "nasbench", "bench", "report", "suspects")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command."""
    p = argparse.ArgumentParser(
        prog="lfm",
        description="Learning From Mistakes: data reweighting and differentiable NAS on PyTorch.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    import importlib

    for name in COMMANDS:
        importlib.import_module(f"lfm.cli.{name}").add_parser(sub)
    return p


OOM_ADVICE = (
    "out of memory. Fix: use a smaller --batch-size; for LFM, --encoder shared or head "
    "(one body, or a frozen cached encoder); or --precision bf16"
)


def is_out_of_memory(e: BaseException) -> bool:
    """True for torch.cuda.OutOfMemoryError and any RuntimeError saying "out of memory"."""
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _where() -> str:
    """ " (rank r)" under torchrun, where an error may hit one process only; else ""."""
    from lfm.train import distributed

    return f" (rank {distributed.rank()})" if distributed.world_size() > 1 else ""


def interrupted_advice(args: argparse.Namespace) -> str:
    """What re-running does after Ctrl-C: resume only where a checkpoint exists to resume from."""
    from pathlib import Path

    from lfm.train.trainer import RUN_FOLDERS

    folders = [Path(f) for f in RUN_FOLDERS]
    folders += [Path(v) for k in ("out", "suite_out") if (v := getattr(args, k, None))]
    saved = any(next(f.rglob("ckpt-*.pt"), None) is not None for f in folders if f.is_dir())
    if saved and getattr(args, "no_resume", False):
        return (
            "interrupted; re-running with --no-resume starts over, without it the run resumes "
            "from the last checkpoint"
        )
    if saved:
        return "interrupted; re-run the same command to resume from the last checkpoint"
    if not folders:
        return "interrupted; nothing was saved (no --out), so re-running starts over"
    return "interrupted before the first checkpoint was written; re-running starts over"


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a sub-command; user errors print one line and exit with code 2."""
    trainer = sys.modules.get("lfm.train.trainer")
    if trainer is not None:  # an earlier command in this process (tests, notebooks)
        trainer.RUN_FOLDERS.clear()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LFMError as e:
        print(f"lfm: error{_where()}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only, full or forbidden folder, a name too long
        from lfm.train.runlock import fs_error

        err = fs_error(e)
        if err is None:
            raise
        print(f"lfm: error{_where()}: {err}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
        if not is_out_of_memory(e):
            raise
        print(f"lfm: error{_where()}: {OOM_ADVICE}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lfm: {interrupted_advice(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
