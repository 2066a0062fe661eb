"""powerclip.evaluation: the clip-benchmark loader, the accuracy fix, and the runner's numbers vs a hand computation,
today's recorded outputs and clip-benchmark's own CLI.

The hand computations use only the model's own ``encode_image`` / ``encode_text`` on images read straight
from the suite's tar, batched the way clip-benchmark batches them (all 12 images in one batch, one text
batch per class), so the floats are bit-identical and the metrics must agree exactly.
"""

from __future__ import annotations

import builtins
import io
import json
import math
import shutil
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from powerclip.evaluation import loader, runner, suites
from powerclip.evaluation.metrics import accuracy, classification_metrics, selection_metrics
from powerclip.model import create_model, save_checkpoint, set_pools

MODEL = "PowerCLIP-Tiny-64-8"
N = 12
CAPTIONS = ["a small red circle is to the left of a large blue square", "a green star"]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return create_model(MODEL, seed=0).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", model)


@pytest.fixture(scope="module")
def suite_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("suites")
    suites.write_suites(root, {}, seed=0, n=N, suites=["shapes_cls", "shapes_retrieval", "shapes_binding"])
    return root


def probe_inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(3, 3, *model.visual.image_size, generator=torch.Generator().manual_seed(1))
    return images, open_clip.get_tokenizer(MODEL)(CAPTIONS)


def cb_load(pretrained, model_name=MODEL):
    import clip_benchmark.models as cbm

    loader.register_loaders()
    return cbm.load_clip(
        model_type="powerclip", model_name=model_name, pretrained=str(pretrained), cache_dir=None, device="cpu"
    )


def read_suite(root: Path, suite: str) -> list[dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(root / suite / "test" / "0.tar") as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [samples[k] for k in sorted(samples)]


def load_images(samples, transform) -> torch.Tensor:
    # webdataset's ImageHandler("pil") decodes as PIL.Image.open(...).convert("RGB")
    return torch.stack([transform(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples])


# ------------------------------------------------------------------------------------------- loader
def test_register_loaders_idempotent():
    import clip_benchmark.metrics.linear_probe as lp
    import clip_benchmark.metrics.zeroshot_classification as zsc
    import clip_benchmark.models as cbm

    loader.register_loaders()
    loader.register_loaders()
    assert cbm.TYPE2FUNC["powerclip"] is loader.load_powerclip
    assert cbm.MODEL_TYPES.count("powerclip") == 1
    # the registry entry is the only change: clip-benchmark's metric functions stay its own
    assert zsc.accuracy is lp.accuracy and zsc.accuracy is not accuracy


def test_loader_rebuilds_checkpoint_bit_exactly(model, checkpoint):
    loaded, transform, tokenizer = cb_load(checkpoint, model_name="ViT-B-16")  # recorded name wins
    assert not loaded.training
    assert loaded.visual.pool_type == "avg" and loaded.text_pool_type == "avg"
    assert loaded.powerclip_cfg["model_name"] == MODEL
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    images, text = probe_inputs(model)
    assert torch.equal(tokenizer(CAPTIONS), text)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(text), model.encode_text(text))
    # the eval transform is open_clip's for the model's 64 px input
    image = Image.new("RGB", (100, 80), (200, 30, 30))
    assert transform(image).shape == (3, 64, 64)
    reference = open_clip.image_transform(64, is_train=False)
    assert torch.equal(transform(image), reference(image))


def test_loader_keeps_recorded_pools_of_an_ablation(tmp_path):
    """Our checkpoints are rebuilt with the pools they were trained with (a cls/argmax ablation stays so)."""
    ablation = create_model(MODEL, vision_pool="cls", text_pool="argmax", seed=2).eval()
    path = save_checkpoint(tmp_path / "ablation.pt", ablation)
    loaded, _, _ = cb_load(path)
    assert loaded.visual.pool_type == "tok" and loaded.text_pool_type == "argmax"
    images, text = probe_inputs(ablation)
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(text), ablation.encode_text(text))


@pytest.mark.parametrize("layout", ["plain", "wrapped"])
def test_released_state_dict_loads_with_avg_forced(tmp_path, layout):
    # a "released" OpenCLIP model: stock pools (cls token / argmax), weights only, no powerclip_cfg
    released = create_model(MODEL, vision_pool="cls", text_pool="argmax", seed=3).eval()
    state = released.state_dict()
    if layout == "wrapped":  # open_clip_train style: {"state_dict": {"module.<name>": ...}, "epoch": ...}
        state = {"epoch": 32, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "released.pt"
    torch.save(state, path)
    assert loader.checkpoint_model_name(path) is None
    loaded, _, _ = cb_load(path)
    assert loaded.visual.pool_type == "avg" and loaded.text_pool_type == "avg"
    for k, v in released.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    expected = set_pools(released, "avg", "avg")
    images, text = probe_inputs(released)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), expected.encode_image(images))
        assert torch.equal(loaded.encode_text(text), expected.encode_text(text))
    with pytest.raises(ValueError, match="need the architecture"):
        loader.load_powerclip(model_name=None, pretrained=str(path))


def test_hf_hub_ids_go_to_open_clip_with_avg(monkeypatch, model, tmp_path):
    """An hf-hub id (no network here) is handed to open_clip as the model name, with avg forced."""
    calls = {}

    def fake_load(name, pretrained=None, **kwargs):
        calls["load"] = (name, pretrained, kwargs)
        return create_model(MODEL, vision_pool="cls", text_pool="argmax", seed=0)

    def fake_tokenizer(name, **kwargs):
        calls["tokenizer"] = name
        return lambda texts: torch.zeros(len(texts), 77, dtype=torch.long)

    monkeypatch.setattr(loader, "load_openclip_checkpoint", fake_load)
    monkeypatch.setattr(loader.open_clip, "get_tokenizer", fake_tokenizer)
    hub = "hf-hub:KMasaki/PowerCLIP-ViT-B-16-CC12M"
    loaded, _, _ = loader.load_powerclip(model_name="ViT-B-16", pretrained=hub, cache_dir=str(tmp_path))
    assert calls["load"] == (hub, None, {"cache_dir": str(tmp_path)}) and calls["tokenizer"] == hub
    assert loaded.visual.pool_type == "avg" and loaded.text_pool_type == "avg"
    assert loader.checkpoint_model_name(hub) == hub


# ------------------------------------------------------------------------- clip-benchmark vs hand
@pytest.mark.filterwarnings(
    "ignore:y_pred contains classes not in y_true:UserWarning"
)  # sklearn, 36 classes vs 12 images
def test_zeroshot_classification_matches_hand_computation(model, checkpoint, suite_root, tmp_path):
    out = tmp_path / "cls.json"
    result = runner.run_benchmark(
        checkpoint, "wds/shapes_cls", suite_root / "shapes_cls", "zeroshot_classification", out, device="cpu"
    )
    assert json.loads(out.read_text()) == result
    assert result["task"] == "zeroshot_classification" and result["model"] == MODEL
    assert result["pretrained"] == str(checkpoint)

    meta = suites.read_meta(suite_root / "shapes_cls")
    transform = loader.eval_transform(model)
    tokenizer = open_clip.get_tokenizer(MODEL)
    samples = read_suite(suite_root, "shapes_cls")
    labels = torch.tensor([int(s["cls"]) for s in samples])
    with torch.no_grad():
        classifier = []
        for name in meta["classnames"]:
            emb = F.normalize(model.encode_text(tokenizer([t.format(c=name) for t in meta["templates"]])), dim=-1)
            emb = emb.mean(dim=0)
            classifier.append(emb / emb.norm())
        classifier = torch.stack(classifier, dim=1)
        logits = 100.0 * F.normalize(model.encode_image(load_images(samples, transform)), dim=-1) @ classifier
    top5 = logits.topk(5, dim=1).indices
    acc1 = (top5[:, 0] == labels).double().mean().item()
    acc5 = (top5 == labels[:, None]).any(dim=1).double().mean().item()
    pred = logits.argmax(dim=1)
    recalls = [(pred[labels == c] == c).double().mean().item() for c in labels.unique()]
    metrics = result["metrics"]
    assert metrics["acc1"] == pytest.approx(acc1, abs=1e-12)
    assert metrics["acc5"] == pytest.approx(acc5, abs=1e-12)
    assert metrics["mean_per_class_recall"] == pytest.approx(float(np.mean(recalls)), abs=1e-12)


def test_retrieval_matches_hand_computation_via_cli(model, checkpoint, suite_root, tmp_path, capsys):
    out = tmp_path / "ret.json"
    runner.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--dataset",
            "wds/shapes_retrieval",
            "--dataset-root",
            str(suite_root / "{dataset}"),
            "--task",
            "auto",
            "--output",
            str(out),
            "--device",
            "cpu",
            "--num-workers",
            "3",  # one shard: clamped to 1 worker instead of failing
        ]
    )
    assert capsys.readouterr().out.strip() == str(out)
    result = json.loads(out.read_text())
    assert result["task"] == "zeroshot_retrieval"  # from the suite's meta.json

    tokenizer = open_clip.get_tokenizer(MODEL)
    samples = read_suite(suite_root, "shapes_retrieval")
    captions = [s["txt"].decode() for s in samples]
    with torch.no_grad():
        images = F.normalize(model.encode_image(load_images(samples, loader.eval_transform(model))), dim=-1)
        texts = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    scores = texts @ images.t()  # (texts, images); caption i belongs to image i
    truth = torch.arange(N)
    for k in (1, 5, 10):
        image_r = (scores.topk(k, dim=1).indices == truth[:, None]).any(dim=1).double().mean().item()
        text_r = (scores.t().topk(k, dim=1).indices == truth[:, None]).any(dim=1).double().mean().item()
        assert result["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(image_r, abs=1e-6)
        assert result["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(text_r, abs=1e-6)


def test_caption_selection_with_tie_aware_metrics(model, checkpoint, suite_root, tmp_path):
    result = runner.run_benchmark(
        checkpoint,
        "wds/shapes_binding",
        suite_root / "shapes_binding",
        None,
        tmp_path / "binding.json",
        device="cpu",
        batch_size=5,
    )
    metrics = result["metrics"]
    assert result["task"] == "image_caption_selection"
    assert set(metrics) == {"acc", "image_acc", "text_acc", "text_acc_strict", "text_acc_ties_split", "tie_rate"}
    assert metrics["image_acc"] == 1.0  # one image per item: trivially right

    tokenizer = open_clip.get_tokenizer(MODEL)
    samples = read_suite(suite_root, "shapes_binding")
    with torch.no_grad():
        images = F.normalize(model.encode_image(load_images(samples, loader.eval_transform(model))), dim=-1)
        pairs = [s["txt"].decode().splitlines() for s in samples]
        texts = F.normalize(model.encode_text(tokenizer([c for p in pairs for c in p])), dim=-1).view(N, 2, -1)
    margin = (images[:, None, :] * texts).sum(-1)
    margin = margin[:, 0] - margin[:, 1]
    assert metrics["acc"] == pytest.approx((margin > 0).double().mean().item(), abs=1e-6)
    assert metrics["tie_rate"] == 0.0  # a transformer text tower sees word order
    assert metrics["text_acc_strict"] == metrics["text_acc_ties_split"] == pytest.approx(metrics["acc"])


def test_selection_metrics_tie_rules():
    scores = torch.tensor([[0.5, 0.4], [0.4, 0.5], [0.3, 0.3], [0.2, 0.2]])
    scores[3, 1] = torch.nextafter(scores[3, 1], torch.tensor(1.0))  # identical embeddings, 1 ulp apart
    identical = torch.tensor([[True, False], [True, False], [True, False], [True, True]])
    m = selection_metrics(scores, identical)
    # clip-benchmark's rule: argmax, first index wins an exact tie (row 3 was "broken" by float noise)
    assert m["text_acc_cb"] == 0.5
    assert m["text_acc_strict"] == 0.25
    assert m["text_acc_ties_split"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert m["tie_rate"] == 0.5


def test_run_benchmark_rejects_bad_arguments(checkpoint, suite_root, tmp_path):
    with pytest.raises(ValueError, match="may not set"):
        runner.run_benchmark(
            checkpoint,
            "wds/shapes_cls",
            suite_root / "shapes_cls",
            "zeroshot_classification",
            tmp_path / "x.json",
            extra_args=["--output", "elsewhere.json"],
        )
    with pytest.raises(ValueError, match="pass model_name"):
        runner.run_benchmark(
            tmp_path / "missing.pt",
            "wds/shapes_cls",
            suite_root / "shapes_cls",
            "zeroshot_classification",
            tmp_path / "x.json",
        )
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------------ accuracy fix
def clip_benchmark_accuracy():
    from clip_benchmark.metrics.zeroshot_classification import accuracy as original

    return original


def original_with_0d_friendly_float():
    """clip-benchmark's own accuracy() code, run with a float() that accepts 1-element arrays (numpy < 2.4)."""
    original = clip_benchmark_accuracy()
    namespace = dict(original.__globals__)
    namespace["float"] = lambda x: builtins.float(np.asarray(x).reshape(()))
    return types.FunctionType(original.__code__, namespace, original.__name__, original.__defaults__)


def test_accuracy_matches_original_and_hand():
    friendly = original_with_0d_friendly_float()
    g = torch.Generator().manual_seed(0)
    for n, classes in [(1, 5), (7, 5), (64, 10), (100, 37)]:
        logits = torch.randn(n, classes, generator=g)
        target = torch.randint(0, classes, (n,), generator=g)
        topk = (1, 5) if classes >= 5 else (1,)
        ours = accuracy(logits, target, topk=topk)
        assert ours == friendly(logits, target, topk=topk)
        # linear_probe passes float targets
        assert accuracy(logits, target.float(), topk=topk) == ours
        ranks = logits.argsort(dim=1, descending=True)
        hand = [(ranks[:, :k] == target[:, None]).any(dim=1).sum().item() / n for k in topk]
        assert ours == hand
    if tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4):
        with pytest.raises(TypeError, match="0-dimensional"):
            clip_benchmark_accuracy()(logits, target, topk=(1,))


def test_classification_metrics_match_clip_benchmark_evaluate(monkeypatch):
    """classification_metrics == zeroshot_classification.evaluate's numbers for the same logits (single- and
    multi-label, fewer than 5 classes), with clip-benchmark's accuracy made numpy-2.4-safe for the comparison."""
    from clip_benchmark.metrics import zeroshot_classification as zsc

    monkeypatch.setattr(zsc, "accuracy", original_with_0d_friendly_float())
    g = torch.Generator().manual_seed(3)
    for n, classes, multilabel in [(40, 7, False), (30, 3, False), (25, 6, True)]:
        logits = torch.randn(n, classes, generator=g)
        if multilabel:
            target = (torch.rand(n, classes, generator=g) < 0.3).long()
        else:
            target = torch.randint(0, classes, (n,), generator=g)
        # evaluate() computes logits with these two, then its metrics from them (and from dataset.classes)
        monkeypatch.setattr(zsc, "zero_shot_classifier", lambda *args, **kwargs: None)
        monkeypatch.setattr(zsc, "run_classification", lambda *args, **kwargs: (logits, target))
        classnames = [f"c{i}" for i in range(classes)]
        dataloader = types.SimpleNamespace(dataset=types.SimpleNamespace(classes=classnames))
        expected = zsc.evaluate(None, dataloader, None, classnames, ["{c}"], "cpu", amp=False)
        ours = classification_metrics(logits, target, n_classes=classes)
        assert list(ours) == list(expected)
        for key, value in expected.items():
            assert (math.isnan(value) and math.isnan(ours[key])) or ours[key] == value, key


# ------------------------------------------------------------------------- today's outputs, recorded
# Output JSONs (less "pretrained", a temp path) of the runner before the restructuring (powerclip/evaluate.py,
# clip-benchmark's CLI in-process) for create_model(MODEL, seed=0) on the N=12 suites of `suite_root`,
# identical at batch sizes 5 and 64. Every metric is a count ratio, so no float noise can move it.
RECORDED = {
    "shapes_cls": {
        "dataset": "wds/shapes_cls", "model": MODEL, "task": "zeroshot_classification",
        "metrics": {"acc1": 0.08333333333333333, "acc5": 0.16666666666666666, "mean_per_class_recall": 0.08333333333333333},
        "language": "en",
    },
    "shapes_retrieval": {
        "dataset": "wds/shapes_retrieval", "model": MODEL, "task": "zeroshot_retrieval",
        "metrics": {
            "image_retrieval_recall@1": 0.1666666716337204, "text_retrieval_recall@1": 0.0833333358168602,
            "image_retrieval_recall@5": 0.3333333432674408, "text_retrieval_recall@5": 0.5,
            "image_retrieval_recall@10": 0.8333333134651184, "text_retrieval_recall@10": 0.8333333134651184,
        },
        "language": "en",
    },
    "shapes_binding": {
        "dataset": "wds/shapes_binding", "model": MODEL, "task": "image_caption_selection",
        "metrics": {"image_acc": 1.0, "text_acc": 0.75, "acc": 0.75, "text_acc_strict": 0.75,
                    "text_acc_ties_split": 0.75, "tie_rate": 0.0},
        "language": "en",
    },
}  # fmt: skip


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning")
@pytest.mark.parametrize("suite", list(RECORDED))
def test_runner_reproduces_recorded_outputs(checkpoint, suite_root, tmp_path, suite):
    out = tmp_path / f"{suite}.json"
    result = runner.run_benchmark(checkpoint, f"wds/{suite}", suite_root / suite, None, out, batch_size=5, device="cpu")
    text = out.read_text()
    assert json.loads(text) == result and result.pop("pretrained") == str(checkpoint)
    assert result == RECORDED[suite]
    assert list(result) == list(RECORDED[suite]) and list(result["metrics"]) == list(RECORDED[suite]["metrics"])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning")
def test_runner_matches_clip_benchmark_cli(checkpoint, suite_root, tmp_path, monkeypatch):
    """clip-benchmark's own CLI (in-process, on the CPU, its accuracy made numpy-2.4-safe) gives the same JSON."""
    import clip_benchmark.cli as cli
    from clip_benchmark.metrics import zeroshot_classification as zsc

    loader.register_loaders()
    monkeypatch.setattr(zsc, "accuracy", accuracy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for suite, recorded in RECORDED.items():
        ours = runner.run_benchmark(checkpoint, f"wds/{suite}", suite_root / suite, recorded["task"],
                                    tmp_path / f"ours_{suite}.json", device="cpu", selection_extras=False)  # fmt: skip
        theirs = tmp_path / f"cli_{suite}.json"
        argv = ["clip_benchmark", "eval", "--model_type", "powerclip", "--model", MODEL, "--pretrained", str(checkpoint),
                "--dataset", f"wds/{suite}", "--dataset_root", str(suite_root / suite), "--task", recorded["task"],
                "--recall_k", "1", "5", "10", "--num_workers", "0", "--no_amp", "--quiet", "--output", str(theirs)]  # fmt: skip
        monkeypatch.setattr(sys, "argv", argv)
        cli.main()
        assert json.loads(theirs.read_text()) == ours


# ------------------------------------------------------------------------------------ runner options
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning")
def test_extra_args_are_clip_benchmark_options(checkpoint, suite_root, tmp_path):
    result = runner.run_benchmark(checkpoint, "wds/shapes_cls", suite_root / "shapes_cls", None, tmp_path / "c.json",
                                  device="cpu", extra_args=["--dump_classnames", "--dump_templates"])  # fmt: skip
    meta = suites.read_meta(suite_root / "shapes_cls")
    assert result["classnames"] == meta["classnames"] and result["templates"] == meta["templates"]
    options = runner.parse_options(["--language=en", "--seed", "3"])
    assert options.language == "en" and options.seed == 3 and options.train_split == "train"
    with pytest.raises(ValueError, match=r"\['--save_clf', 'x.pt'\]: not supported by run_benchmark"):
        runner.parse_options(["--save_clf", "x.pt"])
    with pytest.raises(ValueError, match="may not set \\['--task'\\]"):
        runner.parse_options(["--task=auto"])
    with pytest.raises(ValueError, match="invalid int value"):
        runner.parse_options(["--seed", "abc"])
    with pytest.raises(ValueError, match="task must be one of"):
        runner.run_benchmark(checkpoint, "wds/shapes_cls", suite_root / "shapes_cls", "captioning", tmp_path / "x.json")


@pytest.fixture
def lp_root(suite_root, tmp_path) -> Path:
    """shapes_cls with its test shard also as the train split (a linear probe needs one)."""
    root = tmp_path / "shapes_cls"
    shutil.copytree(suite_root / "shapes_cls", root)
    shutil.copytree(root / "test", root / "train")
    return root


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")  # as cli.run, on a CPU
def test_linear_probe_wiring_and_scoped_accuracy(checkpoint, lp_root, tmp_path, monkeypatch):
    """On the CPU (clip-benchmark's linear probe is CUDA-only): what linear_probe.evaluate receives, and that
    its accuracy is the numpy-2.4-safe one during the call only."""
    from clip_benchmark.metrics import linear_probe

    original = linear_probe.accuracy
    seen = {}

    def fake_evaluate(model, train_loader, test_loader, fewshot_k, batch_size, num_workers, lr, epochs, model_id,
                      seed, feature_root, val_dataloader=None, device="cuda", normalize=True, amp=True, verbose=False):  # fmt: skip
        seen.update(model_id=model_id, fewshot_k=fewshot_k, epochs=epochs, lr=lr, feature_root=feature_root,
                    device=device, val=val_dataloader)  # fmt: skip
        seen["train"] = torch.cat([target for _, target in train_loader]).tolist()
        seen["test"] = torch.cat([target for _, target in test_loader]).tolist()
        logits = torch.eye(6)
        return {"lp_acc1": linear_probe.accuracy(logits, torch.arange(6).float(), topk=(1,))[0]}

    monkeypatch.setattr(linear_probe, "evaluate", fake_evaluate)
    result = runner.run_benchmark(
        checkpoint, "wds/shapes_cls", lp_root, "linear_probe", tmp_path / "lp.json", batch_size=5, device="cpu",
        extra_args=["--fewshot_epochs", "2", "--fewshot_lr", "0.5", "--feature_root", str(tmp_path / "features")],
    )
    labels = [item["label"] for item in suites.read_meta(lp_root)["items"]]
    assert result["metrics"] == {"lp_acc1": 1.0} and linear_probe.accuracy is original
    assert seen["train"] == seen["test"] == labels
    assert seen["model_id"] == f"{MODEL}-{checkpoint}-wds/shapes_cls".replace("/", "_")
    assert (seen["fewshot_k"], seen["epochs"], seen["lr"], seen["device"], seen["val"]) == (-1, 2, 0.5, "cpu", None)
    assert seen["feature_root"] == str(tmp_path / "features")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="clip-benchmark's linear probe needs CUDA")
def test_linear_probe_on_cuda(checkpoint, lp_root, tmp_path):
    result = runner.run_benchmark(
        checkpoint, "wds/shapes_cls", lp_root, "linear_probe", tmp_path / "lp.json", device="cuda",
        extra_args=["--fewshot_epochs", "2", "--feature_root", str(tmp_path / "features")],
    )
    assert 0.0 <= result["metrics"]["lp_acc1"] <= 1.0 and result["metrics"]["epochs"] == 2
