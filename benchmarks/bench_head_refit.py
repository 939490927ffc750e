"""The classifier's re-fit on the public slice (`head-refit`), measured on a finished run's model (issue 12 item 3).

    .venv/bin/python benchmarks/bench_head_refit.py --run RUN_DIR --alpha 0.1 --seed 43 --out results/x.json

Loads RUN_DIR/model.pt (a `bench_fed_accuracy.py` or `fer-sim` run on FER2013 with public-fraction 0.2: the model
the run delivered, the server's average over rounds where it had one), re-fits its classifier with the product's
function (client/refit.py refit_classifier, as server/head_refit.py calls it) at each --l2, and scores each model on
the sites' held-out local splits (carved from train: the validation the l2 is chosen on) and on PublicTest, with the
recipe's flip averaging. The re-fit is deterministic, so a run with `head-refit` on delivers exactly the model this
script scores for its l2. --alpha and --seed must be the run's: they rebuild its sites' validation splits.
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from client import refit, task  # noqa: E402
from client.config import RunSettings  # noqa: E402
from client.data.preprocess import FERTorchDataset  # noqa: E402
from client.node_data import cached_dataset, node_data_from_indices  # noqa: E402
from models import create_model  # noqa: E402
from server.public_pretrain import public_training_data  # noqa: E402
from simulation.federation import federation_plan  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--run", type=Path, required=True, help="a finished run directory (its model.pt is re-fitted)")
p.add_argument("--alpha", type=float, required=True, help="the run's Dirichlet alpha (rebuilds its validation)")
p.add_argument("--seed", type=int, required=True, help="the run's seed")
p.add_argument("--model", default="cnn_am_deep")
p.add_argument("--public-fraction", type=float, default=0.2)
p.add_argument("--l2", default="0,0.0001,0.001,0.01", help="comma list of head-refit-l2 values")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013"))
p.add_argument("--out", type=Path, required=True)
a = p.parse_args()
torch.set_num_threads(a.threads)
settings = RunSettings(dataset=f"fer2013={a.data}", seed=a.seed, num_clients=10, min_clients=10, partition="dirichlet",
                       alpha=a.alpha, model=a.model, public_fraction=a.public_fraction)
data = cached_dataset(settings.dataset, settings.image_size, settings.seed)
sites = [node_data_from_indices(data, plan.indices, client_id=plan.client_id, test_fraction=settings.local_test_fraction,
                                seed=settings.seed + i) for i, plan in enumerate(federation_plan(settings))]
splits = {"val": (np.concatenate([s.test_images for s in sites]), np.concatenate([s.test_labels for s in sites])),
          "publictest": (data.splits["test"].images, data.splits["test"].labels)}
public_images, public_labels, _ = public_training_data(settings)
trained = create_model(a.model, dp=True)
trained.load_state_dict(torch.load(a.run / "model.pt", weights_only=True))


def scores(model: torch.nn.Module) -> dict:
    return {name: task.evaluate(model, DataLoader(FERTorchDataset(x, y), batch_size=256), flip_tta=True).accuracy
            for name, (x, y) in splits.items()}


res = {"args": {k: str(v) for k, v in vars(a).items()}, "public_faces": int(len(public_labels)),
       "as_trained": scores(trained), "refit": {}}
print("as trained", res["as_trained"], flush=True)
for l2 in (float(v) for v in a.l2.split(",")):
    model, started = copy.deepcopy(trained), time.perf_counter()
    fit = refit.refit_classifier(model, public_images, public_labels, l2=l2)
    seconds = round(time.perf_counter() - started, 1)  # the embedding of the public faces and the fit
    res["refit"][str(l2)] = {**scores(model), "public_loss_before": fit.loss_before, "public_loss_after": fit.loss_after,
                             "seconds": seconds}
    print(f"l2 {l2:g}", res["refit"][str(l2)], flush=True)
a.out.parent.mkdir(parents=True, exist_ok=True)
a.out.write_text(json.dumps(res, indent=1) + "\n")
