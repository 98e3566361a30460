"""The cfg parser: the six original cfgs, and clear errors for bad ones."""

import pytest

from kprune.darknet.cfg import CfgError, parse_cfg, read_cfg
from tests.conftest import cfg_path

NET = "[net]\nwidth=64\nheight=64\nchannels=3\n"


def test_yolov2_sections_and_routes():
    cfg = read_cfg(cfg_path("yolov2"))
    assert cfg.input_shape == (608, 608, 3)
    assert len(cfg.layers) == 32
    assert [s.kind for s in cfg.layers].count("convolutional") == 23
    assert cfg.layers[25]["layers"] == [16]  # layers=-9, relative
    assert cfg.layers[28]["layers"] == [27, 24]  # layers=-1,-4
    region = cfg.layers[31]
    assert region.kind == "region" and region["classes"] == 80 and region["num"] == 5
    assert region["anchors"][:2] == [0.57273, 0.677385]
    assert cfg.layers[0]["activation"] == "leaky" and cfg.layers[30]["activation"] == "linear"


def test_yolov3_tiny_absolute_route_and_masks():
    cfg = read_cfg(cfg_path("yolov3-tiny"))
    assert cfg.layers[20]["layers"] == [19, 8]  # layers = -1, 8: relative and absolute
    assert cfg.layers[16]["mask"] == [3, 4, 5] and cfg.layers[23]["mask"] == [0, 1, 2]
    assert cfg.layers[11]["size"] == 2 and cfg.layers[11]["stride"] == 1


def test_yolov3_shortcuts_resolve():
    cfg = read_cfg(cfg_path("yolov3"))
    shortcuts = [s for s in cfg.layers if s.kind == "shortcut"]
    assert len(shortcuts) == 23
    assert all(s["from"] == s.index - 3 for s in shortcuts)


@pytest.mark.parametrize(
    "text, expected",
    [
        (NET + "[convolutional]\nfilters=8\n\n[dropout]\nprobability=.5\n", ["[dropout]", "layer 1", ":8:"]),
        (NET + "[route]\n", ["missing required key 'layers'", "[route]", "layer 0", ":5:"]),
        (NET + "[convolutional]\nfilters=eight\n", ["filters='eight'", "expected an integer", "line 6"]),
        (NET + "[convolutional]\nfilters=8\nactivation=gelu\n", ["activation='gelu'", "layer 0", "line 7"]),
        # a key kprune neither uses nor lists as training-only: named with its section, index and line
        (NET + "[convolutional]\nfilters=8\n[maxpool]\nsize=2\nstride_x=2\n",
         ["unknown key 'stride_x' in [maxpool]", "layer 1", ":7:", "line 9"]),
        (NET + "decay=.1\nmixup=1\n", ["unknown key 'mixup' in [net]", "(net)", "line 6"]),
        (NET + "[convolutional]\nfilters=8\n[route]\nlayers=-1\ngroups=2\ngroup_id=2\n",
         ["group_id=2 must be in 0..1", "layer 1", "line 10"]),
        (NET + "[convolutional]\nfilters=8\n[route]\nlayers=-1\ngroups=0\n", ["groups=0 must be positive"]),
        (NET + "[convolutional]\nfilters=8\n[shortcut]\nfrom=-1\nactivation=tanh\n",
         ["activation='tanh'", "layer 1", "line 9"]),
        (NET + "[yolo]\nanchors=1,2\nnew_coords=2\n", ["new_coords=2", "expected 0 or 1", "line 7"]),
        (NET + "[yolo]\nanchors=1,2\nscale_x_y=0\n", ["scale_x_y=0.0 must be positive"]),
        (NET + "[convolutional]\nfilters=8\n[route]\nlayers=-3\n", ["layers=-3", "layer 1", "line 8"]),
        (NET + "[convolutional]\nfilters=8\n[shortcut]\nfrom=1\n", ["from=1", "layer 1"]),
        (NET + "[yolo]\nanchors=1,2,3\nnum=2\n", ["anchors has 3 values", "num=2 needs 4"]),
        (NET + "[convolutional]\nfilters=0\n", ["filters=0 must be positive"]),
        ("width=3\n[net]\n", ["comes before any [section]", ":1:"]),
        ("[convolutional]\nfilters=8\n", ["first section must be [net]"]),
        ("[net]\nwidth=64\n", ["missing required key 'height'", "[net]"]),
        (NET + "[convolutional\n", ["malformed section header"]),
    ],
)
def test_bad_cfg_messages(text, expected):
    with pytest.raises(CfgError) as info:
        parse_cfg(text, source="bad.cfg")
    message = str(info.value)
    assert message.startswith("bad.cfg:")
    for part in expected:
        assert part in message, message


def test_missing_file_names_path(tmp_path):
    with pytest.raises(CfgError, match="cannot read cfg file .*nope.cfg"):
        read_cfg(tmp_path / "nope.cfg")


def test_comments_and_defaults():
    cfg = parse_cfg(NET + "# a comment\n[convolutional]\nfilters=8 # trailing\n[maxpool]\nstride=2\n")
    conv, pool = cfg.layers
    assert conv["filters"] == 8 and conv["size"] == 1 and conv["activation"] == "logistic"
    assert pool["size"] == 2  # Darknet: size defaults to stride
