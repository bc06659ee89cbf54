"""Fuzzing the user's boundaries with hypothesis: actions, observations, env arguments, images and checkpoints.

The property everywhere: an input either works, or raises exactly one ValueError, TypeError or FileNotFoundError
(not a subclass such as UnicodeDecodeError) whose message names what was wrong; never an error from deep inside
torch, numpy or timm (RuntimeError, IndexError, KeyError, AttributeError, ...). Afterwards the env still steps.
Examples are derandomized, so CI runs the same ones every time.
"""

import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from helpers import SMALL, TINY, TINY_VIT, tiny_envs
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agents.baselines import ClsAttentionTopK, KeepAll, RandomKeep
from agents.io import load_policy, save_policy
from agents.policy import APTPolicy
from apt_env.envs.env import APTPruneEnv, APTPruneVectorEnv
from apt_env.envs.episodes import REWARDS
from apt_env.envs.observe import BUDGET_KEYS, CHANNELS, OBS_KEYS
from apt_env.models.backbone import PrunableViT
from apt_env.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_backbone, save_backbone

CLEAR = (ValueError, TypeError, FileNotFoundError)

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FUZZ_MORE = settings(FUZZ, max_examples=60)
"""For tests whose examples take milliseconds."""

NUM_ENVS, N = 2, 16  # the tiny ViT has 16 patch tokens
NUMPY_DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]
NUMPY_DTYPES += [np.float16, np.float32, np.float64, np.longdouble]
TORCH_DTYPES = [torch.bool, torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32]
TORCH_DTYPES += [torch.int64, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64]


def outcome(fn, *args, names: tuple[str, ...], **kwargs):
    """``fn(*args, **kwargs)``'s result, or the clear error it raised, checked to name one of ``names``."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        assert type(err) in CLEAR, f"{type(err).__name__} from deep inside: {err}"
        assert any(name in str(err) for name in names), f"{err!r} names none of {names}"
        return err


@pytest.fixture(scope="module")
def envs() -> APTPruneVectorEnv:
    envs = tiny_envs(NUM_ENVS)
    envs.reset(seed=0)
    return envs


@pytest.fixture(scope="module")
def env() -> APTPruneEnv:
    torch.manual_seed(0)
    return APTPruneEnv(**TINY)


# ---- actions ----


@st.composite
def encoded(draw, bits: np.ndarray):
    """``bits`` (0/1) as numpy of any dtype, byte order and strides, as nested lists, or as a torch tensor."""
    kind = draw(st.sampled_from(["numpy", "list", "torch"]))
    if kind == "torch":
        t = torch.from_numpy(bits.astype(np.int64)).to(draw(st.sampled_from(TORCH_DTYPES)))
        layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "grad"]))
        if layout == "transposed" and t.dim() == 2:
            return t.t().contiguous().t()
        if layout == "strided":
            wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
            wide[..., ::2] = t
            return wide[..., ::2]
        if layout == "grad" and t.is_floating_point():
            return t.requires_grad_()
        return t
    arr = bits.astype(draw(st.sampled_from(NUMPY_DTYPES)))
    if kind == "list":
        return arr.tolist()
    arr = arr.astype(arr.dtype.newbyteorder(draw(st.sampled_from("=<>"))))
    layout = draw(st.sampled_from(["contiguous", "reversed", "fortran", "strided", "readonly"]))
    if layout == "reversed":
        return arr[..., ::-1].copy()[..., ::-1]  # the same values, negative strides
    if layout == "fortran":
        return np.asfortranarray(arr)
    if layout == "strided":
        wide = np.zeros((*arr.shape[:-1], 2 * arr.shape[-1]), dtype=arr.dtype)
        wide[..., ::2] = arr
        return wide[..., ::2]
    if layout == "readonly":
        arr.setflags(write=False)
    return arr


def junk(shape: tuple[int, ...]):
    """Values that are not a 0/1 array of ``shape``."""
    wrong_shape = st.lists(st.integers(0, 20), min_size=0, max_size=3).filter(lambda s: tuple(s) != shape)
    return st.one_of(
        st.none(),
        st.text(max_size=4),
        st.integers(),
        st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
        wrong_shape.map(lambda s: np.ones(s, dtype=np.int8)),
        wrong_shape.map(lambda s: torch.ones(s)),
        st.sampled_from([np.nan, np.inf, -1, 2, 0.5, 1 + 1j]).map(lambda v: np.full(shape, v)),
        st.just(np.full(shape, "1")),
        st.just(np.zeros(shape, dtype="datetime64[s]")),
        st.just([[1] * N, [1] * (N - 1)][: shape[0]] if len(shape) == 2 else [[1], [1, 1]]),  # ragged
        st.just(torch.ones(shape, dtype=torch.complex64)),
        st.just(torch.ones(shape, device="meta")),
        st.just(torch.ones(shape).to_sparse()),
    )


def _expected(bits: np.ndarray) -> np.ndarray:
    """The executed mask at the first stage: the action, or the lowest patch where it keeps nothing (min_keep 1)."""
    out = bits.astype(np.int8).copy()
    out[out.sum(-1) == 0, ..., 0] = 1
    return out


@FUZZ
@given(data=st.data())
def test_vector_env_step_takes_any_0_1_action_and_refuses_the_rest_clearly(envs, one_thread, data):
    bits = np.array(data.draw(st.lists(st.booleans(), min_size=NUM_ENVS * N, max_size=NUM_ENVS * N)))
    bits = bits.reshape(NUM_ENVS, N)
    valid = data.draw(st.booleans())
    action = data.draw(encoded(bits) if valid else junk((NUM_ENVS, N)))
    envs.reset(seed=0)
    result = outcome(envs.step, action, names=("MultiBinary(16)",))
    if valid:
        assert not isinstance(result, Exception), f"a valid action was refused: {result}"
        np.testing.assert_array_equal(result[4]["executed_action"], _expected(bits))
    _, reward, _, _, _ = envs.step(np.ones((NUM_ENVS, N), dtype=np.int8))  # still steps
    assert np.isfinite(reward).all()


@FUZZ
@given(data=st.data())
def test_single_env_step_takes_any_0_1_action_and_refuses_the_rest_clearly(env, one_thread, data):
    bits = np.array(data.draw(st.lists(st.booleans(), min_size=N, max_size=N)))
    valid = data.draw(st.booleans())
    action = data.draw(encoded(bits) if valid else junk((N,)))
    env.reset(seed=0)
    result = outcome(env.step, action, names=("MultiBinary(16)",))
    if valid:
        assert not isinstance(result, Exception), f"a valid action was refused: {result}"
        np.testing.assert_array_equal(result[4]["executed_action"], _expected(bits[None])[0])
    obs, reward, _, _, _ = env.step(np.ones(N, dtype=np.int8))  # still steps
    assert env.observation_space.contains(obs) and np.isfinite(reward)


# ---- observations given to the policies ----


@pytest.fixture(scope="module")
def observed() -> dict:
    """An observation of an env without and one with a budget, and the policies that read each."""
    torch.manual_seed(0)
    plain, budget = tiny_envs(NUM_ENVS), tiny_envs(NUM_ENVS, budget=0.5)
    obs, _ = plain.reset(seed=0)
    obs, _, _, _, _ = plain.step(np.tile(np.arange(N) % 3 > 0, (NUM_ENVS, 1)))  # some tokens pruned
    budget_obs, _ = budget.reset(seed=0)
    policies = {
        "apt": APTPolicy.for_env(plain, **SMALL),
        "keep_all": KeepAll(),
        "random": RandomKeep(0.5, seed=0),
        "cls_attn_top_k": ClsAttentionTopK(0.5),
    }
    budget_policies = {"apt_topk": APTPolicy.for_env(budget, **SMALL, sampling="topk")}
    return {"plain": (obs, policies), "budget": (budget_obs, budget_policies)}


OBS_NAMES = ("obs", "observation", "keep_ratio", "budget", "sampling")


def _act(policy, obs, deterministic, keep_ratio):
    keep = policy.act(obs, deterministic=deterministic, keep_ratio=keep_ratio)
    if isinstance(policy, APTPolicy):
        action, log_prob, entropy, value = policy.get_action_and_value(obs)
        assert action.shape == keep.shape and log_prob.shape == entropy.shape == value.shape == keep.shape[:1]
    return keep


@FUZZ_MORE
@given(data=st.data())
def test_policies_read_any_encoding_of_an_observation_and_refuse_broken_ones_clearly(observed, one_thread, data):
    which = data.draw(st.sampled_from(["plain", "budget"]))
    obs, policies = observed[which]
    name = data.draw(st.sampled_from(sorted(policies)))
    policy = policies[name]
    mutation = data.draw(st.sampled_from(["none", "encode", "drop", "replace", "not_a_dict"]))
    key = data.draw(st.sampled_from(sorted(obs)))
    broken = dict(obs)
    if mutation == "encode":  # every value in another dtype, byte order or layout: must work alike
        for k, v in obs.items():
            broken[k] = data.draw(
                encoded(v)
                if v.dtype == np.int8
                else st.sampled_from(
                    [v, v.astype(">f4"), v[..., ::-1].copy()[..., ::-1], v.tolist(), torch.from_numpy(v)]
                )
            )
    elif mutation == "drop":
        del broken[key]
    elif mutation == "replace":
        broken[key] = data.draw(junk(obs[key].shape))
    elif mutation == "not_a_dict":
        broken = data.draw(st.sampled_from([None, obs["tokens"], list(obs.items()), "obs"]))
    keep_ratio = data.draw(st.one_of(st.none(), st.floats(), st.text(max_size=3), st.integers(-1, 2)))
    deterministic = data.draw(st.booleans())
    result = outcome(_act, policy, broken, deterministic, keep_ratio, names=OBS_NAMES)
    if mutation in ("none", "encode") and (
        keep_ratio is None or (isinstance(keep_ratio, float) and 0 < keep_ratio <= 1)
    ):
        assert not isinstance(result, Exception), f"a valid observation was refused: {result}"
    if not isinstance(result, Exception):
        assert result.shape == (NUM_ENVS, N) and result.dtype == torch.bool
        if key != "live" or mutation in ("none", "encode"):  # the policy saw the mask it must respect
            assert not (result & ~torch.as_tensor(obs["live"]).bool()).any(), "a pruned token was kept"
        if mutation == "encode" and deterministic and name != "random":
            assert torch.equal(result, _act(policy, obs, deterministic, keep_ratio)), (
                "the encoding changed the decision"
            )


# ---- environment arguments ----

WEIGHTS = st.one_of(st.floats(-1e6, 1e6), st.sampled_from([np.nan, np.inf, -np.inf]), st.text(max_size=2), st.none())
"""Reward weights: sensible sizes (1e32 overflows a float32 reward, rightly) and ones that are not numbers."""

ARGUMENTS = {
    "prune_layers": st.one_of(
        st.none(), st.lists(st.integers(-1, 5), max_size=4), st.lists(st.floats(0, 4), max_size=2), st.text(max_size=2)
    ),
    "min_keep": st.one_of(st.none(), st.integers(-2, 18), st.floats(), st.text(max_size=2), st.booleans()),
    "num_envs": st.one_of(st.integers(-1, 3), st.floats(), st.text(max_size=2), st.none(), st.booleans()),
    "budget": st.one_of(
        st.none(),
        st.floats(),
        st.tuples(st.floats(-0.5, 1.5), st.floats(-0.5, 1.5)),
        st.lists(st.floats(0, 1), max_size=3),
        st.text(max_size=3),
        st.booleans(),
    ),
    "budget_weight": WEIGHTS,
    "flops_weight": WEIGHTS,
    "reward": st.one_of(st.sampled_from(REWARDS), st.text(max_size=5), st.none()),
    "obs_keys": st.one_of(
        st.lists(st.sampled_from((*OBS_KEYS, *BUDGET_KEYS, "pixels")), max_size=5), st.text(max_size=6), st.none()
    ),
    "channels": st.one_of(st.lists(st.sampled_from((*CHANNELS, "double")), max_size=3), st.text(max_size=6), st.none()),
    "layout": st.one_of(st.sampled_from(["gathered", "masked", "sparse"]), st.none()),
    "device": st.sampled_from(["cpu", "cpu:0", "nonsense", "meta", "cuda:99", 7, None]),
    "dataset": st.sampled_from(["synthetic", "mnist3d", "", None, 5, "imagefolder:/no/such/folder"]),
    "model": st.sampled_from(
        [
            ("vit_tiny_patch16_224", {**TINY_VIT, "class_token": False, "global_pool": "avg"}),
            ("vit_tiny_patch16_224", {**TINY_VIT, "num_heads": 3}),
            ("vit_tiny_patch16_224", {**TINY_VIT, "depth": 1}),
            ("vit_tiny_patch16_224", {**TINY_VIT, "global_pool": "bogus"}),
            ("vit_tiny_patch16_224", {**TINY_VIT, "bogus": 1}),
            ("vit_tiny_patch16_224", {**TINY_VIT, "num_classes": 3}),
            ("vit_tiny_patch16_224", [1]),
            ("vit_tiny_patch16_224",),
            (5, TINY_VIT),
            "vit_no_such_model",
            "/no/such/checkpoint",
            5,
        ]
    ),
}
ARGUMENT_NAMES = {
    "obs_keys": ("obs_keys", "observation key"),
    "channels": ("channel",),
    "dataset": ("dataset", "imagefolder", "/no/such/folder"),
    "model": ("model", "timm", "block", "classes"),
}


@FUZZ
@given(data=st.data())
def test_env_arguments_work_or_name_the_bad_one(envs, one_thread, data):
    name = data.draw(st.sampled_from(sorted(ARGUMENTS)))
    value = data.draw(ARGUMENTS[name])
    kwargs = {**TINY, "num_envs": NUM_ENVS, name: value}
    if name == "obs_keys" and isinstance(value, list) and set(value) & set(BUDGET_KEYS):
        kwargs["budget"] = 0.5
    built = outcome(APTPruneVectorEnv, **kwargs, names=ARGUMENT_NAMES.get(name, (name,)))
    if not isinstance(built, Exception):
        obs, _ = built.reset(seed=0)
        assert built.observation_space.contains(obs)
        built.action_space.seed(0)
        _, reward, _, _, _ = built.step(built.action_space.sample())
        assert np.isfinite(reward).all()
    envs.step(np.ones((NUM_ENVS, N), dtype=np.int8))  # the other env is untouched


# ---- images ----


@pytest.fixture(scope="module")
def models() -> list[PrunableViT]:
    torch.manual_seed(0)
    return [PrunableViT.from_timm("vit_tiny_patch16_224", **{**TINY_VIT, "in_chans": c}).eval() for c in (1, 3)]


@FUZZ_MORE
@given(data=st.data())
def test_images_of_any_size_channels_and_dtype_work_or_are_a_clear_error(models, one_thread, data):
    pv = data.draw(st.sampled_from(models))
    shape = data.draw(
        st.one_of(
            st.tuples(st.integers(1, 3), st.just(pv.in_chans), st.just(16), st.just(16)),  # the model's
            st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(1, 20), st.sampled_from([15, 16, 17, 28])),
        )
    )
    dtype = data.draw(
        st.sampled_from(
            [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.bool, torch.complex64]
        )
    )
    images = torch.zeros(shape).to(dtype)
    form = data.draw(st.sampled_from(["tensor", "nan", "channels_last", "strided", "numpy", "sparse", "meta", "3d"]))
    if form == "nan":
        images = torch.full(shape, float("nan")).to(dtype)
    elif form == "channels_last" and images.dim() == 4:
        images = images.to(memory_format=torch.channels_last)
    elif form == "strided":
        images = torch.cat([images, images], -1)[..., ::2]
    elif form == "numpy":
        images = images.float().numpy()
    elif form == "sparse":
        images = images.to_sparse()
    elif form == "meta":
        images = images.to("meta")
    elif form == "3d":
        images = images[0] if len(images) else images.flatten(0, 1)
    masks = [torch.rand(shape[0], N) < 0.5] if data.draw(st.booleans()) else None
    layout = data.draw(st.sampled_from(["masked", "gathered"]))
    fits = (
        form in ("tensor", "nan", "channels_last", "strided")
        and shape[0] >= 1
        and shape[1:] == (pv.in_chans, 16, 16)
        and dtype == torch.float32
    )
    with torch.no_grad():
        result = outcome(pv, images, masks, layout, names=("images",))
    if fits:
        assert not isinstance(result, Exception), f"images that fit were refused: {result}"
        assert result.shape == (shape[0], 10)


@FUZZ_MORE
@given(data=st.data())
def test_keep_masks_work_or_are_a_clear_error(models, one_thread, data):
    pv = models[0]
    images = torch.zeros(2, 1, 16, 16)
    count = data.draw(st.integers(0, 4))
    masks = [data.draw(junk((2, N)) | encoded(np.ones((2, N), dtype=bool))) for _ in range(count)]
    if count and all(
        isinstance(m, torch.Tensor) and m.shape == (2, N) and m.layout == torch.strided and not m.is_meta for m in masks
    ):
        masks = data.draw(st.sampled_from([masks, torch.stack([m.bool() for m in masks])]))  # or one (K, B, N) tensor
    masks = data.draw(st.sampled_from([masks, tuple(masks), None, 5, "masks"]))
    with torch.no_grad():
        result = outcome(
            pv,
            images,
            masks,
            data.draw(st.sampled_from(["masked", "gathered", "dense"])),
            names=("keep mask", "keep_masks", "layout", "pruning stages"),
        )
    if not isinstance(result, Exception):
        assert result.shape == (2, 10) and torch.isfinite(result).all()


# ---- checkpoints ----

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 64) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
"""Config values; sizes stay small so that a garbage config cannot build a huge model."""


@st.composite
def corruption(draw, config: dict, tensors: dict[str, torch.Tensor], weights_file: str):
    """A way to break a checkpoint folder: ``corrupt(folder)``."""
    what = draw(
        st.sampled_from(
            [
                "weights_bytes",
                "weights_tensors",
                "config_value",
                "config_bytes",
                "remove",
                "directory",
                "file",
                "nothing",
            ]
        )
    )
    if what == "weights_bytes":
        cut = draw(st.integers(0, 400))
        noise = draw(st.binary(max_size=16))
        return lambda f: (f / weights_file).write_bytes((f / weights_file).read_bytes()[:cut] + noise)
    if what == "weights_tensors":
        key = draw(st.sampled_from(sorted(tensors)))
        change = draw(st.sampled_from(["drop", "extra", "reshape", "dtype"]))
        broken = dict(tensors)
        if change == "drop":
            del broken[key]
        elif change == "extra":
            broken["bogus." + key] = tensors[key].clone()
        elif change == "reshape":
            broken[key] = torch.zeros(draw(st.lists(st.integers(0, 5), max_size=3)))
        else:
            broken[key] = tensors[key].to(draw(st.sampled_from([torch.float16, torch.int32, torch.bool])))
        return lambda f: safetensors.torch.save_file(broken, str(f / weights_file))
    if what == "config_value":
        path = draw(st.sampled_from([(k,) for k in config] + [("model_args", k) for k in config.get("model_args", {})]))
        value = draw(JSON | st.just("__delete__"))
        broken = json.loads(json.dumps(config))
        parent = broken if len(path) == 1 else broken[path[0]]
        if value == "__delete__":
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        return lambda f: (f / CONFIG_FILE).write_text(json.dumps(broken))
    if what == "config_bytes":
        text = draw(st.binary(max_size=20) | st.text(max_size=20).map(str.encode) | st.just(b"\xff\xfe{"))
        return lambda f: (f / CONFIG_FILE).write_bytes(text)
    if what == "remove":
        name = draw(st.sampled_from([weights_file, CONFIG_FILE, None]))
        return lambda f: (f / name).unlink() if name else shutil.rmtree(f)
    if what == "directory":
        name = draw(st.sampled_from([weights_file, CONFIG_FILE]))
        return lambda f: ((f / name).unlink(), (f / name).mkdir())
    if what == "file":  # not a folder at all
        return lambda f: (shutil.rmtree(f), f.write_bytes(b"{}"))
    return lambda f: None


def _broken_copy(folder: Path, corrupt, tmp: str) -> Path:
    target = Path(tmp) / "checkpoint"
    shutil.copytree(folder, target)
    corrupt(target)
    return target


@pytest.fixture(scope="module")
def backbone_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    pv = PrunableViT.from_timm("vit_tiny_patch16_224", **{**TINY_VIT, "depth": 2}, prune_layers=(1,))
    return save_backbone(tmp_path_factory.mktemp("backbone") / "checkpoint", pv, meta={"dataset": "synthetic"})


@FUZZ_MORE
@given(data=st.data())
def test_load_backbone_of_a_broken_folder_is_a_clear_error_naming_it(backbone_folder, one_thread, data):
    config = json.loads((backbone_folder / CONFIG_FILE).read_text())
    tensors = safetensors.torch.load_file(str(backbone_folder / WEIGHTS_FILE))
    corrupt = data.draw(corruption(config, tensors, WEIGHTS_FILE))
    with tempfile.TemporaryDirectory() as tmp:
        folder = _broken_copy(backbone_folder, corrupt, tmp)
        pv = outcome(load_backbone, folder, names=(str(folder),))
    if not isinstance(pv, Exception):  # what loads runs
        with torch.no_grad():
            assert pv(torch.zeros(1, pv.in_chans, *pv.img_size)).shape == (1, pv.num_classes)


@pytest.fixture(scope="module")
def policy_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_policy(tmp_path_factory.mktemp("agent") / "checkpoint", APTPolicy(32, N, 3, **SMALL))


def _policy_obs(policy: APTPolicy) -> dict[str, np.ndarray]:
    n, c = policy.num_patches, policy.embed_dim
    obs = {
        "tokens": np.ones((2, n, c), np.float32),
        "cls": np.ones((2, c), np.float32),
        "cls_attn": np.ones((2, n)),
        "live": np.ones((2, n), np.int8),
        "stage": np.zeros(2, np.int64),
        "keep_count": np.ones((2, 1)),
    }
    if policy.use_budget:
        obs["budget"] = np.full((2, 1), 0.5, np.float32)
    return obs


def _object_or_not_json(config: Path) -> bool:
    """Whether ``config`` is missing, not JSON, or a JSON object in UTF-8: what agents/io.py reports clearly."""
    if not config.is_file():
        return True
    try:
        return isinstance(json.loads(config.read_bytes().decode("utf-8")), dict)
    except UnicodeDecodeError:
        return False
    except ValueError:
        return True


@FUZZ_MORE
@given(data=st.data())
def test_load_policy_of_a_broken_folder_is_a_clear_error_naming_it(policy_folder, one_thread, data):
    config = json.loads((policy_folder / CONFIG_FILE).read_text())
    tensors = safetensors.torch.load_file(str(policy_folder / "policy.safetensors"))
    corrupt = data.draw(corruption(config, tensors, "policy.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = _broken_copy(policy_folder, corrupt, tmp)
        assume(_object_or_not_json(folder / CONFIG_FILE))  # the rest: test_load_policy_of_a_config_that_is_not_...
        policy = outcome(load_policy, folder, names=(str(folder),))
    if not isinstance(policy, Exception):  # what loads runs
        assert policy.act(_policy_obs(policy)).shape == (2, policy.num_patches)


@pytest.mark.parametrize("text", [b"[1, 2]", b"\xff\xfe{"])
def test_load_policy_of_a_config_that_is_not_an_object(policy_folder, text, tmp_path):
    folder = _broken_copy(policy_folder, lambda f: (f / CONFIG_FILE).write_bytes(text), str(tmp_path))
    with pytest.raises(ValueError, match="is corrupt") as err:
        load_policy(folder)
    assert str(folder) in str(err.value)


# ---- the defects fuzzing found, as fixed examples ----


def _edited_copy(folder: Path, tmp_path: Path, **changes) -> Path:
    """A copy of checkpoint ``folder`` whose config.json has ``changes`` (``model_args`` merged)."""
    target = _broken_copy(folder, lambda f: None, str(tmp_path))
    config = json.loads((target / CONFIG_FILE).read_text())
    config.update({k: ({**config[k], **v} if k == "model_args" else v) for k, v in changes.items()})
    (target / CONFIG_FILE).write_text(json.dumps(config))
    return target


ONES = np.ones((NUM_ENVS, N), dtype=np.int8)
FOUND = {  # what it was before the fix -> (what now happens: None works, else (error, message))
    "big-endian action (ValueError from torch.from_numpy)": (lambda w: w.envs.step(ONES.astype(">f4")), None),
    "action with negative strides (ValueError from torch)": (lambda w: w.envs.step(ONES[:, ::-1]), None),
    "long double action (TypeError from torch)": (lambda w: w.envs.step(ONES.astype(np.longdouble)), None),
    "ragged action list (numpy's inhomogeneous-shape ValueError)": (
        lambda w: w.envs.step([[1] * N, [1] * (N - 1)]),
        (ValueError, r"action for 2 x MultiBinary\(16\) must be an array of numbers, got a ragged list"),
    ),
    "sparse action (NotImplementedError)": (
        lambda w: w.envs.step(torch.ones(NUM_ENVS, N).to_sparse()),
        (ValueError, "dense tensor"),
    ),
    "meta action (NotImplementedError)": (
        lambda w: w.envs.step(torch.ones(NUM_ENVS, N, device="meta")),
        (ValueError, "dense tensor with data"),
    ),
    "single env given a batched action (named the batched shape (1, 1, 16))": (
        lambda w: w.env.step(np.ones((1, N))),
        (ValueError, r"shape \(16,\) for MultiBinary\(16\), got \(1, 16\)"),
    ),
    "observation without tokens (KeyError)": (
        lambda w: w.apt.act({k: v for k, v in w.obs.items() if k != "tokens"}),
        (ValueError, "the observation has no 'tokens'"),
    ),
    "observation that is not a dict (IndexError / TypeError of subscript)": (
        lambda w: w.apt.act(w.obs["tokens"]),
        (TypeError, "an observation is a dict"),
    ),
    "stage out of range (IndexError in the embedding)": (
        lambda w: w.apt.act({**w.obs, "stage": np.array([5, 5])}),
        (ValueError, r"obs\['stage'\] must be in \[0, 3\)"),
    ),
    "class token of the wrong width (RuntimeError in LayerNorm)": (
        lambda w: w.apt.act({**w.obs, "cls": np.zeros((NUM_ENVS, 31), np.float32)}),
        (ValueError, r"obs\['cls'\] must have shape \(2, 32\)"),
    ),
    "keep mask without a batch (broadcast silently, IndexError in the baselines)": (
        lambda w: RandomKeep(0.5, seed=0).act({**w.obs, "live": np.ones(N, np.int8)}),
        (ValueError, r"obs\['live'\] must be batched \(B, N\)"),
    ),
    "keep_ratio as a string (TypeError of '<')": (
        lambda w: ClsAttentionTopK(0.5).act(w.obs, keep_ratio="a"),
        (ValueError, "keep_ratio must be a fraction"),
    ),
    "complex keep_count (NotImplementedError in round)": (
        lambda w: w.apt_topk.act({**w.budget_obs, "keep_count": torch.ones(NUM_ENVS, 1, dtype=torch.complex64)}),
        (ValueError, r"obs\['keep_count'\] must be real numbers"),
    ),
    "num_envs=2.5 (TypeError from numpy)": (
        lambda w: APTPruneVectorEnv(2.5, **TINY),
        (ValueError, "num_envs must be an integer"),
    ),
    "budget='11' (accepted as the range (1, 1))": (
        lambda w: APTPruneVectorEnv(NUM_ENVS, **TINY, budget="11"),
        (ValueError, "budget must be"),
    ),
    "flops_weight=nan (accepted: NaN rewards)": (
        lambda w: APTPruneVectorEnv(NUM_ENVS, **TINY, flops_weight=np.nan),
        (ValueError, "flops_weight must be a finite number"),
    ),
    "budget_weight=inf (accepted: inf * 0 = NaN rewards under the budget)": (
        lambda w: APTPruneVectorEnv(NUM_ENVS, **TINY, budget=0.5, budget_weight=np.inf),
        (ValueError, "budget_weight must be a finite number"),
    ),
    "obs_keys=None (TypeError: not iterable)": (
        lambda w: APTPruneVectorEnv(NUM_ENVS, **TINY, obs_keys=None),
        (ValueError, "obs_keys must be a sequence of names"),
    ),
    "device='nonsense' (RuntimeError)": (
        lambda w: APTPruneVectorEnv(NUM_ENVS, **TINY, device="nonsense"),
        (ValueError, "device 'nonsense' cannot be used"),
    ),
    "dataset=None (AttributeError in apt_env.data)": (
        lambda w: APTPruneVectorEnv(NUM_ENVS, **{**TINY, "dataset": None}),
        (ValueError, "dataset must be a dataset name"),
    ),
    "model=5 (TypeError from pathlib)": (
        lambda w: APTPruneVectorEnv(NUM_ENVS, **{**TINY, "model": 5}),
        (TypeError, "model must be a checkpoint folder"),
    ),
    "model=(name,) (ValueError: not enough values to unpack)": (
        lambda w: APTPruneVectorEnv(NUM_ENVS, **{**TINY, "model": ("vit_tiny_patch16_224",)}),
        (ValueError, r"a model given as a tuple is \(timm_name, timm_kwargs dict\)"),
    ),
    "timm kwargs with embed_dim % num_heads != 0 (AssertionError from timm)": (
        lambda w: APTPruneVectorEnv(
            NUM_ENVS, **{**TINY, "model": ("vit_tiny_patch16_224", {**TINY_VIT, "num_heads": 3})}
        ),
        (ValueError, "timm cannot build 'vit_tiny_patch16_224'"),
    ),
    "a model of one block (ValueError 'n (counts) have to be positive')": (
        lambda w: APTPruneVectorEnv(NUM_ENVS, **{**TINY, "model": ("vit_tiny_patch16_224", {**TINY_VIT, "depth": 1})}),
        (ValueError, "cannot prune a model of 1 block"),
    ),
    "float64 images (RuntimeError in the patch embedding)": (
        lambda w: w.pv(torch.zeros(2, 1, 16, 16, dtype=torch.float64)),
        (ValueError, r"images are torch.float64, the model torch.float32"),
    ),
    "an empty batch, gathered (RuntimeError: max() of an empty tensor)": (
        lambda w: w.pv(torch.zeros(0, 1, 16, 16), [torch.ones(0, N, dtype=torch.bool)], layout="gathered"),
        (ValueError, "images must be a dense tensor of one image or more"),
    ),
    "meta images (RuntimeError: not on the expected device)": (
        lambda w: w.pv(torch.zeros(2, 1, 16, 16, device="meta")),
        (ValueError, "images are on meta, the model on cpu"),
    ),
    "keep masks as one (K, B, N) tensor (RuntimeError: ambiguous bool)": (
        lambda w: w.pv(torch.zeros(2, 1, 16, 16), torch.ones(3, 2, N, dtype=torch.bool), layout="gathered"),
        None,
    ),
    "bucket_rows=0 (ZeroDivisionError when pruning)": (
        lambda w: PrunableViT.from_timm("vit_tiny_patch16_224", bucket_rows=0, **TINY_VIT),
        (ValueError, "bucket_rows must be a positive integer"),
    ),
    "checkpoint with an architecture that is not a string (AttributeError)": (
        lambda w: load_backbone(_edited_copy(w.backbone_folder, w.tmp, architecture=5)),
        (ValueError, "unknown timm model 5"),
    ),
    "checkpoint with model_args num_heads=3 (AssertionError from timm)": (
        lambda w: load_backbone(_edited_copy(w.backbone_folder, w.tmp, model_args={"num_heads": 3})),
        (ValueError, "cannot rebuild"),
    ),
    "checkpoint with model_args img_size=[] (IndexError from timm)": (
        lambda w: load_backbone(_edited_copy(w.backbone_folder, w.tmp, model_args={"img_size": []})),
        (ValueError, "cannot rebuild"),
    ),
    "checkpoint with bucket_rows=0 (loaded, then ZeroDivisionError)": (
        lambda w: load_backbone(_edited_copy(w.backbone_folder, w.tmp, bucket_rows=0)),
        (ValueError, "bucket_rows must be a positive integer"),
    ),
    "agent checkpoint with num_patches=-3 (loaded, a policy that cannot act)": (
        lambda w: load_policy(_edited_copy(w.policy_folder, w.tmp, num_patches=-3)),
        (ValueError, "num_patches must be a positive integer"),
    ),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_defects_found_by_fuzzing_stay_fixed(
    case, envs, env, observed, models, backbone_folder, policy_folder, tmp_path, one_thread
):
    obs, policies = observed["plain"]
    budget_obs, budget_policies = observed["budget"]
    world = SimpleNamespace(
        envs=envs, env=env, obs=obs, apt=policies["apt"], budget_obs=budget_obs, apt_topk=budget_policies["apt_topk"],
        pv=models[0], backbone_folder=backbone_folder, policy_folder=policy_folder, tmp=tmp_path,
    )  # fmt: skip
    envs.reset(seed=0)
    env.reset(seed=0)
    run, expected = FOUND[case]
    with torch.no_grad():
        if expected is None:
            run(world)
        else:
            with pytest.raises(expected[0], match=expected[1]) as err:
                run(world)
            assert type(err.value) is expected[0]
    envs.step(ONES)  # still steps
