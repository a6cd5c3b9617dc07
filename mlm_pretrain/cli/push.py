"""`mlm-pretrain push DIR --repo-id user/name`: upload an exported model directory to the Hugging Face Hub."""

from __future__ import annotations

import argparse

from mlm_pretrain.hub import UPLOAD_HELP


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "push",
        help="upload an exported model directory to the Hugging Face Hub",
        description="Stage the uploadable files of DIR, check that they load with AutoConfig, AutoTokenizer "
        "and the Auto model class of config.architectures (no remote code, safetensors weights), then "
        "upload them with huggingface_hub. The token comes from HF_TOKEN or the login cache "
        "(`hf auth login`) and is sent only as the Authorization header. " + UPLOAD_HELP,
    )
    parser.add_argument("model_dir", metavar="DIR", help="an exported Hugging Face model directory")
    parser.add_argument("--repo-id", required=True, help="the model repo, e.g. user/name (created if needed)")
    parser.add_argument(
        "--private",
        action="store_true",
        help="create the repo private (default: public; refused if it already exists and is public)",
    )
    parser.add_argument("--revision", help="branch to push to, created if needed (default: main)")
    parser.add_argument(
        "--commit-message", help="commit message (default: 'Upload <architecture> with mlm-pretrain')"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="stage and check the folder and list its files with sizes; upload nothing",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mlm_pretrain.hub import push_to_hub

    result = push_to_hub(
        args.model_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        dry_run=args.dry_run,
        commit_message=args.commit_message,
    )
    target = f"{result.repo_id}@{result.revision}"
    if result.dry_run:
        created = "private" if args.private else "public"
        print(
            f"dry run: {args.model_dir} loads as {result.architecture}; would upload to {target} "
            f"({created} if it is created):"
        )
    else:
        visibility = "private" if result.private else "public"
        print(
            f"pushed {args.model_dir} ({result.architecture}) to {target} ({visibility}): {result.commit_url}"
        )
    print(result.summary())
    return 0
