import csv
from pathlib import Path

import pytest
import torch
from helpers import load_script
from torch.utils.data import TensorDataset

from agents.io import save_policy
from agents.policy import APTPolicy
from apt_env.data.datasets import dataset_data_config, dataset_for
from apt_env.eval.evaluate import COLUMNS, Contender, budget_keep_ratio, evaluate, evaluate_accuracy, wilson_interval
from apt_env.models.backbone import PrunableViT
from apt_env.models.checkpoint import load_backbone, save_backbone
from apt_env.models.flops import FlopCounter


def _setup():
    torch.manual_seed(0)
    pv = PrunableViT.from_timm(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=5, depth=3, embed_dim=32, num_heads=2
    )
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(20, 1, 16, 16, generator=g), torch.randint(0, 5, (20,), generator=g))
    return pv, torch.utils.data.DataLoader(data, batch_size=8)


def test_dense_evaluation_matches_the_model():
    pv, loader = _setup()
    pv.train()
    results = evaluate(pv, loader)
    assert pv.training  # mode restored
    pv.eval()
    with torch.no_grad():
        correct = sum(int((pv.model(x).argmax(1) == y).sum()) for x, y in loader)
    assert results["acc1"] == correct / 20 and results["num_images"] == 20
    assert results["tokens"] == pv.num_patches
    assert results["acc1_low"] <= results["acc1"] <= results["acc1_high"]
    assert results["gflops"] * 1e9 == FlopCounter(pv.model).dense()


def test_keep_fn_prunes_and_counts_tokens():
    pv, loader = _setup()
    stages = []

    def keep_first_half(obs: dict[str, torch.Tensor]) -> torch.Tensor:
        stage = int(obs["stage"][0])
        stages.append(stage)
        assert obs["cls_attn"].shape == obs["live"].shape == (len(obs["stage"]), pv.num_patches)
        keep = torch.zeros(len(obs["stage"]), pv.num_patches, dtype=torch.bool)
        keep[:, : pv.num_patches // (2 * (stage + 1))] = True
        return keep

    results = {layout: evaluate(pv, loader, keep_first_half, layout=layout) for layout in ("masked", "gathered")}
    assert stages[: pv.num_stages] == list(range(pv.num_stages))
    assert results["masked"]["acc1"] == results["gathered"]["acc1"]
    last = pv.num_patches // (2 * pv.num_stages)
    assert results["gathered"]["tokens"] == last
    assert results["gathered"]["gflops"] < evaluate(pv, loader)["gflops"]


# ---- evaluate.py: budgets, intervals, replay, files ----


def _checkpoint(tmp_path: Path, seed: int = 0, num_classes: int = 10) -> tuple[Path, Path]:
    """A tiny backbone (64 patches) and an agent for it, saved as a user would find them."""
    torch.manual_seed(seed)
    pv = PrunableViT.from_timm(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, num_classes=num_classes, depth=4,
        embed_dim=32, num_heads=2,
    )  # fmt: skip
    pv.data_config = dataset_data_config("synthetic", img_size=32, in_chans=1)  # as train_backbone.py records it
    model = save_backbone(tmp_path / f"backbone{seed}", pv, meta={"dataset": "synthetic"})
    policy = APTPolicy(pv.embed_dim, pv.num_patches, pv.num_stages, hidden=16, qk_dim=16)
    agent = save_policy(tmp_path / f"agent{seed}", policy)
    return model, agent


def _args(module, tmp_path: Path, model: Path, agent: Path | None, **kw):
    base = dict(
        model=str(model), agent=str(agent) if agent else "none", dataset="synthetic", images=96, batch_size=32,
        repeats=1, picture_images=3, out=str(tmp_path / "eval"),
    )  # fmt: skip
    return module.Args(**{**base, **kw})


def test_wilson_interval_brackets_the_proportion_and_narrows_with_more_images():
    low, high = wilson_interval(80, 100)
    assert (round(low, 4), round(high, 4)) == (0.7112, 0.8666)  # Wilson's 95% score interval, by hand
    assert low < 0.8 < high and 0.70 < low and high < 0.88
    low2, high2 = wilson_interval(800, 1000)
    assert high2 - low2 < high - low
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_random_and_topk_at_a_budget_land_within_5_percent(budget):
    torch.manual_seed(0)
    pv = PrunableViT.from_timm(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, num_classes=5, depth=4, embed_dim=32,
        num_heads=2,
    )  # fmt: skip
    from agents.baselines import ClsAttentionTopK, RandomKeep

    ratio = budget_keep_ratio(pv, budget)
    data = TensorDataset(torch.randn(40, 1, 32, 32), torch.randint(0, 5, (40,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    contenders = [
        Contender("dense"),
        Contender("random", RandomKeep(ratio, seed=0).act, budget, obs_keys=("live", "stage")),
        Contender("top-k", ClsAttentionTopK(ratio).act, budget, obs_keys=("cls_attn", "live", "stage")),
    ]
    rows, decisions = evaluate_accuracy(pv, loader, contenders)
    dense = rows[0]["gflops_backbone"]
    for row in rows[1:]:
        assert abs(row["gflops_backbone"] / dense - budget) <= 0.05 * budget, row
    assert rows[1]["gflops_policy"] == 0 and rows[2]["gflops_policy"] > 0  # the class attention is paid for
    assert decisions["random"].masks.shape == (40, pv.num_stages, pv.num_patches)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        budget_keep_ratio(pv, 1.5)


def test_timing_at_a_small_batch_walks_through_the_images_the_same_way_for_every_row():
    """An adaptive agent's cost differs per image: batch 1 is timed over many images, each row on the same ones."""
    from apt_env.eval.evaluate import Contender, measure_throughput

    pv, _ = _setup()
    seen: dict[str, list] = {"a": [], "b": []}

    class Recording(Contender):
        def run(self, pv, images, *, layout, index):
            seen[self.name].append((index.tolist(), float(images.sum())))
            return None, None, None

    images = torch.randn(5, 1, 16, 16)
    speed = measure_throughput(pv, images, [Recording("a"), Recording("b")], batch_size=2, repeats=5, min_seconds=0)
    assert set(speed) == {"a", "b"}
    expected = [[0, 1], [0, 1], [2, 3], [0, 1], [2, 3], [0, 1]]  # warm-up, then the 2 whole batches in turn
    assert [i for i, _ in seen["a"]] == expected and seen["a"] == seen["b"]
    assert seen["a"][2][1] == pytest.approx(float(images[2:4].sum()))


def test_the_physical_reference_runs_the_blocks_on_a_dense_batch_at_the_mean_kept_lengths():
    from apt_env.eval.evaluate import Decisions, DenseAtLengths, measure_throughput

    pv, _ = _setup()
    masks = torch.zeros(4, pv.num_stages, pv.num_patches, dtype=torch.bool)
    for stage, counts in enumerate(([4, 4, 3, 3], [2, 1, 1, 1])):
        for row, n in enumerate(counts):
            masks[row, stage, :n] = True
    reference = DenseAtLengths.of("physical", Decisions(torch.arange(4), masks))
    assert pv.num_stages == 2 and reference.lengths == (4, 1)  # means 3.5 and 1.25, rounded half to even
    lengths = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1])) for blk in pv.model.blocks]
    with torch.no_grad():
        logits, _, _ = reference.run(pv, torch.randn(3, 1, 16, 16), layout="gathered", index=torch.arange(3))
    for hook in hooks:
        hook.remove()
    bounds, p = pv.stage_bounds, pv.num_prefix_tokens
    expected = [pv.num_patches + p] * bounds[1]
    for stage, n in enumerate(reference.lengths):
        expected += [n + p] * (bounds[stage + 2] - bounds[stage + 1])
    assert lengths == expected and logits.shape == (3, pv.num_classes)
    speed = measure_throughput(pv, torch.randn(2, 1, 16, 16), [reference], batch_size=2, repeats=1, min_seconds=0)
    assert speed["physical"] > 0
    with pytest.raises(ValueError, match="a length for each of 2 stages"):
        DenseAtLengths("short", lengths=(4,)).run(pv, torch.randn(1, 1, 16, 16))


@pytest.mark.slow
def test_evaluate_script_writes_the_table_the_plots_and_replays_exactly(tmp_path, capsys):
    module = load_script("evaluate")
    model, agent = _checkpoint(tmp_path)
    masks_file = tmp_path / "masks.pt"
    rows = module.main(_args(module, tmp_path, model, agent, budgets=(0.3, 0.5), save_masks=str(masks_file)))
    printed = capsys.readouterr().out
    assert "APT agent (deterministic): img/s over the physical reference b256 " in printed
    assert not any(name.startswith(module.PHYSICAL) for name in rows)  # timed, not a row of the table

    out = tmp_path / "eval"
    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows)
    expected = {"dense", "APT agent (sampled)", "APT agent (deterministic)", "random @ 0.5", "cls-attn top-k @ 0.3"}
    assert expected <= set(rows)
    assert all(int(r["num_images"]) == 96 for r in csv_rows)  # every policy on the same images
    for name in ("tradeoff.png", "masks.png", "masks_at_0.3.png"):  # masks at --picture-budget 0.5 and the others
        assert (out / name).stat().st_size > 1000
    assert (out / "summary.md").read_text().count("\n| ") >= 4
    assert (out / "results.md").read_text().count("\n|") == len(rows) + 2  # header, rule, rows

    # keep-all is the dense model exactly
    pv = module.load_model(_args(module, tmp_path, model, agent))
    from apt_env.data.datasets import build_dataset

    data = build_dataset("synthetic", split="test", img_size=32, in_chans=1)
    images = torch.stack([data[i][0] for i in range(96)])
    labels = torch.tensor([data[i][1] for i in range(96)])
    with torch.no_grad():
        dense_top1 = float((pv.model(images).argmax(1) == labels).float().mean())
    assert rows["dense"]["top1"] == dense_top1

    replayed = module.main(_args(module, tmp_path, model, agent, replay=str(masks_file)))
    (row,) = replayed.values()
    assert row["top1"] == rows["APT agent (deterministic)"]["top1"]
    assert row["gflops_backbone"] == rows["APT agent (deterministic)"]["gflops_backbone"]
    with (out / "results.csv").open() as f:  # the replay's own table, the recorded figures beside
        (written,) = list(csv.DictReader(f))
    assert float(written["top1"]) == float(written["recorded_top1"]) == row["top1"]
    assert float(written["gflops_backbone"]) == float(written["recorded_gflops_backbone"])
    assert "recorded_top1" in (out / "results.md").read_text()

    other, _ = _checkpoint(tmp_path, seed=1)
    with pytest.raises(ValueError, match="backbone weights .* these are"):
        module.main(_args(module, tmp_path, other, None, replay=str(masks_file)))


@pytest.mark.slow
def test_a_control_backbone_joins_the_table_and_every_family_is_compared_at_the_agents_compute(tmp_path, capsys):
    module = load_script("evaluate")
    model, agent = _checkpoint(tmp_path)
    control, _ = _checkpoint(tmp_path, seed=1)
    rows = module.main(_args(module, tmp_path, model, agent, budgets=(0.5,), control=str(control)))
    assert {"control: dense", "control: random @ 0.5"} <= set(rows)
    assert rows["control: dense"]["top1"] != rows["dense"]["top1"]  # its own weights
    assert rows["control: random @ 0.5"]["gflops"] == rows["random @ 0.5"]["gflops"]
    assert "control, random" in capsys.readouterr().out

    def row(policy, role, rule, gflops, top1):
        return {"policy": policy, "role": role, "rule": rule, "fused_token": False, "gflops": gflops, "top1": top1}

    table = [row("dense", "dense", "dense", 1.0, 0.9), row("random @ 0.5", "heuristic", "random", 0.5, 0.7)]
    table += [
        row("cls-attn top-k @ 0.5", "heuristic", "cls-attn top-k", 0.5, 0.6),
        row("APT agent @ 0.5", "agent", "APT agent", 0.6, 0.85),
        row("APT agent (sampled) @ 0.5", "agent", "APT agent (sampled)", 0.6, 0.5),  # not an agent's decision
        row("control: dense", "control", "dense", 1.0, 0.8),
        row("control: random @ 0.5", "control", "random", 0.5, 0.6),
    ]
    text = module.equal_compute_text(table)
    # random at 0.6 GFLOPs: 0.7 + 0.1 / 0.5 * (0.9 - 0.7) = 0.74; control: 0.6 + 0.2 * 0.2 = 0.64
    assert text.startswith("APT agent @ 0.5: 85.00 at 0.6 GFLOPs") and "random 74.00 (+11.00)" in text
    assert "cls-attn top-k 66.00 (+19.00)" in text and "control, random 64.00 (+21.00)" in text
    assert len(text.splitlines()) == 1
    assert {(r["role"], r["rule"]) for r in rows.values()} >= {("control", "random"), ("heuristic", "cls-attn top-k")}


def test_pictures_have_one_panel_per_image_policy_and_stage(tmp_path):
    from apt_env.eval.report import plot_masks, plot_tradeoff

    masks = {name: torch.rand(4, 3, 16) > 0.5 for name in ("agent", "top-k", "random")}
    fig = plot_masks(tmp_path / "masks.png", torch.randn(4, 1, 16, 16), masks, grid=(4, 4))
    assert len(fig.axes) == 4 * (1 + 3 * 3)
    row = dict(top1=0.5, top1_low=0.4, top1_high=0.6, gflops=1.0, img_per_s_b256=10.0)
    fig = plot_tradeoff(
        tmp_path / "t.png",
        [
            {**row, "role": "heuristic", "rule": "random", "fused_token": False},
            {**row, "role": "heuristic", "rule": "random", "fused_token": True},
            {**row, "role": "dense", "rule": "dense", "fused_token": False},
        ],
    )
    assert len(fig.axes) == 2 and (tmp_path / "t.png").stat().st_size > 1000
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["random", "random + fused token", "dense"]  # one curve per (role, rule, fused_token)


def test_bad_inputs_are_clear_errors(tmp_path):
    module = load_script("evaluate")
    model, agent = _checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        module.main(_args(module, tmp_path, model, agent, budgets=(0.0,)))
    with pytest.raises(FileNotFoundError):
        module.main(_args(module, tmp_path, tmp_path / "missing", agent))
    small, _ = _checkpoint(tmp_path, seed=2, num_classes=5)
    with pytest.raises(ValueError, match="5 classes, synthetic has 10"):
        module.main(_args(module, tmp_path, small, None))
    wrong = save_policy(tmp_path / "wrong_agent", APTPolicy(32, 16, 3, hidden=8, qk_dim=8))
    with pytest.raises(ValueError, match="expects 16 tokens"):
        module.main(_args(module, tmp_path, model, wrong))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a replay file")
    with pytest.raises(ValueError, match="corrupt"):
        module.main(_args(module, tmp_path, model, None, replay=str(corrupt)))
    with pytest.raises(FileNotFoundError):
        module.main(_args(module, tmp_path, model, None, replay=str(tmp_path / "none.pt")))


@pytest.mark.slow
def test_a_budget_agent_is_run_through_its_budget_input_and_meets_it(tmp_path):
    module = load_script("evaluate")
    model, _ = _checkpoint(tmp_path)
    pv = load_backbone(model)
    policy = APTPolicy(pv.embed_dim, pv.num_patches, pv.num_stages, hidden=16, qk_dim=16, use_budget=True,
                       sampling="topk")  # fmt: skip
    agent = save_policy(tmp_path / "budget_agent", policy)
    rows = module.main(_args(module, tmp_path, model, agent, budgets=(0.5, 0.7), picture_budget=0.5))
    for b in (0.5, 0.7):
        for name in (f"APT agent @ {b:g}", f"APT agent (sampled) @ {b:g}"):
            assert abs(rows[name]["gflops_backbone"] / rows["dense"]["gflops_backbone"] - b) <= 0.05 * b
            assert rows[name]["gflops_backbone"] == rows[f"random @ {b:.3g}"]["gflops_backbone"]  # same counts


@pytest.mark.slow
def test_a_checkpoints_recorded_preprocessing_is_used_by_evaluation_and_the_env(tmp_path):
    """A backbone started from timm's pretrained weights records their data config; every reader applies it."""
    from apt_env.data.datasets import build_dataset
    from apt_env.envs.env import APTPruneVectorEnv

    module = load_script("evaluate")
    model, _ = _checkpoint(tmp_path)
    assert load_backbone(model).data_config["preprocessing"] == "apt_env"  # trained on this project's transforms
    config = {"input_size": (1, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
              "mean": (0.9,), "std": (0.05,), "preprocessing": "timm"}  # fmt: skip
    pv = load_backbone(model)
    pv.data_config = config
    recorded = save_backbone(tmp_path / "recorded", pv, meta={"dataset": "synthetic"})
    assert load_backbone(recorded).data_config == config

    dense = {}
    for path in (model, recorded):
        dense[path] = module.main(_args(module, tmp_path, path, None, budgets=(0.5,), images=64))["dense"]
    data = build_dataset("synthetic", split="test", data_config=config)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(64)), batch_size=32)
    expected = evaluate(load_backbone(recorded), loader)
    assert dense[recorded]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert dense[recorded]["loss"] != pytest.approx(dense[model]["loss"], rel=1e-3)

    envs = APTPruneVectorEnv(2, model=recorded, dataset="synthetic")
    assert envs.data.info.mean == (0.9,) and envs.data.info.std == (0.05,)
    assert APTPruneVectorEnv(2, model=model, dataset="synthetic").data.info.mean != (0.9,)


@pytest.mark.slow
def test_an_adaptive_agent_joins_the_table_meets_its_mean_budget_and_draws_where_its_compute_went(tmp_path, capsys):
    from agents.calibrate import calibrate_thresholds
    from apt_env.train.distributed import state_digest

    module = load_script("evaluate")
    model, agent = _checkpoint(tmp_path)
    pv = load_backbone(model)
    adaptive = APTPolicy(pv.embed_dim, pv.num_patches, pv.num_stages, hidden=16, qk_dim=16, use_budget=True,
                         sampling="threshold")  # fmt: skip
    budgets = (0.4, 0.7)
    data = dataset_for(pv, "synthetic", "test")
    images = torch.stack([data[i][0] for i in range(96)])  # the very images evaluated: the mean is met exactly
    adaptive.calibration = calibrate_thresholds(
        adaptive, pv, images, budgets, meta={"backbone": state_digest(pv.model)}
    )
    path = save_policy(tmp_path / "adaptive", adaptive)
    rows = module.main(_args(module, tmp_path, model, None, adaptive_agent=str(path), budgets=budgets,
                             picture_budget=0.4))  # fmt: skip
    for b in budgets:
        row = rows[f"APT agent (adaptive) @ {b:g}"]
        assert (row["role"], row["rule"]) == ("agent", "APT agent (adaptive)")
        assert row["gflops_backbone"] == pytest.approx(b * rows["dense"]["gflops_backbone"], rel=0.02)
        assert f"agent's masks, no decision (adaptive) @ {b:g}" in rows  # its own replay
    out = capsys.readouterr().out
    assert "APT agent (adaptive) @ 0.4: last-block tokens" in out and "Spearman" in out
    assert (tmp_path / "eval" / "compute.png").stat().st_size > 1000
    assert not (tmp_path / "eval" / "compute_area.png").exists()  # synthetic images have no object boxes
    module.main(_args(module, tmp_path, model, None, adaptive_agent=str(path), budgets=budgets, picture_budget=0.4,
                      dataset="scaled-cluttered-fashion-mnist:canvas=32,scale=8-24", images=48))  # fmt: skip
    out = capsys.readouterr().out
    assert "with the dense model's confidence" in out and "with the object's box area" in out
    assert (tmp_path / "eval" / "compute_area.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="outside the calibrated range"):
        module.main(_args(module, tmp_path, model, None, adaptive_agent=str(path), budgets=(0.9,), picture_budget=0.9))


@pytest.mark.slow
def test_on_the_cluttered_task_the_object_box_oracle_runs_at_the_agents_counts(tmp_path):
    module = load_script("evaluate")
    model, _ = _checkpoint(tmp_path)
    pv = load_backbone(model)
    torch.manual_seed(0)
    policy = APTPolicy(pv.embed_dim, pv.num_patches, pv.num_stages, hidden=16, qk_dim=16, use_budget=True,
                       sampling="topk")  # fmt: skip
    agent = save_policy(tmp_path / "budget_agent", policy)
    rows = module.main(_args(module, tmp_path, model, agent, dataset="cluttered-fashion-mnist:canvas=32", images=48,
                             budgets=(0.3, 0.5), picture_budget=0.3, fused=False))  # fmt: skip
    for budget in ("0.3", "0.5"):
        oracle, by_agent = rows[f"object-box oracle @ {budget}"], rows[f"APT agent @ {budget}"]
        assert (oracle["role"], oracle["rule"]) == ("reference", "object-box oracle")
        assert oracle["tokens_last"] == by_agent["tokens_last"]
        assert oracle["gflops_backbone"] == pytest.approx(by_agent["gflops_backbone"])
    assert not any(name.startswith("object-box oracle") for name in module.main(_args(module, tmp_path, model, agent,
                   budgets=(0.3,), picture_budget=0.3, fused=False)))  # fmt: skip


def test_merging_and_pruning_are_compared_by_the_speed_each_gflop_saved_buys():
    module = load_script("evaluate")

    def row(role, rule, budget, gflops, b256, b1):
        return dict(
            role=role, rule=rule, fused_token=False, budget=budget, gflops=gflops, img_per_s_b256=b256, img_per_s_b1=b1
        )

    rows = [row("dense", "dense", 1.0, 1.0, 100.0, 10.0), row("heuristic", "ToMe", 0.5, 0.5, 150.0, 12.0),
            row("heuristic", "random", 0.5, 0.5, 200.0, 10.0)]  # fmt: skip
    text = module.speed_per_gflop_text(rows)
    assert "ToMe 1.50x / 1.20x of 2.00x (efficiency 0.75 / 0.60)" in text
    assert "random 2.00x / 1.00x of 2.00x (efficiency 1.00 / 0.50)" in text


def test_a_fused_token_row_is_paired_with_its_rule_without_it_by_its_columns():
    module = load_script("evaluate")

    def row(policy, rule, fused, budget, gflops, top1):
        return dict(
            policy=policy, role="heuristic", rule=rule, fused_token=fused, budget=budget, gflops=gflops, top1=top1
        )

    rows = [row("random @ 0.5", "random", False, 0.5, 1.0, 0.70), row("top-k @ 0.5", "top-k", False, 0.5, 1.0, 0.60),
            row("random @ 0.7", "random", False, 0.7, 1.4, 0.80), row("fused A", "random", True, 0.5, 1.1, 0.72),
            row("fused B", "top-k", True, 0.5, 1.05, 0.61)]  # fmt: skip
    lines = module.fused_token_text(rows).splitlines()
    assert lines == [
        "fused A: 72.00 at 1.1 GFLOPs; without the fused token 70.00 at 1 (+2.00 top-1, +10.0% GFLOPs)",
        "fused B: 61.00 at 1.05 GFLOPs; without the fused token 60.00 at 1 (+1.00 top-1, +5.0% GFLOPs)",
    ]


def test_the_agent_is_compared_at_equal_speed_without_extrapolating():
    module = load_script("evaluate")

    def row(policy, role, rule, top1, b256, b1):
        return dict(policy=policy, role=role, rule=rule, fused_token=False, top1=top1, img_per_s_b256=b256,
                    img_per_s_b1=b1)  # fmt: skip

    rows = [row("dense", "dense", "dense", 0.9, 100.0, 10.0),
            row("random @ 0.5", "heuristic", "random", 0.7, 200.0, 12.0),
            row("APT agent @ 0.5", "agent", "APT agent", 0.8, 150.0, 20.0)]  # fmt: skip
    lines = module.equal_speed_text(rows).splitlines()
    # batch 256: random at 150 img/s is halfway between dense (100, 0.9) and its budget row (200, 0.7): 0.8
    assert (
        lines[0] == "APT agent @ 0.5: 80.00 at 150 img/s at batch 256; at equal img/s at batch 256 random 80.00 (+0.00)"
    )
    assert lines[1].endswith("at equal img/s at batch 1 random -")  # 20 img/s: faster than every random row


def test_the_summary_table_has_the_dense_model_then_each_budgets_main_rows_in_order():
    module = load_script("evaluate")

    def row(policy, role, rule, budget, top1, fused=False):
        return dict(policy=policy, role=role, rule=rule, fused_token=fused, budget=budget, top1=top1,
                    top1_low=top1 - 0.01, top1_high=top1 + 0.01, gflops=budget, img_per_s_b256=100 / budget,
                    img_per_s_b1=10.0)  # fmt: skip

    rows = [row("random @ 0.5", "heuristic", "random", 0.5, 0.7), row("dense", "dense", "dense", 1.0, 0.9),
            row("APT agent @ 0.5", "agent", "APT agent", 0.5, 0.8), row("ToMe @ 0.25", "heuristic", "ToMe", 0.25, 0.6),
            row("random + fused token @ 0.5", "heuristic", "random", 0.5, 0.7, fused=True),
            row("APT agent (sampled) @ 0.5", "agent", "APT agent (sampled)", 0.5, 0.75)]  # fmt: skip
    lines = module.summary_table(rows).splitlines()
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[2:]] == [
        "dense", "ToMe @ 0.25", "APT agent @ 0.5", "random @ 0.5"
    ]  # fmt: skip
    assert lines[3] == "| ToMe @ 0.25 | 60.00 [59.00, 61.00] | 0.2500 | 4.00 / 1.00 |"


def test_results_files_show_paths_below_the_working_directory_relative(monkeypatch, tmp_path):
    from apt_env.defaults import DEFAULT_CHECKPOINT

    module = load_script("evaluate")
    monkeypatch.chdir(DEFAULT_CHECKPOINT.parents[2])  # the repository
    assert module.shown(str(DEFAULT_CHECKPOINT)) == "apt_env/assets/default"
    assert module.shown(str(tmp_path)) == str(tmp_path)  # elsewhere: as given
