"""Anchor loss per timestep band: which part of the schedule an identifier has fitted.

The training loss averaged over t hides the pose: on the toy jump it is decided at t >= 0.8 T, where
the loss is twenty times smaller than at small t (texture). This script evaluates the anchor
(exemplar) loss of identifiers, or of one vocabulary word in every row, on the same fixed
(timestep, noise) draws through ``ADIModule.compute_loss``, and prints the mean per band of T/5.

    python benchmarks/loss_by_timestep.py learned=outputs/<run>/identifier.safetensors word:standing word:jumping
    python benchmarks/loss_by_timestep.py --pipeline models/sd15 --data my_jumping --resolution 512 a=run/identifier.safetensors

Each argument is ``[name=]path`` of an identifier file or ``word:W`` (every row = W's input embedding).
Defaults: the shipped toy pipeline and the toy ``shared`` jumping folder (exported into the cache on
first use), 32 px, the first template of the toy experiments.
"""

from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BANDS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("identifiers", nargs="+", help="[name=]identifier.safetensors or word:W")
    parser.add_argument("--pipeline", default="adi_lightning/toy/assets/pipeline")
    parser.add_argument("--data", help="action folder (default: the toy shared folder of --action)")
    parser.add_argument("--action", default="jumping")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--template", default="a photo of a person {}")
    parser.add_argument("--draws", type=int, default=40, help="(timestep, noise) draws per exemplar")
    args = parser.parse_args()

    from adi_lightning.data.layout import read_action_folder, records_of_action
    from adi_lightning.data.triples import load_image
    from adi_lightning.diffusion import keyed_noise_and_timesteps
    from adi_lightning.module import ADIModule

    if args.data is None:
        from adi_lightning.paths import toy_cache_dir
        from adi_lightning.toy.export import ensure_action_folder

        args.data = str(ensure_action_folder(toy_cache_dir("shared", args.action), args.action))
    anchors = records_of_action(read_action_folder(args.data), args.action)
    pixels = torch.stack([load_image(r.path, args.resolution) for r in anchors])[:, None]  # [N, 1, C, H, W]
    module = ADIModule(args.pipeline, timestep_sampling="uniform", large_t_steps=0, mask_threshold=1.0).eval()
    steps = module.noise_scheduler.config.num_train_timesteps
    embeddings = module.family.text_encoders[0].get_input_embeddings().weight
    rows = module.identifier.embedding.shape[0]
    print(f"{len(anchors)} exemplars of {args.action!r} in {args.data}, {args.draws} draws each; "
          f"mean anchor loss per band of t (T = {steps})")
    print(f"{'identifier':<24}" + "".join(f"{f'[{b * steps // BANDS}, {(b + 1) * steps // BANDS})':>14}" for b in range(BANDS)))
    for spec in args.identifiers:
        name, _, source = spec.rpartition("=") if "=" in spec else (spec, "", spec)
        if source.startswith("word:"):
            token = module.tokenizer(source[5:], add_special_tokens=False).input_ids
            if len(token) != 1:
                raise SystemExit(f"{source!r}: not a single-token word for this tokenizer")
            table = embeddings[token[0]].detach()[None].repeat(rows, 1)
        else:
            module.load_identifier(source)
            table = module.identifier.embedding.detach().clone()
        bands = [[] for _ in range(BANDS)]
        with torch.no_grad():
            module.identifier.embedding.copy_(table)
            for draw in range(args.draws):
                keys = [draw * 1000 + i for i in range(len(anchors))]
                batch = {"pixel_values": pixels, "template": [args.template] * len(anchors), "key": torch.tensor(keys)}
                _, per_sample = module.compute_loss(batch)  # draws keyed by (key, global step 0)
                _, timesteps = keyed_noise_and_timesteps(keys, 0, 1, pixels[:, 0], steps, "uniform")
                for loss, t in zip(per_sample.tolist(), timesteps.tolist()):
                    bands[min(t * BANDS // steps, BANDS - 1)].append(loss)
        print(f"{name[-24:]:<24}" + "".join(f"{sum(b) / len(b):>14.4f}" if b else f"{'-':>14}" for b in bands))


if __name__ == "__main__":
    main()
