"""`tansuo import hf`: Hugging Face BERT folders become bundles that match transformers' outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from tansuo.bundle import load_bundle
from tansuo.errors import TansuoError
from tansuo.importer import import_hf
from tansuo.models.hf import HFImportError
from tansuo.tasks.classify import ClassifyTask
from tansuo.tasks.mlm import MLMTask
from tests.helpers import run

ATOL = 1e-5  # float32
WORDS = ["the", "a", "film", "movie", "was", "good", "bad", "great", "dull", "plot", "[MASK]"]
HF_CONFIG = dict(
    vocab_size=5 + len(WORDS),
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
TEXTS = ["the film was good", "a dull , dull plot", "great movie"]


def _vocab(folder: Path) -> None:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *WORDS[:-1]]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # fresh LayerNorms and biases are ones and zeros: perturb them so they are tested
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _hf_inputs(folder: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    tok = transformers.BertTokenizerFast.from_pretrained(str(folder))  # reads vocab.txt
    assert tok.unk_token_id not in tok(texts)["input_ids"][0]  # the vocabulary was read
    return tok(texts, return_tensors="pt", padding=True)


@pytest.fixture
def classifier_folder(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    config = transformers.BertConfig(**HF_CONFIG, num_labels=3, id2label={0: "neg", 1: "neutral", 2: "pos"})
    hf = _perturbed(transformers.BertForSequenceClassification(config))
    folder = tmp_path / "hf-classifier"
    hf.save_pretrained(folder)
    _vocab(folder)
    return folder, hf


@pytest.fixture
def mlm_folder(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(1)
    hf = _perturbed(transformers.BertForMaskedLM(transformers.BertConfig(**HF_CONFIG)))
    folder = tmp_path / "hf-mlm"
    hf.save_pretrained(folder, safe_serialization=False)  # pytorch_model.bin, read with weights_only
    _vocab(folder)
    return folder, hf


def test_classifier_checkpoint_becomes_a_classify_bundle(classifier_folder, tmp_path: Path) -> None:
    folder, hf = classifier_folder
    report = import_hf(folder, tmp_path / "bundle")
    assert report.task == "classify" and report.labels == ["neg", "neutral", "pos"]
    assert all(name.startswith("mlm_head.") for name in report.fresh)
    bundle = load_bundle(tmp_path / "bundle")
    assert isinstance(bundle.task, ClassifyTask)
    assert bundle.config["origin"]["architectures"] == ["BertForSequenceClassification"]
    rows = bundle.task.predict(bundle.model, TEXTS, torch.device("cpu"))
    with torch.no_grad():
        expected = hf(**_hf_inputs(folder, TEXTS)).logits.softmax(-1)
    for row, probs in zip(rows, expected, strict=True):
        got = torch.tensor([row["probabilities"][label] for label in ["neg", "neutral", "pos"]])
        torch.testing.assert_close(got, probs, atol=ATOL, rtol=0)
        assert row["label"] == ["neg", "neutral", "pos"][int(probs.argmax())]


def test_labels_flag_renames_classes_and_is_checked(classifier_folder, mlm_folder, tmp_path: Path) -> None:
    folder, _ = classifier_folder
    report = import_hf(folder, tmp_path / "b", labels=["bad", "so-so", "good"])
    assert load_bundle(report.bundle).task.labels == ["bad", "so-so", "good"]
    with pytest.raises(TansuoError, match="3 outputs"):
        import_hf(folder, tmp_path / "c", labels=["bad", "good"])
    with pytest.raises(TansuoError, match="no classifier"):
        import_hf(mlm_folder[0], tmp_path / "d", labels=["bad", "good"])
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()  # nothing written


def test_masked_lm_checkpoint_becomes_an_mlm_bundle(mlm_folder, tmp_path: Path) -> None:
    folder, hf = mlm_folder
    report = import_hf(folder, tmp_path / "bundle")
    assert report.task == "mlm"
    assert set(report.fresh) == {"pooler.weight", "pooler.bias"}  # BertForMaskedLM has no pooler; all MLM
    bundle = load_bundle(tmp_path / "bundle")
    assert isinstance(bundle.task, MLMTask) and bundle.model.config.num_classes == 0
    inputs = _hf_inputs(folder, ["the film was [MASK]"])
    with torch.no_grad():
        expected = hf(**inputs).logits  # (1, T, V)
        features = bundle.model.forward_features(inputs["input_ids"], inputs["attention_mask"])
        torch.testing.assert_close(bundle.model.mlm_logits(features), expected, atol=ATOL, rtol=0)
    [row] = bundle.task.predict(bundle.model, ["the film was [MASK]"], torch.device("cpu"))
    position = inputs["input_ids"][0].tolist().index(4)
    top = bundle.task.tokenizer.id_to_token(int(expected[0, position].argmax()))
    assert row["masks"][0][0]["token"] == top


def test_base_model_with_tokenizer_json_keeps_its_tokenizer(mlm_folder, tmp_path: Path) -> None:
    folder, hf = mlm_folder
    base = tmp_path / "base"
    hf.bert.save_pretrained(base)  # BertModel: no heads
    tok = transformers.BertTokenizerFast.from_pretrained(str(folder))
    tok.save_pretrained(base)  # tokenizer.json (with vocab.txt)
    report = import_hf(base, tmp_path / "bundle")
    assert report.task == "mlm" and "mlm_head.dense.weight" in report.fresh
    bundle = load_bundle(report.bundle)
    ours = bundle.task.tokenizer.encode("The FILM was good")
    assert ours.ids == tok("The FILM was good")["input_ids"]


def test_unsupported_and_incomplete_folders_say_what_works(tmp_path: Path) -> None:
    gpt = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)).save_pretrained(gpt)
    with pytest.raises(HFImportError, match="no tokenizer.json"):  # a decoder is imported with its tokenizer
        import_hf(gpt, tmp_path / "out")
    opt = tmp_path / "opt"
    opt.mkdir()
    (opt / "config.json").write_text(json.dumps({"model_type": "opt"}), encoding="utf-8")
    with pytest.raises(HFImportError, match="'opt'; tansuo imports encoders of model_type bert and decoders"):
        import_hf(opt, tmp_path / "out")
    with pytest.raises(HFImportError, match="config.json"):
        import_hf(tmp_path, tmp_path / "out")
    no_vocab = tmp_path / "no-vocab"
    transformers.BertModel(transformers.BertConfig(**HF_CONFIG)).save_pretrained(no_vocab)
    with pytest.raises(HFImportError, match="neither tokenizer.json nor vocab.txt"):
        import_hf(no_vocab, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_import_then_predict(classifier_folder, monkeypatch, capsys, tmp_path: Path) -> None:
    folder, _ = classifier_folder
    out = tmp_path / "bundle"
    code, stdout, err = run(
        ["import", "hf", str(folder), "--out", str(out), "--labels", "n,m,p"], monkeypatch, capsys
    )
    assert code == 0, err
    assert "task classify" in stdout and "'n', 'm', 'p'" in stdout
    code, stdout, err = run(["predict", str(out), "the film was good", "--json"], monkeypatch, capsys)
    assert code == 0, err
    row = json.loads(stdout.strip().splitlines()[-1])
    assert row["label"] in {"n", "m", "p"} and set(row["probabilities"]) == {"n", "m", "p"}


def test_cli_import_of_an_unsupported_folder_exits_2(monkeypatch, capsys, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}), encoding="utf-8")
    code, _, err = run(["import", "hf", str(tmp_path), "--out", str(tmp_path / "b")], monkeypatch, capsys)
    assert code == 2 and "'t5'" in err and "bert" in err
