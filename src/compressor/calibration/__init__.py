"""Calibration: the data a post-training run calibrates on, and the pipelines that run it
through the model (``compressor.calibration.pipelines``)."""
