"""Footprints counted on `meta` from the configs: the published parameter counts, the load dtypes, the
tiny twins' bytes as loaded, and the placement each GPU class gets (docs/memory.md's tables)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from i2v import Engine
from i2v.backends import BACKENDS
from i2v.footprint import build_on_meta, packaged_config, tensor_bytes
from i2v.memory import GPU_CLASSES, RESERVE, Placement, activations_for, choose, plan_mode
from i2v.request import MODES
from i2v.speed import Speed

# Published parameter counts (/work/shared/notes/configs.md): exact where it gives them exactly.
EXACT = {
    ("wan2.2-ti2v-5b", "transformer"): 4_999_787_712,
    ("wan2.2-ti2v-5b", "text_encoder"): 5_680_910_336,
    ("wan2.2-ti2v-5b", "vae"): 704_688_668,
    ("wan2.1-flf2v-14b", "vae"): 126_892_531,  # the Wan2.1 VAE
    ("wan2.1-flf2v-14b", "text_encoder"): 5_680_910_336,
}
# ... and as it rounds them (billions to two places, millions to whole ones).
ROUNDED = {
    "transformer": (18.88, 1e9),
    "connectors": (1.43, 1e9),
    "vae": (1.22, 1e9),
    "audio_vae": (53, 1e6),
    "vocoder": (56, 1e6),
    "latent_upsampler": (498, 1e6),
    "text_encoder": (12.19, 1e9),
}
WAN_I2V_A14B_EXPERT = 14_288_901_184  # the Wan 14B architecture without FLF2V's image conditioning


def real_parts(name: str, device_type: str = "cuda"):
    cls = BACKENDS[name]
    return cls.parts(cls.spec, device_type)


def test_footprints_of_the_real_models_match_the_published_parameter_counts() -> None:
    for name in ("wan2.2-ti2v-5b", "fastwan2.2-ti2v-5b", "wan2.1-flf2v-14b"):
        family = "wan2.1-flf2v-14b" if "flf2v" in name else "wan2.2-ti2v-5b"
        for part_name, part in real_parts(name).items():
            if (family, part_name) in EXACT:
                assert part.size.params == EXACT[family, part_name], (name, part_name)
    for name in ("ltx-2", "ltx-2-distilled"):
        for part_name, part in real_parts(name).items():
            value, unit = ROUNDED[part_name]
            assert round(part.size.params / unit, 2 if unit == 1e9 else 0) == value, (name, part_name)
    # FLF2V's transformer is the Wan 14B one plus its image conditioning (CLIP tokens, added k/v).
    config = packaged_config("wan2.1-flf2v-14b", "transformer").read_text()
    plain = {**json.loads(config), "image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": None}
    model = build_on_meta(BACKENDS["wan2.1-flf2v-14b"].components[0].cls, plain)
    assert sum(p.numel() for p in model.parameters()) == WAN_I2V_A14B_EXPERT


def test_bytes_follow_the_dtype_each_part_loads_in() -> None:
    parts = real_parts("wan2.2-ti2v-5b")
    transformer, text, vae = parts["transformer"].size, parts["text_encoder"].size, parts["vae"].size
    assert text.bytes == 2 * text.params  # bf16
    assert vae.bytes == 4 * vae.params  # the Wan VAE loads in float32
    # bf16, but the norms, time embedder and modulation table stay float32, and the RoPE tables too.
    assert 2 * transformer.params < transformer.bytes < 2.01 * transformer.params
    # fp8 compute: the blocks' linear weights at 1 byte (and a float32 scale a row), the rest as loaded.
    assert 0.5 * transformer.bytes < transformer.fp8_bytes < 0.52 * transformer.bytes
    assert (text.fp8_bytes, vae.fp8_bytes) == (text.bytes, vae.bytes)  # only the transformer goes to fp8
    # Group offload streams the transformer's blocks (in fp8 storage under low-vram), but UMT5's stack is
    # one child: it moves whole.
    assert transformer.streamed_bytes < transformer.bytes / 10 and text.streamed_bytes == text.bytes
    on_cpu = real_parts("wan2.2-ti2v-5b", "cpu")["text_encoder"].size
    assert on_cpu.bytes == 4 * on_cpu.params  # float32 on a CPU


@pytest.fixture(scope="module")
def tiny(_cache_dir: Path) -> Engine:
    return Engine("tiny")


def test_tiny_footprints_counted_on_meta_equal_the_loaded_tensors(tiny: Engine) -> None:
    """The counting rule is what from_pretrained does: each part's meta count equals the loaded bytes."""
    for mode in MODES:
        key = tiny.key(mode, "turbo")  # the distilled LTX-2 carries no LoRA, so every byte is counted
        cls, spec = tiny.executor.spec(key)
        planned = cls.parts(spec, "cpu")
        loaded = tiny.backend(mode, "turbo").modules()
        assert set(planned) == set(loaded)
        for name, module in loaded.items():
            assert planned[name].size.bytes == tensor_bytes(module), (spec.name, name)
            assert planned[name].config_from.startswith(spec.source)  # read from the twin's own folder


def budget_of(name: str) -> int:
    return GPU_CLASSES[name] - RESERVE


@pytest.mark.parametrize(
    ("model", "gpu", "speed", "kind", "fits"),
    [
        ("wan2.2-ti2v-5b", "24 GB", Speed(), "offload", (5, 10)),  # low-vram by itself on a 24 GB card
        # fp8 compute quantizes on the device: the bf16 load (24.2 GB) does not fit before it does
        ("wan2.2-ti2v-5b", "24 GB", Speed(preset="fast"), "offload", (5, 10)),
        ("wan2.2-ti2v-5b", "48 GB", Speed(preset="fast"), "resident", (5, 10)),
        ("ltx-2-distilled", "48 GB", Speed(preset="fast"), "offload", (5, 10)),  # 69 GB as it loads
        ("ltx-2-distilled", "80 GB", Speed(preset="fast"), "resident", (5, 10)),
        ("wan2.2-ti2v-5b", "48 GB", Speed(), "resident", (5, 10)),
        ("ltx-2", "24 GB", Speed(), "offload", ()),  # Gemma-3 moves whole under group offload: 24.4 GB
        ("ltx-2", "48 GB", Speed(), "offload", (5, 10)),
        ("ltx-2", "80 GB", Speed(), "resident", (5, 10)),
        ("wan2.1-flf2v-14b", "80 GB", Speed(), "shuttle", (5, 10)),  # 10 s: 147k tokens of 14B blocks
    ],
)
def test_the_plan_picks_the_placement_that_fits_each_gpu_class(model, gpu, speed, kind, fits) -> None:
    cls = BACKENDS[model]
    parts = cls.parts(cls.spec, "cuda")
    per_placement = activations_for(cls, cls.spec, parts, plan_mode(cls.spec), batched_cfg=True)
    chosen = choose(model, parts, per_placement, budget_of(gpu), speed, "cuda")
    assert (chosen.placement.kind, chosen.fits) == (kind, fits), chosen.describe()
    assert chosen.placement.fp8 == (speed.fp8 and kind != "offload")


def test_a_placement_reads_as_it_is_documented() -> None:
    assert str(Placement("shuttle", fp8=True)) == "text encoder off the device while denoising, fp8 compute"


def test_the_tables_in_docs_memory_md_are_current() -> None:
    from i2v.models_info import memory_tables

    doc = (Path(__file__).resolve().parents[1] / "docs" / "memory.md").read_text()
    start = doc.index("-->\n", doc.index("<!-- tables:")) + len("-->\n")
    end = doc.index("<!-- end of tables -->")
    assert doc[start:end] == memory_tables(), (
        "run: python -m i2v.models_info, and paste it into docs/memory.md"
    )


def test_a_wrapper_tensor_counts_the_tensors_it_holds() -> None:
    """torchao's float8 weights are wrapper tensors (fp8 data + float32 scales) that report the dtype they
    stand for; residency counts what they hold (torch's own two-tensor wrapper stands in: no fp8 here)."""
    from torch.testing._internal.two_tensor import TwoTensor

    layer = torch.nn.Linear(8, 4, bias=False)
    inner = (torch.zeros(4, 8, dtype=torch.float8_e4m3fn), torch.zeros(4, 8, dtype=torch.float8_e4m3fn))
    layer.weight = torch.nn.Parameter(TwoTensor(*inner), requires_grad=False)
    assert layer.weight.element_size() == 1 and tensor_bytes(layer) == 2 * 32
