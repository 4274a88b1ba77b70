#!/usr/bin/env bash
# `make demo`: a corpus -> sentencepiece tokenizer -> tokenized shards -> training of the tiny
# model on them, with a held-out validation split, samples every 100 steps and the downstream task
# python_next_line (made from the held-out files of the default corpus) every 50 steps -> export to
# Hugging Face -> a completion by `transformers` from the export. Needs no download: by default the corpus is
# this Python's own standard library sources. DATA="files..." uses your files instead (any input
# `pretrain data build` takes: JSON lines plain or compressed, parquet, folders, globs, text).
# Everything goes to DEMO_DIR (runs/demo): a folder the demo made (it holds .demo), whose outputs a
# rerun replaces, or a new or empty one; any other is refused, and nothing else is deleted.
# `launch/demo.sh --clean` (`make clean`) only removes those outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO_DIR=${DEMO_DIR:-runs/demo}
STEPS=${STEPS:-300}

clean_only=$([ "${1:-}" = "--clean" ] && echo 1 || echo 0)
if [ -f "$DEMO_DIR/.demo" ]; then
  for made in tokenizer shards valid log checkpoints hf; do rm -rf "${DEMO_DIR:?}/$made"; done
elif [ "$clean_only" = 0 ] && [ -d "$DEMO_DIR" ] && [ -n "$(ls -A "$DEMO_DIR")" ]; then
  echo "demo: $DEMO_DIR is not empty and was not made by the demo (no .demo in it): run it with another" \
    "DEMO_DIR=..., or empty that folder yourself" >&2
  exit 2
fi
[ "$clean_only" = 1 ] && exit 0
mkdir -p "$DEMO_DIR"
touch "$DEMO_DIR/.demo"

if [ -n "${DATA:-}" ]; then
  read -r -a files <<< "$DATA"
else
  mapfile -t files < <("$PY" -c 'import pathlib, sysconfig
root = pathlib.Path(sysconfig.get_paths()["stdlib"])
print("\n".join(sorted(str(p) for p in root.rglob("*.py") if "site-packages" not in p.parts)))')
fi
# every 20th file is held out for validation
train=() valid=()
for i in "${!files[@]}"; do
  if (( i % 20 == 19 )); then valid+=("${files[$i]}"); else train+=("${files[$i]}"); fi
done
[ ${#valid[@]} -gt 0 ] || valid=("${files[@]: -1}")
echo "demo: ${#train[@]} training files, ${#valid[@]} validation files -> $DEMO_DIR"

"$PY" -m pretrain tokenizer train --input "${train[@]}" --vocab-size 4096 --out "$DEMO_DIR/tokenizer"
"$PY" -m pretrain data build --input "${train[@]}" --tokenizer "$DEMO_DIR/tokenizer" --seq-len 256 \
  --out "$DEMO_DIR/shards" --shard-samples 4000 --workers 2
"$PY" -m pretrain data build --input "${valid[@]}" --tokenizer "$DEMO_DIR/tokenizer" --seq-len 256 \
  --out "$DEMO_DIR/valid" --shard-samples 4000 --workers 2
"$PY" -m pretrain train --config configs/tiny.yaml \
  data.source=shards data.path="$DEMO_DIR/shards" data.valid_path="$DEMO_DIR/valid" \
  model.vocab_size=0 model.seq_len=256 model.hidden_size=128 model.ffn_hidden_size=352 \
  train.max_steps="$STEPS" train.eval_interval=100 train.eval_steps=4 schedule.warmup_steps=30 \
  optimizer.lr=2e-3 log.dir="$DEMO_DIR/log" log.interval=25 checkpoint.dir="$DEMO_DIR/checkpoints" \
  log.sample_interval=100 'log.sample_prompts=["def main(","import "]' log.sample_tokens=24 \
  'downstream.tasks=[python_next_line]' downstream.interval=50 downstream.examples=500
"$PY" -m pretrain convert to-hf --checkpoint "$DEMO_DIR/checkpoints" --out "$DEMO_DIR/hf" --dtype fp32
echo "demo: transformers completes 'def main(' with the exported model in $DEMO_DIR/hf:"
"$PY" - "$DEMO_DIR/hf" <<'EOF'
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tokenizer("def main(", return_tensors="pt").input_ids
new = model.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
print("def main(" + tokenizer.decode(new, skip_special_tokens=True))
EOF
