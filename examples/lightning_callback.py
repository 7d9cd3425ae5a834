"""Track the tiny subspace in a PyTorch Lightning run (``pip install tinysubspace[lightning]``).

    python examples/lightning_callback.py --steps 60 --out runs/lightning
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, TensorDataset

import tinysubspace as ts
from tinysubspace.integrations.lightning import SubspaceCallback


class Classifier(pl.LightningModule):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/lightning")
    args = parser.parse_args()

    digits = ts.load_dataset("digits")
    net = ts.build_model("fc", digits.input_shape, digits.num_outputs, widths=(32,), seed=0)
    loader = DataLoader(TensorDataset(digits.inputs, digits.targets), batch_size=64,
                        shuffle=True, generator=torch.Generator().manual_seed(0))
    callback = SubspaceCallback(F.cross_entropy, k=5, schedule=20, out=args.out, anchors=(0,))
    trainer = pl.Trainer(max_steps=args.steps, callbacks=[callback], accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Classifier(net), loader)

    run = ts.load_run(args.out)
    print(run.metrics[["step", "train/loss", "hessian/f_top", "hessian/eig_1"]].to_string(
        index=False))


if __name__ == "__main__":
    main()
