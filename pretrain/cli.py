"""Command line: `pretrain train --config configs/tiny.yaml key.sub=value ...`."""

import argparse
import os
import sys

from pretrain.config import ConfigError, load, to_yaml, validate

TRAIN_EPILOG = """\
overrides are `section.key=value` pairs applied on top of the YAML file, e.g.
  pretrain train --config configs/tiny.yaml parallel.tp=2 train.max_steps=50
sections: model, parallel, optimizer, schedule, train, data, log, checkpoint
(see --print-config for every key and its value). Several processes: run under torchrun,
e.g. torchrun --nproc_per_node 2 -m pretrain train --config configs/tiny.yaml parallel.tp=2
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description="Pretrain Llama-style language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model", epilog=TRAIN_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", help="YAML file of settings (defaults apply to what it leaves out)")
    train.add_argument("--print-config", action="store_true", help="print the resolved, validated config and exit")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _train(args)
    return 2


def _train(args: argparse.Namespace) -> int:
    try:
        config = load(args.config, args.overrides)
        layout = validate(config, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        print(f"pretrain: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(config), end="")
        print(f"# derived: {layout}")
        return 0
    from pretrain.train import train

    train(config)
    return 0
