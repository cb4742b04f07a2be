"""evaluate.py's logic: protocols on a manifest, metrics against a direct computation,
manifest reuse, refusals, view-count scaling and the ablation table.

The checkpoint is the session's tiny run (`training_fixtures.shared_run`: 32 x 32 images,
3 views, 2 validation subjects), evaluated on its validation split.
"""

import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import training_fixtures as tf
from conftest import require_oracle

from uika_jax.data.pipeline import open_source
from uika_jax.evaluation import runner
from uika_jax.evaluation.manifest import (
    FrameIndex,
    ManifestError,
    read_manifest,
    write_manifest,
)
from uika_jax.evaluation.report import read_metrics_json
from uika_jax.evaluation.trained_model import ModelMismatchError, load_trained_model
from uika_jax.head.lbs import FlameParams
from uika_jax.models.avatar import drive, render
from uika_jax.render import RasterConfig


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, worker_id) -> tf.SharedRun:
    return tf.shared_run(tmp_path_factory, worker_id)


def eval_config(run: tf.SharedRun, out, **eval_overrides):
    config = run.config()
    ev = config.eval
    ev.split, ev.out, ev.batch_size, ev.grids, ev.videos, ev.video_frames = (
        "val", str(out), 2, 1, 1, 4
    )  # fmt: skip
    for key, value in eval_overrides.items():
        ev[key] = value
    return config


@pytest.fixture(scope="module")
def metrics_run(trained_run, tmp_path_factory):
    require_oracle("dlib")  # the face metrics' backend (the `eval` extra)
    out = tmp_path_factory.mktemp("eval")
    config = eval_config(trained_run, out, protocol="self_mono,cross_multi")
    runner.evaluate(config, trained_run.workdir)
    return config, out


def test_metrics_mode_writes_the_table_grids_videos_and_manifest(metrics_run):
    _, out = metrics_run
    results, info = read_metrics_json(out / "metrics.json")
    assert [r.name for r in results] == ["self_mono", "cross_multi"]
    self_mono, cross = results
    assert len(self_mono.sample_ids) == 2 and self_mono.count("psnr") == 2
    assert cross.count("psnr") == 0  # no ground truth under cross-reenactment
    assert all("_driven_by_" in i for i in cross.sample_ids)
    for metric in ("csim", "akd", "apd"):  # measured or counted as failed detections
        assert metric in self_mono.backends and metric in self_mono.detection_rates
    assert info["rasterizer_dropped"] == {"self_mono": 0, "cross_multi": 0}
    table = (out / "table.md").read_text()
    assert "| self_mono |" in table and "PSNR ↑" in table and "LPIPS (VGG) ↓" in table
    assert "AED ↓" in table  # a column, n/a without an expression regressor
    assert "head region" in table
    assert len(list((out / "grids" / "self_mono").glob("*.png"))) == 1
    assert len(list((out / "videos" / "cross_multi").glob("*.mp4"))) == 1
    manifest = read_manifest(out / "manifest.json")
    assert set(manifest.protocols) == {"self_mono", "cross_multi"}
    for spec in manifest.protocols["self_mono"]:  # monocular: one camera
        assert len({r.camera for r in spec.sources}) == 1
        assert not {(r.camera, r.frame) for r in spec.sources} & {
            (r.camera, r.frame) for r in spec.targets
        }


def test_psnr_matches_a_direct_forward_drive_and_render(trained_run, metrics_run):
    """The first self_mono sample, recomputed from the dataset records and the model."""
    config, out = metrics_run
    results, _ = read_metrics_json(out / "metrics.json")
    spec = read_manifest(out / "manifest.json").protocols["self_mono"][0]
    trained = load_trained_model(trained_run.workdir, config)
    source = open_source(config.data.synthetic_path)
    index = FrameIndex(source.table)
    sources = [source[int(i)] for i in index.resolve(spec.sources, "test")]
    targets = [source[int(i)] for i in index.resolve(spec.targets, "test")]
    views = config.model.num_views
    images = np.zeros((1, views, 32, 32, 3), np.float32)
    images[0, : len(sources)] = np.stack([r["image"] for r in sources]) / 255.0
    view_mask = np.arange(views)[None] < len(sources)
    stack = lambda key: np.stack([r[key] for r in targets])[None].astype(np.float32)  # noqa: E731
    background = np.asarray(config.render.background, np.float32)
    raster = RasterConfig(capacity=1 << 16)
    forward = trained.reconstruct_fn()

    @jax.jit
    def direct(images, view_mask, expression, pose, translation, viewmats, Ks):
        gaussians = forward(images, view_mask).gaussians
        shape = jnp.zeros((*pose.shape[:2], trained.head.num_shape))
        params = FlameParams(shape=shape, expression=expression, pose=pose, translation=translation)
        posed = drive(trained.head, trained.anchors, gaussians, params)
        return render(posed, viewmats, Ks, 32, 32, background=background, config=raster).images

    rendered = direct(
        images, view_mask, stack("expression"), stack("pose"), stack("translation"),
        stack("viewmat"), stack("intrinsics"),
    )  # fmt: skip
    mask = np.stack([r["mask"] for r in targets])[..., None] / 255.0
    truth = np.stack([r["image"] for r in targets]) / 255.0
    pred = mask * np.asarray(rendered[0]) + (1 - mask) * background
    truth = mask * truth + (1 - mask) * background
    psnr = np.mean(-10 * np.log10(np.mean((pred - truth) ** 2, axis=(1, 2, 3))))
    assert results[0].values["psnr"][0] == pytest.approx(psnr, abs=2e-3)


def test_a_given_manifest_is_reused_exactly(trained_run, metrics_run, tmp_path):
    _, out = metrics_run
    again = eval_config(
        trained_run, tmp_path, protocol="self_mono", seed=123, manifest=str(out / "manifest.json"),
        face_metrics=False, grids=0, videos=0,
    )  # fmt: skip
    runner.evaluate(again, trained_run.workdir)
    first, _ = read_metrics_json(out / "metrics.json")
    second, _ = read_metrics_json(tmp_path / "metrics.json")
    assert second[0].sample_ids == first[0].sample_ids
    np.testing.assert_allclose(second[0].values["psnr"], first[0].values["psnr"], rtol=1e-6)
    assert not (tmp_path / "manifest.json").exists()  # the given one is not rewritten
    lacking = eval_config(
        trained_run, tmp_path, protocol="self_multi", manifest=str(out / "manifest.json")
    )
    with pytest.raises(ManifestError, match=r"no samples of \['self_multi'\]"):
        runner.evaluate(lacking, trained_run.workdir)
    other_split = eval_config(
        trained_run, tmp_path, protocol="self_mono", manifest=str(out / "manifest.json")
    )
    other_split.eval.split = "test"
    with pytest.raises(ManifestError, match=r"holds 'val' frames, but eval\.split='test'"):
        runner.evaluate(other_split, trained_run.workdir)


def test_a_config_with_another_model_is_refused(trained_run, tmp_path):
    config = eval_config(trained_run, tmp_path)
    config.model.transformer.depth = 2
    with pytest.raises(ModelMismatchError, match=r"model\.transformer\.depth: checkpoint 4"):
        runner.evaluate(config, trained_run.workdir)


def test_manifest_refusals(metrics_run, tmp_path):
    config, out = metrics_run
    document = json.loads((out / "manifest.json").read_text())
    bad = tmp_path / "m.json"
    for change, message in (
        (
            lambda d: d["protocols"].update(self_stereo=d["protocols"]["self_mono"]),
            "unknown protocol",
        ),
        (lambda d: d["protocols"]["self_mono"][0]["sources"][0].__setitem__(3, "x"), r"\[subject"),
        (lambda d: d["protocols"]["cross_multi"][0].pop("driver"), "needs driver"),
        (lambda d: d.update(version=9), "version 9"),
    ):
        edited = json.loads(json.dumps(document))
        change(edited)
        bad.write_text(json.dumps(edited))
        with pytest.raises(ManifestError, match=message):
            read_manifest(bad)
    manifest = read_manifest(out / "manifest.json")
    spec = manifest.protocols["self_mono"][0]
    missing = type(spec.sources[0])(spec.subject, spec.sources[0].sequence, "no_camera", 0)
    index = FrameIndex(open_source(config.data.synthetic_path).table)
    with pytest.raises(ManifestError, match="no_camera"):
        index.resolve([missing], "m.json")
    write_manifest(bad, manifest)
    assert read_manifest(bad) == manifest


def test_scaling_mode_plots_metrics_against_the_source_count(trained_run, tmp_path):
    config = eval_config(trained_run, tmp_path, mode="scaling", scaling_views=(1, 2, 3, 16))
    runner.evaluate(config, trained_run.workdir)
    rows, info = read_metrics_json(tmp_path / "scaling.json")
    assert [r.name for r in rows] == ["N=1", "N=2", "N=3"]  # 16 > model.num_views: left out
    assert info["views"] == [1, 2, 3]
    text = (tmp_path / "view_scaling.md").read_text()
    assert "PSNR" in text
    assert (tmp_path / "view_scaling.png").stat().st_size > 1000
    assert (tmp_path / "scaling_manifest.json").is_file()  # metrics' manifest.json untouched
    assert not (tmp_path / "manifest.json").exists()


def test_ablations_mode_writes_one_row_per_run(trained_run, tmp_path):
    copy = tmp_path / "copy_of_run"
    shutil.copytree(trained_run.workdir, copy)
    config = eval_config(
        trained_run, tmp_path / "out", mode="ablations", protocol="self_mono", face_metrics=False,
        ablation_workdirs=(str(trained_run.workdir), str(copy)),
    )  # fmt: skip
    runner.evaluate(config, trained_run.workdir)
    rows, _ = read_metrics_json(tmp_path / "out" / "ablations.json")
    assert len(rows) == 2 and rows[0].name != rows[1].name
    np.testing.assert_allclose(rows[0].values["psnr"], rows[1].values["psnr"], rtol=1e-6)
    assert "| Config |" in (tmp_path / "out" / "ablations.md").read_text()


def test_command_line_overrides_apply_to_the_runs_saved_config(trained_run):
    from absl import flags

    sys.path.insert(0, str(tf.ROOT))
    import evaluate as entry_point

    argv = [
        "evaluate.py", f"--workdir={trained_run.workdir}", "--config.eval.split=val",
        "--config.eval.manifest=/some/manifest.json", "--config.eval.subjects=3",
    ]  # fmt: skip
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    entry_point.define_config_flag(argv, values)
    values(argv)
    config = values.config
    assert (config.eval.split, config.eval.subjects) == ("val", 3)
    assert config.eval.manifest == "/some/manifest.json"  # a null setting, still overridable
    assert config.model.image_size == 32  # the run's own model
    with pytest.raises(flags.IllegalFlagValueError):  # type-checked against the saved value
        values(["evaluate.py", "--config.eval.subjects=many"])
