"""`zoo:tiny-llama`: a small Llama-architecture language model that trains itself on first use, offline.

The model is `transformers`' own `LlamaForCausalLM` (RMSNorm, rotary position embeddings, SwiGLU MLP,
grouped-query attention, tied input/output embeddings) with a small config, byte-level (vocabulary 256),
wrapped in `zoo.hf.CausalLM`. It trains on random 128-byte windows of the standard-library modules of
`zoo.tokens.TRAIN_MODULES` (AdamW, warm-up then cosine decay, seeded) and is cached as safetensors like the
digits models; its provenance (recipe, corpus SHA-256, Python version, training seconds, held-out
perplexity on `zoo:stdlib-text`'s test split) is stored in the cache file's metadata.

`zoo:tiny-llama-mini` is the same recipe at a size that trains in seconds, for tests and examples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hf import CausalLM, example_ids, require_transformers
from .models import ModelSpec, register_model
from .tokens import BYTE_VOCAB, SEQ_LEN, TRAIN_MODULES, byte_stream, corpus_provenance, stdlib_text_splits


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int = 2 * SEQ_LEN

    def build(self) -> nn.Module:
        transformers = require_transformers()
        config = transformers.LlamaConfig(
            vocab_size=BYTE_VOCAB,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_positions,
            tie_word_embeddings=True,
            attn_implementation="eager",
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        return CausalLM(transformers.LlamaForCausalLM(config))


@dataclass(frozen=True)
class LMRecipe:
    """Next-byte prediction on random windows of the training modules; deterministic for a seed."""

    steps: int
    batch_size: int
    lr: float
    seq_len: int = SEQ_LEN
    warmup: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    eval_seqs: int | None = None  # held-out windows for the provenance perplexity (None: the whole test split)

    def __call__(self, model: nn.Module) -> dict[str, str]:
        return train_lm(model, self)


def train_lm(model: nn.Module, recipe: LMRecipe) -> dict[str, str]:
    """Train `model` (a `CausalLM`) in place; return provenance including the held-out perplexity."""
    from .lm_eval import evaluate_tokens

    stream = byte_stream(TRAIN_MODULES)
    was_training = model.training
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        gen = torch.Generator().manual_seed(recipe.seed)
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        other = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=recipe.lr, betas=(0.9, 0.95),
        )

        def lr_at(step: int) -> float:
            if step < recipe.warmup:
                return (step + 1) / recipe.warmup
            frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        offsets = torch.arange(recipe.seq_len)
        model.train()
        loss_val = float("nan")
        for _ in range(recipe.steps):
            start = torch.randint(0, len(stream) - recipe.seq_len, (recipe.batch_size, 1), generator=gen)
            ids = stream[start + offsets]
            loss = F.cross_entropy(model(ids), ids[:, 1:])  # logits (B, vocab, T-1) predict ids[:, 1:]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_val = loss.item()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    test = stdlib_text_splits(seed=0).test
    assert test is not None
    if recipe.eval_seqs is not None:
        test = test.take(recipe.eval_seqs, seed=0)
    res = evaluate_tokens(model, test)
    model.train(was_training)
    return {
        "recipe": (
            f"adamw-cosine steps={recipe.steps} batch={recipe.batch_size} seq={recipe.seq_len} lr={recipe.lr} "
            f"wd={recipe.weight_decay} warmup={recipe.warmup}"
        ),
        "seed": str(recipe.seed),
        "train_seconds": f"{seconds:.1f}",
        "train_cpu_seconds": f"{cpu_seconds:.1f}",  # all threads; wall time on a busy machine says little
        "threads": str(torch.get_num_threads()),
        "final_train_loss": f"{loss_val:.4f}",
        "heldout_perplexity": f"{res.perplexity:.4f}",
        "heldout_tokens": str(res.tokens),
        **corpus_provenance(),
    }


TINY_LLAMA = LlamaShape(hidden=96, layers=4, heads=4, kv_heads=2, intermediate=256)
TINY_LLAMA_MINI = LlamaShape(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)


def _example() -> torch.Tensor:
    return example_ids(BYTE_VOCAB)


register_model(
    ModelSpec(
        name="tiny-llama",
        description=(
            "byte-level Llama (transformers LlamaForCausalLM: 4 layers, width 96, GQA 4/2 heads, SwiGLU 256, "
            "tied embeddings, 0.43 M parameters) trained by the zoo on first use on Python standard-library "
            "source (a few minutes on 2 cores)"
        ),
        input_shape=(SEQ_LEN,),
        num_classes=BYTE_VOCAB,
        normalisation=None,
        builder=TINY_LLAMA.build,
        dataset="zoo:stdlib-text",
        trainer=LMRecipe(steps=800, batch_size=16, lr=3e-3),
        version=2,
        example_input=_example,
    )
)
register_model(
    ModelSpec(
        name="tiny-llama-mini",
        description=(
            "the tiny-llama recipe at test size (2 layers, width 32); trains in seconds; for tests and examples"
        ),
        input_shape=(SEQ_LEN,),
        num_classes=BYTE_VOCAB,
        normalisation=None,
        builder=TINY_LLAMA_MINI.build,
        dataset="zoo:stdlib-text",
        trainer=LMRecipe(steps=40, batch_size=8, lr=1e-2, warmup=10, eval_seqs=32),
        example_input=_example,
    )
)
