"""Hugging Face causal language models: the adapter bitsearch runs them through, and safe `hf:DIR` loading.

`CausalLM` wraps a `transformers` `*ForCausalLM` so that it looks like every other bitsearch model: one
tensor in (token ids, N×T int64, padding marked as `zoo.tokens.PAD`), one tensor of logits out. The logits
are the next-token predictions for positions 0..T-2, laid out (N, vocab, T-1): the class dimension second,
which is what `F.cross_entropy(logits, targets)` and `logits.argmax(1)` expect for sequences, so the
sensitivity methods' losses and label fallbacks work on them unchanged. The adapter registers the HF
model's own base model and output head under their own names (`model`, `lm_head`), so layer names are the
HF `state_dict` names (`model.layers.0.self_attn.q_proj`, `lm_head`).

A tied output head (`lm_head.weight is embed_tokens.weight`) is one tensor: when the head is fake-quantized
(a `quant.apply.QuantizedLayer` with bits), the embedding lookup reads the same quantized tensor.

`load_hf_model("DIR")` reads a local directory only (`local_files_only`, offline): `config.json` plus
`*.safetensors` weights. Pickled weights (`pytorch_model.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`) are refused
unread, and so is any model that needs `trust_remote_code` (a config with `auto_map`).
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from quant.errors import BitsearchError

from .models import LoadedModel, ModelSpec

HF_PREFIX = "hf:"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DEFAULT_SEQ_LEN = 128


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise BitsearchError(
            "transformer models need the optional 'transformers' package: pip install 'bitsearch[llm]'"
        ) from exc
    return transformers


class CausalLM(nn.Module):
    """A causal LM as a bitsearch model: ids (N×T, PAD = -1) → next-token logits (N, vocab, T-1)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        prefix = getattr(hf_model, "base_model_prefix", "") or "model"
        base = getattr(hf_model, prefix, None)
        head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
        if not isinstance(base, nn.Module) or not isinstance(head, nn.Linear):
            raise BitsearchError(
                f"{type(hf_model).__name__} is not a causal LM with a base model and a linear output head"
            )
        head_name = next((n for n, c in hf_model.named_children() if c is head), None)
        if head_name is None:
            raise BitsearchError(f"{type(hf_model).__name__}'s output head is not a direct child")
        self.base_name, self.head_name = prefix, head_name
        self.add_module(prefix, base)
        self.add_module(head_name, head)
        self.config = hf_model.config
        emb = base.get_input_embeddings()
        self.tied = emb is not None and emb.weight is head.weight
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.logit_scale = getattr(self.config, "logit_scale", None)

    @property
    def vocab_size(self) -> int:
        return int(getattr(self, self.head_name).weight.shape[0])

    def _tied_weight(self) -> torch.Tensor | None:
        """The quantized output-head weight when the head is tied to the embedding and quantized."""
        head = getattr(self, self.head_name)
        if not self.tied or getattr(head, "bits", None) is None or not hasattr(head, "quantized_weight"):
            return None
        return head.quantized_weight()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.is_floating_point():
            raise BitsearchError(f"a language model takes N×T integer token ids, got {tuple(ids.shape)} {ids.dtype}")
        mask = ids >= 0
        ids = ids.clamp(min=0)
        base = getattr(self, self.base_name)
        kwargs: dict[str, Any] = {"use_cache": False}
        if not bool(mask.all()):
            kwargs["attention_mask"] = mask.long()
        w = self._tied_weight()
        if w is not None:
            emb = base.get_input_embeddings()
            kwargs["inputs_embeds"] = F.embedding(ids, w, getattr(emb, "padding_idx", None)) * getattr(
                emb, "embed_scale", 1.0
            )
        else:
            kwargs["input_ids"] = ids
        out = base(**kwargs)
        if isinstance(out, Mapping):  # a ModelOutput, or a plain dict where a replay cache cloned one
            h = out["last_hidden_state"]
        else:
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        logits = getattr(self, self.head_name)(h[:, :-1])
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.transpose(1, 2)


def example_ids(vocab_size: int, seq_len: int = 16, batch: int = 2) -> torch.Tensor:
    """A seeded batch of token ids, for layer discovery and tracing."""
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------------------
# hf:DIR


@contextmanager
def offline() -> Iterator[None]:
    """No network for the Hugging Face libraries while loading (restores the environment afterwards)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, "1"))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_hf_dir(path: str | Path) -> dict[str, Any]:
    """Validate a local HF model directory before `transformers` reads it; returns its config.json."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BitsearchError(f"Hugging Face model directory {p} does not exist")
    if not p.is_dir():
        raise BitsearchError(f"hf: needs a directory (config.json + *.safetensors), {p} is a file")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise BitsearchError(f"{p} has no config.json; save the model with save_pretrained()")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BitsearchError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise BitsearchError(f"{cfg_path} must hold a JSON object")
    if config.get("auto_map"):
        raise BitsearchError(
            f"{p} needs custom model code (config.json has auto_map, i.e. trust_remote_code=True); running "
            "code that ships with a model is refused. Use a model whose architecture is built into transformers."
        )
    pickles = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    safetensors = sorted(f.name for f in p.iterdir() if f.name.endswith(".safetensors"))
    if not safetensors:
        if pickles:
            raise BitsearchError(
                f"{p} holds only pickled weights ({', '.join(pickles[:3])}); pickles are refused because "
                "unpickling can run arbitrary code. Re-save with model.save_pretrained(dir, "
                "safe_serialization=True) to get model.safetensors."
            )
        raise BitsearchError(f"{p} has no *.safetensors weights")
    py = sorted(f.name for f in p.iterdir() if f.suffix == ".py")
    if py:
        raise BitsearchError(f"{p} ships Python code ({', '.join(py[:3])}); model code is refused")
    return config


def load_hf_causal_lm(path: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """The `transformers` causal LM in `path`, float32, eval mode, eager attention, read offline."""
    if trust_remote_code:
        raise BitsearchError("trust_remote_code is refused: bitsearch never runs code that ships with a model")
    p = Path(path).expanduser()
    check_hf_dir(p)
    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()
    with offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(p),
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                dtype=torch.float32,
                attn_implementation="eager",  # double backward (Hessian-vector products) works on it
            )
        except BitsearchError:
            raise
        except Exception as exc:  # transformers raises ValueError/OSError/KeyError... for bad directories
            raise BitsearchError(
                f"cannot load {p} as a Hugging Face causal LM ({type(exc).__name__}: {str(exc)[:300]})"
            ) from None
    return model.eval()


class HFModelSpec(ModelSpec):
    """A `ModelSpec` whose reference is the `hf:DIR` it was loaded from."""

    @property
    def ref(self) -> str:  # type: ignore[override]
        return self.name


def _no_builder() -> nn.Module:
    raise BitsearchError("a Hugging Face model is loaded from its directory, not rebuilt from scratch")


def load_hf_model(
    path: str | Path, weights: str | Path | None = None, seq_len: int = DEFAULT_SEQ_LEN,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """A `LoadedModel` for the local HF directory `path` (see `load_hf_causal_lm`)."""
    if weights is not None:
        raise BitsearchError("an hf: model directory carries its own weights; do not give weights")
    p = Path(str(path)[len(HF_PREFIX):] if str(path).startswith(HF_PREFIX) else path).expanduser()
    lm = CausalLM(load_hf_causal_lm(p, trust_remote_code)).eval()
    vocab = lm.vocab_size
    spec = HFModelSpec(
        name=f"{HF_PREFIX}{p}",
        description=f"Hugging Face {type(lm.config).__name__.removesuffix('Config')} model from {p.name}",
        input_shape=(seq_len,),
        num_classes=vocab,
        normalisation=None,
        builder=_no_builder,
        example_input=lambda: example_ids(vocab),
    )
    return LoadedModel(
        name=spec.name, model=lm, example_input=example_ids(vocab), num_classes=vocab, normalisation=None,
        spec=spec, pretrained=True, source=f"hf directory {p}",
    )
