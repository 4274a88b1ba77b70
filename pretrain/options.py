"""Command-line options that several commands share, each written once (pretrain.cli and
pretrain.scaling.cli build their parsers from these pieces)."""

import argparse
import os

from pretrain.data.shards import PACKING_UNIT_MB

INPUT_HELP = ("files, folders (their .jsonl, .jsonl.gz, .json.gz, .jsonl.zst, .parquet and .txt files) or globs; "
              "a Hugging Face datasets folder (save_to_disk); any other file is one plain-text document")


def config_and_overrides(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """--config YAML plus `section.key=value` overrides applied on top of it."""
    parser.add_argument("--config", required=required,
                        help="YAML file of settings (defaults apply to what it leaves out)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def checkpoint(parser: argparse.ArgumentParser, what: str = "checkpoint.dir of a run, or one step_* folder in it") -> None:
    """--checkpoint (a checkpoint.dir or one step folder) and --step."""
    parser.add_argument("--checkpoint", required=True, help=what)
    parser.add_argument("--step", type=int, help="which step (default: the newest complete one)")


def device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ...")


def inputs(parser: argparse.ArgumentParser, required: bool = True,
           help: str = INPUT_HELP) -> None:
    """--input corpus files and --text-field."""
    parser.add_argument("--input", nargs="+", required=required, metavar="INPUT", help=help)
    parser.add_argument("--text-field", default="text", help="JSON field / parquet column with the text")


def shard_building(parser: argparse.ArgumentParser, workers: int) -> None:
    """What `pretrain data build` needs besides its inputs and output."""
    parser.add_argument("--tokenizer", required=True, help="folder from `pretrain tokenizer train`")
    parser.add_argument("--seq-len", type=int, required=True, help="model.seq_len; samples hold seq_len + 1 tokens")
    parser.add_argument("--shard-samples", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--workers", type=int, default=workers, help="tokenizing processes")
    parser.add_argument("--unit-mb", type=float, default=PACKING_UNIT_MB,
                        help="input MB per packing unit: packing restarts at each (parts split between units)")


def default_workers() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


def max_restarts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-restarts", type=int, help="torchrun restarts of all workers when one fails "
                                                         "(default: the config's train.max_restarts)")


def slurm_job(parser: argparse.ArgumentParser, job_name: str, log_dir: str | None, log_dir_help: str,
              time_help: str, submit_help: str) -> None:
    """The sbatch settings every rendered Slurm script takes, and --submit."""
    parser.add_argument("--partition")
    parser.add_argument("--time", help=time_help)
    parser.add_argument("--account")
    parser.add_argument("--job-name", default=job_name)
    parser.add_argument("--log-dir", default=log_dir, help=log_dir_help)
    parser.add_argument("--submit", action="store_true", help=submit_help)


def slurm_training(parser: argparse.ArgumentParser) -> None:
    """What a Slurm training job takes besides slurm_job: CPUs, requeues and the stop signal."""
    parser.add_argument("--cpus-per-task", type=int, help="CPUs per task (default: 8 per GPU; with --cpu, "
                                                          "one per process)")
    parser.add_argument("--max-requeues", type=int, default=3, help="requeues after a stop signal (time limit, "
                                                                    "preemption)")
    parser.add_argument("--signal-seconds", type=int, default=120,
                        help="seconds before the time limit at which Slurm asks training to save and stop")
