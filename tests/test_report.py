"""Evaluation reports: the markdown table's layout (arrows, n/a, footnote), metrics.json's
round trip, the per-sample grid's panels, the error colour map, and the view-count
scaling plot, table and sentence."""

import json
import math

import numpy as np
import pytest

from uika_jax.evaluation import grids, report, scaling_plot
from uika_jax.training.metrics_log import GRID_SEPARATOR, PADDED_VIEW_GREY
from uika_jax.video import read_video_frames, write_video


def _rows():
    self_mono = report.ProtocolResult(
        name="self, monocular",
        sample_ids=("s0/q0/f3", "s0/q0/f7", "s1/q2/f1", "s1/q2/f5"),
        values={
            "psnr": [20.0, 22.0, 24.0, float("nan")],
            "lpips_vgg": [0.2, 0.1, 0.3, 0.2],
            "csim": [0.5, None, 0.7, 0.6],
        },
        backends={"psnr": "MSE on [0, 1]", "csim": "dlib ResNet embedding"},
        detection_rates={"csim": 0.75},
        manifest="manifests/self_mono.json",
    )
    cross = report.ProtocolResult(
        name="cross | multi-view",
        sample_ids=("a", "b"),
        values={"csim": [0.4, 0.6], "aed": [None, None]},
        backends={"csim": "ArcFace ONNX", "aed": "n/a: no expression regressor given"},
        detection_rates={"csim": 1.0},
    )
    return [self_mono, cross]


def test_markdown_table_has_arrows_na_and_the_head_region_footnote():
    text = report.markdown_table(_rows(), row_header="Protocol", title="tiny, step 40")
    lines = text.splitlines()
    assert lines[0] == "## tiny, step 40"
    header = lines[2]
    assert header == "| Protocol | PSNR ↑ | LPIPS (VGG) ↓ | CSIM ↑ | AED ↓ |"
    assert lines[3] == "| --- | ---: | ---: | ---: | ---: |"
    # Means over the scored samples only (NaN and None are failed samples, not zeros).
    assert lines[4] == "| self, monocular | 22.00 | 0.2000 | 0.600 | n/a |"
    assert lines[5] == "| cross \\| multi-view | n/a | n/a | 0.500 | n/a |"
    footnote = "\n".join(lines[6:])
    assert report.HEAD_REGION_NOTE in footnote
    assert "- CSIM ↑: dlib ResNet embedding (self, monocular); ArcFace ONNX" in footnote
    assert "self, monocular 75.0% (3/4 samples scored)" in footnote
    assert "cross | multi-view 100.0% (2/2 samples scored)" in footnote
    assert "- AED ↓: n/a: no expression regressor given; n/a for self, monocular, cross" in footnote
    assert "- LPIPS (VGG) ↓: backend not stated; n/a for cross | multi-view." in footnote
    # Chosen columns, including one no row has.
    chosen = report.markdown_table(_rows(), metrics=["ssim_valid", "psnr"]).splitlines()
    assert chosen[0] == "| Method | SSIM (VALID) ↑ | PSNR ↑ |"
    assert chosen[2].endswith("| n/a | 22.00 |")


def test_metrics_json_round_trips_and_records_means_counts_rates(tmp_path):
    rows = _rows()
    path = report.write_metrics_json(tmp_path / "metrics.json", rows, info={"step": 40})
    document = json.loads(path.read_text(encoding="utf-8"))
    record = document["protocols"]["self, monocular"]
    assert record["means"] == {"psnr": 22.0, "lpips_vgg": pytest.approx(0.2), "csim": 0.6}
    assert record["counts"] == {"psnr": 3, "lpips_vgg": 4, "csim": 3}
    assert record["samples"] == 4 and record["detection_rates"] == {"csim": 0.75}
    assert record["per_sample"]["psnr"][3] is None
    assert record["manifest"] == "manifests/self_mono.json"
    assert document["protocols"]["cross | multi-view"]["means"]["aed"] is None
    back, info = report.read_metrics_json(path)
    assert info == {"step": 40}
    assert back == rows
    assert report.markdown_table(back) == report.markdown_table(rows)


def test_bad_results_and_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="3 values for 2 samples"):
        report.ProtocolResult("x", ("a", "b"), {"psnr": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="infinite"):
        report.ProtocolResult("x", ("a",), {"psnr": [math.inf]})
    with pytest.raises(ValueError, match="not in"):
        report.ProtocolResult("x", ("a",), {"csim": [0.1]}, detection_rates={"csim": 1.5})
    with pytest.raises(ValueError, match="unique"):
        report.markdown_table([_rows()[0], _rows()[0]])
    broken = tmp_path / "metrics.json"
    broken.write_text('{"format": "uika-eval-metrics/1", "protocols": {"p": {"means": {}}}}')
    with pytest.raises(ValueError, match=r"metrics.json: protocol 'p' is malformed"):
        report.read_metrics_json(broken)
    broken.write_text("[1, 2")
    with pytest.raises(ValueError, match="not a readable"):
        report.read_metrics_json(broken)


def _constant(colour, shape):
    return np.broadcast_to(np.asarray(colour, np.float32), (*shape, 3)).copy()


def test_sample_grid_puts_each_image_in_its_panel():
    h, w, s = 20, 24, GRID_SEPARATOR
    source_colours = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1)]
    sources = np.stack([_constant(c, (40, 40)) for c in source_colours])
    mask = np.array([True, True, True, True, False])
    prediction = _constant((0.2, 0.4, 0.6), (2, h, w))
    truth = _constant((0.2, 0.4, 0.6), (2, h, w))
    truth[1] = (0.6, 0.4, 0.2)  # frame 1 is off by 0.8 / 3 in the mean: past max_error.
    grid = grids.sample_grid(sources, mask, prediction, truth).astype(np.int32)
    assert grid.shape == (2 * (h + s) + s, 4 * (w + s) + s, 3)
    assert grid.dtype == np.int32 and grid.max() <= 255

    def panel_pixel(row, column, dy, dx):
        return grid[s + row * (h + s) + dy, s + column * (w + s) + dx]

    # Five sources tile 3 a row: tiles are (h - s) // 2 x (w - 2 s) // 3.
    tile_h, tile_w = (h - s) // 2, (w - 2 * s) // 3
    for index, colour in enumerate(source_colours):
        dy = (index // 3) * (tile_h + s) + tile_h // 2
        dx = (index % 3) * (tile_w + s) + tile_w // 2
        expected = np.round(255 * np.array(colour if mask[index] else [PADDED_VIEW_GREY] * 3))
        np.testing.assert_array_equal(panel_pixel(0, 0, dy, dx), expected)
    np.testing.assert_array_equal(panel_pixel(0, 0, h - 1, w - 1), [255, 255, 255])
    np.testing.assert_array_equal(panel_pixel(0, 1, h // 2, w // 2), [51, 102, 153])
    np.testing.assert_array_equal(panel_pixel(1, 2, h // 2, w // 2), [153, 102, 51])
    # Zero error is the map's first colour, a saturated one its last.
    np.testing.assert_array_equal(panel_pixel(0, 3, 3, 3), np.round(255 * grids.HEAT_COLOURS[0]))
    np.testing.assert_array_equal(panel_pixel(1, 3, 3, 3), np.round(255 * grids.HEAT_COLOURS[-1]))
    # The second row's sources panel is blank; separators are white.
    np.testing.assert_array_equal(panel_pixel(1, 0, h // 2, w // 2), [255, 255, 255])
    assert np.all(grid[:s] == 255) and np.all(grid[:, s + w : 2 * s + w] == 255)
    # Without a ground truth: sources | prediction, one source fills its panel.
    alone = grids.sample_grid(sources[:1], None, prediction[0])
    assert alone.shape == (h + 2 * s, 2 * (w + s) + s, 3)
    np.testing.assert_array_equal(alone[s, s], [255, 0, 0])
    np.testing.assert_array_equal(alone[s + h - 1, s + w - 1], [255, 0, 0])


def test_error_heat_map_scale_and_bad_shapes():
    truth = np.zeros((1, 5, 3), np.float32)
    prediction = np.linspace(0, 0.3, 5, dtype=np.float32)[None, :, None] * np.ones(3)
    colours = grids.error_heat_map(prediction, truth, max_error=0.2)
    np.testing.assert_allclose(colours[0, 0], grids.HEAT_COLOURS[0])
    np.testing.assert_allclose(colours[0, 2], grids.HEAT_COLOURS[3], atol=1e-6)  # 0.15 / 0.2
    np.testing.assert_allclose(colours[0, 4], grids.HEAT_COLOURS[-1])  # saturated
    with pytest.raises(ValueError, match="prediction"):
        grids.sample_grid(np.zeros((1, 8, 8, 3)), None, np.zeros((8, 8)))
    with pytest.raises(ValueError, match="source_mask"):
        grids.sample_grid(np.zeros((2, 8, 8, 3)), [True], np.zeros((8, 8, 3)))


def _curve_ends(image, colour):
    """(y at the leftmost, y at the rightmost) pixel of a colour (mean over those columns)."""
    ys, xs = np.nonzero(np.all(image == np.asarray(colour, np.uint8), axis=-1))
    assert xs.size > 0
    return ys[xs <= xs.min() + 2].mean(), ys[xs >= xs.max() - 2].mean()


def test_scaling_plot_draws_rising_and_falling_curves_where_the_values_say():
    views = [1, 2, 4, 8, 16]
    width, height = 720, 300
    image = scaling_plot.scaling_plot(
        views,
        {"psnr": [20.0, 21.0, 22.0, 23.0, 24.0], "lpips_vgg": [0.3, 0.25, 0.2, 0.15, 0.1]},
        width=width,
        height=height,
    )
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    colour = scaling_plot.SERIES_COLOURS[0]
    left, right = _curve_ends(image[:, : width // 2], colour)
    assert right < left - height / 3  # rising: the right end is drawn higher.
    left, right = _curve_ends(image[:, width // 2 :], colour)
    assert right > left + height / 3
    # The middle point of a straight series (in log2 N) sits halfway between the ends.
    ys, xs = np.nonzero(np.all(image[:, : width // 2] == colour, axis=-1))
    middle = (xs.min() + xs.max()) / 2
    assert abs(ys[np.abs(xs - middle) <= 1].mean() - (ys.min() + ys.max()) / 2) < 4
    # Two series in one panel: both colours are drawn (curves and legend).
    both = scaling_plot.scaling_plot(
        views, {"ssim": [0.8] * 5, "ssim_valid": [0.7, None, 0.7, 0.75, 0.8]}, width=400
    )
    for series_colour in scaling_plot.SERIES_COLOURS[:2]:
        assert np.any(np.all(both == series_colour, axis=-1))
    with pytest.raises(ValueError, match="ascending"):
        scaling_plot.scaling_plot([1, 4, 2], {"psnr": [1, 2, 3]})


def test_scaling_table_and_psnr_sentence_state_the_sign(tmp_path):
    views = [1, 2, 4]
    table = scaling_plot.scaling_table(
        views, {"lpips_alex": [0.3, None, 0.1], "psnr": [20, 21, 22]}
    )
    lines = table.splitlines()
    assert lines[0] == "| N | PSNR ↑ | LPIPS (Alex) ↓ |"
    assert lines[3] == "| 2 | 21.00 | n/a |"
    rise = scaling_plot.psnr_change_sentence(views, [20.0, 20.5, 21.25])
    assert rise.startswith("PSNR(4) - PSNR(1) = +1.25 dB: quality rises")
    fall = scaling_plot.psnr_change_sentence(views, [21.0, 20.5, 20.5])
    assert fall.startswith("PSNR(4) - PSNR(1) = -0.50 dB: quality falls")
    assert "contrary" in fall
    assert "cannot be stated" in scaling_plot.psnr_change_sentence(views, [None, 1.0, 2.0])
    rows = [
        report.ProtocolResult(f"N={n}", ("a", "b", "c"), {"psnr": [p] * 3}, {"psnr": "MSE"})
        for n, p in zip(views, [20.0, 20.5, 21.25], strict=True)
    ]
    png, markdown = scaling_plot.write_scaling_report(
        tmp_path, views, {"psnr": [20.0, 20.5, 21.25]}, rows=rows, width=400, height=200
    )
    text = markdown.read_text(encoding="utf-8")
    assert rise in text and "| 4 | 3 | 21.25 |" in text and png.name in text
    assert "| N | samples | PSNR ↑ |" in text and "- PSNR ↑: MSE." in text
    assert png.read_bytes().startswith(b"\x89PNG")


# ffmpeg runs as a subprocess (fork + exec at once): JAX's fork warning does not apply.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_sequence_video_frames_show_prediction_truth_and_error(tmp_path):
    h, w, s = 16, 20, GRID_SEPARATOR
    prediction = _constant((0.2, 0.4, 0.6), (3, h, w))
    truth = prediction.copy()
    truth[2] = 0.0
    frames = list(grids.sequence_frames(prediction, truth))
    assert len(frames) == 3 and frames[0].shape == (h + 2 * s, 3 * (w + s) + s, 3)
    np.testing.assert_array_equal(frames[0][s + 5, 2 * (w + s) + s + 5], [0, 0, 4])
    np.testing.assert_array_equal(frames[2][s + 5, w + 2 * s + 5], [0, 0, 0])
    assert frames[2][s + 5, 2 * (w + s) + s + 5].sum() > 600  # saturated error: light yellow
    alone = next(grids.sequence_frames(prediction))
    assert alone.shape == (h + 2 * s, w + 2 * s, 3)
    path = tmp_path / "sequence.mp4"
    assert write_video(path, grids.sequence_frames(prediction, truth), fps=5) == 3
    decoded = read_video_frames(path)
    assert len(decoded) == 3 and decoded[0].shape == frames[0].shape
    # Lossy, but the prediction panel's colour survives the encoder.
    assert np.abs(decoded[0][s + 8, s + 10].astype(int) - [51, 102, 153]).max() < 12
