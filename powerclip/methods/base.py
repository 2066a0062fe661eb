"""The interface of a training method: a module that owns the model, its forward pass and its loss.

``forward(batch) -> {"loss": total, <named scalars>...}``: the loop backpropagates ``loss`` and logs the
method's ``metric_names``; DDP wraps the method object, so the whole forward goes through DDP. The loop
never looks inside (see powerclip.train.train_one_epoch).
"""

from __future__ import annotations

from argparse import Namespace

from torch import Tensor, nn


class TrainingMethod(nn.Module):
    # reads the phrases and regions sidecars (powerclip.data: region_index/cells, phrase_index/tokens)
    uses_regions: bool = False
    # scalars of forward()'s output written to the metrics CSV, besides loss and logit_scale
    metric_names: tuple[str, ...] = ()

    wraps_model = True  # powerclip.model.unwrap_model looks through it to ``self.model``

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def build_model(cls, args: Namespace) -> nn.Module:
        """The model this method trains: the run's open_clip model with the run table's pooling, seeded.
        A method that changes the model (patch dropout, other towers) overrides this."""
        from powerclip.model import create_model

        return create_model(args.model, vision_pool=args.vision_pool, text_pool=args.text_pool, seed=args.seed)

    @classmethod
    def from_args(cls, model: nn.Module, args: Namespace, rank: int = 0, world_size: int = 1) -> TrainingMethod:
        """The method configured from the trainer's arguments (powerclip.train_params)."""
        raise NotImplementedError

    def set_progress(self, step: int, total: int) -> None:
        """Called by the loop before each step (``step`` steps done of ``total``); a method whose forward
        depends on training progress (clip-pgs) overrides it. No-op by default."""

    def forward(self, batch: dict) -> dict[str, Tensor]:
        raise NotImplementedError
