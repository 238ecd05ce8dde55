"""`dgaug plan`'s bill: FLOPs per sample from PyTorch's counter on the models' shapes (cached per
architecture), bytes per sample, and GPU-hours from an assumed or a measured rate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dgaug.cli.app import app
from dgaug.core.storage import Storage
from dgaug.job.bill import build_bill, edsam_flops
from dgaug.job.manifest import load_manifest
from dgaug.job.run import plan_stages
from tests.helpers import REPO

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture(autouse=True)
def flop_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.getbasetemp() / "flop-cache"  # shared: each shape counted once
    monkeypatch.setenv("DGAUG_CACHE_DIR", str(folder))
    return folder


def test_sd15_edsam_sample_costs_what_methods_md_counts() -> None:
    """SD-1.5 at 512 px, 20 guided steps, M 10: 20 x 2 UNet rows (0.80 TFLOP each) and a decode
    (2.5 TFLOP): METHODS.md's 34.8 TFLOP with the latent start; the inverted start adds one
    unguided inversion per source image, shared by its 10 samples (+1.6)."""
    from dgaug.models.flops import ldm_flops
    from dgaug.stages.edsam.config import EdsamConfig

    parts = ldm_flops(SD15, 512)
    assert parts["unet_row"] == pytest.approx(0.803e12, rel=0.01)
    assert parts["vae_decode"] == pytest.approx(2.51e12, rel=0.01)
    latent, _ = edsam_flops(EdsamConfig(start="latent"))
    inverted, _ = edsam_flops(EdsamConfig())
    assert latent == pytest.approx(34.8e12, rel=0.01)
    assert inverted - latent == pytest.approx(20 * parts["unet_row"] / 10, rel=1e-6)
    # No guidance halves the UNet work; a tiny decoder replaces 2.5 TFLOP by about 0.14.
    fast, notes = edsam_flops(
        EdsamConfig(start="latent", guidance=1.0, steps=4, decoder="tiny", tiny_decoder="x")
    )
    assert fast == pytest.approx(4 * parts["unet_row"] + 0.141e12 + 0.11e12 + 1.3e9, rel=0.02)
    assert "tiny decoder" in notes


def test_plan_prints_the_bill_of_the_demo_and_counts_once(flop_cache: Path, monkeypatch) -> None:
    r = CliRunner().invoke(
        app, ["plan", str(REPO / "manifests/demo.yaml"), "--set", "output=/nonexistent-dgaug"]
    )
    assert r.exit_code == 0, r.output
    assert "the bill" in r.output and "GPU-hours: assumed 50%" in r.output
    for stage in ("download", "edsam", "features"):
        assert stage in r.output
    assert (flop_cache / "flops.json").is_file()
    # Cached: a second plan counts nothing.
    import dgaug.models.flops as flops

    monkeypatch.setattr(flops, "count_flops", lambda fn: pytest.fail("counted again"))
    r = CliRunner().invoke(
        app, ["plan", str(REPO / "manifests/demo.yaml"), "--set", "output=/nonexistent-dgaug"]
    )
    assert r.exit_code == 0, r.output


def test_cc12m_bill_and_a_measured_rate(tmp_path: Path) -> None:
    """cc12m.yaml over a 25-row list: 5 shards of 5000 planned (an upper bound on pairs), 10 ED-SAM
    samples per pair; GPU-hours from a bench/edsam.py JSON's best dgaug rate when given."""
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text("".join(f"http://127.0.0.1:9/{i}.jpg\tcaption {i}\n" for i in range(25)))
    m = load_manifest(
        REPO / "manifests/cc12m.yaml",
        [f"source.path={tsv}", f"output={tmp_path / 'out'}", "executor.kind=local"],
    )
    plans = plan_stages(m, Storage(m.output), dry_run=True)
    bill = build_bill(m, len(plans["download"].tasks), list(plans))
    by = {s.stage: s for s in bill.stages}
    assert by["edsam"].samples == 10 * by["download"].samples
    assert by["edsam"].flops_per_sample == pytest.approx(edsam_flops(m.stages.edsam)[0])
    assert by["edsam"].bytes_per_sample == pytest.approx(0.25 * 256 * 256)  # output_size 256
    assumed = bill.gpu_hours(by["edsam"])
    assert assumed == pytest.approx(by["edsam"].total_flops / (0.5 * 989e12) / 3600, rel=1e-9)
    rates = tmp_path / "edsam.json"
    rates.write_text(json.dumps({"results": [{"system": "dgaug batch 8", "samples_per_s": 2.0}]}))
    measured = build_bill(m, len(plans["download"].tasks), list(plans), str(rates))
    assert measured.gpu_hours(by["edsam"]) == pytest.approx(by["edsam"].samples / 2.0 / 3600)
    assert "measured: 2 samples/s" in measured.rate_source


def test_the_fast_laion_recipe_costs_a_tenth_of_the_paper_recipe() -> None:
    """laion400m-fast.yaml (SD-Turbo shapes, 2 steps, no CFG, TAESD) against laion400m.yaml."""
    import yaml

    from dgaug.stages.edsam.config import EdsamConfig

    def per_sample(name: str) -> float:
        data = yaml.safe_load((REPO / "manifests" / name).read_text())
        return edsam_flops(EdsamConfig(**data["stages"]["edsam"]))[0]

    fast, paper = per_sample("laion400m-fast.yaml"), per_sample("laion400m.yaml")
    assert fast <= 3.5e12 and fast <= paper / 10, (fast, paper)


def test_an_lcm_unet_is_billed_one_row_per_step(tmp_path: Path) -> None:
    from dgaug.stages.edsam.config import EdsamConfig
    from tests.test_model_families import save_family

    lcm = save_family(tmp_path / "lcm", "lcm")
    sd1 = save_family(tmp_path / "sd1", "sd1 (epsilon)")
    one, _ = edsam_flops(EdsamConfig(model=str(lcm), image_size=32, steps=4, guidance=8.0))
    two, _ = edsam_flops(EdsamConfig(model=str(sd1), image_size=32, steps=4, guidance=8.0))
    assert two > one * 1.5  # the same UNet shape but for the w-embedding: about twice the work


def test_an_sdxl_folder_is_billed_with_both_encoders_and_its_added_conditioning(
    tmp_path: Path,
) -> None:
    """An SDXL folder's UNet is counted with its pooled text and size ids (it cannot run
    without them) and the caption with both text encoders."""
    from dgaug.models.flops import ldm_flops
    from tests.test_model_families import save_family

    xl = ldm_flops(str(save_family(tmp_path / "xl", "sdxl")), 32)
    sd1 = ldm_flops(str(save_family(tmp_path / "sd1", "sd1 (epsilon)")), 32)
    assert xl is not None and xl["unet_row"] > 0
    assert xl["text_encode"] > 1.9 * sd1["text_encode"]


@pytest.mark.slow  # SDXL's UNet counted on meta tensors at 1024 px
def test_sdxl_shapes_are_billed_at_1024_px() -> None:
    """SDXL 1.0 base at 1024 px (128 x 128 latents): one UNet row ~6.76 TFLOP, about 8.4x
    SD-1.5's at 512; SDXL-Turbo is the same architecture."""
    from dgaug.models.flops import ldm_flops

    xl = ldm_flops("stabilityai/stable-diffusion-xl-base-1.0", 1024)
    assert xl["unet_row"] == pytest.approx(6.76e12, rel=0.01)
    assert xl["vae_decode"] == pytest.approx(10.47e12, rel=0.01)
    turbo = ldm_flops("stabilityai/sdxl-turbo", 512)
    assert turbo["unet_row"] == pytest.approx(1.59e12, rel=0.01)
