import torch
from torch.utils.data import TensorDataset

from apt_env.backbone import PrunableViT
from apt_env.evaluate import evaluate
from apt_env.flops import FlopCounter


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
    assert results["tokens"] == pv.num_patches and results["keep_ratio"] == 1.0
    assert results["gflops"] * 1e9 == FlopCounter(pv.model).dense()


def test_keep_fn_prunes_and_counts_tokens():
    pv, loader = _setup()
    stages = []

    def keep_first_half(obs: dict[str, torch.Tensor]) -> torch.Tensor:
        stage = int(obs["stage"][0])
        stages.append(stage)
        assert obs["cls_attn"].shape == obs["keep"].shape == (len(obs["stage"]), pv.num_patches)
        keep = torch.zeros(len(obs["stage"]), pv.num_patches, dtype=torch.bool)
        keep[:, : pv.num_patches // (2 * (stage + 1))] = True
        return keep

    results = {mode: evaluate(pv, loader, keep_first_half, mode=mode) for mode in ("masked", "gathered")}
    assert stages[: pv.num_stages] == list(range(pv.num_stages))
    assert results["masked"]["acc1"] == results["gathered"]["acc1"]
    last = pv.num_patches // (2 * pv.num_stages)
    assert results["gathered"]["tokens"] == last
    assert results["gathered"]["gflops"] < evaluate(pv, loader)["gflops"]
