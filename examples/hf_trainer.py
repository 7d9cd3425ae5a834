"""Track the tiny subspace in a Hugging Face ``Trainer`` run (``pip install
tinysubspace[transformers]``): a tiny BERT built from a config (no download) classifies whether
a token sequence holds more 1s than 2s; batches are dicts with ``labels`` and the model's own
loss is measured.

    python examples/hf_trainer.py --steps 30 --out runs/hf
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import tinysubspace as ts
from tinysubspace.integrations.transformers import SubspaceCallback


class Sequences(torch.utils.data.Dataset):
    """``n`` random sequences of tokens 1..4; label: more 1s than 2s."""

    def __init__(self, n: int = 96, length: int = 8, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 5, (n, length), generator=gen)
        self.labels = ((self.ids == 1).sum(1) > (self.ids == 2).sum(1)).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="runs/hf")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                        attn_implementation="eager")
    model = BertForSequenceClassification(config)
    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingArguments(output_dir=scratch, max_steps=args.steps,
                                     per_device_train_batch_size=16, learning_rate=1e-3,
                                     report_to=[], save_strategy="no", logging_strategy="no",
                                     use_cpu=True, disable_tqdm=True, seed=0)
        callback = SubspaceCallback(k=3, schedule=10, out=args.out, anchors=(0,),
                                    dtype=torch.float64)
        Trainer(model=model, args=training, train_dataset=Sequences(),
                callbacks=[callback]).train()

    run = ts.load_run(args.out)
    print(run.metrics[["step", "train/loss", "train/accuracy", "hessian/f_top",
                       "hessian/eig_1"]].to_string(index=False))


if __name__ == "__main__":
    main()
