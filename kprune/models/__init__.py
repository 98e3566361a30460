"""Model building blocks: custom layers, the model zoo and the detection head decoding."""
