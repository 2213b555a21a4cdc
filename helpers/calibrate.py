"""Calibrated weight quantization: GPTQ and AWQ (fast paths of notebook 01's idea cells) and
the driver that feeds them a model's activations, one decoder layer at a time."""
