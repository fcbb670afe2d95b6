"""Multi30k German -> English: the encoder-decoder Transformer of ``recipes/multi30k.yaml``.

What is measured: ``tansuo train recipes/multi30k.yaml --data-dir DIR`` through the library (train.de/en,
val.de/en, test_2016_flickr.de/en; validation BLEU with greedy decoding picks the best bundle), then the best
bundle translates test_2016_flickr twice, greedy and with the recipe's beam search, each timed.

Printed (and written to ``<out>/bench.json``), on test_2016_flickr: sacreBLEU (13a, cased, detokenized: the
figure to quote) and chrF, and the tokenized lower-cased BLEU beside the published anchor's **36.52**
(bentrevett/pytorch-seq2seq notebook 6: a 3 + 3-layer width-256 Transformer, 9.04M parameters, torchtext's
BLEU on lower-cased spaCy tokens; ours is sacreBLEU's on lower-cased 13a tokens, close to it but not the
same tokenizer), for beam search and greedy decoding; the wall time of the run against the 90-minute budget;
training tokens/s (target tokens, evaluation excluded) and translation speed (sentences/s). With spaCy
installed (the ``pii`` extra, in ``dev``), also the anchor's own protocol: BLEU of lower-cased spaCy tokens
(``spacy.blank``'s rule-based tokenizer, the one ``en_core_web_sm`` carries) computed as torchtext's
``bleu_score`` does (4-grams, uniform weights, corpus brevity penalty, no smoothing).

Run from the repository root::

    .venv/bin/python bench/multi30k.py --data-dir ../shared/data/multi30k

``--bundle DIR`` skips training and scores a bundle this benchmark (or ``tansuo train``) already wrote.
``--max-steps N`` cuts the run short (a smoke run: the target is for the full recipe); ``--set`` overrides
recipe fields (``--set data.src_lang=en --set data.tgt_lang=de`` for English -> German).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_device,
    add_max_steps,
    add_progress,
    add_sets,
    check_positive,
    fail,
    training_bench_main,
    training_start,
)

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "multi30k.yaml"
ANCHOR_BLEU = 36.52  # tokenized BLEU de -> en, bentrevett/pytorch-seq2seq notebook 6
TARGET = 36.5
BUDGET_S = 90 * 60
FILES = ("train", "val", "test_2016_flickr")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the Multi30k translation recipe and report BLEU and chrF.")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("../shared/data/multi30k"),
        help="folder holding train/val/test_2016_flickr .de and .en (default: %(default)s)",
    )
    p.add_argument("--recipe", type=Path, default=RECIPE, help="recipe YAML (default: %(default)s)")
    p.add_argument("--out", default="runs/bench-multi30k", help="run folder (default: %(default)s)")
    p.add_argument("--bundle", type=Path, default=None, help="score this bundle instead of training one")
    add_max_steps(p, "optimizer steps (smoke runs only: the target is for the full recipe)")
    add_device(p)
    add_progress(p)
    add_sets(p)
    args = p.parse_args(argv)
    check_positive(p, args, "max_steps")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tansuo.bundle import load_bundle
    from tansuo.recipe import load_recipe
    from tansuo.train.setup import train_recipe

    sets = [f"train.out_dir={json.dumps(args.out)}", f"train.device={args.device}"]
    if args.max_steps is not None:
        sets += [f"train.max_steps={args.max_steps}", "train.epochs=null"]
    rec, data_cfg = load_recipe(args.recipe, sets + args.sets, data_dir=args.data_dir)
    for name in FILES:
        for lang in (data_cfg.src_lang, data_cfg.tgt_lang):
            if not (args.data_dir / f"{name}.{lang}").is_file():
                fail(f"{args.data_dir / f'{name}.{lang}'} not found; pass --data-dir to the Multi30k folder")

    began: dict[str, float] = {}
    if args.bundle is None:
        out_dir = Path(rec.train.out_dir)
        start = training_start(rec, out_dir, began, batch=" pairs (or data.batch_tokens tokens)")
        started = time.perf_counter()  # the budget covers reading the data and training the vocabulary too
        done = train_recipe(rec, data_cfg, progress=args.progress, on_start=start)
        wall: float | None = time.perf_counter() - started
        result, device, steps = done.result, done.trainer.device, done.trainer.plan.total_steps
        bundle = Path(result["bundle"])
    else:
        from tansuo.device import resolve_device

        bundle, device, wall = args.bundle, resolve_device(args.device), None
        out_dir = bundle.parent
        result = json.loads((bundle / "metrics.json").read_text(encoding="utf-8"))
        steps = result.get("total_steps")

    best = load_bundle(bundle, device=device)
    split = best.task.heldout_split
    decoded = {}
    for name, beam in (("greedy", 1), ("beam", data_cfg.beam_size)):
        t0 = time.perf_counter()
        metrics = best.task.evaluate_with(best.model, split, rec.train.batch_size, device, beam)
        seconds = time.perf_counter() - t0
        decoded[name] = {**metrics, "seconds": seconds, "sentences_per_s": best.task.size(split) / seconds}
    rates = []
    if (out_dir / "metrics.jsonl").is_file():
        with open(out_dir / "metrics.jsonl", encoding="utf-8") as f:
            rates = [e["tokens_per_s"] for e in map(json.loads, f) if e.get("event") == "train"]
    beam = decoded["beam"]
    test = Path(data_cfg.test)  # resolved against --data-dir
    sources, references = (
        test.with_name(f"{test.name}.{lang}").read_text(encoding="utf-8").splitlines()
        for lang in (data_cfg.src_lang, data_cfg.tgt_lang)
    )
    hypotheses = best.task.translate(best.model, sources, device, data_cfg.beam_size)
    beam["bleu_spacy_lc"] = anchor_bleu(hypotheses, references, data_cfg.tgt_lang)
    return {
        "benchmark": "multi30k",
        "recipe": str(args.recipe),
        "direction": f"{data_cfg.src_lang}->{data_cfg.tgt_lang}",
        "data": str(args.data_dir),
        "out_dir": str(out_dir),
        "model": rec.model.name,
        "num_params": best.model.num_params(),
        "steps": steps,
        "best_step": result.get("step"),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus_busy_at_start": began.get("busy"),
        "val": result.get("val"),
        "split": split,
        "greedy": decoded["greedy"],
        "beam": beam,
        "beam_size": data_cfg.beam_size,
        "anchor_tokenized_bleu": ANCHOR_BLEU,
        "target_tokenized_bleu": TARGET,
        "passed": _tokenized(beam) >= TARGET and wall is not None and wall <= BUDGET_S,
        "full_length": args.max_steps is None,
        "wall_time_s": wall,
        "budget_s": BUDGET_S,
        "mean_train_tokens_per_s": sum(rates) / len(rates) if rates else None,
    }


def anchor_bleu(hypotheses: list[str], references: list[str], lang: str) -> float | None:
    """BLEU as the anchor's notebook computes it: torchtext's ``bleu_score`` on lower-cased spaCy tokens.

    torchtext's corpus BLEU (4-grams, uniform weights, the corpus brevity penalty, no smoothing) equals
    sacreBLEU's on the same tokens joined by spaces with no further tokenization. None without spaCy.
    """
    try:
        import spacy
    except ImportError:
        return None
    import sacrebleu

    tokenizer = spacy.blank(lang).tokenizer

    def tokens(text: str) -> str:
        return " ".join(t.text.lower() for t in tokenizer(text.strip()) if not t.is_space)

    hyps, refs = [tokens(h) for h in hypotheses], [tokens(r) for r in references]
    return float(sacrebleu.corpus_bleu(hyps, [refs], tokenize="none", smooth_method="none", force=True).score)


def _tokenized(beam: dict[str, Any]) -> float:
    """The figure held against the anchor: its own protocol (spaCy tokens) when spaCy is there."""
    spacy_bleu = beam.get("bleu_spacy_lc")
    return beam["bleu_tok_lc"] if spacy_bleu is None else spacy_bleu


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    note = "" if r["full_length"] else "  (a --max-steps smoke run: the target is for the full recipe)"
    g, b = r["greedy"], r["beam"]
    print()
    print(f"{r['direction']} on {r['split']} · {r['model']} · {r['num_params']:,} parameters")
    print(f"{'':32}{'beam ' + str(r['beam_size']):>10}{'greedy':>10}{'beam - greedy':>15}")
    rows = [
        ("sacreBLEU (13a, cased, detok.)", "bleu"),
        ("chrF", "chrf"),
        ("tokenized lower-cased BLEU", "bleu_tok_lc"),
        ("sentences/s", "sentences_per_s"),
    ]
    for label, key in rows:
        print(f"{label:32}{b[key]:>10.2f}{g[key]:>10.2f}{b[key] - g[key]:>+15.2f}")
    if b.get("bleu_spacy_lc") is not None:
        print(f"{'BLEU, lower-cased spaCy tokens':32}{b['bleu_spacy_lc']:>10.2f}  (the anchor's protocol)")
    ratio = _tokenized(b) / r["anchor_tokenized_bleu"]
    print(
        f"anchor (tokenized BLEU)         {r['anchor_tokenized_bleu']:.2f}  ours/anchor {ratio:.3f}"
        f"  (target >= {r['target_tokenized_bleu']})"
    )
    print(f"best step          {r['best_step']} of {r['steps']}")
    if r["wall_time_s"] is None:
        print("wall time          not measured (--bundle: no training in this run)")
    else:
        print(f"wall time          {r['wall_time_s'] / 60:.1f} min  (budget {r['budget_s'] / 60:.0f} min)")
    if r["mean_train_tokens_per_s"]:
        print(f"train tokens/s     {r['mean_train_tokens_per_s']:.0f}  (target tokens, evaluation excluded)")
    print(f"result             {'PASS' if r['passed'] else 'FAIL'}{note}")


def main(argv: list[str] | None = None) -> None:
    training_bench_main(argv, parse_args, run, report)


if __name__ == "__main__":
    main()
