"""Tests of uika_jax.training.metrics_log: metrics, config, TensorBoard, grids, progress."""

import io
import json
import struct

import ml_collections
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from uika_jax.training import metrics_log


def _config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({"optim": {"peak_lr": 1e-4, "steps": 10}, "seed": 0})
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def _logger(workdir, **kwargs) -> metrics_log.MetricsLogger:
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("progress_file", io.StringIO())
    return metrics_log.MetricsLogger(
        workdir, kwargs.pop("config", _config()), total_steps=10, **kwargs
    )


def _lines(workdir) -> list[dict]:
    text = (workdir / metrics_log.METRICS_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def _events(workdir) -> list[event_pb2.Event]:
    """Every event of the TensorBoard files, read from their TFRecord framing directly."""
    events = []
    for path in sorted((workdir / metrics_log.TENSORBOARD_DIR).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length]))
            offset += 12 + length + 4
    return events


def test_metrics_lines_and_truncation_on_resume(tmp_path):
    with _logger(tmp_path) as logger:
        for step in range(1, 6):
            logger.write_scalars(step, {"loss": np.float32(1.0 / step), "skipped": np.int32(0)})
            # Flushed on every write: readable while the run goes on.
            assert len(_lines(tmp_path)) == step
        logger.write_scalars(5, {"eval/psnr": 17.5, "eval/ssim": 0.5, "eval/lpips": 0.25})
    lines = _lines(tmp_path)
    assert lines[0] == {"step": 1, "loss": 1.0, "skipped": 0}
    assert lines[-1] == {"step": 5, "eval/psnr": 17.5, "eval/ssim": 0.5, "eval/lpips": 0.25}
    # A crash leaves a half-written line; the checkpoint restored is at step 3.
    with open(tmp_path / metrics_log.METRICS_FILE, "a", encoding="utf-8") as f:
        f.write('{"step": 6, "lo')
    with _logger(tmp_path, restored_step=3) as logger:
        assert [line["step"] for line in _lines(tmp_path)] == [1, 2, 3]
        logger.write_scalars(4, {"loss": 0.2})
    assert [line["step"] for line in _lines(tmp_path)] == [1, 2, 3, 4]
    # A fresh start in the same workdir keeps nothing of the earlier run.
    _logger(tmp_path).close()
    assert _lines(tmp_path) == []


def test_non_finite_values_are_written_as_null_with_a_warning(tmp_path):
    with _logger(tmp_path) as logger:
        with pytest.warns(RuntimeWarning, match="'loss' is nan"):
            logger.write_scalars(1, {"loss": np.float32("nan"), "grad_norm": 2.0})
        with pytest.warns(RuntimeWarning, match="'grad_norm' is inf"):
            logger.write_scalars(2, {"grad_norm": np.inf})
        with pytest.raises(ValueError, match="'image'"):
            logger.write_scalars(3, {"image": np.zeros((2, 2))})
        with pytest.raises(ValueError, match="'phase'"):
            logger.write_scalars(3, {"phase": 1j})
    assert _lines(tmp_path) == [
        {"step": 1, "loss": None, "grad_norm": 2.0},
        {"step": 2, "grad_norm": None},
    ]
    scalars = [(v.tag, e.step) for e in _events(tmp_path) for v in e.summary.value]
    assert scalars == [("grad_norm", 1)]


def test_process_other_than_zero_writes_nothing(tmp_path):
    bar = io.StringIO()
    workdir = tmp_path / "run"
    with _logger(workdir, process_index=1, progress_file=bar) as logger:
        logger.write_scalars(1, {"loss": 1.0})
        assert logger.write_image_grid(1, "grid", np.zeros((4, 4, 3), np.uint8)) is None
        logger.report_step(1, 0.1, 0.2)
    assert not workdir.exists()
    assert bar.getvalue() == ""


def test_config_written_once_and_a_different_one_refused(tmp_path):
    _logger(tmp_path).close()
    written = json.loads((tmp_path / metrics_log.CONFIG_FILE).read_text(encoding="utf-8"))
    assert written == {"optim": {"peak_lr": 1e-4, "steps": 10}, "seed": 0}
    _logger(tmp_path).close()  # the same config again is fine
    different = _config(optim__peak_lr=3e-4, optim__steps=20)
    with pytest.raises(ValueError, match=r"keys that differ: optim\.peak_lr, optim\.steps"):
        _logger(tmp_path, config=different)
    _logger(tmp_path, config=different, overwrite_config=True).close()
    written = json.loads((tmp_path / metrics_log.CONFIG_FILE).read_text(encoding="utf-8"))
    assert written["optim"] == {"peak_lr": 3e-4, "steps": 20}


def test_image_grid_layout_and_padded_views_grey():
    rng = np.random.default_rng(0)
    batch, views, height, width, s = 2, 3, 5, 4, metrics_log.GRID_SEPARATOR
    sources = rng.uniform(size=(batch, views, height, width, 3))
    mask = np.array([[True, True, False], [True, False, False]])
    prediction = rng.uniform(size=(batch, height, width, 3))
    truth = rng.uniform(size=(batch, height, width, 3))
    grid = metrics_log.image_grid(sources, mask, prediction, truth)
    assert grid.shape == (batch * (height + s) + s, (views + 2) * (width + s) + s, 3)
    assert grid.dtype == np.uint8

    def cell(row, column):
        top, left = s + row * (height + s), s + column * (width + s)
        return grid[top : top + height, left : left + width]

    def as_bytes(image):
        return np.round(image * 255).astype(np.uint8)

    grey = round(metrics_log.PADDED_VIEW_GREY * 255)
    for row in range(batch):
        for view in range(views):
            expected = as_bytes(sources[row, view]) if mask[row, view] else grey
            np.testing.assert_array_equal(
                cell(row, view), np.broadcast_to(expected, cell(0, 0).shape)
            )
        np.testing.assert_array_equal(cell(row, views), as_bytes(prediction[row]))
        np.testing.assert_array_equal(cell(row, views + 1), as_bytes(truth[row]))
    assert np.all(grid[:s] == 255) and np.all(grid[:, :s] == 255)
    with pytest.raises(ValueError, match="source_mask"):
        metrics_log.image_grid(sources, mask[:, :2], prediction, truth)


def test_tensorboard_scalars_images_png_and_purge_on_resume(tmp_path):
    grid = np.zeros((6, 8, 3), np.uint8)
    grid[:, :4] = 200
    with _logger(tmp_path) as logger:
        logger.write_scalars(1, {"loss": 0.5, "eval/psnr": 15.0})
        png = logger.write_image_grid(1, "eval/grid", grid)
    np.testing.assert_array_equal(np.asarray(Image.open(png)), grid)
    assert png.name == "eval_grid_00000001.png"
    with _logger(tmp_path, restored_step=7) as logger:
        logger.write_scalars(8, {"loss": 0.25})
    events = _events(tmp_path)
    scalars = [
        (v.tag, e.step, v.simple_value)
        for e in events
        for v in e.summary.value
        if v.HasField("simple_value")
    ]
    assert scalars == [("loss", 1, 0.5), ("eval/psnr", 1, 15.0), ("loss", 8, 0.25)]
    images = [
        (v.tag, v.image.height, v.image.width)
        for e in events
        for v in e.summary.value
        if v.HasField("image")
    ]
    assert images == [("eval/grid", 6, 8)]
    purges = [e.step for e in events if e.session_log.status == event_pb2.SessionLog.START]
    assert purges == [0, 8]  # the fresh start purges from 0, the resume from 8


def test_progress_reports_speed_eta_and_data_wait_over_a_moving_window():
    bar = io.StringIO()
    progress = metrics_log.ProgressBar(100, initial_step=10, window=2, file=bar)
    progress.update(11, data_wait_seconds=5.0, step_seconds=5.0)  # leaves the window
    progress.update(12, data_wait_seconds=0.1, step_seconds=0.9)
    speed = progress.update(13, data_wait_seconds=0.3, step_seconds=0.7)
    assert speed.steps_per_second == pytest.approx(1.0)
    assert speed.eta_seconds == pytest.approx(87.0)
    assert speed.data_wait_share == pytest.approx(0.2)
    progress.close()
    assert "1.00 steps/s" in bar.getvalue()
    assert "ETA 01:27" in bar.getvalue()
    assert "data wait 20%" in bar.getvalue()
