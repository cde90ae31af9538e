"""A transformer no built-in adapter names runs when the user says where its video tokens are.

``apply_rainfusion(model, adapter=ModelAdapter(...))``: the attention modules as
(block list, attention attribute) pairs, the latent grid from the forward's arguments,
the text's position; processors that call ``dispatch_attention_fn`` or
``F.scaled_dot_product_attention`` are recognised by what they call.
"""
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusers]'")

from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

from rainfusion_core.integrations.diffusers import ModelAdapter, apply_rainfusion, attention_layers  # noqa: E402
from tiny_models import MODELS, forward  # noqa: E402

TEXT = 6


class ToyVideoDiT(torch.nn.Module):
    """A video transformer diffusers does not ship: [B, C, F, H, W] latents, text tokens after the video."""

    def __init__(self, channels=8, heads=2, head_dim=16, layers=2):
        super().__init__()
        width = heads * head_dim
        self.embed = torch.nn.Linear(channels, width)
        self.text_embed = torch.nn.Linear(4, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"attn": Attention(width, heads=heads, dim_head=head_dim, processor=AttnProcessor2_0()),
                                 "mlp": torch.nn.Linear(width, width)}) for _ in range(layers))
        self.out = torch.nn.Linear(width, channels)

    def forward(self, hidden_states, encoder_hidden_states, timestep=None, return_dict=False):
        batch, channels, frames, height, width = hidden_states.shape
        video = self.embed(hidden_states.flatten(2).transpose(1, 2))  # frame-major raster order
        x = torch.cat([video, self.text_embed(encoder_hidden_states)], dim=1)  # text at the tail
        for block in self.blocks:
            x = x + block["attn"](x)
            x = x + block["mlp"](x)
        video = self.out(x[:, :frames * height * width])
        return (video.transpose(1, 2).reshape(batch, channels, frames, height, width),)


def _grid(transformer, arguments):
    return tuple(arguments["hidden_states"].shape[2:])


ADAPTER = ModelAdapter(family="ToyVideoDiT", attention_modules=[("blocks", "attn")], grid=_grid,
                       text_position="tail")


def _model_and_inputs(seed=0, grid=(3, 8, 10)):
    torch.manual_seed(seed)
    model = ToyVideoDiT().eval()
    kwargs = dict(hidden_states=torch.randn(2, 8, *grid), encoder_hidden_states=torch.randn(2, TEXT, 4),
                  timestep=torch.tensor([500.0, 500.0]))
    return model, kwargs


def test_a_model_no_adapter_names_is_refused_with_what_to_give():
    model, _ = _model_and_inputs()
    with pytest.raises(TypeError, match=r"got ToyVideoDiT.*For another model, say where its video tokens are: "
                                        r"apply_rainfusion\(model, adapter=ModelAdapter\(family=\.\.\., "
                                        r"attention_modules="):
        apply_rainfusion(model)


def test_a_users_adapter_runs_it_sparse_and_remove_restores_it():
    model, kwargs = _model_and_inputs()
    dense = forward(model, kwargs)
    assert attention_layers(model, adapter=ADAPTER) == ["blocks.0.attn", "blocks.1.attn"]
    handle = apply_rainfusion(model, sparsity=0.0, block_size=16, backend="torch", adapter=ADAPTER)
    torch.testing.assert_close(forward(model, kwargs), dense, rtol=1e-4, atol=1e-5)  # sparsity 0 is dense
    assert (handle.layout.frames, handle.layout.height, handle.layout.width) == (3, 8, 10)
    handle.remove()
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch", min_tokens=0, adapter=ADAPTER)
    sparse = forward(model, kwargs)
    assert not torch.allclose(sparse, dense, atol=1e-3) and torch.isfinite(sparse).all()
    assert handle.stats().sparse_calls == 1 and handle.stats().masks == 2  # one transformer call, two layers
    handle.remove()
    assert torch.equal(forward(model, kwargs), dense)


def test_a_users_adapter_gives_what_the_built_in_one_gives():
    wan = next(m for m in MODELS if m.family == "Wan")
    kwargs = wan.inputs((3, 8, 10), 2, False, 500)
    outputs = []
    for adapter in (None, ModelAdapter(family="my Wan", attention_modules=[("blocks", "attn1")],
                                       grid=lambda t, a: (a["hidden_states"].shape[2], a["hidden_states"].shape[3] // 2,
                                                          a["hidden_states"].shape[4] // 2))):
        model = wan.build(0)
        handle = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch", min_tokens=0,
                                  adapter=adapter)
        outputs.append(forward(model, kwargs))
        handle.remove()
    assert torch.equal(*outputs)


@pytest.mark.parametrize("fields, message", [
    (dict(attention_modules="blocks"), "attention_modules must be a function .* or pairs of"),
    (dict(attention_modules=[("blocks",)]), "attention_modules must be a function"),
    (dict(grid=(3, 8, 10)), "grid must be a function"),
    (dict(text_position="middle"), "text_position must be None or one of"),
    (dict(text_valid=lambda t, a: None, text_position=None), "text_valid needs a text_position"),
    (dict(family=""), "family must be a non-empty string"),
])
def test_a_bad_adapter_is_refused_by_field(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelAdapter(**{**dict(family="Toy", attention_modules=[("blocks", "attn")], grid=_grid), **fields})


def test_a_processor_that_calls_no_attention_function_rainfusion_routes_is_named():
    class Opaque:
        def __call__(self, attn, hidden_states, **kwargs):
            return hidden_states

    model, _ = _model_and_inputs()
    model.blocks[1]["attn"].set_processor(Opaque())
    with pytest.raises(TypeError, match="blocks.1.attn runs Opaque; RainFusion routes the attention of any processor "
                                        "that calls dispatch_attention_fn or F.scaled_dot_product_attention"):
        apply_rainfusion(model, adapter=ADAPTER)
    with pytest.raises(TypeError, match="adapter must be a rainfusion_core.integrations.diffusers.ModelAdapter"):
        apply_rainfusion(model, adapter={"family": "Toy"})


def test_a_misspelt_block_list_or_timestep_argument_is_named():
    model, kwargs = _model_and_inputs()
    typo = ModelAdapter(family="Toy", attention_modules=[("blockz", "attn")], grid=_grid)
    with pytest.raises(ValueError, match="names the block list 'blockz', which ToyVideoDiT does not have"):
        apply_rainfusion(model, adapter=typo)
    wrong = ModelAdapter(family="Toy", attention_modules=[("blocks", "mlp")], grid=_grid)
    with pytest.raises(ValueError, match="names blocks.0.mlp, which is not an attention module with a processor"):
        attention_layers(model, adapter=wrong)
    from rainfusion_core.integrations.diffusers import Schedule

    no_t = ModelAdapter(family="Toy", attention_modules=[("blocks", "attn")], grid=_grid, timestep="t",
                        text_position="tail")
    handle = apply_rainfusion(model, adapter=no_t, backend="torch", schedule=Schedule(dense_steps=1))
    with pytest.raises(ValueError, match="counting steps reads the transformer's argument 't'"):
        forward(model, kwargs)
    handle.remove()
