"""Dataset converters (COCO, KITTI, VOC -> TFRecord) and the synthetic dataset generator."""
