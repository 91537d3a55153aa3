"""The embedded default model ``tiny``: a small Llama with a tokenizer trained locally on the tasks' language.

No model can be downloaded at run time (docs/method.md §9), so ``--model tiny`` resolves to a model that
is *built* on first use from a :class:`TinySpec` and cached on disk. Design decisions:

- **Architecture.** ``LlamaForCausalLM`` with hidden 192, 4 layers, 4 heads (head dim 48, no GQA),
  SwiGLU intermediate 512, RMSNorm, RoPE, tied input/output embeddings and a 2048-token context:
  2,557,632 parameters with the default spec (1–5M is what makes ``quickstart`` run on 2 CPU cores).
- **Deterministic weights.** Parameters are filled explicitly, in name order, from one seeded CPU
  :class:`torch.Generator` (matrices ~ N(0, 0.02²), residual output projections ``o_proj``/``down_proj``
  scaled by 1/sqrt(2·layers) as in GPT-2, norm weights 1). We do not rely on transformers' own
  ``_init_weights`` (whose order and RNG use may change between versions) nor on the global RNG, so the
  same spec gives a bit-identical ``model.safetensors`` and the caller's RNG state is untouched.
- **Tokenizer.** Byte-level BPE (``tokenizers``: NFKC normaliser, ByteLevel pre-tokenizer and decoder, no
  post-processor, so offsets are raw character offsets and no token is added implicitly) trained on
  :func:`itpo_batch.model.tiny_corpus.generate_corpus`. The default corpus reaches the **full 4096-token
  vocabulary** (its natural ceiling is about 7.4k merges, so there is headroom). Training is deterministic
  (same ``tokenizer.json`` bytes on every build).
- **Special tokens.** ``<unk> <pad> <bos> <|system|> <|user|> <|assistant|> <|tool|> <|end|>`` get ids 0–7;
  eos is ``<|end|>`` (it closes every message, so generation stops at the end of an assistant turn),
  pad is ``<pad>``. The config's bos/eos/pad ids are set explicitly: transformers 5 defaults are wrong for
  small vocabularies.
- **Chat template.** ``<bos>`` then each message as ``<|role|>\\n{content}<|end|>\\n``; the assistant's
  content *and* its ``<|end|>`` sit inside ``{% generation %}`` so that
  ``return_assistant_tokens_mask`` marks exactly what the policy must produce (including the stop token).
  ``add_generation_prompt`` appends ``<|assistant|>\\n``. Unknown roles raise.
- **Atomic cache.** :func:`tiny_path` builds into a temporary directory beside the cache entry and renames
  it into place; a directory under the final name is therefore always complete. A crashed build leaves only
  a ``.tmp-*`` directory that is never loaded; a concurrent build that loses the rename race discards its
  own copy. The cache name carries a recipe version (``v1``) and a hash of the spec: bump the version
  whenever the corpus, template or initialisation changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from itpo_batch.model.tiny_corpus import generate_corpus

RECIPE_VERSION = "v1"
SPECIAL_TOKENS = ["<unk>", "<pad>", "<bos>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
ROLES = ("system", "user", "assistant", "tool")

# transformers compiles templates with trim_blocks/lstrip_blocks, so every newline is an explicit '\n' string.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{- raise_exception('Unknown role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] + '<|end|>' -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes and seed of the embedded model; its hash names the cache entry."""

    vocab_size: int = 4096  # BPE target; the default corpus reaches it exactly
    hidden_size: int = 192  # model width
    intermediate_size: int = 512  # SwiGLU inner width
    num_layers: int = 4  # decoder layers
    num_heads: int = 4  # attention heads (= key/value heads)
    max_position_embeddings: int = 2048  # context length; also the tokenizer's model_max_length
    seed: int = 0  # drives both the corpus and the weight initialisation
    corpus_lines: int = 24_000  # lines of generated text for tokenizer training

    def short_hash(self) -> str:
        """First 10 hex digits of the sha256 of the spec's sorted JSON."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def train_tokenizer(spec: TinySpec = TinySpec()) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on the generated corpus and wrap it for transformers."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(generate_corpus(spec.seed, spec.corpus_lines), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<|end|>",
        extra_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"],
        model_max_length=spec.max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """Llama config for ``spec`` with the special-token ids taken from ``tokenizer``."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
    )


@torch.no_grad()
def init_weights_(model: torch.nn.Module, seed: int, num_layers: int, std: float = 0.02) -> None:
    """Fill every parameter in name order from one seeded CPU generator (see the module docstring)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    residual_std = std / math.sqrt(2 * num_layers)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if param.ndim == 1:
            param.fill_(1.0)  # RMSNorm weights; Llama has no biases
            continue
        scale = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
        values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * scale
        param.copy_(values.to(param.dtype))


def build_tiny(out_dir: Path, spec: TinySpec = TinySpec()) -> Path:
    """Build the tiny model and tokenizer into ``out_dir`` (created if missing) and return it.

    The same ``spec`` gives bit-identical ``model.safetensors`` and ``tokenizer.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(spec)
    model = LlamaForCausalLM(tiny_config(spec, tokenizer))
    init_weights_(model, spec.seed, spec.num_layers)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    spec_record = {"recipe": RECIPE_VERSION, **asdict(spec)}
    (out_dir / "tiny_spec.json").write_text(json.dumps(spec_record, indent=2, sort_keys=True) + "\n")
    return out_dir


def cache_root() -> Path:
    """``$ITPO_BATCH_CACHE`` if set, else ``~/.cache/itpo_batch``."""
    env = os.environ.get("ITPO_BATCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "itpo_batch"


def tiny_path(spec: TinySpec = TinySpec()) -> Path:
    """Directory of the cached tiny model for ``spec``; built atomically on first use."""
    return build_atomically(cache_root() / f"tiny-{RECIPE_VERSION}-{spec.short_hash()}",
                            lambda tmp: build_tiny(tmp, spec))  # fmt: skip


def build_atomically(final: Path, build: Callable[[Path], object]) -> Path:
    """``build(tmp)`` into a temporary sibling of ``final``, then rename it to ``final``.

    Used for every cache entry (tiny, smollm2).

    Returns ``final`` at once when it already exists; a failed build leaves nothing behind."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)  # atomic; fails if another process already put a complete copy there
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
