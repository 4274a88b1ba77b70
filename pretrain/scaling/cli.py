"""`pretrain scaling plan|launch|fit`: its arguments and what each does."""

import argparse
import json
from pathlib import Path

from pretrain import options
from pretrain.scaling import ScalingError

EPILOG = """\
a sweep, end to end:
  pretrain scaling plan --base-config configs/tiny.yaml --compute 1e15 3e15 1e16 --points 5 --out runs/sweep \\
      data.path=... data.valid_path=...
  pretrain scaling launch runs/sweep --local --parallel 2      (or --slurm --submit: one job array)
  pretrain scaling fit runs/sweep                              (fit.json and plots in runs/sweep/fit)
C is in FLOPs, C = 6 N D; N counts all parameters unless --count non-embedding (no token
embedding, no output head)."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    scaling = commands.add_parser("scaling", help="scaling laws: plan an IsoFLOP sweep, launch it, fit L(N, D)",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = scaling.add_subparsers(dest="action", required=True)

    plan = actions.add_parser("plan", help="write an IsoFLOP grid: one config per (budget, model size) and a manifest",
                              description="Per budget C, --points Llama shapes spanning N (width in steps of "
                                          "--head-dim, depth = width / --aspect), each on D = C / (6N) tokens.")
    plan.add_argument("--base-config", required=True, help="YAML config the points start from (data, batch, lr)")
    plan.add_argument("--compute", type=float, nargs="+", required=True, metavar="C", help="budgets in FLOPs, e.g. 1e15")
    plan.add_argument("--points", type=int, default=5, help="model sizes per budget")
    plan.add_argument("--out", required=True, help="the sweep folder (must not hold a sweep yet)")
    plan.add_argument("--count", choices=["all", "non-embedding"], default="all",
                      help="which parameters N counts (also in C = 6ND); non-embedding leaves out the token "
                           "embedding and output head")
    plan.add_argument("--params", type=float, nargs=2, metavar=("MIN", "MAX"),
                      help="the N range of every budget (default: around sqrt(C / (6 x --tokens-per-param)))")
    plan.add_argument("--spread", type=float, default=3.0, help="N spans N_c / spread .. N_c x spread")
    plan.add_argument("--tokens-per-param", type=float, default=20.0, help="D / N at the range's centre N_c")
    plan.add_argument("--head-dim", type=int, help="width step and head size (default: the base config's)")
    plan.add_argument("--aspect", type=float, help="hidden_size per layer (default: the base config's)")
    plan.add_argument("--warmup-fraction", type=float,
                      help="share of each point's steps spent warming up (default: the base config's share)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="applied to the base config")
    plan.set_defaults(run=_plan)

    launch = actions.add_parser("launch", help="train a sweep's unfinished points: here, or as a Slurm job array")
    launch.add_argument("sweep", help="the sweep folder")
    where = launch.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="on this machine")
    where.add_argument("--slurm", action="store_true", help="render (and --submit) one job array, a task per point")
    where.add_argument("--point", type=int, nargs="+", metavar="INDEX",
                       help="train these points here, one after another (what each array task runs)")
    launch.add_argument("--parallel", type=int, help="points at once (--local: default 1; --slurm: array throttle)")
    launch.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per point; more than 1 runs torchrun")
    launch.add_argument("--cpu", action="store_true", help="--slurm: CPU tasks (no GPUs requested)")
    options.slurm_job(launch, "pretrain-scaling", log_dir=None, log_dir_help="--slurm: scripts and logs (default: "
                      "SWEEP/slurm)", time_help="--slurm: time limit per task, e.g. 12:00:00",
                      submit_help="--slurm: call sbatch and print the job id")
    options.slurm_training(launch)
    launch.set_defaults(run=_launch)

    fit = actions.add_parser("fit", help="fit L(N, D), the isoFLOP minima and the compute-optimal model")
    fit.add_argument("sweep", nargs="?", help="a sweep folder whose points have all finished")
    fit.add_argument("--table", help="a CSV file of points instead of a sweep")
    fit.add_argument("--columns", default="params,tokens,loss",
                     help="the table's N, D and loss columns, and optionally fourth its compute-budget column")
    fit.add_argument("--target-compute", type=float, metavar="C",
                     help="FLOPs of the compute-optimal model to report (default: the largest budget)")
    fit.add_argument("--out", help="folder for fit.json and the plots (default: SWEEP/fit, or TABLE-fit)")
    fit.add_argument("--count", choices=["all", "non-embedding"],
                     help="a sweep's N: all or non-embedding parameters (default: the sweep's --count)")
    fit.add_argument("--bootstrap", type=int, default=200, help="resamples for the 95%% intervals")
    fit.add_argument("--seed", type=int, default=0, help="of the bootstrap resampling")
    fit.set_defaults(run=_fit)


def _plan(args: argparse.Namespace) -> int:
    from pretrain.scaling.grid import plan

    sweep = plan(args.base_config, args.overrides, args.compute, args.points, args.out, count=args.count,
                 params=args.params, spread=args.spread, tokens_per_param=args.tokens_per_param,
                 head_dim=args.head_dim, aspect=args.aspect, warmup_fraction=args.warmup_fraction)
    print(f"{'C (FLOPs)':>10} {'N':>10} {'D':>10} {'steps':>7}  shape (hidden x layers, heads/kv, ffn)")
    for p in sweep.points:
        s = p["shape"]
        print(f"{p['compute']:>10.3g} {p['params']:>10.3g} {p['tokens']:>10.3g} {p['steps']:>7}  "
              f"{s['hidden_size']} x {s['num_layers']}, {s['num_heads']}/{s['num_kv_heads']}, {s['ffn_hidden_size']}")
    print(f"{len(sweep.points)} points (N = {args.count} parameters) planned in {sweep.root}; train them with\n"
          f"  pretrain scaling launch {sweep.root} --local   (or --slurm)")
    return 0


def _launch(args: argparse.Namespace) -> int:
    from pretrain.scaling import sweep as sweeps

    sweep = sweeps.Sweep.load(args.sweep)
    if args.nproc < 1 or (args.parallel is not None and args.parallel < 1):
        raise ScalingError("--nproc and --parallel must be at least 1")
    if args.local:
        return sweeps.launch_local(sweep, args.parallel or 1, args.nproc)
    if args.slurm:
        job = sweeps.SweepJob(nproc=args.nproc, cpu=args.cpu, parallel=args.parallel, partition=args.partition,
                              time=args.time, account=args.account, job_name=args.job_name, log_dir=args.log_dir,
                              cpus_per_task=args.cpus_per_task, max_requeues=args.max_requeues,
                              signal_seconds=args.signal_seconds)
        return sweeps.launch_slurm(sweep, job, args.submit)
    for index in args.point:
        code = sweeps.run_point(sweep, sweep.point(index), args.nproc)
        if code:
            return code
    return 0


def _fit(args: argparse.Namespace) -> int:
    from pretrain.scaling import observations
    from pretrain.scaling.fit import fit_all, table
    from pretrain.scaling.plots import plot_all
    from pretrain.scaling.sweep import Sweep

    if (args.sweep is None) == (args.table is None):
        raise ScalingError("give a sweep folder or --table FILE.csv (one of them)")
    if args.table:
        obs = observations.read_table(args.table, args.columns)
        out = Path(args.out or Path(args.table).with_suffix("").as_posix() + "-fit")
    else:
        sweep = Sweep.load(args.sweep)
        obs = observations.from_sweep(sweep, args.count)
        out = Path(args.out or sweep.root / "fit")
    if args.bootstrap < 0:
        raise ScalingError("--bootstrap must be >= 0")
    result = fit_all(obs, args.target_compute, args.bootstrap, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = [str(p) for p in plot_all(result, out)]
    (out / "fit.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"fit.json and {len(result['plots'])} plots written to {out}")
    return 0
