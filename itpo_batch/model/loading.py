"""One loader for every model the pipeline uses: policy, frozen reference, implicit PRM and value/Q model.

Design decisions:

- **Local files only.** A model spec is ``"tiny"`` (the embedded default, built on first use, see
  :mod:`itpo_batch.model.tiny`), ``"smollm2"`` (SmolLM2-135M-Instruct, converted once from the GGUF of the
  ``smol`` extra into a cached HF folder, see :mod:`itpo_batch.model.smollm2`) or a local directory holding a
  ``config.json``. :func:`resolve_model_path` is the one place aliases are resolved, so every command and
  every role accepts both. Every ``from_pretrained`` call passes ``local_files_only=True``, so nothing ever
  touches the hub, and ``trust_remote_code`` stays ``False`` unless the caller asks for it. Anything a user can get wrong (missing path, no config, no chat
  template, unreadable weights) raises :class:`~itpo_batch.core.errors.ModelLoadError` naming the path.
- **Roles.** ``policy`` and ``prm`` are causal LMs in train mode with gradients on; ``reference`` is the same
  causal LM frozen (``requires_grad_(False)``, ``eval()``); ``value`` is a :class:`ValueModel`: the
  causal LM's backbone (``AutoModel``, so no vocabulary projection is computed) plus a scalar head.
- **dtype/device defaults.** float32 on CPU, bfloat16 on CUDA. transformers 5 takes ``dtype=`` (the old
  ``torch_dtype=`` is deprecated).
- **Tokenizers.** transformers 5 does not persist ``padding_side``, so it is passed on every load (right by
  default: training and scoring; pass ``"left"`` for batched generation). A tokenizer without a chat template
  is rejected, because assistant masks cannot be built without one. A missing pad token is set to the eos
  token (common for Llama-3-style checkpoints); padding positions are always masked out downstream. A
  tokenizer that states no context (many checkpoints leave ``model_max_length`` out, and transformers then
  reports ~1e30) gets the model's own from ``config.json`` (:func:`~itpo_batch.model.render.model_context`),
  so every consumer of the tokenizer sees the same limit the model has.
- **Value head.** ``nn.Linear(hidden, 1)`` with weight ~ N(0, (1/(hidden+1))²) from a seeded generator
  and zero bias (OpenRLHF's critic init): initial values are close to 0 while gradients reach the backbone
  from the first step (a zero-initialised weight would block them). The head is kept in float32 whatever
  the backbone dtype, and hidden states are cast up before it: a scalar regression target wants the
  precision, and the head has only hidden+1 parameters. It is saved next to the backbone as
  ``value_head.safetensors``.
- **Packed forwards.** :meth:`ValueModel.forward` always passes ``use_cache=False``: with transformers 5, a
  KV cache disables the detection of packed sequences from ``position_ids`` (see :mod:`itpo_batch.model.packing`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from itpo_batch.core.errors import ModelLoadError
from itpo_batch.model.render import model_context

TINY = "tiny"
"The alias of the embedded model (:mod:`itpo_batch.model.tiny`), built on first use."
SMOLLM2 = "smollm2"
"The alias of SmolLM2-135M-Instruct (:mod:`itpo_batch.model.smollm2`), converted on first use."
ALIASES: tuple[str, ...] = (TINY, SMOLLM2)
"Model specs that name a model rather than a directory."
DEFAULT_MODEL = TINY
"The model spec every config (and so every command) defaults to."

Role = Literal["policy", "reference", "prm", "value"]
ROLES: tuple[str, ...] = ("policy", "reference", "prm", "value")
VALUE_HEAD_FILE = "value_head.safetensors"
NO_CONTEXT = 10**8
"A tokenizer ``model_max_length`` at or above this is transformers' 'unknown' sentinel, not a context."


def resolve_model_path(spec: str | os.PathLike[str]) -> Path:
    """``"tiny"`` → the cached embedded model (built if needed); ``"smollm2"`` → the cached converted
    SmolLM2 folder (converted if needed; :class:`ModelLoadError` naming the install command without the
    ``smol`` extra); otherwise an existing local model directory."""
    if str(spec) == TINY:
        from itpo_batch.model.tiny import tiny_path  # deferred: building needs the tokenizers trainer

        return tiny_path()
    if str(spec) == SMOLLM2:
        from itpo_batch.model.smollm2 import smollm2_path  # deferred: converting needs the smol extra

        return smollm2_path()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"model path {str(path)!r} does not exist or is not a directory "
            "(expected 'tiny', 'smollm2' or a local Hugging Face model directory; nothing is downloaded)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {str(path)!r} has no config.json (not a Hugging Face model)")
    return path


def default_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _as_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return resolved
    return dtype


def load_tokenizer(
    spec: str | os.PathLike[str],
    padding_side: Literal["left", "right"] = "right",
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model spec; it must have a chat template."""
    path = resolve_model_path(spec)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, local_files_only=True, padding_side=padding_side, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"could not load a tokenizer from {str(path)!r}: {exc}") from exc
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(
            f"tokenizer in {str(path)!r} has no chat template; assistant masks need one "
            "(add chat_template.jinja to the model directory)"
        )
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if not 0 < (getattr(tok, "model_max_length", None) or 0) < NO_CONTEXT:
        context = model_context(path)
        if context is not None:
            tok.model_max_length = context
    return tok


def _load_kwargs(
    device: torch.device | str | None,
    dtype: torch.dtype | str | None,
    trust_remote_code: bool,
    attn_implementation: str | None,
) -> tuple[torch.device, dict[str, object]]:
    """The device and the ``from_pretrained`` keyword arguments every role is loaded with."""
    dev = torch.device(device) if device is not None else default_device()
    kwargs: dict[str, object] = {"dtype": _as_dtype(dtype, dev), "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return dev, kwargs


def _from_pretrained(auto_cls: type, path: Path, **kwargs: object) -> PreTrainedModel:
    try:
        return auto_cls.from_pretrained(path, local_files_only=True, **kwargs)
    except SafetensorError as exc:  # not an OSError: a truncated or corrupt weights file
        raise _corrupt(path, exc) from exc
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load a model from {str(path)!r}: {exc}") from exc


def _corrupt(where: Path, exc: Exception) -> ModelLoadError:
    """A weights file safetensors refused (header or size), named: the one file, or the first of a folder's
    ``*.safetensors`` that does not open (found only on this error path)."""
    bad = where
    if where.is_dir():
        for f in sorted(where.glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except SafetensorError:
                bad = f
                break
    return ModelLoadError(f"{str(bad)!r} is truncated or corrupt (safetensors: {exc})")


class ValueModel(nn.Module):
    """Transformer backbone + scalar head: one value per token, shape ``[B, T]``."""

    def __init__(self, backbone: PreTrainedModel, value_head: nn.Linear | None = None, head_seed: int = 0):
        super().__init__()
        self.backbone = backbone
        hidden = int(backbone.config.hidden_size)
        value_head_is_new = value_head is None
        if value_head is None:
            value_head = nn.Linear(hidden, 1)
            gen = torch.Generator(device="cpu").manual_seed(head_seed)
            with torch.no_grad():
                value_head.weight.copy_(torch.randn(1, hidden, generator=gen) / (hidden + 1))
                value_head.bias.zero_()
        self.value_head = value_head.to(device=backbone.device, dtype=torch.float32)
        self.fresh_head = value_head_is_new
        "The head was just created (not loaded or fitted): a fit may start its bias at the targets' mean."

    @property
    def config(self) -> PreTrainedConfig:
        """The backbone's config."""
        return self.backbone.config

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Values ``[B, T]`` (float32). Pass packed ``position_ids`` and no mask for padding-free batches."""
        out = self.backbone(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        )
        hidden = out.last_hidden_state.to(self.value_head.weight.dtype)
        return self.value_head(hidden).squeeze(-1)

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> Path:
        """Backbone via ``save_pretrained`` plus ``value_head.safetensors`` (float32) in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out)
        tensors = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in self.value_head.state_dict().items()
        }
        save_file(tensors, str(out / VALUE_HEAD_FILE))
        return out

    @classmethod
    def from_pretrained(
        cls,
        spec: str | os.PathLike[str],
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ) -> ValueModel:
        """Load a saved value model, or put a fresh head on the backbone of a causal LM directory."""
        path = resolve_model_path(spec)
        dev, kwargs = _load_kwargs(device, dtype, trust_remote_code, attn_implementation)
        backbone = _from_pretrained(AutoModel, path, **kwargs).to(dev)
        model = cls(backbone)
        head_file = path / VALUE_HEAD_FILE
        if head_file.is_file():
            try:
                state = load_file(str(head_file))
            except SafetensorError as exc:
                raise _corrupt(head_file, exc) from exc
            try:
                model.value_head.load_state_dict(state)
                model.fresh_head = False
            except RuntimeError as exc:
                raise ModelLoadError(
                    f"value head in {str(head_file)!r} does not fit the backbone: {exc}"
                ) from exc
        return model


def _prepare(model: nn.Module, role: Role) -> nn.Module:
    if role == "reference":
        model.requires_grad_(False)
        return model.eval()
    model.requires_grad_(True)
    return model.train()


def load_model(
    spec: str | os.PathLike[str],
    role: Role,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load ``spec`` for ``role``; see the module docstring for what each role gets."""
    if role not in ROLES:
        raise ValueError(f"unknown model role {role!r}; expected one of {ROLES}")
    if role == "value":
        vm = ValueModel.from_pretrained(spec, dtype, device, trust_remote_code, attn_implementation)
        return _prepare(vm, role)
    path = resolve_model_path(spec)
    dev, kwargs = _load_kwargs(device, dtype, trust_remote_code, attn_implementation)
    model = _from_pretrained(AutoModelForCausalLM, path, **kwargs).to(dev)
    return _prepare(model, role)
