"""Train one run: ``python -m powerclip.train ...`` (CPU) or ``torchrun --standalone --nproc-per-node=N -m
powerclip.train ...`` (GPUs); ``main(argv)`` runs in-process for tests.

The loop follows open_clip_train: AdamW without weight decay on gains/biases/logit scale, open_clip's
cosine schedule with linear warm-up (per step), AMP (bf16) on GPU, optional gradient checkpointing, DDP
from torchrun's environment. Everything that makes a run reproducible is seeded: model init, and the data
stream of every epoch (see powerclip.data). A resumable checkpoint is written every ``--save-every``
steps into ``<work-dir>/resume/latest.pt`` (outside the Snakemake outputs, which Snakemake deletes when a
job fails); a rerun with the same arguments resumes from it, rebuilds the epoch's stream and skips the
batches already consumed, so it ends at the same step with the same weights as an uninterrupted run. The
final checkpoint (model config with its pooling + weights) and the metrics CSV are written atomically.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

METRICS = (
    "step",
    "epoch",
    "lr",
    "loss",
    "contrastive_loss",
    "local_loss",
    "logit_scale",
    "local_skipped_pairs",
    "samples_per_s",
    "data_s",
    "batch_s",
)


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m powerclip.train", description=__doc__.splitlines()[0])
    data = p.add_argument_group("data")
    data.add_argument("--train-data", required=True, help="brace pattern of raw (or combined-format) shards")
    data.add_argument("--phrases-dir", help="directory of the phrases sidecars (<shard>.tar); omit for combined shards")
    data.add_argument("--regions-dir", help="directory of the regions sidecars (<shard>.tar); omit for combined shards")
    data.add_argument("--samples-per-epoch", type=int, required=True, help="samples per epoch (all ranks together)")
    data.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    data.add_argument("--shuffle-buffer", type=int, default=1000)
    out = p.add_argument_group("outputs")
    out.add_argument("--checkpoint", required=True, help="final checkpoint path (written atomically at the end)")
    out.add_argument("--metrics", help="final metrics CSV path (default: <work-dir>/metrics.csv only)")
    out.add_argument("--work-dir", required=True, help="resume checkpoints, running metrics, TensorBoard")
    out.add_argument("--save-every", type=int, default=100, help="steps between resumable checkpoints")
    out.add_argument("--log-every", type=int, default=10, help="steps between metrics rows")
    out.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (<work-dir>/tensorboard)")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="PowerCLIP-Tiny-64-8", help="open_clip model config name")
    model.add_argument("--vision-pool", choices=("avg", "cls"), default="avg")
    model.add_argument("--text-pool", choices=("avg", "argmax"), default="avg")
    model.add_argument("--grad-checkpointing", action="store_true")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=1)
    opt.add_argument("--batch-size", type=int, default=64, help="per rank")
    opt.add_argument("--lr", type=float, default=5e-4)
    opt.add_argument("--wd", type=float, default=0.2)
    opt.add_argument("--beta1", type=float, default=0.9)
    opt.add_argument("--beta2", type=float, default=0.98)
    opt.add_argument("--eps", type=float, default=1e-6)
    opt.add_argument("--warmup", type=int, default=10, help="warm-up steps")
    opt.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--device", default="auto", help="auto, cpu or cuda")
    opt.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    loss = p.add_argument_group("region-phrase loss (METHOD.md)")
    loss.add_argument("--sam-loss-ratio", type=float, default=0.1, help="lambda; 0 = plain CLIP (no regions read)")
    loss.add_argument("--sam-regions-topk", type=int, default=5)
    loss.add_argument("--sam-regions-topk-random", type=str2bool, default=False)
    loss.add_argument("--use-parse-phrases", type=str2bool, default=True)
    loss.add_argument("--softplus-scoring", type=str2bool, default=True)
    loss.add_argument("--softplus-tau", type=float, default=0.001)
    loss.add_argument("--softplus-alpha", type=float, default=0.75)
    loss.add_argument("--max-phrases", type=int, default=16, help="phrases per caption fed to the loss")
    loss.add_argument("--text-chunk", type=int, default=None, help="texts per chunk of the B x B x M x P scores")
    loss.add_argument("--local-loss", action="store_true", help="open_clip's local_loss (DDP)")
    loss.add_argument("--gather-with-grad", action="store_true", help="open_clip's gather_with_grad (DDP)")
    return p.parse_args(argv)


# Arguments that do not change what is trained: a resume checkpoint stays valid when only these differ.
NOT_IN_FINGERPRINT = {"checkpoint", "metrics", "work_dir", "save_every", "log_every", "tensorboard", "device", "threads"}


def run_fingerprint(args, world_size: int) -> dict:
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


def save_atomic(obj, path: Path) -> None:
    from powerclip.shards import atomic_output

    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def write_metrics(path: Path, rows: list[dict]) -> None:
    from powerclip.shards import atomic_output

    with atomic_output(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS)
        writer.writeheader()
        writer.writerows(rows)


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
            )
        )
    missing = [p for s in specs for p in (s.raw, s.phrases, s.regions) if p and not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"training shards missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return specs


def main(argv=None) -> dict:
    args = parse_args(argv)
    from open_clip_train.distributed import world_info_from_env
    from open_clip_train.scheduler import cosine_lr
    from tqdm import tqdm

    from powerclip.data import DataConfig, make_loader
    from powerclip.loss import PowerClipLoss
    from powerclip.model import PowerCLIPFeatures, create_model, gather_mean, save_checkpoint

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
    resume_path = work / "resume" / "latest.pt"

    model = create_model(args.model, vision_pool=args.vision_pool, text_pool=args.text_pool, seed=args.seed).to(device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    optimizer = torch.optim.AdamW(
        param_groups(model, args.wd), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps
    )
    use_regions = args.sam_loss_ratio > 0
    loss_fn = PowerClipLoss(
        sam_loss_ratio=args.sam_loss_ratio,
        topk=args.sam_regions_topk,
        tau=args.softplus_tau,
        alpha=args.softplus_alpha,
        softplus_scoring=args.softplus_scoring,
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        rank=rank,
        world_size=world_size,
        text_chunk=args.text_chunk,
    )
    global_batch = args.batch_size * world_size
    steps_per_epoch = args.samples_per_epoch // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"--samples-per-epoch {args.samples_per_epoch} is smaller than the global batch {global_batch}")
    total_steps = steps_per_epoch * args.epochs
    scheduler = cosine_lr(optimizer, args.lr, args.warmup, total_steps)

    step = 0
    rows: list[dict] = []
    fingerprint = run_fingerprint(args, world_size)
    if resume_path.exists():
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            step = state["step"]
            # The rows travel inside the resume checkpoint: a kill between writing it and the CSV loses nothing.
            rows = list(state.get("metrics", [])) if master else []
            log.info("resumed from %s at step %d of %d", resume_path, step, total_steps)
        else:
            changed = sorted(k for k in fingerprint if state.get("fingerprint", {}).get(k) != fingerprint[k])
            log.warning("ignoring %s: it was written with other settings (%s); starting afresh", resume_path, changed)
    metrics_path = work / "metrics.csv"

    train_model = PowerCLIPFeatures(model)
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device] if device.startswith("cuda") else None
        )
    specs = shard_specs(args)
    data_cfg = DataConfig(
        image_size=image_size,
        context_length=model.context_length if hasattr(model, "context_length") else 77,
        topk=args.sam_regions_topk,
        topk_random=args.sam_regions_topk_random,
        max_phrases=args.max_phrases,
        use_parse_phrases=args.use_parse_phrases,
        use_regions=use_regions,
        shuffle_buffer=args.shuffle_buffer,
        seed=args.seed,
    )
    writer = None
    if args.tensorboard and master:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(work / "tensorboard"))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" and device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    )
    log.info(
        "training %s on %s (%s, world size %d): %d steps (%d epochs x %d), global batch %d, lambda %s",
        args.model, device, precision, world_size, total_steps, args.epochs, steps_per_epoch, global_batch, args.sam_loss_ratio,
    )  # fmt: skip
    bar = tqdm(total=total_steps, initial=step, disable=not master, desc="train", mininterval=5)
    model.train()
    while step < total_steps:
        epoch = step // steps_per_epoch
        loader = iter(make_loader(specs, data_cfg, args.batch_size, epoch=epoch, rank=rank, workers=args.workers))
        for _ in range(step - epoch * steps_per_epoch):  # resume mid-epoch: skip what was consumed
            next(loader)
        end = time.perf_counter()
        for _ in range(step - epoch * steps_per_epoch, steps_per_epoch):
            batch = next(loader)
            data_s = time.perf_counter() - end
            lr = scheduler(step)
            images = batch["image"].to(device, non_blocking=True)
            text = batch["text"].to(device, non_blocking=True)
            with autocast:
                out = train_model(images, text)
                image_features = F.normalize(out["image_features"], dim=-1)
                text_features = F.normalize(out["text_features"], dim=-1)
                extra = {}
                if use_regions:
                    regions, region_mask = gather_mean(
                        out["patch_tokens"], batch["region_index"].to(device), batch["region_cells"].to(device)
                    )
                    phrases, phrase_mask = gather_mean(
                        out["token_states"], batch["phrase_index"].to(device), batch["phrase_tokens"].to(device)
                    )
                    extra = {
                        "region_features": F.normalize(regions, dim=-1),
                        "region_mask": region_mask,
                        "phrase_features": F.normalize(phrases, dim=-1),
                        "phrase_mask": phrase_mask,
                    }
                losses = loss_fn(image_features, text_features, out["logit_scale"], **extra, output_dict=True)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            with torch.no_grad():  # as open_clip: keep the temperature within [1, 100]
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            batch_s = time.perf_counter() - end
            end = time.perf_counter()
            bar.update(1)
            if master and (step % args.log_every == 0 or step == total_steps):
                row = {
                    "step": step,
                    "epoch": epoch,
                    "lr": f"{lr:.6g}",
                    "loss": f"{losses['loss'].item():.6f}",
                    "contrastive_loss": f"{losses['contrastive_loss'].item():.6f}",
                    "local_loss": f"{float(losses['local_loss'].detach()):.6f}",
                    "logit_scale": f"{out['logit_scale'].item():.4f}",
                    "local_skipped_pairs": int(losses["local_skipped_pairs"]),
                    "samples_per_s": f"{global_batch / batch_s:.1f}",
                    "data_s": f"{data_s:.4f}",
                    "batch_s": f"{batch_s:.4f}",
                }
                rows.append(row)
                bar.set_postfix(loss=row["loss"], lr=row["lr"])
                if writer is not None:
                    for key in ("loss", "contrastive_loss", "local_loss", "lr", "logit_scale", "samples_per_s"):
                        writer.add_scalar(f"train/{key}", float(row[key]), step)
            if step % args.save_every == 0 and step < total_steps:
                if master:
                    state = {
                        "step": step,
                        "state_dict": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "fingerprint": fingerprint,
                        "metrics": rows,
                    }
                    save_atomic(state, resume_path)
                    write_metrics(metrics_path, rows)
                if world_size > 1:
                    torch.distributed.barrier()
    bar.close()
    summary = {"steps": step, "epochs": args.epochs, "global_batch": global_batch, "world_size": world_size}
    if master:
        write_metrics(metrics_path, rows)
        save_checkpoint(args.checkpoint, model, training={**summary, "args": vars(args)})
        if args.metrics:
            write_metrics(Path(args.metrics), rows)
        if writer is not None:
            writer.close()
        resume_path.unlink(missing_ok=True)  # the final checkpoint supersedes it (and it holds optimizer state)
        log.info("wrote %s after %d steps", args.checkpoint, step)
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    import sys

    from powerclip.logs import record_imports

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    record_imports("train")
    main(sys.argv[1:])
