"""RecBole's side of ``bench/recbole_compare.py``: run by the Python of RecBole's own virtual environment
(``make recbole``), never imports tansuo. Reads the spec (JSON) from ``--worker``: the atomic data folder
and dataset name, epochs, threads, seed. Trains RecBole's SASRec with its defaults (``SASRec.yaml``: 2
layers, 2 heads, width 64, inner 256, dropout 0.5, CE loss; training batch 2048, Adam, lr 1e-3) on the
leave-one-out split ordered by time (``eval_args: split LS valid_and_test, order TO``), histories of 50,
validating NDCG@10 each epoch, then evaluates the model of the last epoch on test twice: full ranking
(``mode: full``) and against 100 uniformly sampled negatives (``mode: uni100``). Prints one JSON line.

The last epoch's model, not the best validated one: RecBole 1.2.1 reloads its best checkpoint with
``torch.load`` of a pickled dict, which torch >= 2.6 refuses by default (``weights_only``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    spec = json.loads(p.parse_args().worker)

    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    torch.set_num_threads(spec["threads"])
    logging.disable(logging.INFO)  # RecBole logs every batch's progress otherwise
    settings = {
        "data_path": spec["data_path"],
        "checkpoint_dir": spec["checkpoint_dir"],
        "epochs": spec["epochs"],
        "seed": spec["seed"],
        "reproducibility": True,
        "use_gpu": False,
        "show_progress": False,
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": 50,
        "train_neg_sample_args": None,  # CE loss: no negatives
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Hit", "NDCG", "MRR"],
        "topk": [5, 10, 20],
        "valid_metric": "NDCG@10",
        "eval_step": 1,
        "stopping_step": spec["epochs"] + 1,
    }
    config = Config(model="SASRec", dataset=spec["dataset"], config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = SASRec(config, train_data.dataset)
    trainer = Trainer(config, model)

    epoch_times: list[float] = []
    original = trainer._train_epoch

    def timed_epoch(*args, **kwargs):  # training time of each epoch (validation excluded)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        epoch_times.append(time.perf_counter() - start)
        return out

    trainer._train_epoch = timed_epoch
    began = time.perf_counter()
    best_valid, valid_result = trainer.fit(train_data, valid_data, saved=False, show_progress=False)
    fit_s = time.perf_counter() - began
    full = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    sampled_settings = {**settings, "eval_args": {**settings["eval_args"], "mode": "uni100"}}
    sampled_config = Config(model="SASRec", dataset=spec["dataset"], config_dict=sampled_settings)
    init_seed(sampled_config["seed"], sampled_config["reproducibility"])
    _, _, sampled_test = data_preparation(sampled_config, create_dataset(sampled_config))
    sampled = trainer.evaluate(sampled_test, load_best_model=False, show_progress=False)
    print(
        json.dumps(
            {
                "recbole": __import__("recbole").__version__,
                "torch": torch.__version__,
                "num_params": sum(p.numel() for p in model.parameters()),
                "users": dataset.user_num - 1,
                "items": dataset.item_num - 1,
                "epochs": spec["epochs"],
                "epoch_train_s": epoch_times,
                "fit_s": fit_s,
                "valid_last": {k: float(v) for k, v in dict(valid_result).items()},
                "test_full": {k: float(v) for k, v in dict(full).items()},
                "test_sampled": {k: float(v) for k, v in dict(sampled).items()},
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
