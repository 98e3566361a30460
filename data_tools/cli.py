"""``python -m data_tools``: convert COCO / KITTI / VOC to kprune TFRecords, or make synthetic data.

The commands parse arguments, call the converters and print their summary; a user error (a missing
file, an unknown class, a bad option) ends with one line ``Error: ...`` and exit status 1.
"""

from __future__ import annotations

import functools

import click

from data_tools import classes as defaults

def _user_errors(command):
    """Turn ValueError / OSError (and TensorFlow's file errors) into click's one-line error."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from kprune._keras import tf

        try:
            return command(*args, **kwargs)
        except (ValueError, OSError) as error:
            raise click.ClickException(str(error)) from None
        except tf.errors.OpError as error:
            raise click.ClickException(error.message.splitlines()[0]) from None

    return wrapper


# Where the official data comes from and how its folder must look, for the missing-folder message.
SOURCES = {
    "coco": ("COCO_DIR/annotations/instances_{train,val}2017.json with the images in COCO_DIR/train2017/ and "
             "COCO_DIR/val2017/", "https://cocodataset.org/#download (2017 Train images, 2017 Val images, "
                                 "2017 Train/Val annotations)"),
    "kitti": ("KITTI_DIR/training/image_2/*.png and KITTI_DIR/training/label_2/*.txt",
              "https://www.cvlibs.net/datasets/kitti/eval_object.php?obj_benchmark=2d (left color images and "
              "training labels of the object data set)"),
    "voc": ("VOCdevkit/VOC2007/ (and VOC2012/, ...) with Annotations/, JPEGImages/ and ImageSets/Main/",
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/ (training/validation and test data) and "
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ (training/validation data)"),
}


def _require_dir(path: str, kind: str) -> None:
    """A missing dataset folder: say what layout is expected and where the data comes from."""
    import os

    if not os.path.isdir(path):
        layout, url = SOURCES[kind]
        raise click.ClickException(f"{kind} folder {path!r} not found. Expected {layout}; the official data comes "
                                   f"from {url}.")


def _write(records, classes, out, source, options, dropped_fields, annotation_bytes, quiet, extra=None):
    from data_tools.convert import summary, write_dataset

    if not quiet:
        click.echo(f"converting {', '.join(f'{len(r)} {split}' for split, r in records.items())} images")
    if extra:
        source = {**source, **extra}
    manifest = write_dataset(
        records, classes, out, source, options, dropped_fields, annotation_bytes, progress=not quiet
    )
    click.echo(summary(manifest, out))


def _classes(names, what: str):
    return click.option("--classes", default=",".join(names), show_default=True,
                        help=f"Comma-separated {what}, in label order (stored 1..K as the Object Detection API "
                             "does; kprune reads them as 0..K-1).")


_out = click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the TFRecords and dataset.json.")
_quiet = click.option("--quiet", is_flag=True, help="No progress bar.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Dataset tools: COCO, KITTI and VOC to sharded TFRecords with a dataset.json manifest,
    metadata stripped; and a synthetic dataset in the official COCO or KITTI layout."""


@main.command()
@click.option("--coco-dir", required=True, type=click.Path(file_okay=False),
              help="Folder with annotations/instances_{train,val}YEAR.json and trainYEAR/, valYEAR/.")
@click.option("--year", default=2017, show_default=True, type=int)
@_classes(defaults.COCO5, "category names ('all': every category, in id order)")
@click.option("--keep-negatives", default=0, show_default=True, type=int,
              help="Also keep this many images per split without any of the classes (drawn by seed 0).")
@_out
@_quiet
@_user_errors
def coco(coco_dir, year, classes, keep_negatives, out, quiet):
    """COCO instances (official layout) -> a class subset. Crowd boxes become ignore regions."""
    _require_dir(coco_dir, "coco")
    from data_tools import coco as coco_mod
    from data_tools.convert import parse_classes

    names = None if classes == "all" else parse_classes(classes)
    records, names, nbytes = coco_mod.coco_records(coco_dir, year, names, keep_negatives)
    options = {"year": year, "classes": names, "keep_negatives": keep_negatives}
    _write(records, names, out, {"kind": "coco", "dir": coco_dir}, options, coco_mod.DROPPED_FIELDS, nbytes, quiet)


@main.command()
@click.option("--kitti-dir", required=True, type=click.Path(file_okay=False),
              help="Folder with training/image_2 and training/label_2.")
@_classes(defaults.KITTI, "KITTI types")
@click.option("--map", "mapping", multiple=True, metavar="TYPE=CLASS",
              help="Count objects of TYPE as CLASS, e.g. Person_sitting=Pedestrian (repeatable).")
@click.option("--val-fraction", default=None, type=float,
              help="Fraction of the labelled images for validation  [default: 0.2].")
@click.option("--train", "num_train", type=int, default=None, help="Exact number of training images (with --val).")
@click.option("--val", "num_val", type=int, default=None, help="Exact number of validation images (with --train).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the train/val split.")
@_out
@_quiet
@_user_errors
def kitti(kitti_dir, classes, mapping, val_fraction, num_train, num_val, seed, out, quiet):
    """KITTI object detection (official layout) -> a deterministic train/val split. DontCare boxes
    become ignore regions."""
    _require_dir(kitti_dir, "kitti")
    from data_tools import kitti as kitti_mod
    from data_tools.convert import parse_classes

    names = parse_classes(classes)
    mapped = kitti_mod.parse_mapping(mapping, names)
    records, nbytes, left_out = kitti_mod.kitti_records(
        kitti_dir, names, mapped, val_fraction, num_train, num_val, seed
    )
    options = {"classes": names, "map": mapped, "val_fraction": val_fraction, "train": num_train,
               "val": num_val, "seed": seed}
    _write(records, names, out, {"kind": "kitti", "dir": kitti_dir}, options, kitti_mod.DROPPED_FIELDS, nbytes, quiet,
           extra={"objects_left_out": left_out})
    if left_out:
        click.echo("  objects of other types left out: " + ", ".join(f"{k} {v}" for k, v in sorted(left_out.items())))


@main.command()
@click.option("--voc-dir", required=True, type=click.Path(file_okay=False),
              help="VOCdevkit (with VOC2007/, VOC2012/ inside) or one year's folder itself (one year only).")
@click.option("--year", default=None, type=int,
              help="Short for --train YEAR:train --val YEAR:val  [default: 2007].")
@click.option("--train", "train_sets", default=None, metavar="YEAR:SET,...",
              help="Image sets of the train split, e.g. 2007:trainval,2012:trainval "
                   "(VOCdevkit/VOC2007/ImageSets/Main/trainval.txt, ...); with --val.")
@click.option("--val", "val_sets", default=None, metavar="YEAR:SET,...",
              help="Image sets of the val split, e.g. 2007:test; with --train.")
@_classes(defaults.VOC, "VOC class names")
@_out
@_quiet
@_user_errors
def voc(voc_dir, year, train_sets, val_sets, classes, out, quiet):
    """PASCAL VOC (lists of ImageSets/Main). Difficult objects become ignore regions. With image sets
    of several years, source ids and file names start with the year (2007_000005)."""
    from data_tools import voc as voc_mod
    from data_tools.convert import parse_classes

    splits = voc_mod.split_image_sets(year, train_sets, val_sets)
    _require_dir(voc_dir, "voc")
    names = parse_classes(classes)
    records, nbytes = voc_mod.image_set_records(voc_dir, splits, names)
    short_form = {"year": splits["train"][0][0]} if train_sets is None else {}
    options = {**short_form, **voc_mod.image_set_options(splits), "classes": names}
    _write(records, names, out, {"kind": "voc", "dir": voc_dir}, options, voc_mod.DROPPED_FIELDS, nbytes, quiet)


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the dataset (official layout).")
@click.option("--num-train", default=1000, show_default=True, type=int)
@click.option("--num-val", default=200, show_default=True, type=int)
@click.option("--size", default=256, show_default=True, type=int,
              help="Longer image side in pixels (the shorter one varies from 3/4 of it to all of it).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--format", "fmt", type=click.Choice(["coco", "kitti"]), default="coco", show_default=True)
@_quiet
@_user_errors
def synth(out, num_train, num_val, size, seed, fmt, quiet):
    """A synthetic detection dataset (5 shape classes) in the official COCO or KITTI layout.
    Convert it like real data: `python -m data_tools coco --coco-dir OUT --classes all --out DATA`."""
    from data_tools import synth as synth_mod

    result = synth_mod.generate(out, num_train=num_train, num_val=num_val, size=size, seed=seed, fmt=fmt,
                                progress=not quiet)
    click.echo(f"synthetic dataset ({fmt} layout) written to {out}; classes {', '.join(result['classes'])}")
    for split, info in result["splits"].items():
        per_class = ", ".join(f"{name} {count}" for name, count in info["per_class"].items())
        click.echo(f"  {split}: {info['images']} images, {info['objects']} objects ({per_class}), "
                   f"{info['ignored']} ignore regions")
