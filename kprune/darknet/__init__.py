"""The bridge between Darknet (cfg + .weights files) and tf_keras functional models."""
