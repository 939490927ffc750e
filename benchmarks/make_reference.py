"""Package a model trained by bench_accuracy.py as shipped reference weights (models/reference.py).

    .venv/bin/python benchmarks/bench_accuracy.py --model fer_vgg --norm gn --minutes 55 \\
        --save-model /tmp/fer_vgg --out benchmarks/results/bench_accuracy_fer_vgg.json
    .venv/bin/python benchmarks/make_reference.py --saved /tmp/fer_vgg \\
        --bench benchmarks/results/bench_accuracy_fer_vgg.json --name fer_vgg@fer2013

Writes models/weights/NAME.safetensors and NAME.json (the ModelCard plus a "reference" block whose every figure is
copied from the benchmark's JSON: recipe, epochs, minutes, validation and PublicTest scores per class). The
architecture's default options are required. The GroupNorm build (`--norm gn`) is the build a federation trains,
so its weights can start one (`--init-model NAME`); a BatchNorm build (`--norm bn`) is for inference only (the
bedside default when it scores best) and its name must say so: `MODEL@DATASET-bn` (`fer_vgg@fer2013-bn`), which
`--init-model` refuses. `--as-model` files the weights under a registered variant with the same layers (a
`--cfg depth=5` CNN-AM run as `cnn_am_deep`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.data.labels import EMOTIONS  # noqa: E402
from models import create_model  # noqa: E402
from models.card import ModelCard  # noqa: E402
from models.files import load_model  # noqa: E402
from models.reference import (  # noqa: E402
    BN_SUFFIX,
    FER2013_TERMS,
    SAFETENSORS_FORMAT,
    WEIGHTS_DIR,
    WEIGHTS_SUFFIX,
    ReferenceInfo,
    SplitScore,
    is_reference_name,
)
from privacy.atomic import atomic_write  # noqa: E402

INPUT_FORMAT = ("one 48x48 grayscale face (1, 48, 48), each image standardised to zero mean and unit variance "
                "(client.data.preprocess), logits in the order of `classes`")


def split_score(block: dict) -> SplitScore:
    """A bench_accuracy.py score block ({"plain": ..., "flip_tta": ...}) as a SplitScore."""
    plain, flip = block["plain"], block["flip_tta"]
    return SplitScore(accuracy=plain["accuracy"], macro_f1=plain["macro_f1"], flip_accuracy=flip["accuracy"],
                      flip_macro_f1=flip["macro_f1"], per_class_recall=flip["per_class_recall"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saved", type=Path, required=True, help="bench_accuracy.py --save-model DIR")
    parser.add_argument("--bench", type=Path, required=True, help="bench_accuracy.py's JSON for the same run")
    parser.add_argument("--name", required=True, help="MODEL@DATASET, e.g. fer_vgg@fer2013")
    parser.add_argument("--as-model", default=None, help="file the weights under this registered architecture")
    args = parser.parse_args()
    if not is_reference_name(args.name):
        raise SystemExit(f"--name {args.name!r}: expected MODEL@DATASET (lower case), e.g. fer_vgg@fer2013")
    bench = json.loads(args.bench.read_text())
    state, saved = load_model(args.saved / "model.pt")
    architecture = args.as_model or saved.name
    if bench["model"] != saved.name or bench["norm"] not in ("gn", "bn") or bench.get("quick"):
        raise SystemExit(f"{args.bench}: not a full run of {saved.name} (model {bench['model']}, norm "
                         f"{bench['norm']}, quick {bench.get('quick')})")
    if not args.name.startswith(architecture + "@"):
        raise SystemExit(f"--name {args.name}: must start with the architecture, {architecture}@")
    federated_build = bench["norm"] == "gn"
    if federated_build == args.name.endswith(BN_SUFFIX):
        raise SystemExit(f"--name {args.name}: a {bench['norm']} build's name "
                         f"{'must not end' if federated_build else 'must end'} with {BN_SUFFIX}")
    model = create_model(architecture, dp=federated_build)
    model.load_state_dict(state)  # the weights fit the default build of `architecture` with this norm

    from safetensors.torch import save as save_safetensors

    payload = save_safetensors({key: value.detach().contiguous() for key, value in model.state_dict().items()})
    card = ModelCard(name=architecture, round=0, classes=tuple(EMOTIONS), cfg={"dp": federated_build},
                     sha256=hashlib.sha256(payload).hexdigest(), image_size=48, dataset="fer2013",
                     format=SAFETENSORS_FORMAT)
    threads = bench["threads"]
    info = ReferenceInfo(
        data=(f"FER2013 training split: {bench['train_examples']} faces trained on, {bench['val_examples']} "
              "(a stratified 10 % drawn by the seed) held out for validation; PublicTest scored once, after training"),
        recipe=bench["recipe"], epochs=int(bench["epochs"]), train_minutes=round(bench["train_seconds"] / 60, 1),
        hardware=f"2-core AMD EPYC CPU, {threads} torch thread{'s' if threads > 1 else ''}, no GPU",
        validation=split_score(bench["val"]), public_test=split_score(bench["public_test"]),
        input_format=INPUT_FORMAT, terms=FER2013_TERMS,
        benchmark=(f"benchmarks/bench_accuracy.py --model {bench['model']} --norm {bench['norm']} --threads {threads} "
                   + " ".join(f"--cfg {k}={v}" for k, v in (bench.get("cfg") or {}).items())).strip(),
    )
    WEIGHTS_DIR.mkdir(exist_ok=True)
    weights = WEIGHTS_DIR / f"{args.name}{WEIGHTS_SUFFIX}"
    atomic_write(weights, payload)
    atomic_write(weights.with_suffix(".json"),
                 json.dumps({**card.to_json(), "reference": info.to_json()}, indent=2) + "\n")
    print(f"wrote {weights} ({len(payload) / 1e6:.1f} MB): PublicTest {info.public_test.flip_accuracy:.4f} "
          f"(flip), validation {info.validation.flip_accuracy:.4f}")


if __name__ == "__main__":
    main()
