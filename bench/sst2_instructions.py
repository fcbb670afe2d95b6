"""SST-2 as instructions: SmolLM2-135M-Instruct LoRA-tuned by ``recipes/smollm-lora.yaml``, scored on the
answers it generates before and after.

The instruction set (``build``) asks "Is this review positive or negative?" followed by an SST-2 sentence and
answers "positive" or "negative": training examples from train.tsv (sentences of at least ``--min-words``
words, so phrases are left out), held-back ones from GLUE's dev.tsv, which training never sees; both drawn
with a seed, half of each label. ``score`` asks a bundle each held-back question (its chat template, greedy
decoding up to the end of its turn) and counts a reply right when the first of "positive" / "negative" in it
is the label; a reply naming neither counts wrong (and is counted). ``run`` does both around the training:
build, score the base model, train the recipe, score the tuned bundle.

Run from the repository root (``make smollm`` imports the model into models/smollm2-135m-instruct)::

    .venv/bin/python bench/sst2_instructions.py run --data-dir ../shared/data/sst2
    .venv/bin/python bench/sst2_instructions.py build --data-dir ../shared/data/sst2  # runs/sst2-instructions
    .venv/bin/python bench/sst2_instructions.py score models/smollm2-135m-instruct runs/smollm-lora/bundle
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path
from typing import Any

from _common import (
    add_device,
    add_max_steps,
    add_progress,
    add_sets,
    bench_main,
    check_positive,
    fail,
    header,
)

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm-lora.yaml"
BASE = REPO / "models" / "smollm2-135m-instruct"
QUESTION = "Is this review positive or negative?"
ANSWERS = ("negative", "positive")  # label 0, label 1


# ------------------------------------------------------------------------------------------------ the set
def read_sst2(path: Path, min_words: int = 0) -> list[tuple[str, int]]:
    """(sentence, label) rows of an SST-2 TSV (header ``sentence<TAB>label``), without duplicates, keeping
    sentences of at least ``min_words`` words."""
    if not path.is_file():
        fail(f"{path} not found; pass --data-dir to the folder with SST-2's train.tsv and dev.tsv")
    rows, seen = [], set()
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            sentence = row["sentence"].strip()
            if sentence not in seen and len(sentence.split()) >= min_words:
                seen.add(sentence)
                rows.append((sentence, int(row["label"])))
    return rows


def balanced_sample(rows: list[tuple[str, int]], n: int, rng: random.Random) -> list[tuple[str, int]]:
    """``n`` rows drawn with ``rng``, half of each label (the odd one positive), in a shuffled order."""
    by_label = {label: [r for r in rows if r[1] == label] for label in (0, 1)}
    want = {0: n // 2, 1: n - n // 2}
    for label, k in want.items():
        if len(by_label[label]) < k:
            fail(f"only {len(by_label[label])} {ANSWERS[label]} sentences to draw {k} from; ask for fewer")
    picked = [r for label, k in want.items() for r in rng.sample(by_label[label], k)]
    rng.shuffle(picked)
    return picked


def instruction(sentence: str, label: int) -> dict[str, str]:
    """One example of the set, in the ``lm`` task's prompt / response form."""
    return {"prompt": f"{QUESTION}\n\n{sentence}", "response": ANSWERS[label]}


def build(
    data_dir: Path, out: Path, n_train: int, n_heldout: int, seed: int, min_words: int
) -> dict[str, Any]:
    """Write ``out/train.jsonl`` (from train.tsv) and ``out/heldout.jsonl`` (from dev.tsv)."""
    rng = random.Random(seed)
    train = balanced_sample(read_sst2(data_dir / "train.tsv", min_words), n_train, rng)
    heldout = balanced_sample(read_sst2(data_dir / "dev.tsv"), n_heldout, rng)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        lines = [json.dumps(instruction(s, y), ensure_ascii=False) for s, y in rows]
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"folder": str(out), "train": len(train), "heldout": len(heldout), "seed": seed}


# ------------------------------------------------------------------------------------------------ scoring
def parse_answer(reply: str) -> str | None:
    """The first of "positive" / "negative" in a reply (any case), or None when it names neither."""
    text = reply.lower()
    found = [(text.find(a), a) for a in ANSWERS if a in text]
    return min(found)[1] if found else None


def score(bundle: Path, heldout: Path, limit: int | None, device: str, max_new_tokens: int) -> dict[str, Any]:
    """Accuracy of a bundle's greedy answers to the held-back questions (its own chat template)."""
    from tansuo.bundle import load_bundle
    from tansuo.data.instructions import read_conversations
    from tansuo.device import resolve_device

    dev = resolve_device(device)
    b = load_bundle(bundle, device=dev)
    examples = read_conversations(heldout)[:limit]
    right = unanswered = 0
    replies = []
    began = time.perf_counter()
    for ex in examples:
        question, answer = ex.messages[:-1], ex.messages[-1]["content"]
        reply = b.task.reply(b.model, question, max_new_tokens=max_new_tokens, temperature=0.0, device=dev)
        said = parse_answer(reply)
        right += said == answer
        unanswered += said is None
        if len(replies) < 5:
            replies.append(reply)
    seconds = time.perf_counter() - began
    return {
        "bundle": str(bundle),
        "examples": len(examples),
        "accuracy": right / len(examples),
        "unanswered": unanswered,
        "seconds": round(seconds, 1),
        "first_replies": replies,
    }


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SST-2 as instructions: build the set, score bundles, or both.")
    sub = p.add_subparsers(dest="command", required=True)

    def set_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--data-dir", type=Path, required=True, help="folder with SST-2's train.tsv and dev.tsv"
        )
        q.add_argument(
            "--out", type=Path, default=Path("runs/sst2-instructions"), help="where the JSONL goes"
        )
        q.add_argument("--train", type=int, default=2000, help="training examples (default 2000)")
        q.add_argument(
            "--heldout", type=int, default=200, help="held-back examples from dev.tsv (default 200)"
        )
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--min-words", type=int, default=6, help="shortest training sentence, in words")

    def score_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--limit", type=int, default=None, help="score only the first N held-back questions")
        q.add_argument("--max-new-tokens", type=int, default=8, help="longest reply (default 8 tokens)")
        add_device(q)

    b = sub.add_parser("build", help="write train.jsonl and heldout.jsonl")
    set_flags(b)
    s = sub.add_parser("score", help="held-back accuracy of bundles' generated answers")
    s.add_argument("bundles", type=Path, nargs="+")
    s.add_argument(
        "--heldout",
        dest="heldout_file",
        type=Path,
        default=Path("runs/sst2-instructions/heldout.jsonl"),
        help="the held-back questions (default: %(default)s)",
    )
    score_flags(s)
    r = sub.add_parser("run", help="build, score the base model, train the recipe, score the tuned bundle")
    set_flags(r)
    score_flags(r)
    r.add_argument("--recipe", type=Path, default=RECIPE)
    r.add_argument("--base", type=Path, default=BASE, help="the model before tuning (default: %(default)s)")
    add_max_steps(r, "cut the training short (a smoke test)")
    add_sets(r)
    add_progress(r)
    p.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    args = p.parse_args(argv)
    check_positive(p, args, *(n for n in ("train", "heldout", "limit", "max_steps") if hasattr(args, n)))
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "build":
        return {"built": build(args.data_dir, args.out, args.train, args.heldout, args.seed, args.min_words)}
    if args.command == "score":
        return {
            "scores": [
                score(b, args.heldout_file, args.limit, args.device, args.max_new_tokens)
                for b in args.bundles
            ]
        }
    from tansuo.recipe import load_recipe
    from tansuo.train.setup import train_recipe

    built = build(args.data_dir, args.out, args.train, args.heldout, args.seed, args.min_words)
    heldout = args.out / "heldout.jsonl"
    before = score(args.base, heldout, args.limit, args.device, args.max_new_tokens)
    sets = [*args.sets, *([f"train.max_steps={args.max_steps}"] if args.max_steps else [])]
    rec, data = load_recipe(args.recipe, sets=sets, data_dir=args.out)
    print(header(f"training {args.recipe.name} on {built['train']} examples"), flush=True)
    began = time.perf_counter()
    trained = train_recipe(rec, data, progress=args.progress)
    minutes = (time.perf_counter() - began) / 60
    after = score(trained.bundle, heldout, args.limit, args.device, args.max_new_tokens)
    return {
        "built": built,
        "scores": [before, after],
        "train_minutes": round(minutes, 1),
        "step": trained.result["step"],
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    if "built" in r:
        b = r["built"]
        print(
            f"wrote {b['train']} training and {b['heldout']} held-back examples to {b['folder']} "
            f"(seed {b['seed']})"
        )
    if "train_minutes" in r:
        print(f"trained to step {r['step']} in {r['train_minutes']} minutes")
    for s in r.get("scores", []):
        print(
            f"{s['bundle']}: {100 * s['accuracy']:.1f}% of {s['examples']} held-back answers right, "
            f"{s['unanswered']} naming neither label ({s['seconds']} s)"
        )
        for reply in s["first_replies"]:
            print(f"    {reply!r}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(argv, parse_args, run, report, figures=lambda r, args: args.json, library_logs=True)


if __name__ == "__main__":
    main()
