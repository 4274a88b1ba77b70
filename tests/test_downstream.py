"""Downstream evaluation: per-example log-likelihoods and acc/acc_norm/acc_bytes equal those of
lm-evaluation-harness 0.4.13 (its `hf` model on our fp32 export, the same local records, offline),
from `pretrain eval --tasks` on a checkpoint and from the evaluation in training at TP2 and PP2;
training losses are bit-equal with and without it, also with compiled blocks; few-shot prompts are
the same across runs and data-parallel ranks; the ready specs build lm-evaluation-harness's
prompts from the published layouts; malformed task files are refused naming file, line and
field. The training runs are conftest's generate_runs."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as parquet
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import GENERATE_STEPS, TESTS, child_env
from pretrain.cli import main
from pretrain.config import ConfigError, load, validate
from pretrain.convert.hf_export import export
from pretrain.downstream.tasks import TaskError, load_task
from pretrain.inference import run_downstream
from test_generate import wandb_records

LAYOUTS = ("tp2", "pp2")


def tasks_of(data: Path) -> dict:
    return json.loads((data / "downstream.json").read_text())


@pytest.fixture(scope="module")
def lm_eval(generate_data, generate_runs, tmp_path_factory) -> dict:
    """lm-evaluation-harness's results on the exports of the TP2 and PP2 runs' last checkpoints."""
    root, tasks = tmp_path_factory.mktemp("lm-eval"), tasks_of(generate_data)
    for layout in LAYOUTS:
        export(generate_runs["root"] / layout, root / layout, dtype="fp32")
    spec, out = root / "spec.json", root / "out.json"
    spec.write_text(json.dumps({"models": {layout: str(root / layout) for layout in LAYOUTS},
                                "tasks": list(tasks["lm_eval_names"].values()), "include": tasks["lm_eval_dir"]}))
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HOME": str(root / "hf-home")}
    proc = subprocess.run([sys.executable, str(TESTS / "lm_eval_check.py"), str(spec), str(out)],
                          env=child_env(**offline), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def assert_equal_to_lm_eval(ours: dict[str, list[dict]], theirs: dict, names: dict[str, str]) -> None:
    """Our examples (task -> records) against lm-evaluation-harness's: every log-likelihood to 1e-5
    (relative, fp32 sums), greedy flags and per-example metrics exactly."""
    for task, lm_eval_name in names.items():
        expected = theirs[lm_eval_name]
        assert [record["index"] for record in ours[task]] == [sample["doc_id"] for sample in expected]
        for record, sample in zip(ours[task], expected):
            assert record["log_likelihoods"] == pytest.approx(sample["log_likelihoods"], rel=1e-5, abs=1e-5)
            assert record["greedy"] == sample["greedy"]
            for metric in ("acc", "acc_norm", "acc_bytes"):
                assert record.get(metric) == sample.get(metric), (task, record["index"], metric)


def test_pretrain_eval_on_a_checkpoint_equals_lm_eval(generate_data, generate_runs, lm_eval, tmp_path, capsys):
    tasks = tasks_of(generate_data)
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(generate_runs["root"] / "tp2"), "--tasks", *tasks["tasks"],
                 "--device", "cpu", "--log-examples", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "task" in table and "acc_norm" in table and all(f" {name} " in table for name in tasks["lm_eval_names"])
    result = json.loads(out.read_text())
    assert result["step"] == GENERATE_STEPS
    assert_equal_to_lm_eval({task: values["samples"] for task, values in result["tasks"].items()}, lm_eval["tp2"],
                            tasks["lm_eval_names"])
    for task, lm_eval_name in tasks["lm_eval_names"].items():
        theirs = lm_eval["tp2"]["metrics"][lm_eval_name]
        for metric, their_metric in (("acc", "acc"), ("acc_norm", "acc_norm"), ("acc_bytes", "acc_bytes"),
                                     ("ppl", "perplexity")):
            if f"{their_metric},none" in theirs:
                assert result["tasks"][task][metric] == pytest.approx(theirs[f"{their_metric},none"], rel=1e-5)
    assert set(result["tasks"]["mc"]) >= {"acc", "acc_norm", "acc_bytes"} and "ppl" in result["tasks"]["lambada"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_evaluation_in_training_equals_lm_eval(layout, generate_data, generate_runs, lm_eval):
    tasks, log = tasks_of(generate_data), generate_runs["root"] / f"{layout}_sampled" / "downstream"
    logged = {task: [json.loads(line) for line in (log / f"{task}.jsonl").read_text().splitlines()]
              for task in tasks["lm_eval_names"]}
    assert {record["step"] for records in logged.values() for record in records} == {3, GENERATE_STEPS}
    last = {task: [r for r in records if r["step"] == GENERATE_STEPS] for task, records in logged.items()}
    assert_equal_to_lm_eval(last, lm_eval[layout], tasks["lm_eval_names"])
    reported = generate_runs["runs"][f"{layout}_sampled"]["downstream"]
    assert sorted(reported) == [3, GENERATE_STEPS] and set(reported[3]) == set(tasks["lm_eval_names"])


def test_losses_are_bit_equal_with_and_without_downstream_evaluation(generate_runs):
    runs = generate_runs["runs"]
    for evaluated, plain in (("tp2_sampled", "tp2_plain"), ("pp2_sampled", "pp2_plain"),
                             ("dp2_compiled_tasks", "dp2_compiled_plain")):
        assert runs[evaluated]["downstream"] and not runs[plain]["downstream"]
        assert runs[evaluated]["loss"] == runs[plain]["loss"], evaluated  # bit for bit
        assert runs[evaluated]["grad_norm"] == runs[plain]["grad_norm"], evaluated


def test_fewshot_prompts_are_the_same_across_runs_and_ranks(generate_data, generate_runs, tmp_path):
    """Each of the two data-parallel ranks of the DP2 run drew the few-shot prefixes of its half of
    the examples; a run of one process on its checkpoint draws every prefix and scores the same."""
    tasks = tasks_of(generate_data)
    single = run_downstream(str(generate_runs["root"] / "dp2"), None, tasks["tasks"], fewshot=2, device="cpu",
                            log_examples=True)
    log = generate_runs["root"] / "dp2_compiled_tasks" / "downstream"
    for task in tasks["lm_eval_names"]:
        records = [json.loads(line) for line in (log / f"{task}.jsonl").read_text().splitlines()]
        trained = [record for record in records if record["step"] == GENERATE_STEPS]
        assert [r["index"] for r in trained] == [r["index"] for r in single["tasks"][task]["samples"]]
        for ours, theirs in zip(trained, single["tasks"][task]["samples"]):
            assert ours["log_likelihoods"] == pytest.approx(theirs["log_likelihoods"], rel=1e-5, abs=1e-5)

    mc = tasks["tasks"][0]
    prompts = [[request.context for request in example.requests] for example in load_task(mc, fewshot=2).examples]
    assert prompts == [[r.context for r in e.requests] for e in load_task(mc, fewshot=2).examples]
    assert prompts[:5] == [[r.context for r in e.requests] for e in load_task(mc, examples=5, fewshot=2).examples]
    assert prompts != [[r.context for r in e.requests] for e in load_task(mc, fewshot=2, seed=7).examples]
    records = [json.loads(line) for line in Path(mc).with_suffix(".jsonl").read_text().splitlines()]
    first = records[0]["context"]  # index 0 is never its own few-shot example; each shot is a solved example
    shots = prompts[0][0][:-len(first)].split("\n\n")[:-1]
    assert len(shots) == 2 and all(any(shot == f"{r['context']} {r['choices'][r['gold']]}" for r in records[1:])
                                   for shot in shots)


def test_downstream_metrics_reach_tensorboard_metrics_jsonl_and_wandb(generate_runs):
    log = generate_runs["root"] / "tp2_sampled"
    rows = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]
    mc = [row for row in rows if row["group"] == "downstream/mc"]
    assert [row["step"] for row in mc] == [3, GENERATE_STEPS]
    assert mc[-1]["acc"] == generate_runs["runs"]["tp2_sampled"]["downstream"][GENERATE_STEPS]["mc"]["acc"]
    assert {"acc", "acc_norm", "acc_bytes", "seconds"} <= set(mc[0])
    assert {"acc", "ppl"} <= set(next(row for row in rows if row["group"] == "downstream/lambada"))
    events = EventAccumulator(str(log))
    events.Reload()
    for tag in ("downstream/mc/acc", "downstream/mc/acc_norm", "downstream/lambada/ppl", "downstream/winogrande/acc"):
        assert [event.step for event in events.Scalars(tag)] == [3, GENERATE_STEPS], tag
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
               for record in wandb_records(log) if record.WhichOneof("record_type") == "history"]
    assert {row["_step"]: row["downstream/mc/acc"] for row in history if "downstream/mc/acc" in row} == \
        {row["step"]: row["acc"] for row in mc}


def lm_eval_requests(task: str, doc: dict) -> list[tuple[str, str]]:
    """The (context, continuation) requests lm-evaluation-harness's own task `task` makes of `doc`:
    its YAML's templates or its Python preprocessing."""
    import lm_eval
    from lm_eval.utils import apply_template

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: None)
    folder = Path(lm_eval.__file__).parent / "tasks"
    if task == "hellaswag":
        import datasets
        from lm_eval.tasks.hellaswag.utils import process_docs

        [processed] = process_docs(datasets.Dataset.from_list([doc])).to_list()
        return [(processed["query"], " " + choice) for choice in processed["choices"]]
    if task == "winogrande":
        from lm_eval.tasks.winogrande import preprocess_winogrande as functions

        return [(context, " " + functions.doc_to_target(doc)) for context in functions.doc_to_choice(doc)]
    config = yaml.load((folder / {"lambada": "lambada/lambada_openai.yaml", "piqa": "piqa/piqa.yaml"}.get(
        task, f"arc/{task}.yaml")).read_text(), Loader)
    config = {**yaml.load((folder / "arc/arc_easy.yaml").read_text(), Loader), **config} if "include" in config \
        else config
    text = apply_template(config["doc_to_text"], doc)
    if config["output_type"] == "loglikelihood":
        return [(text, apply_template(config["doc_to_target"], doc))]
    choices = ast.literal_eval(apply_template(config["doc_to_choice"], doc))
    return [(text, " " + choice) for choice in choices]


PUBLISHED = {  # one record of each task as its publisher lays it out
    "hellaswag": {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow "
                  "covering the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then",
                  "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, "
                              "while two men supporting the head of the person wearing winter clothes snow as the "
                              "we girls sled.", ", the man puts on a christmas coat, knitted with netting.",
                              " [header] How to   remove [title] ice [step] from the car"],
                  "label": "3", "split": "val"},
    "arc_easy": {"id": "Mercury_7179953", "question": "Which two body systems are directly involved in movement?",
                 "choices": {"text": ["muscular and skeletal", "digestive and muscular", "skeletal and respiratory",
                                      "respiratory and digestive"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    "arc_challenge": {"id": "Mercury_SC_415702", "question": "George wants to warm his hands quickly by rubbing "
                      "them. Which skin surface will produce the most heat?", "choices": {"text": [
                          "dry palms", "wet palms", "palms covered with oil", "palms covered with lotion"],
                          "label": ["1", "2", "3", "4"]}, "answerKey": "1"},
    "piqa": {"goal": "How do I ready a guinea pig cage for it's new occupants?", "sol1": "Provide the guinea pig "
             "with a cage full of a few inches of bedding made of ripped paper strips.", "sol2": "Provide the guinea "
             "pig with a cage full of a few inches of bedding made of ripped jeans material.", "label": 0},
    "winogrande": {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
                   "option1": "Sarah", "option2": "Maria", "answer": "1"},
    "lambada": {"text": "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel."},
}


def test_ready_specs_make_lm_evaluation_harness_requests_from_published_layouts(tmp_path):
    for task, record in PUBLISHED.items():
        (tmp_path / f"{task}.jsonl").write_text(json.dumps(record) + "\n")
        [example] = load_task(f"{task}={tmp_path / f'{task}.jsonl'}").examples
        assert [(r.context, r.continuation) for r in example.requests] == lm_eval_requests(task, record), task
    assert load_task(f"arc_challenge={tmp_path / 'arc_challenge.jsonl'}").examples[0].gold == 0
    assert load_task(f"hellaswag={tmp_path / 'hellaswag.jsonl'}").examples[0].gold == 3
    table = pa.Table.from_pylist([PUBLISHED["piqa"], {**PUBLISHED["piqa"], "label": 1}])
    parquet.write_table(table, tmp_path / "piqa.parquet")
    assert [e.gold for e in load_task(f"piqa={tmp_path / 'piqa.parquet'}").examples] == [0, 1]


def test_the_built_in_task_is_the_true_next_line_of_a_function_among_four():
    task = load_task("python_next_line", examples=40)
    assert len(task.examples) == 40 and task.kind == "multiple_choice"
    assert task.examples == load_task("python_next_line", examples=40).examples  # the same in every run
    assert len({example.gold for example in task.examples}) == 4
    for example in task.examples:
        file, line = example.where.rsplit(" line ", 1)
        source = Path(file).read_text(encoding="utf-8").splitlines()[int(line) - 1:]
        context = example.requests[0].context.splitlines()
        assert [row.rstrip() for row in source[:len(context)]] == context and context[0].lstrip().startswith(
            ("def ", "async def "))
        true = source[len(context)]
        assert example.choices[example.gold] == true[:len(true) - len(true.lstrip())] + " ".join(true.split())
        assert len(set(example.choices)) == 4 and len({tuple(sorted(c.split())) for c in example.choices}) == 1


MC_SPEC = "kind: multiple_choice\npath: {path}\ncontext: 'Q: {{question}}'\nchoices: answers\ngold: right\n"


@pytest.mark.parametrize("line, expected", [
    ('{"question": "q", "answers": ["a", "b"]}', r"line 2: no field 'right' \(the spec's gold\)"),
    ('{"question": "q", "answers": ["a", "b"], "right": 2}', r"line 2: field 'right' \(the spec's gold\) is 2: it must "
                                                              r"be the index of the right choice, 0 to 1"),
    ('{"answers": ["a", "b"], "right": 0}', r"line 2: no field 'question' \(the spec's context\)"),
    ('{"question": "q", "answers": "a b", "right": 0}',
     r"line 2: field 'answers' \(the spec's choices\) must be a list"),
    ('{"question": "q", "answers": ["a", "b"], "right": 0', r"line 2: not a JSON object"),
])
def test_malformed_task_files_are_refused_naming_file_line_and_field(line, expected, tmp_path):
    data = tmp_path / "task.jsonl"
    data.write_text('{"question": "q", "answers": ["a", "b"], "right": 1}\n' + line + "\n")
    (tmp_path / "task.yaml").write_text(MC_SPEC.format(path=data.name))
    with pytest.raises(TaskError, match=f"^{data} {expected}"):
        load_task(str(tmp_path / "task.yaml"))


def test_malformed_specs_and_settings_are_refused(tmp_path, capsys):
    rows = tmp_path / "rows.parquet"
    parquet.write_table(pa.Table.from_pylist([{"question": "q", "answers": ["a", "b"], "right": 5}]), rows)
    (tmp_path / "task.yaml").write_text(MC_SPEC.format(path=rows.name))
    with pytest.raises(TaskError, match=rf"^{rows} row 1: field 'right' \(the spec's gold\) is 5"):
        load_task(str(tmp_path / "task.yaml"))
    (tmp_path / "typo.yaml").write_text(MC_SPEC.format(path=rows.name) + "choice: x\n")
    with pytest.raises(TaskError, match=r"typo.yaml: unknown setting\(s\) choice"):
        load_task(str(tmp_path / "typo.yaml"))
    with pytest.raises(TaskError, match=r"hellaswag.yaml: no data: give the task's file as hellaswag=FILE"):
        load_task("hellaswag")
    with pytest.raises(TaskError, match="'nope' is neither a ready spec"):
        load_task("nope")
    assert main(["eval", "--checkpoint", str(tmp_path), "--tasks", "nope"]) == 2
    assert "pretrain: " in capsys.readouterr().err
    for overrides, message in ((["downstream.interval=10"], "downstream.interval=10 needs downstream.tasks"),
                               (["downstream.interval=10", "downstream.tasks=[python_next_line]",
                                 "optimizer.zero_stage=3"], "not with optimizer.zero_stage=3"),
                               (["downstream.interval=10", "downstream.tasks=[python_next_line]"],
                                "needs a tokenizer: not with data.source=synthetic"),
                               (["downstream.interval=10", "downstream.tasks=[nope]"],
                                "downstream.tasks: task 'nope' is neither a ready spec")):
        with pytest.raises(ConfigError, match=message):
            validate(load(None, ["data.source=synthetic", "model.vocab_size=64", *overrides]), 1)
