"""The grain pipeline: batch layout per bucket, sample rules, host agreement, resuming, mixing."""

import dataclasses
import shutil

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from data_fixtures import tiny_index, write_tiny_dataset

from uika_jax.data.augment import AugmentConfig
from uika_jax.data.format import SPLITS
from uika_jax.data.pipeline import Pipeline, PipelineConfig, open_source
from uika_jax.data.shards import ShardSource, pack_dataset
from uika_jax.data.sources import FolderSource
from uika_jax.sharding import make_mesh

SUBJECTS = ("a", "b", "c", "d", "e")  # splits: train, train, test, val, train
TRAIN = {"a", "b", "e"}
CONFIG = PipelineConfig(
    image_size=16, num_drive=2, global_batch_size=8, buckets=(1, 3), read_threads=0
)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "tiny"
    index = tiny_index(subjects=SUBJECTS, frames=4, cameras=("front", "left", "right"))
    write_tiny_dataset(root, index)
    return FolderSource(root)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((-1, 1, 1))


def take(iterator, steps):
    return [jax.tree.map(np.asarray, next(iterator)) for _ in range(steps)]


def plans(pipeline, steps):
    return [pipeline.plan(s, k) for s in range(steps) for k in range(pipeline.local_batch_size)]


def test_global_batches_have_the_documented_layout_and_the_named_frames(source, mesh):
    pipeline = Pipeline([source], CONFIG, mesh=mesh)
    batches = take(iter(pipeline), 6)
    assert {pipeline.bucket(s) for s in range(6)} == {1, 3}, "both buckets within six steps"
    stored = lambda r: source[int(r)]  # noqa: E731
    for step, batch in enumerate(batches):
        n, b = pipeline.bucket(step), 8
        shapes = {
            "source_image": ((b, n, 16, 16, 3), np.float32),
            "source_mask": ((b, n, 16, 16), np.float32),
            "source_uv": ((b, n, 16, 16, 2), np.float32),
            "source_uv_valid": ((b, n, 16, 16), np.bool_),
            "view_mask": ((b, n), np.bool_),
            "target_image": ((b, 2, 16, 16, 3), np.float32),
            "target_mask": ((b, 2, 16, 16), np.float32),
            "target_expression": ((b, 2, 3), np.float32),
            "target_pose": ((b, 2, 5, 3), np.float32),
            "target_translation": ((b, 2, 3), np.float32),
            "target_viewmat": ((b, 2, 4, 4), np.float32),
            "target_intrinsics": ((b, 2, 3, 3), np.float32),
            "shape": ((b, 4), np.float32),
            "dataset": ((b,), np.int32),
            "subject": ((b,), np.int32),
            "source_records": ((b, n), np.int32),
            "target_records": ((b, 2), np.int32),
            "monocular": ((b,), np.bool_),
            "step": ((b,), np.int32),
        }
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == shapes
        np.testing.assert_array_equal(batch["step"], step)
        np.testing.assert_array_equal(batch["view_mask"], batch["source_records"] >= 0)
        assert batch["view_mask"][:, 0].all()
        for i in range(b):
            for j, r in enumerate(batch["source_records"][i]):
                if r < 0:
                    assert not batch["source_image"][i, j].any()
                    assert not batch["source_uv_valid"][i, j].any()
                    continue
                frame = stored(r)
                np.testing.assert_allclose(batch["source_image"][i, j], frame["image"] / 255.0)
                np.testing.assert_allclose(batch["source_mask"][i, j], frame["mask"] / 255.0)
                np.testing.assert_array_equal(batch["source_uv"][i, j], frame["uv"])
                np.testing.assert_array_equal(batch["source_uv_valid"][i, j], frame["uv_valid"])
            for j, r in enumerate(batch["target_records"][i]):
                frame = stored(r)
                np.testing.assert_allclose(batch["target_image"][i, j], frame["image"] / 255.0)
                for key in ("expression", "pose", "translation", "viewmat", "intrinsics"):
                    np.testing.assert_array_equal(batch[f"target_{key}"][i, j], frame[key])
                np.testing.assert_array_equal(batch["shape"][i], frame["shape"])


def test_a_sample_is_one_identity_with_targets_disjoint_from_its_sources(source):
    table = source.table
    pipeline = Pipeline([source], dataclasses.replace(CONFIG, monocular_probability=0.5))
    seen_monocular = set()
    for plan in plans(pipeline, 100):
        records = np.concatenate([plan.sources, plan.targets])
        assert set(table.subject[records]) == {plan.subject}
        assert table.subjects[plan.subject] in TRAIN
        assert len(set(table.sequence[records])) == 1
        frames = lambda rs: {(table.camera[r], table.frame[r]) for r in rs}  # noqa: E731
        assert not frames(plan.sources) & frames(plan.targets)
        assert len(frames(plan.sources)) == len(plan.sources)
        assert len(frames(plan.targets)) == len(plan.targets) == 2
        low = 1 if plan.views == 1 else 2
        assert low <= len(plan.sources) <= plan.views
        cameras = len(set(table.camera[plan.sources]))
        assert cameras == (1 if plan.monocular else len(plan.sources)), plan
        seen_monocular.add((plan.monocular, len(plan.sources)))
    assert seen_monocular == {(m, n) for m in (False, True) for n in (1, 2, 3)}


def test_hosts_agree_on_every_steps_bucket_and_read_disjoint_identities(source):
    hosts = [Pipeline([source], CONFIG, process_index=i, process_count=2) for i in (0, 1)]
    assert [h.local_batch_size for h in hosts] == [4, 4]
    buckets = [[h.bucket(s) for s in range(64)] for h in hosts]
    assert buckets[0] == buckets[1]
    assert 10 < buckets[0].count(1) < 32, "default weights: view count uniform over 1..3"
    other_seed = Pipeline([source], dataclasses.replace(CONFIG, seed=1), process_count=2)
    assert [other_seed.bucket(s) for s in range(64)] != buckets[0]
    subjects = []
    for host in hosts:
        host_plans = plans(host, 40)
        assert [p.views for p in host_plans] == [b for b in buckets[0][:40] for _ in range(4)]
        subjects.append({source.table.subjects[p.subject] for p in host_plans})
    assert not subjects[0] & subjects[1]
    assert subjects[0] | subjects[1] == TRAIN
    slots = [{p.slot for p in plans(h, 1)} for h in hosts]
    assert slots == [{0, 1, 2, 3}, {4, 5, 6, 7}]


def test_restored_iterator_resumes_with_exactly_the_uninterrupted_batches(source, mesh, tmp_path):
    config = dataclasses.replace(CONFIG, augment=AugmentConfig(), read_threads=2)
    uninterrupted = take(iter(Pipeline([source], config, mesh=mesh)), 5)
    iterator = iter(Pipeline([source], config, mesh=mesh))
    take(iterator, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        fresh = iter(Pipeline([source], config, mesh=mesh))
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want, got in zip(uninterrupted[3:], take(fresh, 2), strict=True):
        jax.tree.map(np.testing.assert_array_equal, want, got)


def test_mixing_weights_buckets_and_monocular_share_follow_the_config(source):
    config = dataclasses.replace(
        CONFIG, mixing_weights=(3.0, 1.0, 0.0), bucket_weights=(0.2, 0.8),
        monocular_probability=0.3,
    )  # fmt: skip
    pipeline = Pipeline([source, source, source], config)
    assert pipeline.catalogues[2] is None
    drawn = plans(pipeline, 300)
    datasets = np.bincount([p.dataset for p in drawn], minlength=3) / len(drawn)
    np.testing.assert_allclose(datasets, [0.75, 0.25, 0.0], atol=0.03)
    ones = np.mean([pipeline.bucket(s) == 1 for s in range(2000)])
    assert abs(ones - 0.2) < 0.03
    assert abs(np.mean([p.monocular for p in drawn]) - 0.3) < 0.03
    with pytest.raises(ValueError, match="one non-negative weight per source"):
        Pipeline([source], config)


def test_augmentation_changes_only_the_real_source_views(source, mesh):
    always = AugmentConfig(
        jitter_probability=1.0, blur_probability=1.0, noise_probability=1.0, jpeg_probability=1.0
    )
    plain = take(iter(Pipeline([source], CONFIG, mesh=mesh)), 2)
    augmented = take(
        iter(Pipeline([source], dataclasses.replace(CONFIG, augment=always), mesh=mesh)), 2
    )
    for a, b in zip(plain, augmented, strict=True):
        for key in a:
            if key != "source_image":
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        changed = np.abs(a["source_image"] - b["source_image"]).max(axis=(2, 3, 4)) > 0.05
        np.testing.assert_array_equal(changed, a["view_mask"])


def test_split_filter_and_the_errors_it_can_raise(source):
    for split, subject in (("test", "c"), ("val", "d")):
        pipeline = Pipeline([source], dataclasses.replace(CONFIG, split=split))
        assert {source.table.subjects[p.subject] for p in plans(pipeline, 5)} == {subject}
        assert SPLITS[source.table.split[plans(pipeline, 1)[0].targets[0]]] == split
    with pytest.raises(ValueError, match=r"'test' has 1 identities.*2 processes"):
        Pipeline([source], dataclasses.replace(CONFIG, split="test"), process_count=2)
    with pytest.raises(ValueError, match="at least 14 frames"):
        Pipeline([source], dataclasses.replace(CONFIG, num_drive=13))
    with pytest.raises(ValueError, match="buckets must be ascending"):
        dataclasses.replace(CONFIG, buckets=(3, 1))
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        Pipeline([source], CONFIG, process_count=3)


def test_a_dataset_of_another_size_is_resized_with_its_intrinsics(source, mesh):
    config = dataclasses.replace(CONFIG, image_size=32)
    small, large = (take(iter(Pipeline([source], c, mesh=mesh)), 1)[0] for c in (CONFIG, config))
    assert large["target_image"].shape == (8, 2, 32, 32, 3)
    np.testing.assert_allclose(
        large["target_intrinsics"][..., :2, :],
        2 * small["target_intrinsics"][..., :2, :],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        large["target_intrinsics"][..., 2, :], small["target_intrinsics"][..., 2, :]
    )
    np.testing.assert_array_equal(large["source_uv"][:, :, ::2, ::2], small["source_uv"])
    np.testing.assert_allclose(
        large["target_image"].mean(axis=(2, 3)), small["target_image"].mean(axis=(2, 3)), atol=0.01
    )


def test_worker_processes_yield_the_inline_batches_and_resume(source):
    inline = take(Pipeline([source], CONFIG).local_iterator(), 4)
    iterator = Pipeline([source], dataclasses.replace(CONFIG, workers=2)).local_iterator()
    first = take(iterator, 2)
    state = iterator.get_state()
    second = take(iterator, 2)
    iterator.set_state(state)
    again = take(iterator, 2)
    for want, got in zip(inline + inline[2:], first + second + again, strict=True):
        jax.tree.map(np.testing.assert_array_equal, want, got)


def test_shards_yield_the_batches_of_their_folder_bad_frames_skipped_alike(source, mesh, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(source.root, folder)
    (folder / "a" / "talk" / "left" / "images" / "000001.png").write_bytes(b"not a png")
    pack_dataset(folder, tmp_path / "shards", records_per_shard=16, skip_bad_frames=True)
    assert isinstance(open_source(tmp_path / "shards"), ShardSource)
    config = dataclasses.replace(CONFIG, skip_bad_frames=True, augment=AugmentConfig())
    batches = [
        take(iter(Pipeline.open([root], config, mesh=mesh)), 6)
        for root in (folder, tmp_path / "shards")
    ]
    for want, got in zip(*batches, strict=True):
        jax.tree.map(np.testing.assert_array_equal, want, got)
    summary = Pipeline.open([folder], config).summary()
    assert "1 bad frames skipped" in summary, summary
