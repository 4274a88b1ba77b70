"""Small downstream task files made of the test vocabulary, with the same records as
lm-evaluation-harness tasks (local JSON, its own YAML): a multiple-choice task (contexts with
trailing spaces, an empty one, some longer than model.seq_len, 2 to 5 choices), LAMBADA-style
cloze records for the ready `lambada` spec and Winogrande-style records for `winogrande`."""

import json
import random
from pathlib import Path

from test_data import WORDS

WINOGRANDE_FUNCTIONS = '''
def doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def doc_to_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def doc_to_choice(doc):
    start = doc["sentence"][:doc["sentence"].index("_")]
    return [start + doc["option1"], start + doc["option2"]]
'''
VISIBLE = [word for word in WORDS if word.strip()]


def _words(rng: random.Random, low: int, high: int, words: list[str] = WORDS) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))


def write_tasks(root: Path, seed: int = 5) -> dict:
    """The task files under `root`: our task references (`tasks`), lm-evaluation-harness's task
    folder (`lm_eval_dir`) and its task name for each of ours (`lm_eval_names`)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    mc = []
    for index in range(24):
        context = "" if index == 5 else _words(rng, 1, 40, VISIBLE) + (" " if index % 3 == 0 else "")
        choices = [_words(rng, 1, 6) for _ in range(rng.randint(2, 5))]
        mc.append({"context": context, "choices": choices, "gold": rng.randrange(len(choices))})
    cloze = [{"text": _words(rng, 1, 30) + " " + rng.choice(VISIBLE)} for _ in range(12)]
    wino = [{"sentence": f"{_words(rng, 1, 12)} _ {_words(rng, 1, 8)}", "option1": rng.choice(VISIBLE),
             "option2": _words(rng, 1, 2, VISIBLE), "answer": rng.choice("12")} for _ in range(10)]
    for name, records in (("mc", mc), ("cloze", cloze), ("wino", wino)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "mc.yaml").write_text("kind: multiple_choice\npath: mc.jsonl\ncontext: '{context}'\nchoices: choices\n"
                                  "gold: gold\n")
    lm_eval_dir = root / "lm_eval"
    lm_eval_dir.mkdir(exist_ok=True)
    (lm_eval_dir / "wino_functions.py").write_text(WINOGRANDE_FUNCTIONS)
    common = "dataset_path: json\ntest_split: test\n"
    specs = {
        "local_mc": "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: gold\n"
                    "metric_list: [{metric: acc}, {metric: acc_norm}, {metric: acc_bytes}]\n",
        "local_lambada": "output_type: loglikelihood\ndoc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
                         "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
                         "metric_list: [{metric: perplexity, aggregation: perplexity}, {metric: acc}]\n",
        "local_winogrande": "output_type: multiple_choice\ndoc_to_text: !function wino_functions.doc_to_text\n"
                            "doc_to_target: !function wino_functions.doc_to_target\n"
                            "doc_to_choice: !function wino_functions.doc_to_choice\nmetric_list: [{metric: acc}]\n",
    }
    for (name, spec), data in zip(specs.items(), ("mc", "cloze", "wino")):
        (lm_eval_dir / f"{name}.yaml").write_text(
            f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n    test: {root / f'{data}.jsonl'}\n{spec}")
    return {"tasks": [str(root / "mc.yaml"), f"lambada={root / 'cloze.jsonl'}", f"winogrande={root / 'wino.jsonl'}"],
            "lm_eval_dir": str(lm_eval_dir), "lm_eval_names": {"mc": "local_mc", "lambada": "local_lambada",
                                                                "winogrande": "local_winogrande"}}
