"""``python -m kprune.retrain``: train or retrain a detector on a converted dataset.

Examples::

    python -m kprune.retrain --dataset synth --model yolov2 --input-size 256 --width 0.25 --epochs 30
    python -m kprune.retrain --dataset kitti --init yolov2-coco.keras --mode head --epochs 5
    python -m kprune.retrain --dataset kitti --cfg yolov2.cfg --weights yolov2.weights --mode new-head
    python -m kprune.retrain --out runs/kitti-full --resume

The three modes are the three ways the KITTI experiment retrains: ``head`` (only the last conv, the
model's classes kept, dataset classes mapped onto them by name), ``full`` (everything) and
``new-head`` (a new last conv for the dataset's classes).
"""

from __future__ import annotations

import json

import click

from kprune.config import build, read_yaml
from kprune.fileio import json_safe
from kprune.train import DATASETS, DISTRIBUTIONS, MODES, TrainConfig, TrainingError, train

_OPTIONS = ("dataset", "model", "init", "cfg", "weights", "input_size", "width", "mode", "epochs", "batch_size",
            "lr", "distribution", "seed", "out", "multiscale")


def run(values: dict, source: str, resume: bool, quiet: bool) -> dict:
    """Resolve the config (a resumed run starts from the one saved in its folder), train, print."""
    if resume:
        saved = f"{values.get('out') or TrainConfig.out}/config.yaml"
        stored = read_yaml(saved)
        changed = sorted(k for k, v in values.items() if k not in ("epochs", "out") and stored.get(k) != v)
        if changed:
            raise ValueError(f"--resume continues the run as {saved} describes it; it cannot change "
                             f"{', '.join(changed)} (only --epochs)")
        values = {**stored, **{k: v for k, v in values.items() if k in ("epochs", "out")}}
        source = saved
    config = build(TrainConfig, values, source)
    metrics = train(config, resume=resume, progress=not quiet)
    click.echo(f"run {config.out}: {metrics['epochs']} epochs, mAP@0.5 {metrics['map50']:.4f} "
               f"at {metrics['input_size']} px (11-point {metrics['map50_11pt']:.4f}), COCO mAP {metrics['coco_map']:.4f}, "
               f"{metrics['train_seconds']:.0f} s; final model {config.out}/final.keras")
    return metrics


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", help=f"{', '.join(DATASETS)} or a converted dataset folder  [default: synth]")
@click.option("--model", help="Zoo model name, fresh weights  [default: yolov2].")
@click.option("--init", type=click.Path(dir_okay=False), help="Start from this .keras model.")
@click.option("--cfg", type=click.Path(dir_okay=False), help="Darknet cfg (with --weights).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Darknet .weights (with --cfg).")
@click.option("--mode", type=click.Choice(MODES), help="What trains  [default: full].")
@click.option("--input-size", type=int, help="Input size (a multiple of 32)  [default: the model's].")
@click.option("--width", type=float, help="Width multiplier of a zoo model  [default: 1].")
@click.option("--epochs", type=int, help="[default: 10]")
@click.option("--batch-size", type=int, help="[default: 16]")
@click.option("--lr", type=float, help="Peak learning rate (after warm-up)  [default: 0.001].")
@click.option("--multiscale", nargs=2, type=int, help="LOW HIGH: a random input size per batch.")
@click.option("--distribution", type=click.Choice(DISTRIBUTIONS),
              help="tf.distribute strategy to train under  [default: default].")
@click.option("--seed", type=int, help="[default: 0]")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config; options override it.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory  [default: runs/train].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as JSON.")
def main(config_path, resume, quiet, as_json, **options):
    """Train or retrain a detector; the run directory gets config.yaml, log.csv, TensorBoard logs,
    checkpoints (last, best), best.keras, final.keras and metrics.json."""
    try:
        values = read_yaml(config_path) if config_path else {}
        values.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()
                       if v is not None and k in _OPTIONS})
        metrics = run(values, config_path or "command line", resume, quiet or as_json)
    except (ValueError, TrainingError) as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        payload = json_safe({k: v for k, v in metrics.items() if k != "coco_summary"})
        click.echo(json.dumps(payload, indent=1, allow_nan=False))


if __name__ == "__main__":
    main(prog_name="python -m kprune.retrain")
