"""Which model serves each mode: defaults, the settings file, environment overrides, local weight folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from i2v.backends import BACKENDS, ensure_tiny
from i2v.engine import Engine
from i2v.errors import I2VError
from i2v.settings import DEFAULT_MODELS, Settings
from i2v.speed import Speed


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a settings file and point I2V_CONFIG at it; the per-mode env overrides start unset."""
    monkeypatch.delenv("I2V_MODEL_STANDARD", raising=False)
    monkeypatch.delenv("I2V_MODEL_PRO", raising=False)
    for key in ("PRESET", "ATTENTION", "COMPILE", "BATCHED_CFG", "WARMUP", "TURBO_MODEL_STANDARD"):
        monkeypatch.delenv(f"I2V_{key}", raising=False)

    def write(text: str) -> Path:
        path = tmp_path / "config.toml"
        path.write_text(text)
        monkeypatch.setenv("I2V_CONFIG", str(path))
        return path

    return write


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("I2V_CONFIG", raising=False)
    monkeypatch.delenv("I2V_MODEL_PRO", raising=False)
    monkeypatch.delenv("I2V_MODEL_STANDARD", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/i2v/config.toml there
    assert Settings().models == DEFAULT_MODELS == {"standard": "wan2.2-ti2v-5b", "pro": "ltx-2"}


def test_file_points_a_mode_at_another_backend_and_env_wins(config, monkeypatch) -> None:
    config('[models]\npro = "wan2.1-flf2v-14b"\nstandard = "wan2.1-flf2v-14b=/models/flf2v"\n')
    assert Settings().models == {"standard": "wan2.1-flf2v-14b=/models/flf2v", "pro": "wan2.1-flf2v-14b"}
    monkeypatch.setenv("I2V_MODEL_PRO", "ltx-2-distilled")
    assert Settings().models["pro"] == "ltx-2-distilled"


def test_pro_served_from_a_local_folder_of_weights(config, tmp_path: Path) -> None:
    """`name=/folder` loads the backend's weights from that folder, through the same `load()`."""
    settings = Settings()
    folder = ensure_tiny(BACKENDS["ltx-2-distilled"], settings.tiny_dir)
    config(f'[models]\npro = "ltx-2-distilled={folder}"\n')
    backend = Engine(device="cpu").backend("pro")
    assert (backend.spec.name, backend.spec.source) == ("ltx-2-distilled", str(folder))
    assert backend.pipe is not None and backend.upsampler is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models\npro = 1", "settings file"),
        ("[models]\npro = 3\n", "model reference string"),
        ('[models]\nturbo = "ltx-2"\n', "unknown mode(s) turbo"),
        ("[turbo]\nstandard = 3\n", "[turbo] maps a mode"),
        ('[speed]\npreset = "ludicrous"\n', "preset must be one of default, fast, turbo, low-vram"),
        ("[speed]\ncompile = 1\n", "compile is true or false"),
        ("[speed]\nthreads = 4\n", "unknown key(s) threads"),
    ],
)
def test_a_broken_file_is_a_clear_error(config, text: str, message: str) -> None:
    path = config(text)
    with pytest.raises(I2VError) as error:
        Settings()
    assert str(path) in str(error.value) and message in str(error.value)


def test_a_missing_file_named_by_i2v_config_is_an_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("I2V_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(I2VError, match="does not exist"):
        Settings()


def test_an_unknown_model_name_is_refused(config) -> None:
    config('[models]\npro = "sora"\n')
    with pytest.raises(I2VError, match="unknown model 'sora'"):
        Engine(device="cpu").backend("pro")


def test_speed_and_turbo_tables_and_their_env_overrides(config, monkeypatch) -> None:
    config('[speed]\npreset = "fast"\ncompile = false\n\n[turbo]\nstandard = "fastwan2.2-ti2v-5b=/m/fw"\n')
    settings = Settings()
    assert settings.speed == Speed(preset="fast", compile=False)
    assert settings.turbo_models == {"standard": "fastwan2.2-ti2v-5b=/m/fw", "pro": "ltx-2-distilled"}
    monkeypatch.setenv("I2V_PRESET", "low-vram")
    monkeypatch.setenv("I2V_WARMUP", "off")
    assert Settings().speed == Speed(preset="low-vram", compile=False, warmup=False)
    monkeypatch.setenv("I2V_BATCHED_CFG", "maybe")
    with pytest.raises(I2VError, match="I2V_BATCHED_CFG: expected true or false, not 'maybe'"):
        Settings()
