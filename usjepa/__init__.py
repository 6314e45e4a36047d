"""US-JEPA: SALT pretraining of ultrasound foundation models (frozen teacher, student, predictor)."""

__version__ = "0.1.0"
