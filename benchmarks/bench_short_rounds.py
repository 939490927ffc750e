"""Shorter rounds at the same passes, screened Flower-free (issue 12 item 3; what chose `local-splits`).

    .venv/bin/python benchmarks/bench_short_rounds.py --splits 8 --momentum 0.9 --out results/x.json

FedAvg in one process over the sites `fer-sim run` builds (10 sites, Dirichlet label skew, CNN-AM deep, its
recipe with the schedule over the rounds): each round every site trains 1/splits of an epoch, the next slice of
its own seeded sequence of epochs (so every face is seen exactly once a pass), and the server takes an SGD step
along the averaged update with momentum (FedAvgM when momentum > 0), or FedAdam / FedYogi's (--server-opt); the
sites may add FedProx's term (--proximal-mu). Scored every --eval-every rounds on the sites' held-out local splits
(carved from train: the validation the settings were chosen on), and on FER2013 PublicTest once, at the end. ~5
minutes a run on 2 cores. `bench_fed_accuracy.py --set local_splits=S` measures the product path (Flower, the
server's evaluation).
"""
import argparse, json, sys, time
from pathlib import Path
import numpy as np, torch
from torch.utils.data import DataLoader
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from client import task  # noqa: E402
from client.config import RunSettings  # noqa: E402
from client.node_data import cached_dataset, node_data_from_indices  # noqa: E402
from models import create_model  # noqa: E402
from models.layers import group_norm  # noqa: E402
from simulation.federation import federation_plan  # noqa: E402
from bench_fedbn import accuracy  # noqa: E402  (benchmarks/ is the script's own folder on sys.path)

p = argparse.ArgumentParser()
p.add_argument("--passes", type=int, default=10)
p.add_argument("--splits", type=int, default=1, help="a round is 1/splits of an epoch at every site")
p.add_argument("--server-lr", type=float, default=1.0)
p.add_argument("--momentum", type=float, default=0.0)
p.add_argument("--server-opt", choices=("sgd", "adam", "yogi"), default="sgd",
               help="the server's step: SGD with --momentum (FedAvg / FedAvgM), or FedAdam / FedYogi at rate "
               "--server-lr with beta1 = --momentum, as Flower's strategies take it (server/strategies.py)")
p.add_argument("--tau", type=float, default=1e-3, help="FedAdam / FedYogi's adaptivity floor (Reddi et al. 2021)")
p.add_argument("--beta2", type=float, default=0.99, help="FedAdam / FedYogi's second-moment decay")
p.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx: sites add mu/2 |w - w_round|^2")
p.add_argument("--alpha", type=float, default=0.5)
p.add_argument("--eval-every", type=int, default=5)
p.add_argument("--lr", type=float, default=0.0, help="peak local learning rate (0 = the recipe's)")
p.add_argument("--public-fraction", type=float, default=0.0,
               help="start from the server's public pretraining on this stratified slice of train (server/public_pretrain.py)")
p.add_argument("--public-epochs", type=int, default=10)
p.add_argument("--ema", default="0", help="score the server's average over rounds at this decay (server/ema.py); a "
               "comma list scores one average per decay (one training path), PublicTest for the best on validation")
p.add_argument("--keep-momentum", action="store_true",
               help="each site keeps its optimiser's momentum from its last round instead of restarting it")
p.add_argument("--class-balance", default="recipe", help="the recipe's class_balance, e.g. logit-adjust")
p.add_argument("--label-prior", default="public", help="logit-adjust's target mix: public | uniform | n0,...,n6")
p.add_argument("--server-learning", action="store_true",
               help="after each aggregation the server trains 1/splits of an epoch on the public slice (server-learning)")
p.add_argument("--server-weight", type=float, default=1.0,
               help="keep this share of the server's step: agg + w * (trained - agg)")
p.add_argument("--ntd-beta", type=float, default=0.0,
               help="sites add this weight of not-true distillation towards the round's global model (FedNTD)")
p.add_argument("--ntd-tau", type=float, default=3.0)
p.add_argument("--batch-size", type=int, default=32, help="the sites' local batch (run key batch-size)")
p.add_argument("--seed", type=int, default=42, help="the run's seed: partition, round 0, public slice, every stream")
p.add_argument("--threads", type=int, default=2, help="torch threads (1 lets two screens share the 2 cores)")
p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013"))
p.add_argument("--out", required=True)
a = p.parse_args()
torch.set_num_threads(a.threads)
settings = RunSettings(dataset=f"fer2013={a.data}", seed=a.seed, num_clients=10, min_clients=10,
                       partition="dirichlet", alpha=a.alpha, model="cnn_am_deep", num_server_rounds=10, local_epochs=1,
                       batch_size=a.batch_size, lr=a.lr, class_balance=a.class_balance, label_prior=a.label_prior,
                       public_fraction=a.public_fraction, public_epochs=a.public_epochs)
data = cached_dataset(settings.dataset, settings.image_size, settings.seed)
sites = [node_data_from_indices(data, plan.indices, client_id=plan.client_id, test_fraction=settings.local_test_fraction,
                                seed=settings.seed + i) for i, plan in enumerate(federation_plan(settings))]
bs = settings.batch_size
epoch_steps = [max(1, -(-len(s.train_labels) // bs)) for s in sites]
mean_epoch = int(np.mean(epoch_steps))
rounds = a.passes * a.splits
S = mean_epoch / a.splits
print(f"steps/epoch per site {epoch_steps}; splits={a.splits}; rounds={rounds}", flush=True)
recipe = settings.recipe()
torch.manual_seed(settings.seed)
g = create_model(settings.model, norm_layer=group_norm)
if a.public_fraction > 0:  # the product's round 0: the seeded model, then the public pretraining
    from client import wire
    from server.server_app import initial_weights
    wire.set_weights(g, initial_weights(settings.replace(lr=0.0, batch_size=32)))  # --lr, --batch-size: the sites only
    h0, n0 = accuracy(g, data.splits["test"].images, data.splits["test"].labels, flip_tta=recipe.flip_tta)
    print(f"round 0 on PublicTest: {h0 / n0:.4f}", flush=True)  # where each --seed starts: the draws differ here too
gstate = {k: v.clone() for k, v in g.state_dict().items()}
mom = {k: torch.zeros_like(v) for k, v in gstate.items() if v.is_floating_point()}
second = {k: torch.zeros_like(m) for k, m in mom.items()}  # FedAdam / FedYogi's v_t
from server.ema import ParameterEMA  # noqa: E402
decays = [float(d) for d in a.ema.split(",") if float(d) > 0]
emas = {d: ParameterEMA(decay=d, weights=[v.numpy() for v in gstate.values()]) for d in decays}


def scored_state(decay=None):
    """What the server evaluates: the global model, or with --ema its average over rounds at `decay`."""
    return gstate if decay is None else {k: torch.from_numpy(w) for k, w in zip(gstate, emas[decay].weights)}

def batches(i, r):
    # site i's share of round r: steps [per*(r-1)/splits, per*r/splits) of its stream of seeded epochs
    n = len(sites[i].train_labels); per = epoch_steps[i]
    out = []
    for step in range(per * (r - 1) // a.splits, per * r // a.splits):
        e, b = divmod(step, per)
        perm = np.random.default_rng([settings.seed, i, e]).permutation(n)
        out.append(perm[b * bs:(b + 1) * bs].tolist())
    return out

from server.public_pretrain import target_label_prior  # noqa: E402
prior = target_label_prior(settings)  # what the server sends the sites in the fit config (logit-adjust only)
if a.server_learning:  # the public slice the server pretrained on, kept for its step after each aggregation
    from server.public_pretrain import public_split  # noqa: E402
    pub = public_split(settings, settings.dataset).public
    pub_images, pub_labels = data.splits["train"].images[pub], data.splits["train"].labels[pub]
    pub_steps = max(1, -(-len(pub_labels) // bs))


def server_batches(r):
    # the server's share of round r over its own stream of seeded public epochs, as a site's (batches above)
    out = []
    for step in range(pub_steps * (r - 1) // a.splits, pub_steps * r // a.splits):
        e, b = divmod(step, pub_steps)
        perm = np.random.default_rng([settings.seed, 999, e]).permutation(len(pub_labels))
        out.append(perm[b * bs:(b + 1) * bs].tolist())
    return out


# --keep-momentum: each site's momentum from its last round, carried as the product's client does
carries = [task.MomentumCarry() for _ in sites]
curve, t0 = [], time.perf_counter()
for r in range(1, rounds + 1):
    states, weights = [], []
    teacher = None
    if a.ntd_beta > 0:  # the global model the round starts from, frozen
        teacher = create_model(settings.model, norm_layer=group_norm); teacher.load_state_dict(gstate)
        teacher.eval().requires_grad_(False)
    for i, s in enumerate(sites):
        m = create_model(settings.model, norm_layer=group_norm); m.load_state_dict(gstate)
        local = task.prepare_training(m, s.train_images, s.train_labels, recipe=recipe, batch_size=bs,
                                      seed=settings.seed * 1000 + i * 31 + r, server_round=r, num_rounds=rounds,
                                      label_prior=prior)
        loader = DataLoader(local.loader.dataset, batch_sampler=batches(i, r))
        if a.keep_momentum:
            carries[i].load_into(local.optimizer)
        reference = [q.detach().clone() for q in m.parameters()] if a.proximal_mu > 0 else None
        task.train(m, loader, epochs=1, optimizer=local.optimizer, criterion=local.criterion, lr_at=local.lr_at,
                   teacher=teacher, distill_beta=a.ntd_beta, distill_tau=a.ntd_tau, proximal_mu=a.proximal_mu,
                   reference=reference)
        if a.keep_momentum:
            carries[i].save_from(local.optimizer)
        states.append(m.state_dict()); weights.append(len(s.train_labels))
    tot = sum(weights)
    # as Flower 1.41 steps: FedAdam's rate is bias-corrected, eta * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)); FedYogi's not
    correction = (1 - a.beta2 ** (r + 1)) ** 0.5 / (1 - a.momentum ** (r + 1))
    eta_t = a.server_lr * (correction if a.server_opt == "adam" else 1.0)
    abs_delta = []
    for k in gstate:
        if gstate[k].is_floating_point():
            avg = sum(st[k] * (w / tot) for st, w in zip(states, weights))
            delta = avg - gstate[k]
            abs_delta.append(delta.abs().flatten())
            if a.server_opt == "sgd":
                mom[k] = a.momentum * mom[k] + delta
                gstate[k] = gstate[k] + a.server_lr * mom[k]
                continue
            mom[k] = a.momentum * mom[k] + (1 - a.momentum) * delta
            d2 = delta * delta
            if a.server_opt == "adam":
                second[k] = a.beta2 * second[k] + (1 - a.beta2) * d2
            else:  # Yogi: v grows or shrinks by (1 - b2) d^2 towards d^2, additively
                second[k] = second[k] - (1 - a.beta2) * d2 * torch.sign(second[k] - d2)
            gstate[k] = gstate[k] + eta_t * mom[k] / (second[k].sqrt() + a.tau)
        else:
            gstate[k] = states[0][k]
    abs_delta = torch.cat(abs_delta)
    if a.server_learning:
        m = create_model(settings.model, norm_layer=group_norm); m.load_state_dict(gstate)
        local = task.prepare_training(m, pub_images, pub_labels, recipe=recipe, batch_size=bs,
                                      seed=settings.seed * 1000 + 999 + r, server_round=r, num_rounds=rounds,
                                      label_prior=prior)
        task.train(m, DataLoader(local.loader.dataset, batch_sampler=server_batches(r)), epochs=1,
                   optimizer=local.optimizer, criterion=local.criterion, lr_at=local.lr_at)
        gstate = {k: gstate[k] + a.server_weight * (v.detach() - gstate[k]) if v.is_floating_point() else v.clone()
                  for k, v in m.state_dict().items()}
    for e in emas.values():
        e.update([v.numpy() for v in gstate.values()])
    if r % a.eval_every == 0 or r == rounds:
        point = {"round": r, "passes": round(r / a.splits, 2),  # the averaged update's size, to set FedAdam's rate
                 "delta_median": float(abs_delta.median()), "delta_rms": float(abs_delta.pow(2).mean().sqrt())}
        for d in (decays or [None]):
            m = create_model(settings.model, norm_layer=group_norm); m.load_state_dict(scored_state(d))
            c = n = 0
            for s in sites:
                h, k_ = accuracy(m, s.test_images, s.test_labels, flip_tta=recipe.flip_tta); c += h; n += k_
            point["val" if d == (decays or [None])[0] else f"val_ema{d}"] = c / n
        point["seconds"] = round(time.perf_counter() - t0, 1)
        curve.append(point)
        print(curve[-1], flush=True)
final = curve[-1]
chosen = max(decays or [None], key=lambda d: final["val" if d == (decays or [None])[0] else f"val_ema{d}"])
m = create_model(settings.model, norm_layer=group_norm); m.load_state_dict(scored_state(chosen))
h, n = accuracy(m, data.splits["test"].images, data.splits["test"].labels, flip_tta=recipe.flip_tta)
res = {"args": vars(a), "S": S, "rounds": rounds, "curve": curve, "publictest": h / n,
       "publictest_round0": h0 / n0 if a.public_fraction > 0 else None,
       "publictest_scored": f"ema {chosen}" if chosen else "global model"}
print(res["publictest"], flush=True)
Path(a.out).write_text(json.dumps(res, indent=1))
