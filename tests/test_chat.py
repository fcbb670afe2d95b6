"""Chat: templates render as transformers' apply_chat_template renders them, decoding stops at the end of
turn and streams, and `tansuo chat` / `tansuo generate --chat` hold a conversation with a bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tansuo.bundle import save_bundle
from tansuo.data.chat import ChatError, render_chat
from tansuo.models import create_model
from tansuo.tasks.lm import LMDataConfig, LMTask
from tests.helpers import run

SMOL = (  # SmolLM2's template: a default system turn, loop.first, the generation prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STRICT = (  # a template that refuses, with bos/eos tokens and tojson
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('system only first') }}{% endif %}[{{ m['role'] }}] {{ m['content'] | tojson }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "Hi there! 你好 😀"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": 'Say "yes"\nplease'},
]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello there, how are you? fine thanks"] * 20, trainer)
    return tok


@pytest.mark.parametrize("template", [SMOL, STRICT])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_equals_transformers(template: str, generation_prompt: bool) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer(), bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    for messages in (CONVERSATION, [{"role": "system", "content": "Be brief."}, *CONVERSATION]):
        expected = ref.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
        ours = render_chat(
            template,
            messages,
            add_generation_prompt=generation_prompt,
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
        )
        assert ours == expected


def test_bad_conversations_and_missing_templates_are_chat_errors() -> None:
    with pytest.raises(ChatError, match="system only first"):
        render_chat(STRICT, [*CONVERSATION, {"role": "system", "content": "late"}])
    with pytest.raises(ChatError, match="message 0"):
        render_chat(SMOL, [{"role": "robot", "content": "x"}])
    with pytest.raises(ChatError, match="not a chat model"):
        render_chat(None, CONVERSATION)
    with pytest.raises(ChatError, match="compile"):
        render_chat("{% for %}", CONVERSATION)


def test_decoding_stops_at_the_end_of_turn_and_streams() -> None:
    torch.manual_seed(0)
    model = create_model("gpt_test").eval()
    idx = torch.randint(0, 64, (2, 5))
    streamed: list[torch.Tensor] = []
    full = model.generate(idx, 6, temperature=0)
    first = int(full[0, 5])
    out = model.generate(idx, 6, temperature=0, stop_tokens=[first], on_token=streamed.append)
    assert int(out[0, 5]) == first and torch.equal(out[0, 5:], torch.full_like(out[0, 5:], first))
    assert torch.equal(torch.cat(streamed, dim=1), out[:, 5:])  # every step streamed, in order
    if first not in full[1, 5:].tolist():  # row 1 never stops: decoding runs to the end
        assert out.shape[1] == 11 and torch.equal(out[1], full[1])
    every = model.generate(idx, 6, temperature=0, stop_tokens=range(64))
    assert every.shape[1] == 6  # everyone stopped at the first step


def save_chat_bundle(path: Path, scale: float = 1.0, **sizes: int) -> Path:
    """A tiny Llama-shaped chat model (random weights times ``scale``) with SmolLM2's template and a
    byte-level BPE tokenizer, saved at ``path``."""
    tok = _tokenizer()
    torch.manual_seed(0)
    shape = dict(num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=16, mlp_hidden=32, max_seq_len=256)
    model = create_model("llama", vocab_size=tok.get_vocab_size(), **{**shape, **sizes})
    if scale != 1.0:  # spread the logits, so greedy decoding has no near-ties
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
    model.model_name = "llama"
    chat = {"template": SMOL, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    task = LMTask(LMDataConfig(tokenizer="t.json", block_size=64), 0, tok, None, chat=chat)
    return save_bundle(path, model, task, {})


@pytest.fixture
def chat_bundle(tmp_path: Path) -> Path:
    return save_chat_bundle(tmp_path / "chat")


def test_chat_holds_a_conversation(chat_bundle: Path, monkeypatch, capsys) -> None:
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n\n/reset\nhow are you\n/exit\nnot read\n"))
    code, out, err = run(
        [
            "chat",
            str(chat_bundle),
            "--system",
            "Be brief.",
            "--max-new-tokens",
            "5",
            "--seed",
            "1",
            "--device",
            "cpu",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert len([line for line in out.splitlines() if line.strip()]) <= 2  # two answers, streamed
    from tansuo.bundle import load_bundle

    b = load_bundle(chat_bundle)
    prompt = b.task.chat_prompt([{"role": "user", "content": "hi"}])
    assert prompt.endswith("<|im_start|>assistant\n") and "helpful AI assistant" in prompt
    code, out, err = run(
        [
            "generate",
            str(chat_bundle),
            "--chat",
            "--prompt",
            "hello",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0 and "<|im_start|>" not in out, err
    code, _, err = run(["generate", str(chat_bundle), "--system", "x", "--prompt", "hi"], monkeypatch, capsys)
    assert code == 2 and "--chat" in err


def test_a_bundle_without_a_template_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    tok = _tokenizer()
    model = create_model("gpt_test", vocab_size=tok.get_vocab_size())
    task = LMTask(LMDataConfig(tokenizer="t.json", block_size=16), 0, tok, None)
    path = save_bundle(tmp_path / "plain", model, task, {})
    code, _, err = run(["chat", str(path), "--device", "cpu"], monkeypatch, capsys)
    assert code == 2 and "not a chat model" in err
