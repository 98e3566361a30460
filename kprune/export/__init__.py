"""Export for deployment: TFLite (float, fp16, dynamic-range and full-integer int8) and SavedModel."""
