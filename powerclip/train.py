"""Train one run: ``python -m powerclip.train ...`` (CPU) or ``torchrun --standalone --nproc-per-node=N -m
powerclip.train ...`` (GPUs); ``main(argv)`` runs in-process for tests. Options: powerclip.train_params.

The loop follows open_clip_train: AdamW without weight decay on gains/biases/logit scale, open_clip's
cosine schedule with linear warm-up (per step), bf16 autocast on GPU, DDP from torchrun's environment. The
training method (powerclip.methods: model forward, batch needs, loss) is separate from the loop, which only
steps. Everything random is seeded (model init, the data stream of every epoch: powerclip.data), so a run
killed mid-way resumes from ``<work-dir>/resume/latest.pt`` to the same weights as an uninterrupted one.
See docs/formats.md ("Checkpoints") for what the files hold.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from powerclip.train_params import NOT_IN_FINGERPRINT, parse_args

log = logging.getLogger(__name__)

# Columns of metrics.csv before and after the method's own (TrainingMethod.metric_names).
METRICS_HEAD = ("step", "epoch", "lr", "loss")
METRICS_TAIL = ("logit_scale", "samples_per_s", "data_s", "batch_s")


def run_fingerprint(args, world_size: int) -> dict:
    """What a resume checkpoint must match: every option that changes what is trained, and the world size."""
    return {**{k: v for k, v in vars(args).items() if k not in NOT_IN_FINGERPRINT}, "world_size": world_size}


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """open_clip_train's rule: no weight decay on gains, biases, embeddings' scales and logit_scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


def write_metrics(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    from powerclip.shards import atomic_output

    with atomic_output(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class Resume:
    """The resumable state of a run in ``<work-dir>/resume/latest.pt`` (outside Snakemake's outputs, which
    it deletes when a job fails): step, weights, optimizer state, metrics rows so far, and the fingerprint
    of the settings, and the random number generators' states. Plain tensors and containers only, read with
    ``weights_only=True``."""

    path: Path
    fingerprint: dict
    step: int = 0
    rows: list[dict] = field(default_factory=list)

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not self.path.exists():
            return
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise RuntimeError(
                f"{self.path}: cannot be read as a resume checkpoint of plain tensors and containers ({exc}); "
                "delete it to start the run afresh"
            ) from exc
        if state.get("fingerprint") != self.fingerprint:
            changed = sorted(k for k in self.fingerprint if state.get("fingerprint", {}).get(k) != self.fingerprint[k])
            log.warning("ignoring %s: it was written with other settings (%s); starting afresh", self.path, changed)
            return
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])  # random draws in the step (e.g. FLIP's patch dropout) continue as they were
        if torch.cuda.is_available() and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.rows = state["step"], list(state["metrics"])
        log.info("resumed from %s at step %d", self.path, self.step)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rows: list[dict]) -> None:
        from powerclip.shards import atomic_output

        # The rows travel inside the checkpoint: a kill between writing it and the CSV loses nothing.
        state = {"step": step, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "fingerprint": self.fingerprint, "metrics": rows, "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}  # fmt: skip
        with atomic_output(self.path) as tmp:
            torch.save(state, tmp)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)  # the final checkpoint supersedes it (and it holds optimizer state)


def shard_specs(args) -> list:
    from powerclip.data import ShardSpec
    from powerclip.datasets import expand_braces

    specs = []
    for raw in expand_braces(args.train_data):
        name = Path(raw).name
        specs.append(
            ShardSpec(
                raw,
                str(Path(args.phrases_dir) / name) if args.phrases_dir else None,
                str(Path(args.regions_dir) / name) if args.regions_dir else None,
                str(Path(args.recaptions_dir) / name) if args.recaptions_dir else None,
            )
        )
    missing = [p for s in specs for p in (s.raw, s.phrases, s.regions, s.recaptions) if p and not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"training shards missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return specs


@dataclass
class Step:
    """Where the loop is: the global step and what it needs to log and save."""

    step: int
    total: int
    per_epoch: int
    global_batch: int


def train_one_epoch(
    method: torch.nn.Module,
    loader: Iterator[dict],
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: Step,
    device: str,
    autocast,
    on_step,
) -> None:
    """Step through the rest of the current epoch; ``on_step(state, epoch, lr, out, data_s, batch_s)``
    after each step (metrics, progress, resumable checkpoints)."""
    from powerclip.data import normalize_images
    from powerclip.model import unwrap_model

    model = unwrap_model(method)
    epoch = state.step // state.per_epoch
    end = time.perf_counter()
    while state.step < (epoch + 1) * state.per_epoch:
        batch = next(loader)
        data_s = time.perf_counter() - end
        lr = scheduler(state.step)
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if batch["image"].dtype == torch.uint8:  # DataConfig.uint8_images: normalised here, on the device
            batch["image"] = normalize_images(batch["image"])
        getattr(method, "module", method).set_progress(state.step, state.total)  # DDP wraps the method
        with autocast:
            out = method(batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        with torch.no_grad():  # as open_clip: keep the temperature within [1, 100]
            model.logit_scale.clamp_(0, math.log(100))
        state.step += 1
        batch_s = time.perf_counter() - end
        end = time.perf_counter()
        on_step(state, epoch, lr, out, data_s, batch_s)


def _format(value) -> str:
    """A metric for the CSV: counts as integers, losses with 6 decimals."""
    if torch.is_tensor(value) and not value.is_floating_point():
        return str(int(value))
    return f"{float(value.detach() if torch.is_tensor(value) else value):.6f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    from open_clip_train.distributed import world_info_from_env
    from open_clip_train.scheduler import cosine_lr
    from tqdm import tqdm

    from powerclip.data import DataConfig, make_loader
    from powerclip.methods import method_class
    from powerclip.model import save_checkpoint

    local_rank, rank, world_size = world_info_from_env()
    device = args.device
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if world_size > 1:
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    master = rank == 0
    work = Path(args.work_dir)

    method_cls = method_class(args.method)
    model = method_cls.build_model(args).to(device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    method = method_cls.from_args(model, args, rank=rank, world_size=world_size)
    optimizer = torch.optim.AdamW(
        param_groups(model, args.wd), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
        fused=True if device.startswith("cuda") else None,  # one kernel for all parameters on a GPU
    )  # fmt: skip
    global_batch = args.batch_size * world_size
    per_epoch = args.samples_per_epoch // global_batch
    if per_epoch < 1:
        raise ValueError(f"--samples-per-epoch {args.samples_per_epoch} is smaller than the global batch {global_batch}")
    state = Step(step=0, total=per_epoch * args.epochs, per_epoch=per_epoch, global_batch=global_batch)
    scheduler = cosine_lr(optimizer, args.lr, args.warmup, state.total)
    resume = Resume(work / "resume" / "latest.pt", run_fingerprint(args, world_size))
    resume.load(model, optimizer)
    state.step, rows = resume.step, resume.rows if master else []
    columns = (*METRICS_HEAD, *method.metric_names, *METRICS_TAIL)
    metrics_path = work / "metrics.csv"

    train_method = method
    if world_size > 1:
        train_method = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device] if device.startswith("cuda") else None
        )
    specs = shard_specs(args)
    image_size = model.visual.image_size
    data_cfg = DataConfig(
        image_size=image_size[0] if isinstance(image_size, (tuple, list)) else image_size,
        patch_size=model.visual.patch_size[0] if isinstance(model.visual.patch_size, (tuple, list)) else model.visual.patch_size,
        context_length=getattr(model, "context_length", 77),
        topk=args.sam_regions_topk,
        topk_random=args.sam_regions_topk_random,
        max_phrases=args.max_phrases,
        use_parse_phrases=args.use_parse_phrases,
        use_regions=method.uses_regions,
        caption_views=getattr(method, "caption_views", None),  # clips: recaptions, sub-captions, targets
        uint8_images=True,  # normalised on the device by train_one_epoch
        shuffle_buffer=args.shuffle_buffer,
        seed=args.seed,
    )
    if method.uses_regions:
        from powerclip.data import check_sidecar_grid

        check_sidecar_grid(specs, data_cfg)
    writer = None
    if args.tensorboard and master:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(work / "tensorboard"))
    cuda_bf16 = precision == "bf16" and device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda_bf16 else torch.autocast("cpu", enabled=False)
    log.info(
        "training %s (%s) on %s (%s, world size %d): %d steps (%d epochs x %d), global batch %d, lambda %s",
        args.model, args.method, device, precision, world_size, state.total, args.epochs, per_epoch, global_batch,
        args.sam_loss_ratio,
    )  # fmt: skip
    bar = tqdm(total=state.total, initial=state.step, disable=not master, desc="train", mininterval=5)

    def on_step(state: Step, epoch: int, lr: float, out: dict, data_s: float, batch_s: float) -> None:
        bar.update(1)
        if master and (state.step % args.log_every == 0 or state.step == state.total):
            row = {"step": state.step, "epoch": epoch, "lr": f"{lr:.6g}", "data_s": f"{data_s:.4f}",
                   "batch_s": f"{batch_s:.4f}", "samples_per_s": f"{state.global_batch / batch_s:.1f}",
                   "logit_scale": f"{out['logit_scale'].item():.4f}"}  # fmt: skip
            row.update({name: _format(out[name]) for name in ("loss", *method.metric_names)})
            rows.append(row)
            bar.set_postfix(loss=row["loss"], lr=row["lr"])
            if writer is not None:
                for key in ("loss", *method.metric_names, "lr", "logit_scale", "samples_per_s"):
                    writer.add_scalar(f"train/{key}", float(row[key]), state.step)
        if state.step % args.save_every == 0 and state.step < state.total:
            if master:
                resume.save(state.step, model, optimizer, rows)
                write_metrics(metrics_path, rows, columns)
            if world_size > 1:
                torch.distributed.barrier()

    method.train()
    while state.step < state.total:
        epoch = state.step // per_epoch
        loader = iter(
            make_loader(specs, data_cfg, args.batch_size, epoch=epoch, rank=rank, workers=args.workers,
                        pin_memory=device.startswith("cuda"))
        )  # fmt: skip
        for _ in range(state.step - epoch * per_epoch):  # resume mid-epoch: skip what was consumed
            next(loader)
        train_one_epoch(train_method, loader, optimizer, scheduler, state, device, autocast, on_step)
    bar.close()
    summary = {"steps": state.step, "epochs": args.epochs, "global_batch": global_batch, "world_size": world_size}
    if master:
        write_metrics(metrics_path, rows, columns)
        save_checkpoint(args.checkpoint, model, training={**summary, "args": vars(args)})
        if args.metrics:
            write_metrics(Path(args.metrics), rows, columns)
        if writer is not None:
            writer.close()
        resume.clear()
        log.info("wrote %s after %d steps", args.checkpoint, state.step)
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def launch(argv: list[str], gpus: int, log=None) -> dict | None:
    """Train with ``argv``: in this process on the CPU (``gpus == 0``), else one ``torchrun --standalone``
    with a rank per GPU (its output goes to ``log``, an open file). Arguments are passed as a list, never
    through a shell, so paths with spaces are safe."""
    if gpus == 0:
        return main(argv)
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc-per-node={gpus}", "-m", "powerclip.train", *argv]  # fmt: skip
    log_stream = log if log is not None else sys.stderr
    subprocess.run(command, env=env, stdout=log_stream, stderr=subprocess.STDOUT, check=True)
    return None


if __name__ == "__main__":
    import sys

    from powerclip.logs import record_imports

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    record_imports("train")
    main(sys.argv[1:])
