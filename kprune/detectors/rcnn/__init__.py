"""Faster R-CNN with FPN (the detectron2 / torchvision recipe) as a detector family.

The package holds the model builders (``builders``), the RPN target encoder (``targets``) and the
two-stage loss (``loss``); the family object itself lives here.
"""
