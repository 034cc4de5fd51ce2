"""Train a pyrovae run under Lightning: python lightning_ddp.py OUT DEVICES BATCH METHOD EPOCHS.

Rank 0 saves the method's state to OUT (a torch file) for the test to compare."""

import sys
import warnings

import lightning.pytorch as pl
import torch

from pyrovae.distributed import leave
from pyrovae.experiment import Config, build
from pyrovae.lightning_adapter import PyrovaeModule

out, devices, batch, method, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
warnings.filterwarnings("ignore")
config = Config(dataset="digits", hidden=(16,), latent=3, eval_samples=0, logs="none", lr=0.01, batch_size=batch, method=method, epochs=epochs)
module = PyrovaeModule(build(config))
trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module)
if trainer.global_rank == 0:
    torch.save({"method": module.method.state_dict(), "steps": module.steps, "world_size": trainer.world_size}, out)
leave()  # every rank done before rank 0, which hosts the group's store, exits
