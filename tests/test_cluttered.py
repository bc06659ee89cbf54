"""The cluttered task: fixed images per (split, index, seed), fragments from the same split only, true boxes."""

from pathlib import Path

import numpy as np
import pytest
import torch

from apt_env.data.cluttered import GARMENT, ClutteredDataset, ClutterSpec, box_token_mask, parse_cluttered
from apt_env.data.datasets import build_dataset, dataset_info


def _dataset(garments: torch.Tensor, spec: ClutterSpec, split: str = "val", redraw: bool = False) -> ClutteredDataset:
    targets = torch.arange(len(garments)) % 10
    return ClutteredDataset(
        garments, targets, classes=[str(i) for i in range(10)], spec=spec, split=split, redraw=redraw,
        transform=lambda x: x, info=None,
    )  # fmt: skip


def _bit_garments(count: int) -> torch.Tensor:
    """Garments whose every pixel is one bit of its own (1, 2, 4, ...): a canvas pixel says which garments cover it."""
    return (2 ** torch.arange(count, dtype=torch.uint8))[:, None, None, None].expand(count, 1, GARMENT, GARMENT).clone()


def test_same_split_index_and_seed_give_the_same_image_and_another_seed_another() -> None:
    garments = torch.randint(0, 256, (6, 1, GARMENT, GARMENT), dtype=torch.uint8)
    spec = ClutterSpec(canvas=36, fragments=3)
    first, again = _dataset(garments, spec), _dataset(garments, spec)
    for index in range(len(garments)):
        assert np.array_equal(first.render(index)[0], again.render(index)[0])
        assert torch.equal(first[index][0], again[index][0])
    other_seed = _dataset(garments, ClutterSpec(canvas=36, fragments=3, seed=1))
    other_split = _dataset(garments, spec, split="test")
    assert any(not np.array_equal(first.render(i)[0], other_seed.render(i)[0]) for i in range(len(garments)))
    assert any(not np.array_equal(first.render(i)[0], other_split.render(i)[0]) for i in range(len(garments)))


def test_training_draws_new_placements_from_torchs_rng() -> None:
    garments = torch.randint(1, 256, (4, 1, GARMENT, GARMENT), dtype=torch.uint8)
    train = _dataset(garments, ClutterSpec(canvas=40), split="train", redraw=True)
    torch.manual_seed(0)
    a = [train[i][0] for i in range(4)]
    torch.manual_seed(0)
    b = [train[i][0] for i in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # reproducible from the seed
    assert any(not torch.equal(x, train[i][0]) for i, x in enumerate(a))  # and new at every read


def test_fragments_come_from_other_garments_of_the_same_pool_and_the_box_is_the_garments() -> None:
    garments = _bit_garments(7)  # sums stay under 128: no clipping
    ds = _dataset(garments, ClutterSpec(canvas=40, fragments=4, fragment_size=6))
    for index in range(len(garments)):
        image, (x0, y0, x1, y1) = ds.render(index)
        own = int(garments[index, 0, 0, 0])
        covered = (image & own) > 0
        assert covered.sum() == (x1 - x0) * (y1 - y0) == GARMENT * GARMENT
        assert covered[y0:y1, x0:x1].all()
        others = image & ~np.uint8(own)
        assert others.any()  # fragments were placed (4 of 6x6 px cannot all fall on nothing)
        assert (others < 2 ** len(garments)).all()


def test_the_box_covers_every_nonzero_garment_pixel_and_is_tight() -> None:
    garments = torch.zeros(3, 1, GARMENT, GARMENT, dtype=torch.uint8)
    garments[0, 0, 5:20, 8:12] = 200
    garments[1, 0, 0, 27] = 1
    garments[2, 0, 3:25, 2:26] = torch.randint(1, 256, (22, 24), dtype=torch.uint8)
    ds = _dataset(garments, ClutterSpec(canvas=44, fragments=0))
    for index in range(3):
        image, (x0, y0, x1, y1) = ds.render(index)
        ys, xs = np.nonzero(image)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_the_scale_variants_sizes_lie_in_the_range() -> None:
    garments = torch.full((5, 1, GARMENT, GARMENT), 255, dtype=torch.uint8)  # the box is the resized garment
    ds = _dataset(garments, ClutterSpec(canvas=24, fragments=0, scale=(6, 20)))
    sides = []
    for index in range(5):
        for seed in range(8):
            _, (x0, y0, x1, y1) = ds.render(index, np.random.default_rng(seed))
            assert x1 - x0 == y1 - y0
            assert 6 <= x1 - x0 <= 20 and 0 <= x0 and x1 <= 24 and 0 <= y0 and y1 <= 24
            sides.append(x1 - x0)
    assert len(set(sides)) > 3


def test_box_token_mask_marks_the_patches_a_box_overlaps() -> None:
    mask = box_token_mask(torch.tensor([[4, 0, 5, 8], [0, 0, 16, 16]]), grid=4, patch=4)
    grid = mask.view(2, 4, 4)
    assert grid[0, :2, 1].all() and grid[0].sum() == 2
    assert grid[1].all()


def test_val_and_test_images_are_made_of_their_own_splits_garments_only(tmp_path: Path) -> None:
    for split in ("val", "test"):
        cluttered = build_dataset("cluttered-fashion-mnist", split=split, root=tmp_path, download=False)
        centered = build_dataset("fashion-mnist", split=split, root=tmp_path, download=False)
        assert torch.equal(cluttered.garments, centered.images)
        assert torch.equal(cluttered.targets, centered.targets)
    train = build_dataset("fashion-mnist", split="train", root=tmp_path, download=False)
    val = build_dataset("cluttered-fashion-mnist", split="val", root=tmp_path, download=False)
    train_keys = {bytes(g.numpy()) for g in train.images[:: len(train.images) // 3000]}
    assert not any(bytes(g.numpy()) in train_keys for g in val.garments)  # the holdout keeps them apart
    image, label = val[0]
    assert image.shape == (1, 56, 56) and image.dtype == torch.float32 and label == int(val.targets[0])
    assert dataset_info("cluttered-fashion-mnist").img_size == 56
    assert dataset_info("cluttered-fashion-mnist:canvas=60").img_size == 60


def test_names_and_options() -> None:
    assert parse_cluttered("fashion-mnist") is None
    assert parse_cluttered("translated-fashion-mnist").fragments == 0
    assert parse_cluttered("scaled-cluttered-fashion-mnist:scale=10-30").scale == (10, 30)
    assert parse_cluttered("cluttered-fashion-mnist:canvas=60,fragments=8") == ClutterSpec(canvas=60, fragments=8)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("cluttered-fashion-mnist:fragments=-1", "fragments must be 0 or more, got -1"),
        ("cluttered-fashion-mnist:canvas=32,fragment_size=40", "fragment_size must be in 1..28"),
        ("cluttered-fashion-mnist:canvas=6,scale=4-6,fragment_size=8", "fragments of 8 px do not fit a canvas of 6"),
        ("cluttered-fashion-mnist:canvas=20", "a garment of up to 28 px does not fit a canvas of 20 px"),
        ("scaled-cluttered-fashion-mnist:scale=14-70", "up to 70 px does not fit a canvas of 56 px"),
        ("cluttered-fashion-mnist:size=3", "unknown option 'size'"),
        ("cluttered-fashion-mnist:scale=9", "scale is LOW-HIGH"),
    ],
)
def test_bad_specs_are_refused_naming_the_values(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cluttered(name)


def test_a_canvas_that_does_not_fit_the_models_image_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the canvas is 56 px but the model takes 28 px"):
        build_dataset("cluttered-fashion-mnist", split="val", img_size=28, root=tmp_path, download=False)


def test_the_object_box_oracle_keeps_the_policys_counts_exactly_and_the_boxs_tokens_first() -> None:
    from apt_env.eval.evaluate import Decisions, box_first_at_counts

    torch.manual_seed(0)
    m, n = 8, 16
    counts = torch.stack([torch.randint(6, 14, (m,)), torch.randint(2, 6, (m,)), torch.randint(0, 2, (m,))], 1)
    masks = torch.zeros(m, 3, n, dtype=torch.bool)
    for stage in range(3):  # any masks of those counts: only the counts are read
        masks[:, stage] = torch.rand(m, n).argsort(1) < counts[:, stage : stage + 1]
    boxes = torch.tensor([[0, 0, 8, 8], [4, 4, 12, 16], [0, 0, 16, 16], [13, 13, 16, 16]] * 2)
    box = box_token_mask(boxes, grid=4, patch=4)
    keep = box_first_at_counts(Decisions(torch.arange(m), masks), box, seed=0)
    live = torch.ones(m, n, dtype=torch.bool)
    for stage in range(3):
        kept = keep({"live": live, "stage": torch.full((m,), stage), "index": torch.arange(m)})
        assert torch.equal(kept.sum(1), counts[:, stage])  # the policy's counts, image by image
        assert not (kept & ~live).any()  # a pruned token stays pruned
        in_box = (live & box).sum(1)
        for row in range(m):
            if counts[row, stage] <= in_box[row]:
                assert not (kept[row] & ~box[row]).any()  # all from the box
            else:
                assert not (live[row] & box[row] & ~kept[row]).any()  # the whole box, then the rest
        live = kept


def test_the_shipped_cluttered_backbone_runs_the_env_on_the_task_and_refuses_another_canvas() -> None:
    import timm

    from apt_env.defaults import CLUTTERED_PLAIN_CHECKPOINT
    from apt_env.envs.env import APTPruneVectorEnv

    model = timm.create_model(f"local-dir:{CLUTTERED_PLAIN_CHECKPOINT}", pretrained=True)
    assert model.patch_embed.img_size == (56, 56) and model.patch_embed.num_patches == 196
    envs = APTPruneVectorEnv(2, model=str(CLUTTERED_PLAIN_CHECKPOINT), dataset="cluttered-fashion-mnist")
    obs, _ = envs.reset(seed=0)
    assert obs["tokens"].shape == (2, 196, 128)
    obs, reward, *_ = envs.step(envs.action_space.sample())
    assert reward.shape == (2,)
    with pytest.raises(ValueError, match="the canvas is 60 px but the model takes 56 px"):
        APTPruneVectorEnv(2, model=str(CLUTTERED_PLAIN_CHECKPOINT), dataset="cluttered-fashion-mnist:canvas=60")


def test_the_cluttered_env_id_makes_and_steps_with_the_shipped_agent() -> None:
    import gymnasium as gym

    from agents.io import load_policy
    from apt_env.defaults import CLUTTERED_AGENT, CLUTTERED_CHECKPOINT
    from apt_env.models.checkpoint import load_backbone
    from apt_env.train.distributed import state_digest

    envs = gym.make_vec("APTPruneCluttered-v0", num_envs=2, vectorization_mode="vector_entry_point", budget=0.25)
    assert envs.unwrapped.data.info.name.startswith("cluttered-fashion-mnist")
    assert state_digest(envs.unwrapped.pv.model) == state_digest(load_backbone(CLUTTERED_CHECKPOINT).model)
    obs, _ = envs.reset(seed=0)
    assert obs["tokens"].shape == (2, 196, 128)
    policy = load_policy(CLUTTERED_AGENT, observation_space=envs.unwrapped.single_observation_space)
    done = np.zeros(2, dtype=bool)
    for _ in range(envs.unwrapped.pv.num_stages):
        action = policy.act({k: torch.as_tensor(v) for k, v in obs.items()}).numpy().astype(np.int8)
        obs, reward, terminated, truncated, _ = envs.step(action)
        assert reward.shape == (2,)
        done |= terminated | truncated
    assert done.all()  # one episode is one image's pass through the stages
    single = gym.make("APTPruneCluttered-v0")
    single.reset(seed=1)
    single.close()
