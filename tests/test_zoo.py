"""The zoo ships the original cfgs unchanged and builds models by name."""

import pytest

from kprune import detectors
from kprune.darknet import zoo
from tests.conftest import REPO

ORIGINALS = REPO.parent / "shared" / "darknet" / "cfg"


ORIGINAL = ["yolov2", "yolov2-tiny", "yolov2-tiny-voc", "yolov2-voc", "yolov3", "yolov3-tiny"]
FORK = ["yolov4", "yolov4-csp", "yolov4-tiny", "yolov7", "yolov7-tiny"]  # AlexeyAB's fork


def test_zoo_lists_the_eleven_cfgs():
    assert zoo.available() == sorted(ORIGINAL + FORK)


@pytest.mark.parametrize("name", ORIGINAL + FORK)
@pytest.mark.skipif(not ORIGINALS.is_dir(), reason="the original cfgs (../shared/darknet/cfg) are not beside the repo")
def test_zoo_cfgs_equal_the_originals(name):
    folder = ORIGINALS / "alexeyab" if name in FORK else ORIGINALS
    with open(zoo.cfg_path(name), "rb") as shipped, open(folder / f"{name}.cfg", "rb") as original:
        assert shipped.read() == original.read()


def test_zoo_build_with_overrides():
    model = detectors.build("yolov3-tiny", input_size=64, classes=2, width=0.25)
    assert model.output_shape == [(None, 2, 2, 21), (None, 4, 4, 21)]
    with pytest.raises(ValueError, match="zoo models: yolov2, yolov2-tiny"):
        zoo.cfg_path("resnet")
