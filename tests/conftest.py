"""Shared fixtures: tiny SD, SDXL, SD3 and FLUX pipelines and an action folder, built once per session, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    """The project cache every test uses (``$ADI_LIGHTNING_CACHE``): exported toy folders are shared
    across tests and never touch the user's ``~/.cache/adi_lightning``."""
    return tmp_path_factory.mktemp("adi_cache")


@pytest.fixture(autouse=True)
def _clean_cli_env(monkeypatch, toy_cache):
    """Every test starts like a fresh command: no inherited run folder (``make_run_dir`` exports it
    for DDP children), no ``ADI_DEBUG``, a bare ``sys.argv`` (LightningCLI warns when ``args``
    and ``argv`` both carry arguments), and the session's own project cache."""
    from adi_lightning.cli import RUN_DIR_ENV
    from adi_lightning.paths import CACHE_ENV

    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.delenv("ADI_DEBUG", raising=False)
    monkeypatch.setattr("sys.argv", ["adi_lightning"])
    monkeypatch.setenv(CACHE_ENV, str(toy_cache))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``<tmp>/pipeline`` (16 attn2 layers, D=32, 32 px) and ``<tmp>/data`` (3 actions x 4 subjects)."""
    from adi_lightning.tiny import build_tiny_action_folder, build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_pipeline(root / "pipeline")
    build_tiny_action_folder(root / "data")
    return root


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_dir):
    return str(tiny_dir / "pipeline")


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tiny_dir):
    """``<tmp>/pipeline_xl``: the tiny SDXL pipeline (17 attn2 layers, D = 32 + 48, pooled 24, 32 px)."""
    from adi_lightning.tiny import build_tiny_sdxl_pipeline

    return str(build_tiny_sdxl_pipeline(tiny_dir / "pipeline_xl"))


@pytest.fixture(scope="session")
def tiny_sd3_pipeline(tiny_dir):
    """``<tmp>/pipeline_sd3``: the tiny SD3 pipeline with T5 (3 joint blocks, D = 32 + 48 + 96, 32 px;
    ``adi_lightning.tiny.build_tiny_sd3_pipeline``)."""
    from adi_lightning.tiny import build_tiny_sd3_pipeline

    return str(build_tiny_sd3_pipeline(tiny_dir / "pipeline_sd3"))


@pytest.fixture(scope="session")
def tiny_sd3_pipeline_no_t5(tiny_dir):
    """``<tmp>/pipeline_sd3_no_t5``: the tiny SD3 pipeline without T5 (3 joint blocks, D = 32 + 48, 32 px),
    the toy SD3 backbone's layout."""
    from adi_lightning.tiny import build_tiny_sd3_pipeline

    return str(build_tiny_sd3_pipeline(tiny_dir / "pipeline_sd3_no_t5", with_t5=False))


@pytest.fixture(scope="session")
def tiny_flux_pipeline(tiny_dir):
    """``<tmp>/pipeline_flux``: the tiny FLUX.1 pipeline (2 double- and 2 single-stream blocks, D = 32 + 48,
    32 px; ``adi_lightning.tiny.build_tiny_flux_pipeline``)."""
    from adi_lightning.tiny import build_tiny_flux_pipeline

    return str(build_tiny_flux_pipeline(tiny_dir / "pipeline_flux"))


@pytest.fixture(scope="session")
def stock_pipeline():
    """``stock_pipeline(folder, img2img=False)``: the folder's stock diffusers pipeline (its family's
    ``pipeline_class``, or the image-to-image one), loaded as a user would (with the family's
    ``folder_load_kwargs``: a no-T5 SD3 folder needs ``text_encoder_3=None, tokenizer_3=None``), fp32, no
    progress bar."""
    import json

    from adi_lightning.backbone import family_class

    def load(folder: str, img2img: bool = False):
        index = json.loads((Path(folder) / "model_index.json").read_text())
        family = family_class(index["_class_name"])
        pipe = family.pipeline_class(img2img=img2img).from_pretrained(folder, low_cpu_mem_usage=False,
                                                                      **family.folder_load_kwargs(index))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load


@pytest.fixture(scope="session")
def random_identifier():
    """``random_identifier(module, path)``: add seeded noise (``randn``, seed 0) to the module's identifier rows
    so that every row differs, save it to ``path``; returns ``(saved path, rows [R, D])``."""
    import torch

    def save(module, path):
        with torch.no_grad():
            module.identifier.embedding.add_(torch.randn(module.identifier.embedding.shape,
                                                         generator=torch.Generator().manual_seed(0)))
        return module.save_identifier(path), module.identifier.embedding.detach().clone()

    return save


#: ``model`` overrides of each method: ADI masks (threshold 0), P+ and TI never do; TI has one row.
METHOD_SETTINGS = {"adi": dict(mask_threshold=0.0), "pplus": dict(mask_threshold=1.0),
                   "ti": dict(mask_threshold=1.0, layerwise=False)}


@pytest.fixture()
def two_steps_change_only_the_identifier(tiny_data, tmp_path):
    """``check(make, method)``: ``make(learning_rate=0.05, **METHOD_SETTINGS[method])`` (an ADIModule factory)
    fitted two Trainer steps on the tiny folder's ``jumping`` items (batch 1, triples for ADI) into
    ``tmp_path``; asserts that the identifier moved and stayed finite, that no other parameter moved and that
    ``identifier.safetensors`` was written; returns the identifier rows ``[R, D]`` after."""
    import lightning as L
    import torch

    from adi_lightning.data import ActionTripleDataModule

    def check(make, method: str):
        module = make(learning_rate=0.05, **METHOD_SETTINGS[method])
        frozen = {name: p.detach().clone() for name, p in module.named_parameters()
                  if not name.startswith("identifier.")}
        start = module.identifier.embedding.detach().clone()
        dm = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=1, repeats=2,
                                    with_partners=method == "adi")
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                            limit_val_batches=0)
        trainer.fit(module, dm)
        after = module.identifier.embedding.detach()
        assert not torch.equal(after, start) and torch.isfinite(after).all()
        assert all(torch.equal(p, frozen[name]) for name, p in module.named_parameters() if name in frozen)
        assert (tmp_path / "identifier.safetensors").is_file()
        return after

    return check


@pytest.fixture(scope="session")
def equal_rows_training_forward(tiny_batch):
    """``check(make, tokens)``: a P+ module and a TI module from ``make(**overrides)`` (an ADIModule factory on an
    MMDiT folder, ``tokens`` per block chunk), the P+ rows all set to the TI row (one seeded vector); asserts that
    the P+ training forward hands the transformer B equal chunks, that it is the stock forward on ONE chunk bit
    for bit, and that both modules' per-sample losses agree (up to the text encoders' batch-size rounding: P+
    encodes B rows per prompt in one call); returns the transformer call's ``(args, kwargs)``."""
    import torch

    def check(make, tokens: int):
        batch = tiny_batch(with_partners=False)
        pplus = make(mask_threshold=1.0, cache_latents=False)
        ti = make(mask_threshold=1.0, layerwise=False, cache_latents=False)
        calls = []
        hook = pplus.transformer.register_forward_hook(
            lambda module, args, kwargs, output: calls.append((args, dict(kwargs), output.sample)), with_kwargs=True)
        with torch.no_grad():
            blocks, dim = pplus.identifier.embedding.shape
            vector = torch.randn(dim, generator=torch.Generator().manual_seed(0))
            pplus.identifier.embedding.copy_(vector.expand(blocks, -1))
            ti.identifier.embedding.copy_(vector[None])
            _, per_pplus = pplus.compute_loss(batch, draw_step=0)
            _, per_ti = ti.compute_loss(batch, draw_step=0)
            hook.remove()
            ((args, kwargs, routed),) = calls
            chunks = kwargs["encoder_hidden_states"].split(tokens, dim=1)
            assert len(chunks) == blocks and all(torch.equal(chunk, chunks[0]) for chunk in chunks)
            plain = pplus.transformer(*args, **{**kwargs, "encoder_hidden_states": chunks[0]}).sample
        assert torch.equal(routed, plain)
        torch.testing.assert_close(per_pplus, per_ti, rtol=1e-5, atol=0)
        return args, kwargs

    return check


@pytest.fixture(scope="session")
def tiny_data(tiny_dir):
    return str(tiny_dir / "data")


@pytest.fixture(scope="session")
def exemplar_only(tiny_data):
    """``exemplar_only(dest)``: the tiny folder's ``jumping`` images copied into ``dest`` (created) with their
    ``metadata.jsonl`` rows without pair ids, what a researcher brings (no action-different partners);
    returns ``dest``."""
    import json
    import shutil

    def copy(dest: Path) -> Path:
        source = Path(tiny_data)
        dest.mkdir()
        rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines()]
        kept = []
        for row in rows:
            if row["action"] == "jumping":
                shutil.copy(source / row["file_name"], dest)
                row.pop("pair_id")
                kept.append(row)
        (dest / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        return dest

    return copy


@pytest.fixture()
def fit_on_generated_partners(exemplar_only, tmp_path):
    """``fit(module)``: two Trainer steps of ``module`` on an :func:`exemplar_only` folder in ``tmp_path`` with
    ``data.action_different=generate`` (2 img2img steps, one partner per anchor, batch 2); asserts that
    ``prepare_data`` made a 32 px partner of another action for each of the 4 anchors and that the fit ran its
    two steps and wrote ``identifier.safetensors``."""
    import lightning as L
    from PIL import Image

    from adi_lightning.data import ActionTripleDataModule, read_action_folder

    def fit(module) -> None:
        folder = exemplar_only(tmp_path / "exemplars")
        dm = ActionTripleDataModule(root=str(folder), action="jumping", resolution=32, batch_size=2, repeats=2,
                                    action_different="generate", generate_steps=2, generate_per_anchor=1)
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                            limit_val_batches=0)
        trainer.fit(module, dm)
        generated = read_action_folder(folder / ".adi_cache" / "partners-jumping")
        assert len(generated) == 4 and all(Image.open(r.path).size == (32, 32) for r in generated)
        assert all(r.action != "jumping" for r in generated)
        assert trainer.global_step == 2 and (tmp_path / "identifier.safetensors").is_file()

    return fit


@pytest.fixture(scope="session")
def img2img_is_the_stock_pipeline(stock_pipeline):
    """``check(module, folder, guidance, size=32, **stock)``: ``module.img2img`` (what
    ``data.action_different=generate`` calls) of two seeded random ``size`` px images with plain prompts
    (strength 0.6, 4 steps, ``guidance``) draws what the ``folder``'s stock img2img pipeline, loaded as a user
    would, draws from the prompt strings with the ``stock`` keyword arguments added (1/255 per pixel: the
    family's text encoders run batched per chunk), at ``size`` px and changed from the input; returns that
    stock pipeline."""
    import numpy as np
    import torch
    from PIL import Image

    @torch.no_grad()
    def check(module, folder: str, guidance: float, size: int = 32, **stock):
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(2)]
        prompts, seeds = ["a photo of a person sitting", "a photo of a person standing"], [3, 4]
        ours = module.img2img(images, prompts, seeds, strength=0.6, steps=4, guidance=guidance)
        pipe = stock_pipeline(folder, img2img=True)
        for image, prompt, seed, mine in zip(images, prompts, seeds, ours):
            expected = pipe(prompt, image=image, generator=torch.Generator().manual_seed(seed), strength=0.6,
                            num_inference_steps=4, guidance_scale=guidance, **stock).images[0]
            assert mine.size == expected.size == (size, size)
            difference = np.abs(np.asarray(mine, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
            assert difference.max() <= 1, difference.max()
            assert (np.asarray(mine) != np.asarray(image)).any()
        return pipe

    return check


@pytest.fixture()
def resumed_fit_is_the_straight_fit(short_fit, tmp_path):
    """``check(folder, stop_at, steps)``: a masked ADI fit (:meth:`ShortFit.trainer`) of ``steps`` steps on the
    pipeline ``folder`` with a checkpoint every step, and the same fit resumed from its step-``stop_at``
    checkpoint, in ``tmp_path``; asserts that the resumed fit ends at ``steps`` with the uninterrupted fit's
    identifier bit for bit and that its resumed steps moved the identifier; returns ``(identifier [R, D],
    resumed trainer)``. 4 anchors x 2 repeats in batches of 2: 4 batches an epoch."""
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    def check(folder: str, stop_at: int, steps: int):
        fit = ShortFit(folder, short_fit.data)

        def every_step(root):
            return ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1)

        straight, _ = fit.trainer(tmp_path / "straight", steps, callbacks=[every_step(tmp_path / "straight")])
        ckpt = next((tmp_path / "straight" / "ckpt").glob(f"*step={stop_at}.ckpt"))
        resumed, trainer = fit.trainer(tmp_path / "resumed", steps, callbacks=[every_step(tmp_path / "resumed")],
                                       ckpt_path=str(ckpt))
        assert trainer.global_step == steps
        assert torch.equal(resumed, straight)
        interrupted = torch.load(ckpt, weights_only=True)["state_dict"]["identifier.embedding"]
        assert not torch.equal(interrupted, straight)  # the resumed steps did move the identifier
        return straight, trainer

    return check


@pytest.fixture()
def multi_start_continues_the_lowest(tiny_data, tmp_path, monkeypatch):
    """``check(module)``: a 3-step fit of ``module`` (``model.starts=2``, ``start_steps=1``) on the tiny folder's
    ``jumping`` triples (batch 1) in which each start is scored by the real large-t anchor loss (4 draws);
    asserts that both starts begin at the initial rows, that they saw other data and scored differently,
    that step 3 goes on from the lower-scored start and that the choice is recorded (``start_selection``
    and the identifier file's ``starts`` metadata)."""
    import json

    import lightning as L
    import torch

    from adi_lightning.callbacks import multi_start
    from adi_lightning.data import ActionTripleDataModule

    def check(module) -> None:
        real, scored = multi_start.large_t_anchor_loss, []

        def score(pl_module, dataset, *args, **kwargs):
            rows = pl_module.identifier.embedding.detach().clone()
            scored.append((rows, real(pl_module, dataset, draws=4, batch_size=4)))
            return scored[-1][1]

        monkeypatch.setattr(multi_start, "large_t_anchor_loss", score)
        assert (module.hparams.starts, module.hparams.start_steps) == (2, 1)
        initial = module.identifier.embedding.detach().clone()
        tables = {}

        class Spy(L.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                tables[trainer.global_step] = pl_module.identifier.embedding.detach().clone()

        trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                            limit_val_batches=0, callbacks=[Spy()])
        trainer.fit(module, ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=1,
                                                   repeats=2, seed=1))
        assert torch.equal(tables[0], initial) and torch.equal(tables[1], initial)  # start 2 from the initial rows
        (rows_1, loss_1), (rows_2, loss_2) = scored
        assert not torch.equal(rows_1, rows_2) and loss_1 != loss_2  # the starts saw other data
        chosen = 1 if loss_1 <= loss_2 else 2
        assert torch.equal(tables[2], (rows_1, rows_2)[chosen - 1])  # step 3 goes on from the lower-scored start
        assert module.start_selection == {"chosen": chosen, "large_t_losses": [round(loss_1, 6), round(loss_2, 6)]}
        assert json.loads(module.identifier_metadata()["starts"])["chosen"] == chosen

    return check


@pytest.fixture(scope="session")
def large_t_score_draws_shifted_flow_times(tiny_data):
    """``check(module, shift, timestep_scale)``: multi-start's score (``large_t_anchor_loss``, 8 draws) of a
    flow-matching ``module`` on the tiny folder's ``jumping`` anchors is positive and finite, and hands the
    transformer exactly flow matching's large-t draws for the score's keys at step 0: flow time ``u`` uniform in
    ``[model.large_t_min, 1)``, shifted by ``shift`` (sigma in ``[shift(large_t_min), 1)``, never the unshifted
    band nor ``model.timestep_sampling``'s density), as timestep ``sigma * timestep_scale``."""
    import numpy as np
    import torch

    from adi_lightning import flow_matching
    from adi_lightning.callbacks import multi_start
    from adi_lightning.data import ActionTripleDataModule

    @torch.no_grad()
    def check(module, shift: float, timestep_scale: float) -> None:
        data = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=2, repeats=2,
                                      seed=1)
        data.setup("fit")
        seen = []
        hook = module.transformer.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True)
        try:
            score = multi_start.large_t_anchor_loss(module, data.train_dataset, draws=8, batch_size=4)
        finally:
            hook.remove()
        timesteps = torch.cat(seen)
        assert len(timesteps) == 8 and np.isfinite(score) and score > 0
        large_t_min = module.hparams.large_t_min
        low = float(flow_matching.shift_sigma(torch.tensor(large_t_min, dtype=torch.float64), shift))
        assert timesteps.min() >= (low - 1e-6) * timestep_scale and timesteps.max() < timestep_scale
        keys = (multi_start.SELECTION_KEY + torch.arange(8)).tolist()
        _, sigmas = flow_matching.keyed_noise_and_sigmas(keys, 0, 1, torch.zeros(8, 16, 4, 4),
                                                         module.hparams.timestep_sampling, shift, large_t_steps=1,
                                                         large_t_min=large_t_min)
        assert torch.equal(timesteps, sigmas * timestep_scale)

    return check


@pytest.fixture(scope="session")
def tiny_batch(tiny_data):
    """``tiny_batch(batch_size=2, with_partners=True, repeats=2, seed=3, num_workers=0)``: the first
    training batch of the tiny folder's ``jumping`` triples at 32 px (``images`` ``[B, 3, C, H, W]``
    with partners, ``[B, 1, C, H, W]`` without)."""
    from adi_lightning.data import ActionTripleDataModule

    def batch(batch_size=2, with_partners=True, repeats=2, seed=3, num_workers=0):
        dm = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=batch_size,
                                    with_partners=with_partners, repeats=repeats, seed=seed, num_workers=num_workers)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    return batch


class Recorder:
    """Wraps a layer-wise processor's inner attention and keeps the context it was last handed."""

    def __init__(self, inner):
        self.inner, self.context = inner, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        self.context = encoder_hidden_states.detach().clone()
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)


@pytest.fixture(scope="session")
def record_contexts():
    """``record_contexts(module)``: a :class:`Recorder` on every ``attn2`` layer of the module's UNet
    (each must hold a LayerwiseCrossAttnProcessor), in layer order; ``r.context`` is what layer saw."""
    from adi_lightning.conditioning import LayerwiseCrossAttnProcessor, cross_attention_layers

    def record(module):
        recorders = []
        for attn in cross_attention_layers(module.unet).values():
            assert isinstance(attn.processor, LayerwiseCrossAttnProcessor)
            attn.processor.inner = Recorder(attn.processor.inner)
            recorders.append(attn.processor.inner)
        return recorders

    return record


@pytest.fixture()
def make_module(tiny_pipeline):
    """Build an ADIModule on the tiny pipeline with keyword overrides."""
    from adi_lightning.module import ADIModule

    def make(**overrides):
        kwargs = dict(pretrained_model_name_or_path=tiny_pipeline, num_inference_steps=2, guidance_scale=2.0)
        kwargs.update(overrides)
        return ADIModule(**kwargs)

    return make


@pytest.fixture()
def fail_fit_at(monkeypatch):
    """``fail_fit_at(step, error=None)``: from global step ``step`` on, the training loss is NaN
    (or computing it raises ``error``), in every ADIModule of the test, CLI runs included."""
    from adi_lightning.module import ADIModule

    real = ADIModule.compute_loss

    def patch(step: int, error: BaseException | None = None) -> None:
        def compute_loss(self, batch, *args, **kwargs):
            loss, per_sample = real(self, batch, *args, **kwargs)
            if self.global_step < step:
                return loss, per_sample
            if error is not None:
                raise error
            return loss * float("nan"), per_sample

        monkeypatch.setattr(ADIModule, "compute_loss", compute_loss)

    return patch


class _FullDiskFile:
    """A real file whose first write stores half its bytes and then fails as a full disk does."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        import errno

        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


@pytest.fixture()
def disk_full(monkeypatch):
    """``disk_full(pattern)``: from then on, a file whose name matches ``pattern`` (fnmatch, e.g.
    ``*.ckpt*``, which matches a checkpoint's temp file too) opened for writing through Python's
    ``open`` takes half of its first write and then raises ``OSError(ENOSPC)``; other files are untouched.
    (Tests run as root, which a read-only mode does not stop.)"""
    import builtins
    import fnmatch
    import io
    from pathlib import Path

    real = io.open

    def patch(pattern: str) -> None:
        def open_(file, mode="r", *args, **kwargs):
            handle = real(file, mode, *args, **kwargs)
            writing = isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
            if writing and fnmatch.fnmatch(Path(file).name, pattern):
                return _FullDiskFile(handle)
            return handle

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)

    return patch


REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "experiments" / "tiny.yaml"
QUIET = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")


def run_dirs(root: Path) -> list[Path]:
    """The run folders under ``root`` (none when it does not exist; never creates it)."""
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


class ShortFit:
    """What :func:`short_fit` hands a test: the one way the tests start a short run.

    - ``short_fit(root, *flags, steps=4, subcommand="fit", in_process=True, pipeline=..., data=...)``
      runs ``python -m adi_lightning <subcommand> --config experiments/tiny.yaml`` on the session's
      tiny pipeline and action folder under ``trainer.default_root_dir=root`` (``flags`` last, so they
      win), in this process through ``adi_lightning.cli.main`` or, with ``in_process=False``, in a
      fresh ``python -m adi_lightning`` process (DDP re-launches its command line), and returns the
      run folder it wrote: the one new folder under ``root`` (or the one it rejoined, a requeued
      SLURM job). A refused command raises what ``main`` raises (``SystemExit``); a failed
      subprocess fails the test with the tail of its stderr.
    - ``short_fit.args(root, *flags, ...)``: that command's argument list (after ``-m adi_lightning``).
    - ``short_fit.trainer(root, max_steps, callbacks=[...], ...)``: the same kind of short fit with a
      plain ``lightning.Trainer`` (no CLI), returning ``(identifier table [rows, D], trainer)``.

    ``steps`` is ``trainer.max_steps`` (fit only; ``None`` leaves it to the config); ``pipeline``
    defaults to the tiny SD pipeline; ``data`` to the tiny action folder (``"null"`` gives
    ``--data.root=null``, ``None`` leaves the key out); ``config=None`` leaves ``--config`` out.
    """

    def __init__(self, pipeline: str, data: str) -> None:
        self.pipeline, self.data = pipeline, data

    def args(self, root, *flags: str, steps: int | None = 4, subcommand: str = "fit", pipeline: str | None = None,
             data: str | None = "", config: Path | None = TINY_YAML) -> list[str]:
        args = [subcommand]
        if config is not None:
            args += ["--config", str(config)]
        args.append(f"--model.pretrained_model_name_or_path={pipeline or self.pipeline}")
        if data is not None:
            args.append(f"--data.root={data or self.data}")
        args.append(f"--trainer.default_root_dir={root}")
        if subcommand == "fit" and steps is not None:
            args.append(f"--trainer.max_steps={steps}")
        return [*args, *QUIET, *flags]

    def __call__(self, root, *flags: str, steps: int | None = 4, subcommand: str = "fit", in_process: bool = True,
                 **options) -> Path:
        from adi_lightning.cli import RUN_DIR_ENV, main

        root = Path(root)
        args = self.args(root, *flags, steps=steps, subcommand=subcommand, **options)
        before = run_dirs(root)
        if in_process:
            main(args=args)
        else:
            env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
            env.pop(RUN_DIR_ENV, None)
            done = subprocess.run([sys.executable, "-m", "adi_lightning", *args], cwd=REPO, env=env,  # this checkout
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        new = [p for p in run_dirs(root) if p not in before]
        if not new and in_process and os.environ.get(RUN_DIR_ENV):
            new = [Path(os.environ[RUN_DIR_ENV])]  # rejoined its folder (a requeued SLURM job)
        assert len(new) == 1, f"expected exactly one new run folder under {root}, got {new}"
        return new[0]

    def trainer(self, root, max_steps: int, *, callbacks, ckpt_path: str | None = None, batch_size: int = 2,
                repeats: int = 2, num_workers: int = 0, accumulate_grad_batches: int = 1, **model):
        """A seeded Trainer fit of ``ADIModule`` (mask_threshold 0.5, weight_decay 0.01, learning
        rate 0.05, ``model`` overrides them) on the tiny folder's ``jumping`` triples at 32 px (4 anchors
        x ``repeats`` items, data seed 5), no logger and no validation, with ``callbacks`` (a
        ModelCheckpoint among them when the test needs checkpoints); ``ckpt_path`` resumes."""
        import lightning as L

        from adi_lightning.data import ActionTripleDataModule
        from adi_lightning.module import ADIModule

        L.seed_everything(0)
        module = ADIModule(self.pipeline, **{"mask_threshold": 0.5, "weight_decay": 0.01, "learning_rate": 0.05,
                                             **model})
        dm = ActionTripleDataModule(root=self.data, action="jumping", resolution=32, batch_size=batch_size,
                                    repeats=repeats, seed=5, num_workers=num_workers)
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=root, limit_val_batches=0,
                            accumulate_grad_batches=accumulate_grad_batches, callbacks=list(callbacks))
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return module.identifier.embedding.detach().clone(), trainer


@pytest.fixture(scope="session")
def short_fit(tiny_pipeline, tiny_data):
    """The one helper every test that starts a short run uses (see :class:`ShortFit`)."""
    return ShortFit(tiny_pipeline, tiny_data)
