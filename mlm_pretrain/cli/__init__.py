"""The `mlm-pretrain` command: one parser, one subcommand module per command.

Subcommand modules import heavy libraries (torch, transformers) inside `run`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys

from mlm_pretrain import __version__
from mlm_pretrain.errors import InputError
from mlm_pretrain.failures import RunFailed
from mlm_pretrain.stop import PREEMPTED_EXIT, Preempted

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")
SUBCOMMANDS = ["tokenizer", "pack", "pretrain", "finetune", "push", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlm-pretrain",
        description="Train a tokenizer, stream and pack a corpus, pretrain an encoder (MLM or word2vec), "
        "fine-tune it on GLUE-style tasks and push it to the Hugging Face Hub.",
    )
    parser.add_argument("--version", action="version", version=f"mlm-pretrain {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"mlm_pretrain.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may stand anywhere on the line, after `--corpus a b` too: take them out first
    # (a path holding "=" can be written ./a=b.txt)
    argv = sys.argv[1:] if argv is None else argv
    overrides = [token for token in argv if OVERRIDE.match(token)]
    args = parser.parse_args([token for token in argv if not OVERRIDE.match(token)])
    if overrides:
        if not hasattr(args, "overrides"):
            parser.error(f"{args.command} takes no key=value overrides: {' '.join(overrides)}")
        args.overrides = overrides
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.run(args) or 0
    except InputError as err:
        print(f"mlm-pretrain {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as failed:  # several processes: the same line and exit code on every rank
        print(f"mlm-pretrain {args.command}: error: {failed}; every process stopped", file=sys.stderr)
        # at once: the interpreter's clean-up could wait on, or abort in, the failed process group's
        # threads (seen here: "terminate called without an active exception", SIGABRT)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(failed.failure.exit_code)
    except Preempted as stopped:
        print(f"mlm-pretrain {args.command}: {stopped}; rerun with --resume", file=sys.stderr)
        return PREEMPTED_EXIT
    except KeyboardInterrupt:
        print(f"mlm-pretrain {args.command}: interrupted", file=sys.stderr)
        return 130
