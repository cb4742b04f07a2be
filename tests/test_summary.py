"""Parameter counts (`python -m uika_jax.models.summary`) and README's table of them.

README.md holds a table `| config | trainable | frozen |` with one row per config
(`default`, `tiny`), numbers with thousands separators as the summary prints them;
the counts are computed abstractly (`summary.abstract_model`) and must equal the table's.
"""

import functools
import re

import pytest
from network_fixtures import ROOT, abstract_uika

from uika_jax.config import load_config
from uika_jax.models.summary import count_parameters, main

README = ROOT / "README.md"
CONFIGS = {"default": "configs/default.py", "tiny": "configs/tiny.py"}


@functools.cache
def _counts(name):
    return count_parameters(abstract_uika(CONFIGS[name])[1])


def _readme_table() -> dict[str, tuple[int, int]]:
    """Rows of README's `| config | trainable | frozen |` table."""
    lines = README.read_text().splitlines()
    header = re.compile(r"^\|\s*config\s*\|\s*trainable\s*\|\s*frozen\s*\|\s*$")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    assert start is not None, "README.md has no `| config | trainable | frozen |` table"
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = (int(cells[1].replace(",", "")), int(cells[2].replace(",", "")))
    return rows


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_readme_parameter_counts(name):
    counts = _counts(name)
    table = _readme_table()
    assert name in table, f"README.md's parameter table has no `{name}` row"
    assert table[name] == (counts.trainable, counts.frozen), (
        f"README says {table[name]}, the model has ({counts.trainable}, {counts.frozen})"
    )


def test_summary_cli_prints_modules_and_row(capsys):
    main(["--config", str(ROOT / "configs/tiny.py")])
    text = capsys.readouterr().out
    counts = _counts("tiny")
    assert f"| tiny | {counts.trainable:,} | {counts.frozen:,} |" in text
    for module in ("correspondence/dpt", "encoder/screen_cnn", "transformer/blocks", "decoder"):
        assert module in text
    # The tiny ViT is trained from scratch; the paper's is frozen and shared (counted once).
    assert counts.frozen == 0 and counts.trainable > 0
    paper = _counts("default")
    vit = dict((m, f) for m, _, f in paper.modules)
    assert paper.frozen == vit["correspondence/vit"] > 0
    assert "encoder/vit" not in vit
    # An ablation's row carries its name.
    main(["--config", f"{ROOT / 'configs/tiny.py'}:no_uv_attention"])
    assert "| tiny:no_uv_attention | " in capsys.readouterr().out


def test_load_config(tmp_path):
    config = load_config(f"{ROOT / 'configs/tiny.py'}:no_aggregation")
    assert config.name == "tiny:no_aggregation" and not config.model.aggregation
    assert config.model.uv_attention and config.model.color_fusion
    assert load_config(ROOT / "configs/default.py").model.transformer.depth == 12
    with pytest.raises(ValueError, match="unknown config argument"):
        load_config(f"{ROOT / 'configs/default.py'}:no_such_ablation")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        load_config(tmp_path / "empty.py")
