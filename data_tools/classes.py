"""Default class lists of the converters (kept free of heavy imports: `--help` shows them)."""

COCO5 = ("horse", "bear", "zebra", "cow", "giraffe")
KITTI = ("Car", "Van", "Truck", "Pedestrian", "Cyclist")
VOC = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
