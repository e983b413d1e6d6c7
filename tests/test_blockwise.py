"""Block-wise identifiers in an SD3 MMDiT: one text encoding per joint block, added to the carried
text stream as telescoping terms (adi_lightning.blockwise), on a tiny random SD3Transformer2DModel."""

from contextlib import contextmanager

import pytest
import torch

from adi_lightning.blockwise import (
    blockwise_block_to_row,
    group_blocks,
    install_blockwise_routing,
    stream_blocks,
    remove_blockwise_routing,
)
from adi_lightning.conditioning import cross_attention_layers
from adi_lightning.tiny.sd3 import build_tiny_sd3_transformer

T, J, BLOCKS = 5, 24, 4


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_sd3_transformer(num_layers=BLOCKS)


@pytest.fixture(scope="module")
def sd35():
    """SD3.5-Medium-like: block 0 has the dual (image-only ``attn2``) attention."""
    return build_tiny_sd3_transformer(num_layers=BLOCKS, dual_attention_layers=(0,), seed=1)


@pytest.fixture(params=["sd3", "sd35"])
def model(request):
    return request.getfixturevalue(request.param)


def _inputs(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    pooled = torch.randn(n, 16, generator=g)
    encodings = torch.randn(BLOCKS, n, T, J, generator=g)  # one per block (per row)
    return latents, pooled, torch.tensor([700.0, 300.0][:n]), encodings


def _forward(model, latents, pooled, timestep, text, **kw):
    return model(latents, text, pooled, timestep, **kw).sample


def _cat(encodings):
    """``[R, N, T, J]`` -> ``[N, R*T, J]``: the row encodings along the token axis."""
    return torch.cat(list(encodings), dim=1)


@contextmanager
def routed(model, block_to_row=None):
    install_blockwise_routing(model, T, block_to_row)
    try:
        yield
    finally:
        remove_blockwise_routing(model)


@contextmanager
def recorded_streams(model):
    """(inputs, outputs): each joint block's text stream as it enters (after our term) and leaves."""
    inputs, outputs, handles = {}, {}, []
    for index, block in enumerate(model.transformer_blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k, i=index: inputs.__setitem__(i, k["encoder_hidden_states"].detach().clone()),
            with_kwargs=True))
        handles.append(block.register_forward_hook(
            lambda m, a, o, i=index: outputs.__setitem__(i, None if o[0] is None else o[0].detach().clone())))
    try:
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()


def _hooks(model):
    return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._forward_hooks_with_kwargs),
                   dict(m._forward_pre_hooks_with_kwargs)) for name, m in model.named_modules()}


@torch.no_grad()
def test_equal_rows_are_bit_identical_to_textual_inversion(model):
    latents, pooled, timestep, encodings = _inputs()
    one = encodings[0]
    ti = _forward(model, latents, pooled, timestep, one)
    with routed(model):
        assert torch.equal(_forward(model, latents, pooled, timestep, one.repeat(1, BLOCKS, 1)), ti)
        assert torch.equal(_forward(model, latents, pooled, timestep, one), ti)  # a plain [N, T, J] passes through
        # skip-layer guidance (StableDiffusion3Pipeline's skip_guidance_layers) keeps the identity
        skipped = _forward(model, latents, pooled, timestep, one.repeat(1, BLOCKS, 1), skip_layers=[1])
    assert torch.equal(skipped, _forward(model, latents, pooled, timestep, one, skip_layers=[1]))


@torch.no_grad()
def test_row_b_reaches_the_stream_first_at_block_b(model):
    """Block b's stream input is block b-1's stream output + c(E_b) - c(E_{b-1}) (block 0's: c(E_0));
    changing only row b leaves every block before b untouched and changes block b by c(E_b') - c(E_b)."""
    latents, pooled, timestep, encodings = _inputs()
    c = model.context_embedder
    with routed(model), recorded_streams(model) as (inputs, outputs):
        base = _forward(model, latents, pooled, timestep, _cat(encodings))
        base_in, base_out = dict(inputs), dict(outputs)
        assert torch.equal(base_in[0], c(encodings[0]))
        for b in range(1, BLOCKS):
            assert torch.allclose(base_in[b], base_out[b - 1] + c(encodings[b]) - c(encodings[b - 1]), atol=1e-6)
        for b in range(BLOCKS):
            changed = encodings.clone()
            changed[b] += 0.5 * torch.randn(changed[b].shape, generator=torch.Generator().manual_seed(b))
            after = _forward(model, latents, pooled, timestep, _cat(changed))
            assert [i for i in range(BLOCKS) if not torch.equal(inputs[i], base_in[i])] == list(range(b, BLOCKS))
            assert torch.allclose(inputs[b] - base_in[b], c(changed[b]) - c(encodings[b]), atol=1e-5)
            assert not torch.allclose(after, base, atol=1e-4)
    assert model.transformer_blocks[-1].context_pre_only and base_out[BLOCKS - 1] is None  # the last block's row counts


@torch.no_grad()
def test_skipped_blocks_keep_the_telescoping(sd3):
    """With ``skip_layers=[1]`` block 2 gets block 0's output + c(E_2) - c(E_0): it still sees row 2."""
    latents, pooled, timestep, encodings = _inputs()
    c = sd3.context_embedder
    with routed(sd3), recorded_streams(sd3) as (inputs, outputs):
        _forward(sd3, latents, pooled, timestep, _cat(encodings), skip_layers=[1])
        assert 1 not in inputs
        assert torch.allclose(inputs[2], outputs[0] + c(encodings[2]) - c(encodings[0]), atol=1e-6)


def test_every_row_gets_a_gradient_and_equal_rows_sum_to_the_textual_inversion_gradient(sd3):
    latents, pooled, timestep, encodings = _inputs()
    text = _cat(encodings).requires_grad_(True)
    with routed(sd3):
        _forward(sd3, latents, pooled, timestep, text).square().mean().backward()
    norms = [float(chunk.norm()) for chunk in text.grad.split(T, dim=1)]
    assert all(n > 0 for n in norms), norms
    # Equal rows: the forward is TI's, so the rows' gradients sum to TI's (as a shared row's would).
    one = encodings[0].clone().requires_grad_(True)
    _forward(sd3, latents, pooled, timestep, one).square().mean().backward()
    same = one.detach().repeat(1, BLOCKS, 1).requires_grad_(True)
    with routed(sd3):
        _forward(sd3, latents, pooled, timestep, same).square().mean().backward()
    chunks = same.grad.split(T, dim=1)
    assert torch.allclose(sum(chunks), one.grad, rtol=1e-4, atol=1e-9)
    assert not torch.allclose(chunks[0], one.grad, rtol=1e-2)  # row 0 alone is not the TI gradient


@pytest.mark.parametrize("block_to_row", [[0, 0, 1, 1], [0, 1, 1, 0], [0, 1, 2, 2]])
def test_row_groups_equal_per_block_routing_with_duplicated_encodings(sd3, block_to_row):
    latents, pooled, timestep, encodings = _inputs()
    rows = max(block_to_row) + 1
    grouped = _cat(encodings[:rows]).requires_grad_(True)
    with routed(sd3, torch.tensor(block_to_row)):
        assert blockwise_block_to_row(sd3).tolist() == block_to_row
        out_grouped = _forward(sd3, latents, pooled, timestep, grouped)
        with pytest.raises(ValueError, match=f"or {rows}\\*{T} = {rows * T} "):  # the per-block form is refused
            _forward(sd3, latents, pooled, timestep, _cat(encodings))
    out_grouped.square().mean().backward()
    spread = encodings[:rows].clone().requires_grad_(True)
    with routed(sd3):
        out_spread = _forward(sd3, latents, pooled, timestep, _cat(spread[block_to_row]))
    assert torch.equal(out_grouped, out_spread)
    out_spread.square().mean().backward()
    assert torch.allclose(_cat(spread.grad), grouped.grad, rtol=1e-5, atol=1e-9)


def test_group_blocks():
    assert group_blocks(4, 4).tolist() == [0, 1, 2, 3]
    assert group_blocks(4, 1).tolist() == [0, 0, 0, 0]
    assert group_blocks(24, 4).tolist() == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 6
    assert group_blocks(5, 2).tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="between 1 and the 4 joint blocks"):
        group_blocks(4, 5)


@torch.no_grad()
def test_install_and_remove_restore_the_transformer_exactly(sd3):
    latents, pooled, timestep, encodings = _inputs()
    before_hooks, before_state = _hooks(sd3), {k: v.clone() for k, v in sd3.state_dict().items()}
    before = _forward(sd3, latents, pooled, timestep, encodings[0])
    install_blockwise_routing(sd3, T)
    try:
        with pytest.raises(RuntimeError, match="already installed"):
            install_blockwise_routing(sd3, T)
        with pytest.raises(ValueError, match=rf"{T} tokens \(a plain prompt\) or 4\*5 = 20 .* got 15"):
            _forward(sd3, latents, pooled, timestep, _cat(encodings[:3]))
        _forward(sd3, latents, pooled, timestep, _cat(encodings))  # leaves its projections behind
    finally:
        assert remove_blockwise_routing(sd3)
    assert not remove_blockwise_routing(sd3) and blockwise_block_to_row(sd3) is None
    assert _hooks(sd3) == before_hooks and all(not any(h) for h in before_hooks.values())
    assert all(torch.equal(v, before_state[k]) for k, v in sd3.state_dict().items())
    assert torch.equal(_forward(sd3, latents, pooled, timestep, encodings[0]), before)
    # a 4-block encoding now reaches the stock forward as 20 ordinary tokens (no error, another result)
    assert not torch.equal(_forward(sd3, latents, pooled, timestep, _cat(encodings)), before)


def test_bad_arguments_are_refused(sd3):
    with pytest.raises(ValueError, match=r"block_to_row \[0, 2, 2, 2\] does not number the rows 0..R-1 of 4 joint"):
        install_blockwise_routing(sd3, T, torch.tensor([0, 2, 2, 2]))
    with pytest.raises(ValueError, match="does not number the rows"):
        install_blockwise_routing(sd3, T, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="tokens_per_prompt must be a positive int"):
        install_blockwise_routing(sd3, 0)
    assert blockwise_block_to_row(sd3) is None  # nothing was installed by a refused call
    not_mmdit = torch.nn.Module()
    not_mmdit.context_embedder = torch.nn.Linear(J, 16)
    not_mmdit.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(16, 16)])
    with pytest.raises(ValueError, match="Module is not an SD3 or FLUX MMDiT"):
        stream_blocks(not_mmdit)


def test_joint_blocks_not_attn2_names_in_a_dual_attention_mmdit(sd35):
    paths = stream_blocks(sd35)
    assert paths == [f"transformer_blocks.{b}" for b in range(BLOCKS)]
    assert [sd35.get_submodule(p) for p in paths] == list(sd35.transformer_blocks)
    # The UNet's discovery (by 'attn2' name) finds one layer, SD3.5's image-only self-attention:
    # no text (added_kv_proj_dim) projections, unlike the joint attention every block has.
    found = cross_attention_layers(sd35)
    assert list(found) == ["transformer_blocks.0.attn2"]
    assert found["transformer_blocks.0.attn2"].added_kv_proj_dim is None
    assert all(block.attn.added_kv_proj_dim is not None for block in sd35.transformer_blocks)


def test_gradient_checkpointing_recomputes_each_block_with_its_own_row():
    model = build_tiny_sd3_transformer(num_layers=BLOCKS)
    latents, pooled, timestep, encodings = _inputs()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        text = _cat(encodings).requires_grad_(True)
        with routed(model):
            _forward(model, latents, pooled, timestep, text).square().mean().backward()
        grads.append(text.grad)
    assert torch.equal(grads[0], grads[1])
    with routed(model):  # two forwards, one backward: the first forward's blocks cannot be recomputed
        first = _forward(model, latents, pooled, timestep, _cat(encodings).requires_grad_(True))
        _forward(model, latents, pooled, timestep, _cat(encodings.flip(0)))
        with pytest.raises(RuntimeError, match="call backward before the next forward"):
            first.sum().backward()


@torch.no_grad()
def test_the_stock_sd3_pipeline_runs_block_wise_prompt_embeds(sd3):
    """``StableDiffusion3Pipeline`` with ``prompt_embeds`` ``[N, B*T, J]`` (classifier-free guidance
    batches them with an equally long negative): equal rows draw TI's latents, a changed row others."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    parts = {name: None for name in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                     "text_encoder_3", "tokenizer_3")}
    pipe = StableDiffusion3Pipeline(transformer=sd3, scheduler=FlowMatchEulerDiscreteScheduler(), **parts)
    pipe.set_progress_bar_config(disable=True)
    _, pooled, _, encodings = _inputs(n=1)
    negative = torch.zeros_like(encodings[0])

    def draw(text, negative_text, **kw):
        return pipe(prompt_embeds=text, negative_prompt_embeds=negative_text, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=torch.zeros_like(pooled), height=64, width=64,
                    num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
                    **kw).images

    ti = draw(encodings[0], negative)
    ti_slg = draw(encodings[0], negative, skip_guidance_layers=[1])
    with routed(sd3):
        assert torch.equal(draw(encodings[0].repeat(1, BLOCKS, 1), negative.repeat(1, BLOCKS, 1)), ti)
        assert torch.equal(draw(encodings[0].repeat(1, BLOCKS, 1), negative.repeat(1, BLOCKS, 1),
                                skip_guidance_layers=[1]), ti_slg)
        changed = torch.cat([encodings[0], encodings[0], encodings[2], encodings[0]], dim=1)
        assert not torch.allclose(draw(changed, negative.repeat(1, BLOCKS, 1)), ti, atol=1e-4)


# ---------------------------------------------------------------- FLUX: double- then single-stream blocks
FLUX_DOUBLE, FLUX_SINGLE = 2, 2
FLUX_BLOCKS = FLUX_DOUBLE + FLUX_SINGLE


@pytest.fixture(scope="module")
def flux():
    from adi_lightning.tiny.flux import build_tiny_flux_transformer

    return build_tiny_flux_transformer(num_layers=FLUX_DOUBLE, num_single_layers=FLUX_SINGLE, joint_attention_dim=J)


def _flux_inputs(seed=0, n=2, side=4):
    """Packed latents ``[n, side*side, 64]``, pooled ``[n, 16]``, sigmas ``[n]``, ``img_ids``, one encoding
    per block."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, side * side, 64, generator=g)
    pooled = torch.randn(n, 16, generator=g)
    encodings = torch.randn(FLUX_BLOCKS, n, T, J, generator=g)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0),
                                         indexing="ij"), dim=-1).reshape(-1, 3)
    return latents, pooled, torch.tensor([0.7, 0.3][:n]), img_ids, encodings


def _flux_forward(model, latents, pooled, sigma, img_ids, text, txt_ids=None):
    txt_ids = torch.zeros(text.shape[1], 3) if txt_ids is None else txt_ids
    return model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled, timestep=sigma,
                 img_ids=img_ids, txt_ids=txt_ids, guidance=torch.full_like(sigma, 3.5)).sample


def test_flux_stream_blocks_are_the_double_then_the_single_stream_blocks(flux):
    from adi_lightning.blockwise import stream_blocks

    paths = stream_blocks(flux)
    assert paths == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                     "single_transformer_blocks.1"]


@torch.no_grad()
def test_flux_equal_rows_are_bit_identical_to_textual_inversion(flux):
    """Equal rows: every telescoping term (double- and single-stream) is zero, and the R*T txt_ids of
    FluxPipeline.encode_prompt are cut to T, so the forward is the plain one bit for bit."""
    latents, pooled, sigma, img_ids, encodings = _flux_inputs()
    one = encodings[0]
    ti = _flux_forward(flux, latents, pooled, sigma, img_ids, one)
    with routed(flux):
        assert torch.equal(_flux_forward(flux, latents, pooled, sigma, img_ids, one.repeat(1, FLUX_BLOCKS, 1)), ti)
        assert torch.equal(_flux_forward(flux, latents, pooled, sigma, img_ids, one), ti)
        with pytest.raises(ValueError, match="same txt_ids for every identifier row"):
            ids = torch.zeros(FLUX_BLOCKS * T, 3)
            ids[T] = 1.0
            _flux_forward(flux, latents, pooled, sigma, img_ids, one.repeat(1, FLUX_BLOCKS, 1), ids)


@torch.no_grad()
def test_flux_row_b_reaches_the_stream_first_at_block_b_single_stream_blocks_included(flux):
    latents, pooled, sigma, img_ids, encodings = _flux_inputs()
    c = flux.context_embedder
    with routed(flux), recorded_streams(flux) as (inputs, outputs):
        base = _flux_forward(flux, latents, pooled, sigma, img_ids, _cat(encodings))
        base_in = dict(inputs)
        assert torch.equal(base_in[0], c(encodings[0]))
        single_in, single_out = {}, {}
        handles = [block.register_forward_pre_hook(
            lambda m, a, k, i=i: single_in.__setitem__(i, k["encoder_hidden_states"].clone()), with_kwargs=True)
            for i, block in enumerate(flux.single_transformer_blocks)]
        handles += [block.register_forward_hook(lambda m, a, o, i=i: single_out.__setitem__(i, o[0].clone()))
                    for i, block in enumerate(flux.single_transformer_blocks)]
        try:
            _flux_forward(flux, latents, pooled, sigma, img_ids, _cat(encodings))
        finally:
            for handle in handles:
                handle.remove()
        # The first single-stream block gets the last double-stream block's stream + c(E_2) - c(E_1).
        assert torch.allclose(single_in[0], outputs[FLUX_DOUBLE - 1] + c(encodings[2]) - c(encodings[1]), atol=1e-6)
        assert torch.allclose(single_in[1], single_out[0] + c(encodings[3]) - c(encodings[2]), atol=1e-6)
        for b in range(FLUX_BLOCKS):
            changed = encodings.clone()
            changed[b] += 0.5 * torch.randn(changed[b].shape, generator=torch.Generator().manual_seed(b))
            after = _flux_forward(flux, latents, pooled, sigma, img_ids, _cat(changed))
            double_changed = [i for i in range(FLUX_DOUBLE) if not torch.equal(inputs[i], base_in[i])]
            assert double_changed == list(range(min(b, FLUX_DOUBLE), FLUX_DOUBLE)), b
            assert not torch.allclose(after, base, atol=1e-5), b


def test_flux_gradient_checkpointing_recomputes_each_block_with_its_own_row():
    from adi_lightning.tiny.flux import build_tiny_flux_transformer

    model = build_tiny_flux_transformer(num_layers=FLUX_DOUBLE, num_single_layers=FLUX_SINGLE, joint_attention_dim=J)
    latents, pooled, sigma, img_ids, encodings = _flux_inputs()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        text = _cat(encodings).requires_grad_(True)
        with routed(model):
            _flux_forward(model, latents, pooled, sigma, img_ids, text, torch.zeros(FLUX_BLOCKS * T, 3)
                          ).square().mean().backward()
        grads.append(text.grad)
    assert torch.equal(grads[0], grads[1])
    assert all(float(chunk.norm()) > 0 for chunk in grads[0].split(T, dim=1))


@torch.no_grad()
def test_the_stock_flux_pipeline_runs_block_wise_prompt_embeds(flux):
    """``FluxPipeline`` with ``prompt_embeds`` ``[N, B*T, J]`` (it makes ``txt_ids`` of B*T zeros): equal
    rows draw TI's latents bit for bit, a changed single-stream row other latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from adi_lightning.tiny.flux import FLUX_SCHEDULER

    pipe = FluxPipeline(transformer=flux, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    _, pooled, _, _, encodings = _flux_inputs(n=1)

    def draw(text):
        return pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, height=64, width=64, num_inference_steps=2,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images

    ti = draw(encodings[0])
    with routed(flux):
        assert torch.equal(draw(encodings[0].repeat(1, FLUX_BLOCKS, 1)), ti)
        changed = torch.cat([encodings[0], encodings[0], encodings[0], encodings[2]], dim=1)
        assert not torch.allclose(draw(changed), ti, atol=1e-5)
