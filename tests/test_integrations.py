"""The Lightning and Hugging Face adapters with the real packages (CPU, tiny models): the rows
they record are the tracker's at the same parameters, the run folder is the CLI's, and training
with the callback ends bit-identical to training without it."""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, TensorDataset

import tinysubspace as ts

N, D, C = 48, 4, 3


def _data():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=gen)
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()


# ---------------------------------------------------------------------------- Lightning
@pytest.fixture(scope="module")
def pl():
    return pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is not installed "
                               "(tinysubspace[lightning])")


def _lightning_run(pl, callback, steps=7):
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(D, 6), torch.nn.Tanh(),
                                           torch.nn.Dropout(0.2), torch.nn.Linear(6, C))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)

    pl.seed_everything(0, verbose=False)
    X, Y = _data()
    loader = DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True)
    module = Module()
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback] if callback else [],
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    return module, initial


@pytest.mark.slow
def test_lightning_callback_records_the_trackers_rows_and_changes_nothing(pl, tmp_path):
    from tinysubspace.integrations.lightning import SubspaceCallback

    callback = SubspaceCallback(F.cross_entropy, k=2, schedule=3, out=tmp_path / "run",
                                anchors=(0,), tol=1e-8, dtype=torch.float64)
    tracked, initial = _lightning_run(pl, callback)
    plain, _ = _lightning_run(pl, None)
    for (name, a), b in zip(plain.state_dict().items(), tracked.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    run = ts.load_run(tmp_path / "run")
    assert run.metrics["step"].tolist() == [0, 3, 6, 7]  # max_steps=7: the final one too
    assert run.status["state"] == "finished"
    fresh, _ = _lightning_run(pl, None, steps=1)  # a module with the initial weights
    fresh.load_state_dict(initial)
    X, Y = _data()
    direct = ts.SubspaceTracker(fresh, F.cross_entropy, (X, Y), k=2, anchors=(), tol=1e-8,
                                dtype=torch.float64)
    row = direct.on_step(0)
    for key in ("train/loss", "train/accuracy", "hessian/eig_1", "hessian/eig_4",
                "hessian/f_top"):
        assert callback.rows[0][key] == pytest.approx(row[key], rel=1e-9, abs=1e-12), key


# --------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("accelerate", reason="accelerate (needed by transformers.Trainer) is "
                        "not installed (tinysubspace[transformers])")
    return pytest.importorskip("transformers", reason="transformers is not installed "
                               "(tinysubspace[transformers])")


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, n=40, length=6):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 5, (n, length), generator=gen)
        self.labels = ((self.ids == 1).sum(1) > (self.ids == 2).sum(1)).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _bert(hf):
    torch.manual_seed(0)
    config = hf.BertConfig(vocab_size=6, hidden_size=8, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=16,
                           max_position_embeddings=8, num_labels=2, attn_implementation="eager")
    return hf.BertForSequenceClassification(config)


def _hf_run(hf, callback, steps=5):
    model = _bert(hf)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as scratch:
        args = hf.TrainingArguments(output_dir=scratch, max_steps=steps,
                                    per_device_train_batch_size=8, learning_rate=1e-2,
                                    report_to=[], save_strategy="no", logging_strategy="no",
                                    use_cpu=True, disable_tqdm=True, seed=0)
        hf.Trainer(model=model, args=args, train_dataset=_Sequences(),
                   callbacks=[callback] if callback else []).train()
    return model, initial


@pytest.mark.slow
def test_transformers_callback_measures_the_models_own_loss_and_changes_nothing(hf, tmp_path):
    from tinysubspace.integrations.transformers import SubspaceCallback

    callback = SubspaceCallback(k=2, schedule=2, out=tmp_path / "run", anchors=(0,),
                                dtype=torch.float64, tol=1e-8)
    tracked, initial = _hf_run(hf, callback)
    plain, _ = _hf_run(hf, None)
    for (name, a), b in zip(plain.state_dict().items(), tracked.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    run = ts.load_run(tmp_path / "run")
    assert run.metrics["step"].tolist() == [0, 2, 4, 5]
    fresh = _bert(hf)
    fresh.load_state_dict(initial)
    fresh.eval()
    data = _Sequences()
    batches = [{"input_ids": data.ids[i:i + 10], "labels": data.labels[i:i + 10]}
               for i in range(0, len(data), 10)]
    with torch.no_grad():  # the mean of the model's own loss over the data set, by hand
        loss = sum(float(fresh.double()(**b).loss) * 10 for b in batches) / len(data)
    assert callback.rows[0]["train/loss"] == pytest.approx(loss, rel=1e-10)
    fresh = _bert(hf)
    fresh.load_state_dict(initial)
    op = ts.HessianOperator(fresh, lambda out, y: out.loss, batches, dtype=torch.float64)
    eig = ts.top_eigenpairs(op, 4, tol=1e-10)
    assert callback.rows[0]["hessian/eig_1"] == pytest.approx(float(eig.values[0]), rel=1e-6)
    assert callback.rows[0]["hessian/eig_4"] == pytest.approx(float(eig.values[3]), rel=1e-6)
    assert 0 <= callback.rows[0]["train/accuracy"] <= 1


def test_lightning_callback_tracks_the_trainers_optimizer(pl, tmp_path):
    from tinysubspace.integrations.lightning import SubspaceCallback

    callback = SubspaceCallback(F.cross_entropy, k=2, schedule=2, anchors=(), tol=1e-8,
                                dtype=torch.float64, optimizer="trainer")
    _lightning_run(pl, callback, steps=5)
    assert callback.tracker.engine.group("sharpness").optimizer is not None
    for row in callback.rows:  # SGD, lr 0.3, momentum 0.9: (2 + 2β) / η
        assert row["sharpness/threshold"] == pytest.approx(3.8 / 0.3, rel=1e-12)
        assert row["sharpness/ratio"] == pytest.approx(row["hessian/eig_1"] * 0.3 / 3.8,
                                                       rel=1e-12)
    assert 0 <= callback.rows[-1]["preconditioned/update_share"] <= 1


@pytest.mark.slow
def test_transformers_callback_tracks_the_trainers_adamw(hf, tmp_path):
    from tinysubspace.integrations.transformers import SubspaceCallback

    callback = SubspaceCallback(k=1, schedule=1, anchors=(), dtype=torch.float64, tol=1e-6,
                                optimizer="trainer")
    _hf_run(hf, callback, steps=3)
    assert type(callback.tracker.engine.group("sharpness").optimizer).__name__ == "AdamW"
    rows = callback.rows
    assert rows[0]["sharpness/threshold"] == pytest.approx(38 / 1e-2, rel=1e-9)
    assert math.isnan(rows[0]["preconditioned/eig_1"])  # before AdamW's first step
    assert rows[2]["preconditioned/eig_1"] > 0 and 0 <= rows[2]["preconditioned/update_share"] <= 1
