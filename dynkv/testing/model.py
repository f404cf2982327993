"""Random-weight Llama models that vLLM serves, written offline.

Tests, the demo and the end-to-end bench need a real model without
downloading one. :func:`write_model` writes a Llama-architecture checkpoint
(``config.json`` + ``model.safetensors``) in the preset's dtype and a
word-level tokenizer with a chat template, all from a seed: the same preset
and seed give the same bytes, so a written model is reused (and a cache
directory is safe to share between runs).

The weights are drawn wider than a trained model's (``initializer_range``
about 0.3): with the usual 0.02 a random model maps every prompt to nearly the
same flat distribution, greedy outputs stop depending on the prompt and the
top-2 logit gap is ~0, so a one-ulp difference between two servers would flip
tokens. :func:`greedy_report` measures both properties.

The tokenizer is one token per word: the vocabulary is fixed synthetic
syllable words (``"ka"``, ``"tomi"``, ...) after a few special tokens, so a
text of ``n`` vocabulary words is exactly ``n`` tokens and any token id in
``[FIRST_WORD_ID, vocab_size)`` decodes to a readable word.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

__all__ = [
    "FIRST_WORD_ID",
    "PRESETS",
    "ModelSpec",
    "greedy_report",
    "vocabulary",
    "write_model",
]

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Ids below this are special or reserved; word tokens start here.
FIRST_WORD_ID = 16
_MARKER = "dynkv_model.json"
_FORMAT_VERSION = 1
_ONSETS = "b d f g h k l m n p r s t v z ch sh th".split()
_VOWELS = "a e i o u".split()
# dtype name -> (torch attribute, bytes per element)
_DTYPES = {"float32": ("float32", 4), "bfloat16": ("bfloat16", 2)}
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a test model; see :data:`PRESETS`."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    initializer_range: float = 0.3
    dtype: str = "float32"  # "float32" or "bfloat16"
    # Sliding-window attention (Mistral / Gemma2 style): the window in tokens, and which layers use it
    # ("sliding_attention" or "full_attention" per layer; None: every layer slides when a window is set).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def elem_bytes(self) -> int:
        """Bytes of one weight (and KV) element in :attr:`dtype`."""
        return _DTYPES[self.dtype][1]

    def kv_bytes_per_token(self, elem_bytes: int = 4) -> int:
        """Bytes of K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_bytes


PRESETS: dict[str, ModelSpec] = {
    # Tests: starts and prefills in a blink on two CPU cores.
    "tiny": ModelSpec(
        num_layers=2, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
        vocab_size=1024, max_position_embeddings=4096,
    ),
    # Demo: a 1k-token prefill takes a clearly measurable time on two CPU
    # cores, while decode stays fast enough for a multi-turn run in minutes.
    "small": ModelSpec(
        num_layers=6, hidden_size=512, intermediate_size=1536, num_heads=8, num_kv_heads=4,
        vocab_size=2048, max_position_embeddings=8192,
    ),
    # The end-to-end GPU bench: Llama-3-8B's layers (KV: 32 layers, 8 KV
    # heads of 128, 128 KiB per token in bf16) with the word tokenizer's
    # vocabulary instead of 128k tokens, which would add 1.9 GiB of embeddings
    # and change neither the KV bytes nor the prefill's cost per token. The
    # narrower init keeps bf16 activations moderate over 32 layers of width
    # 4096 while logits still spread by several nats (decisive greedy tokens).
    "llama3-8b": ModelSpec(
        num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8,
        vocab_size=8192, max_position_embeddings=131072, initializer_range=0.1, dtype="bfloat16",
    ),
}


def vocabulary(vocab_size: int) -> list[str]:
    """The tokenizer's tokens in id order: specials, reserved, then words."""
    needed = vocab_size - FIRST_WORD_ID
    syllables = [o + v for o in _ONSETS for v in _VOWELS]
    words = list(syllables)
    for a in syllables:
        if len(words) >= needed:
            break
        words.extend(a + b for b in syllables)
    if needed <= 0 or len(words) < needed:
        raise ValueError(
            f"vocab_size {vocab_size} out of range: expected {FIRST_WORD_ID + 1} to "
            f"{FIRST_WORD_ID + len(syllables) ** 2 + len(syllables)}"
        )
    reserved = [f"<|reserved_{i}|>" for i in range(len(SPECIAL_TOKENS), FIRST_WORD_ID)]
    return list(SPECIAL_TOKENS) + reserved + words[:needed]


def _spec_for(preset: str, overrides: dict[str, Any]) -> ModelSpec:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}: expected one of {sorted(PRESETS)}")
    spec = replace(PRESETS[preset], **overrides)
    if spec.dtype not in _DTYPES:
        raise ValueError(f"model dtype {spec.dtype!r}: expected one of {sorted(_DTYPES)}")
    if spec.layer_types is not None:
        if spec.sliding_window is None or len(spec.layer_types) != spec.num_layers or not set(spec.layer_types) <= {
                "sliding_attention", "full_attention"}:
            raise ValueError(f"model layer_types {spec.layer_types}: expected one of 'sliding_attention' or "
                             f"'full_attention' per layer ({spec.num_layers}), with a sliding_window")
    if spec.hidden_size % spec.num_heads or spec.num_heads % spec.num_kv_heads:
        raise ValueError(
            f"model shape {spec}: hidden_size must divide by num_heads and num_heads by num_kv_heads"
        )
    return spec


def write_model(path: str | os.PathLike[str], *, preset: str = "tiny", seed: int = 0, threads: int | None = None,
                **overrides: Any) -> Path:
    """Write a random-weight Llama model (in the preset's dtype) and its tokenizer to ``path``.

    Parameters
    ----------
    path
        Directory to create. If it already holds the model of the same preset,
        overrides and seed, nothing is written.
    preset
        ``"tiny"`` (tests), ``"small"`` (demo) or ``"llama3-8b"`` (GPU bench,
        bf16, about 14 GiB); see :data:`PRESETS`.
    seed
        Seed of the weights; the same seed gives the same bytes.
    threads
        Threads drawing the weights (default: the CPU count, at most 32);
        the bytes do not depend on it.
    **overrides
        :class:`ModelSpec` fields replacing the preset's (``num_layers=4``...).

    Returns
    -------
    Path
        ``path``, ready for ``vllm serve <path>`` or ``from_pretrained``.
    """
    spec = _spec_for(preset, overrides)
    out = Path(path)
    fields = asdict(spec)
    if spec.dtype == "float32":
        del fields["dtype"]  # models written before the field existed are float32: same identity
    for name in ("sliding_window", "layer_types"):
        if fields[name] is None:
            del fields[name]  # likewise for models without a sliding window
        elif name == "layer_types":
            fields[name] = list(fields[name])  # as the marker's JSON reads back
    identity = {"format": _FORMAT_VERSION, "preset": preset, "seed": seed, "spec": fields}
    marker = out / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == identity:
                return out
        except ValueError:
            pass
        raise FileExistsError(
            f"{out} holds a different model than preset={preset!r} seed={seed} {overrides}; "
            "remove it or choose another path"
        )
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a dynkv test model; remove it or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_config(tmp, spec)
        _write_weights(tmp, spec, seed, threads or min(32, os.cpu_count() or 1))
        _write_tokenizer(tmp, spec)
        (tmp / _MARKER).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        try:
            tmp.rename(out)
        except OSError:
            # Another process wrote the same model first; same bytes, keep theirs.
            if not (out / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _llama_config(spec: ModelSpec) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        dtype=spec.dtype,
    )


def _write_config(out: Path, spec: ModelSpec) -> None:
    cfg = _llama_config(spec).to_dict()
    if spec.sliding_window is not None:
        # vLLM's Llama reads a per-layer window from layer_types; without them every layer slides.
        cfg["sliding_window"] = spec.sliding_window
        cfg["layer_types"] = list(spec.layer_types or ["sliding_attention"] * spec.num_layers)
    # The transformers version would make the bytes depend on the install.
    cfg.pop("transformers_version", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")


def _write_weights(out: Path, spec: ModelSpec, seed: int, threads: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(_llama_config(spec)).state_dict().items()}
    dtype = getattr(torch, _DTYPES[spec.dtype][0])

    def draw(name: str) -> Any:
        if name.endswith("norm.weight"):
            return torch.ones(shapes[name], dtype=dtype)
        # One generator per tensor, seeded by its name: the bytes depend
        # neither on the order transformers lists parameters in nor on threads.
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        return (torch.randn(shapes[name], generator=g, dtype=torch.float32) * spec.initializer_range).to(dtype)

    names = sorted(shapes)
    # An 8B model is 7e9 draws: one tensor per thread (torch releases the GIL) makes it seconds, not minutes.
    with ThreadPoolExecutor(max(1, threads)) as pool:
        tensors = dict(zip(names, pool.map(draw, names)))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_tokenizer(out: Path, spec: ModelSpec) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = vocabulary(spec.vocab_size)
    vocab = {t if i < FIRST_WORD_ID else "\u2581" + t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.add_special_tokens(tokens[:FIRST_WORD_ID])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=_CHAT_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
    )
    fast.save_pretrained(str(out))


def greedy_report(path: str | os.PathLike[str], prompts: Sequence[Sequence[int]], steps: int = 8) -> dict[str, Any]:
    """Greedy continuations of ``prompts`` with transformers, and how decisive they are.

    Parameters
    ----------
    path
        A model written by :func:`write_model` (any Llama checkpoint works).
    prompts
        Token-id prompts.
    steps
        Tokens to generate per prompt.

    Returns
    -------
    dict
        ``outputs`` (generated ids per prompt), ``distinct`` (number of
        different outputs), ``min_top2_gap`` and ``median_top2_gap`` (log-prob
        difference between the best and second-best token over every step:
        near 0 means ties that numeric noise can flip), ``digest`` (sha256 of
        the outputs).
    """
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    outputs: list[list[int]] = []
    gaps: list[float] = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([list(prompt)], dtype=torch.long)
            new: list[int] = []
            for _ in range(steps):
                logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
                top = torch.topk(logprobs, 2)
                gaps.append(float(top.values[0] - top.values[1]))
                nxt = int(top.indices[0])
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            outputs.append(new)
    ordered = sorted(gaps)
    return {
        "outputs": outputs,
        "distinct": len({tuple(o) for o in outputs}),
        "min_top2_gap": ordered[0] if ordered else float("nan"),
        "median_top2_gap": ordered[len(ordered) // 2] if ordered else float("nan"),
        "digest": hashlib.sha256(json.dumps(outputs).encode()).hexdigest(),
    }
