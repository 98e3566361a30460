"""Pruning: unstructured magnitude pruning through tfmot (:mod:`.unstructured`) and structured
filter removal (:mod:`.graph`, :mod:`.importance`, :mod:`.allocation`, :mod:`.schedules`,
:mod:`.plan`, :mod:`.surgeon`)."""
