"""Command line: `pretrain train|plan|generate|eval|tokenizer train|data build|data merge|
launch local|slurm|slurm-data|convert ...|bench ...|scaling plan|launch|fit`."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pretrain import accelerators, options
from pretrain.config import load, to_yaml, validate
from pretrain.errors import UserError
from pretrain.scaling import cli as scaling_cli

TRAIN_EPILOG = """\
overrides are `section.key=value` pairs applied on top of the YAML file, e.g.
  pretrain train --config configs/tiny.yaml parallel.tp=2 train.max_steps=50
sections: model, execution, parallel, optimizer, schedule, train, data, log, downstream, checkpoint
(see --print-config for every key and its value). Several processes: run under torchrun,
e.g. torchrun --nproc_per_node 2 -m pretrain train --config configs/tiny.yaml parallel.tp=2
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description="Pretrain Llama-style language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_plan, _add_generate, _add_eval, _add_tokenizer, _add_data, _add_launch,
                _add_convert, _add_bench):
        add(commands)
    scaling_cli.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as error:  # a mistake in what the user gave: its message, no traceback
        print(f"pretrain: {error}", file=sys.stderr)
        return error.exit_code
    except FloatingPointError as error:  # training diverged: the run cannot go on
        print(f"pretrain: {error}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as error:
        print(f"pretrain: {error.filename}: {error.strerror}: check the path", file=sys.stderr)
        return 2


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="train a model", epilog=TRAIN_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    options.config_and_overrides(train)
    train.add_argument("--print-config", action="store_true", help="print the resolved, validated config and exit")
    train.set_defaults(run=_train)


def _add_plan(commands) -> None:
    plan = commands.add_parser("plan", help="predict memory per GPU, step time and the best layouts before launch",
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="overrides are section.key=value pairs, as for `pretrain train`")
    options.config_and_overrides(plan)
    plan.add_argument("--gpus", type=int, required=True, help="GPUs of the job")
    plan.add_argument("--gpu", default="h100", choices=list(accelerators.BY_KEY),
                      help="the accelerator (pretrain/accelerators.py; default: H100 SXM)")
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--efficiency", type=float, help="share of the peak the compute reaches (default 0.5)")
    plan.add_argument("--intra-node-gbps", type=float, help="all-reduce bus bandwidth inside a node, GB/s")
    plan.add_argument("--inter-node-gbps", type=float, help="bandwidth per GPU between nodes, GB/s")
    plan.add_argument("--search", action="store_true", help="rank every valid layout that fits by tokens/s")
    plan.add_argument("--longest", action="store_true",
                      help="the longest model.seq_len (the config's times a power of two) that some layout fits, "
                           "and its fastest layout")
    plan.add_argument("--top", type=int, default=5, help="layouts --search shows")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(run=_plan)


def _add_generate(commands) -> None:
    generate = commands.add_parser("generate", help="complete prompts with a checkpoint (one process, CPU or GPU)")
    options.checkpoint(generate, "checkpoint.dir of a run (any layout), a step_* folder, or a `convert from-hf` "
                                 "folder")
    prompts = generate.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", nargs="+", metavar="TEXT")
    prompts.add_argument("--prompts-file", help="one prompt per line")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's)")
    options.device(generate)
    generate.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every token")
    generate.set_defaults(run=_generate)


def _add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="a checkpoint's loss and perplexity on held-out shards, or its "
                                                "scores on downstream tasks")
    options.checkpoint(evaluate)
    what = evaluate.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="a shards folder from `pretrain data build`")
    what.add_argument("--tasks", nargs="+", metavar="TASK", help="downstream tasks: YAML spec files, ready specs "
                      "given their data (hellaswag=FILE, arc_easy=, arc_challenge=, piqa=, winogrande=, lambada=), "
                      "python_next_line[=PY_FILES]")
    evaluate.add_argument("--batches", type=int, help="--data: global batches (default: the run's train.eval_steps)")
    evaluate.add_argument("--allow-tokenizer-mismatch", action="store_true",
                          help="--data: evaluate on shards of another tokenizer than the checkpoint's")
    evaluate.add_argument("--examples", type=int, default=0, help="--tasks: the first N examples of each (0: all)")
    evaluate.add_argument("--fewshot", type=int, help="--tasks: solved examples before each prompt (default: each "
                                                      "spec's own)")
    evaluate.add_argument("--seed", type=int, default=1234, help="--tasks: seed of the few-shot draws")
    evaluate.add_argument("--log-examples", action="store_true", help="--tasks: every example's results in --out")
    evaluate.add_argument("--tokenizer", help="--tasks: tokenizer folder (default: the checkpoint's)")
    evaluate.add_argument("--out", help="write the result as JSON here")
    options.device(evaluate)
    evaluate.set_defaults(run=_eval)


def _add_tokenizer(commands) -> None:
    tokenizer = commands.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    train = tokenizer.add_parser("train", help="train a sentencepiece tokenizer")
    options.inputs(train)
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", help="output folder (default: tokenizers/<model-type>-<vocab-size>)")
    train.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    train.add_argument("--max-chars", type=int, default=0, help="stop reading after this many characters")
    train.add_argument("--special", nargs="*", default=[], metavar="TOKEN",
                       help="extra special tokens besides <unk> <s> </s> <pad>")
    train.set_defaults(run=_tokenizer_train)


def _add_data(commands) -> None:
    data = commands.add_parser("data", help="data tools").add_subparsers(dest="action", required=True)
    build = data.add_parser("build", help="tokenize and pack documents into shards")
    options.inputs(build)
    options.shard_building(build, workers=options.default_workers())
    build.add_argument("--out", required=True, help="output folder (must not hold shards yet)")
    build.add_argument("--num-parts", type=int, default=1, help="build one of N disjoint parts (one per node), "
                                                                 "then `pretrain data merge` them")
    build.add_argument("--part", type=int, default=0, help="which part, 0..N-1")
    build.set_defaults(run=_data_build)
    merge = data.add_parser("merge", help="the parts of a `data build --num-parts N` -> one shards folder")
    merge.add_argument("parts", nargs="+", metavar="PART_DIR", help="every part's --out folder")
    merge.add_argument("--out", required=True, help="the shards folder (parts are moved into it, then removed)")
    merge.set_defaults(run=_data_merge)


def _add_launch(commands) -> None:
    launch = commands.add_parser("launch", help="start training with torchrun or Slurm").add_subparsers(
        dest="action", required=True)
    local = launch.add_parser("local", help="torchrun on this machine (one process per GPU, or --nproc)")
    local.add_argument("--nproc", type=int, help="processes (default: the number of GPUs, else 1)")
    options.max_restarts(local)
    options.config_and_overrides(local)
    local.set_defaults(run=_launch_local)

    slurm = launch.add_parser("slurm", help="render (and --submit) an sbatch script for multi-node training")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="with --cpu: processes per node")
    slurm.add_argument("--cpu", action="store_true", help="a CPU job (gloo): for trying the launcher without GPUs")
    options.slurm_job(slurm, "pretrain", log_dir="runs/slurm",
                      log_dir_help="Slurm and torchrun logs (relative to here)", time_help="time limit, e.g. "
                      "2-00:00:00", submit_help="call sbatch and print the job id")
    options.slurm_training(slurm)
    options.max_restarts(slurm)
    slurm.add_argument("--max-failures", type=int, default=2, help="requeues after training failed (a node lost, "
                                                                   "the restarts used up), counted apart")
    options.config_and_overrides(slurm)
    slurm.set_defaults(run=_launch_slurm)

    slurm_data = launch.add_parser("slurm-data", help="render (and --submit) a Slurm job array that builds "
                                                      "shards in parts, and the merge as a dependent job")
    slurm_data.add_argument("--parts", type=int, required=True, help="array tasks (one part each)")
    options.inputs(slurm_data)
    options.shard_building(slurm_data, workers=16)
    slurm_data.add_argument("--out", required=True, help="the merged shards folder; parts are built under OUT/parts")
    options.slurm_job(slurm_data, "pretrain-data", log_dir="runs/slurm", log_dir_help="Slurm logs (relative to "
                      "here)", time_help="time limit per task, e.g. 12:00:00",
                      submit_help="sbatch both and print the two job ids")
    slurm_data.set_defaults(run=_launch_slurm_data)


def _add_convert(commands) -> None:
    convert = commands.add_parser("convert", help="checkpoint conversion: Hugging Face, resharding").add_subparsers(
        dest="action", required=True)
    to_hf = convert.add_parser(
        "to-hf", help="a checkpoint (any TP/PP/ZeRO layout) -> Hugging Face Llama/Qwen3/Qwen3-MoE/Mixtral")
    options.checkpoint(to_hf)
    to_hf.add_argument("--out", required=True, help="new folder for the Hugging Face model")
    to_hf.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    to_hf.add_argument("--tokenizer", help="tokenizer folder (default: the one the checkpoint was trained with); "
                                           "'none' for no tokenizer")
    to_hf.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                       help="largest safetensors file; bigger models are split with an index")
    to_hf.set_defaults(run=_to_hf)
    from_hf = convert.add_parser(
        "from-hf", help="a Hugging Face Llama/Qwen3/Qwen3-MoE/Mixtral folder -> a checkpoint to continue training")
    from_hf.add_argument("--model", required=True, help="folder with config.json, safetensors weights, tokenizer")
    from_hf.add_argument("--out", required=True, help="new checkpoint.dir; a config.yaml to train from is written")
    _tp_pp(from_hf, "the checkpoint is checked and set up for", default=1)
    from_hf.add_argument("--allow-pickle", action="store_true",
                         help="accept pytorch_model*.bin weights (read with torch.load(weights_only=True))")
    from_hf.set_defaults(run=_from_hf)
    reshard = convert.add_parser("reshard", help="a checkpoint -> the same training state at another TP/PP")
    options.checkpoint(reshard)
    _tp_pp(reshard, "to reshard to", default=None)
    reshard.add_argument("--out", required=True, help="new checkpoint.dir to resume from (checkpoint.dir=OUT)")
    reshard.set_defaults(run=_reshard)


def _tp_pp(parser: argparse.ArgumentParser, purpose: str, default: int | None) -> None:
    """--tp and --pp of a converted checkpoint (required when there is no default)."""
    for name in ("tp", "pp"):
        parser.add_argument(f"--{name}", type=int, default=default, required=default is None,
                            help=f"parallel.{name} {purpose}")


def _add_bench(commands) -> None:
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="action", required=True)
    data = bench.add_parser("data", help="loader and tokenization throughput beside raw baselines")
    data.add_argument("--input", nargs="+", metavar="INPUT", help="corpus (default: Python's stdlib sources)")
    data.add_argument("--work", default="runs/bench-data", help="folder for the tokenizer and shards it builds")
    data.add_argument("--seq-len", type=int, default=2048)
    data.add_argument("--seconds", type=float, default=3.0,
                      help="measuring time per figure (the best of three rounds counts)")
    data.add_argument("--out", help="write the figures as JSON here")
    data.set_defaults(run=_bench_data)
    train = bench.add_parser("train", help="training throughput beside Hugging Face Llama (eager, compiled)")
    train.add_argument("--shape", choices=["tiny", "cpu", "long", "1b", "wide"], default="tiny",
                       help="tiny (seconds), cpu (a 7M model) and long (8192 tokens) run on a CPU; 1b and wide are "
                            "the GPU shapes")
    train.add_argument("--work", default="runs/bench-train", help="folder for the tokenizer, shards and logs")
    train.add_argument("--warmup", type=int, default=5, help="steps before measuring (compilation included)")
    train.add_argument("--steps", type=int, default=10, help="measured steps")
    train.add_argument("--out", help="write the table as JSON here")
    train.set_defaults(run=_bench_train)
    generate = bench.add_parser("generate", help="decoding speed with the KV cache beside recomputing")
    generate.add_argument("--config", default="configs/llama-125m.yaml", help="the model shape")
    generate.add_argument("--new-tokens", type=int, default=256)
    generate.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    generate.add_argument("--prompt-tokens", type=int, default=16)
    options.device(generate)
    generate.add_argument("--out", help="write the figures as JSON here")
    generate.set_defaults(run=_bench_generate)


def _train(args: argparse.Namespace) -> int:
    from pretrain.data import stream

    config = load(args.config, args.overrides)
    layout = validate(config, int(os.environ.get("WORLD_SIZE", "1")))
    if args.print_config:
        stream.resolve(config)
        print(to_yaml(config), end="")
        print(f"# derived: {layout}")
        return 0
    from pretrain.signals import EXIT_STOPPED
    from pretrain.train import train

    if not train(config).stopped_by_signal:
        return 0
    # A torchrun that may restart its workers would take 75 for a failure and train on: there the
    # launcher that sent the signal (the Slurm script) requeues, and the workers end cleanly.
    return 0 if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 else EXIT_STOPPED


def _plan(args: argparse.Namespace) -> int:
    import dataclasses

    from pretrain import plan

    gpu = accelerators.BY_KEY[args.gpu]
    bandwidths = {"intra_node_gbps": args.intra_node_gbps, "inter_node_gbps": args.inter_node_gbps}
    gpu = dataclasses.replace(gpu, **{k: v for k, v in bandwidths.items() if v})
    config = load(args.config, args.overrides)
    efficiency = args.efficiency or plan.EFFICIENCY
    if args.longest:
        seq_len, best = plan.longest_seq_len(config, args.gpus, gpu, args.gpus_per_node, efficiency)
        if args.json:
            print(json.dumps({"seq_len": seq_len, "plan": best.to_json() if best else None}, indent=1))
        elif best is None:
            print(f"no model.seq_len fits {args.gpus} x {gpu.name}")
        else:
            print(f"longest model.seq_len that fits {args.gpus} x {gpu.name}: {seq_len:,}\n{plan.describe(best)}\n"
                  f"overrides: model.seq_len={seq_len} {best.overrides()}")
        return 0 if best else 1
    if args.search:
        ranked = plan.search(config, args.gpus, gpu, args.gpus_per_node, efficiency)
        if args.json:
            print(json.dumps([p.to_json() for p in ranked[:args.top]], indent=1))
        else:
            print(plan.search_table(ranked, args.top, args.gpus, gpu))
        return 0 if ranked else 1
    result = plan.plan(config, args.gpus, gpu, args.gpus_per_node, efficiency)
    print(json.dumps(result.to_json(), indent=1) if args.json else plan.describe(result))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pretrain import inference
    from pretrain.generate import Sampling

    inference.resolve_device(args.device)  # a device that is not here is refused before any checkpoint is read
    prompts = _prompts(args.prompt, args.prompts_file)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed)
    inference.run_generate(args.checkpoint, args.step, prompts, sampling, args.tokenizer, args.device,
                           use_cache=not args.no_cache)
    return 0


def _prompts(given: list[str] | None, file: str | None) -> list[str]:
    """--prompt's texts or --prompts-file's non-empty lines; an empty prompt is refused."""
    from pretrain.generate import GenerateError

    if given is not None:
        if "" in given:
            raise GenerateError(f'--prompt "": prompt {given.index("") + 1} of {len(given)} is empty; give every prompt '
                                'some text')
        return given
    try:
        prompts = [line for line in Path(file).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as error:
        raise GenerateError(f"--prompts-file {file}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise GenerateError(f"--prompts-file {file} is not UTF-8 text: write one prompt per line") from None
    if not prompts:
        raise GenerateError(f"--prompts-file {file} holds no prompt: write one prompt per line")
    return prompts


def _eval(args: argparse.Namespace) -> int:
    from pretrain import inference

    inference.resolve_device(args.device)
    if args.tasks:
        inference.run_downstream(args.checkpoint, args.step, args.tasks, args.examples, args.fewshot, args.seed,
                                 args.out, args.device, args.tokenizer, args.log_examples)
    else:
        inference.run_eval(args.checkpoint, args.step, args.data, args.batches, args.out, args.device,
                           args.allow_tokenizer_mismatch)
    return 0


def _launch_local(args: argparse.Namespace) -> int:
    from pretrain import launch

    return launch.launch_local(args.nproc, args.config, args.overrides, args.max_restarts)


def _launch_slurm(args: argparse.Namespace) -> int:
    from pretrain import launch

    job = launch.SlurmJob(
        nodes=args.nodes, procs_per_node=args.gpus_per_node, config=args.config, overrides=args.overrides,
        cpu=args.cpu, partition=args.partition, time=args.time, account=args.account, job_name=args.job_name,
        log_dir=args.log_dir, cpus_per_task=args.cpus_per_task, max_restarts=args.max_restarts,
        max_requeues=args.max_requeues, max_failures=args.max_failures, signal_seconds=args.signal_seconds)
    return launch.launch_slurm(job, submit=args.submit)


def _launch_slurm_data(args: argparse.Namespace) -> int:
    from pretrain import launch

    job = launch.DataJob(
        parts=args.parts, inputs=args.input, tokenizer=args.tokenizer, seq_len=args.seq_len, out=args.out,
        workers=args.workers, shard_samples=args.shard_samples, text_field=args.text_field, unit_mb=args.unit_mb,
        partition=args.partition, time=args.time, account=args.account, job_name=args.job_name,
        log_dir=args.log_dir)
    return launch.launch_slurm_data(job, submit=args.submit)


def _to_hf(args: argparse.Namespace) -> int:
    from pretrain.convert.hf_export import export

    summary = export(args.checkpoint, args.out, args.step, args.dtype, args.tokenizer,
                     max_shard_bytes=int(args.max_shard_size * 2**30))
    print(f"exported step {summary['step']} of {summary['checkpoint']} to {args.out}: "
          f"{summary['parameters']:,} parameters, {summary['bytes'] / 2**20:,.1f} MiB in "
          f"{len(summary['files'])} safetensors file(s), {summary['seconds']} s")
    return 0


def _from_hf(args: argparse.Namespace) -> int:
    from pretrain.convert.hf_import import import_hf

    config_path = import_hf(args.model, args.out, args.tp, args.pp, allow_pickle=args.allow_pickle)
    tokenizer = Path(args.out) / "tokenizer"
    shards = f"shards built with {tokenizer}" if tokenizer.is_dir() else "shards built with the model's tokenizer"
    print(f"imported {args.model} into {args.out}; continue training with\n"
          f"  pretrain train --config {config_path} data.path=<{shards}>")
    return 0


def _reshard(args: argparse.Namespace) -> int:
    from pretrain.convert.reshard import reshard

    path = reshard(args.checkpoint, args.out, args.tp, args.pp, args.step)
    print(f"resharded to parallel.tp={args.tp} parallel.pp={args.pp}: {path}; resume with "
          f"checkpoint.dir={args.out} parallel.tp={args.tp} parallel.pp={args.pp}")
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from pretrain.tokenizer import train_tokenizer

    out = Path(args.out or f"tokenizers/{args.model_type}-{args.vocab_size}")
    card = train_tokenizer(args.input, args.vocab_size, out, model_type=args.model_type, text_field=args.text_field,
                           max_chars=args.max_chars, user_symbols=tuple(args.special))
    print(f"tokenizer written to {out}: vocab {card['vocab_size']}, {card['documents']} documents, "
          f"sha256 {card['sha256'][:12]}")
    return 0


def _data_build(args: argparse.Namespace) -> int:
    from pretrain.data.build import build_shards

    started = time.perf_counter()
    manifest = build_shards(args.input, args.tokenizer, args.seq_len, args.out, shard_samples=args.shard_samples,
                            workers=args.workers, text_field=args.text_field, num_parts=args.num_parts,
                            part=args.part, unit_bytes=max(1, int(args.unit_mb * 2**20)))
    seconds = time.perf_counter() - started
    what = f"part {args.part} of {args.num_parts}: " if args.num_parts > 1 else ""
    print(f"{what}{len(manifest['shards'])} shards written to {args.out} in {seconds:.1f} s "
          f"({manifest['tokens'] / seconds:,.0f} tokens/s with {args.workers} workers): {_summary(manifest)}")
    return 0


def _summary(manifest: dict) -> str:
    return json.dumps({k: manifest[k] for k in ("documents", "tokens", "samples", "empty_documents_skipped",
                                                "invalid_utf8_replaced")})


def _data_merge(args: argparse.Namespace) -> int:
    from pretrain.data.build import merge_parts

    manifest = merge_parts(args.parts, args.out)
    print(f"merged {len(args.parts)} parts into {args.out}: {len(manifest['shards'])} shards, {_summary(manifest)}")
    return 0


def _bench_data(args: argparse.Namespace) -> int:
    from pretrain.bench import data

    return data.main(args.input, args.work, args.out, args.seq_len, args.seconds)


def _bench_train(args: argparse.Namespace) -> int:
    from pretrain.bench import train

    return train.main(args.shape, args.work, args.out, args.warmup, args.steps)


def _bench_generate(args: argparse.Namespace) -> int:
    from pretrain.bench import generate

    return generate.main(args.config, args.new_tokens, args.batch, args.prompt_tokens, args.out, args.device)
