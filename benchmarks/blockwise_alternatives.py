"""Why block-wise identifiers in an MMDiT add telescoping terms to the text stream (adi_lightning.blockwise).

With every identifier row equal, a block-wise identifier must draw exactly what Textual Inversion with
that one vector draws. On tiny random ``SD3Transformer2DModel`` s (SD3-like, and SD3.5-like with dual
attention) this prints, for equal rows, the largest absolute difference from the plain (TI) forward of

- ``additive``: the shipped design, ``+ c(E_row(b)) - c(E_row(b-1))`` before each block b >= 1;
- ``overwrite``: the rejected alternative, the text stream replaced by ``c(E_row(b))`` before each
  block b >= 1 (what "each block reads its own encoding", taken literally, does to a carried stream);

relative to the largest absolute output of the TI forward, and what the overwrite throws away: the
drift of the carried stream, the largest ``|s_b - c(E)|`` over the inputs ``s_b`` of blocks b >= 1
relative to the largest ``|c(E)|``. It also says whether projecting the
concatenated ``[N, B*T, J]`` in one ``context_embedder`` call gives, for its first T tokens, exactly
the ``[N, T, J]`` call (on this machine; the shipped hooks project each row alone, so they never rely on it).

    OMP_NUM_THREADS=1 python benchmarks/blockwise_alternatives.py [--seeds 0 1 2] [--layers 4 12]

Random weights: the figures show that the overwrite alternative is not the identity, not how far it
moves a trained SD3. CPU, seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adi_lightning.blockwise import install_blockwise_routing, remove_blockwise_routing  # noqa: E402
from adi_lightning.tiny.sd3 import build_tiny_sd3_transformer  # noqa: E402

TOKENS = 7


def _overwrite_hooks(model, projected):
    """Pre-hooks replacing block b's (b >= 1) text stream by ``projected[b]``; returns the handles."""
    def hook(index, module, args, kwargs):
        return args, {**kwargs, "encoder_hidden_states": projected[index]}

    return [block.register_forward_pre_hook(lambda m, a, k, i=i: hook(i, m, a, k), with_kwargs=True)
            for i, block in enumerate(model.transformer_blocks) if i >= 1]


@torch.no_grad()
def measure(layers: int, dual: bool, seed: int) -> dict:
    model = build_tiny_sd3_transformer(num_layers=layers, dual_attention_layers=(0,) if dual else (), seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    latents, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, generator=g)
    timestep, text = torch.tensor([700.0, 300.0]), torch.randn(2, TOKENS, 24, generator=g)
    streams = []
    handles = [block.register_forward_pre_hook(lambda m, a, k: streams.append(k["encoder_hidden_states"]),
                                               with_kwargs=True) for block in model.transformer_blocks]
    ti = model(latents, text, pooled, timestep).sample
    for handle in handles:
        handle.remove()
    scale, start = float(ti.abs().max()), streams[0]
    drift = max(float((s - start).abs().max()) for s in streams[1:]) / float(start.abs().max())

    install_blockwise_routing(model, TOKENS)
    try:
        additive = model(latents, text.repeat(1, layers, 1), pooled, timestep).sample
    finally:
        remove_blockwise_routing(model)

    projected = [model.context_embedder(text)] * layers  # every row equal
    handles = _overwrite_hooks(model, projected)
    try:
        overwrite = model(latents, text, pooled, timestep).sample
    finally:
        for handle in handles:
            handle.remove()

    joint = model.context_embedder(text.repeat(1, layers, 1))[:, :TOKENS]
    return {"additive": float((additive - ti).abs().max()) / scale, "additive_equal": torch.equal(additive, ti),
            "overwrite": float((overwrite - ti).abs().max()) / scale,
            "overwrite_abs": float((overwrite - ti).abs().max()), "drift": drift,
            "one_call_projection_exact": torch.equal(joint, model.context_embedder(text))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    args = parser.parse_args(argv)
    print(f"{'model':<22} {'seed':>4}  {'additive (rel)':>14} {'bit-equal':>9}  {'overwrite (rel)':>15} "
          f"{'overwrite (abs)':>15} {'stream drift':>12}  one-call projection exact")
    for layers in args.layers:
        for dual in (False, True):
            for seed in args.seeds:
                r = measure(layers, dual, seed)
                name = f"{'SD3.5-like' if dual else 'SD3-like'}, {layers} blocks"
                print(f"{name:<22} {seed:>4}  {r['additive']:>14.3g} {str(r['additive_equal']):>9}  "
                      f"{r['overwrite']:>15.3g} {r['overwrite_abs']:>15.3g} {r['drift']:>12.3g}  "
                      f"{r['one_call_projection_exact']}")


if __name__ == "__main__":
    main()
